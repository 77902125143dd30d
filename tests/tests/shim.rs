//! containerd-shim-nixenv-v2 end to end: a real containerd 1.6 (private socket and state) with
//! the shim on its PATH, driven over CRI as the kubelet would, real runc, real fixture
//! closures served over HTTP on 127.0.0.1. Needs root.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nixenv_testkit::cni::LoopbackNetwork;
use nixenv_testkit::containerd::{self, Containerd, ContainerdBuilder, RuntimeHandler};
use nixenv_testkit::cri::{ContainerSpec, Cri, PodSpec};
use nixenv_testkit::fixtures::{echo, EchoReply};
use nixenv_testkit::{
    cgroup_dir, free_port, images, pids_where, shim_bin, wait_for, Cache, Fixtures, ServedNode,
    TestNode,
};

const BUSYBOX: &str = images::BUSYBOX_IMAGE;

fn shim_dir() -> PathBuf {
    shim_bin().parent().expect("shim dir").to_path_buf()
}

/// containerd with the `nixenv` and `runc` handlers, the busybox and empty images, and
/// `NIXENV_CONFIG` from `node` if given.
fn containerd(node: Option<&TestNode>) -> Containerd {
    start_containerd(node, |b| b)
}

/// [`containerd`], its builder first changed by `more`.
fn start_containerd(
    node: Option<&TestNode>,
    more: impl FnOnce(ContainerdBuilder) -> ContainerdBuilder,
) -> Containerd {
    let mut b = Containerd::builder()
        .handler(RuntimeHandler::runc())
        .handler(RuntimeHandler::nixenv())
        .default_handler("runc")
        .path_dir(&shim_dir());
    if let Some(node) = node {
        b = b.env("NIXENV_CONFIG", node.write_config());
    }
    let c = more(b).start().expect("start containerd");
    c.import(&images::busybox_image()).expect("import busybox");
    c.import(&images::empty_image()).expect("import empty");
    c
}
/// `ctr tasks exec --tty` on a pseudo-terminal of `rows`x`cols`: what the terminal showed.
fn ctr_exec_tty(c: &Containerd, id: &str, cmd: &[&str], rows: u16, cols: u16) -> String {
    let ws = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).expect("openpty");
    let slave = std::fs::File::from(pty.slave);
    let mut child = c
        .ctr()
        .args(["tasks", "exec", "--tty", "--exec-id", "tty-test", id])
        .args(cmd)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("run ctr");
    let mut master = std::fs::File::from(pty.master);
    let fd = master.as_raw_fd();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let status = child.wait().expect("wait ctr");
    // The slave is closed by ctr's exit; reading the master then fails with EIO.
    let _ = fd;
    let out = reader.join().unwrap();
    assert!(status.success(), "ctr exec --tty failed: {status}: {out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_pod_runs_on_the_nixenv_handler() {
    let c = containerd(None);
    let mut cri = Cri::connect(c.address()).await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let pod = PodSpec::new("plain")
        .handler("nixenv")
        .log_directory(logs.path());
    let pod_id = cri.run_pod(&pod).await.expect("run pod");

    // The sandbox runs through our shim.
    wait_for("the shim", Duration::from_secs(5), || {
        !c.shim_pids().is_empty()
    })
    .await;
    let shims = c.shim_pids();
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", shims[0])).unwrap();
    assert!(cmdline.contains("containerd-shim-nixenv-v2"), "{cmdline}");

    let spec = ContainerSpec::new("main", BUSYBOX)
        .command(&["sh", "-c"])
        .args(&["echo hello-stdout; echo hello-stderr >&2; trap 'echo got-term; exit 3' TERM; while true; do sleep 0.1; done"])
        .log_path("main.log");
    let id = cri
        .create_container(&pod_id, &pod, &spec)
        .await
        .expect("create");
    cri.start_container(&id).await.expect("start");
    let st = cri.container_status(&id).await.unwrap();
    assert_eq!(
        st.state,
        nixenv_testkit::cri::api::ContainerState::ContainerRunning as i32
    );

    // One shim per pod, even with a second container.
    assert_eq!(c.shim_pids().len(), 1, "one shim per pod");

    // Exec without a terminal.
    let r = cri
        .exec_sync(&id, &["sh", "-c", "echo out; echo err >&2; exit 7"], 10)
        .await
        .expect("exec sync");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
    assert_eq!(r.exit_code, 7);
    let r = cri.exec_sync(&id, &["ps", "-o", "args"], 10).await.unwrap();
    let ps = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(
        ps.contains("while true"),
        "the exec runs beside the container's process: {ps}"
    );

    // Exec with a terminal (as `kubectl exec -it`): a tty of the client's size.
    let out = ctr_exec_tty(&c, &id, &["sh", "-c", "sleep 1; tty; stty size"], 33, 101);
    assert!(out.contains("/dev/pts/"), "tty output: {out:?}");
    assert!(out.contains("33 101"), "tty size: {out:?}");

    // Stats through the shim.
    let stats = cri.container_stats(&id).await.expect("stats");
    assert!(
        stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .map(|v| v.value)
            .unwrap_or(0)
            > 0
    );

    // Logs reach the CRI log path.
    let log = logs.path().join("main.log");
    wait_for("container log", Duration::from_secs(10), || {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        t.contains("stdout F hello-stdout") && t.contains("stderr F hello-stderr")
    })
    .await;

    // Stop gives the exit code.
    cri.stop_container(&id, 10).await.expect("stop");
    let st = cri.wait_exited(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.exit_code, 3);
    wait_for("the TERM trap's output", Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("got-term")
    })
    .await;

    cri.remove_container(&id).await.expect("remove");
    cri.delete_pod(&pod_id).await.expect("delete pod");
    c.assert_clean().await;
}

