//! The prestart hook's mounts: a closure bind-mounted read-only under `/nix/store` of a container
//! whose mount namespace exists but whose root is not pivoted yet (OCI `prestart` and
//! `createRuntime` hooks run at that point), from inside that namespace.
//!
//! In the container's namespace the rootfs is still at its host path, so the mounts go to
//! `<rootfs>/nix/store/<base>` and move with the rootfs on pivot_root. `/nix/store` becomes a
//! tmpfs holding only the closure's mountpoints (the container sees its closure and nothing
//! else), made read-only at the end. Any failure unmounts what was mounted, in reverse order.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Why the closure could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("container rootfs {path}: {what} is a symlink, refusing to mount through it")]
    Symlink { path: PathBuf, what: &'static str },
    #[error("{op} {path}: {source}")]
    Syscall {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store path {path} is missing from the node store: {source}")]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter the mount namespace of pid {pid}: {source}")]
    Setns {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("bad mount helper arguments: {0}")]
    Usage(&'static str),
}

/// What a store path is, for its mountpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// A directory: bind-mounted onto a directory.
    Dir,
    /// A regular file: bind-mounted onto an empty file.
    File,
    /// A symlink: recreated inside the tmpfs with the same target.
    Symlink(PathBuf),
}

/// The mount syscalls, as a trait (the unit tests record them instead).
pub trait Mounter {
    /// What `path` is, without following a final symlink; `None` if it does not exist.
    fn kind(&mut self, path: &Path) -> std::io::Result<Option<SourceKind>>;
    /// `mkdir(path, 0755)`.
    fn mkdir(&mut self, path: &Path) -> std::io::Result<()>;
    /// Creates an empty file to mount a file onto.
    fn touch(&mut self, path: &Path) -> std::io::Result<()>;
    /// `symlink(target, path)`.
    fn symlink(&mut self, target: &Path, path: &Path) -> std::io::Result<()>;
    /// A fresh tmpfs (mode 0755, nosuid, nodev) on `path`.
    fn mount_tmpfs(&mut self, path: &Path) -> std::io::Result<()>;
    /// `mount --bind source target`.
    fn bind(&mut self, source: &Path, target: &Path) -> std::io::Result<()>;
    /// Remounts the mount at `path` read-only, nosuid, nodev (`bind`: it is a bind mount).
    fn remount_ro(&mut self, path: &Path, bind: bool) -> std::io::Result<()>;
    /// Detaches the mount at `path`.
    fn unmount(&mut self, path: &Path) -> std::io::Result<()>;
}

/// Mounts `sources` (paths in the node store, named `<hash>-<name>`) at
/// `<rootfs>/nix/store/<base>` read-only; on failure, nothing stays mounted.
pub fn mount_closure<M: Mounter>(
    m: &mut M,
    rootfs: &Path,
    sources: &[PathBuf],
) -> Result<(), MountError> {
    let mut mounted: Vec<PathBuf> = Vec::new();
    let result = mount_all(m, rootfs, sources, &mut mounted);
    if result.is_err() {
        for path in mounted.iter().rev() {
            let _ = m.unmount(path);
        }
    }
    result
}

