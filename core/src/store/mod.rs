//! The node store at `{state-dir}/store`: atomic installs, per-path locks across processes,
//! crash cleanup, and the local metadata that lets a warm pull run without any network.
//!
//! # Layout under `{state-dir}`
//!
//! ```text
//! store/<hash>-<name>        a valid store path (read-only tree, file or symlink, as unpacked)
//! store/.tmp-<hash>          an install in progress (or a leftover of a crashed one)
//! meta/<hash>.json           the path's record: path, references, NarHash, NarSize, registration time
//! meta/<hash>.json.tmp       a record being written
//! locks/<hash>.lock          flock(2) target serialising installs/removals of one path
//! ```
//!
//! Directories are created `0755`; store paths keep the modes the NAR unpacker gives them
//! (files 0444/0555, directories 0555). Entries of `store/` starting with `.` are never store
//! paths (a store path starts with its nixbase32 hash).
//!
//! # Validity and the commit protocol
//!
//! A path is *valid* when its record `meta/<hash>.json` parses, names that exact path, and
//! `store/<hash>-<name>` exists. Install, always under the path's lock:
//!
//! 1. remove leftovers: `store/.tmp-<hash>`, and a `store/<hash>-<name>` whose record is
//!    missing or unreadable;
//! 2. unpack (and verify, by the caller) into `store/.tmp-<hash>` — same directory, so same
//!    file system;
//! 3. write the record: `meta/<hash>.json.tmp`, renamed to `meta/<hash>.json`;
//! 4. make the tree and the record durable: by default ([`Durability::Syncfs`]) one
//!    `syncfs(2)` of the store's file system (and of `meta/`'s, if another), which writes
//!    back every file, directory and inode at once (a NAR of a million entries costs one
//!    flush, not a million), shared by the commits that run at the same time (`flush`: group
//!    commit, so a closure of many small paths does not pay a flush per path; once a flush
//!    fails, every later commit of the process fails too); with [`Durability::Fsync`], every
//!    file and directory is fsynced as the unpacker closes it and the record before its
//!    rename;
//! 5. **commit**: `renameat2(RENAME_NOREPLACE)` of `.tmp-<hash>` to `<hash>-<name>`;
//! 6. make the rename durable: the next shared `syncfs` (with `Fsync`: fsync `store/` and
//!    `meta/`).
//!
//! The rename is the commit point: a record is durable before the path it describes can
//! appear, so every entry of `store/` has a record, and readers (spec rewrite, bind mounts)
//! that only look at `store/<hash>-<name>` never see a partial tree. A crash before step 5
//! leaves a `.tmp-<hash>` (removed by the next install of that path, and by the next pull
//! that downloads anything: [`Store::remove_stale_staging`]) and maybe a record
//! without a path (not valid; overwritten by the next install). A crash after step 5 but
//! before step 6 may lose the rename (the path is then missing and fetched again), never
//! the record or the contents, which step 4 made durable first, so a valid path is never a
//! tree of empty files after a power loss. (`syncfs` reports write-back errors only since
//! Linux 5.8; on older kernels a failing disk can go unnoticed by `syncfs` as it does by
//! other writers of that file system.)
//!
//! Removal ([`Store::delete`], for gc) runs in the opposite order: rename the path to
//! `.tmp-<hash>` (it disappears atomically), remove the record, then remove the tree.
//!
//! # Locks
//!
//! `flock` on `locks/<hash>.lock` (lock files are never deleted, so two processes always lock
//! the same inode). Locks are per open file description, so threads of one process exclude
//! each other too. Callers take the lock, re-check validity (someone else may have installed
//! the path meanwhile), and only then download.

mod flush;
pub mod remove;
pub mod space;
pub mod unpack;
pub mod view;

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::nix::nar::NarLimits;
use crate::nix::{NarHash, StorePath};
use remove::{remove_tree, RemoveError};
use unpack::{UnpackError, UnpackOptions, UnpackStats};

/// Prefix of staging areas in `store/`: `.tmp-<hash>` is an install in progress, a path
/// being deleted, or the leftover of either killed midway.
pub const STAGING_PREFIX: &str = ".tmp-";

/// What the store knows about a valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    /// Direct references (the narinfo's `References`, sorted).
    pub references: Vec<StorePath>,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// Seconds since the Unix epoch when the path was installed.
    pub registration_time: u64,
}

/// A closure: every path reachable from some roots, sorted, with each path's references.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closure {
    /// Sorted by base name, unique.
    pub paths: Vec<StorePath>,
    /// Direct references of every path in `paths`.
    pub references: BTreeMap<StorePath, Vec<StorePath>>,
}

impl Closure {
    /// A closure from each path's references (the keys are the paths).
    pub fn from_references(references: BTreeMap<StorePath, Vec<StorePath>>) -> Self {
        Closure {
            paths: references.keys().cloned().collect(),
            references,
        }
    }

