//! The process edge: finding the real runc and handing over to it.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why runc could not be found or run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("runc not found on PATH (set `runc` in the config or $NIXENV_RUNC)")]
    NotFound,
    #[error("cannot execute runc {path}: {source}")]
    Exec {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("runc {path} was killed by signal {signal}")]
    Signaled { path: PathBuf, signal: i32 },
}

/// Starting runc.
pub trait Process {
    /// Replaces this process with `program`, `argv[0]` set to `program`, then `args`; returns only
    /// on failure.
    fn exec(&self, program: &Path, args: &[OsString]) -> ExecError;
    /// Runs `program` with `args` as a child, stdio inherited, and returns its exit code.
    fn run(&self, program: &Path, args: &[OsString]) -> Result<i32, ExecError>;
}

/// The real thing: `execv(2)` and `fork`/`exec`/`wait` through std.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealProcess;

impl Process for RealProcess {
    fn exec(&self, program: &Path, args: &[OsString]) -> ExecError {
        let to_c = |s: &OsStr| CString::new(s.as_bytes());
        let exec_err = |source| ExecError::Exec {
            path: program.to_owned(),
            source,
        };
        let Ok(path) = to_c(program.as_os_str()) else {
            return exec_err(std::io::ErrorKind::InvalidInput.into());
        };
        let mut argv = Vec::with_capacity(args.len() + 1);
        argv.push(path.clone());
        for a in args {
            match to_c(a) {
                Ok(c) => argv.push(c),
                Err(_) => return exec_err(std::io::ErrorKind::InvalidInput.into()),
            }
        }
        match nix::unistd::execv(&path, &argv) {
            Ok(never) => match never {},
            Err(errno) => exec_err(std::io::Error::from(errno)),
        }
    }

    fn run(&self, program: &Path, args: &[OsString]) -> Result<i32, ExecError> {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::Command::new(program)
            .args(args)
            .status()
            .map_err(|source| ExecError::Exec {
                path: program.to_owned(),
                source,
            })?;
        match (status.code(), status.signal()) {
            (Some(code), _) => Ok(code),
            (None, Some(signal)) => Err(ExecError::Signaled {
                path: program.to_owned(),
                signal,
            }),
            (None, None) => Ok(1),
        }
    }
}

/// The environment variable naming the real runc for every subcommand.
pub const RUNC_ENV: &str = "NIXENV_RUNC";

/// Finds the real runc: `$NIXENV_RUNC`, else `runc` on `path_var` skipping the files `skip`
/// (device, inode) — nixenv-runc itself may be installed as `runc` earlier on PATH.
pub fn locate_runc(
    env_override: Option<OsString>,
    path_var: Option<OsString>,
    skip: &[(u64, u64)],
) -> Result<PathBuf, ExecError> {
    if let Some(p) = env_override.filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let path_var = path_var.unwrap_or_else(|| {
        OsString::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    });
    for dir in std::env::split_paths(&path_var) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let candidate = dir.join("runc");
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        if !meta.is_file() || meta.mode() & 0o111 == 0 {
            continue;
        }
        if skip.contains(&(meta.dev(), meta.ino())) {
            continue;
        }
        return Ok(candidate);
    }
    Err(ExecError::NotFound)
}

/// (device, inode) of the running executable and of the `nixenv-runc` next to it: neither is
/// the real runc.
pub fn own_binaries() -> Vec<(u64, u64)> {
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let mut out: Vec<(u64, u64)> = id(Path::new("/proc/self/exe")).into_iter().collect();
    if let Ok(exe) = std::fs::read_link("/proc/self/exe") {
        out.extend(id(&exe.with_file_name("nixenv-runc")));
    }
    out
}

/// [`locate_runc`] with this process' environment.
pub fn locate_runc_from_env() -> Result<PathBuf, ExecError> {
    let env = std::env::var_os(RUNC_ENV);
    if env.as_ref().is_some_and(|p| !p.is_empty()) {
        return locate_runc(env, None, &[]);
    }
    locate_runc(None, std::env::var_os("PATH"), &own_binaries())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn exe(path: &Path) {
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn finds_runc_on_path_skipping_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        for d in [&a, &b, &c] {
            std::fs::create_dir(d).unwrap();
        }
        exe(&a.join("runc")); // "ourselves", installed as runc
        std::fs::write(b.join("runc"), "not executable").unwrap();
        exe(&c.join("runc"));
        let me = std::fs::metadata(a.join("runc")).unwrap();
        let path = std::env::join_paths([&a, &b, &c]).unwrap();
        assert_eq!(
            locate_runc(None, Some(path.clone()), &[(me.dev(), me.ino())]).unwrap(),
            c.join("runc")
        );
        assert_eq!(
            locate_runc(None, Some(path.clone()), &[]).unwrap(),
            a.join("runc")
        );
        assert_eq!(
            locate_runc(Some("/opt/runc".into()), Some(path), &[]).unwrap(),
            PathBuf::from("/opt/runc")
        );
        assert!(matches!(
            locate_runc(None, Some(b.into_os_string()), &[]),
            Err(ExecError::NotFound)
        ));
    }

    #[test]
    fn run_reports_exit_codes() {
        let code = RealProcess
            .run(Path::new("/bin/sh"), &["-c".into(), "exit 7".into()])
            .unwrap();
        assert_eq!(code, 7);
        assert!(matches!(
            RealProcess.run(Path::new("/nonexistent/runc"), &[]),
            Err(ExecError::Exec { .. })
        ));
    }
}
