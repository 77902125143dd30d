//! What `nixenv-runc exec` gives an exec into a container nixenv prepared.
//!
//! CRI-O (through conmon), podman and containerd's runc shim in `BinaryName` mode build an
//! exec's process from their own copy of the container's spec, not from the rewritten
//! config.json, and hand it to `runc exec --process FILE`. So at `create` nixenv-runc records
//! what the rewrite changed in the environment ([`EnvChange`]s) in a small root-owned file in
//! runc's state root, `<root>/nixenv@<id>` (an `@` is never in a runc container id, so the
//! name cannot clash with a container's state directory, and runc skips files there), and
//! removes it after `delete`. On `exec` the first stage stats that file; only then does the
//! second stage read the process file, apply the changes
//! ([`nixenv_shim_protocol::apply_env_changes`], the shim's rule too) and hand runc a new
//! process file: an unlinked in-memory file passed as `/proc/self/fd/N`, so nothing is left
//! behind once runc (which replaces this process) exits.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nixenv_shim_protocol::{apply_env_changes, EnvChange};
use serde::{Deserialize, Serialize};

/// The record's file name in runc's root: this prefix, then the container id. Also in the
/// first stage (`hook/runc/src/lib.rs`), which looks for it on `exec`.
pub const RECORD_PREFIX: &str = "nixenv@";

/// Why a record or an exec's process file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ExecEnvError {
    #[error("cannot write exec record {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read exec record {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad exec record {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot remove exec record {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read exec process {path}: {source}")]
    ProcessRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad exec process {path}: {source}")]
    ProcessParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("bad exec process {path}: env is not a list of strings")]
    ProcessEnv { path: PathBuf },
    #[error("cannot hand the exec process to runc: {0}")]
    Handoff(#[source] std::io::Error),
}

/// What the record holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRecord {
    /// The reference as annotated (for people reading the file).
    pub reference: String,
    /// What the rewrite changed in the process environment, in order.
    pub env: Vec<EnvChange>,
}

/// The core's environment changes, as the protocol (and the record) carries them.
pub fn protocol_changes(env: Vec<nixenv_core::spec::EnvChange>) -> Vec<EnvChange> {
    env.into_iter()
        .map(|c| EnvChange {
            name: c.name,
            before: c.before,
            after: c.after,
        })
        .collect()
}

/// `<root>/nixenv@<id>`.
pub fn record_path(root: &Path, id: &OsStr) -> PathBuf {
    let mut name = OsString::from(RECORD_PREFIX);
    name.push(id);
    root.join(name)
}

/// Writes container `id`'s record in runc's `root` (created 0700, as runc does, if missing):
/// a temporary file beside it, renamed over it.
pub fn write(root: &Path, id: &OsStr, record: &ExecRecord) -> Result<(), ExecEnvError> {
    let path = record_path(root, id);
    let err = |source| ExecEnvError::Write {
        path: path.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(err)?;
    let mut tmp_name = path.clone().into_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let json = serde_json::to_vec(record).expect("a record serialises");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&json)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

/// Container `id`'s record, if it has one.
pub fn read(root: &Path, id: &OsStr) -> Result<Option<ExecRecord>, ExecEnvError> {
    let path = record_path(root, id);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ExecEnvError::Read { path, source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| ExecEnvError::Parse { path, source })
}

/// Whether container `id` has a record (one `stat`).
pub fn exists(root: &Path, id: &OsStr) -> bool {
    std::fs::symlink_metadata(record_path(root, id)).is_ok()
}

/// Removes container `id`'s record; whether there was one.
pub fn remove(root: &Path, id: &OsStr) -> Result<bool, ExecEnvError> {
    let path = record_path(root, id);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(ExecEnvError::Remove { path, source }),
    }
}

/// The process JSON `process` (read from `path`) with `changes` applied to its `env` (an
/// absent `env` is an empty one); every other field is kept as it was.
pub fn rewrite_process(
    path: &Path,
    process: &[u8],
    changes: &[EnvChange],
) -> Result<Vec<u8>, ExecEnvError> {
    let mut value: serde_json::Value =
        serde_json::from_slice(process).map_err(|source| ExecEnvError::ProcessParse {
            path: path.to_owned(),
            source,
        })?;
    let bad_env = || ExecEnvError::ProcessEnv {
        path: path.to_owned(),
    };
    let object = value.as_object_mut().ok_or_else(bad_env)?;
    let mut env: Vec<String> = match object.get("env") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| bad_env())?,
    };
    apply_env_changes(changes, &mut env);
    object.insert("env".into(), env.into());
    Ok(serde_json::to_vec(&value).expect("a JSON value serialises"))
}

/// Reads the process file at `path` and applies `changes` ([`rewrite_process`]).
pub fn rewrite_process_file(path: &Path, changes: &[EnvChange]) -> Result<Vec<u8>, ExecEnvError> {
    let bytes = std::fs::read(path).map_err(|source| ExecEnvError::ProcessRead {
        path: path.to_owned(),
        source,
    })?;
    rewrite_process(path, &bytes, changes)
}

