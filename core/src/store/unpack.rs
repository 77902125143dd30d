//! Safe NAR unpacking into a new directory tree.
//!
//! Everything is created relative to open directory file descriptors with
//! `mkdirat`/`openat(O_CREAT|O_EXCL|O_NOFOLLOW)`/`symlinkat`, so unpacking never
//! follows a symlink and never writes outside `target`. Modes are Nix's:
//! files `0444` (`0555` when executable), directories `0555` (set once they
//! are filled), symlinks as symlinks; every entry's mtime is 1 (the Unix
//! epoch plus one second), atime left alone.
//!
//! On error, `target` may be partially written: the caller removes it with
//! [`crate::store::remove::remove_tree`] (which copes with the read-only
//! directories).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use nix::fcntl::{openat, OFlag, AT_FDCWD};
use nix::sys::stat::{fchmod, futimens, mkdirat, utimensat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fsync, symlinkat};

use crate::nix::nar::{self, NarError, NarLimits, NarPath, NarVisitor};

/// The largest buffer a file's contents are copied through.
const COPY_BUFFER: usize = 256 * 1024;
/// Options for [`unpack_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackOptions {
    /// fsync every file and directory once written.
    pub fsync: bool,
}

/// What was unpacked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of regular file contents.
    pub bytes: u64,
}

/// Why unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{}: already exists", path.display())]
    TargetExists { path: PathBuf },
    #[error("{}: not a valid unpack target (no parent directory or file name)", path.display())]
    BadTarget { path: PathBuf },
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

const MTIME: TimeSpec = TimeSpec::new(1, 0);

struct Unpacker<'a> {
    target: &'a Path,
    parent: OwnedFd,
    target_name: OsString,
    /// Open directories, innermost last.
    dirs: Vec<OwnedFd>,
    opts: &'a UnpackOptions,
    stats: UnpackStats,
    /// The file copy buffer (at most [`COPY_BUFFER`] bytes).
    buf: Vec<u8>,
}

impl Unpacker<'_> {
    fn fs_path(&self, path: &NarPath) -> PathBuf {
        self.target.join(path.to_relative_path())
    }

    fn io_err(&self, op: &'static str, path: &NarPath, e: impl Into<io::Error>) -> UnpackError {
        let e = e.into();
        if path.is_root() && e.kind() == io::ErrorKind::AlreadyExists {
            return UnpackError::TargetExists {
                path: self.target.to_owned(),
            };
        }
        UnpackError::Io {
            op,
            path: self.fs_path(path),
            source: e,
        }
    }

    /// The directory to create `path` in, and its name there.
    fn slot<'p>(&'p self, path: &'p NarPath) -> (BorrowedFd<'p>, &'p OsStr) {
        match (path.name(), self.dirs.last()) {
            (Some(name), Some(dir)) => (dir.as_fd(), OsStr::from_bytes(name)),
            _ => (self.parent.as_fd(), self.target_name.as_os_str()),
        }
    }

    fn finish_fd(&self, fd: &OwnedFd, mode: u32, path: &NarPath) -> Result<(), UnpackError> {
        fchmod(fd, Mode::from_bits_truncate(mode)).map_err(|e| self.io_err("chmod", path, e))?;
        futimens(fd, &TimeSpec::UTIME_OMIT, &MTIME)
            .map_err(|e| self.io_err("set mtime of", path, e))?;
        if self.opts.fsync {
            fsync(fd).map_err(|e| self.io_err("fsync", path, e))?;
        }
        Ok(())
    }
}

impl NarVisitor for Unpacker<'_> {
    type Error = UnpackError;

    fn directory(&mut self, path: &NarPath) -> Result<(), UnpackError> {
        let (dir, name) = self.slot(path);
        mkdirat(dir, name, Mode::from_bits_truncate(0o700))
            .map_err(|e| self.io_err("create directory", path, e))?;
        let fd = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io_err("open directory", path, e))?;
        self.dirs.push(fd);
        self.stats.dirs += 1;
        Ok(())
    }

    fn end_directory(&mut self, path: &NarPath) -> Result<(), UnpackError> {
        let fd = self.dirs.pop().expect("directory was opened");
        self.finish_fd(&fd, 0o555, path)
    }

    fn file(
        &mut self,
        path: &NarPath,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), UnpackError> {
        let (dir, name) = self.slot(path);
        let fd = openat(
            dir,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.io_err("create file", path, e))?;
        let mut file = File::from(fd);
        // The copy buffer grows to the largest file seen, up to 256 KiB: a NAR of small files
        // (most store paths) never allocates and zeroes the full 256 KiB.
        let mut buf = std::mem::take(&mut self.buf);
        let want = usize::try_from(size)
            .unwrap_or(usize::MAX)
            .clamp(1, COPY_BUFFER);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let mut written = 0u64;
        let res = loop {
            let n = match contents.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The NAR reader reports its own failures; this only stops the copy.
                Err(e) => break Err(self.io_err("read NAR contents for", path, e)),
            };
            if let Err(e) = file.write_all(&buf[..n]) {
                break Err(self.io_err("write", path, e));
            }
            written += n as u64;
        };
        self.buf = buf;
        res?;
        debug_assert_eq!(written, size);
        let fd = OwnedFd::from(file);
        self.finish_fd(&fd, if executable { 0o555 } else { 0o444 }, path)?;
        self.stats.files += 1;
        self.stats.bytes += written;
        Ok(())
    }

    fn symlink(&mut self, path: &NarPath, target: &[u8]) -> Result<(), UnpackError> {
        let (dir, name) = self.slot(path);
        symlinkat(OsStr::from_bytes(target), dir, name)
            .map_err(|e| self.io_err("create symlink", path, e))?;
        utimensat(
            dir,
            name,
            &TimeSpec::UTIME_OMIT,
            &MTIME,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| self.io_err("set mtime of", path, e))?;
        self.stats.symlinks += 1;
        Ok(())
    }
}

