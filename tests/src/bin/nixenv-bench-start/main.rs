//! `nixenv-bench-start`: warm start of the nixenv pod against the same closure shipped as an
//! ordinary image on containerd's own runc shim (issue 7's benchmark). Run by `bench/start.sh`,
//! which documents the environment variables; needs root.
//!
//! One private containerd 1.6 (the testkit's) with two handlers: `nixenv`
//! (`containerd-shim-nixenv-v2`, `pod_annotations = ["nix.dev/*"]`) and `runc`
//! (`containerd-shim-runc-v2`). The fixture cache and a catalog are served over HTTP on
//! 127.0.0.1. Variants, alternated within every round:
//!
//! - `A nixenv`: handler `nixenv`, image `empty:latest`, annotation
//!   `nix.dev/environment: acme/echoserver` (closure: echoserver, glibc, busybox, data: 4 paths),
//!   command `echoserver`.
//! - `B runc`: handler `runc`, an ordinary one-layer image holding the same 4 store paths under
//!   `/nix/store`, command `echoserver` found through `PATH`; the container's env is what
//!   nixenv sets from the lock (PATH, ECHO_MESSAGE, NIXENV_ENVIRONMENT, NIXENV_GENERATION).
//! - `D nixenv 1k` (when `NIXENV_BENCH_BIG_ROOT` names a root): like A, but the environment
//!   `bench/echoserver-1000` whose lock adds that root (1,001 small paths) to echoserver and
//!   busybox: a 1,005-path closure, so 1,005 bind mounts.
//!
//! Each sample: RunPodSandbox (host network) — outside the main timing — then CreateContainer,
//! StartContainer, and `GET /` on the echoserver's port, retried every millisecond, until the
//! first HTTP 200. Then the pod is stopped and removed (outside the timing) and the bench waits
//! for every shim to exit. The store is warm: one untimed round first pulls the closures and
//! checks each variant's answer (message, env, `/nix/store` listing).
//!
//! With `CONCURRENT=N` (`bench/start-burst.sh`, issue 16 point 4), N pods of a variant are
//! started at once instead, each timed from its own CreateContainer call to its own first
//! answer; see [`burst`].
//!
//! Profiling: `NIXENV_BENCH_STRACE=DIR` attaches `strace -f -tt -T` to each pod's shim after
//! RunPodSandbox (the samples are then slower); `NIXENV_KEEP_CONTAINERD=1` keeps containerd's
//! log, which holds the shims' logs (`create` / `environment prepared` timestamps).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use nixenv_testkit::containerd::{Containerd, RuntimeHandler};
use nixenv_testkit::cri::{ContainerSpec, Cri, PodSpec};
use nixenv_testkit::fixtures::{http_get, store_path_base, EchoReply};
use nixenv_testkit::images::{self, ImageBuilder};
use nixenv_testkit::{free_port, shim_bin, Cache, CacheServer, Fixtures, TestNode};

mod burst;

/// The ordinary image holding the echoserver closure.
const CLOSURE_IMAGE: &str = "docker.io/nixenv/echoserver-closure:bench";
/// The environment published with the big closure.
const BIG_ENV: &str = "bench/echoserver-1000";
/// How long one start may take before the bench gives up.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// How a variant's pod is made.
#[derive(Debug, Clone)]
struct Variant {
    label: &'static str,
    handler: &'static str,
    environment: Option<String>,
    image: &'static str,
    env: Vec<(String, String)>,
    /// Expected `/nix/store` entries seen by the server.
    store_len: usize,
}

/// One measured start.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    sandbox: Duration,
    create: Duration,
    start: Duration,
    answer: Duration,
}

impl Sample {
    /// CreateContainer + StartContainer + until the first HTTP answer.
    fn container(&self) -> Duration {
        self.create + self.start + self.answer
    }
    /// RunPodSandbox + the above.
    fn pod(&self) -> Duration {
        self.sandbox + self.container()
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(key) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{key}={v:?}: not a valid value")),
        _ => Ok(default),
    }
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| {
            let f: Vec<&str> = s.split_whitespace().take(3).collect();
            format!("load average {}", f.join(", "))
        })
        .unwrap_or_default()
}

fn tool_version(cmd: &str, arg: &str) -> String {
    std::process::Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("{cmd}: unknown version"))
}

