//! Closure views: one directory per closure holding exactly its store paths, so a container
//! gets its whole closure with ONE read-only bind mount on `/nix/store`, whatever the
//! closure's size.
//!
//! # Layout
//!
//! ```text
//! views/<boot-id>/<key>            a complete view of the closure of the roots hashed into <key>
//! views/<boot-id>/.tmp-<key>-<n>   a view being built (or the leftover of a killed build)
//! views/.trash-<n>                 a view being removed
//! ```
//!
//! A view mirrors each closure path `store/<base>` at `<view>/<base>`: directories are made
//! (same mode and mtime), symlinks are recreated (same target), and regular files are **hard
//! links** to the store's files, so a view costs directory inodes and nothing per byte, and
//! its files are the store's files. The kernel does one mount per container instead of one
//! bind and one read-only remount per path, and the host gets no mount at all.
//!
//! `<key>` is [`key`] of the lock's roots: a view is looked up before anything else is read,
//! so a warm start costs one `stat` and one `readdir` instead of a record read and a `utimensat`
//! per closure path. The view's entries ARE the closure: nothing else to keep consistent.
//!
//! # Validity
//!
//! - A view is built under a unique temporary name and renamed into place
//!   (`RENAME_NOREPLACE`): a view that exists is complete. Two containers building the same
//!   view at once both succeed; the second's copy is removed.
//! - Views are only trusted during the boot that built them (`<boot-id>` is the kernel's
//!   `/proc/sys/kernel/random/boot_id`): a view's directory entries are not synced, so after a
//!   power loss it could miss entries. A new boot never looks at an old boot's views, and gc
//!   removes them.
//! - A view is built, looked up and used for a container with the store-wide gc lock held
//!   shared, and the container's pin covers its closure. gc, holding the lock exclusive,
//!   removes every view that holds a path it removes ([`Views::collect`]), before the path:
//!   no view ever outlives one of its paths, and no view a live container uses is removed.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};

use super::remove::{remove_tree, RemoveError};
use crate::nix::{nixbase32, StorePath};

/// Where views live: `{state-dir}/views`.
pub fn views_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("views")
}

const TMP_PREFIX: &str = ".tmp-";
const TRASH_PREFIX: &str = ".trash-";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Why a view could not be found, built or removed.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("closure view {}: {op}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("closure view {}: entry {name:?} is not a store path", view.display())]
    Entry { view: PathBuf, name: String },
    #[error("closure view: cannot read the boot id from {BOOT_ID}: {source}")]
    BootId { source: io::Error },
    #[error(transparent)]
    Remove(#[from] RemoveError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ViewError + 'a {
    move |source| ViewError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The view key of a lock's `roots` (order and duplicates do not matter): 32 nixbase32
/// characters of the SHA-256 of the sorted absolute paths, one per line.
pub fn key(roots: &[StorePath]) -> String {
    let mut sorted: Vec<String> = roots.iter().map(StorePath::to_absolute_path).collect();
    sorted.sort();
    sorted.dedup();
    let mut h = Sha256::new();
    for p in &sorted {
        h.update(p.as_bytes());
        h.update(b"\n");
    }
    nixbase32::encode(&h.finalize()[..20])
}

/// A complete view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The directory to bind-mount on `/nix/store`.
    pub dir: PathBuf,
    /// The closure it holds, sorted.
    pub closure: Vec<StorePath>,
}

/// What [`Views::collect`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// Views of this boot holding a removed path.
    pub views: usize,
    /// Views of earlier boots, unfinished builds and trash.
    pub leftovers: usize,
}

/// The views of one node store, for the running boot.
#[derive(Debug, Clone)]
pub struct Views {
    root: PathBuf,
    boot: String,
    store_dir: PathBuf,
}

impl Views {
    /// The views of the store under `state_dir`, for the running boot.
    pub fn open(state_dir: &Path) -> Result<Views, ViewError> {
        let boot = fs::read_to_string(BOOT_ID).map_err(|source| ViewError::BootId { source })?;
        Ok(Views::for_boot(state_dir, boot.trim()))
    }

