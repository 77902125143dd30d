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
//! [`Reply::Failed`], 1 when it is, and 2 for a malformed command line.
//!
//! On SIGTERM or SIGINT (the shim shutting down, or dying: the shim sets `PR_SET_PDEATHSIG`),
//! a preparation is abandoned the way a failed one is: its pin is removed and nothing
//! half-installed stays in the store. Paths it already committed stay, for the next attempt.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use nixenv_core::runtime::Decision;
use serde::{Deserialize, Serialize};

/// The stage that prepares a bundle.
pub const PREPARE_STAGE: &str = "shim-prepare";
/// The stage that drops a container's pin.
pub const RELEASE_STAGE: &str = "shim-release";
/// The stage that says which runc the configuration names.
pub const CONFIG_STAGE: &str = "shim-config";

/// The one line written on standard output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Reply {
    /// Not nixenv's container: config.json is untouched.
    PassThrough {
        /// The configured runc (`runc` in the config), if any.
        runc: Option<PathBuf>,
    },
    /// config.json now mounts the closure, which is pinned for the container.
    Rewritten {
        /// The reference as annotated.
        reference: String,
        /// The catalog generation it resolved to, if any.
        generation: Option<u64>,
        /// How many store paths the closure has.
        paths: usize,
        /// The configured runc, if any.
        runc: Option<PathBuf>,
    },
    /// The container's pin is gone (or never was).
    Released {
        /// The configured runc, if any.
        runc: Option<PathBuf>,
    },
    /// The configuration names this runc (or none).
    Configured {
        /// The configured runc, if any.
        runc: Option<PathBuf>,
    },
    /// Nothing was done; `error` is nixenv's one-line error (without the `nixenv: ` prefix).
    Failed {
        /// What went wrong, naming the input.
        error: String,
    },
}

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

/// What the stages need from the core, as a trait so they are testable without a node.
pub trait ShimCore {
    /// Error type; its `Display` is the one-line cause.
    type Error: std::fmt::Display;
    /// Decides, resolves, materialises, pins and rewrites; returns the decision and the
    /// configured runc. Without a usable configuration, a bundle nixenv would not touch passes
    /// through (the shim then runs plain containers only).
    fn prepare(&mut self, req: &PrepareRequest)
        -> Result<(Decision, Option<PathBuf>), Self::Error>;
    /// Drops the pin of container `id`; returns the configured runc.
    fn release(&mut self, id: &str) -> Result<Option<PathBuf>, Self::Error>;
    /// The configured runc.
    fn configured_runc(&mut self) -> Result<Option<PathBuf>, Self::Error>;
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
        &["--id", "--bundle", "--namespace", "--runtime-root"],
    )?;
    let required =
        |flag: &'static str| take(&f, flag).ok_or(ShimStageError::Required { stage, flag });
    Ok(PrepareRequest {
        id: required("--id")?.to_string_lossy().into_owned(),
        bundle: required("--bundle")?.into(),
        namespace: take(&f, "--namespace").map(|v| v.to_string_lossy().into_owned()),
        runtime_root: take(&f, "--runtime-root").map(PathBuf::from),
    })
}

/// Parses `shim-release`'s and `shim-config`'s arguments (after the stage name): the
/// container id.
pub fn parse_id(stage: &'static str, args: &[OsString]) -> Result<String, ShimStageError> {
    let f = flags(stage, args, &["--id"])?;
    take(&f, "--id")
        .map(|v| v.to_string_lossy().into_owned())
        .ok_or(ShimStageError::Required {
            stage,
            flag: "--id",
        })
}

/// Runs a preparation and says how it went.
pub fn prepare<C: ShimCore>(core: &mut C, req: &PrepareRequest) -> Reply {
    match core.prepare(req) {
        Ok((Decision::PassThrough, runc)) => Reply::PassThrough { runc },
        Ok((Decision::Rewritten(p), runc)) => {
            tracing::info!(container = %req.id, reference = %p.reference, paths = p.closure.len(), "bundle prepared");
            Reply::Rewritten {
                reference: p.reference,
                generation: p.generation,
                paths: p.closure.len(),
                runc,
            }
        }
        Err(e) => Reply::Failed {
            error: e.to_string(),
        },
    }
}

/// Drops a pin and says how it went.
pub fn release<C: ShimCore>(core: &mut C, id: &str) -> Reply {
    match core.release(id) {
        Ok(runc) => Reply::Released { runc },
        Err(e) => Reply::Failed {
            error: e.to_string(),
        },
    }
}

/// Says which runc the configuration names.
pub fn config<C: ShimCore>(core: &mut C) -> Reply {
    match core.configured_runc() {
        Ok(runc) => Reply::Configured { runc },
        Err(e) => Reply::Failed {
            error: e.to_string(),
        },
    }
}

