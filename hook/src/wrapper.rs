//! `nixenv-runc`: prepare the bundle on `create`/`run` (and record its environment changes for
//! execs, [`exec_env`]), give `exec --process FILE` into a container it prepared those
//! changes, release the pin and the record after `delete`, and otherwise hand over to the real
//! runc at once, with the same arguments.
//!
//! Two stages keep the pass-through path cheap: the `nixenv-runc` binary (`hook/runc/`, a
//! static `no_std` program of a few kilobytes) execs runc at once for every subcommand but
//! `create`, `run`, `delete` and an `exec` into a container with an exec record (one `stat`);
//! those, and anything it cannot decide or run, it hands with argv unchanged to
//! `nixenv-hook runc …` next to it, which links the core and runs [`run`] (which also passes
//! through what turns out not to need it).
//!
//! The core is a [`Node`] (`prepare_bundle`, `may_be_pinned`, `release`, `runc`), the real
//! runc a [`Process`] found by [`Locate`]: type parameters, so the flow is testable without
//! root.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use nixenv_core::runtime::{Decision, Owner, OwnerKind};

use crate::args::{self, Action, Invocation};
use crate::exec::{ExecError, Process};
use crate::exec_env::{self, ExecEnvError, ExecRecord};
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

/// runc's state root: `--root`, else runc's default.
fn runtime_root(inv: &Invocation) -> PathBuf {
    inv.global
        .root
        .as_deref()
        .map_or_else(|| PathBuf::from(RUNC_DEFAULT_ROOT), PathBuf::from)
}

