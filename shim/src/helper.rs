//! The preparing process: `nixenv-hook shim-prepare`, `shim-release` and `shim-config`
//! (`hook/src/shim.rs` is the other side and documents the protocol).
//!
//! The shim lives as long as its pod, so the core library (catalog, HTTP, NAR unpacking, the
//! store) is not linked into it: each Create runs one `nixenv-hook shim-prepare`, which
//! rewrites config.json and answers with one JSON line. `nixenv-hook` is looked up next to
//! the shim's own executable, then on PATH. Its standard error goes to the shim's log.
//!
//! A [`Preparation`] is a running helper: dropping the future that waits for it does not stop
//! it (a cancelled Create lets the download go on for the kubelet's retry); the shim stops it
//! with SIGTERM only when it shuts down, and the kernel does the same if the shim dies
//! (`PR_SET_PDEATHSIG`). Either way the helper removes its pin and leaves no partial path.
//! (The death signal follows the *thread* that spawned the helper: helpers are spawned from
//! async tasks, which run on the shim's one runtime thread, never from blocking-pool threads,
//! which exit when idle.)
//!
//! The stages, flags and [`Reply`] are the `nixenv-shim-protocol` crate's. A refusal keeps the
//! helper's [`FailureKind`] ([`HelperError::Refused`]); `crate::error` turns it into a code.
//! [`Prepare`] is this edge as the task logic sees it: [`Helper`] in the shim, the same
//! [`Helper`] on a script in tests.

use std::ffi::OsString;
use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use nixenv_shim_protocol::{EnvChange, FailureKind, Reply, HELPER};
use nixenv_shim_protocol::{
    BUNDLE_FLAG, CONFIG_STAGE, ID_FLAG, NAMESPACE_FLAG, PREPARE_STAGE, RELEASE_STAGE,
    RUNTIME_ROOT_FLAG,
};
use tokio::io::AsyncReadExt;

use crate::reaper::{Exit, Wait};
/// Replies longer than this are not read further (one line of JSON is a few hundred bytes).
const MAX_REPLY: u64 = 64 * 1024;

/// One call of the helper: which container, which stage, which binary (for error messages).
#[derive(Debug, Clone)]
pub struct Call {
    pub id: String,
    pub stage: &'static str,
    pub helper: PathBuf,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} {}", self.id, self.helper.display(), self.stage)
    }
}

/// Why the helper gave no usable answer, or refused.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// The helper's own one-line error (its input and cause), and its kind.
    #[error("{error}")]
    Refused { kind: FailureKind, error: String },
    #[error("{id}: cannot run {helper} (looked next to {beside} and on PATH): {source}")]
    Spawn {
        id: String,
        helper: PathBuf,
        beside: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{call} was killed by signal {signal}")]
    Killed { call: Call, signal: i32 },
    #[error("{call} exited with code {code} without a reply")]
    NoReply { call: Call, code: i32 },
    #[error("{call}: the shim lost track of it")]
    Lost { call: Call },
    #[error("{call}: unreadable reply {reply:?}: {source}")]
    BadReply {
        call: Call,
        reply: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{call} answered {reply:?}, which is not an answer to it")]
    Unexpected { call: Call, reply: Box<Reply> },
}

/// What a preparation is for.
#[derive(Debug, Clone)]
pub struct PrepareArgs<'a> {
    pub id: &'a str,
    pub bundle: &'a Path,
    pub namespace: &'a str,
    pub runtime_root: &'a Path,
}

/// The helper, and how to wait for it.
#[derive(Debug, Clone)]
pub struct Helper<W> {
    path: PathBuf,
    waiter: W,
}

/// A running helper (`shim-prepare`, or a short call).
pub struct Preparation {
    /// The helper's pid (to stop it with SIGTERM).
    pub pid: i32,
    call: Call,
    reply: tokio::task::JoinHandle<Result<Reply, HelperError>>,
}

