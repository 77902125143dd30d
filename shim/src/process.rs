//! One process of a container (its init or an exec): status, pid, exit, stdio.

use std::sync::Mutex;
use std::time::SystemTime;

use containerd_shim::protos::api::StateResponse;
use containerd_shim::protos::protobuf::EnumOrUnknown;
use containerd_shim::protos::types::task::Status;
use tokio::sync::watch;

use crate::events::timestamp;
use crate::io::{ProcessIo, StdioPaths};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exited {
    pub status: u32,
    pub at: SystemTime,
}

/// Lifecycle of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Created,
    Running,
    Paused,
    Stopped,
}

struct State {
    phase: Phase,
    pid: u32,
}

/// A container's init process or one of its execs.
pub struct Process {
    /// The container id.
    pub container_id: String,
    /// Empty for the init process.
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// For execs: the OCI process spec, as JSON.
    pub spec: Option<serde_json::Value>,
    state: Mutex<State>,
    exited: watch::Sender<Option<Exited>>,
    pub io: Mutex<Option<std::sync::Arc<ProcessIo>>>,
}

impl Process {
    pub fn new(
        container_id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        spec: Option<serde_json::Value>,
    ) -> Process {
        Process {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stdio,
            spec,
            state: Mutex::new(State {
                phase: Phase::Created,
                pid: 0,
            }),
            exited: watch::channel(None).0,
            io: Mutex::new(None),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pid(&self) -> u32 {
        self.state().pid
    }

    pub fn set_pid(&self, pid: u32) {
        self.state().pid = pid;
    }

    pub fn phase(&self) -> Phase {
        self.state().phase
    }

    /// Moves to `phase` unless the process already stopped.
    pub fn set_phase(&self, phase: Phase) {
        let mut s = self.state();
        if s.phase != Phase::Stopped {
            s.phase = phase;
        }
    }

    pub fn exit(&self) -> Option<Exited> {
        *self.exited.borrow()
    }

    /// Records the exit (once) and wakes Wait.
    pub fn set_exited(&self, exited: Exited) {
        self.state().phase = Phase::Stopped;
        self.exited.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(exited);
                true
            } else {
                false
            }
        });
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> Exited {
        let mut rx = self.exited.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    pub fn io(&self) -> Option<std::sync::Arc<ProcessIo>> {
        self.io.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_io(&self, io: ProcessIo) {
        *self.io.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::sync::Arc::new(io));
    }

    /// The State response for this process.
    pub fn state_response(&self, bundle: &str) -> StateResponse {
        let (phase, pid) = {
            let s = self.state();
            (s.phase, s.pid)
        };
        let status = match phase {
            Phase::Created => Status::CREATED,
            Phase::Running => Status::RUNNING,
            Phase::Paused => Status::PAUSED,
            Phase::Stopped => Status::STOPPED,
        };
        let exit = self.exit();
        StateResponse {
            id: if self.exec_id.is_empty() {
                self.container_id.clone()
            } else {
                self.exec_id.clone()
            },
            bundle: bundle.to_owned(),
            pid,
            status: EnumOrUnknown::new(status),
            stdin: self.stdio.stdin.clone(),
            stdout: self.stdio.stdout.clone(),
            stderr: self.stdio.stderr.clone(),
            terminal: self.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or_default(),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_returns_the_first_exit() {
        let p = std::sync::Arc::new(Process::new("c", "", StdioPaths::default(), None));
        let w = tokio::spawn({
            let p = p.clone();
            async move { p.wait().await }
        });
        p.set_phase(Phase::Running);
        let at = SystemTime::now();
        p.set_exited(Exited { status: 3, at });
        p.set_exited(Exited { status: 9, at });
        assert_eq!(w.await.unwrap().status, 3);
        assert_eq!(p.phase(), Phase::Stopped);
        p.set_phase(Phase::Running);
        assert_eq!(p.phase(), Phase::Stopped);
        assert_eq!(p.state_response("/b").exit_status, 3);
    }
}