/// Unpacks the NAR read from `reader` at `target`, which must not exist (its
/// parent must). See the module documentation; on error the caller removes
/// `target` with [`crate::store::remove::remove_tree`].
pub fn unpack<R: Read>(
    reader: R,
    target: &Path,
    limits: &NarLimits,
) -> Result<UnpackStats, UnpackError> {
    unpack_with(reader, target, limits, &UnpackOptions::default())
}

/// [`unpack`] with options (fsync).
pub fn unpack_with<R: Read>(
    reader: R,
    target: &Path,
    limits: &NarLimits,
    opts: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    let bad = || UnpackError::BadTarget {
        path: target.to_owned(),
    };
    let name = target.file_name().ok_or_else(bad)?;
    if name == OsStr::new("..") {
        return Err(bad());
    }
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        Some(_) => Path::new("."),
        None => return Err(bad()),
    };
    match std::fs::symlink_metadata(target) {
        Ok(_) => {
            return Err(UnpackError::TargetExists {
                path: target.to_owned(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(UnpackError::Io {
                op: "inspect",
                path: target.to_owned(),
                source: e,
            })
        }
    }
    let parent_fd = openat(
        AT_FDCWD,
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Io {
        op: "open directory",
        path: parent.to_owned(),
        source: e.into(),
    })?;
    let mut u = Unpacker {
        target,
        parent: parent_fd,
        target_name: name.to_owned(),
        dirs: Vec::new(),
        opts,
        stats: UnpackStats::default(),
        buf: Vec::new(),
    };
    nar::parse(reader, &mut u, limits)?;
    Ok(u.stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::nar::NarNode;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn sample() -> NarNode {
        NarNode::dir([
            (
                "bin",
                NarNode::dir([
                    (
                        "hello",
                        NarNode::executable(b"#!/bin/sh\necho hi\n".to_vec()),
                    ),
                    ("hi", NarNode::symlink("hello")),
                ]),
            ),
            ("empty", NarNode::dir(Vec::<(&str, NarNode)>::new())),
            (
                "share",
                NarNode::dir([("data", NarNode::file(vec![7u8; 300_000]))]),
            ),
        ])
    }

    #[test]
    fn unpacks_tree_with_nix_modes() {
        let d = tmp();
        let t = d.path().join("out");
        let stats = unpack_with(
            &sample().to_nar()[..],
            &t,
            &NarLimits::default(),
            &UnpackOptions { fsync: true },
        )
        .unwrap();
        assert_eq!(
            stats,
            UnpackStats {
                files: 2,
                dirs: 4,
                symlinks: 1,
                bytes: 300_018
            }
        );
        let m = |p: &str| std::fs::symlink_metadata(t.join(p)).unwrap();
        assert_eq!(m("").permissions().mode() & 0o7777, 0o555);
        assert_eq!(m("bin/hello").permissions().mode() & 0o7777, 0o555);
        assert_eq!(m("share/data").permissions().mode() & 0o7777, 0o444);
        assert_eq!(m("empty").permissions().mode() & 0o7777, 0o555);
        assert!(m("bin/hi").file_type().is_symlink());
        assert_eq!(
            std::fs::read_link(t.join("bin/hi")).unwrap(),
            Path::new("hello")
        );
        for p in ["", "bin", "bin/hello", "bin/hi", "share/data", "empty"] {
            assert_eq!(m(p).mtime(), 1, "{p}");
        }
        assert_eq!(
            std::fs::read(t.join("share/data")).unwrap(),
            vec![7u8; 300_000]
        );
        crate::store::remove::remove_tree(&t).unwrap();
        assert!(!t.exists());
    }

    #[test]
    fn single_file_and_symlink_roots() {
        let d = tmp();
        let f = d.path().join("f");
        unpack(
            &NarNode::executable("x").to_nar()[..],
            &f,
            &NarLimits::default(),
        )
        .unwrap();
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777,
            0o555
        );
        let l = d.path().join("l");
        let s = unpack(
            &NarNode::symlink("/etc/passwd").to_nar()[..],
            &l,
            &NarLimits::default(),
        )
        .unwrap();
        assert_eq!(s.symlinks, 1);
        assert_eq!(std::fs::read_link(&l).unwrap(), Path::new("/etc/passwd"));
        assert_eq!(std::fs::symlink_metadata(&l).unwrap().mtime(), 1);
    }

    #[test]
    fn refuses_existing_target() {
        let d = tmp();
        let t = d.path().join("out");
        std::fs::write(&t, "keep").unwrap();
        let e = unpack(&sample().to_nar()[..], &t, &NarLimits::default()).unwrap_err();
        assert!(matches!(e, UnpackError::TargetExists { .. }), "{e}");
        assert_eq!(std::fs::read(&t).unwrap(), b"keep");
        // A dangling symlink at the target is not followed either.
        let l = d.path().join("link");
        std::os::unix::fs::symlink(d.path().join("elsewhere"), &l).unwrap();
        assert!(matches!(
            unpack(&NarNode::file("x").to_nar()[..], &l, &NarLimits::default()),
            Err(UnpackError::TargetExists { .. })
        ));
        assert!(!d.path().join("elsewhere").exists());
    }
}