impl Preparation {
    /// The helper's reply: [`Reply::PassThrough`] or [`Reply::Rewritten`]. Dropping this
    /// future leaves the preparation running, to be awaited again; awaiting it after it gave
    /// its reply is a bug (it panics).
    pub async fn reply(&mut self) -> Result<Reply, HelperError> {
        match (&mut self.reply).await {
            Ok(result) => result,
            // The reading task never panics; if it were aborted, say so.
            Err(_) => Err(HelperError::Lost {
                call: self.call.clone(),
            }),
        }
    }
}

/// `nixenv-hook` next to `exe` if it is there, else the name (looked up on PATH).
pub fn locate(exe: Option<&Path>) -> PathBuf {
    exe.and_then(Path::parent)
        .map(|dir| dir.join(HELPER))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(HELPER))
}

/// `RUST_LOG` for a helper of a shim at debug level: nixenv's own lines at debug, the HTTP
/// and TLS libraries' at info.
const DEBUG_LOG: &str = "info,nixenv_core=debug,nixenv_hook=debug";

impl<W: Wait + Clone> Helper<W> {
    /// The helper at `path`.
    pub fn new(path: PathBuf, waiter: W) -> Self {
        Helper { path, waiter }
    }

    /// The helper next to the running executable (or on PATH).
    pub fn beside_self(waiter: W) -> Self {
        let exe = std::env::current_exe().ok();
        Self::new(locate(exe.as_deref()), waiter)
    }

    fn command(&self, stage: &'static str, args: &[OsString]) -> Command {
        let mut cmd = Command::new(&self.path);
        cmd.arg(stage)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(crate::logging::child_stderr());
        if crate::logging::child_wants_debug() {
            cmd.env("RUST_LOG", DEBUG_LOG);
        }
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The shim died between fork and prctl: no signal will come.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        cmd
    }

    fn spawn(
        &self,
        id: &str,
        stage: &'static str,
        args: &[OsString],
    ) -> Result<Preparation, HelperError> {
        let mut child = self
            .command(stage, args)
            .spawn()
            .map_err(|source| HelperError::Spawn {
                id: id.to_owned(),
                helper: self.path.clone(),
                beside: std::env::current_exe()
                    .map(|e| e.display().to_string())
                    .unwrap_or_else(|_| "the shim".to_owned()),
                source,
            })?;
        let pid = child.id() as i32;
        tracing::debug!(helper = %self.path.display(), stage, pid, id, "helper started");
        let stdout = child.stdout.take();
        drop(child);
        let call = Call {
            id: id.to_owned(),
            stage,
            helper: self.path.clone(),
        };
        let waiter = self.waiter.clone();
        let task = tokio::spawn({
            let call = call.clone();
            async move {
                let mut out = Vec::new();
                if let Some(pipe) = stdout {
                    if let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(pipe.into()) {
                        let _ = rx.take(MAX_REPLY).read_to_end(&mut out).await;
                    }
                }
                let exit = waiter.wait(pid).await;
                read_reply(call, &out, &exit)
            }
        });
        Ok(Preparation {
            pid,
            call,
            reply: task,
        })
    }

    /// Starts `shim-prepare` for a container.
    pub fn prepare(&self, args: &PrepareArgs<'_>) -> Result<Preparation, HelperError> {
        let argv: Vec<OsString> = vec![
            ID_FLAG.into(),
            args.id.into(),
            BUNDLE_FLAG.into(),
            args.bundle.into(),
            NAMESPACE_FLAG.into(),
            args.namespace.into(),
            RUNTIME_ROOT_FLAG.into(),
            args.runtime_root.into(),
        ];
        self.spawn(args.id, PREPARE_STAGE, &argv)
    }

    async fn call(&self, id: &str, stage: &'static str) -> Result<Reply, HelperError> {
        self.spawn(id, stage, &[ID_FLAG.into(), id.into()])?
            .reply()
            .await
    }

    /// Runs `shim-release` for a container; returns the configured runc.
    pub async fn release(&self, id: &str) -> Result<Option<PathBuf>, HelperError> {
        match self.call(id, RELEASE_STAGE).await? {
            Reply::Released { runc } => Ok(runc),
            other => Err(self.unexpected(id, RELEASE_STAGE, other)),
        }
    }