    /// The absolute `/nix/store/...` paths, sorted.
    pub fn absolute_paths(&self) -> Vec<String> {
        self.paths.iter().map(|p| p.to_absolute_path()).collect()
    }

    /// The paths of this closure reachable from `roots` (a sub-closure), sorted.
    pub fn reachable_from(&self, roots: &[StorePath]) -> Vec<StorePath> {
        let mut seen = std::collections::BTreeSet::new();
        let mut queue: VecDeque<&StorePath> = roots.iter().collect();
        while let Some(p) = queue.pop_front() {
            if let Some((key, refs)) = self.references.get_key_value(p) {
                if seen.insert(key) {
                    queue.extend(refs);
                }
            }
        }
        seen.into_iter().cloned().collect()
    }
}

/// How an install is made durable before its commit rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// fsync every file and directory as the unpacker closes it: one flush per entry, minutes
    /// for a NAR of a million small files.
    Fsync,
    /// A `syncfs(2)` of the store's file system before the commit rename and one after (the
    /// default): the whole tree and its record in one flush, bounded by the disk's
    /// throughput, each flush shared by the commits running at the same time. It also writes
    /// back other dirty data of that file system.
    #[default]
    Syncfs,
    /// No fsync (tests, benchmarks of the rest; not crash safe).
    None,
}

/// Why a store operation failed. Each variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Remove(#[from] RemoveError),
    #[error("{path}: unpacked into {}, but it is missing", staged.display())]
    NothingStaged { path: StorePath, staged: PathBuf },
    #[error("{path}: already present in the store")]
    AlreadyPresent { path: StorePath },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The on-disk record, `meta/<hash>.json`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    path: StorePath,
    references: Vec<StorePath>,
    nar_hash: String,
    nar_size: u64,
    registration_time: u64,
}

/// The node store rooted at `{state-dir}`.
#[derive(Debug, Clone)]
pub struct Store {
    state_dir: PathBuf,
    store_dir: PathBuf,
    meta_dir: PathBuf,
    locks_dir: PathBuf,
    durability: Durability,
    /// The `syncfs` of the store's (and the records') file system, shared by the commits of
    /// this process (through every clone of this store).
    flusher: Arc<flush::Flusher>,
}

/// An exclusive lock on one store path (released on drop).
#[derive(Debug)]
pub struct PathLock {
    path: StorePath,
    _lock: nix::fcntl::Flock<File>,
}

impl PathLock {
    /// The locked path.
    pub fn path(&self) -> &StorePath {
        &self.path
    }
}

fn mkdir_0755(dir: &Path) -> Result<(), StoreError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        _ => {}
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io_err("create directory", dir))?;
    // The umask may have removed bits.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod", dir))
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err("fsync directory", dir))
}

