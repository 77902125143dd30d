//! A container of the pod: its bundle, rootfs, runc client, init process and execs, and the
//! runc calls behind each task method. Which runc runs, and how its exits are waited for, are
//! the caller's ([`Container::create`]): tests drive it with a shell script as runc.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use containerd_shim::protos::api::Mount;
use runc::options::{CreateOpts, DeleteOpts, ExecOpts, KillOpts};
use runc::Runc;

use crate::cgroups::{spec_cgroups_path, CgroupFs, Cgroups};
use crate::helper::EnvChange;

use crate::io::{ConsoleSocket, IoError, ProcessIo, RuncStdio, StdioPaths};
use crate::mount::{self, MountError};
use crate::process::{Phase, Process};
use crate::reaper::Wait;
use crate::runc::{self as runc_client, RuncError, RuntimeOptions};

/// Why a container operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Runtime(#[from] RuncError),
    #[error("runc {op} {id}: {message}")]
    Runc {
        op: &'static str,
        id: String,
        message: String,
    },
    #[error("read pid file {path}: {message}")]
    PidFile { path: PathBuf, message: String },
    #[error("process {id} not found")]
    NotFound { id: String },
    #[error("process {id} already finished")]
    Finished { id: String },
    #[error("process {id} is {phase:?}, cannot {op}")]
    Phase {
        id: String,
        phase: Phase,
        op: &'static str,
    },
    #[error("exec {id} already exists")]
    ExecExists { id: String },
    #[error("bad {what}: {message}")]
    BadRequest { what: &'static str, message: String },
    #[error("signal {pid}: {source}")]
    Signal {
        pid: u32,
        #[source]
        source: nix::Error,
    },
}

/// Where and how the shim runs runc.
#[derive(Debug, Clone)]
pub struct RuntimeContext {
    /// containerd namespace.
    pub namespace: String,
    /// The runc binary when the runtime options name none (nixenv's `runc` setting).
    pub default_runc: Option<PathBuf>,
}

/// What a Create asks for.
#[derive(Debug, Clone, Default)]
pub struct CreateTask {
    /// The container id.
    pub id: String,
    /// Its OCI bundle.
    pub bundle: PathBuf,
    /// The rootfs mounts (none: the bundle's `rootfs` is ready).
    pub rootfs: Vec<Mount>,
    /// The init's stdio.
    pub stdio: StdioPaths,
    /// containerd's runc options.
    pub options: RuntimeOptions,
}

/// A container and its processes.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    runc: Runc,
    pub init: Arc<Process>,
    /// Its cgroups, found right after `runc create` and kept until Delete.
    pub cgroups: Option<Cgroups>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    env_overlay: Mutex<EnvOverlay>,
}

/// Whether an OCI spec leaves the container without a PID namespace of its own: no `pid`
/// namespace entry, or one that joins an existing namespace (`path`).
fn spec_shares_pid_namespace(spec: &serde_json::Value) -> bool {
    !spec
        .pointer("/linux/namespaces")
        .and_then(|n| n.as_array())
        .is_some_and(|list| {
            list.iter().any(|ns| {
                ns.get("type").and_then(|t| t.as_str()) == Some("pid")
                    && ns
                        .get("path")
                        .and_then(|p| p.as_str())
                        .is_none_or(str::is_empty)
            })
        })
}

/// What nixenv's rewrite changed in the init process's environment, as the helper reported
/// it: containerd builds exec specs from its own copy of the container spec, so execs get the
/// same changes (unless the exec sets a variable itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvOverlay {
    /// The variables the rewrite set, with their values before and after.
    pub changes: Vec<EnvChange>,
}