/// Adds the file tree at `host` to the image at `rel` (no leading slash), as it is on disk.
fn add_tree(mut b: ImageBuilder, host: &Path, rel: &str) -> anyhow::Result<ImageBuilder> {
    let meta = std::fs::symlink_metadata(host).with_context(|| host.display().to_string())?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(host)?;
        b = b.symlink(rel, &target.to_string_lossy());
    } else if meta.is_dir() {
        b = b.dir(rel, mode);
        let mut entries: Vec<PathBuf> = std::fs::read_dir(host)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for e in entries {
            let name = e.file_name().context("entry name")?.to_string_lossy();
            b = add_tree(b, &e, &format!("{rel}/{name}"))?;
        }
    } else {
        b = b.file(rel, mode, std::fs::read(host)?);
    }
    Ok(b)
}

/// The ordinary image: `/nix/store/<path>` for each path of `closure`, copied from the host's
/// Nix store (where the fixtures were built).
fn closure_image(closure: &[String]) -> anyhow::Result<ImageBuilder> {
    let mut b = ImageBuilder::new(CLOSURE_IMAGE)
        .dir("nix", 0o755)
        .dir("nix/store", 0o755);
    for p in closure {
        b = add_tree(
            b,
            Path::new(p),
            &format!("nix/store/{}", store_path_base(p)),
        )?;
    }
    Ok(b)
}

