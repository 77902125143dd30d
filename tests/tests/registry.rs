//! The card's pod verbatim: `image: empty:latest` with no pull policy, so the kubelet calls CRI
//! `PullImage` at every start. With the package's docker.io `hosts.toml` (its first host is
//! `nixenv registry`, serving the shipped empty image) containerd pulls it on the node, with no
//! network: here the "Docker Hub" of that file is a local stand-in that answers 404 and counts
//! requests, to prove that every other image still goes to the registry.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixenv_testkit::containerd::{Containerd, RuntimeHandler};
use nixenv_testkit::cri::{card_container, card_pod, Cri};
use nixenv_testkit::fixtures::{echo, Fixtures};
use nixenv_testkit::node_registry::{
    archive_manifest_digest, shipped_config, shipped_empty_archive, NodeRegistry,
};
use nixenv_testkit::{free_port, nixenv_bin, shim_bin, Cache, CacheServer, ServedNode};

fn shim_dir() -> PathBuf {
    shim_bin().parent().expect("shim dir").to_path_buf()
}

/// A node as the package sets it up: containerd with the nixenv handler, the package's
/// docker.io `hosts.toml` (first host: `nixenv registry`; "Docker Hub": a 404 stand-in that
/// counts requests), and caches and catalog served over HTTP.
struct CardNode {
    _registry: NodeRegistry,
    hub: CacheServer,
    _certs: tempfile::TempDir,
    _hub_dir: tempfile::TempDir,
    env: ServedNode,
    c: Containerd,
}

