//! `nixenv-bench-memory`: memory of containerd-shim-nixenv-v2 per running pod against
//! containerd's own `containerd-shim-runc-v2`, in one containerd (root; run by
//! `bench/shim-memory.sh`).
//!
//! Starts a private containerd (Debian's 1.6) with the `runc` and `nixenv` handlers, warms the
//! node store with one mission pod, then runs `PODS` (default 4) mission pods on `nixenv`
//! (annotation `nix.dev/environment: acme/echoserver`, image `empty:latest`, command
//! `echoserver`, each answering HTTP) and `PODS` pods on `runc` (busybox `httpd`), all at
//! once. containerd starts one shim per pod. After `SETTLE_SECS` (default 5) it reads each
//! shim's `/proc/PID/status` (VmRSS) and `/proc/PID/smaps_rollup` (Pss, and private pages:
//! USS) and prints the medians per shim and the ratios nixenv/runc. Goal (issue 7): RSS
//! ratio ≤ 1/3. With `PLAIN=1` the nixenv pods are plain busybox pods (no annotation).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nixenv_testkit::containerd::{Containerd, RuntimeHandler};
use nixenv_testkit::cri::{ContainerSpec, Cri, PodSpec};
use nixenv_testkit::fixtures::echo;
use nixenv_testkit::{free_port, images, shim_bin, Cache, ServedNode};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One shim's memory, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    rss: u64,
    pss: u64,
    uss: u64,
}

/// A column of the table: its name and how to read it off a shim's [`Memory`].
type Metric = (&'static str, fn(&Memory) -> u64);

fn field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn memory(pid: i32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    Ok(Memory {
        rss: field(&status, "VmRSS:"),
        pss: field(&rollup, "Pss:"),
        uss: field(&rollup, "Private_Clean:") + field(&rollup, "Private_Dirty:"),
    })
}

/// RSS by mapping (file name, `[heap]`, `[stack]`, anonymous), largest first, in KiB.
fn rss_by_mapping(pid: i32) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    let mut current = String::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            current = line
                .split_whitespace()
                .nth(5)
                .unwrap_or("[anon]")
                .to_string();
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            let kb: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            *by.entry(current.clone()).or_default() += kb;
        }
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.1));
    v
}

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2] as f64,
        n => (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0,
    }
}

fn shim_binary(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("nixenv-bench-memory starts containerd and runc: run it as root");
    }
    let pods = env_num("PODS", 4) as usize;
    let settle = Duration::from_secs(env_num("SETTLE_SECS", 5));
    // PLAIN=1: the nixenv pods carry no annotation (busybox httpd as on runc), which shows
    // what preparing a closure adds to a shim.
    let plain = std::env::var_os("PLAIN").is_some();

    let served = ServedNode::new(Cache::Xz);
    let node = &served.node;
    let shim = shim_bin();
    eprintln!("== shim: {}", shim.display());
    let c = Containerd::builder()
        .handler(RuntimeHandler::runc())
        .handler(RuntimeHandler::nixenv())
        .default_handler("runc")
        .path_dir(shim.parent().context("shim dir")?)
        .env("NIXENV_CONFIG", node.write_config())
        .start()?;
    c.import(&images::busybox_image())?;
    c.import(&images::empty_image())?;
    let mut cri = Cri::connect(c.address()).await?;

    let mut started = Vec::new();
    let result = async {
        // Warm the node store (not measured): the closure is pulled once.
        let mut kinds = vec![("warm", "nixenv")];
        kinds.extend((0..pods).flat_map(|_| [("pod", "nixenv"), ("pod", "runc")]));
        for (i, (what, handler)) in kinds.into_iter().enumerate() {
            let port = free_port();
            let pod = PodSpec::new(&format!("mem-{handler}-{i}")).handler(handler);
            let (pod, spec) = if handler == "nixenv" && !plain {
                (
                    pod.annotation("nix.dev/environment", "acme/echoserver"),
                    ContainerSpec::new("echoserver", "empty:latest")
                        .command(&["echoserver"])
                        .env("PORT", &port.to_string()),
                )
            } else {
                let p = port.to_string();
                (
                    pod,
                    ContainerSpec::new("httpd", images::BUSYBOX_IMAGE).command(&[
                        "/bin/busybox",
                        "httpd",
                        "-f",
                        "-p",
                        &p,
                    ]),
                )
            };
            let pod_id = cri.run_pod(&pod).await.context("run pod")?;
            started.push(pod_id.clone());
            let id = cri
                .create_container(&pod_id, &pod, &spec)
                .await
                .map_err(|e| anyhow::anyhow!("create: {}", e.message()))?;
            cri.start_container(&id)
                .await
                .map_err(|e| anyhow::anyhow!("start: {}", e.message()))?;
            let addr = format!("127.0.0.1:{port}");
            if handler == "nixenv" && !plain {
                echo(&addr, Duration::from_secs(30)).context("echoserver answers")?;
            } else {
                let deadline = Instant::now() + Duration::from_secs(30);
                while std::net::TcpStream::connect(&addr).is_err() {
                    if Instant::now() > deadline {
                        bail!("busybox httpd on {addr} does not answer");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            if what == "warm" {
                cri.stop_pod(&pod_id).await.ok();
                cri.delete_pod(&pod_id).await.ok();
                started.pop();
            }
        }
        tokio::time::sleep(settle).await;

        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let detail = std::env::var_os("DETAIL").is_some();
        let mut shown = std::collections::BTreeSet::new();
        for pid in c.shim_pids() {
            let m = memory(pid)?;
            let binary = shim_binary(pid);
            if detail && shown.insert(binary.clone()) {
                eprintln!("== RSS by mapping of {binary} (pid {pid}), KiB:");
                for (name, kb) in rss_by_mapping(pid).into_iter().take(8) {
                    eprintln!("   {kb:>6}  {name}");
                }
            }
            match binary.as_str() {
                "containerd-shim-nixenv-v2" => ours.push(m),
                "containerd-shim-runc-v2" => theirs.push(m),
                other => eprintln!("== ignoring shim {pid} ({other})"),
            }
        }
        if ours.len() != pods || theirs.len() != pods {
            bail!(
                "expected {pods} shims of each kind, found {} nixenv and {} runc",
                ours.len(),
                theirs.len()
            );
        }
        let stat = |v: &[Memory], f: fn(&Memory) -> u64| median(v.iter().map(f).collect());
        println!();
        println!("{pods} running pods per handler, one shim each; medians per shim (MiB)");
        println!();
        println!("| metric | containerd-shim-nixenv-v2 | containerd-shim-runc-v2 | ratio |");
        println!("| --- | --- | --- | --- |");
        let metrics: [Metric; 3] = [
            ("RSS", |m| m.rss),
            ("PSS", |m| m.pss),
            ("USS (private)", |m| m.uss),
        ];
        for (name, f) in metrics {
            let (a, b) = (stat(&ours, f), stat(&theirs, f));
            println!(
                "| {name} | {:.2} | {:.2} | {:.3} |",
                a / 1024.0,
                b / 1024.0,
                a / b
            );
        }
        let ratio = stat(&ours, |m| m.rss) / stat(&theirs, |m| m.rss);
        println!();
        println!("RSS ratio nixenv/runc: {ratio:.3} (goal: <= 0.333)");
        anyhow::Ok(())
    }
    .await;

    for pod_id in started {
        cri.stop_pod(&pod_id).await.ok();
        cri.delete_pod(&pod_id).await.ok();
    }
    result
}
