//! `nixenv-hook shim-prepare` and `nixenv-hook shim-release`: the process that does the
//! containerd shim's nixenv work.
//!
//! `containerd-shim-nixenv-v2` runs for the whole life of its pod, one per pod, so it links only
//! the task service and keeps its memory small. Resolving, downloading, pinning and rewriting
//! run here instead, in one short-lived process per Create, next to the shim
//! (`shim/src/helper.rs` is the other side):
//!
//! ```text
//! nixenv-hook shim-prepare --id ID --bundle DIR [--namespace NS] [--runtime-root DIR]
//! nixenv-hook shim-release --id ID
//! nixenv-hook shim-config --id ID       (the configured runc, for the shim's `delete` action)
//! ```
//!
//! Standard output is exactly one JSON [`Reply`] line, also on failure; logs go to standard
//! error, which the shim points at its own log. The exit code is 0 when the reply is not
//! [`Reply::Failed`], 1 when it is, and 2 for a malformed command line. The stage names, the
//! flags and the reply are the `nixenv-shim-protocol` crate's, which the shim links too. A
//! failure carries its [`FailureKind`] ([`Classify`], from `RuntimeError::kind`); a rewrite
//! carries the environment changes it made.
//!
//! The core is a [`Node`] (`prepare_bundle`, `release`, `runc`), a type parameter so the
//! stages are testable without a node; `nixenv-hook` runs them on a [`crate::node::RealNode`]
//! that abandons a preparation on a signal ([`crate::node::RealNode::abandon_on_signal`]).
//!
//! On SIGTERM or SIGINT (the shim shutting down, or dying: the shim sets `PR_SET_PDEATHSIG`),
//! a preparation is abandoned the way a failed one is: its pin is removed and nothing
//! half-installed stays in the store. Paths it already committed stay, for the next attempt.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use nixenv_core::failure;
use nixenv_core::runtime::{self, Decision, Owner, OwnerKind};
pub use nixenv_shim_protocol::{
    EnvChange, FailureKind, Reply, BUNDLE_FLAG, CONFIG_STAGE, ID_FLAG, NAMESPACE_FLAG,
    PREPARE_STAGE, RELEASE_STAGE, RUNTIME_ROOT_FLAG,
};

use crate::node::{Node, NodeError};

/// A preparation the shim asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareRequest {
    /// The container id.
    pub id: String,
    /// Its OCI bundle (config.json is rewritten in place).
    pub bundle: PathBuf,
    /// The containerd namespace, recorded in the pin.
    pub namespace: Option<String>,
    /// runc's state root for the container, recorded in the pin (gc asks runc there whether
    /// the container still exists).
    pub runtime_root: Option<PathBuf>,
}