    /// The views of the store under `state_dir` for boot `boot` (tests).
    pub fn for_boot(state_dir: &Path, boot: &str) -> Views {
        Views {
            root: views_dir(state_dir),
            boot: boot.to_owned(),
            store_dir: state_dir.join("store"),
        }
    }

    fn boot_dir(&self) -> PathBuf {
        self.root.join(&self.boot)
    }

    /// The view of `roots`' closure, if this boot built it.
    pub fn lookup(&self, roots: &[StorePath]) -> Result<Option<View>, ViewError> {
        let dir = self.boot_dir().join(key(roots));
        match read_view(&dir) {
            Ok(closure) => Ok(Some(View { dir, closure })),
            Err(ViewError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Builds (or finds) the view of `roots`, whose closure is `closure` (every path valid in
    /// the store). Nothing is left behind on failure.
    pub fn build(&self, roots: &[StorePath], closure: &[StorePath]) -> Result<View, ViewError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        if let Some(view) = self.lookup(roots)? {
            return Ok(view);
        }
        let boot_dir = self.boot_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&boot_dir)
            .map_err(io_err("create", &boot_dir))?;
        let key = key(roots);
        let dir = boot_dir.join(&key);
        let tmp = boot_dir.join(format!(
            "{TMP_PREFIX}{key}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let built = self.fill(&tmp, closure).and_then(|()| {
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &tmp,
                nix::fcntl::AT_FDCWD,
                &dir,
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            )
            .or_else(|e| match e {
                // Built meanwhile by another container of the same environment.
                nix::errno::Errno::EEXIST => Ok(()),
                e => Err(io_err("rename into place", &dir)(e.into())),
            })
        });
        if tmp.exists() {
            remove_tree(&tmp)?;
        }
        built?;
        let mut sorted = closure.to_vec();
        sorted.sort();
        sorted.dedup();
        tracing::debug!(view = %dir.display(), paths = sorted.len(), "closure view built");
        Ok(View {
            dir,
            closure: sorted,
        })
    }

    fn fill(&self, tmp: &Path, closure: &[StorePath]) -> Result<(), ViewError> {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(tmp)
            .map_err(io_err("create", tmp))?;
        for p in closure {
            let base = p.base_name();
            mirror(&self.store_dir.join(&base), &tmp.join(&base))?;
        }
        Ok(())
    }

    /// gc, with the store-wide gc lock held exclusive: removes the views of this boot that
    /// hold any of `removed`, and every view of an earlier boot, unfinished build and trash.
    pub fn collect(&self, removed: &BTreeSet<StorePath>) -> Result<Collected, ViewError> {
        let mut out = Collected::default();
        let boots = match fs::read_dir(&self.root) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("read", &self.root)(e)),
        };
        for entry in boots {
            let entry = entry.map_err(io_err("read", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != self.boot {
                self.trash(&entry.path())?;
                out.leftovers += 1;
                continue;
            }
            let boot_dir = entry.path();
            for view in fs::read_dir(&boot_dir).map_err(io_err("read", &boot_dir))? {
                let view = view.map_err(io_err("read", &boot_dir))?;
                let vname = view.file_name().to_string_lossy().into_owned();
                if vname.starts_with(TMP_PREFIX) {
                    self.trash(&view.path())?;
                    out.leftovers += 1;
                    continue;
                }
                let holds_removed = match read_view(&view.path()) {
                    Ok(closure) => closure.iter().any(|p| removed.contains(p)),
                    // Not a view this version made: nothing may rely on it.
                    Err(ViewError::Entry { .. }) => true,
                    Err(e) => return Err(e),
                };
                if holds_removed {
                    self.trash(&view.path())?;
                    out.views += 1;
                }
            }
        }
        self.purge_trash()?;
        Ok(out)
    }

    /// Renames `dir` out of sight (atomically), then removes it.
    fn trash(&self, dir: &Path) -> Result<(), ViewError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let trash = self.root.join(format!(
            "{TRASH_PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        if dir.file_name().is_some_and(|n| {
            n.to_string_lossy().starts_with(TRASH_PREFIX) && dir.parent() == Some(&self.root)
        }) {
            return Ok(remove_tree(dir)?);
        }
        fs::rename(dir, &trash).map_err(io_err("rename to trash", dir))?;
        Ok(remove_tree(&trash)?)
    }