    /// Runs `shim-config`: the runc the configuration names, if any.
    pub async fn configured_runc(&self, id: &str) -> Result<Option<PathBuf>, HelperError> {
        match self.call(id, CONFIG_STAGE).await? {
            Reply::Configured { runc } => Ok(runc),
            other => Err(self.unexpected(id, CONFIG_STAGE, other)),
        }
    }

    fn unexpected(&self, id: &str, stage: &'static str, reply: Reply) -> HelperError {
        HelperError::Unexpected {
            call: Call {
                id: id.to_owned(),
                stage,
                helper: self.path.clone(),
            },
            reply: Box::new(reply),
        }
    }
}

/// Turns what the helper printed and how it ended into its answer.
fn read_reply(call: Call, out: &[u8], exit: &Exit) -> Result<Reply, HelperError> {
    let line = String::from_utf8_lossy(out);
    let line = line.trim();
    if line.is_empty() {
        return Err(match exit.signal {
            Some(signal) => HelperError::Killed { call, signal },
            None => HelperError::NoReply {
                call,
                code: exit.code,
            },
        });
    }
    let reply: Reply = serde_json::from_str(line).map_err(|source| HelperError::BadReply {
        call,
        reply: line.chars().take(200).collect(),
        source,
    })?;
    match reply {
        Reply::Failed { kind, error } => Err(HelperError::Refused { kind, error }),
        reply => Ok(reply),
    }
}

