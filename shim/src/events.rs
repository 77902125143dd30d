//! Task events to containerd (`/tasks/create`, `/tasks/exit`, …) over its TTRPC events
//! service, queued in order by the crate's publisher.

use std::time::SystemTime;

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Context;

use crate::io::StdioPaths;

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// Publishes task events for one namespace.
pub struct Events {
    publisher: Option<RemotePublisher>,
    namespace: String,
}

impl Events {
    /// Events through `publisher` (none: events are only logged).
    pub fn new(publisher: Option<RemotePublisher>, namespace: &str) -> Events {
        Events {
            publisher,
            namespace: namespace.to_owned(),
        }
    }

    async fn send(&self, topic: &str, event: Box<dyn MessageDyn>) {
        tracing::debug!(topic, "event");
        let Some(p) = &self.publisher else { return };
        if let Err(e) = p
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            tracing::warn!(topic, error = %e, "publish event");
        }
    }

    pub async fn create(
        &self,
        id: &str,
        bundle: &str,
        rootfs: &[containerd_shim::protos::api::Mount],
        io: &StdioPaths,
        pid: u32,
    ) {
        let ev = TaskCreate {
            container_id: id.to_owned(),
            bundle: bundle.to_owned(),
            rootfs: rootfs.to_vec(),
            io: Some(TaskIO {
                stdin: io.stdin.clone(),
                stdout: io.stdout.clone(),
                stderr: io.stderr.clone(),
                terminal: io.terminal,
                ..Default::default()
            })
            .into(),
            pid,
            ..Default::default()
        };
        self.send(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev))
            .await;
    }

    pub async fn start(&self, id: &str, pid: u32) {
        let ev = TaskStart {
            container_id: id.to_owned(),
            pid,
            ..Default::default()
        };
        self.send(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
            .await;
    }

    /// `exec_id` is the container id for the init process.
    pub async fn exit(&self, id: &str, exec_id: &str, pid: u32, status: u32, at: SystemTime) {
        let ev = TaskExit {
            container_id: id.to_owned(),
            id: exec_id.to_owned(),
            pid,
            exit_status: status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        };
        self.send(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev)).await;
    }

    pub async fn delete(&self, id: &str, pid: u32, status: u32, at: SystemTime) {
        let ev = TaskDelete {
            container_id: id.to_owned(),
            id: id.to_owned(),
            pid,
            exit_status: status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        };
        self.send(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
    }

    pub async fn exec_added(&self, id: &str, exec_id: &str) {
        let ev = TaskExecAdded {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        self.send(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
            .await;
    }

    pub async fn exec_started(&self, id: &str, exec_id: &str, pid: u32) {
        let ev = TaskExecStarted {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            pid,
            ..Default::default()
        };
        self.send(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
            .await;
    }

    pub async fn oom(&self, id: &str) {
        let ev = TaskOOM {
            container_id: id.to_owned(),
            ..Default::default()
        };
        self.send(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev)).await;
    }

    pub async fn paused(&self, id: &str) {
        let ev = TaskPaused {
            container_id: id.to_owned(),
            ..Default::default()
        };
        self.send(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
            .await;
    }

    pub async fn resumed(&self, id: &str) {
        let ev = TaskResumed {
            container_id: id.to_owned(),
            ..Default::default()
        };
        self.send(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
            .await;
    }
}
