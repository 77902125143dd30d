//! Driving `runc` through the `runc` crate: a `Spawner` whose exits come from a [`Wait`]
//! (in the serving shim the reaper, which reaps all its children, so nobody else may wait for
//! them; in tests `waitpid`), and the per-container client with its runtime options. Which
//! binary runs is the caller's: tests give a shell script.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::oci::Options;
use runc::options::GlobalOpts;
use runc::Runc;
use tokio::io::AsyncReadExt;

use crate::reaper::Wait;

/// How long to keep reading a finished runc's output (a process that inherited the pipe
/// could otherwise hold it open forever).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Why the runtime could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error("runtime options {type_url}: {source}")]
    Options {
        type_url: String,
        #[source]
        source: containerd_shim::protos::protobuf::Error,
    },
    #[error("runc binary {name:?} not found on PATH")]
    NotFound { name: String },
    #[error("runc client: {0}")]
    Client(#[source] runc::error::Error),
}

/// The runc options containerd passes (`containerd.runc.v1.Options`), with defaults.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// `BinaryName`: the runc binary (default: nixenv's `runc` setting, else `runc`).
    pub binary_name: Option<String>,
    /// `Root`: runc's state root (default `/run/containerd/runc/<namespace>`).
    pub root: Option<PathBuf>,
    /// `SystemdCgroup`.
    pub systemd_cgroup: bool,
    /// `NoPivotRoot`.
    pub no_pivot_root: bool,
    /// `NoNewKeyring`.
    pub no_new_keyring: bool,
}

impl RuntimeOptions {
    /// Decodes the options of a Create request; other option types (containerd 1.6's
    /// `runtimeoptions.v1.Options` for non-runc runtimes) give the defaults.
    pub fn from_any(any: Option<&Any>) -> Result<RuntimeOptions, RuncError> {
        let Some(any) = any else {
            return Ok(RuntimeOptions::default());
        };
        if !any.type_url.ends_with("containerd.runc.v1.Options") {
            return Ok(RuntimeOptions::default());
        }
        let o = Options::parse_from_bytes(&any.value).map_err(|source| RuncError::Options {
            type_url: any.type_url.clone(),
            source,
        })?;
        Ok(RuntimeOptions {
            binary_name: Some(o.binary_name).filter(|s| !s.is_empty()),
            root: Some(o.root).filter(|s| !s.is_empty()).map(PathBuf::from),
            systemd_cgroup: o.systemd_cgroup,
            no_pivot_root: o.no_pivot_root,
            no_new_keyring: o.no_new_keyring,
        })
    }
}

/// Where runc keeps its state for `namespace` unless the options say otherwise (the same
/// default as containerd's own runc shim, so `runc list` shows both).
pub fn default_root(namespace: &str) -> PathBuf {
    Path::new("/run/containerd/runc").join(namespace)
}

/// Resolves a binary name against PATH (absolute and relative paths are kept).
pub fn resolve_binary(name: &str) -> Result<PathBuf, RuncError> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| RuncError::NotFound {
            name: name.to_owned(),
        })
}

/// A runc client for one container: state under `root`, errors logged as JSON to
/// `<bundle>/log.json` (read back by [`last_error`]).
pub fn client<W: Wait>(
    binary: &Path,
    root: &Path,
    bundle: &Path,
    opts: &RuntimeOptions,
    waiter: W,
) -> Result<Runc, RuncError> {
    let mut global = GlobalOpts::new()
        .command(binary)
        .root(root)
        .log(bundle.join("log.json"))
        .log_json()
        .systemd_cgroup(opts.systemd_cgroup);
    global.custom_spawner(Arc::new(Spawner(waiter)));
    global.build().map_err(RuncError::Client)
}

/// The last error runc logged to `<bundle>/log.json`, if any.
pub fn last_error(bundle: &Path) -> Option<String> {
    let text = std::fs::read_to_string(bundle.join("log.json")).ok()?;
    text.lines().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v.get("level")?.as_str()? == "error").then(|| v.get("msg")?.as_str().map(str::to_owned))?
    })
}

/// One line for a failed runc call: runc's own logged error if there is one.
pub fn describe(err: &runc::error::Error, bundle: &Path) -> String {
    if let Some(msg) = last_error(bundle) {
        return msg;
    }
    match err {
        runc::error::Error::CommandFailed {
            status,
            stdout,
            stderr,
        } => {
            let out = format!("{} {}", stdout.trim(), stderr.trim());
            let out = out.trim();
            if out.is_empty() {
                format!("runc {status}")
            } else {
                out.lines().last().unwrap_or(out).to_owned()
            }
        }
        other => other.to_string(),
    }
}

/// Runs runc without tokio's child handling: the exit comes from `W`.
#[derive(Debug)]
struct Spawner<W>(W);

async fn read_all(pipe: Option<impl std::os::fd::AsRawFd + Into<std::os::fd::OwnedFd>>) -> String {
    let Some(pipe) = pipe else {
        return String::new();
    };
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(pipe.into()) else {
        return String::new();
    };
    let mut buf = Vec::new();
    let _ = rx.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[async_trait]
impl<W: Wait> runc::Spawner for Spawner<W> {
    async fn execute(
        &self,
        cmd: tokio::process::Command,
    ) -> runc::Result<(ExitStatus, u32, String, String)> {
        let mut cmd = cmd.into_std();
        tracing::debug!(?cmd, "runc");
        let mut child = cmd
            .spawn()
            .map_err(runc::error::Error::ProcessSpawnFailed)?;
        // Our copies of the child's stdio (fifos, console) must not outlive the spawn.
        drop(cmd);
        let pid = child.id();
        let stdout = tokio::spawn(read_all(child.stdout.take()));
        let stderr = tokio::spawn(read_all(child.stderr.take()));
        drop(child);
        let exit = self.0.wait(pid as i32).await;
        let collect = |h: tokio::task::JoinHandle<String>| async move {
            match tokio::time::timeout(OUTPUT_GRACE, h).await {
                Ok(Ok(s)) => s,
                _ => String::new(),
            }
        };
        let (out, err) = tokio::join!(collect(stdout), collect(stderr));
        Ok((ExitStatus::from_raw(exit.wait_status()), pid, out, err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_option_types_give_defaults() {
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![1, 2, 3],
            ..Default::default()
        };
        let o = RuntimeOptions::from_any(Some(&any)).unwrap();
        assert!(o.root.is_none() && o.binary_name.is_none());
    }

    #[test]
    fn runc_options_are_decoded() {
        let opts = Options {
            binary_name: "nixenv-runc".into(),
            root: "/tmp/r".into(),
            systemd_cgroup: true,
            ..Default::default()
        };
        let any = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: opts.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let o = RuntimeOptions::from_any(Some(&any)).unwrap();
        assert_eq!(o.binary_name.as_deref(), Some("nixenv-runc"));
        assert_eq!(o.root.as_deref(), Some(Path::new("/tmp/r")));
        assert!(o.systemd_cgroup);
    }

    #[test]
    fn last_error_reads_runc_json_log() {
        let dir = std::env::temp_dir().join(format!("nixenv-shim-runc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("log.json"),
            "{\"level\":\"info\",\"msg\":\"x\"}\n{\"level\":\"error\",\"msg\":\"exec: \\\"nope\\\": not found\"}\n",
        )
        .unwrap();
        assert_eq!(
            last_error(&dir).as_deref(),
            Some("exec: \"nope\": not found")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
