//! The containerd alternative to our shim: containerd's stock runc shim
//! (`io.containerd.runc.v2`) with `BinaryName` set to `nixenv-runc`, as
//! `runtimeclass/containerd-runc-binaryname.toml` ships it. A real containerd 1.6 (private
//! socket and state) driven over CRI as the kubelet would, real runc behind the wrapper, real
//! fixture closures served over HTTP on 127.0.0.1. Needs root.
//!
//! `NIXENV_CONFIG` is only in containerd's environment: the runc shim inherits it and hands it
//! to the binary it runs, so the pin showing up in this node's private state dir is what proves
//! the config reached nixenv-runc.

use std::path::PathBuf;
use std::time::Duration;

use nixenv_testkit::containerd::{Containerd, RuntimeHandler};
use nixenv_testkit::cri::{ContainerSpec, Cri, PodSpec};
use nixenv_testkit::fixtures::{echo, store_path_base};
use nixenv_testkit::{free_port, host_runc, images, Cache, Fixtures, ServedNode};

/// A binary of the `nixenv-hook` package (`nixenv-runc` needs `nixenv-hook` beside it).
fn hook_bin(name: &str) -> PathBuf {
    nixenv_testkit::bin_path("nixenv-hook");
    nixenv_testkit::bin_path(name)
}

struct Env {
    served: ServedNode,
    containerd: Containerd,
}