/// Records what the rewrite of container `id` changed in the environment, for its execs
/// ([`exec_env`]); a container nixenv passed through loses any stale record.
fn record_exec_env(root: &Path, id: &OsStr, decision: &Decision) -> Result<(), ExecEnvError> {
    if !exec_env::is_plain_name(id) {
        return Ok(()); // runc refuses such an id
    }
    match decision {
        Decision::Rewritten(p) => exec_env::write(
            root,
            id,
            &ExecRecord {
                reference: p.reference.clone(),
                env: exec_env::protocol_changes(p.env.clone()),
            },
        ),
        Decision::PassThrough => exec_env::remove(root, id).map(|_| ()),
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
            let id_os = id.as_os_str();
            let id = id.to_string_lossy();
            let owner = owner(inv.global.root.as_deref().map(Path::new));
            let decision = match node.prepare_bundle(&id, bundle, &owner) {
                Ok(d) => d,
                Err(e) => return fail(&inv, format!("nixenv: {e}")),
            };
            if let Decision::Rewritten(p) = &decision {
                tracing::info!(container = %id, reference = %p.reference, paths = p.closure.len(), "bundle prepared");
            }
            if let Err(e) = record_exec_env(&runtime_root(&inv), id_os, &decision) {
                if let Err(release) = node.release(&id) {
                    tracing::warn!(container = %id, error = %release, "cannot release pin");
                }
                return fail(&inv, format!("nixenv: {id}: {e}"));
            }
            let configured = match node.runc() {
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
        Action::Exec {
            id,
            process: process_arg,
            preserve_fds,
        } => {
            let root = runtime_root(&inv);
            let record = if exec_env::is_plain_name(id) {
                exec_env::read(&root, id)
            } else {
                Ok(None)
            };
            let record = match record {
                Ok(r) => r,
                Err(e) => return fail(&inv, format!("nixenv: {e}")),
            };
            // Not nixenv's container, or a process from positional arguments, which runc
            // builds from the container's own (rewritten) config: runc as it is.
            let (Some(record), Some(process_arg)) = (record, process_arg) else {
                return match runc(node.runc().ok().flatten()) {
                    Ok(runc) => {
                        let e = process.exec(&runc, args);
                        fail(&inv, format!("nixenv: {e}"))
                    }
                    Err(e) => fail(&inv, format!("nixenv: {e}")),
                };
            };
            let rewritten =
                exec_env::rewrite_process_file(Path::new(&process_arg.path), &record.env).and_then(
                    |bytes| {
                        let min_fd = 3i32
                            .saturating_add(i32::try_from(*preserve_fds).unwrap_or(i32::MAX - 3));
                        exec_env::handoff_file(&bytes, min_fd)
                    },
                );
            let (_keep_open, path) = match rewritten {
                Ok(r) => r,
                Err(e) => return fail(&inv, format!("nixenv: {}: {e}", id.to_string_lossy())),
            };
            tracing::debug!(container = %id.to_string_lossy(), reference = %record.reference, changes = record.env.len(), "exec gets the environment");
            let args = exec_env::with_process_path(args, process_arg, &path);
            match runc(node.runc().ok().flatten()) {
                Ok(runc) => {
                    let e = process.exec(&runc, &args);
                    fail(&inv, format!("nixenv: {e}"))
                }
                Err(e) => fail(&inv, format!("nixenv: {e}")),
            }
        }
        Action::Delete { id } => {
            let root = runtime_root(&inv);
            let recorded = exec_env::is_plain_name(id) && exec_env::exists(&root, id);
            let id_os = id.as_os_str();
            let id = id.to_string_lossy();
            let pinned = node.may_be_pinned(&id);
            if !pinned && !recorded {
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
            // its closure pinned and its execs' environment.
            let code = match runc(node.runc().ok().flatten()).and_then(|r| process.run(&r, args)) {
                Ok(code) => code,
                Err(e) => return fail(&inv, format!("nixenv: {e}")),
            };
            if code == 0 {
                let warn = |what: String| {
                    runc_log::report_warning(
                        inv.global.log.as_deref(),
                        inv.global.log_format,
                        &what,
                    )
                };
                if pinned {
                    if let Err(e) = node.release(&id) {
                        // The container is gone; a pin left behind is stale and `nixenv gc`
                        // drops it.
                        warn(format!("nixenv: {id}: cannot release pin: {e}"));
                    }
                }
                if recorded {
                    if let Err(e) = exec_env::remove(&root, id_os) {
                        warn(format!("nixenv: {id}: {e}"));
                    }
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

    fn prepared() -> nixenv_core::runtime::Prepared {
        nixenv_core::runtime::Prepared {
            reference: "acme/echoserver".into(),
            generation: Some(2),
            closure: vec!["/nix/store/e".into()],
            env: vec![nixenv_core::spec::EnvChange {
                name: "PATH".into(),
                before: Some("/image/bin".into()),
                after: "/nix/store/e/bin:/image/bin".into(),
            }],
        }
    }

    #[test]
    fn create_records_the_env_changes_and_delete_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("runc");
        let record = root.join("nixenv@c1");
        let create = format!("--root {} create --bundle /b c1", root.display());
        let mut node = FakeNode {
            prepared: Some(prepared()),
            ..Default::default()
        };
        run(
            &argv(&create),
            &mut node,
            &FakeProcess::default(),
            &FixedRunc,
        );
        let r = exec_env::read(&root, OsStr::new("c1")).unwrap().unwrap();
        assert_eq!(r.reference, "acme/echoserver");
        assert_eq!(r.env[0].after, "/nix/store/e/bin:/image/bin");

        // A refused delete keeps it; a delete runc did removes it, pin or not.
        let delete = format!("--root {} delete c1", root.display());
        let refused = FakeProcess {
            exit: 1,
            ..Default::default()
        };
        run(
            &argv(&delete),
            &mut FakeNode::default(),
            &refused,
            &FixedRunc,
        );
        assert!(record.exists());
        let mut node = FakeNode::default();
        let p = FakeProcess::default();
        assert_eq!(run(&argv(&delete), &mut node, &p, &FixedRunc), 0);
        assert!(p.calls.borrow()[0].starts_with("run /usr/sbin/runc"));
        assert_eq!(node.calls, ["pinned? c1"], "no pin to release");
        assert!(!record.exists());

        // A container nixenv passes through drops a stale record of the same id.
        exec_env::write(&root, OsStr::new("c1"), &r).unwrap();
        run(
            &argv(&create),
            &mut FakeNode::default(),
            &FakeProcess::default(),
            &FixedRunc,
        );
        assert!(!record.exists());
    }

    #[test]
    fn exec_of_a_recorded_container_gets_a_rewritten_process_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("runc");
        let process = dir.path().join("process.json");
        let original =
            br#"{"args":["sh"],"env":["PATH=/usr/bin","PATH=/image/bin","X=1"],"cwd":"/"}"#;
        std::fs::write(&process, original).unwrap();
        let mut node = FakeNode {
            prepared: Some(prepared()),
            ..Default::default()
        };
        let create = format!("--root {} create c1", root.display());
        run(
            &argv(&create),
            &mut node,
            &FakeProcess::default(),
            &FixedRunc,
        );

        /// Runs `line` and returns the argv runc got and the process file it names, read
        /// while the handoff descriptor is still open.
        struct Capture(RefCell<Option<(Vec<OsString>, Vec<u8>)>>);
        impl Process for Capture {
            fn exec(&self, _: &Path, args: &[OsString]) -> ExecError {
                let inv = args::parse(args);
                let file = match inv.action {
                    Action::Exec {
                        process: Some(p), ..
                    } => std::fs::read(&p.path).unwrap(),
                    _ => Vec::new(),
                };
                *self.0.borrow_mut() = Some((args.to_vec(), file));
                ExecError::NotFound
            }
            fn run(&self, _: &Path, _: &[OsString]) -> Result<i32, ExecError> {
                unreachable!()
            }
        }
        for (form, index) in [("--process {p}", 5), ("-p {p}", 5), ("--process={p}", 4)] {
            let flag = form.replace("{p}", &process.display().to_string());
            let line = format!("--root {} exec --detach {flag} c1", root.display());
            let capture = Capture(RefCell::new(None));
            run(&argv(&line), &mut FakeNode::default(), &capture, &FixedRunc);
            let (args, file) = capture.0.into_inner().unwrap();
            let word = args[index].to_string_lossy().into_owned();
            assert!(word.contains("/proc/self/fd/"), "{line}: {args:?}");
            let mut want = argv(&line);
            want[index] = args[index].clone();
            assert_eq!(args, want, "only the process file changes: {line}");
            let v: serde_json::Value = serde_json::from_slice(&file).unwrap();
            assert_eq!(
                v["env"],
                serde_json::json!(["PATH=/usr/bin", "PATH=/nix/store/e/bin:/image/bin", "X=1"]),
                "{line}"
            );
        }
        assert_eq!(
            std::fs::read(&process).unwrap(),
            original,
            "the caller's file is untouched"
        );

        // Another container, and a positional process: runc gets the argv as it came.
        for line in [
            format!("--root {} exec -p {} c2", root.display(), process.display()),
            format!("--root {} exec c1 sh -c true", root.display()),
        ] {
            let p = FakeProcess::default();
            run(&argv(&line), &mut FakeNode::default(), &p, &FixedRunc);
            assert_eq!(
                p.calls.borrow().as_slice(),
                [format!("exec /usr/sbin/runc {:?}", argv(&line))]
            );
        }
    }
}