/// A malformed command line.
#[derive(Debug, thiserror::Error)]
pub enum ShimStageError {
    #[error("{stage}: unknown argument {arg:?} (expected --id, --bundle, --namespace or --runtime-root)")]
    UnknownArgument { stage: &'static str, arg: String },
    #[error("{stage}: {flag} needs a value")]
    MissingValue {
        stage: &'static str,
        flag: &'static str,
    },
    #[error("{stage}: {flag} is required")]
    Required {
        stage: &'static str,
        flag: &'static str,
    },
}

fn flags(
    stage: &'static str,
    args: &[OsString],
    allowed: &[&'static str],
) -> Result<Vec<(&'static str, OsString)>, ShimStageError> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let text = arg.to_string_lossy();
        let Some(flag) = allowed.iter().find(|f| **f == text) else {
            return Err(ShimStageError::UnknownArgument {
                stage,
                arg: text.into_owned(),
            });
        };
        let value = it
            .next()
            .ok_or(ShimStageError::MissingValue { stage, flag })?;
        out.push((*flag, value.clone()));
    }
    Ok(out)
}

fn take(flags: &[(&'static str, OsString)], flag: &str) -> Option<OsString> {
    flags
        .iter()
        .rev()
        .find(|(f, _)| *f == flag)
        .map(|(_, v)| v.clone())
}

/// Parses `shim-prepare`'s arguments (after the stage name).
pub fn parse_prepare(args: &[OsString]) -> Result<PrepareRequest, ShimStageError> {
    let stage = PREPARE_STAGE;
    let f = flags(
        stage,
        args,
        &[ID_FLAG, BUNDLE_FLAG, NAMESPACE_FLAG, RUNTIME_ROOT_FLAG],
    )?;
    let required =
        |flag: &'static str| take(&f, flag).ok_or(ShimStageError::Required { stage, flag });
    Ok(PrepareRequest {
        id: required(ID_FLAG)?.to_string_lossy().into_owned(),
        bundle: required(BUNDLE_FLAG)?.into(),
        namespace: take(&f, NAMESPACE_FLAG).map(|v| v.to_string_lossy().into_owned()),
        runtime_root: take(&f, RUNTIME_ROOT_FLAG).map(PathBuf::from),
    })
}

/// Parses `shim-release`'s and `shim-config`'s arguments (after the stage name): the
/// container id.
pub fn parse_id(stage: &'static str, args: &[OsString]) -> Result<String, ShimStageError> {
    let f = flags(stage, args, &[ID_FLAG])?;
    take(&f, ID_FLAG)
        .map(|v| v.to_string_lossy().into_owned())
        .ok_or(ShimStageError::Required {
            stage,
            flag: ID_FLAG,
        })
}

/// What kind of failure an error is, sent beside its message.
pub trait Classify {
    /// The kind.
    fn kind(&self) -> FailureKind;
}

impl Classify for NodeError {
    fn kind(&self) -> FailureKind {
        match self {
            NodeError::Runtime(e) => match e.kind() {
                failure::FailureKind::Unavailable => FailureKind::Unavailable,
                failure::FailureKind::NotFound => FailureKind::NotFound,
                failure::FailureKind::Invalid => FailureKind::Invalid,
                failure::FailureKind::Internal => FailureKind::Internal,
            },
            // Abandoned on SIGTERM: the shim is going away and reads no reply.
            NodeError::Cancelled { .. }
            | NodeError::Config(_)
            | NodeError::Tokio(_)
            | NodeError::Signal { .. } => FailureKind::Internal,
        }
    }
}

/// The reply for a failure.
fn failed<E: std::fmt::Display + Classify>(e: &E) -> Reply {
    Reply::Failed {
        kind: e.kind(),
        error: e.to_string(),
    }
}

/// Runs a preparation and says how it went.
pub fn prepare<N: Node>(node: &mut N, req: &PrepareRequest) -> Reply
where
    N::Error: Classify,
{
    match prepare_bundle(node, req) {
        Ok(reply) => reply,
        Err(e) => {
            tracing::warn!(container = %req.id, kind = ?e.kind(), error = %e, "preparation failed");
            failed(&e)
        }
    }
}

/// Decides, resolves, materialises, pins and rewrites. Without a usable configuration, a
/// bundle nixenv would not touch passes through (the shim then runs plain containers only).
fn prepare_bundle<N: Node>(node: &mut N, req: &PrepareRequest) -> Result<Reply, N::Error> {
    let runc = match node.runc() {
        Ok(runc) => runc,
        Err(e) if runtime::bundle_wants(&req.bundle).is_none() => {
            tracing::debug!(error = %e, "no usable nixenv config; plain containers only");
            return Ok(Reply::PassThrough { runc: None });
        }
        Err(e) => return Err(e),
    };
    let owner = Owner {
        kind: OwnerKind::Shim,
        runtime_root: req.runtime_root.clone(),
        bundle: None, // the core records the bundle
        namespace: req.namespace.clone(),
    };
    Ok(match node.prepare_bundle(&req.id, &req.bundle, &owner)? {
        Decision::PassThrough => Reply::PassThrough { runc },
        Decision::Rewritten(p) => {
            tracing::info!(container = %req.id, reference = %p.reference, paths = p.closure.len(), "bundle prepared");
            Reply::Rewritten {
                reference: p.reference,
                generation: p.generation,
                paths: p.closure.len(),
                runc,
                env: crate::exec_env::protocol_changes(p.env),
            }
        }
    })
}

/// Drops a pin and says how it went.
pub fn release<N: Node>(node: &mut N, id: &str) -> Reply
where
    N::Error: Classify,
{
    match node.release(id).and_then(|()| node.runc()) {
        Ok(runc) => Reply::Released { runc },
        Err(e) => failed(&e),
    }
}

/// Says which runc the configuration names.
pub fn config<N: Node>(node: &mut N) -> Reply
where
    N::Error: Classify,
{
    match node.runc() {
        Ok(runc) => Reply::Configured { runc },
        Err(e) => failed(&e),
    }
}

/// Runs stage `stage` with `args` (after the stage name): writes the reply line to `out` and
/// returns the exit code. A preparation whose reply cannot be written (the shim is gone) is
/// undone: nobody would run the container or drop its pin.
pub fn main<N: Node, W: Write>(stage: &str, args: &[OsString], node: &mut N, out: &mut W) -> i32
where
    N::Error: Classify,
{
    let mut prepared = None;
    let parsed = match stage {
        PREPARE_STAGE => parse_prepare(args).map(|req| {
            let reply = prepare(node, &req);
            if matches!(reply, Reply::Rewritten { .. }) {
                prepared = Some(req.id);
            }
            reply
        }),
        CONFIG_STAGE => parse_id(CONFIG_STAGE, args).map(|_| config(node)),
        _ => parse_id(RELEASE_STAGE, args).map(|id| release(node, &id)),
    };
    let (reply, code) = match parsed {
        Ok(reply @ Reply::Failed { .. }) => (reply, 1),
        Ok(reply) => (reply, 0),
        // The shim's own mistake: internal.
        Err(e) => (
            Reply::Failed {
                kind: FailureKind::Internal,
                error: e.to_string(),
            },
            2,
        ),
    };
    let mut line = serde_json::to_vec(&reply).expect("a reply serialises");
    line.push(b'\n');
    if out.write_all(&line).and_then(|()| out.flush()).is_err() {
        if let Some(id) = prepared {
            if let Err(e) = node.release(&id) {
                tracing::warn!(container = %id, error = %e, "cannot drop the pin of an unreported preparation");
            }
        }
        return code.max(1);
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::fake::FakeNode;
    use nixenv_core::runtime::Prepared;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    /// The fake's errors are text: internal.
    impl Classify for String {
        fn kind(&self) -> FailureKind {
            FailureKind::Internal
        }
    }

    /// A node configured with runc `/opt/runc` that prepares `prepared` (`None`: passes
    /// through).
    fn fake_node(prepared: Option<Prepared>) -> FakeNode {
        FakeNode {
            prepared,
            runc: Some("/opt/runc".into()),
            ..FakeNode::default()
        }
    }

    /// Standard output of a shim that is gone.
    struct Gone;

    impl Write for Gone {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_preparation_nobody_hears_of_is_undone() {
        let mut node = fake_node(Some(Prepared {
            reference: "acme/echoserver".into(),
            generation: None,
            closure: vec!["/nix/store/a".into()],
            env: Vec::new(),
        }));
        let args = os(&["--id", "c1", "--bundle", "/b"]);
        assert_eq!(main(PREPARE_STAGE, &args, &mut node, &mut Gone), 1);
        assert_eq!(node.calls, ["prepare c1 /b None", "release c1"]);
        let mut out = Vec::new();
        assert_eq!(
            main(CONFIG_STAGE, &os(&["--id", "c1"]), &mut node, &mut out),
            0
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"result\":\"configured\",\"runc\":\"/opt/runc\"}\n"
        );
    }

    #[test]
    fn prepare_arguments_parse_and_unknown_ones_are_refused() {
        let req = parse_prepare(&os(&[
            "--id",
            "c1",
            "--bundle",
            "/b",
            "--namespace",
            "k8s.io",
            "--runtime-root",
            "/run/containerd/runc/k8s.io",
        ]))
        .unwrap();
        assert_eq!(req.id, "c1");
        assert_eq!(req.bundle, PathBuf::from("/b"));
        assert_eq!(req.namespace.as_deref(), Some("k8s.io"));
        assert_eq!(
            req.runtime_root,
            Some(PathBuf::from("/run/containerd/runc/k8s.io"))
        );
        let e = parse_prepare(&os(&["--id", "c1"])).unwrap_err();
        assert_eq!(e.to_string(), "shim-prepare: --bundle is required");
        let e = parse_prepare(&os(&["--id", "c1", "--bundle"])).unwrap_err();
        assert_eq!(e.to_string(), "shim-prepare: --bundle needs a value");
        let e = parse_id(RELEASE_STAGE, &os(&["--id", "c1", "--force"])).unwrap_err();
        assert!(
            e.to_string().contains("unknown argument \"--force\""),
            "{e}"
        );
        assert_eq!(parse_id(RELEASE_STAGE, &os(&["--id", "c9"])).unwrap(), "c9");
    }

    #[test]
    fn replies_carry_the_decision_the_runc_and_the_error() {
        let req = parse_prepare(&os(&["--id", "c1", "--bundle", "/b"])).unwrap();
        let mut node = fake_node(Some(Prepared {
            reference: "acme/echoserver".into(),
            generation: Some(2),
            closure: vec!["/nix/store/a".into(), "/nix/store/b".into()],
            env: Vec::new(),
        }));
        let reply = prepare(&mut node, &req);
        assert_eq!(
            reply,
            Reply::Rewritten {
                reference: "acme/echoserver".into(),
                generation: Some(2),
                paths: 2,
                runc: Some("/opt/runc".into()),
                env: Vec::new(),
            }
        );
        assert_eq!(node.calls, ["prepare c1 /b None"]);
        assert_eq!(
            node.owners,
            [Owner {
                kind: OwnerKind::Shim,
                runtime_root: req.runtime_root.clone(),
                bundle: None,
                namespace: req.namespace.clone(),
            }]
        );
        // The wire form the shim parses.
        let line = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            line,
            r#"{"result":"rewritten","reference":"acme/echoserver","generation":2,"paths":2,"runc":"/opt/runc"}"#
        );
        let mut failing = FakeNode {
            fail: Some("acme/nope: no such environment in catalog".into()),
            ..FakeNode::default()
        };
        assert_eq!(
            prepare(&mut failing, &req),
            Reply::Failed {
                kind: FailureKind::Internal,
                error: "acme/nope: no such environment in catalog".into()
            }
        );
        assert_eq!(
            release(&mut FakeNode::default(), "c1"),
            Reply::Released { runc: None }
        );
    }

    #[test]
    fn a_malformed_command_line_is_exit_code_2_and_touches_nothing() {
        let mut node = FakeNode::default();
        let mut out = Vec::new();
        let bad = os(&["--bundle", "/b"]);
        assert_eq!(main(PREPARE_STAGE, &bad, &mut node, &mut out), 2);
        assert_eq!(main(RELEASE_STAGE, &os(&[]), &mut node, &mut out), 2);
        assert!(node.calls.is_empty());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"result\":\"failed\",\"error\":\"shim-prepare: --id is required\"}\n\
             {\"result\":\"failed\",\"error\":\"shim-release: --id is required\"}\n"
        );
        let mut out = Vec::new();
        assert_eq!(
            main(RELEASE_STAGE, &os(&["--id", "c1"]), &mut node, &mut out),
            0
        );
        assert_eq!(node.calls, ["release c1"]);
    }

    #[test]
    fn a_runtime_failure_is_sent_with_its_kind() {
        let bad = "Acme/echo server"
            .parse::<nixenv_core::environment::Reference>()
            .unwrap_err();
        let e = NodeError::Runtime(nixenv_core::runtime::RuntimeError::Reference(bad));
        let reply = failed(&e);
        assert_eq!(
            reply,
            Reply::Failed {
                kind: FailureKind::Invalid,
                error: e.to_string(),
            }
        );
        let line = serde_json::to_string(&reply).unwrap();
        assert!(
            line.starts_with(r#"{"result":"failed","kind":"invalid","error":"invalid environment reference \"Acme/echo server\""#),
            "{line}"
        );
        let cancelled = NodeError::Cancelled {
            container: "c1".into(),
            signal: "SIGTERM",
        };
        assert_eq!(cancelled.kind(), FailureKind::Internal);
    }

    #[test]
    fn a_rewrite_reports_the_env_it_changed() {
        let req = parse_prepare(&os(&["--id", "c1", "--bundle", "/b"])).unwrap();
        let mut node = fake_node(Some(Prepared {
            reference: "acme/echoserver".into(),
            generation: None,
            closure: vec!["/nix/store/a".into()],
            env: vec![nixenv_core::spec::EnvChange {
                name: "PATH".into(),
                before: None,
                after: "/nix/store/a/bin".into(),
            }],
        }));
        let Reply::Rewritten { env, .. } = prepare(&mut node, &req) else {
            panic!("not rewritten")
        };
        assert_eq!(
            env,
            vec![EnvChange {
                name: "PATH".into(),
                before: None,
                after: "/nix/store/a/bin".into(),
            }]
        );
    }
}
