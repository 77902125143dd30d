//! The rootfs mounts containerd passes with Create, mounted onto `<bundle>/rootfs` and
//! unmounted on delete or on a failed create.

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount;

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
        if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(m, rootfs).await {
            let _ = unmount_all(rootfs);
            return Err(MountError::Mount {
                kind: m.type_.clone(),
                source_path: m.source.clone(),
                target: rootfs.to_owned(),
                message: e.to_string(),
            });
        }
    }
    Ok(())
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
