//! The shim binary's actions, as containerd runs them: `start` (find or spawn the pod's shim
//! server, print its address), `delete` (clean up after a dead shim), `-info` (the runtime's
//! features: [`crate::info`]), and serving the Task API over TTRPC (registered as both
//! `containerd.task.v2.Task`, which containerd 1.6 and 1.7 call, and `containerd.task.v3.Task`,
//! which 2.x calls).
//!
//! `start` takes its configuration from containerd's `BootstrapParams` on standard input
//! (containerd 2.3+: [`crate::bootstrap_params`]), else from the legacy flags and environment
//! (1.6–2.2: `-address`, `TTRPC_ADDRESS`). What the server needs is handed to the server process
//! it spawns by `start` itself: the gRPC address as `-address` (it names the socket), the
//! TTRPC address for events as `TTRPC_ADDRESS` in the server's environment, the log level as
//! `-debug`, the socket (in the params' socket directory, if any) as `-socket`. So with
//! `BootstrapParams` neither the legacy flag nor the variable need be set by containerd.
//! `start` answers `BootstrapParams` with a protobuf `BootstrapResult` and the legacy input with
//! the plain address. Runtime options at `start` are only logged: every Create carries them.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim_async::create_task;
use containerd_shim::protos::ttrpc::r#async::transport::Listener;
use containerd_shim::protos::ttrpc::r#async::Server;
use containerd_shim::protos::types::introspection::RuntimeInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Flags, StartOpts, Task};

use crate::bootstrap_params::{encode_result, legacy_options, NotBootstrap, StartInput};
use crate::events::{timestamp, Events};
use crate::helper::Helper;
use crate::logging::Target;
use crate::reaper::{Direct, Reaped};
use crate::runc::RuntimeOptions;
use crate::service::Service;
use crate::task::Tasks;

/// The runtime name containerd knows this shim by.
pub const RUNTIME_NAME: &str = "io.containerd.nixenv.v2";
/// Annotations that group containers into one shim (the pod's sandbox id first).
const GROUP_ANNOTATIONS: [&str; 2] = [
    "io.kubernetes.cri.sandbox-id",
    "io.containerd.runc.v2.group",
];
const TASK_V2: &str = "containerd.task.v2.Task";
const TASK_V3: &str = "containerd.task.v3.Task";
/// Where the server finds containerd's TTRPC address for events (set by containerd 1.6–2.3
/// for `start`, and by `start` from `BootstrapParams` for the server).
const TTRPC_ADDRESS: &str = "TTRPC_ADDRESS";

/// Why an action failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("shim server for {address} did not come up")]
    NotServing { address: String },
    #[error("TTRPC_ADDRESS is not set")]
    NoTtrpcAddress,
    #[error("connect to containerd events at {address}: {message}")]
    Publisher { address: String, message: String },
    #[error("ttrpc server: {0}")]
    Server(String),
    #[error("encode: {0}")]
    Encode(#[from] containerd_shim::protos::protobuf::Error),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BootstrapError {
    let what = what.into();
    move |source| BootstrapError::Io { what, source }
}

