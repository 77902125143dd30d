//! What is on the node: every store path with its size, last use and the containers whose
//! pins reach it (`nixenv ls --store`), and the raw material gc plans from.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::nix::StorePath;
use crate::pin::{self, Pin};
use crate::store::Store;

use super::collect::Entry;
use super::{usage, GcError};

/// The valid paths of the store as gc entries, and the entries of `store/` that are not
/// valid (a directory without a record).
pub fn entries(store: &Store) -> Result<(Vec<Entry>, Vec<StorePath>), GcError> {
    let mut valid = Vec::new();
    let mut invalid = Vec::new();
    for p in store.list()? {
        match store.query(&p)? {
            Some(info) => {
                let last_use = usage::last_use(store, &p)
                    .unwrap_or_else(|| UNIX_EPOCH + Duration::from_secs(info.registration_time));
                valid.push(Entry {
                    path: p,
                    size: info.nar_size,
                    last_use,
                    references: info.references,
                });
            }
            None => invalid.push(p),
        }
    }
    Ok((valid, invalid))
}

/// Every path reachable from `roots` through `entries`' references (roots not in `entries`
/// are skipped: they are not installed).
pub fn reachable<'a>(
    entries: &'a BTreeMap<&'a StorePath, &'a Entry>,
    roots: impl IntoIterator<Item = &'a StorePath>,
) -> BTreeSet<&'a StorePath> {
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<&StorePath> = roots.into_iter().collect();
    while let Some(p) = queue.pop_front() {
        let Some((key, e)) = entries.get_key_value(p) else {
            continue;
        };
        if !seen.insert(*key) {
            continue;
        }
        queue.extend(e.references.iter());
    }
    seen
}

/// One line of `nixenv ls --store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreItem {
    pub path: StorePath,
    /// Bytes (NAR size).
    pub size: u64,
    pub last_use: SystemTime,
    /// Ids of the containers whose pins reach this path (live or stale).
    pub pinned_by: Vec<String>,
}

/// The store's valid paths, sorted by path, with the pins reaching each; and the pins.
pub fn list_store(store: &Store) -> Result<(Vec<StoreItem>, Vec<Pin>), GcError> {
    let (valid, _) = entries(store)?;
    let pins = pin::list(store.state_dir())?;
    let by_path: BTreeMap<&StorePath, &Entry> = valid.iter().map(|e| (&e.path, e)).collect();
    let mut pinned_by: BTreeMap<&StorePath, Vec<String>> = BTreeMap::new();
    for p in &pins {
        for path in reachable(&by_path, p.paths.iter().chain(p.closure.iter())) {
            pinned_by
                .entry(path)
                .or_default()
                .push(p.container_id.clone());
        }
    }
    let items = valid
        .iter()
        .map(|e| StoreItem {
            path: e.path.clone(),
            size: e.size,
            last_use: e.last_use,
            pinned_by: pinned_by.remove(&e.path).unwrap_or_default(),
        })
        .collect();
    Ok((items, pins))
}