/// The helper as the task logic uses it: start a preparation, drop a pin.
pub trait Prepare: Send + Sync + 'static {
    /// Starts `shim-prepare` for a container.
    fn prepare(&self, args: &PrepareArgs<'_>) -> Result<Preparation, HelperError>;
    /// Runs `shim-release` for a container; returns the configured runc.
    fn release(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<PathBuf>, HelperError>> + Send;
}

impl<W: Wait + Clone> Prepare for Helper<W> {
    fn prepare(&self, args: &PrepareArgs<'_>) -> Result<Preparation, HelperError> {
        Helper::prepare(self, args)
    }

    fn release(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<PathBuf>, HelperError>> + Send {
        Helper::release(self, id)
    }
}

#[cfg(test)]
pub(crate) mod tests {

    use super::*;
    use crate::reaper::Direct;

    /// A helper script answering `body` (a shell snippet) and recording its arguments.
    ///
    /// The script is put in place by `install`, a process of its own: had this process held a
    /// writable descriptor of it, a test thread forking at that moment would have inherited
    /// it, and running the script would fail with ETXTBSY until that child execs.
    pub(crate) fn fake(dir: &Path, body: &str) -> Helper<Direct> {
        let path = dir.join(HELPER);
        let script = format!("#!/bin/sh\necho \"$@\" > {}/args\n{body}\n", dir.display());
        install_script(&path, &script);
        Helper::new(path, Direct)
    }

    /// Puts executable `script` at `path`, by `install` (see [`fake`]).
    pub(crate) fn install_script(path: &Path, script: &str) {
        let source = path.with_extension("source");
        std::fs::write(&source, script).unwrap();
        let installed = std::process::Command::new("install")
            .args(["-m", "0755"])
            .arg(&source)
            .arg(path)
            .status()
            .unwrap();
        assert!(installed.success(), "install {}", path.display());
    }

    fn args<'a>(bundle: &'a Path) -> PrepareArgs<'a> {
        PrepareArgs {
            id: "c1",
            bundle,
            namespace: "k8s.io",
            runtime_root: Path::new("/run/containerd/runc/k8s.io"),
        }
    }

    #[tokio::test]
    async fn a_rewritten_reply_is_read_and_the_arguments_are_passed() {
        let dir = tempfile::tempdir().unwrap();
        let h = fake(
            dir.path(),
            r#"echo '{"result":"rewritten","reference":"acme/echoserver","generation":2,"paths":4,"runc":null}'"#,
        );
        let reply = h.prepare(&args(Path::new("/b"))).unwrap().reply().await;
        assert_eq!(
            reply.unwrap(),
            Reply::Rewritten {
                reference: "acme/echoserver".into(),
                generation: Some(2),
                paths: 4,
                runc: None,
                env: Vec::new(),
            }
        );
        let argv = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert_eq!(
            argv.trim(),
            "shim-prepare --id c1 --bundle /b --namespace k8s.io --runtime-root /run/containerd/runc/k8s.io"
        );
    }

    /// The error of a preparation by a helper script answering `body`.
    async fn prepare_error(dir: &Path, body: &str) -> String {
        let mut p = fake(dir, body).prepare(&args(Path::new("/b"))).unwrap();
        p.reply().await.unwrap_err().to_string()
    }

    #[tokio::test]
    async fn a_refusal_is_the_helpers_one_line_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = prepare_error(
            dir.path(),
            r#"echo '{"result":"failed","error":"acme/nope: no such environment"}'; exit 1"#,
        )
        .await;
        assert_eq!(e, "acme/nope: no such environment");
    }

    #[tokio::test]
    async fn a_refusal_keeps_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let h = fake(
            dir.path(),
            r#"echo '{"result":"failed","kind":"unavailable","error":"acme/echoserver: substituter http://127.0.0.1:1/: connection refused"}'; exit 1"#,
        );
        let e = h.prepare(&args(Path::new("/b"))).unwrap().reply().await;
        assert!(
            matches!(
                e,
                Err(HelperError::Refused {
                    kind: FailureKind::Unavailable,
                    ..
                })
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn no_reply_a_kill_and_garbage_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = prepare_error(dir.path(), "exit 3").await;
        assert_eq!(
            e,
            format!(
                "c1: {}/nixenv-hook shim-prepare exited with code 3 without a reply",
                dir.path().display()
            )
        );
        let e = prepare_error(dir.path(), "kill -9 $$").await;
        assert!(e.ends_with("shim-prepare was killed by signal 9"), "{e}");
        let e = fake(dir.path(), "echo 'Segmentation fault'")
            .release("c1")
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("shim-release: unreadable reply \"Segmentation fault\""),
            "{e}"
        );
        let e = fake(
            dir.path(),
            r#"echo '{"result":"pass-through","runc":null}'"#,
        )
        .release("c1")
        .await
        .unwrap_err();
        assert!(e.to_string().contains("not an answer to it"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_helper_is_named() {
        let h = Helper::new(PathBuf::from("/nonexistent/nixenv-hook"), Direct);
        let e = h.prepare(&args(Path::new("/b"))).err().unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "c1: cannot run /nonexistent/nixenv-hook (looked next to {} and on PATH): \
                 No such file or directory (os error 2)",
                exe.display()
            )
        );
    }

    #[tokio::test]
    async fn release_returns_the_configured_runc() {
        let dir = tempfile::tempdir().unwrap();
        let h = fake(
            dir.path(),
            r#"echo '{"result":"released","runc":"/opt/runc"}'"#,
        );
        assert_eq!(
            h.release("c1").await.unwrap(),
            Some(PathBuf::from("/opt/runc"))
        );
        let argv = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert_eq!(argv.trim(), "shim-release --id c1");
    }

    #[tokio::test]
    async fn config_returns_the_configured_runc() {
        let dir = tempfile::tempdir().unwrap();
        let h = fake(dir.path(), r#"echo '{"result":"configured","runc":null}'"#);
        assert_eq!(h.configured_runc("c1").await.unwrap(), None);
        let argv = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert_eq!(argv.trim(), "shim-config --id c1");
    }

    #[test]
    fn the_helper_is_looked_up_beside_the_shim_then_on_path() {
        let dir = tempfile::tempdir().unwrap();
        let shim = dir.path().join("containerd-shim-nixenv-v2");
        assert_eq!(locate(Some(&shim)), PathBuf::from(HELPER));
        std::fs::write(dir.path().join(HELPER), "").unwrap();
        assert_eq!(locate(Some(&shim)), dir.path().join(HELPER));
        assert_eq!(locate(None), PathBuf::from(HELPER));
    }
}