/// A file runc can open as `--process`: `bytes` in an unlinked in-memory file that the exec
/// keeps open (no close-on-exec), numbered at least `min_fd` (past any `--preserve-fds`), and
/// its path `/proc/self/fd/N`, which runc (this process after exec) opens.
pub fn handoff_file(bytes: &[u8], min_fd: i32) -> Result<(OwnedFd, PathBuf), ExecEnvError> {
    let fail = |e| ExecEnvError::Handoff(e);
    // SAFETY: a NUL-terminated name and no flags; the result is checked.
    let raw = unsafe { libc::memfd_create(c"nixenv-exec-process".as_ptr(), 0) };
    if raw < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a new descriptor owned by nothing else.
    let mut fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if fd.as_raw_fd() < min_fd {
        // SAFETY: F_DUPFD on an open descriptor; the result is checked.
        let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, min_fd) };
        if dup < 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        // SAFETY: as above.
        fd = unsafe { OwnedFd::from_raw_fd(dup) };
    }
    let mut file = File::from(fd);
    file.write_all(bytes).map_err(fail)?;
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    Ok((file.into(), path))
}

/// `--process` rewritten to `path`: the flag's word, or its value's, in `args`.
pub fn with_process_path(
    args: &[OsString],
    arg: &crate::args::ProcessArg,
    path: &Path,
) -> Vec<OsString> {
    let mut out = args.to_vec();
    out[arg.index] = match &arg.inline_prefix {
        Some(prefix) => {
            let mut word = prefix.clone();
            word.push(path.as_os_str());
            word
        }
        None => path.as_os_str().to_owned(),
    };
    out
}

/// Whether `name` is a plain file name (no `/`, not `.` or `..`): what a container id must be
/// for its record path to stay in the root.
pub fn is_plain_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    !b.is_empty() && !b.contains(&b'/') && b != b"." && b != b".."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(name: &str, before: Option<&str>, after: &str) -> EnvChange {
        EnvChange {
            name: name.into(),
            before: before.map(Into::into),
            after: after.into(),
        }
    }

    #[test]
    fn a_record_is_written_read_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("runc");
        let id = OsStr::new("c1");
        assert_eq!(read(&root, id).unwrap(), None);
        assert!(!exists(&root, id));
        let record = ExecRecord {
            reference: "acme/echoserver".into(),
            env: vec![change("PATH", Some("/bin"), "/nix/store/e/bin:/bin")],
        };
        write(&root, id, &record).unwrap();
        assert!(exists(&root, id));
        assert_eq!(read(&root, id).unwrap(), Some(record));
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["nixenv@c1"], "no temporary file left");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(remove(&root, id).unwrap());
        assert!(!remove(&root, id).unwrap());
        assert!(!exists(&root, id));
    }

    #[test]
    fn a_process_keeps_every_field_and_gets_the_env_changes() {
        let process = br#"{"terminal":false,"user":{"uid":0,"gid":0},"args":["sh"],"env":["PATH=/usr/bin:/bin","PATH=/image/bin","HOSTNAME=x"],"cwd":"/","futureField":{"a":1}}"#;
        let out = rewrite_process(
            Path::new("/p.json"),
            process,
            &[
                change("PATH", Some("/image/bin"), "/nix/store/e/bin:/image/bin"),
                change("ECHO_MESSAGE", None, "hi"),
            ],
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["env"],
            serde_json::json!([
                "PATH=/usr/bin:/bin",
                "PATH=/nix/store/e/bin:/image/bin",
                "HOSTNAME=x",
                "ECHO_MESSAGE=hi"
            ])
        );
        assert_eq!(v["futureField"], serde_json::json!({"a": 1}));
        assert_eq!(v["args"], serde_json::json!(["sh"]));
        assert_eq!(v["user"], serde_json::json!({"uid": 0, "gid": 0}));

        let none = rewrite_process(
            Path::new("/p.json"),
            br#"{"args":["sh"]}"#,
            &[change("A", None, "1")],
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&none).unwrap();
        assert_eq!(v["env"], serde_json::json!(["A=1"]));
        for bad in [&br#"{"env":"PATH=/x"}"#[..], b"[]", b"{"] {
            assert!(rewrite_process(Path::new("/p.json"), bad, &[]).is_err());
        }
    }

    #[test]
    fn the_handoff_file_reads_back_through_proc_self_fd() {
        let (fd, path) = handoff_file(b"{\"args\":[\"sh\"]}", 50).unwrap();
        assert!(fd.as_raw_fd() >= 50);
        assert_eq!(
            path,
            PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"args\":[\"sh\"]}");
        // SAFETY: F_GETFD on an open descriptor.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, 0, "kept across exec");
    }

    #[test]
    fn plain_names_only() {
        for ok in ["c1", "abc.def", "a+b-c_d"] {
            assert!(is_plain_name(OsStr::new(ok)), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "/x"] {
            assert!(!is_plain_name(OsStr::new(bad)), "{bad}");
        }
    }
}
