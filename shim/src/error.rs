//! Why a task method failed, and the shim's only conversion to a ttrpc status.
//!
//! The task logic ([`crate::task`]) returns [`TaskError`]; the ttrpc adapter
//! ([`crate::service`]) converts it with `?`, through `From<TaskError> for ttrpc::Error`.
//! [`TaskError::code`] is the one place that chooses a code. A failed preparation keeps the
//! helper's kind: a missing environment is `NOT_FOUND`, a malformed reference
//! `INVALID_ARGUMENT`, an unreachable catalog or cache `UNAVAILABLE` (containerd passes these
//! three through its CRI to the kubelet), anything else `INTERNAL`; the message is the helper's
//! one line, prefixed with `nixenv: `.

use containerd_shim::protos::ttrpc::{self, Code};

use crate::container::ContainerError;
use crate::helper::{FailureKind, HelperError, Reply};
use crate::io::IoError;
use crate::stats::StatsError;

/// Why a task method failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("container {id} not found")]
    NotFound { id: String },
    #[error("container {id} already exists")]
    AlreadyExists { id: String },
    #[error("container {id} is stopped")]
    Stopped { id: String },
    #[error("cgroup of container {id} does not exist")]
    NoCgroup { id: String },
    #[error("exec spec: {source}")]
    ExecSpec {
        #[source]
        source: serde_json::Error,
    },
    #[error("exec without a process spec")]
    NoExecSpec,
    /// nixenv's preparation failed: the helper's one line, or why it gave none.
    #[error("nixenv: {source}")]
    Prepare {
        #[source]
        source: HelperError,
    },
    #[error("nixenv: unexpected helper reply {reply:?}")]
    UnexpectedReply { reply: Box<Reply> },
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Stats(#[from] StatsError),
}

impl TaskError {
    /// The ttrpc code containerd gets.
    pub fn code(&self) -> Code {
        match self {
            TaskError::NotFound { .. } | TaskError::NoCgroup { .. } => Code::NOT_FOUND,
            TaskError::AlreadyExists { .. } => Code::ALREADY_EXISTS,
            TaskError::Stopped { .. } => Code::FAILED_PRECONDITION,
            TaskError::ExecSpec { .. } | TaskError::NoExecSpec => Code::INVALID_ARGUMENT,
            TaskError::Prepare { source } => match source {
                HelperError::Refused { kind, .. } => match kind {
                    FailureKind::NotFound => Code::NOT_FOUND,
                    FailureKind::Invalid => Code::INVALID_ARGUMENT,
                    FailureKind::Unavailable => Code::UNAVAILABLE,
                    FailureKind::Internal => Code::INTERNAL,
                },
                // The helper gave no answer: what went wrong is not known.
                _ => Code::UNKNOWN,
            },
            TaskError::UnexpectedReply { .. } => Code::INTERNAL,
            TaskError::Container(e) => match e {
                ContainerError::NotFound { .. } | ContainerError::Finished { .. } => {
                    Code::NOT_FOUND
                }
                ContainerError::ExecExists { .. } => Code::ALREADY_EXISTS,
                ContainerError::Phase { .. } => Code::FAILED_PRECONDITION,
                ContainerError::BadRequest { .. } => Code::INVALID_ARGUMENT,
                _ => Code::UNKNOWN,
            },
            TaskError::Io(_) | TaskError::Stats(_) => Code::UNKNOWN,
        }
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::Phase;

    /// The status containerd receives for `e`.
    fn status(e: TaskError) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message),
            other => panic!("not a status: {other:?}"),
        }
    }

    fn refused(kind: FailureKind, error: &str) -> TaskError {
        TaskError::Prepare {
            source: HelperError::Refused {
                kind,
                error: error.into(),
            },
        }
    }

    #[test]
    fn a_missing_environment_is_not_found() {
        let e = refused(
            FailureKind::NotFound,
            "acme/nope: environment acme/nope not found in catalog http://127.0.0.1:1/",
        );
        assert_eq!(
            status(e),
            (
                Code::NOT_FOUND,
                "nixenv: acme/nope: environment acme/nope not found in catalog http://127.0.0.1:1/"
                    .into()
            )
        );
    }

    #[test]
    fn a_malformed_reference_is_an_invalid_argument() {
        let e = refused(
            FailureKind::Invalid,
            "invalid environment reference \"Acme/x y\": bad name",
        );
        assert_eq!(status(e).0, Code::INVALID_ARGUMENT);
        assert_eq!(status(TaskError::NoExecSpec).0, Code::INVALID_ARGUMENT);
        let bad = ContainerError::BadRequest {
            what: "resources",
            message: "x".into(),
        };
        assert_eq!(status(bad.into()).0, Code::INVALID_ARGUMENT);
    }

    #[test]
    fn an_unreachable_cache_is_unavailable() {
        let e = refused(
            FailureKind::Unavailable,
            "acme/echoserver: /nix/store/x-a: substituter http://127.0.0.1:1/: connection refused",
        );
        let (code, message) = status(e);
        assert_eq!(code, Code::UNAVAILABLE);
        assert!(
            message.starts_with("nixenv: acme/echoserver: "),
            "{message}"
        );
    }

    #[test]
    fn an_internal_refusal_is_internal_and_no_answer_is_unknown() {
        assert_eq!(
            status(refused(FailureKind::Internal, "store: disk full")).0,
            Code::INTERNAL
        );
        let lost = TaskError::Prepare {
            source: HelperError::Lost {
                call: crate::helper::Call {
                    id: "c1".into(),
                    stage: "shim-prepare",
                    helper: "/bin/nixenv-hook".into(),
                },
            },
        };
        assert_eq!(
            status(lost),
            (
                Code::UNKNOWN,
                "nixenv: c1: /bin/nixenv-hook shim-prepare: the shim lost track of it".into()
            )
        );
        let reply = Box::new(Reply::Released { runc: None });
        assert_eq!(
            status(TaskError::UnexpectedReply { reply }).0,
            Code::INTERNAL
        );
    }

    #[test]
    fn task_state_errors_have_their_codes() {
        let id = || "c1".to_owned();
        assert_eq!(
            status(TaskError::NotFound { id: id() }),
            (Code::NOT_FOUND, "container c1 not found".into())
        );
        assert_eq!(
            status(TaskError::NoCgroup { id: id() }),
            (
                Code::NOT_FOUND,
                "cgroup of container c1 does not exist".into()
            )
        );
        assert_eq!(
            status(TaskError::AlreadyExists { id: id() }),
            (Code::ALREADY_EXISTS, "container c1 already exists".into())
        );
        assert_eq!(
            status(TaskError::Stopped { id: id() }),
            (Code::FAILED_PRECONDITION, "container c1 is stopped".into())
        );
        let phase = ContainerError::Phase {
            id: id(),
            phase: Phase::Running,
            op: "delete",
        };
        assert_eq!(status(phase.into()).0, Code::FAILED_PRECONDITION);
        assert_eq!(
            status(ContainerError::Finished { id: id() }.into()).0,
            Code::NOT_FOUND
        );
        assert_eq!(
            status(ContainerError::ExecExists { id: id() }.into()).0,
            Code::ALREADY_EXISTS
        );
        let runc = ContainerError::Runc {
            op: "start",
            id: id(),
            message: "exit status 1".into(),
        };
        assert_eq!(
            status(runc.into()),
            (Code::UNKNOWN, "runc start c1: exit status 1".into())
        );
    }
}
