//! `nixenv-demo`: the main job end to end on this machine (root; run by `demo/run`, which has
//! done the steps `install` and `build` before).
//!
//! Steps, each announced on stderr with the time elapsed since `demo/run` started:
//! 1. `fixture`: builds the fixture closures (echoserver + glibc + busybox) with the host's real
//!    Nix and a signed binary cache of them (`tests/fixtures/build.sh`, nixenv's own Nix
//!    configuration);
//! 2. `serve`: serves the cache and a fresh catalog over HTTP on 127.0.0.1;
//! 3. `publish`: publishes the environment `demo/echoserver` into it with `nixenv publish`;
//! 4. `containerd`: starts a private containerd whose `nixenv` handler is
//!    `containerd-shim-nixenv-v2`, with the empty image imported;
//! 5. `pod`: runs the echoserver pod over CRI as the kubelet would (`runtimeClassName: nixenv`,
//!    annotation `nix.dev/environment: demo/echoserver`, image `empty:latest`, command
//!    `echoserver`) and prints the echoserver's JSON answer on stdout.
//!
//! On failure it names the step, its error and the log to read (the logs are kept in the
//! directory given by `--log-dir`), and exits with status 1; it does not panic. Everything
//! else runs in temp dirs and is stopped and removed at the end.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use nixenv_testkit::containerd::{Containerd, RuntimeHandler};
use nixenv_testkit::cri::{ContainerSpec, Cri, PodSpec};
use nixenv_testkit::fixtures::{build_log, http_get};
use nixenv_testkit::{free_port, images, shim_bin, Cache, CacheServer, Fixtures, TestNode};

const ENVIRONMENT: &str = "demo/echoserver";

/// The step under way: its name and the log that tells more when it fails.
struct Step {
    name: &'static str,
    log: Option<PathBuf>,
}

static STEP: Mutex<Step> = Mutex::new(Step {
    name: "start",
    log: None,
});

/// How the demo was started: `nixenv-demo [--log-dir DIR] [--started-at UNIX_MS]`.
struct Args {
    log_dir: PathBuf,
    /// When `demo/run` started (its times count from there).
    t0: SystemTime,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut log_dir = None;
    let mut t0 = SystemTime::now();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--log-dir" => log_dir = Some(PathBuf::from(args.next().context("--log-dir DIR")?)),
            "--started-at" => {
                let ms: u64 = args
                    .next()
                    .context("--started-at UNIX_MS")?
                    .parse()
                    .context("--started-at UNIX_MS")?;
                t0 = UNIX_EPOCH + Duration::from_millis(ms);
            }
            other => bail!("unknown argument {other:?} (usage: nixenv-demo [--log-dir DIR] [--started-at UNIX_MS])"),
        }
    }
    let log_dir = match log_dir {
        Some(d) => d,
        None => tempfile::Builder::new()
            .prefix("nixenv-demo-logs-")
            .tempdir()?
            .keep(),
    };
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("create log dir {}", log_dir.display()))?;
    Ok(Args { log_dir, t0 })
}

fn elapsed(t0: SystemTime) -> f64 {
    t0.elapsed().unwrap_or_default().as_secs_f64()
}

/// Announces a step (and remembers it and its log for the failure message).
fn step(t0: SystemTime, name: &'static str, log: Option<&Path>, what: &str) {
    eprintln!("==> [{:6.1}s] {name}: {what}", elapsed(t0));
    let mut s = STEP.lock().unwrap_or_else(|e| e.into_inner());
    s.name = name;
    s.log = log.map(Path::to_path_buf);
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nixenv-demo: {e:#}");
            std::process::exit(2);
        }
    };
    // A panic in the test kit (which panics on broken environments, as tests want) becomes a
    // step failure like any other: the message is kept for the report, the unwinding stops
    // containerd and the servers through their destructors.
    static PANIC: Mutex<Option<String>> = Mutex::new(None);
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".to_owned());
        let at = info
            .location()
            .map(|l| format!(" ({}:{})", l.file(), l.line()))
            .unwrap_or_default();
        *PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{msg}{at}"));
    }));
    let outcome = std::panic::catch_unwind(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(run(&args))
    });
    let error = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => PANIC
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| "panic".to_owned()),
    };
    let s = STEP.lock().unwrap_or_else(|e| e.into_inner());
    eprintln!(
        "demo/run: step {} failed after {:.1} s: {}",
        s.name,
        elapsed(args.t0),
        error.lines().next().unwrap_or_default()
    );
    if error.lines().count() > 1 {
        for l in error.lines().skip(1).take(40) {
            eprintln!("    {l}");
        }
    }
    match &s.log {
        Some(log) => {
            if let Ok(text) = std::fs::read_to_string(log) {
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("demo/run: the end of {}:", log.display());
                for l in &lines[lines.len().saturating_sub(20)..] {
                    eprintln!("    {l}");
                }
            }
            eprintln!("demo/run: read {}", log.display());
        }
        None => eprintln!("demo/run: logs in {}", args.log_dir.display()),
    }
    std::process::exit(1);
}

