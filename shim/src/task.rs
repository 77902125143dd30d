//! The shim's task logic: one [`Tasks`] per shim, i.e. per pod. Each method is a plain async
//! function on domain types ([`CreateTask`], ids, [`Exited`]) returning [`TaskError`]; the ttrpc
//! `Task` service ([`crate::service`]) only forwards to it and converts.
//!
//! Create runs nixenv's preparation (resolve, materialise, pin, rewrite config.json; in the
//! helper process, [`crate::helper`]) before `runc create`; the helper's reply says what the
//! rewrite changed in the environment, which execs get too ([`EnvOverlay`]). Delete drops the
//! pin.
//!
//! The two process edges are type parameters: `H` ([`Prepare`]) is the helper, `W` ([`Wait`])
//! is how the exits of runc and of the container's processes are waited for. The shim runs
//! `Tasks<Helper<Reaped>, Reaped>`; the tests below run the same code with a shell script as
//! helper, another as runc, and `waitpid` ([`crate::reaper::Direct`]), without root or
//! containerd.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::ExitSignal;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cgroups::Cgroups;
use crate::container::{Container, CreateTask, EnvOverlay, RuntimeContext};
use crate::error::TaskError;
use crate::events::Events;
use crate::helper::{Preparation, Prepare, PrepareArgs, Reply};
use crate::io::StdioPaths;
use crate::process::{Exited, Phase, Process};
use crate::reaper::Wait;

/// How long an init's exit waits for the container's execs to exit first.
const EXECS_AFTER_INIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long an exiting shim waits for stopped preparations to undo their work (after the
/// Shutdown reply: containerd gives Shutdown itself only a few seconds).
const PENDING_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// What Delete reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// The process's pid (0 if it never ran).
    pub pid: u32,
    /// Its exit status (0 if it never exited).
    pub status: u32,
    /// When it exited, if known.
    pub at: Option<SystemTime>,
}

/// A preparation whose Create was abandoned (cancelled by its client): the helper runs to
/// the end (other containers may share its paths), then its pin is dropped.
struct Pending {
    /// The helper's pid (stopped with SIGTERM when the shim shuts down).
    pid: i32,
    /// Set once the helper has exited (its pid may be reused after that).
    exited: Arc<AtomicBool>,
    /// Becomes true when the helper has exited and the pin is dropped.
    done: watch::Receiver<bool>,
    handle: JoinHandle<()>,
}

/// The shim's task logic, over helper `H` and waiter `W`.
pub struct Tasks<H, W> {
    inner: Arc<Inner<H, W>>,
}