/// Runs stage `stage` with `args` (after the stage name): writes the reply line to `out` and
/// returns the exit code. A preparation whose reply cannot be written (the shim is gone) is
/// undone: nobody would run the container or drop its pin.
pub fn main<C: ShimCore, W: Write>(
    stage: &str,
    args: &[OsString],
    core: &mut C,
    out: &mut W,
) -> i32 {
    let mut prepared = None;
    let parsed = match stage {
        PREPARE_STAGE => parse_prepare(args).map(|req| {
            let reply = prepare(core, &req);
            if matches!(reply, Reply::Rewritten { .. }) {
                prepared = Some(req.id);
            }
            reply
        }),
        CONFIG_STAGE => parse_id(CONFIG_STAGE, args).map(|_| config(core)),
        _ => parse_id(RELEASE_STAGE, args).map(|id| release(core, &id)),
    };
    let (reply, code) = match parsed {
        Ok(reply @ Reply::Failed { .. }) => (reply, 1),
        Ok(reply) => (reply, 0),
        Err(e) => (
            Reply::Failed {
                error: e.to_string(),
            },
            2,
        ),
    };
    let mut line = serde_json::to_vec(&reply).expect("a reply serialises");
    line.push(b'\n');
    if out.write_all(&line).and_then(|()| out.flush()).is_err() {
        if let Some(id) = prepared {
            if let Err(e) = core.release(&id) {
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
    use nixenv_core::runtime::Prepared;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[derive(Default)]
    struct Fake {
        decision: Option<Decision>,
        fail: Option<String>,
        asked: Vec<PrepareRequest>,
        released: Vec<String>,
    }

    impl ShimCore for Fake {
        type Error = String;
        fn prepare(&mut self, req: &PrepareRequest) -> Result<(Decision, Option<PathBuf>), String> {
            self.asked.push(req.clone());
            match &self.fail {
                Some(e) => Err(e.clone()),
                None => Ok((
                    self.decision.clone().unwrap_or(Decision::PassThrough),
                    Some("/opt/runc".into()),
                )),
            }
        }
        fn release(&mut self, id: &str) -> Result<Option<PathBuf>, String> {
            self.released.push(id.to_owned());
            self.fail.clone().map_or(Ok(None), Err)
        }
        fn configured_runc(&mut self) -> Result<Option<PathBuf>, String> {
            Ok(Some("/opt/runc".into()))
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
        let mut core = Fake {
            decision: Some(Decision::Rewritten(Prepared {
                reference: "acme/echoserver".into(),
                generation: None,
                closure: vec!["/nix/store/a".into()],
                env: Vec::new(),
            })),
            ..Fake::default()
        };
        let args = os(&["--id", "c1", "--bundle", "/b"]);
        assert_eq!(main(PREPARE_STAGE, &args, &mut core, &mut Gone), 1);
        assert_eq!(core.released, vec!["c1".to_owned()]);
        let mut out = Vec::new();
        assert_eq!(
            main(CONFIG_STAGE, &os(&["--id", "c1"]), &mut core, &mut out),
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
        let mut core = Fake {
            decision: Some(Decision::Rewritten(Prepared {
                reference: "acme/echoserver".into(),
                generation: Some(2),
                closure: vec!["/nix/store/a".into(), "/nix/store/b".into()],
                env: Vec::new(),
            })),
            ..Fake::default()
        };
        let reply = prepare(&mut core, &req);
        assert_eq!(
            reply,
            Reply::Rewritten {
                reference: "acme/echoserver".into(),
                generation: Some(2),
                paths: 2,
                runc: Some("/opt/runc".into()),
            }
        );
        assert_eq!(core.asked, vec![req.clone()]);
        // The wire form the shim parses.
        let line = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            line,
            r#"{"result":"rewritten","reference":"acme/echoserver","generation":2,"paths":2,"runc":"/opt/runc"}"#
        );
        let mut failing = Fake {
            fail: Some("acme/nope: no such environment in catalog".into()),
            ..Fake::default()
        };
        assert_eq!(
            prepare(&mut failing, &req),
            Reply::Failed {
                error: "acme/nope: no such environment in catalog".into()
            }
        );
        assert_eq!(
            release(&mut Fake::default(), "c1"),
            Reply::Released { runc: None }
        );
    }

    #[test]
    fn a_malformed_command_line_is_exit_code_2_and_touches_nothing() {
        let mut core = Fake::default();
        let mut out = Vec::new();
        let bad = os(&["--bundle", "/b"]);
        assert_eq!(main(PREPARE_STAGE, &bad, &mut core, &mut out), 2);
        assert_eq!(main(RELEASE_STAGE, &os(&[]), &mut core, &mut out), 2);
        assert!(core.asked.is_empty() && core.released.is_empty());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"result\":\"failed\",\"error\":\"shim-prepare: --id is required\"}\n\
             {\"result\":\"failed\",\"error\":\"shim-release: --id is required\"}\n"
        );
        let mut out = Vec::new();
        assert_eq!(
            main(RELEASE_STAGE, &os(&["--id", "c1"]), &mut core, &mut out),
            0
        );
        assert_eq!(core.released, vec!["c1".to_owned()]);
    }
}
