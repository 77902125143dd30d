//! The Task service containerd calls (`containerd.task.v2.Task` and `v3`): a thin adapter over
//! the task logic ([`crate::task::Tasks`]). Each method turns the request into domain values,
//! forwards, and turns the answer into the response; errors become ttrpc statuses in one place,
//! [`crate::error`]. Nothing here decides anything.

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
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};

use crate::container::{ContainerError, CreateTask};
use crate::error::TaskError;
use crate::events::timestamp;
use crate::helper::{Helper, Prepare};
use crate::io::StdioPaths;
use crate::reaper::{Reaped, Wait};
use crate::runc::RuntimeOptions;
use crate::task::Tasks;

/// The shim's Task service: the task logic of a serving shim behind ttrpc.
pub type Service = Adapter<Helper<Reaped>, Reaped>;

/// The ttrpc `Task` service over [`Tasks`].
pub struct Adapter<H, W> {
    tasks: Tasks<H, W>,
}

impl<H, W> Clone for Adapter<H, W> {
    fn clone(&self) -> Self {
        Adapter {
            tasks: self.tasks.clone(),
        }
    }
}

impl<H: Prepare, W: Wait + Clone> Adapter<H, W> {
    /// Serves `tasks`.
    pub fn new(tasks: Tasks<H, W>) -> Self {
        Adapter { tasks }
    }

    /// Waits for stopped preparations after Shutdown ([`Tasks::drain`]).
    pub async fn drain(&self) {
        self.tasks.drain().await;
    }
}

/// A Create request as the task logic takes it.
fn create_task(req: &CreateTaskRequest) -> Result<CreateTask, TaskError> {
    let options = RuntimeOptions::from_any(req.options.as_ref()).map_err(ContainerError::from)?;
    Ok(CreateTask {
        id: req.id.clone(),
        bundle: req.bundle.clone().into(),
        rootfs: req.rootfs.clone(),
        stdio: StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        },
        options,
    })
}

#[async_trait]
impl<H: Prepare, W: Wait + Clone> Task for Adapter<H, W> {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let pid = self.tasks.create(create_task(&req)?).await?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = self.tasks.start(&req.id, &req.exec_id).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let (p, bundle) = self.tasks.state(&req.id, &req.exec_id)?;
        Ok(p.state_response(&bundle.to_string_lossy()))
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let exited = self.tasks.wait(&req.id, &req.exec_id).await?;
        Ok(WaitResponse {
            exit_status: exited.status,
            exited_at: Some(timestamp(exited.at)).into(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        self.tasks
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let deleted = self.tasks.delete(&req.id, &req.exec_id).await?;
        Ok(DeleteResponse {
            pid: deleted.pid,
            exit_status: deleted.status,
            exited_at: deleted.at.map(timestamp).into(),
            ..Default::default()
        })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let spec = req.spec.as_ref().map(|any| any.value.as_slice());
        self.tasks.exec(&req.id, &req.exec_id, stdio, spec).await?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.tasks
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        self.tasks.close_io(&req.id, &req.exec_id, req.stdin)?;
        Ok(Empty::new())
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let processes = self
            .tasks
            .pids(&req.id)
            .await?
            .into_iter()
            .map(|(pid, exec_id)| {
                let info = exec_id.and_then(|exec_id| {
                    let details = ProcessDetails {
                        exec_id,
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
        self.tasks.pause(&req.id).await?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.tasks.resume(&req.id).await?;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let resources = req.resources.as_ref().map(|any| any.value.as_slice());
        self.tasks.update(&req.id, resources).await?;
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let stats = self.tasks.stats(&req.id)?;
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
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.tasks.task_pid(&req.id),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        self.tasks.shutdown();
        Ok(Empty::new())
    }
}