fn spec_env(bundle_config: &serde_json::Value) -> Vec<String> {
    bundle_config
        .pointer("/process/env")
        .and_then(|e| e.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl EnvOverlay {
    /// Applies the changes to an exec's env by runc's last-entry-wins rule, keeping what the
    /// exec set itself ([`nixenv_shim_protocol::apply_env_changes`]).
    pub fn apply(&self, env: &mut Vec<String>) {
        nixenv_shim_protocol::apply_env_changes(&self.changes, env);
    }
}

fn runc_err(op: &'static str, id: &str, bundle: &Path, e: &runc::error::Error) -> ContainerError {
    ContainerError::Runc {
        op,
        id: id.to_owned(),
        message: runc_client::describe(e, bundle),
    }
}

async fn read_pid(path: &Path) -> Result<u32, ContainerError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| ContainerError::PidFile {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    text.trim()
        .parse()
        .map_err(|e: std::num::ParseIntError| ContainerError::PidFile {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

/// Stdio for a runc call that starts a process: what runc gets, the console socket if any.
fn stdio_for(
    paths: &StdioPaths,
) -> Result<(RuncStdio, Option<ProcessIo>, Option<ConsoleSocket>), IoError> {
    if paths.terminal {
        Ok((
            ProcessIo::for_terminal()?,
            None,
            Some(ConsoleSocket::new()?),
        ))
    } else {
        let (runc_io, io) = ProcessIo::plain(paths)?;
        Ok((runc_io, Some(io), None))
    }
}

/// runc's state root for a Create: its `Root` option, else the namespace's default.
pub fn runc_root(opts: &RuntimeOptions, ctx: &RuntimeContext) -> PathBuf {
    opts.root
        .clone()
        .unwrap_or_else(|| runc_client::default_root(&ctx.namespace))
}

impl Container {
    /// Mounts the rootfs and runs `runc create`; on failure nothing stays mounted or created.
    /// Every runc call's exit comes from `waiter`.
    pub async fn create<W: Wait>(
        req: &CreateTask,
        ctx: &RuntimeContext,
        waiter: W,
    ) -> Result<Container, ContainerError> {
        let bundle = req.bundle.clone();
        let opts = &req.options;
        let binary = match (&opts.binary_name, &ctx.default_runc) {
            (Some(name), _) => runc_client::resolve_binary(name)?,
            (None, Some(path)) => runc_client::resolve_binary(&path.to_string_lossy())?,
            (None, None) => runc_client::resolve_binary("runc")?,
        };
        let root = runc_root(opts, ctx);
        let runc = runc_client::client(&binary, &root, &bundle, opts, waiter)?;
        let stdio = req.stdio.clone();
        let rootfs = bundle.join("rootfs");
        mount::mount_all(&req.rootfs, &rootfs).await?;
        let init = Arc::new(Process::new(&req.id, "", stdio.clone(), None));
        let result = async {
            let (runc_io, plain_io, mut console) = stdio_for(&stdio)?;
            let pid_file = bundle.join("init.pid");
            let mut create = CreateOpts::new()
                .io(Arc::new(runc_io))
                .pid_file(&pid_file)
                .no_pivot(opts.no_pivot_root)
                .no_new_keyring(opts.no_new_keyring);
            let master = console.as_mut().map(|c| {
                create.console_socket = Some(c.path().to_owned());
                c.receive()
            });
            if let Err(e) = runc.create(&req.id, &bundle, Some(&create)).await {
                if let Some(m) = master {
                    m.abort();
                }
                return Err(runc_err("create", &req.id, &bundle, &e));
            }
            let pid = read_pid(&pid_file).await?;
            init.set_pid(pid);
            match (plain_io, master) {
                (Some(io), _) => init.set_io(io),
                (None, Some(m)) => {
                    let master = m.await.map_err(|e| IoError::Console {
                        path: pid_file.clone(),
                        source: std::io::Error::other(e.to_string()),
                    })??;
                    init.set_io(ProcessIo::terminal(master, &stdio)?);
                }
                (None, None) => init.set_io(ProcessIo::none()),
            }
            Ok::<(), ContainerError>(())
        }
        .await;
        if let Err(e) = result {
            let _ = runc
                .delete(&req.id, Some(&DeleteOpts::new().force(true)))
                .await;
            let _ = mount::unmount_all(&rootfs);
            return Err(e);
        }
        let spec: serde_json::Value = std::fs::read(bundle.join("config.json"))
            .ok()
            .and_then(|text| serde_json::from_slice(&text).ok())
            .unwrap_or_default();
        let cgroups = CgroupFs::host().of_container(
            &req.id,
            init.pid(),
            spec_cgroups_path(&spec),
            opts.systemd_cgroup,
        );
        Ok(Container {
            id: req.id.clone(),
            bundle,
            runc,
            init,
            cgroups,
            execs: Mutex::new(HashMap::new()),
            env_overlay: Mutex::new(EnvOverlay::default()),
        })
    }

    /// Records what nixenv's rewrite changed in the environment (for execs).
    pub fn set_env_overlay(&self, overlay: EnvOverlay) {
        *self.env_overlay.lock().unwrap_or_else(|e| e.into_inner()) = overlay;
    }

    fn execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Process>>> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The init process (empty exec id) or an exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound {
                id: format!("{}/{exec_id}", self.id),
            })
    }

    /// All execs.
    pub fn exec_processes(&self) -> Vec<Arc<Process>> {
        self.execs().values().cloned().collect()
    }

    /// `runc start`.
    pub async fn start_init(&self) -> Result<u32, ContainerError> {
        let phase = self.init.phase();
        if phase != Phase::Created {
            return Err(ContainerError::Phase {
                id: self.id.clone(),
                phase,
                op: "start",
            });
        }
        self.runc
            .start(&self.id)
            .await
            .map_err(|e| runc_err("start", &self.id, &self.bundle, &e))?;
        self.init.set_phase(Phase::Running);
        Ok(self.init.pid())
    }

    /// Registers an exec (not started yet).
    pub fn add_exec(
        &self,
        exec_id: &str,
        stdio: StdioPaths,
        spec: serde_json::Value,
    ) -> Result<Arc<Process>, ContainerError> {
        let mut execs = self.execs();
        if execs.contains_key(exec_id) {
            return Err(ContainerError::ExecExists {
                id: exec_id.to_owned(),
            });
        }
        let p = Arc::new(Process::new(&self.id, exec_id, stdio, Some(spec)));
        execs.insert(exec_id.to_owned(), p.clone());
        Ok(p)
    }

    /// `runc exec --detach`.
    pub async fn start_exec(&self, p: &Process) -> Result<u32, ContainerError> {
        if p.phase() != Phase::Created {
            return Err(ContainerError::Phase {
                id: p.exec_id.clone(),
                phase: p.phase(),
                op: "start",
            });
        }
        let mut value = p.spec.clone().unwrap_or_default();
        {
            let overlay = self.env_overlay.lock().unwrap_or_else(|e| e.into_inner());
            if !overlay.changes.is_empty() {
                let mut env = spec_env(&serde_json::json!({ "process": value }));
                overlay.apply(&mut env);
                value["env"] = serde_json::json!(env);
            }
        }
        let spec = crate::process_spec::decode(&value).map_err(|e| ContainerError::BadRequest {
            what: "exec process spec",
            message: e.to_string(),
        })?;
        let (runc_io, plain_io, mut console) = stdio_for(&p.stdio)?;
        let pid_file = self.bundle.join(format!("exec-{}.pid", p.exec_id));
        let mut opts = ExecOpts::new()
            .io(Arc::new(runc_io))
            .pid_file(&pid_file)
            .detach(true);
        let master = console.as_mut().map(|c| {
            opts.console_socket = Some(c.path().to_owned());
            c.receive()
        });
        if let Err(e) = self.runc.exec(&self.id, &spec, Some(&opts)).await {
            if let Some(m) = master {
                m.abort();
            }
            return Err(runc_err("exec", &self.id, &self.bundle, &e));
        }
        let pid = read_pid(&pid_file).await?;
        let _ = tokio::fs::remove_file(&pid_file).await;
        p.set_pid(pid);
        match (plain_io, master) {
            (Some(io), _) => p.set_io(io),
            (None, Some(m)) => {
                let master = m.await.map_err(|e| IoError::Console {
                    path: pid_file.clone(),
                    source: std::io::Error::other(e.to_string()),
                })??;
                p.set_io(ProcessIo::terminal(master, &p.stdio)?);
            }
            (None, None) => p.set_io(ProcessIo::none()),
        }
        p.set_phase(Phase::Running);
        Ok(pid)
    }

    /// Kill: the init through runc (`all` reaches every process of the container), an exec
    /// directly.
    pub async fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<(), ContainerError> {
        let p = self.process(exec_id)?;
        if p.phase() == Phase::Stopped {
            return Err(ContainerError::Finished {
                id: format!("{}/{}", self.id, exec_id),
            });
        }
        // A single process is signalled directly (it is our child: its pid stays ours until we
        // reap it); only "all" needs runc to find every process of the container.
        if !exec_id.is_empty() || !all {
            let pid = p.pid();
            if pid == 0 {
                return Err(ContainerError::Phase {
                    id: exec_id.to_owned(),
                    phase: p.phase(),
                    op: "kill",
                });
            }
            let sig = nix::sys::signal::Signal::try_from(signal as i32)
                .map_err(|source| ContainerError::Signal { pid, source })?;
            return match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig) {
                Ok(()) => Ok(()),
                Err(nix::errno::Errno::ESRCH) => Err(ContainerError::Finished {
                    id: format!("{}/{}", self.id, exec_id),
                }),
                Err(source) => Err(ContainerError::Signal { pid, source }),
            };
        }
        let res = self
            .runc
            .kill(&self.id, signal, Some(&KillOpts::new().all(all)))
            .await;
        if let Err(e) = res {
            if p.phase() == Phase::Stopped || crate::reaper::has_exited(p.pid() as i32) {
                return Err(ContainerError::Finished {
                    id: self.id.clone(),
                });
            }
            return Err(runc_err("kill", &self.id, &self.bundle, &e));
        }
        Ok(())
    }

    /// Whether the container has no PID namespace of its own (it shares the host's or another
    /// container's): then its init's death does not end its other processes. An unreadable
    /// spec counts as shared, the cautious answer.
    pub fn shares_pid_namespace(&self) -> bool {
        std::fs::read(self.bundle.join("config.json"))
            .ok()
            .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok())
            .is_none_or(|spec| spec_shares_pid_namespace(&spec))
    }

    /// After the init exited, in a container without a PID namespace of its own: SIGKILL
    /// whatever is left of it (`runc kill --all`), so no orphan outlives the container or keeps
    /// its stdio open (containerd waits for the stdio to close before it deletes the task).
    pub async fn kill_leftovers(&self) {
        if !self.shares_pid_namespace() {
            return;
        }
        let opts = KillOpts::new().all(true);
        if let Err(e) = self
            .runc
            .kill(&self.id, libc::SIGKILL as u32, Some(&opts))
            .await
        {
            let message = runc_client::describe(&e, &self.bundle);
            tracing::debug!(id = %self.id, %message, "kill leftovers after init exit");
        }
    }

    /// Waits (at most `limit`) until no exec of the container runs, so the init's exit is the
    /// container's last exit event.
    pub async fn wait_execs(&self, limit: Duration) {
        let running: Vec<Arc<Process>> = self
            .exec_processes()
            .into_iter()
            .filter(|p| matches!(p.phase(), Phase::Running | Phase::Paused))
            .collect();
        let all = futures::future::join_all(running.iter().map(|p| p.wait()));
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!(id = %self.id, "execs still running after the init exited");
        }
    }

    /// Removes an exec that is not running.
    pub fn remove_exec(&self, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        let p = self.process(exec_id)?;
        if p.phase() == Phase::Running || p.phase() == Phase::Paused {
            return Err(ContainerError::Phase {
                id: exec_id.to_owned(),
                phase: p.phase(),
                op: "delete",
            });
        }
        self.execs().remove(exec_id);
        Ok(p)
    }

    /// `runc delete` and unmount; the init's exit if it had one.
    pub async fn delete(&self) -> Result<(), ContainerError> {
        let phase = self.init.phase();
        if phase == Phase::Running || phase == Phase::Paused {
            return Err(ContainerError::Phase {
                id: self.id.clone(),
                phase,
                op: "delete",
            });
        }
        if let Err(e) = self
            .runc
            .delete(&self.id, Some(&DeleteOpts::new().force(true)))
            .await
        {
            // Already gone is fine.
            let message = runc_client::describe(&e, &self.bundle);
            if !message.contains("does not exist") && !message.contains("not exist") {
                tracing::warn!(id = %self.id, %message, "runc delete");
            }
        }
        if phase == Phase::Created && self.init.exit().is_none() {
            // The killed init's exit arrives through the reaper; give it a moment.
            let _ = tokio::time::timeout(Duration::from_secs(2), self.init.wait()).await;
        }
        mount::unmount_all(&self.bundle.join("rootfs"))?;
        Ok(())
    }

    /// `runc ps`.
    pub async fn pids(&self) -> Result<Vec<usize>, ContainerError> {
        self.runc
            .ps(&self.id)
            .await
            .map_err(|e| runc_err("ps", &self.id, &self.bundle, &e))
    }

    pub async fn pause(&self) -> Result<(), ContainerError> {
        self.runc
            .pause(&self.id)
            .await
            .map_err(|e| runc_err("pause", &self.id, &self.bundle, &e))?;
        self.init.set_phase(Phase::Paused);
        Ok(())
    }

    pub async fn resume(&self) -> Result<(), ContainerError> {
        self.runc
            .resume(&self.id)
            .await
            .map_err(|e| runc_err("resume", &self.id, &self.bundle, &e))?;
        self.init.set_phase(Phase::Running);
        Ok(())
    }

    /// `runc update` with OCI `LinuxResources` (JSON, as containerd sends them).
    pub async fn update(&self, resources: &[u8]) -> Result<(), ContainerError> {
        let r: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(resources).map_err(|e| ContainerError::BadRequest {
                what: "resources",
                message: e.to_string(),
            })?;
        self.runc
            .update(&self.id, &r)
            .await
            .map_err(|e| runc_err("update", &self.id, &self.bundle, &e))
    }
}