/// Pids of host processes whose command line is exactly `args`.
fn host_processes(args: &[&str]) -> Vec<i32> {
    pids_where(|argv| argv == args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_a_host_pid_container_outlives_its_init() {
    let c = containerd(None);
    let mut cri = Cri::connect(c.address()).await.unwrap();
    let pod = PodSpec::new("hostpid").handler("nixenv").host_pid();
    let pod_id = cri.run_pod(&pod).await.expect("run pod");
    // In the node's PID namespace the init's death does not end its children: the shim must
    // (as containerd's runc shim does). containerd 2.x waits for the container's stdio, which
    // the child holds, before it records the exit: without this the container stays running.
    let marker = (40_000 + rand::random::<u32>() % 20_000).to_string();
    let child = ["sleep", marker.as_str()];
    let spec = ContainerSpec::new("parent", BUSYBOX).command(&[
        "sh",
        "-c",
        &format!("sleep {marker} & while [ ! -e /proc/$!/cmdline ]; do :; done; sleep 1; exit 3"),
    ]);
    let id = cri.create_container(&pod_id, &pod, &spec).await.unwrap();
    cri.start_container(&id).await.expect("start");
    wait_for("the child", Duration::from_secs(10), || {
        !host_processes(&child).is_empty()
    })
    .await;
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    for pid in host_processes(&child) {
        assert_eq!(
            ns(&pid.to_string()),
            ns("self"),
            "the child is in the node's PID namespace"
        );
    }
    let st = cri
        .wait_exited(&id, Duration::from_secs(30))
        .await
        .expect("the container exits");
    assert_eq!(st.exit_code, 3);
    wait_for("the child to be killed", Duration::from_secs(10), || {
        host_processes(&child).is_empty()
    })
    .await;
    // containerd's task delete waits for the container's stdio to close: it returns.
    tokio::time::timeout(Duration::from_secs(30), cri.delete_pod(&pod_id))
        .await
        .expect("the pod is removed in time")
        .unwrap();
    c.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_with_a_terminal_and_a_restart_in_the_same_pod() {
    let c = containerd(None);
    let mut cri = Cri::connect(c.address()).await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let pod = PodSpec::new("tty")
        .handler("nixenv")
        .log_directory(logs.path());
    let pod_id = cri.run_pod(&pod).await.expect("run pod");

    let spec = ContainerSpec::new("t", BUSYBOX)
        .command(&["sh", "-c", "tty; exit 5"])
        .tty(true)
        .log_path("t.log");
    let id = cri
        .create_container(&pod_id, &pod, &spec)
        .await
        .expect("create");
    cri.start_container(&id).await.expect("start");
    let st = cri.wait_exited(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.exit_code, 5);
    wait_for("tty log", Duration::from_secs(5), || {
        std::fs::read_to_string(logs.path().join("t.log"))
            .unwrap_or_default()
            .contains("/dev/pts/0")
    })
    .await;

    // The kubelet restarts it: a new container, attempt 1, in the same pod and shim.
    let shims = c.shim_pids();
    let again = spec
        .clone()
        .attempt(1)
        .command(&["sh", "-c", "exit 0"])
        .tty(false)
        .log_path("t1.log");
    let id2 = cri
        .create_container(&pod_id, &pod, &again)
        .await
        .expect("recreate");
    cri.start_container(&id2).await.expect("restart");
    let st = cri
        .wait_exited(&id2, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(st.exit_code, 0);
    assert_eq!(c.shim_pids(), shims, "the same shim serves the restart");

    cri.remove_container(&id).await.unwrap();
    cri.remove_container(&id2).await.unwrap();
    cri.delete_pod(&pod_id).await.unwrap();
    c.assert_clean().await;
}

/// The xz fixture cache and the catalog over HTTP, and a node using them.
fn nix_env() -> ServedNode {
    ServedNode::new(Cache::Xz)
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mission_pod_serves_from_its_closure() {
    let fx = Fixtures::get();
    let env = nix_env();
    let c = containerd(Some(&env.node));
    let mut cri = Cri::connect(c.address()).await.unwrap();
    let port = free_port();
    let pod = PodSpec::new("echoserver")
        .handler("nixenv")
        .annotation("nix.dev/environment", "acme/echoserver");
    let pod_id = cri.run_pod(&pod).await.expect("run pod");
    let spec = ContainerSpec::new("echoserver", "empty:latest")
        .command(&["echoserver"])
        .env("PORT", &port.to_string());
    let id = match cri.create_container(&pod_id, &pod, &spec).await {
        Ok(id) => id,
        Err(e) => panic!("create: {}\n{}", e.message(), c.log()),
    };
    cri.start_container(&id).await.expect("start");

    let reply =
        echo(&format!("127.0.0.1:{port}"), Duration::from_secs(20)).expect("echoserver answers");
    assert_eq!(reply.message.as_deref(), Some("hello from nix"));
    assert_eq!(
        reply.env.get("NIXENV_ENVIRONMENT").map(String::as_str),
        Some("acme/echoserver")
    );
    let path = reply.path.clone().unwrap_or_default();
    assert!(
        path.starts_with(&format!("{}/bin:{}/bin", fx.echoserver, fx.busybox)),
        "PATH {path}"
    );
    let want = fx.echoserver_store_listing();
    assert_eq!(
        reply.store,
        Some(want.clone()),
        "only the closure under /nix/store"
    );
    assert_eq!(env.node.pins().len(), 1, "the container is pinned");
    // What ran, as an SBOM: exactly the closure, for this container.
    let what_ran = env.node.sbom_of_container(&id).expect("sbom --container");
    assert_eq!(what_ran, fx.echoserver_closure());

    // Exec sees the same environment and cannot write the store.
    let out = cri
        .exec_ok(&id, &["sh", "-c", "echo $PATH; ls /nix/store"])
        .await;
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(path.as_str()));
    let listed: Vec<&str> = lines.collect();
    assert_eq!(listed, want.iter().map(String::as_str).collect::<Vec<_>>());
    for target in [
        format!("{}/owned", fx.echoserver),
        "/nix/store/owned".to_string(),
    ] {
        let r = cri.exec_sync(&id, &["touch", &target], 10).await.unwrap();
        assert_ne!(r.exit_code, 0, "{target} written");
        assert!(
            String::from_utf8_lossy(&r.stderr).contains("Read-only"),
            "{:?}",
            String::from_utf8_lossy(&r.stderr)
        );
    }
    // The closure is ONE mount, the node's view of exactly this closure; the host has none.
    let mountinfo = cri.exec_ok(&id, &["cat", "/proc/self/mountinfo"]).await;
    let store_mounts: Vec<&str> = mountinfo
        .lines()
        .filter(|l| {
            let point = l.split(' ').nth(4).unwrap_or("");
            point == "/nix/store" || point.starts_with("/nix/store/")
        })
        .collect();
    assert_eq!(store_mounts.len(), 1, "{store_mounts:?}");
    let views = views_of(&env.node);
    assert_eq!(views.len(), 1, "one view: {views:?}");
    assert_eq!(
        nixenv_testkit::list_dir(&views[0]),
        want,
        "the view is the closure"
    );
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host.contains(&env.node.state_dir().display().to_string()),
        "no mount of the node's state on the host"
    );

    cri.stop_container(&id, 10).await.unwrap();
    let st = cri.wait_exited(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.exit_code, 0, "echoserver exits 0 on SIGTERM");
    cri.remove_container(&id).await.unwrap();
    assert!(
        env.node.pins().is_empty(),
        "remove unpins: {:?}",
        env.node.pins()
    );
    cri.delete_pod(&pod_id).await.unwrap();
    c.assert_clean().await;
    // Gone, the container's record still says what it ran.
    assert_eq!(
        env.node.sbom_of_container(&id).as_deref(),
        Ok(fx.echoserver_closure())
    );
    // Unpinned, the closure and its view go with the next gc.
    let out = env.node.nixenv(&["gc"]).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("1 closure view(s) removed"), "{out}");
    assert!(views_of(&env.node).is_empty());
    assert!(env.node.store_entries().is_empty(), "{out}");
    // Without the paths' records, the SBOM cannot be made: one line says which path.
    let err = env.node.sbom_of_container(&id).unwrap_err();
    assert!(
        err.starts_with(&format!("nixenv: container {id}: /nix/store/"))
            && err
                .trim_end()
                .ends_with("not in the node store (removed by gc since?): its record is needed"),
        "{err}"
    );
}

/// The closure views of `node` (this boot's).
fn views_of(node: &TestNode) -> Vec<PathBuf> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let dir = node.state_dir().join("views").join(boot.trim());
    nixenv_testkit::list_dir(&dir)
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .map(|n| dir.join(n))
        .collect()
}

/// containerd for user-namespaced pods of `env`'s node: the pods' network is the loopback-only
/// CNI network (kept alive by the first value).
async fn userns_containerd(env: &ServedNode) -> (LoopbackNetwork, Containerd, Cri) {
    let net = LoopbackNetwork::new().unwrap();
    let c = start_containerd(Some(&env.node), |b| b.cni(&net.bin_dir(), &net.conf_dir()));
    let cri = Cri::connect(c.address()).await.unwrap();
    (net, c, cri)
}

/// A running pod `name` of `acme/echoserver` on the nixenv handler, in its own user namespace
/// (container 0 is host 65536).
async fn userns_pod(cri: &mut Cri, c: &Containerd, name: &str) -> (PodSpec, String) {
    let pod = PodSpec::new(name)
        .handler("nixenv")
        .annotation("nix.dev/environment", "acme/echoserver")
        .user_namespace(65536, 65536);
    match cri.run_pod(&pod).await {
        Ok(id) => (pod, id),
        Err(e) => panic!("run pod: {}\n{}", e.message(), c.log()),
    }
}

/// `sh -c script` in container `id`, which must succeed: its standard output.
async fn sh_ok(cri: &mut Cri, id: &str, script: &str) -> String {
    let r = cri
        .exec_sync(id, &["sh", "-c", script], 20)
        .await
        .expect("exec");
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    let err = String::from_utf8_lossy(&r.stderr).into_owned();
    assert_eq!(r.exit_code, 0, "{script}: {out} {err}");
    out
}

/// Kubernetes `hostUsers: false` (GA in 1.36): the pod has its own user namespace, container
/// uid 0 is host uid 65536. The store binds are idmapped, so the closure is owned by the
/// container's root, readable, and serves as in any pod; the pod's sandbox runs on the nixenv
/// handler too, its rootfs (an idmapped overlay, which containerd 2.x asks the shim for) as
/// well. containerd 1.x has no user namespaces in CRI: skipped there, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_namespaced_pod_sees_its_closure_owned_by_its_root() {
    let major = containerd::major_version();
    if major < 2 {
        eprintln!(
            "skipped: containerd {major}.x ({}) has no user namespaces in CRI (userns_options); run tests/matrix sid",
            containerd::containerd_binary().display()
        );
        return;
    }
    let fx = Fixtures::get();
    let env = nix_env();
    let (_net, c, mut cri) = userns_containerd(&env).await;
    let port = free_port();
    let (pod, pod_id) = userns_pod(&mut cri, &c, "userns").await;
    let spec = ContainerSpec::new("echoserver", "empty:latest")
        .command(&["echoserver"])
        .env("PORT", &port.to_string());
    let id = cri.create_and_start(&pod_id, &pod, &spec, || c.log()).await;

    // The container is user-namespaced: its root is host uid 65536.
    let uid_map = sh_ok(&mut cri, &id, "cat /proc/self/uid_map").await;
    assert_eq!(
        uid_map.split_whitespace().collect::<Vec<_>>(),
        ["0", "65536", "65536"],
        "{uid_map}"
    );

    // It serves from its closure (over the pod's own loopback, from inside the pod).
    let mut reply = None;
    for _ in 0..100 {
        let r = cri
            .exec_sync(
                &id,
                &["wget", "-qO-", &format!("http://127.0.0.1:{port}/")],
                10,
            )
            .await
            .expect("exec wget");
        if r.exit_code == 0 {
            reply = Some(String::from_utf8_lossy(&r.stdout).into_owned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply: EchoReply =
        serde_json::from_str(&reply.expect("echoserver answers in the pod")).unwrap();
    assert_eq!(reply.message.as_deref(), Some("hello from nix"));
    assert_eq!((reply.uid, reply.gid), (0, 0));
    let want = fx.echoserver_store_listing();
    assert_eq!(reply.store, Some(want), "only the closure under /nix/store");

    // Every closure path, and what is in it, is the container root's (not nobody's), and
    // readable; the store stays read-only.
    let owners = sh_ok(
        &mut cri,
        &id,
        &format!(
            "stat -c '%u:%g %n' {p} {p}/bin/echoserver {b} {b}/bin/busybox; head -c 4 {p}/bin/echoserver | od -An -c",
            p = fx.echoserver,
            b = fx.busybox
        ),
    )
    .await;
    let mut lines = owners.lines();
    for path in [
        fx.echoserver.clone(),
        format!("{}/bin/echoserver", fx.echoserver),
        fx.busybox.clone(),
        format!("{}/bin/busybox", fx.busybox),
    ] {
        assert_eq!(
            lines.next(),
            Some(format!("0:0 {path}").as_str()),
            "{owners}"
        );
    }
    assert_eq!(
        lines
            .next()
            .map(|l| l.split_whitespace().collect::<String>()),
        Some("177ELF".to_string()),
        "{owners}"
    );
    let r = cri
        .exec_sync(&id, &["touch", &format!("{}/owned", fx.echoserver)], 10)
        .await
        .unwrap();
    assert_ne!(r.exit_code, 0, "the store is read-only");

    cri.stop_container(&id, 10).await.unwrap();
    cri.wait_exited(&id, Duration::from_secs(10)).await.unwrap();
    cri.remove_container(&id).await.unwrap();
    assert!(env.node.pins().is_empty(), "remove unpins");
    cri.delete_pod(&pod_id).await.unwrap();
    c.assert_clean().await;
}

/// The same pod where runc cannot idmap (runc 1.1: Debian trixie's, with containerd 1.7,
/// which has user namespaces in CRI): the container fails to start with one line naming the
/// environment and the cause, instead of running with a store owned by `nobody`. Skipped, with
/// the reason, where containerd has no user namespaces (1.6) or runc can idmap (1.2+).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_namespaced_pod_on_a_runc_without_idmap_fails_in_one_line() {
    let features = std::process::Command::new("runc")
        .arg("features")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    if nixenv_core::spec::idmap::features_idmap(&features).unwrap_or(false) {
        eprintln!("skipped: this runc makes idmapped mounts (user_namespaced_pod_sees_its_closure_owned_by_its_root covers it)");
        return;
    }
    let env = nix_env();
    let (_net, c, mut cri) = userns_containerd(&env).await;
    let version = cri.version().await.unwrap().runtime_version;
    if version.trim_start_matches('v').starts_with("1.6") {
        eprintln!("skipped: containerd {version} has no user namespaces in CRI (userns_options); run tests/matrix trixie");
        return;
    }
    let (pod, pod_id) = userns_pod(&mut cri, &c, "userns-old-runc").await;
    let spec = ContainerSpec::new("echoserver", "empty:latest").command(&["echoserver"]);
    let err = match cri.create_container(&pod_id, &pod, &spec).await {
        Ok(id) => cri.start_container(&id).await.expect_err("the start fails"),
        Err(e) => e,
    };
    let line = "acme/echoserver: the pod has a user namespace but runc cannot make idmapped mounts (`runc features` reports no linux.mountExtensions.idmap; runc 1.2 or newer can), so the store would appear owned by nobody";
    assert!(err.message().contains(line), "{}", err.message());
    assert!(env.node.pins().is_empty(), "nothing pinned");
    remove_pod(&mut cri, &pod_id).await;
    c.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_fail_create_with_one_line() {
    // One attempt per request: the unreachable cache below fails at once.
    let env = ServedNode::with(Cache::Xz, |n| n.with_config_line("download-attempts = 1"));
    let ServedNode {
        caches,
        catalog: _catalog,
        node,
    } = env;
    let c = containerd(Some(&node));
    let mut cri = Cri::connect(c.address()).await.unwrap();
    // Each line names its reference; the last one finds the binary cache gone (the catalog
    // still answers).
    let cases = [
        ("Acme/echo server", tonic::Code::InvalidArgument),
        ("acme/does-not-exist", tonic::Code::NotFound),
        ("acme/echoserver@9", tonic::Code::NotFound),
        ("acme/echoserver", tonic::Code::Unavailable),
    ];
    let cache_url = caches.url();
    let mut caches = Some(caches);
    for (reference, code) in cases {
        let expect = reference;
        if code == tonic::Code::Unavailable {
            drop(caches.take());
        }
        let pod = PodSpec::new("bad")
            .handler("nixenv")
            .annotation("nix.dev/environment", reference);
        let pod_id = cri.run_pod(&pod).await.expect("the sandbox itself runs");
        let spec = ContainerSpec::new("c", "empty:latest").command(&["echoserver"]);
        // containerd creates the task (our Create) in CRI StartContainer.
        let id = cri
            .create_container(&pod_id, &pod, &spec)
            .await
            .expect("create");
        let err = cri.start_container(&id).await.expect_err("start must fail");
        let msg = err.message();
        let line = msg
            .split_once("nixenv: ")
            .map(|(_, l)| l)
            .unwrap_or_default();
        assert!(line.contains(expect), "{reference}: {msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        eprintln!("{reference}: {:?}: {msg}", err.code());
        assert_eq!(err.code(), code, "{reference}: {msg}");
        if code == tonic::Code::Unavailable {
            assert!(line.contains(&cache_url), "names the cache: {msg}");
        }
        let st = cri.container_status(&id).await.unwrap();
        assert!(
            st.message.contains("nixenv: ") && st.message.contains(expect),
            "status message: {}",
            st.message
        );
        assert!(node.pins().is_empty());
        cri.delete_pod(&pod_id).await.unwrap();
    }
    c.assert_clean().await;
}

/// `nixenv metrics` on `node`: value per unlabelled sample (tests/tests/metrics.rs checks the
/// format with Prometheus' own parser).
fn metrics(node: &TestNode) -> std::collections::BTreeMap<String, f64> {
    let out = node
        .nixenv(&["metrics"])
        .output()
        .expect("run nixenv metrics");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().expect("a number")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_pods_of_one_environment_at_once_fetch_each_nar_once() {
    let fx = Fixtures::get();
    let env = nix_env();
    let c = containerd(Some(&env.node));
    let cri = Cri::connect(c.address()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut cri = cri.clone();
        tasks.push(tokio::spawn(async move {
            let port = free_port();
            let pod = PodSpec::new(&format!("echo{i}"))
                .handler("nixenv")
                .annotation("nix.dev/environment", "acme/echoserver");
            let pod_id = cri.run_pod(&pod).await.expect("run pod");
            let spec = ContainerSpec::new("echoserver", "empty:latest")
                .command(&["echoserver"])
                .env("PORT", &port.to_string());
            let id = cri
                .create_container(&pod_id, &pod, &spec)
                .await
                .expect("create");
            cri.start_container(&id).await.expect("start");
            (pod_id, port)
        }));
    }
    let mut pods = Vec::new();
    for t in tasks {
        pods.push(t.await.unwrap());
    }
    for (_, port) in &pods {
        let reply = tokio::task::spawn_blocking({
            let addr = format!("127.0.0.1:{port}");
            move || echo(&addr, Duration::from_secs(30))
        })
        .await
        .unwrap()
        .expect("every pod serves");
        assert_eq!(reply.message.as_deref(), Some("hello from nix"));
    }
    assert_eq!(c.shim_pids().len(), 8, "one shim per pod");
    let counts = env.caches.counts();
    let nars: Vec<(&String, &usize)> = counts.iter().filter(|(p, _)| p.contains("nar/")).collect();
    assert_eq!(
        nars.len(),
        fx.echoserver_closure().len(),
        "one NAR per closure path: {counts:?}"
    );
    let log = c.log();
    let retries: Vec<&str> = log.lines().filter(|l| l.contains("retrying")).collect();
    assert!(
        nars.iter().all(|(_, n)| **n == 1),
        "each NAR fetched once: {counts:?}\nretries logged by the shims: {retries:#?}"
    );
    assert_eq!(env.node.pins().len(), 8);
    // Metrics: 8 preparations, each path fetched and counted once, whichever pod pulled it.
    let m = metrics(&env.node);
    assert_eq!(m["nixenv_prepare_duration_seconds_count"], 8.0, "{m:?}");
    assert_eq!(m["nixenv_pins"], 8.0, "{m:?}");
    assert_eq!(
        m["nixenv_store_path_fetches_total"],
        fx.echoserver_closure().len() as f64,
        "{m:?}"
    );
    let pulls = m["nixenv_pulls_total"];
    assert!((1.0..=8.0).contains(&pulls), "{m:?}");
    assert_eq!(m["nixenv_pull_duration_seconds_count"], pulls, "{m:?}");
    let mut cri = cri.clone();
    for (pod_id, _) in &pods {
        cri.delete_pod(pod_id).await.expect("delete pod");
    }
    assert!(env.node.pins().is_empty(), "pod removal unpins");
    c.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_containers_in_one_pod_and_a_skipped_sidecar() {
    let fx = Fixtures::get();
    let env = nix_env();
    let c = containerd(Some(&env.node));
    let mut cri = Cri::connect(c.address()).await.unwrap();
    let port = free_port();
    let pod = PodSpec::new("two")
        .handler("nixenv")
        .annotation("nix.dev/environment", "acme/echoserver@1")
        .annotation("nix.dev/skip-containers", "sidecar");
    let pod_id = cri.run_pod(&pod).await.expect("run pod");
    let main = ContainerSpec::new("main", "empty:latest")
        .command(&["echoserver"])
        .env("PORT", &port.to_string());
    let sidecar = ContainerSpec::new("sidecar", BUSYBOX).command(&["sleep", "1000"]);
    let m = cri.create_container(&pod_id, &pod, &main).await.unwrap();
    let s = cri.create_container(&pod_id, &pod, &sidecar).await.unwrap();
    cri.start_container(&m).await.expect("start main");
    cri.start_container(&s).await.expect("start sidecar");
    let reply =
        echo(&format!("127.0.0.1:{port}"), Duration::from_secs(20)).expect("echoserver answers");
    assert_eq!(
        reply.message.as_deref(),
        Some("hello from generation 1"),
        "pinned generation 1"
    );
    assert_eq!(
        reply.env.get("NIXENV_GENERATION").map(String::as_str),
        Some("1")
    );
    // The sidecar is untouched: its own busybox image, no /nix/store.
    let r = cri.exec_sync(&s, &["ls", "/nix/store"], 10).await.unwrap();
    assert_ne!(
        r.exit_code,
        0,
        "sidecar has no store: {:?}",
        String::from_utf8_lossy(&r.stdout)
    );
    assert_eq!(c.shim_pids().len(), 1, "one shim for the pod");
    assert_eq!(
        env.node.pins().len(),
        1,
        "only the main container is pinned"
    );
    let _ = fx;
    // Only the main container's preparation is counted: the sandbox and the skipped sidecar
    // pass through.
    let m = metrics(&env.node);
    assert_eq!(m["nixenv_prepare_duration_seconds_count"], 1.0, "{m:?}");
    assert_eq!(m["nixenv_pins"], 1.0, "{m:?}");
    cri.delete_pod(&pod_id).await.unwrap();
    assert!(env.node.pins().is_empty());
    c.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_containerd_config_runs_the_mission_pod() {
    let env = nix_env();
    // The file for the containerd under test: v2 for 1.6/1.7, v3 for 2.x (its tables are
    // those of version 4 too).
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../runtimeclass/containerd-config-v{}.toml",
        nixenv_testkit::containerd::config_version().min(3)
    ));
    // Only the runc handler comes from the testkit; `nixenv` comes from the shipped file.
    let c = Containerd::builder()
        .handler(RuntimeHandler::runc())
        .append_config(&shipped)
        .path_dir(&shim_dir())
        .env("NIXENV_CONFIG", env.node.write_config())
        .start()
        .expect("start containerd");
    c.import(&images::empty_image()).unwrap();
    let mut cri = Cri::connect(c.address()).await.unwrap();
    let port = free_port();
    let pod = PodSpec::new("shipped")
        .handler("nixenv")
        .annotation("nix.dev/environment", "acme/echoserver");
    let pod_id = cri.run_pod(&pod).await.expect("run pod");
    let spec = ContainerSpec::new("echoserver", "empty:latest")
        .command(&["echoserver"])
        .env("PORT", &port.to_string());
    let id = cri.create_container(&pod_id, &pod, &spec).await.unwrap();
    cri.start_container(&id).await.expect("start");
    let reply = echo(&format!("127.0.0.1:{port}"), Duration::from_secs(20)).expect("answers");
    assert_eq!(reply.message.as_deref(), Some("hello from nix"));
    cri.delete_pod(&pod_id).await.unwrap();
    c.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_abandoned_during_a_slow_fetch_is_retried_without_refetching() {
    let fx = Fixtures::get();
    let env = nix_env();
    env.caches.inject(
        "/nar/*",
        nixenv_testkit::Fault::Delay(Duration::from_secs(3)),
    );
    let c = containerd(Some(&env.node));
    let mut cri = Cri::connect(c.address()).await.unwrap();
    let port = free_port();
    let pod = PodSpec::new("slow")
        .handler("nixenv")
        .annotation("nix.dev/environment", "acme/echoserver");
    let pod_id = cri.run_pod(&pod).await.expect("run pod");
    let spec = ContainerSpec::new("echoserver", "empty:latest")
        .command(&["echoserver"])
        .env("PORT", &port.to_string());
    // The kubelet gives up on a slow StartContainer (its request times out)...
    let first = cri.create_container(&pod_id, &pod, &spec).await.unwrap();
    let gave_up = cri.start_given_up(&first, Duration::from_secs(1)).await;
    assert!(gave_up, "the fetch is slower than the client's patience");
    // ...and retries with a new container while the first fetch is still running.
    let retry = spec.clone().attempt(1);
    let second = cri.create_container(&pod_id, &pod, &retry).await.unwrap();
    if let Err(e) = cri.start_container(&second).await {
        panic!("retry: {}\n{}", e.message(), c.log());
    }
    let reply = echo(&format!("127.0.0.1:{port}"), Duration::from_secs(30)).expect("answers");
    assert_eq!(reply.message.as_deref(), Some("hello from nix"));
    let counts = env.caches.counts();
    let nars: Vec<(&String, &usize)> = counts.iter().filter(|(p, _)| p.contains("nar/")).collect();
    assert_eq!(nars.len(), fx.echoserver_closure().len(), "{counts:?}");
    assert!(
        nars.iter().all(|(_, n)| **n == 1),
        "each NAR fetched once across both attempts: {counts:?}"
    );
    cri.delete_pod(&pod_id).await.unwrap();
    wait_for("every pin to be dropped", Duration::from_secs(10), || {
        env.node.pins().is_empty()
    })
    .await;
    c.assert_clean().await;
}

/// As the kubelet removes a deleted pod: RemovePodSandbox, retried while containerd refuses (a
/// container still "starting" cannot be removed yet).
async fn remove_pod(cri: &mut Cri, pod_id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = cri.delete_pod(pod_id).await {
        assert!(
            std::time::Instant::now() < deadline,
            "remove the pod: {}",
            e.message()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A mission pod whose container is created (not started) while every NAR is delayed `delay`.
struct SlowPod {
    env: ServedNode,
    c: Containerd,
    cri: Cri,
    pod_id: String,
    id: String,
}

async fn slow_pod(name: &str, delay: Duration) -> SlowPod {
    let env = nix_env();
    env.caches
        .inject("/nar/*", nixenv_testkit::Fault::Delay(delay));
    let c = containerd(Some(&env.node));
    let mut cri = Cri::connect(c.address()).await.unwrap();
    let pod = PodSpec::new(name)
        .handler("nixenv")
        .annotation("nix.dev/environment", "acme/echoserver");
    let pod_id = cri.run_pod(&pod).await.expect("run pod");
    let spec = ContainerSpec::new("echoserver", "empty:latest")
        .command(&["echoserver"])
        .env("PORT", &free_port().to_string());
    let id = cri.create_container(&pod_id, &pod, &spec).await.unwrap();
    SlowPod {
        env,
        c,
        cri,
        pod_id,
        id,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_removed_while_its_closure_downloads_leaves_nothing_behind() {
    let SlowPod {
        env,
        c,
        mut cri,
        pod_id,
        id,
    } = slow_pod("removed", Duration::from_secs(5)).await;
    let start = tokio::spawn({
        let mut cri = cri.clone();
        async move { cri.start_container(&id).await }
    });
    // The closure is downloading (the shim asked for a NAR, which the server holds for 5 s)
    // when the pod is removed. The request counts on arrival: one counted once answered would
    // leave the test no time before the closure is installed and the container started.
    wait_for("a NAR download to begin", Duration::from_secs(20), || {
        env.caches.requests_arrived("/nar/*") > 0
    })
    .await;
    assert!(!start.is_finished(), "the start waits for the download");
    // As the kubelet does for a deleted pod: StopPodSandbox, then RemovePodSandbox, retried
    // while containerd refuses (a container still "starting" cannot be removed yet).
    let t0 = std::time::Instant::now();
    cri.stop_pod(&pod_id).await.expect("stop the pod");
    eprintln!("StopPodSandbox: {:.1?}", t0.elapsed());
    let started = tokio::time::timeout(Duration::from_secs(60), start)
        .await
        .expect("the start returns once its pod is stopped")
        .unwrap();
    assert!(
        started.is_err(),
        "a container of a stopped pod does not start"
    );
    eprintln!("StartContainer returned: {:.1?}", t0.elapsed());
    remove_pod(&mut cri, &pod_id).await;
    eprintln!("RemovePodSandbox: {:.1?}", t0.elapsed());
    assert!(
        cri.list_containers(&pod_id).await.unwrap().is_empty(),
        "no container is left in CRI"
    );
    wait_for("every pin to be dropped", Duration::from_secs(10), || {
        env.node.pins().is_empty()
    })
    .await;
    c.assert_clean().await;
    eprintln!("clean: {:.1?}", t0.elapsed());
    // No half-written store path: what the download finished is committed (and listed),
    // nothing else is left in the state dir.
    assert!(
        env.node.leftovers().is_empty(),
        "{:?}",
        env.node.leftovers()
    );
    let out = env.node.nixenv(&["ls", "--store"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shim's preparing process, as the shim runs it when it shuts down (or dies) with a
/// closure still downloading: SIGTERM abandons the preparation, which says so in its reply and
/// leaves no pin, no partial store path and config.json as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preparing_process_stopped_mid_download_leaves_nothing_behind() {
    let env = nix_env();
    // Each NAR's body trickles, so the download is still running when its request shows in
    // the server's log (a delay before answering would be logged only once it had passed,
    // by when the small NARs are all but installed).
    env.caches.inject(
        "/nar/*",
        nixenv_testkit::Fault::Trickle(Duration::from_millis(5)),
    );
    let bundle = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["echoserver"], "cwd": "/"},
        "annotations": {"nix.dev/environment": "acme/echoserver"}
    })
    .to_string();
    std::fs::write(bundle.path().join("config.json"), &config).unwrap();
    let hook = nixenv_testkit::bin_path("nixenv-hook");
    let bundle_arg = bundle.path().to_str().unwrap();
    let child = env
        .node
        .command(
            &hook,
            &["shim-prepare", "--id", "c1", "--bundle", bundle_arg],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a NAR download to begin", Duration::from_secs(20), || {
        env.caches.requests_matching("/nar/*") > 0
    })
    .await;
    let mut child = child;
    if let Some(status) = child.try_wait().unwrap() {
        let out = child.wait_with_output().unwrap();
        panic!(
            "still downloading: the helper had already exited ({status}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let t0 = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    eprintln!("stopped after {:.1?}", t0.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"result\":\"failed\",\"error\":\"c1: preparation abandoned on SIGTERM\"}\n",
        "{stderr}"
    );
    assert!(env.node.pins().is_empty(), "{:?}", env.node.pins());
    assert!(
        env.node.leftovers().is_empty(),
        "{:?}",
        env.node.leftovers()
    );
    assert_eq!(
        std::fs::read_to_string(bundle.path().join("config.json")).unwrap(),
        config
    );
}

/// `nixenv-hook shim-prepare` processes still running for container `id`.
fn helpers_of(id: &str) -> Vec<i32> {
    pids_where(|args| {
        args.iter().any(|a| a.ends_with("nixenv-hook"))
            && args.iter().any(|a| a == "shim-prepare")
            && args.iter().any(|a| a == id)
    })
}

/// A Create the kubelet gave up on leaves its preparation running; when the pod is then
/// removed, the shim stops that preparation and still exits, and nothing is left: no shim, no
/// helper, no pin, no partial store path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_removed_after_an_abandoned_start_leaves_nothing_behind() {
    let SlowPod {
        env,
        c,
        mut cri,
        pod_id,
        id,
    } = slow_pod("abandoned", Duration::from_secs(6)).await;
    let gave_up = tokio::time::timeout(Duration::from_secs(1), {
        let mut cri = cri.clone();
        let id = id.clone();
        async move { cri.start_container(&id).await }
    })
    .await;
    assert!(gave_up.is_err(), "the fetch is slower than the client");
    assert_eq!(helpers_of(&id).len(), 1, "the preparation goes on");
    let t0 = std::time::Instant::now();
    cri.stop_pod(&pod_id).await.expect("stop the pod");
    remove_pod(&mut cri, &pod_id).await;
    c.assert_clean().await;
    eprintln!("pod removed and shim gone after {:.1?}", t0.elapsed());
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "the shim stopped the download instead of waiting for it ({:.1?})\n{}",
        t0.elapsed(),
        c.log()
    );
    assert!(helpers_of(&id).is_empty(), "no helper left");
    assert!(env.node.pins().is_empty(), "{:?}", env.node.pins());
    assert!(
        env.node.leftovers().is_empty(),
        "{:?}",
        env.node.leftovers()
    );
}

/// A shim killed while its container's closure downloads takes the download with it
/// (PR_SET_PDEATHSIG): the helper undoes its work, and nothing is left once the pod is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_killed_mid_download_leaves_no_helper_and_no_pin() {
    let SlowPod {
        env,
        c,
        mut cri,
        pod_id,
        id,
    } = slow_pod("killed", Duration::from_secs(6)).await;
    let start = tokio::spawn({
        let mut cri = cri.clone();
        let id = id.clone();
        async move { cri.start_container(&id).await }
    });
    wait_for("the preparation to start", Duration::from_secs(20), || {
        helpers_of(&id).len() == 1
    })
    .await;
    for shim in c.shim_pids() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shim),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    wait_for("the helper to stop", Duration::from_secs(5), || {
        helpers_of(&id).is_empty()
    })
    .await;
    let started = tokio::time::timeout(Duration::from_secs(30), start)
        .await
        .expect("the start returns")
        .unwrap();
    assert!(started.is_err(), "no container starts without its shim");
    assert!(env.node.pins().is_empty(), "{:?}", env.node.pins());
    assert!(
        env.node.leftovers().is_empty(),
        "{:?}",
        env.node.leftovers()
    );
    // containerd 2.x fails the first removal of a pod whose shim died ("ttrpc: closed")
    // and cleans up on the kubelet's retry.
    let _ = cri.stop_pod(&pod_id).await;
    remove_pod(&mut cri, &pod_id).await;
    c.assert_clean().await;
}

/// Runs `ctr` with `args`: its stdout, or its failure with stderr.
fn ctr(c: &Containerd, args: &[&str]) -> Result<String, String> {
    let out = c.ctr().args(args).output().expect("run ctr");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ctr {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Task `id`'s line in `ctr task ls`: its init's pid and status.
fn task_line(c: &Containerd, id: &str) -> Option<(i32, String)> {
    let list = ctr(c, &["task", "ls"]).expect("task ls");
    list.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&id)).then(|| (f[1].parse().unwrap_or(0), f[2].to_owned()))
    })
}

/// The memory usage in `ctr task metrics --format json` (cgroup v1 or v2 metrics).
fn task_memory_usage(c: &Containerd, id: &str) -> Result<u64, String> {
    let out = ctr(c, &["task", "metrics", "--format", "json", id])?;
    let m: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    m.pointer("/memory/usage/usage")
        .or_else(|| m.pointer("/memory/usage"))
        .and_then(|v| v.as_u64())
        .ok_or_else(|| format!("no memory usage in {out}"))
}

/// Runs a container on `runtime` that writes 8 MiB to its rootfs (they stay charged to its
/// memory cgroup as page cache after its processes are gone), SIGKILLs it, and checks
/// `ctr task metrics` while it runs, after the kill, and after the task is deleted. `shim`:
/// the shim binary `runtime` names.
async fn metrics_until_delete(c: &Containerd, runtime: &str, shim: &str, id: &str) {
    ctr(
        c,
        &[
            "run",
            "-d",
            "--runtime",
            runtime,
            BUSYBOX,
            id,
            "sh",
            "-c",
            "dd if=/dev/zero of=/written bs=1M count=8 && exec sleep 1000",
        ],
    )
    .expect("ctr run");
    let shims = c.shim_pids();
    assert_eq!(shims.len(), 1);
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", shims[0])).unwrap();
    assert!(cmdline.contains(shim), "{cmdline}");
    wait_for("dd's 8 MiB in the metrics", Duration::from_secs(20), || {
        task_memory_usage(c, id).is_ok_and(|u| u >= 8 << 20)
    })
    .await;

    ctr(c, &["task", "kill", "-s", "SIGKILL", id]).expect("kill");
    wait_for("the task to stop", Duration::from_secs(10), || {
        task_line(c, id).is_some_and(|(_, status)| status == "STOPPED")
    })
    .await;
    let usage = task_memory_usage(c, id)
        .unwrap_or_else(|e| panic!("{runtime}: metrics after the init was killed: {e}"));
    assert!(usage > 0, "{runtime}: memory usage after the exit: {usage}");

    ctr(c, &["task", "delete", id]).expect("task delete");
    let gone = task_memory_usage(c, id).expect_err("metrics after delete");
    assert!(gone.contains("not found"), "{gone}");
    ctr(c, &["container", "rm", id]).expect("container rm");
}

/// containerd 2.3+ asks a task's Stats, after its init exited 137, whether that was an OOM
/// kill: the nixenv shim answers from the container's cgroup until the task is deleted, as
/// containerd's runc shim does (before, it answered NOT_FOUND once the init was gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_a_killed_container_last_until_its_task_is_deleted() {
    let c = containerd(None);
    let runc = ("io.containerd.runc.v2", "containerd-shim-runc-v2");
    let nixenv = ("io.containerd.nixenv.v2", "containerd-shim-nixenv-v2");
    for (i, (runtime, shim)) in [runc, nixenv].into_iter().enumerate() {
        metrics_until_delete(&c, runtime, shim, &format!("killed-{i}")).await;
        c.assert_clean().await;
    }
}

/// `file` in `dir`, trimmed.
fn read_trimmed(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
        .trim()
        .to_owned()
}

/// An in-place pod resize (CRI UpdateContainerResources, then the shim's Update, then `runc
/// update`) changes the container's cgroup limits, and ContainerStats (what `kubectl top`
/// reads) reports its memory working set and CPU time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_reaches_the_cgroup_and_stats_report_usage() {
    use nixenv_testkit::cri::api::LinuxContainerResources;
    let c = containerd(None);
    let mut cri = Cri::connect(c.address()).await.unwrap();
    let pod = PodSpec::new("resize").handler("nixenv");
    let pod_id = cri.run_pod(&pod).await.expect("run pod");
    let spec = ContainerSpec::new("main", BUSYBOX).command(&[
        "sh",
        "-c",
        "dd if=/dev/zero of=/written bs=1M count=8; while true; do sleep 0.1; done",
    ]);
    let id = cri.create_container(&pod_id, &pod, &spec).await.unwrap();
    cri.start_container(&id).await.expect("start");
    let (pid, _) = task_line(&c, &id).expect("the task");
    let memory = cgroup_dir(pid, "memory");
    let cpu = cgroup_dir(pid, "cpu");
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let (limit_file, quota_file) = if unified {
        ("memory.max", "cpu.max")
    } else {
        ("memory.limit_in_bytes", "cpu.cfs_quota_us")
    };
    let limit = (128 << 20).to_string();
    assert_ne!(read_trimmed(&memory, limit_file), limit, "no limit yet");
    assert!(!read_trimmed(&cpu, quota_file).starts_with("50000"));

    cri.update_container_resources(
        &id,
        LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            memory_limit_in_bytes: 128 << 20,
            ..Default::default()
        },
    )
    .await
    .expect("update container resources");
    assert_eq!(read_trimmed(&memory, limit_file), limit);
    if unified {
        assert_eq!(read_trimmed(&cpu, "cpu.max"), "50000 100000");
    } else {
        assert_eq!(read_trimmed(&cpu, "cpu.cfs_quota_us"), "50000");
        assert_eq!(read_trimmed(&cpu, "cpu.cfs_period_us"), "100000");
        assert_eq!(read_trimmed(&cpu, "cpu.shares"), "512");
    }

    let stats = cri.container_stats(&id).await.expect("stats");
    let working_set = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value)
        .unwrap_or(0);
    let cpu_time = stats
        .cpu
        .and_then(|c| c.usage_core_nano_seconds)
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(working_set > 0, "working set {working_set}");
    assert!(cpu_time > 0, "cpu time {cpu_time}");

    cri.stop_container(&id, 0).await.expect("stop");
    cri.remove_container(&id).await.expect("remove");
    cri.delete_pod(&pod_id).await.expect("delete pod");
    c.assert_clean().await;
}
