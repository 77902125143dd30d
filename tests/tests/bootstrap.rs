//! containerd-shim-nixenv-v2 started the way each containerd starts it, without containerd: the
//! test is containerd. `start` gets containerd 2.3's `BootstrapParams` on standard input (with
//! and without the legacy `TTRPC_ADDRESS` and `-address`), or 1.6–2.2's legacy input; then a
//! container (plain runc, busybox) goes through Create, Start, Wait, Delete and Shutdown over
//! the address `start` answered, while an events server on a private socket, the one the
//! params or the environment named, must receive the container's `TaskExit`. And `-info`, as
//! containerd runs it, must report the features of the runc in use. Needs root.

use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::{
    CreateTaskRequest, DeleteRequest, ShutdownRequest, StartRequest, WaitRequest,
};
use containerd_shim_protos::bootstrap_api::{BootstrapParams, BootstrapResult, Extension};
use containerd_shim_protos::events::task::TaskExit;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim::oci::Options;
use containerd_shim_protos::shim_async::{create_events, Events, TaskClient};
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::r#async::{Client, Server, TtrpcContext};
use containerd_shim_protos::types::introspection::RuntimeInfo;
use nixenv_testkit::{host_runc, shim_bin, wait_for};

const RUNC_OPTIONS: &str = "containerd.runc.v1.Options";
const FEATURES_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/features/Features";
const EXIT_TOPIC: &str = "/tasks/exit";

/// containerd's events service as far as a shim uses it: every forwarded envelope is kept.
#[derive(Clone, Default)]
struct EventSink {
    received: Arc<Mutex<Vec<(String, String, Any)>>>,
}

#[async_trait]
impl Events for EventSink {
    async fn forward(&self, _ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        let envelope = req.envelope.unwrap_or_default();
        self.received.lock().unwrap().push((
            envelope.topic,
            envelope.namespace,
            envelope.event.unwrap_or_default(),
        ));
        Ok(Empty::new())
    }
}

impl EventSink {
    /// The `TaskExit` events received in `namespace`.
    fn exits(&self, namespace: &str) -> Vec<TaskExit> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(topic, ns, _)| topic == EXIT_TOPIC && ns == namespace)
            .map(|(_, _, event)| TaskExit::parse_from_bytes(&event.value).expect("TaskExit"))
            .collect()
    }
}

/// A private containerd stand-in: its events socket and the sink behind it.
struct StandIn {
    socket: PathBuf,
    sink: EventSink,
    server: Server,
}

async fn serve_events(dir: &Path) -> StandIn {
    let socket = dir.join("events.ttrpc");
    let sink = EventSink::default();
    let mut server = Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .expect("bind events socket")
        .register_service(create_events(Arc::new(sink.clone())));
    server.start().await.expect("start events server");
    StandIn {
        socket,
        sink,
        server,
    }
}

/// A bundle whose container runs `sh -c script` on a busybox rootfs, its stdout in `out`.
fn bundle(dir: &Path, script: &str) -> PathBuf {
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    for d in ["proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy /bin/busybox");
    symlink("busybox", rootfs.join("bin/sh")).unwrap();
    let made = Command::new(host_runc())
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .status()
        .expect("runc spec");
    assert!(made.success(), "runc spec");
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["sh", "-c", script]);
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
    bundle
}

/// The runc options containerd's CRI passes for a handler with `BinaryName`.
fn runc_options(binary: &Path) -> Any {
    let options = Options {
        binary_name: binary.display().to_string(),
        ..Default::default()
    };
    let mut any = Any::new();
    any.type_url = RUNC_OPTIONS.to_owned();
    any.value = options.write_to_bytes().unwrap();
    any
}

/// How containerd runs `start`.
struct Start<'a> {
    id: &'a str,
    namespace: &'a str,
    args: Vec<String>,
    stdin: Vec<u8>,
    ttrpc_env: Option<String>,
}

/// Runs `start` in `bundle`; its standard output (stdout and stderr together, as containerd
/// reads them).
fn run_start(bundle: &Path, start: &Start) -> Vec<u8> {
    let mut cmd = Command::new(shim_bin());
    cmd.args(["-namespace", start.namespace, "-id", start.id])
        .args(&start.args)
        .arg("start")
        .current_dir(bundle)
        .env_remove("TTRPC_ADDRESS")
        .env_remove("GRPC_ADDRESS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(address) = &start.ttrpc_env {
        cmd.env("TTRPC_ADDRESS", address);
    }
    let mut child = cmd.spawn().expect("run shim start");
    // A shim that fails before reading its input closes the pipe: its status says why.
    let _ = child.stdin.take().unwrap().write_all(&start.stdin);
    let out = child.wait_with_output().expect("wait shim start");
    let mut combined = out.stdout;
    combined.extend_from_slice(&out.stderr);
    assert!(
        out.status.success(),
        "shim start failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&combined)
    );
    combined
}

