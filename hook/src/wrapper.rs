//! `nixenv-runc`: prepare the bundle on `create`/`run`, release the pin after `delete`, and
//! otherwise hand over to the real runc at once, with the same arguments.
//!
//! Two stages keep the pass-through path cheap: the `nixenv-runc` binary (`hook/runc/`, a
//! static `no_std` program of a few kilobytes) execs runc at once for every subcommand but
//! `create`, `run` and `delete`; those, and anything it cannot decide or run, it hands with
//! argv unchanged to `nixenv-hook runc …` next to it, which links the core and runs [`run`]
//! (which also passes through what turns out not to need it).
//!
//! The core is a [`Node`] (`prepare_bundle`, `may_be_pinned`, `release`, `runc`), the real
//! runc a [`Process`] found by [`Locate`]: type parameters, so the flow is testable without
//! root.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use nixenv_core::runtime::{Decision, Owner, OwnerKind};

use crate::args::{self, Action, Invocation};
use crate::exec::{ExecError, Process};
use crate::node::{Node, RUNC_DEFAULT_ROOT};
use crate::runc_log;

/// Where to find the real runc when the configuration does not say.
pub trait Locate {
    /// The real runc.
    fn locate(&self) -> Result<PathBuf, ExecError>;
}

/// The `nixenv-hook` stage that runs [`run`] (nixenv-runc's second stage).
pub const FULL_STAGE: &str = "runc";

/// The pin's owner for a container of the runc whose state directory is `runtime_root`
/// (`--root`; `None`: runc's default). The core records the bundle.
fn owner(runtime_root: Option<&Path>) -> Owner {
    Owner {
        kind: OwnerKind::RuncWrapper,
        runtime_root: Some(
            runtime_root
                .unwrap_or(Path::new(RUNC_DEFAULT_ROOT))
                .to_owned(),
        ),
        bundle: None,
        namespace: None,
    }
}