fn mount_all<M: Mounter>(
    m: &mut M,
    rootfs: &Path,
    sources: &[PathBuf],
    mounted: &mut Vec<PathBuf>,
) -> Result<(), MountError> {
    let sys = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| MountError::Syscall { op, path, source }
    };
    let nix = rootfs.join("nix");
    let store = nix.join("store");
    for (dir, what) in [(&nix, "/nix"), (&store, "/nix/store")] {
        match m.kind(dir).map_err(sys("stat", dir))? {
            None => m.mkdir(dir).map_err(sys("mkdir", dir))?,
            Some(SourceKind::Dir) => {}
            Some(_) => {
                return Err(MountError::Symlink {
                    path: rootfs.to_owned(),
                    what,
                });
            }
        }
    }
    m.mount_tmpfs(&store)
        .map_err(sys("mount tmpfs on", &store))?;
    mounted.push(store.clone());
    for source in sources {
        let Some(base) = source.file_name() else {
            return Err(MountError::Usage("a store path without a name"));
        };
        let target = store.join(base);
        let kind = m
            .kind(source)
            .map_err(|e| MountError::Source {
                path: source.clone(),
                source: e,
            })?
            .ok_or_else(|| MountError::Source {
                path: source.clone(),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
        match kind {
            SourceKind::Symlink(link) => {
                m.symlink(&link, &target).map_err(sys("symlink", &target))?;
                continue;
            }
            SourceKind::Dir => m.mkdir(&target).map_err(sys("mkdir", &target))?,
            SourceKind::File => m.touch(&target).map_err(sys("create", &target))?,
        }
        m.bind(source, &target)
            .map_err(sys("bind mount onto", &target))?;
        mounted.push(target.clone());
        m.remount_ro(&target, true)
            .map_err(sys("remount read-only", &target))?;
    }
    m.remount_ro(&store, false)
        .map_err(sys("remount read-only", &store))?;
    Ok(())
}

/// The real syscalls.
#[derive(Debug, Default)]
pub struct RealMounter;

impl Mounter for RealMounter {
    fn kind(&mut self, path: &Path) -> std::io::Result<Option<SourceKind>> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                Ok(Some(SourceKind::Symlink(std::fs::read_link(path)?)))
            }
            Ok(meta) if meta.is_dir() => Ok(Some(SourceKind::Dir)),
            Ok(_) => Ok(Some(SourceKind::File)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn mkdir(&mut self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o755).create(path)
    }

    fn touch(&mut self, path: &Path) -> std::io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map(drop)
    }

    fn symlink(&mut self, target: &Path, path: &Path) -> std::io::Result<()> {
        std::os::unix::fs::symlink(target, path)
    }

    fn mount_tmpfs(&mut self, path: &Path) -> std::io::Result<()> {
        use nix::mount::{mount, MsFlags};
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        )
        .map_err(std::io::Error::from)
    }

    fn bind(&mut self, source: &Path, target: &Path) -> std::io::Result<()> {
        use nix::mount::{mount, MsFlags};
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(std::io::Error::from)
    }

    fn remount_ro(&mut self, path: &Path, bind: bool) -> std::io::Result<()> {
        use nix::mount::{mount, MsFlags};
        let mut flags =
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if bind {
            flags |= MsFlags::MS_BIND;
        }
        mount(None::<&str>, path, None::<&str>, flags, None::<&str>).map_err(std::io::Error::from)
    }

    fn unmount(&mut self, path: &Path) -> std::io::Result<()> {
        nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(std::io::Error::from)
    }
}

/// Entering another process' mount namespace.
pub trait Namespaces {
    /// Moves this (single-threaded) process into the mount namespace of `pid`.
    fn enter_mount_ns(&mut self, pid: i32) -> Result<(), MountError>;
}

/// `setns(open("/proc/<pid>/ns/mnt"), CLONE_NEWNS)`.
#[derive(Debug, Default)]
pub struct RealNamespaces;

impl Namespaces for RealNamespaces {
    fn enter_mount_ns(&mut self, pid: i32) -> Result<(), MountError> {
        let err = |source| MountError::Setns { pid, source };
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).map_err(err)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(|e| err(std::io::Error::from(e)))
    }
}

/// The hidden subcommand that runs the mounts in a fresh, single-threaded process (setns into
/// a mount namespace is refused to a multi-threaded one).
pub const MOUNT_SUBCOMMAND: &str = "mount-closure";

/// Arguments of [`MOUNT_SUBCOMMAND`]: `PID ROOTFS SOURCE…`.
pub fn mount_args(pid: i32, rootfs: &Path, sources: &[PathBuf]) -> Vec<OsString> {
    let mut args = vec![
        MOUNT_SUBCOMMAND.into(),
        pid.to_string().into(),
        rootfs.into(),
    ];
    args.extend(sources.iter().map(|s| s.clone().into_os_string()));
    args
}