fn exists(p: &Path) -> Result<bool, StoreError> {
    match std::fs::symlink_metadata(p) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("inspect", p)(e)),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed, mode 0755) the store under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let (store_dir, meta_dir) = (state_dir.join("store"), state_dir.join("meta"));
        let locks_dir = state_dir.join("locks");
        for d in [&store_dir, &meta_dir, &locks_dir] {
            mkdir_0755(d)?;
        }
        // Records and trees are made durable together: both file systems if `meta/` is on
        // another one than `store/`.
        let sync =
            flush::syncfs_of(&[&store_dir, &meta_dir]).map_err(io_err("open", &store_dir))?;
        Ok(Store {
            state_dir: state_dir.to_owned(),
            store_dir,
            meta_dir,
            locks_dir,
            durability: Durability::default(),
            flusher: Arc::new(flush::Flusher::new(sync)),
        })
    }

    /// The same store with another durability strategy.
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// `{state-dir}`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `{state-dir}/store`.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Where `path` lives on this node: `{state-dir}/store/<hash>-<name>`.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        self.store_dir.join(path.base_name())
    }

    fn record_path(&self, path: &StorePath) -> PathBuf {
        self.meta_dir.join(format!("{}.json", path.hash_str()))
    }

    fn staging_path(&self, path: &StorePath) -> PathBuf {
        self.store_dir
            .join(format!("{STAGING_PREFIX}{}", path.hash_str()))
    }

    fn read_record(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        let file = self.record_path(path);
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &file)(e)),
        };
        let Ok(r) = serde_json::from_slice::<Record>(&bytes) else {
            tracing::warn!(file = %file.display(), "unreadable store record, treating path as invalid");
            return Ok(None);
        };
        let Ok(nar_hash) = NarHash::parse(&r.nar_hash) else {
            return Ok(None);
        };
        if &r.path != path {
            return Ok(None);
        }
        Ok(Some(PathInfo {
            path: r.path,
            references: r.references,
            nar_hash,
            nar_size: r.nar_size,
            registration_time: r.registration_time,
        }))
    }

    /// The path's record if the path is valid (record present and the path exists).
    pub fn query(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        let Some(info) = self.read_record(path)? else {
            return Ok(None);
        };
        if !exists(&self.real_path(path))? {
            return Ok(None);
        }
        Ok(Some(info))
    }

    /// Whether the path is valid.
    pub fn is_valid(&self, path: &StorePath) -> Result<bool, StoreError> {
        Ok(self.query(path)?.is_some())
    }

    /// The closure of `roots` from local records alone, or `None` if some path in it is not
    /// valid here (then the substituter has work to do). No network, no async runtime.
    pub fn local_closure(&self, roots: &[StorePath]) -> Result<Option<Closure>, StoreError> {
        let mut refs: BTreeMap<StorePath, Vec<StorePath>> = BTreeMap::new();
        let mut queue: VecDeque<StorePath> = roots.iter().cloned().collect();
        while let Some(p) = queue.pop_front() {
            if refs.contains_key(&p) {
                continue;
            }
            let Some(info) = self.query(&p)? else {
                return Ok(None);
            };
            for r in &info.references {
                if !refs.contains_key(r) {
                    queue.push_back(r.clone());
                }
            }
            refs.insert(p, info.references);
        }
        Ok(Some(Closure::from_references(refs)))
    }

    /// Takes the path's lock, waiting for another installer to finish. Blocking: async code
    /// uses [`Store::try_lock`] in a loop instead.
    pub fn lock(&self, path: &StorePath) -> Result<PathLock, StoreError> {
        self.lock_with(path, nix::fcntl::FlockArg::LockExclusive)
            .map(|l| l.expect("a blocking flock either locks or fails"))
    }

    /// Takes the path's lock if nobody holds it.
    pub fn try_lock(&self, path: &StorePath) -> Result<Option<PathLock>, StoreError> {
        self.lock_with(path, nix::fcntl::FlockArg::LockExclusiveNonblock)
    }

    fn lock_with(
        &self,
        path: &StorePath,
        how: nix::fcntl::FlockArg,
    ) -> Result<Option<PathLock>, StoreError> {
        let file = self.locks_dir.join(format!("{}.lock", path.hash_str()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&file)
            .map_err(io_err("open lock", &file))?;
        match nix::fcntl::Flock::lock(f, how) {
            Ok(lock) => Ok(Some(PathLock {
                path: path.clone(),
                _lock: lock,
            })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(io_err("lock", &file)(e.into())),
        }
    }

    /// Under the path's lock: removes leftovers of earlier attempts and returns a staging area
    /// to unpack into. Fails with [`StoreError::AlreadyPresent`] if the path is valid.
    pub fn stage(&self, lock: &Arc<PathLock>) -> Result<Staging, StoreError> {
        let path = lock.path();
        if self.is_valid(path)? {
            return Err(StoreError::AlreadyPresent { path: path.clone() });
        }
        let tmp = self.staging_path(path);
        if exists(&tmp)? {
            tracing::info!(path = %tmp.display(), "removing leftover of an interrupted install");
            remove_tree(&tmp)?;
        }
        let real = self.real_path(path);
        if exists(&real)? {
            tracing::info!(path = %real.display(), "removing store path without a valid record");
            remove_tree(&real)?;
        }
        Ok(Staging {
            store: self.clone(),
            lock: lock.clone(),
            tmp,
            committed: false,
        })
    }

    /// Removes `staging` (a `store/.tmp-<hash>`) under the lock of its hash. With `wait`, waits
    /// for that lock; without, a staging area whose lock is held (a live install or removal,
    /// in this process or another) is left alone. Returns whether it was removed.
    pub fn remove_staging(&self, staging: &Path, wait: bool) -> Result<bool, StoreError> {
        // The path a staging area belongs to is not recorded, only its hash: any valid-looking
        // store path with that hash locks the same file.
        let Some(probe) = staging
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(STAGING_PREFIX))
            .and_then(|hash| StorePath::from_base_name(&format!("{hash}-x")).ok())
        else {
            return Ok(false);
        };
        let lock = match wait {
            true => Some(self.lock(&probe)?),
            false => self.try_lock(&probe)?,
        };
        if lock.is_none() || !exists(staging)? {
            return Ok(false);
        }
        remove_tree(staging)?;
        Ok(true)
    }

    /// Removes every staging area that no live process holds: what installs killed midway
    /// left behind. Returns how many were removed.
    pub fn remove_stale_staging(&self) -> Result<usize, StoreError> {
        let rd = std::fs::read_dir(&self.store_dir).map_err(io_err("list", &self.store_dir))?;
        let mut removed = 0;
        for e in rd {
            let e = e.map_err(io_err("list", &self.store_dir))?;
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(STAGING_PREFIX))
                && self.remove_staging(&e.path(), false)?
            {
                tracing::info!(path = %e.path().display(), "removed leftover of an interrupted install");
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes a valid or half-present path (for gc), under its lock. See the module docs.
    pub fn delete(&self, lock: &PathLock) -> Result<(), StoreError> {
        let path = lock.path();
        let real = self.real_path(path);
        let tmp = self.staging_path(path);
        if exists(&tmp)? {
            remove_tree(&tmp)?;
        }
        if exists(&real)? {
            std::fs::rename(&real, &tmp).map_err(io_err("rename", &real))?;
        }
        let rec = self.record_path(path);
        match std::fs::remove_file(&rec) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &rec)(e)),
        }
        remove_tree(&tmp)?;
        Ok(())
    }

    /// The store paths present in `store/` (valid or not; skips temporary entries).
    pub fn list(&self) -> Result<Vec<StorePath>, StoreError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.store_dir).map_err(io_err("list", &self.store_dir))?;
        for e in rd {
            let e = e.map_err(io_err("list", &self.store_dir))?;
            if let Some(name) = e.file_name().to_str() {
                if let Ok(p) = StorePath::from_base_name(name) {
                    out.push(p);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Writes the path's record (temp file, rename); with `fsync`, the temp file is fsynced
    /// before the rename (otherwise the caller's `syncfs` makes it durable).
    fn write_record(&self, info: &PathInfo, fsync: bool) -> Result<(), StoreError> {
        let mut references = info.references.clone();
        references.sort();
        references.dedup();
        let rec = Record {
            path: info.path.clone(),
            references,
            nar_hash: info.nar_hash.to_nix_string(),
            nar_size: info.nar_size,
            registration_time: info.registration_time,
        };
        let data = serde_json::to_vec(&rec)
            .map_err(|e| io_err("encode record", &self.meta_dir)(e.into()))?;
        let file = self.record_path(&info.path);
        let tmp = file.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&data).map_err(io_err("write", &tmp))?;
        if fsync {
            f.sync_all().map_err(io_err("fsync", &tmp))?;
        }
        drop(f);
        std::fs::rename(&tmp, &file).map_err(io_err("rename", &tmp))
    }
}

/// A not-yet-visible install of one path, holding its lock. Dropped without
/// [`Staging::commit`], it removes what was unpacked.
pub struct Staging {
    store: Store,
    lock: Arc<PathLock>,
    tmp: PathBuf,
    committed: bool,
}

impl Staging {
    /// The path being installed.
    pub fn store_path(&self) -> &StorePath {
        self.lock.path()
    }

    /// Where the path is unpacked (does not exist until [`Staging::unpack`]).
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Unpacks a NAR into the staging area, durably per the store's strategy.
    pub fn unpack<R: Read>(&self, nar: R, limits: &NarLimits) -> Result<UnpackStats, UnpackError> {
        let opts = UnpackOptions {
            fsync: self.store.durability == Durability::Fsync,
        };
        unpack::unpack_with(nar, &self.tmp, limits, &opts)
    }

    /// Makes the verified path visible: record, flush, the commit rename, flush (steps 3–6
    /// of the module's protocol). `info.path` must be the locked path.
    pub fn commit(mut self, info: &PathInfo) -> Result<(), StoreError> {
        let path = self.lock.path().clone();
        debug_assert_eq!(info.path, path);
        if !exists(&self.tmp)? {
            return Err(StoreError::NothingStaged {
                path: path.clone(),
                staged: self.tmp.clone(),
            });
        }
        let store = &self.store;
        let mut info = info.clone();
        if info.registration_time == 0 {
            info.registration_time = now();
        }
        let flush = || {
            store
                .flusher
                .flush()
                .map_err(|e| io_err("syncfs", &store.store_dir)(e.into()))
        };
        match store.durability {
            Durability::Syncfs => {
                // One syncfs (shared with the commits running beside this one) makes the
                // tree and its record durable before the rename.
                store.write_record(&info, false)?;
                flush()?;
            }
            Durability::Fsync => store.write_record(&info, true)?,
            Durability::None => store.write_record(&info, false)?,
        }
        let real = store.real_path(&path);
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &self.tmp,
            nix::fcntl::AT_FDCWD,
            &real,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| io_err("rename into place", &real)(e.into()))?;
        self.committed = true;
        match store.durability {
            // The rename, durable by the next shared syncfs.
            Durability::Syncfs => flush()?,
            Durability::Fsync => {
                fsync_dir(&store.store_dir)?;
                fsync_dir(&store.meta_dir)?;
            }
            Durability::None => {}
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = remove_tree(&self.tmp) {
                tracing::warn!(error = %e, "cannot remove staging directory");
            }
        }
    }
}

#[cfg(test)]
mod tests;
