//! Removing a tree that may contain read-only directories (unpacked store
//! paths, temporary unpack targets), without following symlinks.

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{fchmod, fstat, fstatat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Why a tree could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("remove {}: {op}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn err(op: &'static str, path: &Path, e: Errno) -> RemoveError {
    RemoveError::Io {
        op,
        path: path.to_owned(),
        source: e.into(),
    }
}

/// Removes `path` and everything below it. A missing `path` is not an error.
///
/// Directories are made writable by their owner (`chmod u+w`, on the
/// directory's own descriptor) before their entries are removed; symlinks are
/// removed, never followed, at any level including `path` itself.
pub fn remove_tree(path: &Path) -> Result<(), RemoveError> {
    let name = match path.file_name() {
        Some(n) => n,
        None => {
            return Err(RemoveError::Io {
                op: "refuse",
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "no file name"),
            })
        }
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent_fd = match openat(
        AT_FDCWD,
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(err("open parent", parent, e)),
    };
    match fstatat(parent_fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(err("stat", path, e)),
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
            remove_dir_at(parent_fd.as_fd(), name, path)
        }
        Ok(_) => match unlinkat(parent_fd.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(err("unlink", path, e)),
        },
    }
}

fn remove_dir_at(parent: BorrowedFd<'_>, name: &OsStr, path: &Path) -> Result<(), RemoveError> {
    let fd: OwnedFd = openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err("open directory", path, e))?;
    let st = fstat(&fd).map_err(|e| err("stat", path, e))?;
    if st.st_mode & 0o700 != 0o700 {
        fchmod(&fd, Mode::from_bits_truncate((st.st_mode & 0o7777) | 0o700))
            .map_err(|e| err("make writable", path, e))?;
    }
    let mut dir = Dir::from_fd(fd).map_err(|e| err("read directory", path, e))?;
    let mut entries: Vec<(Vec<u8>, Option<Type>)> = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(|e| err("read directory", path, e))?;
        let n: &CStr = entry.file_name();
        let b = n.to_bytes();
        if b == b"." || b == b".." {
            continue;
        }
        entries.push((b.to_vec(), entry.file_type()));
    }
    let dfd = dir.as_fd();
    for (n, ty) in entries {
        let child_name = OsStr::from_bytes(&n);
        let child = path.join(child_name);
        let is_dir = match ty {
            Some(t) => t == Type::Directory,
            None => match fstatat(dfd, child_name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(err("stat", &child, e)),
            },
        };
        if is_dir {
            remove_dir_at(dfd, child_name, &child)?;
        } else {
            match unlinkat(dfd, child_name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(err("unlink", &child, e)),
            }
        }
    }
    drop(dir);
    match unlinkat(parent, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(err("remove directory", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn removes_read_only_tree_without_following_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "k").unwrap();
        let t = d.path().join("t");
        std::fs::create_dir_all(t.join("a/b")).unwrap();
        std::fs::write(t.join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, t.join("a/link")).unwrap();
        for p in ["a/b", "a", ""] {
            std::fs::set_permissions(t.join(p), std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        remove_tree(&t).unwrap();
        assert!(!t.exists());
        assert!(outside.join("keep").exists());
        // Missing is fine; a symlink at the top is removed, not followed.
        remove_tree(&t).unwrap();
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&outside, &l).unwrap();
        remove_tree(&l).unwrap();
        assert!(outside.join("keep").exists());
        assert!(std::fs::symlink_metadata(&l).is_err());
        let f = d.path().join("file");
        std::fs::write(&f, "x").unwrap();
        remove_tree(&f).unwrap();
        assert!(!f.exists());
    }
}