impl<H, W> Clone for Tasks<H, W> {
    fn clone(&self) -> Self {
        Tasks {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<H, W> {
    runtime: RuntimeContext,
    events: Events,
    exit: Arc<ExitSignal>,
    helper: H,
    waiter: W,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Helpers of Creates in flight, by container id.
    preparing: Mutex<HashMap<String, i32>>,
    pending: Mutex<HashMap<String, Pending>>,
    /// Containers whose closure is pinned (released on Delete).
    pinned: Mutex<HashSet<String>>,
    /// Shutdown has begun: nothing new is left running.
    closing: AtomicBool,
}

fn sigterm(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
}

/// Waits for a preparation; dropped while it runs (the Create was cancelled), it lets the
/// helper finish in the background and then drops the container's pin.
struct AbandonGuard<H: Prepare, W: Wait + Clone> {
    id: String,
    preparation: Option<Preparation>,
    inner: Arc<Inner<H, W>>,
}

impl<H: Prepare, W: Wait + Clone> Drop for AbandonGuard<H, W> {
    fn drop(&mut self) {
        let Some(mut preparation) = self.preparation.take() else {
            return;
        };
        let id = self.id.clone();
        self.inner.preparing().remove(&id);
        if self.inner.closing.load(Ordering::SeqCst) {
            // The shim is exiting with the Create in flight: the helper undoes its work on
            // SIGTERM (PR_SET_PDEATHSIG would send it a moment later anyway).
            sigterm(preparation.pid);
            return;
        }
        tracing::warn!(%id, "create cancelled; preparation continues, then unpins");
        let inner = self.inner.clone();
        let pid = preparation.pid;
        let exited = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = watch::channel(false);
        let mut pending = inner.pending();
        let handle = tokio::spawn({
            let id = id.clone();
            let inner = inner.clone();
            let exited = exited.clone();
            async move {
                let reply = preparation.reply().await;
                exited.store(true, Ordering::SeqCst);
                if !matches!(reply, Ok(Reply::PassThrough { .. })) {
                    inner.release(&id).await;
                }
                inner.pending().remove(&id);
                let _ = done_tx.send(true);
            }
        });
        pending.insert(
            id,
            Pending {
                pid,
                exited,
                done,
                handle,
            },
        );
    }
}

/// The pin of a container whose Create has not finished: dropped armed (the Create failed or
/// was cancelled after its preparation), it drops the pin.
struct PinGuard<H: Prepare, W: Wait + Clone> {
    id: String,
    inner: Arc<Inner<H, W>>,
    armed: bool,
}

impl<H: Prepare, W: Wait + Clone> PinGuard<H, W> {
    fn new(id: &str, inner: &Arc<Inner<H, W>>) -> Self {
        inner.pinned().insert(id.to_owned());
        PinGuard {
            id: id.to_owned(),
            inner: inner.clone(),
            armed: true,
        }
    }

    /// The container exists: Delete drops the pin.
    fn keep(mut self) {
        self.armed = false;
    }
}

impl<H: Prepare, W: Wait + Clone> Drop for PinGuard<H, W> {
    fn drop(&mut self) {
        if !self.armed || !self.inner.pinned().remove(&self.id) {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (id, inner) = (self.id.clone(), self.inner.clone());
        tokio::spawn(async move { inner.release(&id).await });
    }
}

impl<H: Prepare, W: Wait + Clone> Inner<H, W> {
    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pinned(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.pinned.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn preparing(&self) -> std::sync::MutexGuard<'_, HashMap<String, i32>> {
        self.preparing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops container `id`'s pin through the helper (idempotent).
    async fn release(&self, id: &str) {
        if let Err(e) = self.helper.release(id).await {
            tracing::warn!(%id, error = %e, "release");
        }
    }
}

impl<H: Prepare, W: Wait + Clone> Tasks<H, W> {
    /// The tasks of a shim in containerd namespace `namespace`, preparing through `helper`,
    /// waiting for exits with `waiter`, telling containerd through `events`, and signalling
    /// `exit` when Shutdown finds no container left.
    pub fn new(
        namespace: &str,
        helper: H,
        waiter: W,
        events: Events,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Tasks {
            inner: Arc::new(Inner {
                runtime: RuntimeContext {
                    namespace: namespace.to_owned(),
                    default_runc: None,
                },
                events,
                exit,
                helper,
                waiter,
                containers: Mutex::new(HashMap::new()),
                preparing: Mutex::new(HashMap::new()),
                pending: Mutex::new(HashMap::new()),
                pinned: Mutex::new(HashSet::new()),
                closing: AtomicBool::new(false),
            }),
        }
    }

    /// Container `id`.
    pub fn container(&self, id: &str) -> Result<Arc<Container>, TaskError> {
        self.inner
            .containers()
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound { id: id.to_owned() })
    }

    /// Watches a started process: on exit, drains its output, records the exit and tells
    /// containerd.
    /// The init (`cgroups`: its container's) also has its OOM kills watched.
    fn watch_exit(&self, p: Arc<Process>, cgroups: Option<&Cgroups>) {
        let pid = p.pid();
        let inner = self.inner.clone();
        let oom = if let Some(cgroups) = cgroups {
            let inner = inner.clone();
            let id = p.container_id.clone();
            crate::oom::watch(cgroups, move || {
                let inner = inner.clone();
                let id = id.clone();
                async move {
                    tracing::warn!(%id, "oom kill");
                    inner.events.oom(&id).await;
                }
            })
        } else {
            None
        };
        tokio::spawn(async move {
            let exit = inner.waiter.wait(pid as i32).await;
            if p.exec_id.is_empty() {
                // As containerd expects of a runc shim: nothing of the container outlives its
                // init, and the init's exit is the container's last exit event.
                let container = inner.containers().get(&p.container_id).cloned();
                if let Some(c) = container {
                    c.kill_leftovers().await;
                    c.wait_execs(EXECS_AFTER_INIT).await;
                }
            }
            if oom.is_some_and(|w| w.finish()) {
                tracing::warn!(id = %p.container_id, "oom kill");
                inner.events.oom(&p.container_id).await;
            }
            if let Some(io) = p.io() {
                io.finish().await;
            }
            p.set_exited(Exited {
                status: exit.code as u32,
                at: exit.at,
            });
            let exec_id = if p.exec_id.is_empty() {
                p.container_id.clone()
            } else {
                p.exec_id.clone()
            };
            tracing::info!(id = %p.container_id, exec = %p.exec_id, pid, code = exit.code, "exited");
            inner
                .events
                .exit(&p.container_id, &exec_id, pid, exit.code as u32, exit.at)
                .await;
        });
    }

    /// Runs nixenv's preparation of the bundle (the helper process, which outlives a
    /// cancelled Create): [`Reply::PassThrough`] or [`Reply::Rewritten`].
    async fn prepare(&self, req: &CreateTask) -> Result<Reply, TaskError> {
        let runtime_root = crate::container::runc_root(&req.options, &self.inner.runtime);
        // A retried Create (the kubelet's, after its deadline) waits for the preparation it
        // abandoned, which keeps downloading; then its own finds the closure in the store.
        let abandoned = self.inner.pending().get(&req.id).map(|p| p.done.clone());
        if let Some(mut done) = abandoned {
            tracing::info!(id = %req.id, "waiting for this container's abandoned preparation");
            let _ = done.wait_for(|d| *d).await;
        }
        let preparation = self
            .inner
            .helper
            .prepare(&PrepareArgs {
                id: &req.id,
                bundle: &req.bundle,
                namespace: &self.inner.runtime.namespace,
                runtime_root: &runtime_root,
            })
            .map_err(|source| TaskError::Prepare { source })?;
        self.inner
            .preparing()
            .insert(req.id.clone(), preparation.pid);
        let mut guard = AbandonGuard {
            id: req.id.clone(),
            preparation: Some(preparation),
            inner: self.inner.clone(),
        };
        let result = match guard.preparation.as_mut() {
            Some(p) => p.reply().await,
            None => unreachable!("set above"),
        };
        guard.preparation = None;
        self.inner.preparing().remove(&req.id);
        result.map_err(|source| TaskError::Prepare { source })
    }

    /// Prepares the bundle, mounts the rootfs and runs `runc create`: the init's pid.
    pub async fn create(&self, req: CreateTask) -> Result<u32, TaskError> {
        let id = req.id.clone();
        if self.inner.containers().contains_key(&id) {
            return Err(TaskError::AlreadyExists { id });
        }
        tracing::info!(%id, bundle = %req.bundle.display(), "create");
        let (runc, prepared) = match self.prepare(&req).await {
            Ok(Reply::Rewritten {
                reference,
                generation,
                paths,
                runc,
                env,
            }) => {
                tracing::info!(%id, %reference, ?generation, paths, "environment prepared");
                (runc, Some((PinGuard::new(&id, &self.inner), env)))
            }
            Ok(Reply::PassThrough { runc }) => (runc, None),
            Ok(other) => {
                return Err(TaskError::UnexpectedReply {
                    reply: Box::new(other),
                })
            }
            Err(e) => {
                tracing::warn!(%id, code = ?e.code(), error = %e, "preparation failed");
                return Err(e);
            }
        };
        let mut runtime = self.inner.runtime.clone();
        runtime.default_runc = runc;
        let container = match Container::create(&req, &runtime, self.inner.waiter.clone()).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                // The pin guard, dropped here, releases the pin.
                tracing::warn!(%id, error = %e, "create failed");
                return Err(e.into());
            }
        };
        if let Some((pin, changes)) = prepared {
            container.set_env_overlay(EnvOverlay { changes });
            pin.keep();
        }
        let pid = container.init.pid();
        self.inner
            .containers()
            .insert(id.clone(), container.clone());
        self.watch_exit(container.init.clone(), container.cgroups.as_ref());
        let bundle = req.bundle.to_string_lossy();
        self.inner
            .events
            .create(&id, &bundle, &req.rootfs, &container.init.stdio, pid)
            .await;
        Ok(pid)
    }

    /// Starts the init (`exec_id` empty) or an exec: its pid.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            let pid = c.start_init().await?;
            self.inner.events.start(id, pid).await;
            return Ok(pid);
        }
        let p = c.process(exec_id)?;
        let pid = c.start_exec(&p).await?;
        self.watch_exit(p, None);
        self.inner.events.exec_started(id, exec_id, pid).await;
        Ok(pid)
    }