/// Exit time for a process that never ran.
pub fn now() -> SystemTime {
    SystemTime::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_private_pid_namespace_ends_with_the_init() {
        let spec = |ns: serde_json::Value| serde_json::json!({"linux": {"namespaces": ns}});
        assert!(!spec_shares_pid_namespace(&spec(serde_json::json!([
            {"type": "mount"}, {"type": "pid"}
        ]))));
        assert!(!spec_shares_pid_namespace(&spec(serde_json::json!([
            {"type": "pid", "path": ""}
        ]))));
        // The host's PID namespace (no entry) and a pod's (joined by path) are shared.
        assert!(spec_shares_pid_namespace(&spec(serde_json::json!([
            {"type": "mount"}, {"type": "network"}
        ]))));
        assert!(spec_shares_pid_namespace(&spec(serde_json::json!([
            {"type": "pid", "path": "/proc/42/ns/pid"}
        ]))));
        assert!(spec_shares_pid_namespace(&serde_json::json!({})));
    }

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exec_env_gets_the_rewrite_unless_overridden() {
        let after = v(&[
            "PATH=/nix/store/e/bin:/usr/bin:/bin",
            "A=1",
            "KEEP=x",
            "ECHO_MESSAGE=hi",
        ]);
        let change = |name: &str, before: Option<&str>, after: &str| EnvChange {
            name: name.into(),
            before: before.map(Into::into),
            after: after.into(),
        };
        // What the helper reports for this rewrite (core's `spec::env_changes`).
        let overlay = EnvOverlay {
            changes: vec![
                change(
                    "PATH",
                    Some("/usr/bin:/bin"),
                    "/nix/store/e/bin:/usr/bin:/bin",
                ),
                change("ECHO_MESSAGE", None, "hi"),
            ],
        };
        assert_eq!(overlay.changes.len(), 2);
        let mut exec = v(&["PATH=/usr/bin:/bin", "A=1", "KEEP=x"]);
        overlay.apply(&mut exec);
        assert_eq!(exec, after);
        let mut custom = v(&["PATH=/custom", "ECHO_MESSAGE=mine"]);
        overlay.apply(&mut custom);
        assert_eq!(custom, v(&["PATH=/custom", "ECHO_MESSAGE=mine"]));
    }
}