/// Runs the action the flags name.
pub async fn run(flags: Flags) -> Result<(), BootstrapError> {
    if flags.version {
        println!("containerd-shim-nixenv-v2 {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if flags.info {
        crate::logging::init(flags.debug, Target::Stderr);
        let options = legacy_options(&read_stdin());
        let runc = info_runc(options.as_ref()).await;
        tracing::debug!(runc = %runc.display(), "runtime info");
        let info: RuntimeInfo = crate::info::runtime_info(RUNTIME_NAME, options, &runc);
        std::io::stdout()
            .write_all(&info.write_to_bytes()?)
            .map_err(io_err("write runtime info"))?;
        return Ok(());
    }
    match flags.action.as_str() {
        "start" => start(&flags).await,
        "delete" => delete(&flags).await,
        _ => serve(&flags).await,
    }
}

/// The runc `-info` reports on: the options' `BinaryName`, else the one a Create would use.
async fn info_runc(options: Option<&Any>) -> PathBuf {
    let named = match RuntimeOptions::from_any(options) {
        Ok(o) => o.binary_name,
        Err(e) => {
            tracing::warn!(error = %e, "runtime options ignored");
            None
        }
    };
    let name = match named {
        Some(name) => PathBuf::from(name),
        None => configured_runc(&Helper::beside_self(Direct), "info").await,
    };
    crate::runc::resolve_binary(&name.to_string_lossy()).unwrap_or(name)
}

/// nixenv's configured runc (the helper's `shim-config`), else `runc`.
async fn configured_runc(helper: &Helper<Direct>, id: &str) -> PathBuf {
    match helper.configured_runc(id).await {
        Ok(runc) => runc,
        Err(e) => {
            tracing::warn!(%id, error = %e, "no configured runc");
            None
        }
    }
    .unwrap_or_else(|| PathBuf::from("runc"))
}

/// Reads standard input (at most 10 MiB) unless it is a terminal.
fn read_stdin() -> Vec<u8> {
    use std::io::IsTerminal;
    let mut buf = Vec::new();
    if !std::io::stdin().is_terminal() {
        let _ = std::io::stdin().take(10 << 20).read_to_end(&mut buf);
    }
    buf
}

/// The shim group of the container whose bundle is `bundle`: its pod's sandbox id.
pub fn grouping(bundle: &Path, id: &str) -> String {
    let annotations = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("annotations").cloned());
    if let Some(a) = annotations {
        for key in GROUP_ANNOTATIONS {
            if let Some(v) = a.get(key).and_then(|v| v.as_str()) {
                if !v.is_empty() {
                    return v.to_owned();
                }
            }
        }
    }
    id.to_owned()
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

fn serving(address: &str) -> bool {
    std::os::unix::net::UnixStream::connect(socket_path(address)).is_ok()
}

fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(tmp, path)
}

/// What `start` hands the server it spawns, from `BootstrapParams` or the legacy flags.
#[derive(Debug, Clone, PartialEq)]
struct Launch {
    /// containerd's gRPC address: part of the socket's name (`-address`).
    grpc_address: String,
    /// containerd's TTRPC address for events, when the params name it (else the server
    /// inherits `TTRPC_ADDRESS`).
    ttrpc_address: Option<String>,
    /// The directory for the socket, when the params name one.
    socket_dir: Option<String>,
    debug: bool,
}

impl Launch {
    fn new(flags: &Flags, input: &StartInput) -> Launch {
        let nonempty = |s: &String| !s.is_empty();
        match input {
            StartInput::Bootstrap(p) => Launch {
                grpc_address: Some(p.grpc_address.clone())
                    .filter(nonempty)
                    .unwrap_or_else(|| flags.address.clone()),
                ttrpc_address: Some(p.ttrpc_address.clone()).filter(nonempty),
                socket_dir: p.socket_dir.clone().filter(nonempty),
                debug: flags.debug || p.debug(),
            },
            StartInput::Legacy { .. } => Launch {
                grpc_address: flags.address.clone(),
                ttrpc_address: None,
                socket_dir: None,
                debug: flags.debug,
            },
        }
    }

    /// The socket of shim group `group`: the name containerd's shims use, in the params'
    /// socket directory or containerd's default.
    fn socket_address(&self, namespace: &str, group: &str) -> String {
        StartOpts {
            address: self.grpc_address.clone(),
            namespace: namespace.to_owned(),
            socket_dir: self.socket_dir.clone(),
            ..Default::default()
        }
        .socket_address(group)
    }
}

/// Logs what standard input was taken for.
fn log_input(id: &str, input: &StartInput) {
    match input {
        StartInput::Bootstrap(p) => tracing::debug!(
            %id,
            containerd = %p.containerd_version,
            options = ?p.runtime_options().map(|o| &o.type_url),
            "bootstrap params"
        ),
        StartInput::Legacy {
            options: None,
            why: why @ (NotBootstrap::Malformed(_) | NotBootstrap::Mismatch { .. }),
        } => tracing::warn!(
            %id,
            error = %why,
            "standard input is neither bootstrap params nor runtime options; ignored"
        ),
        StartInput::Legacy { options, why } => tracing::debug!(
            %id,
            %why,
            options = ?options.as_ref().map(|o| &o.type_url),
            "legacy start"
        ),
    }
}

