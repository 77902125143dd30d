//! The built `nixenv-runc` binary, run for real against fake `runc` and `nixenv-hook` scripts
//! that record how they were called: where each command line goes, unchanged, and the one-line
//! error when nothing can be run. No root needed.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// Writing an executable while another thread forks makes its exec fail with ETXTBSY: the
/// tests write and run their programs one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const RECORDER: &str = r#"#!/bin/sh
# Records argv[0], the arguments (one per line) and $FOO, then exits 7.
{ echo "argv0=$0"; for a in "$@"; do echo "arg=$a"; done; echo "FOO=$FOO"; } > "$RECORD"
exit 7
"#;

/// A private directory, removed on drop (no dependencies in this workspace).
struct Sandbox {
    dir: PathBuf,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Sandbox {
    fn new() -> Sandbox {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nixenv-runc-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Sandbox { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Installs the built nixenv-runc at `rel`.
    fn first_stage(&self, rel: &str) -> PathBuf {
        let dest = self.path(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(env!("CARGO_BIN_EXE_nixenv-runc"), &dest).unwrap();
        dest
    }

    /// Installs the recording script at `rel`.
    fn recorder(&self, rel: &str) -> PathBuf {
        let dest = self.path(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(&dest, RECORDER).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).unwrap();
        dest
    }

    /// Runs `program` with `args`, a clean environment plus `env`, and `$RECORD`.
    fn run(&self, program: &Path, args: &[&OsStr], env: &[(&str, &OsStr)]) -> Output {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("RECORD", self.path("record"))
            .env("FOO", "bar");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    /// What the recorder saw, or `None` if it did not run.
    fn record(&self) -> Option<String> {
        let r = std::fs::read_to_string(self.path("record")).ok();
        let _ = std::fs::remove_file(self.path("record"));
        r
    }
}

fn recorded(argv0: &Path, args: &[&str]) -> String {
    let mut s = format!("argv0={}\n", argv0.display());
    for a in args {
        s += &format!("arg={a}\n");
    }
    s + "FOO=bar\n"
}

fn os<'a>(args: &[&'a str]) -> Vec<&'a OsStr> {
    args.iter().map(|a| OsStr::new(*a)).collect()
}

#[test]
fn pass_through_execs_runc_from_path_skipping_itself() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Sandbox::new();
    // nixenv-runc installed as `runc` first on PATH, a non-executable `runc`, then the real one.
    let me = s.first_stage("a/runc");
    std::fs::create_dir_all(s.path("b")).unwrap();
    std::fs::write(s.path("b/runc"), "not executable").unwrap();
    let runc = s.recorder("c/runc");
    s.recorder("c/nixenv-hook");
    let path = std::env::join_paths([s.path("a"), s.path("b"), s.path("c")]).unwrap();
    let args = ["--root", "/run/runc", "--log-format=json", "state", "c1"];
    let out = s.run(&me, &os(&args), &[("PATH", &path)]);
    assert_eq!(out.status.code(), Some(7), "runc's exit code is kept");
    assert_eq!(s.record().as_deref(), Some(&*recorded(&runc, &args)));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn nixenv_runc_names_the_real_runc() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Sandbox::new();
    let me = s.first_stage("bin/nixenv-runc");
    let runc = s.recorder("opt/runc");
    let decoy = s.recorder("path/runc");
    let args = ["kill", "c1", "KILL"];
    let out = s.run(
        &me,
        &os(&args),
        &[
            ("NIXENV_RUNC", runc.as_os_str()),
            ("PATH", s.path("path").as_os_str()),
        ],
    );
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(s.record().as_deref(), Some(&*recorded(&runc, &args)));
    let _ = decoy;
}

#[test]
fn arguments_that_are_not_utf8_pass_unchanged() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Sandbox::new();
    let me = s.first_stage("bin/nixenv-runc");
    let runc = s.recorder("bin2/runc");
    let odd = OsStr::from_bytes(b"c\xff\xfe1");
    let out = s.run(
        &me,
        &[OsStr::new("state"), odd],
        &[("PATH", s.path("bin2").as_os_str())],
    );
    assert_eq!(out.status.code(), Some(7));
    let record = std::fs::read(s.path("record")).unwrap();
    let want = [
        format!("argv0={}\narg=state\narg=", runc.display()).as_bytes(),
        b"c\xff\xfe1",
        b"\nFOO=bar\n",
    ]
    .concat();
    assert_eq!(record, want);
}

#[test]
fn create_run_delete_and_execs_of_recorded_containers_go_to_nixenv_hook_beside_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Sandbox::new();
    let me = s.first_stage("bin/nixenv-runc");
    let hook = s.recorder("bin/nixenv-hook");
    let runc = s.recorder("runc-dir/runc");
    let path = s.path("runc-dir");
    // nixenv-hook's exec record of container `prepared` in runc's root.
    std::fs::create_dir_all(s.path("root")).unwrap();
    std::fs::write(s.path("root/nixenv@prepared"), "{}").unwrap();
    let root = s.path("root").display().to_string();
    let exec = |id| {
        let words = [
            &root,
            "exec",
            "--pid-file",
            "/p",
            "--process",
            "/x.json",
            "--detach",
            id,
        ];
        std::iter::once("--root")
            .chain(words)
            .collect::<Vec<&str>>()
    };
    let (prepared, plain) = (exec("prepared"), exec("plain"));
    for (args, to_hook) in [
        (
            &["--root", "/r", "create", "--bundle", "/b", "c1"][..],
            true,
        ),
        (&["--log", "/l", "run", "-d", "c1"], true),
        (&["delete", "--force", "c1"], true),
        // Not a delete, but only nixenv-hook parses exactly: it passes it on itself.
        (&["state", "delete"], true),
        (&prepared, true),
        // An exec into a container without a record goes straight to runc.
        (&plain, false),
    ] {
        let out = s.run(&me, &os(args), &[("PATH", path.as_os_str())]);
        assert_eq!(out.status.code(), Some(7), "{args:?}");
        let want = if to_hook {
            let mut want = vec!["runc"];
            want.extend_from_slice(args);
            recorded(&hook, &want)
        } else {
            recorded(&runc, args)
        };
        assert_eq!(s.record().as_deref(), Some(&*want), "{args:?}");
    }
}

#[test]
fn without_a_runc_nixenv_hook_reports_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Sandbox::new();
    let me = s.first_stage("bin/nixenv-runc");
    let hook = s.recorder("bin/nixenv-hook");
    std::fs::create_dir_all(s.path("empty")).unwrap();
    let args = ["state", "c1"];
    // No runc on PATH, then a NIXENV_RUNC that does not exist.
    let out = s.run(&me, &os(&args), &[("PATH", s.path("empty").as_os_str())]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        s.record().as_deref(),
        Some(&*recorded(&hook, &["runc", "state", "c1"]))
    );
    let out = s.run(
        &me,
        &os(&args),
        &[("NIXENV_RUNC", OsStr::new("/nonexistent/runc"))],
    );
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        s.record().as_deref(),
        Some(&*recorded(&hook, &["runc", "state", "c1"]))
    );
}

#[test]
fn without_nixenv_hook_the_error_is_one_line() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Sandbox::new();
    let me = s.first_stage("bin/nixenv-runc");
    let out = s.run(&me, &os(&["create", "c1"]), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "nixenv-runc: cannot execute {}: no such file or directory (errno 2)\n",
            s.path("bin/nixenv-hook").display()
        )
    );
    assert!(out.stdout.is_empty());
    assert!(s.record().is_none());
}
