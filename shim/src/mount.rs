//! The rootfs mounts containerd passes with Create, mounted onto `<bundle>/rootfs` and
//! unmounted on delete or on a failed create. Mounts with `uidmap=`/`gidmap=` options (a
//! user-namespaced pod on containerd 2.x) are made idmapped ([`crate::idmap`]).

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount;

use crate::idmap::{self, IdmapError};

/// Why a rootfs could not be mounted or unmounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("create {path}: {source}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {kind} {source_path} on {target}: {message}")]
    Mount {
        kind: String,
        source_path: String,
        target: PathBuf,
        message: String,
    },
    #[error("idmapped {kind} mount of {source_path} on {target}: {source}")]
    Idmap {
        kind: String,
        source_path: String,
        target: PathBuf,
        #[source]
        source: Box<IdmapError>,
    },
    #[error("unmount {target}: {source}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Mounts `mounts` in order onto `rootfs` (created if missing). On failure, whatever was
/// mounted is unmounted again.
pub async fn mount_all(mounts: &[Mount], rootfs: &Path) -> Result<(), MountError> {
    if mounts.is_empty() {
        return Ok(());
    }
    tokio::fs::create_dir_all(rootfs)
        .await
        .map_err(|source| MountError::Mkdir {
            path: rootfs.to_owned(),
            source,
        })?;
    for m in mounts {
        if let Err(e) = mount_one(m, rootfs).await {
            let _ = unmount_all(rootfs);
            return Err(e);
        }
    }
    Ok(())
}

async fn mount_one(m: &Mount, rootfs: &Path) -> Result<(), MountError> {
    let idmap_err = |source| MountError::Idmap {
        kind: m.type_.clone(),
        source_path: m.source.clone(),
        target: rootfs.to_owned(),
        source: Box::new(source),
    };
    let Some(req) = idmap::parse_options(&m.options).map_err(idmap_err)? else {
        return plain_mount(m, rootfs).await;
    };
    let userns = idmap::user_namespace(&req.uids, &req.gids).map_err(idmap_err)?;
    let mut plain = m.clone();
    if m.type_ == "overlay" {
        // The overlay over idmapped clones of its layers; the clones go once it is mounted.
        let lowers =
            idmap::lowerdirs(&req.options).ok_or_else(|| idmap_err(IdmapError::NoLowerdir))?;
        let scratch = rootfs.with_extension("idmapped-layers");
        let clones = idmap::clone_lowers(&lowers, &scratch, &userns).map_err(idmap_err)?;
        plain.options = idmap::with_lowerdirs(&req.options, &clones);
        let mounted = plain_mount(&plain, rootfs).await;
        idmap::release_clones(&scratch);
        return mounted;
    }
    // A bind (a snapshot without parents): an idmapped clone stacked on it, unless the
    // snapshotter already made its directory the namespace root's (containerd's overlayfs
    // snapshotter chowns an active snapshot without parents to the mapped root, so that the
    // container can create its mountpoints; idmapping it again would hide it from that root).
    plain.options = req.options.clone();
    plain_mount(&plain, rootfs).await?;
    if idmap::owned_by_mapped_root(Path::new(&m.source), &req) {
        return Ok(());
    }
    let readonly = req.options.iter().any(|o| o == "ro");
    idmap::idmapped_clone(rootfs, rootfs, &userns, readonly).map_err(idmap_err)
}

async fn plain_mount(m: &Mount, rootfs: &Path) -> Result<(), MountError> {
    containerd_shim::asynchronous::util::mount_rootfs(m, rootfs)
        .await
        .map_err(|e| MountError::Mount {
            kind: m.type_.clone(),
            source_path: m.source.clone(),
            target: rootfs.to_owned(),
            message: e.to_string(),
        })
}

/// Unmounts everything stacked on `target` (idempotent: an unmounted or missing target is fine).
pub fn unmount_all(target: &Path) -> Result<(), MountError> {
    use nix::errno::Errno;
    use nix::mount::{umount2, MntFlags};
    for _ in 0..64 {
        match umount2(target, MntFlags::empty()) {
            Ok(()) => continue,
            Err(Errno::EINVAL) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EBUSY) => {
                return umount2(target, MntFlags::MNT_DETACH).map_err(|source| {
                    MountError::Unmount {
                        target: target.to_owned(),
                        source,
                    }
                })
            }
            Err(source) => {
                return Err(MountError::Unmount {
                    target: target.to_owned(),
                    source,
                })
            }
        }
    }
    Ok(())
}