/// `start`: reuse the pod's shim or spawn it; answer with its address.
async fn start(flags: &Flags) -> Result<(), BootstrapError> {
    let input = StartInput::classify(&read_stdin(), &flags.id, &flags.namespace);
    let launch = Launch::new(flags, &input);
    crate::logging::init(launch.debug, Target::FifoElseNowhere);
    log_input(&flags.id, &input);
    let bundle = std::env::current_dir().map_err(io_err("current dir"))?;
    let group = grouping(&bundle, &flags.id);
    let address = launch.socket_address(&flags.namespace, &group);
    if !serving(&address) {
        spawn_server(flags, &launch, &address)?;
        let mut up = false;
        for _ in 0..100 {
            if serving(&address) {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !up {
            return Err(BootstrapError::NotServing { address });
        }
    }
    write_atomically(&bundle.join("address"), address.as_bytes())
        .map_err(io_err("write address file"))?;
    let answer = match input {
        StartInput::Bootstrap(_) => encode_result(&address),
        StartInput::Legacy { .. } => address.into_bytes(),
    };
    let mut out = std::io::stdout();
    out.write_all(&answer)
        .and_then(|_| out.flush())
        .map_err(io_err("write address"))?;
    Ok(())
}

/// Spawns the server in its own session and waits until it listens (it closes our pipe).
fn spawn_server(flags: &Flags, launch: &Launch, address: &str) -> Result<(), BootstrapError> {
    let exe = std::env::current_exe().map_err(io_err("current exe"))?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "-namespace",
        &flags.namespace,
        "-id",
        &flags.id,
        "-address",
        &launch.grpc_address,
        "-socket",
        address,
    ]);
    if launch.debug {
        cmd.arg("-debug");
    }
    if let Some(ttrpc) = &launch.ttrpc_address {
        cmd.env(TTRPC_ADDRESS, ttrpc);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io_err("spawn shim server"))?;
    if let Some(mut out) = child.stdout.take() {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    }
    Ok(())
}

/// `delete`: containerd's cleanup after a shim is gone: remove the runc container, unmount,
/// unpin; reply with a killed exit.
async fn delete(flags: &Flags) -> Result<(), BootstrapError> {
    let _ = read_stdin();
    crate::logging::init(flags.debug, Target::Stderr);
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().map_err(io_err("current dir"))?
    } else {
        PathBuf::from(&flags.bundle)
    };
    // The configured runc comes from the helper; the pin is dropped only once the container
    // and its mounts are gone (gc could otherwise take paths a live container still maps).
    let helper = Helper::beside_self(Direct);
    let runc = configured_runc(&helper, &flags.id).await;
    let root = crate::runc::default_root(&flags.namespace);
    let _ = Command::new(&runc)
        .arg("--root")
        .arg(&root)
        .args(["delete", "--force", &flags.id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = crate::mount::unmount_all(&bundle.join("rootfs"));
    if let Err(e) = helper.release(&flags.id).await {
        tracing::warn!(id = %flags.id, error = %e, "release");
    }
    let resp = DeleteResponse {
        pid: 0,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: Some(timestamp(std::time::SystemTime::now())).into(),
        ..Default::default()
    };
    std::io::stdout()
        .write_all(&resp.write_to_bytes()?)
        .map_err(io_err("write delete response"))?;
    Ok(())
}

/// The Task service under both API names.
fn task_services(
    service: Service,
) -> std::collections::HashMap<String, containerd_shim::protos::ttrpc::r#async::Service> {
    let task: Arc<dyn Task + Send + Sync> = Arc::new(service);
    let mut services = create_task(task.clone());
    if let Some(v3) = create_task(task).remove(TASK_V3) {
        services.insert(TASK_V2.to_owned(), v3);
    }
    services
}