/// `GET /` until the first HTTP 200 (connection errors retried every millisecond).
fn wait_answer(addr: &str, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        match http_get(addr, "/") {
            Ok((200, body)) => return Ok(body),
            Ok((status, body)) => bail!("echoserver at {addr}: HTTP {status}: {body}"),
            Err(e) if Instant::now() > deadline => bail!("echoserver at {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

struct Bench {
    containerd: Containerd,
    cri: Cri,
    node: TestNode,
    round: usize,
    /// `NIXENV_BENCH_STRACE`: a directory for `strace -f -tt -T` logs of the pods' shims.
    strace: Option<PathBuf>,
}

/// The pod and container of one sample of `v`: pod `bench-{n}`, the echoserver on `port`.
fn pod_of(v: &Variant, n: usize, port: u16) -> (PodSpec, ContainerSpec) {
    let mut pod = PodSpec::new(&format!("bench-{n}")).handler(v.handler);
    if let Some(e) = &v.environment {
        pod = pod.annotation("nix.dev/environment", e);
    }
    let mut spec = ContainerSpec::new("echoserver", v.image)
        .command(&["echoserver"])
        .env("PORT", &port.to_string());
    for (k, val) in &v.env {
        spec = spec.env(k, val);
    }
    (pod, spec)
}

/// The timed part of a sample: CreateContainer, StartContainer, then `GET /` on `port` until
/// the first HTTP 200, timed from the CreateContainer call; `sandbox` is left at zero.
async fn create_start_answer(
    cri: &mut Cri,
    label: &str,
    pod_id: &str,
    (pod, spec): &(PodSpec, ContainerSpec),
    port: u16,
) -> anyhow::Result<(Sample, EchoReply)> {
    let t1 = Instant::now();
    let id = cri
        .create_container(pod_id, pod, spec)
        .await
        .map_err(|e| anyhow::anyhow!("{label}: CreateContainer: {}", e.message()))?;
    let t2 = Instant::now();
    cri.start_container(&id)
        .await
        .map_err(|e| anyhow::anyhow!("{label}: StartContainer: {}", e.message()))?;
    let t3 = Instant::now();
    let addr = format!("127.0.0.1:{port}");
    let body = tokio::task::spawn_blocking(move || wait_answer(&addr, ANSWER_TIMEOUT)).await??;
    let t4 = Instant::now();
    let s = Sample {
        sandbox: Duration::ZERO,
        create: t2 - t1,
        start: t3 - t2,
        answer: t4 - t3,
    };
    let reply: EchoReply =
        serde_json::from_str(&body).with_context(|| format!("{label}: bad answer {body}"))?;
    Ok((s, reply))
}

impl Bench {
    /// Runs one pod of `v`; returns its timings and the echoserver's answer.
    async fn sample(&mut self, v: &Variant) -> anyhow::Result<(Sample, EchoReply)> {
        self.round += 1;
        let port = free_port();
        let pod = pod_of(v, self.round, port);
        let t0 = Instant::now();
        let pod_id = self
            .cri
            .run_pod(&pod.0)
            .await
            .map_err(|e| anyhow::anyhow!("{}: RunPodSandbox: {}", v.label, e.message()))?;
        let sandbox = t0.elapsed();
        let tracer = self.attach_strace(v)?;
        if tracer.is_some() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let result = create_start_answer(&mut self.cri, v.label, &pod_id, &pod, port).await;
        let removed = self.cri.delete_pod(&pod_id).await;
        if let Some(mut t) = tracer {
            let _ = tokio::task::spawn_blocking(move || t.wait()).await;
        }
        let (s, reply) = result.inspect_err(|_| self.print_log_tail())?;
        removed.map_err(|e| anyhow::anyhow!("{}: delete pod: {}", v.label, e.message()))?;
        self.wait_shims_gone(v.label, Duration::from_secs(20))
            .await?;
        Ok((Sample { sandbox, ..s }, reply))
    }

    /// Lets the pods' shims and runc teardown finish before the next sample.
    async fn wait_shims_gone(&self, label: &str, patience: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + patience;
        while !self.containerd.shim_pids().is_empty() {
            ensure!(Instant::now() < deadline, "{label}: shims still running");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }

    /// With `NIXENV_BENCH_STRACE`, attaches strace to the pod's shim (there is one shim
    /// running between samples: this pod's). Profiling only: it slows what it traces.
    fn attach_strace(&self, v: &Variant) -> anyhow::Result<Option<std::process::Child>> {
        let Some(dir) = &self.strace else {
            return Ok(None);
        };
        let pids = self.containerd.shim_pids();
        ensure!(pids.len() == 1, "strace: expected one shim, found {pids:?}");
        std::fs::create_dir_all(dir)?;
        let name = format!("{}-{}.strace", v.label.replace(' ', "-"), self.round);
        let child = std::process::Command::new("strace")
            .args(["-f", "-tt", "-T", "-s", "200", "-o"])
            .arg(dir.join(name))
            .args(["-p", &pids[0].to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("run strace")?;
        Ok(Some(child))
    }

    fn print_log_tail(&self) {
        eprintln!("containerd log (last lines):");
        let log = self.containerd.log();
        let lines: Vec<&str> = log.lines().collect();
        for l in &lines[lines.len().saturating_sub(30)..] {
            eprintln!("    {l}");
        }
    }
}

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn sorted_ms(samples: &[Sample], f: impl Fn(&Sample) -> Duration) -> Vec<f64> {
    let mut v: Vec<f64> = samples.iter().map(|s| f(s).as_secs_f64() * 1e3).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// `median (p90, min)` in ms.
fn stat(samples: &[Sample], f: impl Fn(&Sample) -> Duration) -> String {
    let v = sorted_ms(samples, f);
    format!("{:.1} ({:.1}, {:.1})", median(&v), pct(&v, 90.0), v[0])
}

fn med(samples: &[Sample], f: impl Fn(&Sample) -> Duration) -> f64 {
    median(&sorted_ms(samples, f))
}

/// The current lock of `org/app` in a catalog directory: (generation, paths, env).
fn read_lock(
    catalog: &Path,
    name: &str,
    system: &str,
) -> anyhow::Result<(u64, Vec<String>, BTreeMap<String, String>)> {
    let file = catalog.join(name).join("current.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)
        .with_context(|| file.display().to_string())?;
    let sys = &v["systems"][system];
    let paths = serde_json::from_value(sys["paths"].clone())?;
    let env = serde_json::from_value(sys["env"].clone()).unwrap_or_default();
    let generation = v["generation"].as_u64().context("generation")?;
    Ok((generation, paths, env))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("nixenv-bench-start starts containerd and runc: run it as root");
    }
    let concurrent: usize = env_or("CONCURRENT", 0)?;
    let runs: usize = env_or("RUNS", if concurrent > 0 { 5 } else { 20 })?;
    ensure!(runs > 0, "RUNS must be at least 1");
    ensure!(
        concurrent == 0 || std::env::var_os("NIXENV_BENCH_STRACE").is_none(),
        "NIXENV_BENCH_STRACE traces one pod at a time: unset it or CONCURRENT"
    );
    let log_level: String = env_or("NIXENV_BENCH_LOG_LEVEL", "info".to_owned())?;
    let big_root = std::env::var("NIXENV_BENCH_BIG_ROOT")
        .ok()
        .filter(|s| !s.is_empty());
    let big_cache = std::env::var("NIXENV_BENCH_BIG_CACHE")
        .ok()
        .filter(|s| !s.is_empty());
    ensure!(
        big_root.is_some() == big_cache.is_some(),
        "set both NIXENV_BENCH_BIG_ROOT and NIXENV_BENCH_BIG_CACHE, or neither"
    );

    eprintln!("== fixtures (Nix-built echoserver closure, signed caches)");
    let fx = Fixtures::get();
    let work = tempfile::Builder::new()
        .prefix("nixenv-bench-start-")
        .tempdir()?;
    let catalog_dir = fx.catalog_copy(&work.path().join("catalog"));
    let mut mounts: Vec<(&str, &Path)> = vec![
        ("/cache", fx.cache(Cache::Zstd)),
        ("/catalog", catalog_dir.as_path()),
    ];
    if let Some(c) = &big_cache {
        mounts.push(("/big-cache", Path::new(c)));
    }
    let server = CacheServer::serve_mounts(mounts);
    let mut node = TestNode::new()
        .substituter(&server.url_of("/cache"))
        .trusting(&fx.trusted_key.public)
        .with_catalog(&server.url_of("/catalog"));
    if big_cache.is_some() {
        node = node.substituter(&server.url_of("/big-cache"));
    }

    let (generation, lock_paths, lock_env) =
        read_lock(&catalog_dir, "acme/echoserver", &fx.system)?;
    let closure = fx.echoserver_closure().to_vec();

    if let Some(root) = &big_root {
        eprintln!("== publishing {BIG_ENV}: echoserver, busybox and {root}");
        let mut cmd = node.nixenv(&["publish", "--catalog"]);
        cmd.arg(&catalog_dir);
        for (k, v) in &lock_env {
            cmd.args(["--env", &format!("{k}={v}")]);
        }
        cmd.arg(BIG_ENV).args(&lock_paths).arg(root);
        let out = cmd.output().context("run nixenv publish")?;
        ensure!(
            out.status.success(),
            "nixenv publish {BIG_ENV}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    eprintln!(
        "== building the ordinary image {CLOSURE_IMAGE} ({} store paths)",
        closure.len()
    );
    let image = closure_image(&closure)?;

    eprintln!("== starting containerd (log level {log_level})");
    let shim = shim_bin();
    let containerd = Containerd::builder()
        .handler(RuntimeHandler::nixenv())
        .handler(RuntimeHandler::runc())
        .default_handler("runc")
        .path_dir(shim.parent().context("shim dir")?)
        .env("NIXENV_CONFIG", node.write_config())
        .log_level(&log_level)
        .start()?;
    containerd.import(&images::empty_image())?;
    containerd.import(&image)?;
    let cri = Cri::connect(containerd.address()).await?;

    // What nixenv sets from the lock, given to the runc container explicitly.
    let mut path = lock_paths
        .iter()
        .filter(|p| Path::new(p).join("bin").is_dir())
        .map(|p| format!("{p}/bin"))
        .collect::<Vec<_>>();
    path.push("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned());
    let mut runc_env = vec![("PATH".to_owned(), path.join(":"))];
    runc_env.extend(lock_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    runc_env.push((
        "NIXENV_ENVIRONMENT".to_owned(),
        "acme/echoserver".to_owned(),
    ));
    runc_env.push(("NIXENV_GENERATION".to_owned(), generation.to_string()));

    let a = Variant {
        label: "A nixenv",
        handler: "nixenv",
        environment: Some("acme/echoserver".to_owned()),
        image: "empty:latest",
        env: Vec::new(),
        store_len: closure.len(),
    };
    let b = Variant {
        label: "B runc",
        handler: "runc",
        environment: None,
        image: CLOSURE_IMAGE,
        env: runc_env,
        store_len: closure.len(),
    };
    let mut variants = vec![a, b];
    let mut bench = Bench {
        containerd,
        cri,
        node,
        round: 0,
        strace: std::env::var_os("NIXENV_BENCH_STRACE")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
    };

    eprintln!("== warm-up round: pulls the closures, checks every variant's answer");
    let mut warm: Vec<EchoReply> = Vec::new();
    for v in &variants {
        let (_, reply) = bench.sample(v).await?;
        check_reply(v, &reply)?;
        warm.push(reply);
    }
    if big_root.is_some() {
        let big_len = bench.node.store_entries().len();
        let d = Variant {
            label: "D nixenv 1k",
            environment: Some(BIG_ENV.to_owned()),
            store_len: 0,
            ..variants[0].clone()
        };
        let (_, reply) = bench.sample(&d).await?;
        // The node store now holds both closures: echoserver's and the big one's (a superset).
        let store_len = bench.node.store_entries().len();
        ensure!(
            store_len > big_len + 1000,
            "{BIG_ENV}: the node store holds {store_len} paths after its pull"
        );
        let d = Variant { store_len, ..d };
        check_reply(&d, &reply)?;
        variants.push(d);
    }
    compare_env(&warm[0], &warm[1]);

    if concurrent > 0 {
        return burst::run(&mut bench, &variants, concurrent, runs).await;
    }
    let load_before = uptime();
    eprintln!("== {runs} rounds of {} ({load_before})", labels(&variants));
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); variants.len()];
    for r in 0..runs {
        for (i, v) in variants.iter().enumerate() {
            let (s, _) = bench.sample(v).await?;
            samples[i].push(s);
        }
        if (r + 1) % 5 == 0 {
            eprintln!("   {}/{runs} rounds", r + 1);
        }
    }
    let load_after = uptime();

    print_machine(&load_before, &load_after);
    println!("{runs} rounds, variants alternated within each round; ms, median (p90, min)");
    println!();
    println!("| variant | closure paths | RunPodSandbox | CreateContainer | StartContainer | start→answer | **Create+Start→answer** | RunPodSandbox+Create+Start→answer |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (v, s) in variants.iter().zip(&samples) {
        println!(
            "| {} | {} | {} | {} | {} | {} | **{}** | {} |",
            v.label,
            v.store_len,
            stat(s, |s| s.sandbox),
            stat(s, |s| s.create),
            stat(s, |s| s.start),
            stat(s, |s| s.answer),
            stat(s, Sample::container),
            stat(s, Sample::pod),
        );
    }
    println!();
    let (a, b) = (&samples[0], &samples[1]);
    let ratio = med(a, Sample::container) / med(b, Sample::container);
    let ratio_pod = med(a, Sample::pod) / med(b, Sample::pod);
    println!(
        "A/B (nixenv/runc), Create+Start→answer, ratio of medians: {ratio:.3} (goal: <= 1.10: {})",
        if ratio <= 1.10 { "met" } else { "missed" }
    );
    println!(
        "A/B (nixenv/runc), RunPodSandbox+Create+Start→answer, ratio of medians: {ratio_pod:.3}"
    );
    if let Some(d) = samples.get(2) {
        println!(
            "D/A (nixenv {} paths / {} paths), Create+Start→answer, ratio of medians: {:.3}",
            variants[2].store_len,
            variants[0].store_len,
            med(d, Sample::container) / med(a, Sample::container)
        );
    }
    Ok(())
}

/// `A nixenv, B runc, …`.
fn labels(variants: &[Variant]) -> String {
    let labels: Vec<&str> = variants.iter().map(|v| v.label).collect();
    labels.join(", ")
}

/// The first line of the results: versions, cores, load averages.
fn print_machine(load_before: &str, load_after: &str) {
    println!();
    println!(
        "containerd {}; {}; {} cores; {load_before} before, {load_after} after",
        tool_version("containerd", "--version")
            .split_whitespace()
            .nth(2)
            .unwrap_or("?"),
        tool_version("runc", "--version"),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
    );
}

/// The warm-up answer: the lock's message and exactly the closure under `/nix/store`.
fn check_reply(v: &Variant, reply: &EchoReply) -> anyhow::Result<()> {
    ensure!(
        reply.message.as_deref() == Some("hello from nix"),
        "{}: message {:?}",
        v.label,
        reply.message
    );
    let store = reply.store.as_ref().map(Vec::len).unwrap_or(0);
    ensure!(
        store == v.store_len,
        "{}: /nix/store has {store} entries, expected {}",
        v.label,
        v.store_len
    );
    Ok(())
}

/// Warns when the runc container's environment differs from the nixenv one's (PORT aside).
fn compare_env(nixenv: &EchoReply, runc: &EchoReply) {
    let strip = |r: &EchoReply| {
        let mut e = r.env.clone();
        e.remove("PORT");
        e
    };
    let (a, b) = (strip(nixenv), strip(runc));
    if a != b {
        eprintln!("warning: the environments differ: nixenv {a:?}, runc {b:?}");
    } else {
        eprintln!("   same environment in A and B ({} variables)", a.len());
    }
}