/// Drives one container through the shim at `address`: exit status 7 and its output.
async fn run_container(address: &str, id: &str, bundle: &Path, out: &Path) {
    let client = Client::connect(address).await.expect("connect to the shim");
    let task = TaskClient::new(client);
    let ctx = || ttrpc::context::with_timeout(30_000_000_000);
    std::fs::write(out, b"").unwrap();
    task.create(
        ctx(),
        &CreateTaskRequest {
            id: id.to_owned(),
            bundle: bundle.display().to_string(),
            stdout: out.display().to_string(),
            ..Default::default()
        },
    )
    .await
    .expect("create");
    let started = task
        .start(
            ctx(),
            &StartRequest {
                id: id.to_owned(),
                ..Default::default()
            },
        )
        .await
        .expect("start");
    assert!(started.pid > 0);
    let waited = task
        .wait(
            ctx(),
            &WaitRequest {
                id: id.to_owned(),
                ..Default::default()
            },
        )
        .await
        .expect("wait");
    assert_eq!(waited.exit_status, 7);
    assert_eq!(
        std::fs::read_to_string(out).unwrap(),
        "hello from busybox\n"
    );
    let deleted = task
        .delete(
            ctx(),
            &DeleteRequest {
                id: id.to_owned(),
                ..Default::default()
            },
        )
        .await
        .expect("delete");
    assert_eq!(deleted.exit_status, 7);
    // The shim exits after answering Shutdown; the connection may drop with the answer.
    let _ = task
        .shutdown(
            ctx(),
            &ShutdownRequest {
                id: id.to_owned(),
                ..Default::default()
            },
        )
        .await;
}

fn socket_path(address: &str) -> &Path {
    Path::new(address.strip_prefix("unix://").unwrap_or(address))
}

/// Which containerd `start` is run as.
enum Caller {
    /// 2.3+: `BootstrapParams` on stdin; `TTRPC_ADDRESS` set to an address nobody serves (or
    /// not at all), no `-address`.
    Bootstrap { stale_env: bool },
    /// 1.6–2.2: `-address`, `TTRPC_ADDRESS`, the runtime options (or `stdin`) on stdin.
    Legacy { stdin: Option<Vec<u8>> },
}

/// Starts a shim as `caller` does and runs a container through it; the exit event must reach
/// the events socket containerd named.
async fn start_and_run(caller: Caller) {
    let dir = tempfile::tempdir().unwrap();
    let events = serve_events(dir.path()).await;
    let bundle = bundle(dir.path(), "echo hello from busybox; exit 7");
    let id = format!("bootstrap-{}", rand_suffix());
    let namespace = format!("nixenv-test-{}", rand_suffix());
    // Never served: the shim must not need containerd's gRPC socket.
    let grpc = dir.path().join("containerd.sock").display().to_string();
    let ttrpc = events.socket.display().to_string();
    let sockets = dir.path().join("s");
    let runc = runc_options(&host_runc());
    let start = match &caller {
        Caller::Bootstrap { stale_env } => {
            let mut params = BootstrapParams::new();
            params.instance_id = id.clone();
            params.namespace = namespace.clone();
            params.containerd_version = "v2.3.0".into();
            params.containerd_ttrpc_address = ttrpc.clone();
            params.containerd_grpc_address = grpc.clone();
            params.containerd_binary = "/usr/bin/containerd".into();
            params.socket_dir = Some(sockets.display().to_string());
            let mut ext = Extension::new();
            ext.value = Some(runc.clone()).into();
            params.extensions.push(ext);
            Start {
                id: &id,
                namespace: &namespace,
                args: vec![],
                stdin: params.write_to_bytes().unwrap(),
                ttrpc_env: stale_env.then(|| dir.path().join("stale.ttrpc").display().to_string()),
            }
        }
        Caller::Legacy { stdin } => Start {
            id: &id,
            namespace: &namespace,
            args: vec!["-address".into(), grpc.clone()],
            stdin: stdin
                .clone()
                .unwrap_or_else(|| runc.write_to_bytes().unwrap()),
            ttrpc_env: Some(ttrpc.clone()),
        },
    };
    let answer = run_start(&bundle, &start);
    let address = match caller {
        Caller::Bootstrap { .. } => {
            let result = BootstrapResult::parse_from_bytes(&answer).expect("a BootstrapResult");
            assert_eq!(result.version, 2);
            assert_eq!(result.protocol, "ttrpc");
            assert!(
                socket_path(&result.address).starts_with(&sockets),
                "{} is not in the params' socket_dir {}",
                result.address,
                sockets.display()
            );
            result.address
        }
        Caller::Legacy { .. } => {
            let address = String::from_utf8(answer).expect("a plain address");
            assert!(
                address.starts_with("unix:///run/containerd/s/"),
                "{address}"
            );
            address
        }
    };
    assert_eq!(
        std::fs::read_to_string(bundle.join("address")).unwrap(),
        address
    );
    run_container(&address, &id, &bundle, &dir.path().join("out")).await;
    wait_for("the TaskExit event", Duration::from_secs(10), || {
        !events.sink.exits(&namespace).is_empty()
    })
    .await;
    let exits = events.sink.exits(&namespace);
    assert_eq!(exits[0].container_id, id);
    assert_eq!(exits[0].exit_status, 7);
    wait_for("the shim to exit", Duration::from_secs(10), || {
        !socket_path(&address).exists()
    })
    .await;
    let mut server = events.server;
    let _ = server.shutdown().await;
    let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&namespace));
}