/// Runs [`MOUNT_SUBCOMMAND`] (arguments after the subcommand).
pub fn mount_main<N: Namespaces, M: Mounter>(
    ns: &mut N,
    m: &mut M,
    args: &[OsString],
) -> Result<(), MountError> {
    let [pid, rootfs, sources @ ..] = args else {
        return Err(MountError::Usage("expected PID ROOTFS SOURCE…"));
    };
    let pid: i32 = pid
        .to_str()
        .and_then(|p| p.parse().ok())
        .filter(|p| *p > 0)
        .ok_or(MountError::Usage("PID must be a positive integer"))?;
    let rootfs = Path::new(rootfs);
    if !rootfs.is_absolute() {
        return Err(MountError::Usage("ROOTFS must be absolute"));
    }
    let sources: Vec<PathBuf> = sources.iter().map(PathBuf::from).collect();
    ns.enter_mount_ns(pid)?;
    mount_closure(m, rootfs, &sources)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Records syscalls against an in-memory tree; fails the `fail_at`-th bind.
    #[derive(Default)]
    struct Fake {
        tree: BTreeMap<PathBuf, SourceKind>,
        mounts: Vec<(PathBuf, String)>,
        log: Vec<String>,
        fail_bind: Option<usize>,
        binds: usize,
    }

    impl Mounter for Fake {
        fn kind(&mut self, path: &Path) -> std::io::Result<Option<SourceKind>> {
            Ok(self.tree.get(path).cloned())
        }
        fn mkdir(&mut self, path: &Path) -> std::io::Result<()> {
            self.log.push(format!("mkdir {}", path.display()));
            self.tree.insert(path.to_owned(), SourceKind::Dir);
            Ok(())
        }
        fn touch(&mut self, path: &Path) -> std::io::Result<()> {
            self.log.push(format!("touch {}", path.display()));
            Ok(())
        }
        fn symlink(&mut self, target: &Path, path: &Path) -> std::io::Result<()> {
            self.log.push(format!(
                "symlink {} -> {}",
                path.display(),
                target.display()
            ));
            Ok(())
        }
        fn mount_tmpfs(&mut self, path: &Path) -> std::io::Result<()> {
            self.mounts.push((path.to_owned(), "tmpfs".into()));
            self.log.push(format!("tmpfs {}", path.display()));
            Ok(())
        }
        fn bind(&mut self, source: &Path, target: &Path) -> std::io::Result<()> {
            self.binds += 1;
            if self.fail_bind == Some(self.binds) {
                return Err(std::io::ErrorKind::PermissionDenied.into());
            }
            self.mounts
                .push((target.to_owned(), source.display().to_string()));
            self.log
                .push(format!("bind {} {}", source.display(), target.display()));
            Ok(())
        }
        fn remount_ro(&mut self, path: &Path, bind: bool) -> std::io::Result<()> {
            self.log.push(format!("ro {} {bind}", path.display()));
            Ok(())
        }
        fn unmount(&mut self, path: &Path) -> std::io::Result<()> {
            let i = self
                .mounts
                .iter()
                .rposition(|(p, _)| p == path)
                .expect("mounted");
            self.mounts.remove(i);
            self.log.push(format!("umount {}", path.display()));
            Ok(())
        }
    }

    fn fake() -> Fake {
        let mut f = Fake::default();
        f.tree.insert("/s/aaa-glibc".into(), SourceKind::Dir);
        f.tree.insert("/s/bbb-echoserver".into(), SourceKind::Dir);
        f.tree.insert("/s/ccc-file".into(), SourceKind::File);
        f.tree.insert(
            "/s/ddd-link".into(),
            SourceKind::Symlink("/nix/store/aaa-glibc".into()),
        );
        f
    }

    fn sources() -> Vec<PathBuf> {
        [
            "/s/aaa-glibc",
            "/s/bbb-echoserver",
            "/s/ccc-file",
            "/s/ddd-link",
        ]
        .map(PathBuf::from)
        .to_vec()
    }

    #[test]
    fn mounts_each_path_read_only_on_a_read_only_tmpfs() {
        let mut f = fake();
        mount_closure(&mut f, Path::new("/rootfs"), &sources()).unwrap();
        assert_eq!(
            f.log,
            [
                "mkdir /rootfs/nix",
                "mkdir /rootfs/nix/store",
                "tmpfs /rootfs/nix/store",
                "mkdir /rootfs/nix/store/aaa-glibc",
                "bind /s/aaa-glibc /rootfs/nix/store/aaa-glibc",
                "ro /rootfs/nix/store/aaa-glibc true",
                "mkdir /rootfs/nix/store/bbb-echoserver",
                "bind /s/bbb-echoserver /rootfs/nix/store/bbb-echoserver",
                "ro /rootfs/nix/store/bbb-echoserver true",
                "touch /rootfs/nix/store/ccc-file",
                "bind /s/ccc-file /rootfs/nix/store/ccc-file",
                "ro /rootfs/nix/store/ccc-file true",
                "symlink /rootfs/nix/store/ddd-link -> /nix/store/aaa-glibc",
                "ro /rootfs/nix/store false",
            ]
        );
        assert_eq!(f.mounts.len(), 4);
    }

    #[test]
    fn a_failure_unmounts_everything_in_reverse() {
        let mut f = Fake {
            fail_bind: Some(2),
            ..fake()
        };
        let err = mount_closure(&mut f, Path::new("/rootfs"), &sources()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bind mount onto /rootfs/nix/store/bbb-echoserver: permission denied"
        );
        assert!(f.mounts.is_empty(), "leaked: {:?}", f.mounts);
        assert_eq!(
            f.log[f.log.len() - 2..],
            [
                "umount /rootfs/nix/store/aaa-glibc",
                "umount /rootfs/nix/store"
            ]
        );
    }

    #[test]
    fn a_missing_source_fails_before_mounting_it() {
        let mut f = fake();
        let mut s = sources();
        s.insert(1, "/s/zzz-missing".into());
        let err = mount_closure(&mut f, Path::new("/rootfs"), &s).unwrap_err();
        assert!(
            err.to_string().contains("/s/zzz-missing is missing"),
            "{err}"
        );
        assert!(f.mounts.is_empty());
    }

    #[test]
    fn refuses_a_symlinked_nix_in_the_rootfs() {
        let mut f = fake();
        f.tree
            .insert("/rootfs/nix".into(), SourceKind::Symlink("/etc".into()));
        let err = mount_closure(&mut f, Path::new("/rootfs"), &sources()).unwrap_err();
        assert!(
            matches!(err, MountError::Symlink { what: "/nix", .. }),
            "{err}"
        );
        assert!(f.mounts.is_empty() && f.log.is_empty());
    }

    struct FakeNs(Vec<i32>);
    impl Namespaces for FakeNs {
        fn enter_mount_ns(&mut self, pid: i32) -> Result<(), MountError> {
            self.0.push(pid);
            Ok(())
        }
    }

    #[test]
    fn helper_arguments_round_trip() {
        let args = mount_args(42, Path::new("/rootfs"), &sources());
        assert_eq!(args[0], MOUNT_SUBCOMMAND);
        let (mut ns, mut f) = (FakeNs(vec![]), fake());
        mount_main(&mut ns, &mut f, &args[1..]).unwrap();
        assert_eq!(ns.0, [42]);
        assert_eq!(f.mounts.len(), 4);
        let bad: Vec<OsString> = vec!["0".into(), "/r".into()];
        assert!(matches!(
            mount_main(&mut ns, &mut f, &bad),
            Err(MountError::Usage(_))
        ));
        let bad: Vec<OsString> = vec!["1".into(), "rel".into()];
        assert!(matches!(
            mount_main(&mut ns, &mut f, &bad),
            Err(MountError::Usage(_))
        ));
    }
}
