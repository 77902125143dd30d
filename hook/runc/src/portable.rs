//! The first stage as an ordinary `std` program, for architectures without the bare one.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nixenv_runc::{env_value, exec_error_line, find_runc, needs_full_stage, sibling};
use nixenv_runc::{FileId, Stat, FULL_STAGE, HOOK_NAME, PATH_BUF};

/// `stat(2)` through std.
struct StdFs;

impl Stat for StdFs {
    fn stat(&self, path: &[u8]) -> Option<FileId> {
        let path = path.strip_suffix(b"\0")?;
        let m = std::fs::metadata(OsStr::from_bytes(path)).ok()?;
        Some(FileId {
            dev: m.dev(),
            ino: m.ino(),
            mode: m.mode(),
        })
    }
}

pub fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if !needs_full_stage(&StdFs, args.iter().map(|a| a.as_bytes())) {
        let env: Vec<Vec<u8>> = std::env::vars_os()
            .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat())
            .collect();
        let mut runc = [0u8; PATH_BUF];
        let found = find_runc(
            &StdFs,
            env_value(env.iter().map(Vec::as_slice), b"NIXENV_RUNC"),
            env_value(env.iter().map(Vec::as_slice), b"PATH"),
            StdFs.stat(b"/proc/self/exe\0"),
            &mut runc,
        );
        if let Some(n) = found {
            let runc = OsStr::from_bytes(&runc[..n]);
            // Returns only on failure; nixenv-hook then reports the error.
            let _ = Command::new(runc).arg0(runc).args(&args).exec();
        }
    }
    let mut hook = [0u8; PATH_BUF];
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
    let Some(n) = sibling(&mut hook, exe.as_os_str().as_bytes(), HOOK_NAME) else {
        fail(exe.as_os_str().as_bytes(), 36)
    };
    let hook = OsStr::from_bytes(&hook[..n]);
    let err = Command::new(hook)
        .arg0(hook)
        .arg(OsStr::from_bytes(FULL_STAGE))
        .args(&args)
        .exec();
    fail(hook.as_bytes(), err.raw_os_error().unwrap_or(0) as isize)
}

/// Reports that `path` could not be executed, on stderr, and exits 1 (runc's failure code).
fn fail(path: &[u8], errno: isize) -> ! {
    use std::io::Write;
    let mut line = [0u8; 512];
    let n = exec_error_line(&mut line, path, errno);
    let _ = std::io::stderr().write_all(&line[..n]);
    std::process::exit(1)
}
