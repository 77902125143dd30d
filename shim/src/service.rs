//! The Task service containerd calls (`containerd.task.v2.Task` and `v3`): one per shim,
//! i.e. per pod. Create runs nixenv's preparation (resolve, materialise, pin, rewrite
//! config.json; in the helper process, [`crate::helper`]) before `runc create`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim::protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest,
    PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse,
    StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest,
    WaitResponse,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::oci::ProcessDetails;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::container::{Container, ContainerError, EnvOverlay, RuntimeContext};
use crate::events::{timestamp, Events};
use crate::helper::{Helper, Preparation, PrepareArgs, Reaped, Reply};
use crate::io::StdioPaths;
use crate::process::{Exited, Phase, Process};
use crate::reaper;

/// How long an init's exit waits for the container's execs to exit first.
const EXECS_AFTER_INIT: std::time::Duration = std::time::Duration::from_secs(5);

fn status(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn map_err(e: ContainerError) -> ttrpc::Error {
    let code = match &e {
        ContainerError::NotFound { .. } | ContainerError::Finished { .. } => Code::NOT_FOUND,
        ContainerError::ExecExists { .. } => Code::ALREADY_EXISTS,
        ContainerError::Phase { .. } => Code::FAILED_PRECONDITION,
        ContainerError::BadRequest { .. } => Code::INVALID_ARGUMENT,
        _ => Code::UNKNOWN,
    };
    status(code, e)
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

/// How long an exiting shim waits for stopped preparations to undo their work (after the
/// Shutdown reply: containerd gives Shutdown itself only a few seconds).
const PENDING_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The shim's Task service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: RuntimeContext,
    events: Events,
    exit: Arc<ExitSignal>,
    helper: Helper<Reaped>,
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
struct AbandonGuard {
    id: String,
    preparation: Option<Preparation>,
    inner: Arc<Inner>,
}

impl Drop for AbandonGuard {
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
struct PinGuard {
    id: String,
    inner: Arc<Inner>,
    armed: bool,
}

impl PinGuard {
    fn new(id: &str, inner: &Arc<Inner>) -> PinGuard {
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

impl Drop for PinGuard {
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

impl Inner {
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

impl Service {
    pub fn new(namespace: &str, events: Events, exit: Arc<ExitSignal>) -> Service {
        Service {
            inner: Arc::new(Inner {
                runtime: RuntimeContext {
                    namespace: namespace.to_owned(),
                    default_runc: None,
                },
                events,
                exit,
                helper: Helper::beside_self(Reaped),
                containers: Mutex::new(HashMap::new()),
                preparing: Mutex::new(HashMap::new()),
                pending: Mutex::new(HashMap::new()),
                pinned: Mutex::new(HashSet::new()),
                closing: AtomicBool::new(false),
            }),
        }
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.inner
            .containers()
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
    }

    /// Watches a started process: on exit, drains its output, records the exit and tells
    /// containerd.
    fn watch_exit(&self, p: Arc<Process>) {
        let pid = p.pid();
        let inner = self.inner.clone();
        let oom = if p.exec_id.is_empty() {
            let inner = inner.clone();
            let id = p.container_id.clone();
            crate::oom::watch(pid, move || {
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
            let exit = reaper::wait(pid as i32).await;
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
    async fn prepare(&self, req: &CreateTaskRequest) -> TtrpcResult<Reply> {
        let bundle = PathBuf::from(&req.bundle);
        let runtime_root =
            crate::container::runc_root(req, &self.inner.runtime).map_err(map_err)?;
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
                bundle: &bundle,
                namespace: &self.inner.runtime.namespace,
                runtime_root: &runtime_root,
            })
            .map_err(|e| status(Code::UNKNOWN, format!("nixenv: {e}")))?;
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
        result.map_err(|e| status(Code::UNKNOWN, format!("nixenv: {e}")))
    }

    /// Begins the shim's exit: helpers still preparing, for Creates in flight or abandoned,
    /// get SIGTERM (each undoes its pin and staging), and the server is told to stop. The wait
    /// for them is [`Service::drain`], after the Shutdown reply.
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

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let id = req.id.clone();
        if self.inner.containers().contains_key(&id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {id} already exists"),
            ));
        }
        tracing::info!(%id, bundle = %req.bundle, "create");
        let bundle = PathBuf::from(&req.bundle);
        let env_before = crate::container::bundle_env(&bundle);
        let (runc, pin) = match self.prepare(&req).await? {
            Reply::Rewritten {
                reference,
                generation,
                paths,
                runc,
            } => {
                tracing::info!(%id, %reference, ?generation, paths, "environment prepared");
                (runc, Some(PinGuard::new(&id, &self.inner)))
            }
            Reply::PassThrough { runc } => (runc, None),
            other => {
                return Err(status(
                    Code::INTERNAL,
                    format!("nixenv: unexpected helper reply {other:?}"),
                ))
            }
        };
        let mut runtime = self.inner.runtime.clone();
        runtime.default_runc = runc;
        let container = match Container::create(&req, &runtime).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                // The pin guard, dropped here, releases the pin.
                tracing::warn!(%id, error = %e, "create failed");
                return Err(map_err(e));
            }
        };
        if let Some(pin) = pin {
            let after = crate::container::bundle_env(&bundle);
            container.set_env_overlay(EnvOverlay::between(&env_before, &after));
            pin.keep();
        }
        let pid = container.init.pid();
        self.inner
            .containers()
            .insert(id.clone(), container.clone());
        self.watch_exit(container.init.clone());
        self.inner
            .events
            .create(&id, &req.bundle, &req.rootfs, &container.init.stdio, pid)
            .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let c = self.container(&req.id)?;
        let pid = if req.exec_id.is_empty() {
            let pid = c.start_init().await.map_err(map_err)?;
            self.inner.events.start(&req.id, pid).await;
            pid
        } else {
            let p = c.process(&req.exec_id).map_err(map_err)?;
            let pid = c.start_exec(&p).await.map_err(map_err)?;
            self.watch_exit(p);
            self.inner
                .events
                .exec_started(&req.id, &req.exec_id, pid)
                .await;
            pid
        };
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id).map_err(map_err)?;
        Ok(p.state_response(&c.bundle.to_string_lossy()))
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id).map_err(map_err)?;
        let exited = p.wait().await;
        Ok(WaitResponse {
            exit_status: exited.status,
            exited_at: Some(timestamp(exited.at)).into(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let c = self.container(&req.id)?;
        c.kill(&req.exec_id, req.signal, req.all)
            .await
            .map_err(map_err)?;
        Ok(Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let c = self.container(&req.id)?;
        if !req.exec_id.is_empty() {
            let p = c.remove_exec(&req.exec_id).map_err(map_err)?;
            let exit = p.exit();
            return Ok(DeleteResponse {
                pid: p.pid(),
                exit_status: exit.map(|e| e.status).unwrap_or_default(),
                exited_at: exit.map(|e| timestamp(e.at)).into(),
                ..Default::default()
            });
        }
        c.delete().await.map_err(map_err)?;
        if self.inner.pinned().remove(&req.id) {
            self.inner.release(&req.id).await;
        }
        self.inner.containers().remove(&req.id);
        let exit = c.init.exit().unwrap_or(Exited {
            status: 0,
            at: crate::container::now(),
        });
        let pid = c.init.pid();
        self.inner
            .events
            .delete(&req.id, pid, exit.status, exit.at)
            .await;
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let c = self.container(&req.id)?;
        if c.init.phase() == Phase::Stopped {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is stopped", req.id),
            ));
        }
        let spec: serde_json::Value = match req.spec.as_ref() {
            Some(any) => serde_json::from_slice(&any.value)
                .map_err(|e| status(Code::INVALID_ARGUMENT, format!("exec spec: {e}")))?,
            None => {
                return Err(status(
                    Code::INVALID_ARGUMENT,
                    "exec without a process spec",
                ))
            }
        };
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        c.add_exec(&req.exec_id, stdio, spec).map_err(map_err)?;
        self.inner.events.exec_added(&req.id, &req.exec_id).await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id).map_err(map_err)?;
        if let Some(io) = p.io() {
            io.resize(req.width, req.height)
                .map_err(|e| status(Code::UNKNOWN, e))?;
        }
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id).map_err(map_err)?;
        if req.stdin {
            if let Some(io) = p.io() {
                io.close_stdin();
            }
        }
        Ok(Empty::new())
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let c = self.container(&req.id)?;
        let pids = c.pids().await.map_err(map_err)?;
        let execs: HashMap<u32, String> = c
            .exec_processes()
            .into_iter()
            .map(|p| (p.pid(), p.exec_id.clone()))
            .collect();
        let processes = pids
            .into_iter()
            .map(|pid| {
                let pid = pid as u32;
                let info = execs.get(&pid).and_then(|exec_id| {
                    let details = ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    };
                    Some(Any {
                        type_url: "containerd.runc.v1.ProcessDetails".to_owned(),
                        value: details.write_to_bytes().ok()?,
                        ..Default::default()
                    })
                });
                ProcessInfo {
                    pid,
                    info: info.into(),
                    ..Default::default()
                }
            })
            .collect();
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        let c = self.container(&req.id)?;
        c.pause().await.map_err(map_err)?;
        self.inner.events.paused(&req.id).await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        let c = self.container(&req.id)?;
        c.resume().await.map_err(map_err)?;
        self.inner.events.resumed(&req.id).await;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let c = self.container(&req.id)?;
        let Some(resources) = req.resources.as_ref() else {
            return Ok(Empty::new());
        };
        c.update(&resources.value).await.map_err(map_err)?;
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let c = self.container(&req.id)?;
        let pid = c.init.pid();
        if c.init.phase() == Phase::Stopped || pid == 0 {
            return Err(status(
                Code::NOT_FOUND,
                format!("container {} is not running", req.id),
            ));
        }
        let stats = crate::stats::collect(pid).map_err(|e| status(Code::UNKNOWN, e))?;
        Ok(StatsResponse {
            stats: Some(stats).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = self
            .inner
            .containers()
            .get(&req.id)
            .map(|c| c.init.pid())
            .unwrap_or_default();
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        if self.inner.containers().is_empty() {
            tracing::info!("no containers left: shutting down");
            self.shutdown_now();
        }
        Ok(Empty::new())
    }
}
