//! CRI-O 1.36's OCI runtime calls, replayed against `nixenv-runc` with the real runc behind it,
//! on a real bundle for the card's pod (`nix.dev/environment: acme/echoserver`, command
//! `echoserver`), asserting what CRI-O checks of each answer. No CRI-O here (no registry ships
//! it): the command lines are CRI-O's and conmon's, read from their sources (cri-o v1.36.3,
//! conmon 2.1): each step names the function it mirrors. Needs root.
//!
//! The replay is of a CRI-O whose `cgroup_manager` is `cgroupfs` (CI has no systemd): CRI-O then
//! passes no `--systemd-cgroup`; with `systemd` it adds it to every call of `runtimeCmd` and
//! conmon adds it to `create`. The streaming exec below carries it anyway (runc ignores it
//! there), so the wrapper's parsing of it is exercised on a real call.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nixenv_testkit::fixtures::echo;
use nixenv_testkit::{
    cgroup_dir, env_var as var, free_port, host_runc, Cache, Fixtures, ServedNode,
};
use serde_json::{json, Value};

/// CRI-O's default PATH: the first `PATH` entry of every spec it writes (the image's comes
/// later).
const CRIO_DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The image's PATH in this replay (the `empty` image has none; CRI-O's spec of an image that
/// has one carries both).
const IMAGE_PATH: &str = "/image/bin:/usr/bin:/bin";

/// A node, a private runc root and a bundle shaped like CRI-O's for the card's pod.
struct Replay {
    served: ServedNode,
    dir: tempfile::TempDir,
    id: String,
    port: u16,
    /// CRI-O's copy of the spec: config.json as CRI-O wrote it, before nixenv-runc rewrote it.
    crio_spec: Value,
}