    /// The init or an exec, and the container's bundle (for State).
    pub fn state(&self, id: &str, exec_id: &str) -> Result<(Arc<Process>, PathBuf), TaskError> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        Ok((p, c.bundle.clone()))
    }

    /// Waits for the init or an exec to exit.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exited, TaskError> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        Ok(p.wait().await)
    }

    /// Signals the init (`all`: every process of the container) or an exec.
    pub async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), TaskError> {
        let c = self.container(id)?;
        c.kill(exec_id, signal, all).await?;
        Ok(())
    }

    /// Removes an exec, or the container (`runc delete`, unmount, unpin).
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<Deleted, TaskError> {
        let c = self.container(id)?;
        if !exec_id.is_empty() {
            let p = c.remove_exec(exec_id)?;
            let exit = p.exit();
            return Ok(Deleted {
                pid: p.pid(),
                status: exit.map(|e| e.status).unwrap_or_default(),
                at: exit.map(|e| e.at),
            });
        }
        c.delete().await?;
        if self.inner.pinned().remove(id) {
            self.inner.release(id).await;
        }
        self.inner.containers().remove(id);
        let exit = c.init.exit().unwrap_or(Exited {
            status: 0,
            at: crate::container::now(),
        });
        let pid = c.init.pid();
        self.inner
            .events
            .delete(id, pid, exit.status, exit.at)
            .await;
        Ok(Deleted {
            pid,
            status: exit.status,
            at: Some(exit.at),
        })
    }

    /// Registers an exec of the container (`spec`: its OCI process, JSON).
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        spec: Option<&[u8]>,
    ) -> Result<(), TaskError> {
        let c = self.container(id)?;
        if c.init.phase() == Phase::Stopped {
            return Err(TaskError::Stopped { id: id.to_owned() });
        }
        let spec: serde_json::Value = match spec {
            Some(bytes) => {
                serde_json::from_slice(bytes).map_err(|source| TaskError::ExecSpec { source })?
            }
            None => return Err(TaskError::NoExecSpec),
        };
        c.add_exec(exec_id, stdio, spec)?;
        self.inner.events.exec_added(id, exec_id).await;
        Ok(())
    }

    /// Resizes the terminal of the init or an exec.
    pub fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), TaskError> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        if let Some(io) = p.io() {
            io.resize(width, height)?;
        }
        Ok(())
    }

    /// Closes the stdin of the init or an exec (if `stdin`).
    pub fn close_io(&self, id: &str, exec_id: &str, stdin: bool) -> Result<(), TaskError> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        if stdin {
            if let Some(io) = p.io() {
                io.close_stdin();
            }
        }
        Ok(())
    }

    /// The container's processes (`runc ps`), each with its exec id if it is an exec.
    pub async fn pids(&self, id: &str) -> Result<Vec<(u32, Option<String>)>, TaskError> {
        let c = self.container(id)?;
        let pids = c.pids().await?;
        let execs: HashMap<u32, String> = c
            .exec_processes()
            .into_iter()
            .map(|p| (p.pid(), p.exec_id.clone()))
            .collect();
        Ok(pids
            .into_iter()
            .map(|pid| {
                let pid = pid as u32;
                (pid, execs.get(&pid).cloned())
            })
            .collect())
    }

    /// `runc pause`.
    pub async fn pause(&self, id: &str) -> Result<(), TaskError> {
        let c = self.container(id)?;
        c.pause().await?;
        self.inner.events.paused(id).await;
        Ok(())
    }

    /// `runc resume`.
    pub async fn resume(&self, id: &str) -> Result<(), TaskError> {
        let c = self.container(id)?;
        c.resume().await?;
        self.inner.events.resumed(id).await;
        Ok(())
    }

    /// `runc update` with OCI `LinuxResources` (JSON); nothing without resources.
    pub async fn update(&self, id: &str, resources: Option<&[u8]>) -> Result<(), TaskError> {
        let c = self.container(id)?;
        if let Some(resources) = resources {
            c.update(resources).await?;
        }
        Ok(())
    }

    /// The metrics of the container's cgroups, from its creation until Delete (after its init
    /// exited too, as containerd's runc shim answers).
    pub fn stats(&self, id: &str) -> Result<Any, TaskError> {
        let c = self.container(id)?;
        let cgroups = c
            .cgroups
            .as_ref()
            .ok_or_else(|| TaskError::NoCgroup { id: id.to_owned() })?;
        Ok(crate::stats::collect(cgroups)?)
    }

    /// The init's pid of container `id`, 0 if there is none (for Connect).
    pub fn task_pid(&self, id: &str) -> u32 {
        self.inner
            .containers()
            .get(id)
            .map(|c| c.init.pid())
            .unwrap_or_default()
    }

    /// Shutdown: the shim exits once no container is left. Whether it is exiting.
    pub fn shutdown(&self) -> bool {
        if !self.inner.containers().is_empty() {
            return false;
        }
        tracing::info!("no containers left: shutting down");
        self.shutdown_now();
        true
    }

    /// Begins the shim's exit: helpers still preparing, for Creates in flight or abandoned,
    /// get SIGTERM (each undoes its pin and staging), and the server is told to stop. The wait
    /// for them is [`Tasks::drain`], after the Shutdown reply.
    fn shutdown_now(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        for (id, p) in self.inner.pending().iter() {
            if !p.exited.load(Ordering::SeqCst) {
                tracing::info!(%id, pid = p.pid, "stopping an abandoned preparation");
                sigterm(p.pid);
            }
        }
        for (id, pid) in self.inner.preparing().iter() {
            tracing::info!(%id, pid, "stopping the preparation of a create in flight");
            sigterm(*pid);
        }
        self.inner.exit.signal();
    }

    /// Waits (up to 10 s) for stopped preparations to exit and their pins to be dropped.
    pub async fn drain(&self) {
        let deadline = tokio::time::Instant::now() + PENDING_GRACE;
        let pending: Vec<(String, Pending)> = self.inner.pending().drain().collect();
        for (id, p) in pending {
            if tokio::time::timeout_at(deadline, p.handle).await.is_err() {
                tracing::warn!(%id, pid = p.pid, "abandoned preparation did not stop in time");
            }
        }
        while !self.inner.preparing().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::container::ContainerError;
    use crate::helper::tests::{fake, install_script};
    use crate::helper::{FailureKind, Helper, HelperError};
    use crate::reaper::Direct;

    /// runc as a shell script: records each call in `runc.log`; `create` and `exec` report
    /// the pid in `init-pid` / `exec-pid` (processes the test started, so `waitpid` works);
    /// `delete` kills the init as `runc delete --force` does; a file `fail-<command>` makes
    /// that command fail with its content as runc's logged error.
    fn fake_runc(dir: &Path) -> PathBuf {
        let path = dir.join("runc");
        let script = format!(
            r#"#!/bin/sh
dir={dir}
echo "$@" >> $dir/runc.log
cmd=""; pidfile=""; log=""; process=""
while [ $# -gt 0 ]; do
  case "$1" in
    --pid-file) pidfile="$2"; shift 2 ;;
    --log) log="$2"; shift 2 ;;
    --process) process="$2"; shift 2 ;;
    --root|--log-format|--bundle|--console-socket) shift 2 ;;
    create|start|exec|kill|delete|ps|pause|resume|update)
      [ -z "$cmd" ] && cmd="$1"; shift ;;
    *) shift ;;
  esac