    fn purge_trash(&self) -> Result<(), ViewError> {
        for entry in fs::read_dir(&self.root).map_err(io_err("read", &self.root))? {
            let entry = entry.map_err(io_err("read", &self.root))?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(TRASH_PREFIX)
            {
                remove_tree(&entry.path())?;
            }
        }
        Ok(())
    }

    /// The complete views of this boot (`nixenv ls`, tests).
    pub fn list(&self) -> Result<Vec<View>, ViewError> {
        let boot_dir = self.boot_dir();
        let entries = match fs::read_dir(&boot_dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &boot_dir)(e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(io_err("read", &boot_dir))?;
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                continue;
            }
            let dir = e.path();
            let closure = read_view(&dir)?;
            out.push(View { dir, closure });
        }
        out.sort_by(|a, b| a.dir.cmp(&b.dir));
        Ok(out)
    }
}

/// A view's closure: its entries, sorted.
fn read_view(dir: &Path) -> Result<Vec<StorePath>, ViewError> {
    let mut closure = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err("read", dir))? {
        let e = e.map_err(io_err("read", dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let p = StorePath::from_base_name(&name).map_err(|_| ViewError::Entry {
            view: dir.to_owned(),
            name,
        })?;
        closure.push(p);
    }
    closure.sort();
    Ok(closure)
}

/// Mirrors the tree at `src` to `dst`: directories made, symlinks recreated, files
/// hard-linked (copied only when the file has too many links already).
fn mirror(src: &Path, dst: &Path) -> Result<(), ViewError> {
    let meta = fs::symlink_metadata(src).map_err(io_err("stat", src))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(dst)
            .map_err(io_err("create", dst))?;
        for e in fs::read_dir(src).map_err(io_err("read", src))? {
            let e = e.map_err(io_err("read", src))?;
            mirror(&e.path(), &dst.join(e.file_name()))?;
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io_err("chmod", dst))?;
    } else if ft.is_symlink() {
        let target = fs::read_link(src).map_err(io_err("read link", src))?;
        std::os::unix::fs::symlink(&target, dst).map_err(io_err("create symlink", dst))?;
    } else {
        match fs::hard_link(src, dst) {
            Ok(()) => return Ok(()),
            // EMLINK: the file system's link limit (65,000 on ext4) reached by many views.
            Err(e) if e.raw_os_error() == Some(libc::EMLINK) => {
                fs::copy(src, dst).map_err(io_err("copy", dst))?;
            }
            Err(e) => return Err(io_err("hard link", dst)(e)),
        }
    }
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &TimeSpec::UTIME_OMIT,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io_err("set mtime of", dst)(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn sp(s: &str) -> StorePath {
        StorePath::from_base_name(s).unwrap()
    }

    const A: &str = "7rjj86a15146cq1d3qy068lml7n8ykzm-a-1.0";
    const B: &str = "ap0nnnlmsf1ph2qvcb4nqjfdqs2h8l4f-b-2.0";
    const C: &str = "0l5dhmxw8k9fq9bvr1d31g48yp3kfl0g-c";

    /// A store with A (a tree with a file, an executable, a symlink, a subdirectory), B (a
    /// file) and C (a symlink to A's file).
    fn store() -> (tempfile::TempDir, Views) {
        let t = tempfile::tempdir().unwrap();
        let s = t.path().join("store");
        let a = s.join(A);
        fs::create_dir_all(a.join("bin")).unwrap();
        fs::write(a.join("bin/run"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(a.join("bin/run"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::write(a.join("data"), "data").unwrap();
        fs::set_permissions(a.join("data"), fs::Permissions::from_mode(0o444)).unwrap();
        symlink("data", a.join("link")).unwrap();
        fs::set_permissions(a.join("bin"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::set_permissions(&a, fs::Permissions::from_mode(0o555)).unwrap();
        fs::write(s.join(B), "b").unwrap();
        symlink(format!("/nix/store/{A}/data"), s.join(C)).unwrap();
        let v = Views::for_boot(t.path(), "boot-1");
        (t, v)
    }

    #[test]
    fn the_key_ignores_order_and_duplicates() {
        assert_eq!(key(&[sp(A), sp(B)]), key(&[sp(B), sp(A), sp(B)]));
        assert_ne!(key(&[sp(A)]), key(&[sp(A), sp(B)]));
        assert_eq!(key(&[sp(A)]).len(), 32);
    }

    #[test]
    fn a_view_holds_exactly_the_closure_sharing_the_store_s_files() {
        let (t, v) = store();
        assert_eq!(v.lookup(&[sp(A)]).unwrap(), None);
        let view = v.build(&[sp(A)], &[sp(B), sp(A), sp(C)]).unwrap();
        assert_eq!(view.closure, vec![sp(C), sp(A), sp(B)]);
        assert_eq!(v.lookup(&[sp(A)]).unwrap(), Some(view.clone()));
        let store = t.path().join("store");
        let (sa, va) = (store.join(A), view.dir.join(A));
        for f in ["bin/run", "data"] {
            let (m1, m2) = (
                sa.join(f).metadata().unwrap(),
                va.join(f).metadata().unwrap(),
            );
            assert_eq!(
                (m1.dev(), m1.ino()),
                (m2.dev(), m2.ino()),
                "{f} is the store's file"
            );
        }
        assert_eq!(
            fs::read_link(va.join("link")).unwrap(),
            PathBuf::from("data")
        );
        assert_eq!(va.metadata().unwrap().mode() & 0o777, 0o555);
        assert_eq!(
            va.metadata().unwrap().mtime(),
            sa.metadata().unwrap().mtime()
        );
        assert_eq!(
            fs::read_link(view.dir.join(C)).unwrap(),
            PathBuf::from(format!("/nix/store/{A}/data"))
        );
        let mut names: Vec<_> = fs::read_dir(&view.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3);
        // Built again (another container of the same environment): the same view.
        assert_eq!(v.build(&[sp(A)], &[sp(A), sp(B), sp(C)]).unwrap(), view);
        let boot_dir = t.path().join("views/boot-1");
        assert_eq!(fs::read_dir(boot_dir).unwrap().count(), 1, "no leftovers");
    }

    #[test]
    fn a_failed_build_leaves_nothing() {
        let (t, v) = store();
        let missing = sp("1l5dhmxw8k9fq9bvr1d31g48yp3kfl0g-missing");
        let e = v.build(&[sp(A)], &[sp(A), missing]).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        assert_eq!(
            fs::read_dir(t.path().join("views/boot-1")).unwrap().count(),
            0
        );
        assert_eq!(v.lookup(&[sp(A)]).unwrap(), None);
    }

    #[test]
    fn gc_removes_views_holding_a_removed_path_and_other_boots_views() {
        let (t, v) = store();
        let ab = v.build(&[sp(A)], &[sp(A), sp(B)]).unwrap();
        let c = v.build(&[sp(C)], &[sp(C)]).unwrap();
        let old = Views::for_boot(t.path(), "boot-0");
        old.build(&[sp(C)], &[sp(C)]).unwrap();
        fs::create_dir(t.path().join("views/boot-1/.tmp-x-1-0")).unwrap();
        let got = v.collect(&BTreeSet::from([sp(B)])).unwrap();
        assert_eq!(
            got,
            Collected {
                views: 1,
                leftovers: 2
            }
        );
        assert!(!ab.dir.exists());
        assert_eq!(v.list().unwrap(), vec![c]);
        assert!(!t.path().join("views/boot-0").exists());
        // The store's files are untouched.
        assert!(t.path().join("store").join(A).join("data").exists());
        let names: Vec<_> = fs::read_dir(t.path().join("views"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["boot-1".to_string()]);
    }
}
