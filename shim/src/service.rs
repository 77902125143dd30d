//! The Task service containerd calls (`containerd.task.v2.Task` and `v3`): one per shim,
//! i.e. per pod. Create runs nixenv's preparation (resolve, materialise, pin, rewrite
//! config.json) before `runc create`.

use std::collections::HashMap;
use std::path::PathBuf;
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
use nixenv_core::config::Config;
use nixenv_core::runtime::{self, Decision, ENVIRONMENT_ANNOTATION};
use tokio::task::JoinHandle;

use crate::container::{Container, ContainerError, EnvOverlay, RuntimeContext};
use crate::events::{timestamp, Events};
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

/// A nixenv preparation whose Create was abandoned (cancelled by its client): it runs to the
/// end (other containers may share its paths), then its pin is dropped.
struct Pending {
    handle: JoinHandle<()>,
}

/// The shim's Task service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: RuntimeContext,
    events: Events,
    exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    pending: Mutex<HashMap<String, Pending>>,
}

/// Drops the pin of an abandoned preparation once it finishes.
struct AbandonGuard {
    armed: bool,
    id: String,
    cfg: Option<Config>,
    prepare: Option<JoinHandle<Result<Decision, String>>>,
    inner: Arc<Inner>,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (Some(prepare), Some(cfg)) = (self.prepare.take(), self.cfg.take()) else {
            return;
        };
        let id = self.id.clone();
        tracing::warn!(%id, "create cancelled; preparation continues, then unpins");
        let inner = self.inner.clone();
        let handle = tokio::spawn({
            let id = id.clone();
            let inner = inner.clone();
            async move {
                let _ = prepare.await;
                if let Err(e) = runtime::release(&cfg, &id) {
                    tracing::warn!(%id, error = %e, "release abandoned container");
                }
                inner.pending().remove(&id);
            }
        });
        inner.pending().insert(id, Pending { handle });
    }
}

fn annotated(bundle: &std::path::Path) -> bool {
    let Ok(text) = std::fs::read(bundle.join("config.json")) else {
        return false;
    };
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return false;
    };
    spec.get("annotations")
        .and_then(|a| a.get(ENVIRONMENT_ANNOTATION))
        .is_some()
}

impl Inner {
    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
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
                containers: Mutex::new(HashMap::new()),
                pending: Mutex::new(HashMap::new()),
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

    /// Runs nixenv's preparation of the bundle in a task that outlives a cancelled Create.
    async fn prepare(&self, id: &str, bundle: PathBuf) -> TtrpcResult<(Option<Config>, Decision)> {
        let cfg = match Config::load() {
            Ok(cfg) => cfg,
            Err(e) if annotated(&bundle) => {
                return Err(status(Code::UNKNOWN, format!("nixenv: {e}")));
            }
            Err(e) => {
                tracing::debug!(error = %e, "no usable nixenv config; plain containers only");
                return Ok((None, Decision::PassThrough));
            }
        };
        let task_cfg = cfg.clone();
        let task_id = id.to_owned();
        let prepare = tokio::spawn(async move {
            runtime::prepare_bundle(&task_cfg, &task_id, &bundle)
                .await
                .map_err(|e| e.to_string())
        });
        let mut guard = AbandonGuard {
            armed: true,
            id: id.to_owned(),
            cfg: Some(cfg.clone()),
            prepare: Some(prepare),
            inner: self.inner.clone(),
        };
        let result = match guard.prepare.as_mut() {
            Some(handle) => handle.await,
            None => unreachable!("set above"),
        };
        guard.armed = false;
        match result {
            Ok(Ok(decision)) => Ok((Some(cfg), decision)),
            Ok(Err(message)) => Err(status(Code::UNKNOWN, format!("nixenv: {message}"))),
            Err(join) => Err(status(
                Code::INTERNAL,
                format!("nixenv: preparation failed: {join}"),
            )),
        }
    }

    fn shutdown_now(&self) {
        let pending: Vec<(String, Pending)> = self.inner.pending().drain().collect();
        for (id, p) in pending {
            p.handle.abort();
            if let Ok(cfg) = Config::load() {
                let _ = runtime::release(&cfg, &id);
            }
        }
        self.inner.exit.signal();
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
        let (cfg, decision) = self.prepare(&id, bundle.clone()).await?;
        if let Decision::Rewritten(p) = &decision {
            tracing::info!(%id, reference = %p.reference, paths = p.closure.len(), "environment prepared");
        }
        let mut runtime = self.inner.runtime.clone();
        runtime.default_runc = cfg.as_ref().and_then(|c| c.runc.clone());
        let container = match Container::create(&req, &runtime).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                if let Some(cfg) = &cfg {
                    let _ = runtime::release(cfg, &id);
                }
                tracing::warn!(%id, error = %e, "create failed");
                return Err(map_err(e));
            }
        };
        if let Decision::Rewritten(_) = &decision {
            let after = crate::container::bundle_env(&bundle);
            container.set_env_overlay(EnvOverlay::between(&env_before, &after));
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
        if let Ok(cfg) = Config::load() {
            if let Err(e) = runtime::release(&cfg, &req.id) {
                tracing::warn!(id = %req.id, error = %e, "release");
            }
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