async fn run(args: &Args) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("nixenv-demo starts containerd and runc: run it as root");
    }
    let t0 = args.t0;
    let logs = &args.log_dir;

    step(
        t0,
        "fixture",
        Some(&build_log()),
        "building the echoserver closure and a signed binary cache with Nix (tests/fixtures/build.sh)",
    );
    let started = Instant::now();
    let fx = Fixtures::try_get()?;
    eprintln!(
        "    {} ({:.1} s; cached in {} for the next run)",
        fx.echoserver,
        started.elapsed().as_secs_f64(),
        fx.dir.display()
    );

    step(
        t0,
        "serve",
        None,
        "serving the binary cache and a fresh catalog over HTTP on 127.0.0.1",
    );
    let work = tempfile::Builder::new()
        .prefix("nixenv-demo-")
        .tempdir()
        .context("temp dir")?;
    let catalog_dir = work.path().join("catalog");
    std::fs::create_dir_all(&catalog_dir).context("create the catalog dir")?;
    let server = CacheServer::serve_mounts([
        ("/cache", fx.cache(Cache::Xz)),
        ("/catalog", catalog_dir.as_path()),
    ]);
    let node = TestNode::new()
        .substituter(&server.url_of("/cache"))
        .trusting(&fx.trusted_key.public)
        .with_catalog(&server.url_of("/catalog"));
    eprintln!(
        "    cache {}, catalog {}",
        server.url_of("/cache"),
        server.url_of("/catalog")
    );

    let publish_log = logs.join("publish.log");
    step(
        t0,
        "publish",
        Some(&publish_log),
        &format!("nixenv publish {ENVIRONMENT} (checks the closure is in the cache, signed)"),
    );
    let out = node
        .nixenv(&["-v", "publish", "--catalog"])
        .arg(&catalog_dir)
        .args([
            "--env",
            "ECHO_MESSAGE=hello from the nixenv demo",
            ENVIRONMENT,
        ])
        .args([&fx.echoserver, &fx.busybox])
        .output()
        .context("run nixenv publish")?;
    std::fs::write(&publish_log, &out.stderr)
        .with_context(|| format!("write {}", publish_log.display()))?;
    if !out.status.success() {
        bail!(
            "{}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or("nixenv publish failed")
        );
    }
    eprintln!(
        "    published {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );

    let containerd_log = logs.join("containerd.log");
    step(
        t0,
        "containerd",
        Some(&containerd_log),
        "starting a private containerd with the nixenv shim (runtime handler nixenv)",
    );
    let shim = shim_bin();
    let started = Containerd::builder()
        .handler(RuntimeHandler::nixenv())
        .handler(RuntimeHandler::runc())
        .path_dir(shim.parent().context("shim directory")?)
        .env("NIXENV_CONFIG", node.write_config())
        .start();
    let containerd = match started {
        Ok(c) => c,
        Err(e) => return Err(e.context("containerd did not start")),
    };
    let result = pod(&containerd, &containerd_log, t0).await;
    // Keep containerd's log (with the shim's lines) before containerd and its dir go.
    if let Err(e) = std::fs::write(&containerd_log, containerd.log()) {
        eprintln!("    (could not keep {}: {e})", containerd_log.display());
    }
    drop(containerd);
    let body = result?;
    eprintln!(
        "==> [{:6.1}s] done: the echoserver answered (pod on the nixenv RuntimeClass); logs in {}",
        elapsed(t0),
        logs.display()
    );
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Err(_) => println!("{body}"),
    }
    Ok(())
}

/// The `pod` step: the echoserver pod over CRI; returns the echoserver's answer.
async fn pod(containerd: &Containerd, log: &Path, t0: SystemTime) -> anyhow::Result<String> {
    containerd
        .import(&images::empty_image())
        .context("import empty:latest")?;
    step(
        t0,
        "pod",
        Some(log),
        "running the echoserver pod over CRI (runtime handler nixenv, image empty:latest, command echoserver)",
    );
    let port = free_port();
    let mut cri = Cri::connect(containerd.address()).await?;
    let pod = PodSpec::new("echoserver")
        .handler("nixenv")
        .annotation("nix.dev/environment", ENVIRONMENT);
    let pod_id = cri.run_pod(&pod).await.context("RunPodSandbox")?;
    let spec = ContainerSpec::new("echoserver", "empty:latest")
        .command(&["echoserver"])
        .env("PORT", &port.to_string());
    let result = async {
        let id = cri
            .create_container(&pod_id, &pod, &spec)
            .await
            .map_err(|s| anyhow::anyhow!("CreateContainer: {}", s.message()))?;
        cri.start_container(&id)
            .await
            .map_err(|s| anyhow::anyhow!("StartContainer: {}", s.message()))?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match http_get(&addr, "/demo") {
                Ok((200, body)) => break Ok::<_, anyhow::Error>(body),
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Ok((status, _)) => bail!("echoserver answered HTTP {status}"),
                Err(e) => bail!("echoserver on {addr} did not answer within 60 s: {e}"),
            }
        }
    }
    .await;
    let _ = cri.stop_pod(&pod_id).await;
    let _ = cri.remove_pod(&pod_id).await;
    result
}
