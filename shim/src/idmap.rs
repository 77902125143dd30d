//! Idmapped rootfs mounts: what containerd 2.x asks of a shim for a user-namespaced pod.
//!
//! When a pod has its own user namespace (CRI `userns_options`, Kubernetes `hostUsers:
//! false`) and the overlayfs snapshotter finds the kernel able to idmap, the rootfs mounts
//! containerd passes with Create carry `uidmap=C:H:N[,C:H:N…]` and `gidmap=…` options (container
//! id, host id, count, as in `/proc/PID/uid_map`). They are no mount options the kernel knows: the
//! shim must make the files of the image's layers (owned by host ids) appear owned by the
//! mapped ids.
//!
//! - overlay: each `lowerdir` is cloned as an idmapped, read-only mount in a scratch directory
//!   and the overlay is mounted over those clones (overlayfs on idmapped layers: Linux 5.19);
//!   the clones are detached afterwards (the overlay keeps its own references).
//! - bind (a snapshot without parents): the bind is mounted, then an idmapped clone of it is
//!   stacked on it, unless its directory is already owned by the mapped root (containerd's
//!   overlayfs snapshotter chowns an active snapshot without parents, e.g. of an image with no
//!   layers, so its container can create mountpoints in it).
//!
//! The mapping's user namespace is made by a child cloned into a new user namespace (no exec,
//! it only waits on a pipe), whose `uid_map` and `gid_map` are written before its namespace
//! file is opened; the child then exits and is waited for (it has no exit signal, so the
//! shim's reaper never sees it).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The uidmap option containerd's overlayfs snapshotter adds.
pub const UIDMAP: &str = "uidmap=";
/// The gidmap option.
pub const GIDMAP: &str = "gidmap=";

/// One line of a uid or gid map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub container: u32,
    pub host: u32,
    pub count: u32,
}

/// What an idmapped rootfs mount asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdmapRequest {
    pub uids: Vec<IdRange>,
    pub gids: Vec<IdRange>,
    /// The other options, in order.
    pub options: Vec<String>,
}

/// Why an idmapped mount could not be made.
#[derive(Debug, thiserror::Error)]
pub enum IdmapError {
    #[error("invalid id mapping {value:?} (want container-id:host-id:count[,…])")]
    Mapping { value: String },
    #[error("{option} without {missing}: both uid and gid mappings are needed")]
    OneMapping {
        option: &'static str,
        missing: &'static str,
    },
    #[error("overlay mount without lowerdir")]
    NoLowerdir,
    #[error("cannot make a user namespace for the id mapping: {step}: {source}")]
    Userns {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make an idmapped mount of {} on {}: {step}: {source}{hint}", .source_path.display(), .target.display(), hint = fs_hint(.source))]
    Mount {
        source_path: PathBuf,
        target: PathBuf,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", .path.display())]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn fs_hint(e: &std::io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EINVAL) {
        " (the file system may not support idmapped mounts on this kernel)"
    } else {
        ""
    }
}

fn parse_ranges(value: &str) -> Result<Vec<IdRange>, IdmapError> {
    let bad = || IdmapError::Mapping {
        value: value.to_owned(),
    };
    value
        .split(',')
        .map(|part| {
            let mut it = part.split(':').map(|n| n.parse::<u32>());
            match (it.next(), it.next(), it.next(), it.next()) {
                (Some(Ok(container)), Some(Ok(host)), Some(Ok(count)), None) if count > 0 => {
                    Ok(IdRange {
                        container,
                        host,
                        count,
                    })
                }
                _ => Err(bad()),
            }
        })
        .collect()
}

/// The mappings in `options`, if any; the other options kept in order.
pub fn parse_options(options: &[String]) -> Result<Option<IdmapRequest>, IdmapError> {
    let mut uids = None;
    let mut gids = None;
    let mut rest = Vec::with_capacity(options.len());
    for o in options {
        if let Some(v) = o.strip_prefix(UIDMAP) {
            uids = Some(parse_ranges(v)?);
        } else if let Some(v) = o.strip_prefix(GIDMAP) {
            gids = Some(parse_ranges(v)?);
        } else {
            rest.push(o.clone());
        }
    }
    match (uids, gids) {
        (None, None) => Ok(None),
        (Some(uids), Some(gids)) => Ok(Some(IdmapRequest {
            uids,
            gids,
            options: rest,
        })),
        (Some(_), None) => Err(IdmapError::OneMapping {
            option: "uidmap",
            missing: "gidmap",
        }),
        (None, Some(_)) => Err(IdmapError::OneMapping {
            option: "gidmap",
            missing: "uidmap",
        }),
    }
}

/// The overlay's lower directories, top first (`lowerdir=a:b:c`).
pub fn lowerdirs(options: &[String]) -> Option<Vec<PathBuf>> {
    options
        .iter()
        .rev()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .map(|v| v.split(':').map(PathBuf::from).collect())
}

/// `options` with `lowerdir` set to `dirs`.
pub fn with_lowerdirs(options: &[String], dirs: &[PathBuf]) -> Vec<String> {
    let joined = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    options
        .iter()
        .map(|o| {
            if o.starts_with("lowerdir=") {
                format!("lowerdir={joined}")
            } else {
                o.clone()
            }
        })
        .collect()
}

/// The host id `ranges` map container id 0 to.
pub fn host_root(ranges: &[IdRange]) -> Option<u32> {
    ranges.iter().find(|r| r.container == 0).map(|r| r.host)
}

/// Whether `dir` is owned by the host ids of the request's container root (already shifted).
pub fn owned_by_mapped_root(dir: &Path, req: &IdmapRequest) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return false;
    };
    host_root(&req.uids) == Some(meta.uid()) && host_root(&req.gids) == Some(meta.gid())
}