/// A name no other test (of this run or a concurrent one) uses.
fn rand_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_3_bootstrap_params_without_legacy_flags_or_environment() {
    start_and_run(Caller::Bootstrap { stale_env: false }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_3_bootstrap_params_win_over_the_legacy_environment() {
    start_and_run(Caller::Bootstrap { stale_env: true }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_start_with_runtime_options() {
    start_and_run(Caller::Legacy { stdin: None }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_start_without_options_or_with_garbage_on_stdin() {
    start_and_run(Caller::Legacy {
        stdin: Some(vec![]),
    })
    .await;
    start_and_run(Caller::Legacy {
        stdin: Some(b"\xff\xfe not protobuf".to_vec()),
    })
    .await;
}

/// `-info` as containerd runs it: the flag alone, the runtime options (or nothing) on stdin.
fn runtime_info(stdin: &[u8]) -> RuntimeInfo {
    let mut child = Command::new(shim_bin())
        .arg("-info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run shim -info");
    // A shim that fails before reading its input closes the pipe: its status says why.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "shim -info: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    RuntimeInfo::parse_from_bytes(&out.stdout).expect("a RuntimeInfo")
}

/// `runc features`, or `None` for a runc without it.
fn runc_features(runc: &Path) -> Option<serde_json::Value> {
    let out = Command::new(runc).arg("features").output().unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("runc features JSON"))
}

fn assert_same_features(info: &RuntimeInfo, runc: &Path) {
    let Some(expected) = runc_features(runc) else {
        assert!(info.features.is_none(), "features from a runc without them");
        return;
    };
    let features = info.features.as_ref().expect("features in RuntimeInfo");
    assert_eq!(features.type_url, FEATURES_TYPE);
    let got: serde_json::Value = serde_json::from_slice(&features.value).expect("features JSON");
    assert_eq!(got["ociVersionMax"], expected["ociVersionMax"]);
    assert_eq!(got["linux"]["namespaces"], expected["linux"]["namespaces"]);
    assert_eq!(
        got["linux"]["mountExtensions"],
        expected["linux"]["mountExtensions"]
    );
    let says_user = |v: &serde_json::Value| {
        v["linux"]["namespaces"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n == "user"))
    };
    assert_eq!(says_user(&got), says_user(&expected));
}

#[test]
fn info_reports_the_features_of_the_runc_in_use() {
    let runc = host_runc();
    let options = runc_options(&runc);
    let info = runtime_info(&options.write_to_bytes().unwrap());
    assert_eq!(info.name, "io.containerd.nixenv.v2");
    assert!(!info.version.version.is_empty());
    assert_eq!(info.options.as_ref(), Some(&options));
    assert_same_features(&info, &runc);
    if let Some(f) = runc_features(&runc) {
        eprintln!(
            "runc {}: ociVersionMax {}, idmap {}",
            runc.display(),
            f["ociVersionMax"],
            f["linux"]["mountExtensions"]["idmap"]["enabled"]
        );
    }

    // Without options: runc on PATH (no nixenv config names another here).
    let info = runtime_info(b"");
    assert!(info.options.is_none());
    assert_same_features(&info, &runc);

    // A BinaryName that does not report features (a runc older than 1.1) still gets an answer.
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old-runc");
    std::fs::write(
        &old,
        "#!/bin/sh\necho 'No help topic for features' >&2\nexit 1\n",
    )
    .unwrap();
    let status = Command::new("chmod").arg("755").arg(&old).status().unwrap();
    assert!(status.success());
    let info = runtime_info(&runc_options(&old).write_to_bytes().unwrap());
    assert_eq!(info.name, "io.containerd.nixenv.v2");
    assert!(info.features.is_none());
}