impl Replay {
    fn new() -> Replay {
        let served = ServedNode::with(Cache::Zstd, |node| {
            node.with_config_line(&format!("runc = {:?}", host_runc().display().to_string()))
        });
        let dir = tempfile::Builder::new()
            .prefix("nixenv-crio-")
            .tempdir()
            .unwrap();
        let id = format!(
            "{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        );
        let port = free_port();
        let bundle = dir.path().join("userdata");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        let out = Command::new(host_runc())
            .arg("spec")
            .arg("--bundle")
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(out.status.success(), "runc spec: {}", text(&out.stderr));
        let mut spec: Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = json!(["echoserver"]);
        spec["process"]["env"] = json!([
            format!("PATH={CRIO_DEFAULT_PATH}"),
            "TERM=xterm",
            "HOSTNAME=crio-pod",
            format!("PATH={IMAGE_PATH}"),
            format!("PORT={port}"),
        ]);
        spec["annotations"] = json!({
            "nix.dev/environment": "acme/echoserver",
            "io.kubernetes.cri-o.ContainerType": "container",
            "io.kubernetes.container.name": "echoserver",
            "io.kubernetes.pod.name": "echoserver",
        });
        // hostNetwork: echoserver answers on the host's 127.0.0.1.
        let namespaces: Vec<Value> = spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["type"] != "network")
            .cloned()
            .collect();
        spec["linux"]["namespaces"] = namespaces.into();
        // CRI-O's cgroupfs parent and name (`<parent>/crio-<id>`).
        spec["linux"]["cgroupsPath"] = format!("/nixenv-crio-test/crio-{id}").into();
        spec["linux"]["resources"]["memory"] = json!({"limit": 256u64 << 20});
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec).unwrap(),
        )
        .unwrap();
        Replay {
            served,
            dir,
            id,
            port,
            crio_spec: spec,
        }
    }

    fn bundle(&self) -> PathBuf {
        self.dir.path().join("userdata")
    }

    /// CRI-O's `runtime_root` for the handler (`--root`).
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `nixenv-runc ARGS…` as CRI-O or conmon run it, with the node's config (what
    /// /etc/nixenv/config.toml is on a node) and CRI-O's runtime environment (`prepareEnv`).
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin_path("nixenv-runc"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CRI_O_EXTERNAL", "1")
            .env("NIXENV_CONFIG", self.served.node.write_config())
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "nixenv-runc {}: {}{}",
            args.join(" "),
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// `--root <root>`: CRI-O's `defaultRuntimeArgs` (two words).
    fn root_args(&self) -> [String; 2] {
        ["--root".into(), self.root().display().to_string()]
    }

    /// `--root=<root>`: what CRI-O hands conmon as `--runtime-arg` (one word).
    fn root_arg_conmon(&self) -> String {
        format!("--root={}", self.root().display())
    }

    /// A process file as CRI-O's `prepareProcessExec` writes it: its copy of the container's
    /// process with the exec's args and no terminal.
    fn process_file(&self, name: &str, args: &[&str]) -> PathBuf {
        let mut process = self.crio_spec["process"].clone();
        process["args"] = json!(args);
        process["terminal"] = false.into();
        let path = self.dir.path().join(name);
        std::fs::write(&path, serde_json::to_vec(&process).unwrap()).unwrap();
        path
    }

    fn state(&self) -> Option<Value> {
        let root = self.root_args();
        let out = self.run(&[&root[0], &root[1], "state", &self.id]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }
}

/// A binary of the `nixenv-hook` package (`nixenv-runc` hands work to `nixenv-hook` beside it).
fn bin_path(name: &str) -> PathBuf {
    nixenv_testkit::bin_path("nixenv-hook");
    nixenv_testkit::bin_path(name)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits until process `pid` is gone (or a zombie).
fn wait_gone(pid: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
        if stat.is_empty() || state == Some(Some('Z')) {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn crio_s_runtime_calls_work_through_nixenv_runc() {
    let r = Replay::new();
    let fx = Fixtures::get();
    let runc = host_runc();
    let root = r.root_args();
    let (root0, root1) = (root[0].as_str(), root[1].as_str());
    let id = r.id.as_str();

    // pkg/config/config.go, initializeRuntimeFeatures: `RUNTIME --version` (logged with its
    // lines joined), then `RUNTIME features`, whose JSON must parse and carry ociVersionMin and
    // ociVersionMax (LoadRuntimeFeatures).
    let version = r.ok(&["--version"]);
    let real = Command::new(&runc).arg("--version").output().unwrap();
    assert_eq!(version, text(&real.stdout), "runc's own version lines");
    assert!(version.starts_with("runc version "), "{version}");
    let features: Value = serde_json::from_str(&r.ok(&["features"])).expect("features JSON");
    assert!(
        features["ociVersionMin"]
            .as_str()
            .is_some_and(|v| !v.is_empty())
            && features["ociVersionMax"]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
        "{features}"
    );

    // internal/oci/runtime_oci.go, CreateContainer: conmon with `--runtime-arg --root=ROOT`;
    // conmon's configure_runtime_args (src/runtime_args.c) then runs
    // `RUNTIME --root=ROOT create --bundle B --pid-file B/pidfile ID` in the bundle, its stdio
    // the container's (a log here), and reads the pid file.
    let bundle = r.bundle();
    let pidfile = bundle.join("pidfile");
    let log = std::fs::File::create(r.dir.path().join("container.log")).unwrap();
    let out = r
        .command(&[
            &r.root_arg_conmon(),
            "create",
            "--bundle",
            bundle.to_str().unwrap(),
            "--pid-file",
            pidfile.to_str().unwrap(),
            id,
        ])
        .current_dir(&bundle)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    assert!(
        out.success(),
        "create: {}",
        std::fs::read_to_string(r.dir.path().join("container.log")).unwrap_or_default()
    );
    let pid: i64 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let record = r.root().join(format!("nixenv@{id}"));
    assert!(record.is_file(), "create records the env changes for execs");

    // StartContainer: runtimeCmd("start", ID) = `RUNTIME --root ROOT start ID`.
    r.ok(&[root0, root1, "start", id]);
    let port = r.port;
    let reply = echo(&format!("127.0.0.1:{port}"), Duration::from_secs(30)).unwrap_or_else(|e| {
        panic!(
            "{e:#}\n{}",
            std::fs::read_to_string(r.dir.path().join("container.log")).unwrap_or_default()
        )
    });
    assert_eq!(
        reply.path.as_deref(),
        Some(format!("{}/bin:{}/bin:{IMAGE_PATH}", fx.echoserver, fx.busybox).as_str()),
        "the closure's bins before the image's PATH, the last entry"
    );
    assert_eq!(reply.message.as_deref(), Some("hello from nix"));

    // UpdateContainerStatus: runtimeCmd("state", ID); CRI-O reads status and pid.
    let state = r.state().expect("state");
    assert_eq!(state["status"], "running", "{state}");
    assert_eq!(state["pid"].as_i64(), Some(pid), "{state}");
    assert_eq!(state["id"], id);

    // ExecSyncContainer: conmon `-e --exec-process-spec FILE --runtime-arg --root=ROOT`, which
    // runs `RUNTIME --root=ROOT exec --pid-file P --process FILE --detach ID` (runtime_args.c);
    // FILE is prepareProcessExec's: CRI-O's copy of the process, args replaced. The exec's
    // output goes where conmon points runc's stdio (a file here).
    let process = r.process_file("exec-process-sync", &["env"]);
    let exec_pid = r.dir.path().join("exec-pidfile");
    let exec_out = r.dir.path().join("exec.out");
    let status = r
        .command(&[
            &r.root_arg_conmon(),
            "exec",
            "--pid-file",
            exec_pid.to_str().unwrap(),
            "--process",
            process.to_str().unwrap(),
            "--detach",
            id,
        ])
        .stdout(std::fs::File::create(&exec_out).unwrap())
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(status.success(), "exec --detach");
    let exec_pid: i64 = std::fs::read_to_string(&exec_pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_gone(exec_pid, Duration::from_secs(10));
    let env = std::fs::read_to_string(&exec_out).unwrap();
    assert_eq!(
        var(&env, "PATH"),
        Some(format!(
            "{}/bin:{}/bin:{IMAGE_PATH}",
            fx.echoserver, fx.busybox
        )),
        "ExecSync's PATH: {env}"
    );
    assert_eq!(var(&env, "ECHO_MESSAGE").as_deref(), Some("hello from nix"));
    assert_eq!(
        var(&env, "NIXENV_ENVIRONMENT").as_deref(),
        Some("acme/echoserver")
    );
    assert!(
        std::fs::read(&process).unwrap()
            == serde_json::to_vec(&{
                let mut p = r.crio_spec["process"].clone();
                p["args"] = json!(["env"]);
                p["terminal"] = false.into();
                p
            })
            .unwrap(),
        "CRI-O's process file is left as it was"
    );

    // ExecContainer (kubectl exec, streamed by CRI-O itself): `RUNTIME --root ROOT
    // [--systemd-cgroup] exec --process FILE ID`, stdio CRI-O's. A command by bare name.
    let process = r.process_file(
        "exec-process-stream",
        &["sh", "-c", "command -v echoserver"],
    );
    let out = r.run(&[
        root0,
        root1,
        "--systemd-cgroup",
        "exec",
        "--process",
        process.to_str().unwrap(),
        id,
    ]);
    assert!(out.status.success(), "exec: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("{}/bin/echoserver", fx.echoserver)
    );

    // UpdateContainer: `RUNTIME --root ROOT update --resources - ID`, the resources as JSON on
    // stdin; the cgroup's limit changes.
    let memory = cgroup_dir(pid as i32, "memory");
    let limit_file = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    let limit = || {
        std::fs::read_to_string(memory.join(limit_file))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(limit(), (256u64 << 20).to_string(), "the spec's limit");
    let mut update = r
        .command(&[root0, root1, "update", "--resources", "-", id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = update.stdin.take().unwrap();
        stdin
            .write_all(
                json!({"memory": {"limit": 128u64 << 20}})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap();
    }
    let out = update.wait_with_output().unwrap();
    assert!(out.status.success(), "update: {}", text(&out.stderr));
    assert_eq!(
        limit(),
        (128u64 << 20).to_string(),
        "update reached the cgroup"
    );

    // StopContainer: `RUNTIME --root ROOT kill ID 15` (GetStopSignal: the number), then CRI-O
    // polls state until stopped.
    r.ok(&[root0, root1, "kill", id, "15"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while r.state().is_some_and(|s| s["status"] != "stopped") {
        assert!(Instant::now() < deadline, "echoserver stops on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }

    // DeleteContainer: runtimeCmd("delete", "--force", ID).
    assert!(!r.served.node.pins().is_empty(), "pinned until delete");
    r.ok(&[root0, root1, "delete", "--force", id]);
    assert!(r.state().is_none(), "no container");
    assert!(
        r.served.node.pins().is_empty(),
        "no pin: {:?}",
        r.served.node.pins()
    );
    assert!(!record.exists(), "no exec record");
    let entries: Vec<_> = std::fs::read_dir(r.root())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(entries.is_empty(), "runc's root is empty: {entries:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let b = bundle.display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&b)),
        "no mount left under the bundle"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z")
        }
    );
}
