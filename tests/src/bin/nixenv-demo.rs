//! `nixenv-demo`: the main job end to end on this machine (root; run by `demo/run`).
//!
//! 1. builds the fixture closures (echoserver + glibc + busybox) with the host's real Nix and a
//!    signed binary cache of them (`tests/fixtures/build.sh`);
//! 2. publishes the environment `demo/echoserver` into a fresh catalog with `nixenv publish`;
//! 3. serves the cache and the catalog over HTTP on 127.0.0.1;
//! 4. starts a private containerd whose `nixenv` handler is `containerd-shim-nixenv-v2`, with the
//!    empty image imported;
//! 5. runs the echoserver pod over CRI as the kubelet would (`runtimeClassName: nixenv`,
//!    annotation `nix.dev/environment: demo/echoserver`, image `empty:latest`, command
//!    `echoserver`) and prints the echoserver's JSON answer on stdout.
//!
//! Progress goes to stderr. Everything runs in temp dirs and is stopped and removed at the end.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nixenv_testkit::containerd::{Containerd, RuntimeHandler};
use nixenv_testkit::cri::{ContainerSpec, Cri, PodSpec};
use nixenv_testkit::fixtures::http_get;
use nixenv_testkit::{free_port, images, shim_bin, Cache, CacheServer, Fixtures, TestNode};

const ENVIRONMENT: &str = "demo/echoserver";

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("nixenv-demo starts containerd and runc: run it as root");
    }
    let started = Instant::now();

    step("building the echoserver closure with Nix (tests/fixtures/build.sh)");
    let fx = Fixtures::get();
    eprintln!("    {}", fx.echoserver);

    step("publishing the environment into a local catalog and serving it with the cache on 127.0.0.1");
    let work = tempfile::Builder::new().prefix("nixenv-demo-").tempdir()?;
    let catalog_dir = work.path().join("catalog");
    std::fs::create_dir_all(&catalog_dir)?;
    let server = CacheServer::serve_mounts([
        ("/cache", fx.cache(Cache::Xz)),
        ("/catalog", catalog_dir.as_path()),
    ]);
    let node = TestNode::new()
        .substituter(&server.url_of("/cache"))
        .trusting(&fx.trusted_key.public)
        .with_catalog(&server.url_of("/catalog"));
    let out = node
        .nixenv(&["publish", "--catalog"])
        .arg(&catalog_dir)
        .args([
            "--env",
            "ECHO_MESSAGE=hello from the nixenv demo",
            ENVIRONMENT,
        ])
        .args([&fx.echoserver, &fx.busybox])
        .output()
        .context("run nixenv publish")?;
    if !out.status.success() {
        bail!(
            "nixenv publish failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    eprintln!(
        "    published {} (cache {}, catalog {})",
        String::from_utf8_lossy(&out.stdout).trim(),
        server.url_of("/cache"),
        server.url_of("/catalog")
    );

    step("starting a private containerd with the nixenv shim");
    let shim = shim_bin();
    let containerd = Containerd::builder()
        .handler(RuntimeHandler::nixenv())
        .handler(RuntimeHandler::runc())
        .path_dir(shim.parent().context("shim directory")?)
        .env("NIXENV_CONFIG", node.write_config())
        .start()?;
    containerd.import(&images::empty_image())?;

    step("running the echoserver pod over CRI (runtime handler nixenv, image empty:latest)");
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
        cri.start_container(&id).await.context("StartContainer")?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match http_get(&addr, "/demo") {
                Ok((200, body)) => break Ok::<_, anyhow::Error>(body),
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Ok((status, _)) => bail!("echoserver answered HTTP {status}"),
                Err(e) => bail!("echoserver on {addr} did not answer: {e}"),
            }
        }
    }
    .await;
    let _ = cri.stop_pod(&pod_id).await;
    let _ = cri.remove_pod(&pod_id).await;
    let body = match result {
        Ok(b) => b,
        Err(e) => {
            eprintln!("containerd log (last lines):");
            for l in containerd
                .log()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                eprintln!("    {l}");
            }
            return Err(e);
        }
    };
    step(&format!(
        "the echoserver answered (pod on the nixenv RuntimeClass, {:.1?} in all):",
        started.elapsed()
    ));
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Err(_) => println!("{body}"),
    }
    drop(containerd);
    Ok(())
}