fn map_text(ranges: &[IdRange]) -> String {
    ranges
        .iter()
        .map(|r| format!("{} {} {}\n", r.container, r.host, r.count))
        .collect()
}

/// A user namespace with `uids` and `gids` (its `/proc/PID/ns/user` file, open).
pub fn user_namespace(uids: &[IdRange], gids: &[IdRange]) -> Result<OwnedFd, IdmapError> {
    let err = |step| move |source| IdmapError::Userns { step, source };
    let (read, write) = nix::unistd::pipe().map_err(|e| err("pipe")(e.into()))?;
    let (r, w) = (read.as_raw_fd(), write.as_raw_fd());
    // SAFETY: a clone without CLONE_VM is a fork; the child only makes async-signal-safe
    // calls (close, read, _exit) on memory it owns. It has no exit signal: only a __WALL
    // wait sees it.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::CLONE_NEWUSER as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            libc::close(w);
            let mut b = 0u8;
            libc::read(r, (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    if pid < 0 {
        return Err(err("clone")(std::io::Error::last_os_error()));
    }
    drop(read);
    let pid = pid as libc::pid_t;
    let result = (|| {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        std::fs::write(proc.join("uid_map"), map_text(uids)).map_err(err("write uid_map"))?;
        std::fs::write(proc.join("gid_map"), map_text(gids)).map_err(err("write gid_map"))?;
        let f = std::fs::File::open(proc.join("ns/user")).map_err(err("open ns/user"))?;
        Ok(OwnedFd::from(f))
    })();
    drop(write);
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
    result
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// Mounts an idmapped clone of the mount tree at `source` (with `userns`' mapping, read-only
/// if `readonly`) on `target`.
pub fn idmapped_clone(
    source: &Path,
    target: &Path,
    userns: &OwnedFd,
    readonly: bool,
) -> Result<(), IdmapError> {
    let err = |step| {
        move |e: std::io::Error| IdmapError::Mount {
            source_path: source.to_owned(),
            target: target.to_owned(),
            step,
            source: e,
        }
    };
    let src = cpath(source);
    // SAFETY: plain syscalls on a NUL-terminated path; the fd returned is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
        )
    };
    if fd < 0 {
        return Err(err("open_tree")(std::io::Error::last_os_error()));
    }
    // SAFETY: open_tree returned a new fd.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | if readonly { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: `attr` lives across the call, its size is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(err("mount_setattr")(std::io::Error::last_os_error()));
    }
    let dst = cpath(target);
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(err("move_mount")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Idmapped, read-only clones of `lowers` in `scratch/0`, `scratch/1`, …: the overlay's new
/// lower directories. [`release_clones`] detaches them (also on failure here).
pub fn clone_lowers(
    lowers: &[PathBuf],
    scratch: &Path,
    userns: &OwnedFd,
) -> Result<Vec<PathBuf>, IdmapError> {
    let mut out = Vec::with_capacity(lowers.len());
    for (i, lower) in lowers.iter().enumerate() {
        let dir = scratch.join(i.to_string());
        let made = std::fs::create_dir_all(&dir)
            .map_err(|source| IdmapError::Scratch {
                path: dir.clone(),
                source,
            })
            .and_then(|()| idmapped_clone(lower, &dir, userns, true));
        if let Err(e) = made {
            release_clones(scratch);
            return Err(e);
        }
        out.push(dir);
    }
    Ok(out)
}

/// Detaches the clones in `scratch` and removes it (best effort: what remains is logged).
pub fn release_clones(scratch: &Path) {
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return;
    };
    for dir in entries.flatten().map(|e| e.path()) {
        let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        if let Err(e) = std::fs::remove_dir(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an idmapped layer's mountpoint");
        }
    }
    if let Err(e) = std::fs::remove_dir(scratch) {
        tracing::warn!(dir = %scratch.display(), error = %e, "cannot remove the idmapped layers' directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_give_the_mappings_and_keep_the_rest() {
        let r = parse_options(&s(&[
            "index=off",
            "lowerdir=/l/2:/l/1",
            "uidmap=0:65536:65536",
            "gidmap=0:65536:1000,1000:100000:10",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            r.uids,
            [IdRange {
                container: 0,
                host: 65536,
                count: 65536
            }]
        );
        assert_eq!(r.gids.len(), 2);
        assert_eq!(r.gids[1].host, 100000);
        assert_eq!(r.options, s(&["index=off", "lowerdir=/l/2:/l/1"]));
        assert_eq!(parse_options(&s(&["ro", "rbind"])).unwrap(), None);
        for bad in [
            vec!["uidmap=0:1", "gidmap=0:1:1"],
            vec!["uidmap=0:x:1", "gidmap=0:1:1"],
            vec!["uidmap=0:1:0", "gidmap=0:1:1"],
        ] {
            let e = parse_options(&s(&bad)).unwrap_err().to_string();
            assert!(e.starts_with("invalid id mapping"), "{e}");
        }
        assert_eq!(
            parse_options(&s(&["uidmap=0:1:1"]))
                .unwrap_err()
                .to_string(),
            "uidmap without gidmap: both uid and gid mappings are needed"
        );
    }

    #[test]
    fn a_directory_chowned_to_the_mapped_root_is_already_shifted() {
        let req = parse_options(&s(&["uidmap=0:65536:65536", "gidmap=0:70000:65536"]))
            .unwrap()
            .unwrap();
        assert_eq!(host_root(&req.uids), Some(65536));
        assert_eq!(host_root(&req.gids), Some(70000));
        let dir = tempfile::tempdir().unwrap();
        let me = std::fs::metadata(dir.path()).unwrap();
        let mine = IdmapRequest {
            uids: vec![IdRange {
                container: 0,
                host: me.uid(),
                count: 1,
            }],
            gids: vec![IdRange {
                container: 0,
                host: me.gid(),
                count: 1,
            }],
            options: vec![],
        };
        assert!(owned_by_mapped_root(dir.path(), &mine));
        assert!(!owned_by_mapped_root(dir.path(), &req) || me.uid() == 65536);
        assert!(!owned_by_mapped_root(&dir.path().join("absent"), &mine));
    }

    #[test]
    fn lowerdirs_are_replaced_in_place() {
        let o = s(&["lowerdir=/a:/b", "upperdir=/u", "workdir=/w"]);
        assert_eq!(
            lowerdirs(&o),
            Some(vec![PathBuf::from("/a"), PathBuf::from("/b")])
        );
        assert_eq!(
            with_lowerdirs(&o, &[PathBuf::from("/x/0"), PathBuf::from("/x/1")]),
            s(&["lowerdir=/x/0:/x/1", "upperdir=/u", "workdir=/w"])
        );
        assert_eq!(lowerdirs(&s(&["ro"])), None);
    }

    /// Needs root and a kernel that idmaps the temp dir's file system (tmpfs: 6.3, ext4: 5.12).
    #[test]
    fn an_idmapped_clone_shows_host_root_as_the_mapped_id() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        std::fs::create_dir(&layer).unwrap();
        std::fs::write(layer.join("file"), "x").unwrap();
        let map = [IdRange {
            container: 0,
            host: 65536,
            count: 65536,
        }];
        let userns = user_namespace(&map, &map).unwrap();
        let scratch = dir.path().join("scratch");
        let clones = clone_lowers(std::slice::from_ref(&layer), &scratch, &userns).unwrap();
        // Host uid 0 on disk is seen through the clone as the namespace's 0: host 65536.
        let meta = std::fs::metadata(clones[0].join("file")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65536, 65536));
        assert_eq!(
            std::fs::read_to_string(clones[0].join("file")).unwrap(),
            "x"
        );
        let e = std::fs::write(clones[0].join("new"), "y").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        release_clones(&scratch);
        assert!(!scratch.exists());
        assert_eq!(std::fs::metadata(layer.join("file")).unwrap().uid(), 0);
    }
}