fn card_node() -> CardNode {
    let registry = NodeRegistry::start().expect("start nixenv registry");
    let hub_dir = tempfile::tempdir().unwrap();
    let hub = CacheServer::serve(hub_dir.path());
    let certs = tempfile::tempdir().unwrap();
    let shipped = shipped_config("containerd/hosts.toml", registry.addr());
    let hosts = shipped.replace("https://registry-1.docker.io", &hub.url());
    assert_ne!(hosts, shipped, "the shipped hosts.toml names Docker Hub");
    std::fs::create_dir_all(certs.path().join("docker.io")).unwrap();
    std::fs::write(certs.path().join("docker.io/hosts.toml"), hosts).unwrap();

    let env = ServedNode::new(Cache::Xz);
    let c = Containerd::builder()
        .handler(RuntimeHandler::runc())
        .handler(RuntimeHandler::nixenv())
        .default_handler("runc")
        .path_dir(&shim_dir())
        .env("NIXENV_CONFIG", env.node.write_config())
        .registry_config_path(certs.path())
        .start()
        .expect("start containerd");
    CardNode {
        _registry: registry,
        hub,
        _certs: certs,
        _hub_dir: hub_dir,
        env,
        c,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_card_pod_pulls_empty_latest_from_the_node_registry_and_runs() {
    let node = card_node();
    let (hub, c) = (&node.hub, &node.c);
    let manifest = archive_manifest_digest(&shipped_empty_archive()).unwrap();
    let mut cri = Cri::connect(c.address()).await.unwrap();
    assert!(cri.image_status("empty:latest").await.unwrap().is_none());

    // What the kubelet does for `image: empty:latest` (policy Always), twice: the node has it.
    for _ in 0..2 {
        let id = match cri.pull_image("empty:latest").await {
            Ok(id) => id,
            Err(e) => panic!("PullImage empty:latest: {}\n{}", e.message(), c.log()),
        };
        let image = cri
            .image_status("empty:latest")
            .await
            .unwrap()
            .expect("ImageStatus shows the pulled image");
        assert_eq!(image.id, id);
        assert!(
            image
                .repo_tags
                .contains(&"docker.io/library/empty:latest".to_owned()),
            "{:?}",
            image.repo_tags
        );
        assert_eq!(
            image.repo_digests,
            vec![format!("docker.io/library/empty@{manifest}")],
            "the digest of the shipped archive's manifest"
        );
    }
    assert_eq!(
        hub.requests_matching("/v2/library/empty/*"),
        0,
        "empty:latest came from the node registry: {:?}",
        hub.request_log()
    );
    // The versioned, digest-pinned name resolves on the node too.
    cri.pull_image(&format!("empty@{manifest}"))
        .await
        .unwrap_or_else(|e| panic!("pull by digest: {}", e.message()));

    // The card's pod runs from what was pulled.
    let port = free_port();
    let pod = card_pod();
    let pod_id = cri.run_pod(&pod).await.expect("run pod");
    let started = async {
        let id = cri
            .create_container(&pod_id, &pod, &card_container(port))
            .await?;
        cri.start_container(&id).await.map(|()| id)
    };
    let id = started
        .await
        .unwrap_or_else(|e| panic!("the card's container: {}\n{}", e.message(), c.log()));
    let answer = echo(&format!("127.0.0.1:{port}"), Duration::from_secs(20));
    assert_eq!(
        answer.expect("echoserver answers").message.as_deref(),
        Some("hello from nix")
    );
    cri.stop_container(&id, 10).await.unwrap();
    cri.remove_container(&id).await.unwrap();
    cri.delete_pod(&pod_id).await.unwrap();

    // Any other docker.io image falls through to the next host: the registry itself.
    let err = cri
        .pull_image("busybox:nixenv-test")
        .await
        .expect_err("the stand-in hub has no busybox");
    assert!(
        hub.requests("/v2/library/busybox/manifests/nixenv-test") >= 1,
        "containerd asked the next host after the node registry's 404 ({}): {:?}",
        err.message(),
        hub.request_log()
    );
}

/// What the kubelet does for `image: empty:latest` (pull policy `Always`) before each
/// container it creates: PullImage, then ImageStatus.
async fn kubelet_pull(cri: &mut Cri, c: &Containerd) {
    if let Err(e) = cri.pull_image("empty:latest").await {
        panic!("PullImage empty:latest: {}\n{}", e.message(), c.log());
    }
    assert!(cri.image_status("empty:latest").await.unwrap().is_some());
}

/// The kubelet's calls for the card's pod, in its order, on a node set up as the package sets
/// it up (the cold closure comes from a slow cache): sandbox; pull (policy Always); create and
/// start, the start given up by the kubelet's request timeout; on its next sync, pull, a new
/// attempt, started; exec; a restart in the same sandbox (the container killed, pull, attempt
/// 2); stop and remove. The closure is fetched once across all of it; nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubelet_s_sequence_for_the_card_s_pod() {
    let fx = Fixtures::get();
    let node = card_node();
    let c = &node.c;
    node.env.caches.inject(
        "/nar/*",
        nixenv_testkit::Fault::Delay(Duration::from_secs(3)),
    );
    let mut cri = Cri::connect(c.address()).await.unwrap();
    let port = free_port();
    let pod = card_pod();
    let pod_id = cri.run_pod(&pod).await.expect("RunPodSandbox");

    kubelet_pull(&mut cri, c).await;
    let spec = card_container(port);
    let first = cri.create_container(&pod_id, &pod, &spec).await.unwrap();
    let gave_up = cri.start_given_up(&first, Duration::from_secs(1)).await;
    assert!(gave_up, "the cold fetch outlasts the request");

    kubelet_pull(&mut cri, c).await;
    let second = cri
        .create_container(&pod_id, &pod, &spec.clone().attempt(1))
        .await
        .unwrap();
    if let Err(e) = cri.start_container(&second).await {
        panic!("StartContainer on retry: {}\n{}", e.message(), c.log());
    }
    let answer = echo(&format!("127.0.0.1:{port}"), Duration::from_secs(30)).expect("answers");
    assert_eq!(answer.message.as_deref(), Some("hello from nix"));

    // kubectl exec: the closure's PATH (busybox's `sh` by name) and the lock's env.
    let stdout = cri
        .exec_ok(
            &second,
            &["sh", "-c", "echo \"$PATH\"; echo \"$ECHO_MESSAGE\""],
        )
        .await;
    let mut lines = stdout.lines();
    let path = lines.next().unwrap_or_default();
    assert!(
        path.starts_with(&format!("{}/bin:", fx.echoserver)) && path.contains(&fx.busybox),
        "{path}"
    );
    assert_eq!(lines.next(), Some("hello from nix"));

    // A restart in the same sandbox: the container is killed (a failed liveness probe), the
    // kubelet pulls and creates the next attempt.
    cri.stop_container(&second, 0).await.unwrap();
    kubelet_pull(&mut cri, c).await;
    let third = cri
        .create_container(&pod_id, &pod, &spec.clone().attempt(2))
        .await
        .unwrap();
    cri.start_container(&third)
        .await
        .expect("StartContainer after the restart");
    let answer = echo(&format!("127.0.0.1:{port}"), Duration::from_secs(30)).expect("answers");
    assert_eq!(answer.message.as_deref(), Some("hello from nix"));

    let counts = node.env.caches.counts();
    let nars: Vec<_> = counts.iter().filter(|(p, _)| p.contains("nar/")).collect();
    assert_eq!(nars.len(), fx.echoserver_closure().len(), "{counts:?}");
    assert!(
        nars.iter().all(|(_, n)| **n == 1),
        "each NAR fetched once across the three attempts: {counts:?}"
    );
    assert_eq!(node.hub.requests_matching("/v2/library/empty/*"), 0);

    // Pod deleted: stop and remove the containers, then the sandbox.
    for id in [&first, &second, &third] {
        cri.stop_container(id, 10).await.unwrap();
        cri.remove_container(id).await.unwrap();
    }
    cri.stop_pod(&pod_id).await.unwrap();
    cri.remove_pod(&pod_id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.env.node.pins().is_empty() {
        assert!(
            Instant::now() < deadline,
            "pins left: {:?}",
            node.env.node.pins()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.assert_clean().await;
}

/// One HTTP/1.1 GET on a fresh connection: the status line.
fn get_status(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_owned()
}

/// `VmRSS` of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// As under `nixenv-registry.socket` (`Accept=no`): the server takes the listening socket from
/// `LISTEN_FDS`, serves, and exits when idle, leaving the socket to its owner.
#[test]
fn socket_activated_registry_serves_then_exits_when_idle() {
    if Command::new("systemd-socket-activate")
        .arg("--help")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("skipped: needs systemd-socket-activate");
        return;
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut activator = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(addr.to_string())
        .arg(nixenv_bin())
        .args(["registry", "--idle-exit", "1s", "--archive"])
        .arg(shipped_empty_archive())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the socket is not listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(get_status(addr, "/v2/library/empty/manifests/latest").contains(" 200 "));
    assert!(get_status(addr, "/v2/library/nginx/manifests/latest").contains(" 404 "));
    let rss = rss_kib(activator.id());
    eprintln!("nixenv registry RSS while serving: {rss} KiB");
    assert!(
        rss > 0 && rss < 32 * 1024,
        "RSS {rss} KiB (the unit's MemoryMax is 32M)"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = activator.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "still running 10 s after the last request"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
}