done
if [ -e "$dir/fail-$cmd" ]; then
  echo "{{\"level\":\"error\",\"msg\":\"$(cat $dir/fail-$cmd)\"}}" >> "$log"
  exit 1
fi
case "$cmd" in
  create) cp $dir/init-pid "$pidfile" ;;
  exec) cp "$process" $dir/exec-process.json; cp $dir/exec-pid "$pidfile" ;;
  delete) kill -9 "$(cat $dir/init-pid)" 2>/dev/null ;;
  ps) echo "[$(cat $dir/init-pid)]" ;;
esac
exit 0
"#,
            dir = dir.display()
        );
        install_script(&path, &script);
        path
    }

    /// A helper script: `prepare` is what `shim-prepare` answers; every call is appended to
    /// `helper.log`.
    fn helper(dir: &Path, prepare: &str) -> Helper<Direct> {
        fake(
            dir,
            &format!(
                r#"echo "$1" >> {dir}/helper.log
case "$1" in
  shim-prepare) echo '{prepare}'; case '{prepare}' in *failed*) exit 1 ;; esac ;;
  *) echo '{{"result":"released","runc":null}}' ;;
esac"#,
                dir = dir.display()
            ),
        )
    }

    struct Fixture {
        dir: tempfile::TempDir,
        tasks: Tasks<Helper<Direct>, Direct>,
        /// The processes standing for the container's, killed when the test ends.
        processes: Mutex<Vec<u32>>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            for pid in self.processes.lock().unwrap().iter() {
                let pid = nix::unistd::Pid::from_raw(*pid as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    impl Fixture {
        /// A bundle whose config.json has a PID namespace and PATH, a runc script, and the
        /// helper answering `prepare` (`{runc}` stands for the script's path).
        fn new(prepare: &str) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let runc = fake_runc(dir.path());
            let bundle = dir.path().join("bundle");
            std::fs::create_dir(&bundle).unwrap();
            std::fs::write(
                bundle.join("config.json"),
                r#"{"process":{"env":["PATH=/usr/bin:/bin"]},"linux":{"namespaces":[{"type":"pid"}]}}"#,
            )
            .unwrap();
            let prepare = prepare.replace("{runc}", &runc.to_string_lossy());
            let tasks = Tasks::new(
                "test",
                helper(dir.path(), &prepare),
                Direct,
                Events::new(None, "test"),
                Arc::new(ExitSignal::default()),
            );
            Fixture {
                dir,
                tasks,
                processes: Mutex::new(Vec::new()),
            }
        }

        /// A long-running child of this process standing for a container process, its pid
        /// in file `file` for the runc script. The task logic waits for it (`waitpid`), as the
        /// shim's reaper waits for a real container's processes.
        #[allow(clippy::zombie_processes)]
        fn process(&self, file: &str) -> u32 {
            let child = std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap();
            std::fs::write(self.path(file), child.id().to_string()).unwrap();
            self.processes.lock().unwrap().push(child.id());
            child.id()
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn request(&self, id: &str) -> CreateTask {
            CreateTask {
                id: id.into(),
                bundle: self.path("bundle"),
                ..CreateTask::default()
            }
        }

        fn read(&self, name: &str) -> String {
            std::fs::read_to_string(self.path(name)).unwrap_or_default()
        }

        /// Waits (up to 5 s) until file `name` contains `text`.
        async fn until_logged(&self, name: &str, text: &str) {
            for _ in 0..250 {
                if self.read(name).contains(text) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("{name} never logged {text:?}: {}", self.read(name));
        }
    }

    const REWRITTEN: &str = r#"{"result":"rewritten","reference":"acme/echoserver","generation":2,"paths":3,"runc":"{runc}","env":[{"name":"PATH","before":"/usr/bin:/bin","after":"/nix/store/e/bin:/usr/bin:/bin"},{"name":"ECHO_MESSAGE","before":null,"after":"hi"}]}"#;
    const PASS_THROUGH: &str = r#"{"result":"pass-through","runc":"{runc}"}"#;

    #[tokio::test]
    async fn create_start_exec_kill_wait_and_delete_through_a_script_as_runc() {
        let f = Fixture::new(REWRITTEN);
        let init = f.process("init-pid");
        let pid = f.tasks.create(f.request("c1")).await.unwrap();
        assert_eq!(pid, init);
        assert!(
            f.read("runc.log").contains("create"),
            "{}",
            f.read("runc.log")
        );
        let (p, bundle) = f.tasks.state("c1", "").unwrap();
        assert_eq!((p.phase(), p.pid()), (Phase::Created, init));
        assert_eq!(bundle, f.path("bundle"));

        assert_eq!(f.tasks.start("c1", "").await.unwrap(), init);
        assert_eq!(f.tasks.state("c1", "").unwrap().0.phase(), Phase::Running);
        assert_eq!(f.tasks.pids("c1").await.unwrap(), vec![(init, None)]);

        // An exec gets the rewrite's env, as the helper reported it.
        let exec = f.process("exec-pid");
        let spec =
            br#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},"env":["PATH=/usr/bin:/bin"]}"#;
        f.tasks
            .exec("c1", "e1", StdioPaths::default(), Some(spec))
            .await
            .unwrap();
        assert_eq!(f.tasks.start("c1", "e1").await.unwrap(), exec);
        let sent: serde_json::Value = serde_json::from_str(&f.read("exec-process.json")).unwrap();
        assert_eq!(
            sent["env"],
            serde_json::json!(["PATH=/nix/store/e/bin:/usr/bin:/bin", "ECHO_MESSAGE=hi"])
        );
        assert_eq!(
            f.tasks.pids("c1").await.unwrap(),
            vec![(init, None)],
            "runc ps lists the init only here"
        );
        f.tasks.kill("c1", "e1", 9, false).await.unwrap();
        let exited = f.tasks.wait("c1", "e1").await.unwrap();
        assert_eq!(exited.status, 137);
        let deleted = f.tasks.delete("c1", "e1").await.unwrap();
        assert_eq!((deleted.pid, deleted.status), (exec, 137));

        f.tasks.kill("c1", "", 15, false).await.unwrap();
        let exited = tokio::time::timeout(Duration::from_secs(10), f.tasks.wait("c1", ""))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exited.status, 128 + 15);
        let (p, _) = f.tasks.state("c1", "").unwrap();
        assert_eq!(p.phase(), Phase::Stopped);
        // The init is gone: signalling it again says so.
        let e = f.tasks.kill("c1", "", 15, false).await.unwrap_err();
        assert!(
            matches!(e, TaskError::Container(ContainerError::Finished { .. })),
            "{e}"
        );

        assert!(!f.read("helper.log").contains("shim-release"));
        let deleted = f.tasks.delete("c1", "").await.unwrap();
        assert_eq!((deleted.pid, deleted.status), (init, 128 + 15));
        assert!(f.read("runc.log").contains("delete --force c1"));
        assert_eq!(f.read("helper.log"), "shim-prepare\nshim-release\n");
        assert!(matches!(
            f.tasks.state("c1", ""),
            Err(TaskError::NotFound { .. })
        ));
        assert!(f.tasks.shutdown(), "no container left");
    }

    /// The memory usage in a Stats answer (either cgroup version).
    fn memory_usage(any: &Any) -> u64 {
        use containerd_shim::protos::cgroups::metrics as v1;
        use containerd_shim::protos::cgroups_v2::metrics as v2;
        use containerd_shim::protos::protobuf::Message;
        match any.type_url.as_str() {
            crate::stats::V1_TYPE_URL => {
                v1::Metrics::parse_from_bytes(&any.value)
                    .unwrap()
                    .memory
                    .usage
                    .usage
            }
            _ => {
                v2::Metrics::parse_from_bytes(&any.value)
                    .unwrap()
                    .memory
                    .usage
            }
        }
    }

    #[tokio::test]
    async fn stats_answer_from_the_cgroups_after_the_init_exited_until_delete() {
        let f = Fixture::new(PASS_THROUGH);
        let init = f.process("init-pid");
        f.tasks.create(f.request("c1")).await.unwrap();
        // The init stands in this test's cgroups, which it leaves running.
        let cgroups = crate::cgroups::CgroupFs::host().of_pid(init).unwrap();
        assert_eq!(f.tasks.container("c1").unwrap().cgroups, Some(cgroups));
        f.tasks.start("c1", "").await.unwrap();
        assert!(memory_usage(&f.tasks.stats("c1").unwrap()) > 0);

        f.tasks.kill("c1", "", 9, false).await.unwrap();
        assert_eq!(f.tasks.wait("c1", "").await.unwrap().status, 137);
        let after_exit = f.tasks.stats("c1").expect("stats after the init's exit");
        assert!(memory_usage(&after_exit) > 0);

        f.tasks.delete("c1", "").await.unwrap();
        let e = f.tasks.stats("c1").unwrap_err();
        assert!(matches!(e, TaskError::NotFound { .. }), "{e}");
    }

    #[tokio::test]
    async fn the_systemd_cgroup_option_reaches_runc() {
        let f = Fixture::new(PASS_THROUGH);
        f.process("init-pid");
        let mut req = f.request("c1");
        req.options.systemd_cgroup = true;
        f.tasks.create(req).await.unwrap();
        f.tasks.start("c1", "").await.unwrap();
        let log = f.read("runc.log");
        let calls: Vec<&str> = log.lines().collect();
        assert_eq!(calls.len(), 2, "{log}");
        assert!(
            calls.iter().all(|c| c.contains("--systemd-cgroup")),
            "{log}"
        );
        f.tasks.kill("c1", "", 9, false).await.unwrap();
        f.tasks.wait("c1", "").await.unwrap();
        f.tasks.delete("c1", "").await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_preparation_fails_create_with_its_kind_and_runs_no_runc() {
        let f = Fixture::new(
            r#"{"result":"failed","kind":"not-found","error":"acme/nope: environment acme/nope not found in catalog http://127.0.0.1:1/"}"#,
        );
        let e = f.tasks.create(f.request("c1")).await.unwrap_err();
        assert!(
            matches!(
                &e,
                TaskError::Prepare {
                    source: HelperError::Refused {
                        kind: FailureKind::NotFound,
                        ..
                    }
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.code(), containerd_shim::protos::ttrpc::Code::NOT_FOUND);
        assert_eq!(
            e.to_string(),
            "nixenv: acme/nope: environment acme/nope not found in catalog http://127.0.0.1:1/"
        );
        assert_eq!(f.read("runc.log"), "");
        assert!(matches!(
            f.tasks.state("c1", ""),
            Err(TaskError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn a_failed_runc_create_drops_the_pin() {
        let f = Fixture::new(REWRITTEN);
        std::fs::write(f.path("fail-create"), "container_linux.go: no such file").unwrap();
        let e = f.tasks.create(f.request("c1")).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "runc create c1: container_linux.go: no such file"
        );
        assert_eq!(e.code(), containerd_shim::protos::ttrpc::Code::UNKNOWN);
        // runc's half-created container is deleted, and the pin goes.
        assert!(f.read("runc.log").contains("delete --force c1"));
        f.until_logged("helper.log", "shim-release").await;
        assert!(f.tasks.shutdown());
    }

    #[tokio::test]
    async fn task_failures_name_the_container_and_the_state() {
        let f = Fixture::new(PASS_THROUGH);
        let init = f.process("init-pid");
        let e = f.tasks.start("nope", "").await.unwrap_err();
        assert_eq!(e.to_string(), "container nope not found");
        f.tasks.create(f.request("c1")).await.unwrap();
        let e = f.tasks.create(f.request("c1")).await.unwrap_err();
        assert!(matches!(e, TaskError::AlreadyExists { .. }), "{e}");
        let e = f
            .tasks
            .exec("c1", "e1", StdioPaths::default(), None)
            .await
            .unwrap_err();
        assert!(matches!(e, TaskError::NoExecSpec), "{e}");
        let e = f
            .tasks
            .exec("c1", "e1", StdioPaths::default(), Some(b"{"))
            .await
            .unwrap_err();
        assert!(matches!(e, TaskError::ExecSpec { .. }), "{e}");
        let e = f.tasks.start("c1", "e9").await.unwrap_err();
        assert_eq!(e.to_string(), "process c1/e9 not found");

        std::fs::write(f.path("fail-start"), "cannot start").unwrap();
        let e = f.tasks.start("c1", "").await.unwrap_err();
        assert_eq!(e.to_string(), "runc start c1: cannot start");
        std::fs::remove_file(f.path("fail-start")).unwrap();
        f.tasks.start("c1", "").await.unwrap();
        let e = f.tasks.start("c1", "").await.unwrap_err();
        assert!(
            matches!(e, TaskError::Container(ContainerError::Phase { .. })),
            "{e}"
        );
        let e = f.tasks.delete("c1", "").await.unwrap_err();
        assert_eq!(e.to_string(), "process c1 is Running, cannot delete");
        assert!(!f.tasks.shutdown(), "a container is left");

        // `kill --all` goes through runc; its failure is runc's.
        std::fs::write(f.path("fail-kill"), "kill failed").unwrap();
        let e = f.tasks.kill("c1", "", 9, true).await.unwrap_err();
        assert_eq!(e.to_string(), "runc kill c1: kill failed");
        std::fs::remove_file(f.path("fail-kill")).unwrap();
        f.tasks.kill("c1", "", 9, false).await.unwrap();
        let exited = f.tasks.wait("c1", "").await.unwrap();
        assert_eq!(exited.status, 137);
        let e = f
            .tasks
            .exec("c1", "e2", StdioPaths::default(), Some(b"{}"))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "container c1 is stopped");
        let deleted = f.tasks.delete("c1", "").await.unwrap();
        assert_eq!(deleted.pid, init);
        // A pass-through container has no pin to drop.
        assert_eq!(f.read("helper.log"), "shim-prepare\n");
    }
}
