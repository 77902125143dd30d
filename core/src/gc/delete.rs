//! Removing store paths and leftovers, so that a path disappears atomically and a crash at
//! any point leaves a store that is correct (if not yet clean).
//!
//! Retiring a path (under its store lock, while gc holds the gc lock exclusively):
//! 1. remove a leftover `.tmp-<hash>` of a crashed install (nobody installs it: we hold its lock);
//! 2. rename `store/<hash>-<name>` to `store/.trash-<hash>` — the path is gone at once;
//! 3. remove the record `meta/<hash>.json` (a record without its path is not valid, and the
//!    next install overwrites it, so a crash between 2 and 3 is harmless).
//!
//! Trash is removed later, without the gc lock ([`purge_trash`], also at the start of the next
//! gc after a crash), with [`remove_tree`]: read-only directories are made writable on their
//! own descriptor, symlinks are never followed.

use std::io;
use std::path::{Path, PathBuf};

use crate::nix::StorePath;
use crate::store::remove::remove_tree;
use crate::store::Store;

use super::usage::record_file;
use super::GcError;

/// Prefix of retired paths awaiting removal, in `store/`.
pub const TRASH_PREFIX: &str = ".trash-";
pub use crate::store::STAGING_PREFIX;

fn exists(p: &Path) -> Result<bool, GcError> {
    match std::fs::symlink_metadata(p) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(GcError::io("inspect", p)(e)),
    }
}

/// `store/.trash-<hash>`.
pub fn trash_path(store: &Store, path: &StorePath) -> PathBuf {
    store
        .store_dir()
        .join(format!("{TRASH_PREFIX}{}", path.hash_str()))
}

/// Retires `path` (see the module docs); returns the trash to remove, if the path existed.
/// The caller holds the gc lock exclusively.
pub fn retire(store: &Store, path: &StorePath) -> Result<Option<PathBuf>, GcError> {
    let _lock = store.lock(path)?;
    let staging = store
        .store_dir()
        .join(format!("{STAGING_PREFIX}{}", path.hash_str()));
    if exists(&staging)? {
        remove_tree(&staging)?;
    }
    let real = store.real_path(path);
    let trash = trash_path(store, path);
    let moved = if exists(&real)? {
        if exists(&trash)? {
            remove_tree(&trash)?;
        }
        std::fs::rename(&real, &trash).map_err(GcError::io("rename", &real))?;
        true
    } else {
        false
    };
    let rec = record_file(store, path);
    match std::fs::remove_file(&rec) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(GcError::io("remove", &rec)(e)),
    }
    tracing::debug!(%path, "retired");
    Ok(moved.then_some(trash))
}

/// Bytes of a tree (sum of file and symlink sizes), not following symlinks.
pub fn tree_size(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        } else {
            total += m.len();
        }
    }
    total
}

/// Entries of `store/` whose name starts with `prefix`.
pub fn entries_with_prefix(store: &Store, prefix: &str) -> Result<Vec<PathBuf>, GcError> {
    let dir = store.store_dir();
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(GcError::io("list", dir))? {
        let e = e.map_err(GcError::io("list", dir))?;
        if e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(prefix))
        {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Removes every `.trash-*` in the store; returns how many bytes they held. The caller holds
/// the gc run lock (no other gc renames into the trash meanwhile).
pub fn purge_trash(store: &Store) -> Result<u64, GcError> {
    let mut freed = 0;
    for t in entries_with_prefix(store, TRASH_PREFIX)? {
        freed += tree_size(&t);
        remove_tree(&t)?;
    }
    Ok(freed)
}

/// Removes a `.tmp-<hash>` staging area left by a crashed install, waiting for its lock.
pub fn remove_stale_staging(store: &Store, staging: &Path) -> Result<bool, GcError> {
    Ok(store.remove_staging(staging, true)?)
}

/// Records in `meta/` whose path is absent (left by a crash between a retire's rename and
/// its record removal, or by an install that crashed before its commit).
pub fn orphan_records(store: &Store) -> Result<Vec<StorePath>, GcError> {
    let meta = store.state_dir().join("meta");
    let rd = match std::fs::read_dir(&meta) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(GcError::io("list", &meta)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(GcError::io("list", &meta))?;
        let Some(name) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some(_hash) = name.strip_suffix(".json") else {
            continue;
        };
        let Ok(bytes) = std::fs::read(e.path()) else {
            continue;
        };
        let Some(path) = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("path").and_then(|p| p.as_str()).map(str::to_owned))
            .and_then(|p| StorePath::from_absolute_path(&p).ok())
        else {
            continue;
        };
        if !exists(&store.real_path(&path))? {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Removes the record of `path` if, under its lock, the path is still absent.
pub fn remove_orphan_record(store: &Store, path: &StorePath) -> Result<bool, GcError> {
    let _lock = store.lock(path)?;
    if exists(&store.real_path(path))? {
        return Ok(false);
    }
    let rec = record_file(store, path);
    match std::fs::remove_file(&rec) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(GcError::io("remove", &rec)(e)),
    }
}