/// Serves the Task API on `-socket` until Shutdown.
async fn serve(flags: &Flags) -> Result<(), BootstrapError> {
    if crate::logging::init(flags.debug, Target::FifoElseStderr) {
        tracing::info!(
            shim = %flags.id,
            pid = std::process::id(),
            "containerd-shim-nixenv-v2 serving"
        );
    }
    crate::reaper::start().map_err(io_err("subreaper"))?;
    let ttrpc_address = std::env::var(TTRPC_ADDRESS)
        .ok()
        .filter(|a| !a.is_empty())
        .ok_or(BootstrapError::NoTtrpcAddress)?;
    let publisher =
        RemotePublisher::new(&ttrpc_address)
            .await
            .map_err(|e| BootstrapError::Publisher {
                address: ttrpc_address.clone(),
                message: e.to_string(),
            })?;
    let exit = Arc::new(ExitSignal::default());
    let service = Service::new(Tasks::new(
        &flags.namespace,
        Helper::beside_self(Reaped),
        Reaped,
        Events::new(Some(publisher), &flags.namespace),
        exit.clone(),
    ));
    let path = socket_path(&flags.socket).to_owned();
    if let Some(parent) = Path::new(&path).parent() {
        std::fs::create_dir_all(parent).map_err(io_err(format!("create {}", parent.display())))?;
    }
    let listener = match std::os::unix::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if serving(&flags.socket) {
                // Another server of this group won the race.
                signal_started();
                return Ok(());
            }
            let _ = std::fs::remove_file(&path);
            std::os::unix::net::UnixListener::bind(&path).map_err(io_err(format!("bind {path}")))?
        }
        Err(e) => return Err(io_err(format!("bind {path}"))(e)),
    };
    let listener = Listener::try_from(listener).map_err(io_err("ttrpc listener"))?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(task_services(service.clone()));
    server
        .start()
        .await
        .map_err(|e| BootstrapError::Server(e.to_string()))?;
    signal_started();
    exit.wait().await;
    tracing::info!("shim exiting");
    // Let the Shutdown reply reach containerd.
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Preparations told to stop undo their pins and staging before the shim goes.
    service.drain().await;
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Closes the pipe `start` waits on (stdout becomes stderr, i.e. /dev/null).
fn signal_started() {
    // SAFETY: dup2 on our own standard descriptors.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(address: &str) -> Flags {
        Flags {
            id: "c1".into(),
            namespace: "k8s.io".into(),
            address: address.into(),
            ..Default::default()
        }
    }

    #[test]
    fn bootstrap_params_name_the_addresses_socket_dir_and_level() {
        let params = crate::bootstrap_params::BootstrapParams {
            instance_id: "c1".into(),
            namespace: "k8s.io".into(),
            log_level: -4,
            ttrpc_address: "/run/c/c.sock.ttrpc".into(),
            grpc_address: "/run/c/c.sock".into(),
            socket_dir: Some("/run/c/s2".into()),
            ..Default::default()
        };
        let launch = Launch::new(&flags(""), &StartInput::Bootstrap(params));
        assert_eq!(
            launch,
            Launch {
                grpc_address: "/run/c/c.sock".into(),
                ttrpc_address: Some("/run/c/c.sock.ttrpc".into()),
                socket_dir: Some("/run/c/s2".into()),
                debug: true,
            }
        );
        let address = launch.socket_address("k8s.io", "sb1");
        let legacy = Launch::new(
            &flags("/run/c/c.sock"),
            &StartInput::classify(b"", "c1", "k8s.io"),
        );
        let legacy_address = legacy.socket_address("k8s.io", "sb1");
        // The same name containerd's shims give the group's socket, in the requested directory.
        assert_eq!(
            address.strip_prefix("unix:///run/c/s2/"),
            legacy_address.strip_prefix("unix:///run/containerd/s/")
        );
        assert_eq!(address.len(), "unix:///run/c/s2/".len() + 64);
    }

    #[test]
    fn legacy_start_keeps_the_flags_and_the_environment() {
        let launch = Launch::new(
            &flags("/run/c/c.sock"),
            &StartInput::classify(b"\xff", "c1", "k8s.io"),
        );
        assert_eq!(
            launch,
            Launch {
                grpc_address: "/run/c/c.sock".into(),
                ttrpc_address: None,
                socket_dir: None,
                debug: false,
            }
        );
    }

    #[test]
    fn grouping_prefers_the_sandbox_id() {
        let dir = std::env::temp_dir().join(format!("nixenv-shim-group-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(grouping(&dir, "c1"), "c1");
        std::fs::write(
            dir.join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"sb1","io.containerd.runc.v2.group":"g"}}"#,
        )
        .unwrap();
        assert_eq!(grouping(&dir, "c1"), "sb1");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