/// Fixture caches and catalog over HTTP, a private node whose config names the real runc, and
/// containerd with the `nixenv` handler = the runc shim running nixenv-runc.
fn env() -> Env {
    let served = ServedNode::with(Cache::Xz, |node| {
        node.with_config_line(&format!("runc = {:?}", host_runc().display().to_string()))
    });
    let nixenv_runc = hook_bin("nixenv-runc");
    hook_bin("nixenv-hook");
    let handler = RuntimeHandler::new("nixenv", "io.containerd.runc.v2")
        .pod_annotation("nix.dev/*")
        .option(
            "BinaryName",
            &format!("{:?}", nixenv_runc.display().to_string()),
        );
    let containerd = Containerd::builder()
        .handler(RuntimeHandler::runc())
        .handler(handler)
        .default_handler("runc")
        .env("NIXENV_CONFIG", served.node.write_config())
        .start()
        .expect("start containerd");
    containerd
        .import(&images::empty_image())
        .expect("import empty");
    containerd
        .import(&images::busybox_image())
        .expect("import busybox");
    Env { served, containerd }
}
/// The command lines of this containerd's shims.
fn shim_cmdlines(c: &Containerd) -> Vec<String> {
    c.shim_pids()
        .into_iter()
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .collect()
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runc_shim_with_binaryname_runs_the_mission_pod() {
    let fx = Fixtures::get();
    let e = env();
    let c = &e.containerd;
    let mut cri = Cri::connect(c.address()).await.unwrap();
    let port = free_port();
    let pod = PodSpec::new("echoserver")
        .handler("nixenv")
        .annotation("nix.dev/environment", "acme/echoserver")
        .annotation("nix.dev/skip-containers", "sidecar");
    let pod_id = match cri.run_pod(&pod).await {
        Ok(id) => id,
        Err(err) => panic!("run pod: {}\n{}", err.message(), c.log()),
    };
    // The pod runs on containerd's own runc shim, not ours.
    let shims = shim_cmdlines(c);
    assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
    assert!(
        shims[0].contains("containerd-shim-runc-v2"),
        "the stock runc shim: {shims:?}"
    );

    let spec = ContainerSpec::new("echoserver", "empty:latest")
        .command(&["echoserver"])
        .env("PORT", &port.to_string());
    let id = cri.create_and_start(&pod_id, &pod, &spec, || c.log()).await;

    let reply = tokio::task::spawn_blocking(move || {
        echo(&format!("127.0.0.1:{port}"), Duration::from_secs(30))
    })
    .await
    .unwrap()
    .unwrap_or_else(|err| panic!("echoserver answers: {err:#}\n{}", c.log()));
    assert_eq!(
        reply.message.as_deref(),
        Some("hello from nix"),
        "the lock's ECHO_MESSAGE: {reply:?}"
    );
    assert_eq!(
        reply.env.get("NIXENV_ENVIRONMENT").map(String::as_str),
        Some("acme/echoserver")
    );
    let path = reply.path.clone().unwrap_or_default();
    assert!(
        path.starts_with(&format!("{}/bin:", fx.echoserver)),
        "PATH {path}"
    );
    let want = fx.echoserver_store_listing();
    assert_eq!(
        reply.store.as_ref(),
        Some(&want),
        "only the closure under /nix/store"
    );
    let pin = e
        .served
        .node
        .state_dir()
        .join("pins")
        .join(format!("{id}.json"));
    assert!(
        pin.is_file(),
        "the running container is pinned at {}: {:?}",
        pin.display(),
        e.served.node.pins()
    );
    assert_eq!(e.served.node.pins(), vec![format!("{id}.json")], "only it");

    // containerd builds an exec's process from the spec it generated, not from the rewritten
    // config.json; `nixenv-runc exec --process FILE` gives it the rewrite's PATH and env: a
    // command found by name on the closure's PATH, the lock's variables.
    let r = cri.exec_sync(&id, &["env"], 10).await.expect("exec env");
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    let var = |name: &str| nixenv_testkit::env_var(&out, name);
    let path = var("PATH").unwrap_or_default();
    assert!(
        path.starts_with(&format!("{}/bin:{}/bin:", fx.echoserver, fx.busybox)),
        "the exec's PATH: {out}"
    );
    assert_eq!(
        var("ECHO_MESSAGE").as_deref(),
        Some("hello from nix"),
        "{out}"
    );
    assert_eq!(
        var("NIXENV_ENVIRONMENT").as_deref(),
        Some("acme/echoserver"),
        "{out}"
    );
    // A container nixenv passed through (the sidecar, skipped) execs as it would on runc.
    let sidecar = ContainerSpec::new("sidecar", images::BUSYBOX_IMAGE).command(&["sleep", "600"]);
    let side = cri
        .create_container(&pod_id, &pod, &sidecar)
        .await
        .expect("create sidecar");
    cri.start_container(&side).await.expect("start sidecar");
    let r = cri.exec_sync(&side, &["env"], 10).await.expect("exec env");
    let side_env = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(r.exit_code, 0, "{side_env}");
    assert!(
        side_env.lines().any(|l| l.starts_with("PATH=")),
        "{side_env}"
    );
    assert!(
        !side_env.contains("/nix/store")
            && !side_env.contains("NIXENV_")
            && !side_env.contains("ECHO_MESSAGE"),
        "nothing of nixenv's: {side_env}"
    );
    // The store is read-only.
    let r = cri
        .exec_sync(&id, &["touch", &format!("{}/owned", fx.echoserver)], 10)
        .await
        .expect("exec");
    assert_ne!(r.exit_code, 0, "wrote into the store");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("Read-only"),
        "{:?}",
        String::from_utf8_lossy(&r.stderr)
    );

    cri.stop_container(&side, 0).await.expect("stop sidecar");
    cri.remove_container(&side).await.expect("remove sidecar");
    cri.stop_container(&id, 10).await.expect("stop");
    let st = cri.wait_exited(&id, Duration::from_secs(15)).await.unwrap();
    assert_eq!(st.exit_code, 0, "echoserver exits 0 on SIGTERM");
    // containerd's CRI deletes the task as soon as the container exits (runc delete, so the
    // pin may already be gone here); after RemoveContainer it must be.
    cri.remove_container(&id).await.expect("remove");
    assert!(
        !pin.exists(),
        "runc delete through nixenv-runc unpins: {:?}",
        e.served.node.pins()
    );
    assert!(
        e.served.node.pins().is_empty(),
        "{:?}",
        e.served.node.pins()
    );
    // The store keeps the closure for the next container.
    for p in fx.echoserver_closure() {
        assert!(
            e.served.node.store_dir().join(store_path_base(p)).is_dir(),
            "{p}"
        );
    }
    cri.delete_pod(&pod_id).await.expect("delete pod");
    c.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runc_shim_with_binaryname_reports_a_bad_reference_in_one_line() {
    let e = env();
    let c = &e.containerd;
    let mut cri = Cri::connect(c.address()).await.unwrap();
    let reference = "acme/echoserver@9";
    let pod = PodSpec::new("bad")
        .handler("nixenv")
        .annotation("nix.dev/environment", reference);
    let pod_id = match cri.run_pod(&pod).await {
        Ok(id) => id,
        Err(err) => panic!("the sandbox itself runs: {}\n{}", err.message(), c.log()),
    };
    let spec = ContainerSpec::new("c", "empty:latest").command(&["echoserver"]);
    // containerd's CRI creates the task (runc create) in StartContainer.
    let id = cri
        .create_container(&pod_id, &pod, &spec)
        .await
        .expect("create");
    let err = cri.start_container(&id).await.expect_err("start must fail");
    let msg = err.message();
    let line = msg
        .split_once("nixenv: ")
        .map(|(_, l)| l)
        .unwrap_or_else(|| panic!("nixenv's error in the CRI error: {msg}"));
    assert!(
        line.starts_with(reference) && line.contains("generation 9"),
        "names the reference and the cause: {msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    let st = cri.container_status(&id).await.unwrap();
    assert!(
        st.message.contains(&format!("nixenv: {reference}")),
        "status message: {}",
        st.message
    );
    assert!(
        e.served.node.pins().is_empty(),
        "no pin: {:?}",
        e.served.node.pins()
    );
    cri.remove_container(&id).await.expect("remove");
    cri.delete_pod(&pod_id).await.expect("delete pod");
    assert!(
        e.served.node.pins().is_empty(),
        "no pin: {:?}",
        e.served.node.pins()
    );
    c.assert_clean().await;
}