/// Runs nixenv-runc with `args` (argv without `argv[0]`); returns the exit code when it does not
/// exec.
pub fn run<N: Node, P: Process, L: Locate>(
    args: &[OsString],
    node: &mut N,
    process: &P,
    locate: &L,
) -> i32 {
    let inv = args::parse(args);
    let fail = |inv: &Invocation, msg: String| {
        runc_log::report_error(inv.global.log.as_deref(), inv.global.log_format, &msg);
        1
    };
    let runc = |configured: Option<PathBuf>| match configured {
        Some(p) => Ok(p),
        None => locate.locate(),
    };
    match &inv.action {
        Action::PassThrough => match locate.locate() {
            Ok(runc) => {
                let e = process.exec(&runc, args);
                fail(&inv, format!("nixenv: {e}"))
            }
            Err(e) => fail(&inv, format!("nixenv: {e}")),
        },
        Action::Prepare { bundle, id, .. } => {
            let bundle = bundle.as_deref().map(Path::new).unwrap_or(Path::new("."));
            let id = id.to_string_lossy();
            let owner = owner(inv.global.root.as_deref().map(Path::new));
            let prepared = node.prepare_bundle(&id, bundle, &owner).and_then(|decision| {
                if let Decision::Rewritten(p) = &decision {
                    tracing::info!(container = %id, reference = %p.reference, paths = p.closure.len(), "bundle prepared");
                }
                node.runc()
            });
            let configured = match prepared {
                Ok(c) => c,
                Err(e) => return fail(&inv, format!("nixenv: {e}")),
            };
            match runc(configured) {
                Ok(runc) => {
                    let e = process.exec(&runc, args);
                    fail(&inv, format!("nixenv: {e}"))
                }
                Err(e) => fail(&inv, format!("nixenv: {e}")),
            }
        }
        Action::Delete { id } => {
            let id = id.to_string_lossy();
            if !node.may_be_pinned(&id) {
                // may_be_pinned has loaded the configuration; without one, PATH names runc.
                return match runc(node.runc().ok().flatten()) {
                    Ok(runc) => {
                        let e = process.exec(&runc, args);
                        fail(&inv, format!("nixenv: {e}"))
                    }
                    Err(e) => fail(&inv, format!("nixenv: {e}")),
                };
            }
            // runc deletes first: a refused delete (a running container without --force) keeps
            // its closure pinned.
            let code = match runc(node.runc().ok().flatten()).and_then(|r| process.run(&r, args)) {
                Ok(code) => code,
                Err(e) => return fail(&inv, format!("nixenv: {e}")),
            };
            if code == 0 {
                if let Err(e) = node.release(&id) {
                    // The container is gone; a pin left behind is stale and `nixenv gc` drops it.
                    runc_log::report_warning(
                        inv.global.log.as_deref(),
                        inv.global.log_format,
                        &format!("nixenv: {id}: cannot release pin: {e}"),
                    );
                }
            }
            code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::fake::FakeNode;
    use std::cell::RefCell;

    #[derive(Default)]
    struct FakeProcess {
        calls: RefCell<Vec<String>>,
        exit: i32,
    }

    impl Process for FakeProcess {
        fn exec(&self, program: &Path, args: &[OsString]) -> ExecError {
            self.calls
                .borrow_mut()
                .push(format!("exec {} {:?}", program.display(), args));
            ExecError::NotFound
        }
        fn run(&self, program: &Path, args: &[OsString]) -> Result<i32, ExecError> {
            self.calls
                .borrow_mut()
                .push(format!("run {} {:?}", program.display(), args));
            Ok(self.exit)
        }
    }

    struct FixedRunc;
    impl Locate for FixedRunc {
        fn locate(&self) -> Result<PathBuf, ExecError> {
            Ok(PathBuf::from("/usr/sbin/runc"))
        }
    }

    fn argv(line: &str) -> Vec<OsString> {
        line.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn pass_through_touches_nothing() {
        for line in [
            "state c1",
            "--root /r kill c1 9",
            "--version",
            "features",
            "start c1",
        ] {
            let mut node = FakeNode::default();
            let p = FakeProcess::default();
            run(&argv(line), &mut node, &p, &FixedRunc);
            assert!(node.calls.is_empty(), "{line}");
            assert_eq!(
                p.calls.borrow().as_slice(),
                [format!("exec /usr/sbin/runc {:?}", argv(line))]
            );
        }
    }

    #[test]
    fn create_prepares_then_execs_the_same_argv() {
        let line = "--root /r --log /l --log-format json create --bundle /b --pid-file /p c1";
        let mut node = FakeNode {
            runc: Some("/opt/runc".into()),
            ..Default::default()
        };
        let p = FakeProcess::default();
        run(&argv(line), &mut node, &p, &FixedRunc);
        assert_eq!(node.calls, ["prepare c1 /b Some(\"/r\")"]);
        assert_eq!(node.owners[0].kind, OwnerKind::RuncWrapper);
        assert_eq!(
            p.calls.borrow().as_slice(),
            [format!("exec /opt/runc {:?}", argv(line))]
        );
    }

    #[test]
    fn create_failure_is_logged_in_runc_format_and_runc_is_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.json");
        let line = format!("--log {} --log-format json create c1", log.display());
        let mut node = FakeNode {
            fail: Some("acme/x@9: generation 9 not found".into()),
            ..Default::default()
        };
        let p = FakeProcess::default();
        assert_eq!(run(&argv(&line), &mut node, &p, &FixedRunc), 1);
        // No --root: the pin records runc's default root.
        assert_eq!(node.calls, ["prepare c1 . Some(\"/run/runc\")"]);
        assert!(p.calls.borrow().is_empty());
        let v: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&log).unwrap().trim()).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "nixenv: acme/x@9: generation 9 not found");
    }

    #[test]
    fn delete_without_pin_execs_at_once() {
        let mut node = FakeNode::default();
        let p = FakeProcess::default();
        run(&argv("delete --force c1"), &mut node, &p, &FixedRunc);
        assert_eq!(node.calls, ["pinned? c1"]);
        assert_eq!(p.calls.borrow().len(), 1);
        assert!(p.calls.borrow()[0].starts_with("exec "));
    }

    #[test]
    fn delete_with_pin_releases_after_runc_succeeds() {
        let mut node = FakeNode {
            pinned: true,
            ..Default::default()
        };
        let p = FakeProcess::default();
        assert_eq!(run(&argv("delete c1"), &mut node, &p, &FixedRunc), 0);
        assert_eq!(node.calls, ["pinned? c1", "release c1"]);
        assert!(p.calls.borrow()[0].starts_with("run /usr/sbin/runc"));

        let mut node = FakeNode {
            pinned: true,
            ..Default::default()
        };
        let p = FakeProcess {
            exit: 1,
            ..Default::default()
        };
        assert_eq!(run(&argv("delete c1"), &mut node, &p, &FixedRunc), 1);
        assert_eq!(node.calls, ["pinned? c1"], "a refused delete keeps the pin");
    }
}
