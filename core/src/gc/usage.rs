//! "Last use" of a store path: the modification time of its record `meta/<hash>.json`.
//!
//! The record is written when the path is installed, so its mtime starts as the install
//! time; every pull and pin that returns the path touches it ([`touch`], `utimensat` to now,
//! the content is unchanged), and gc touches the paths live pins reach on each run, so a
//! path's last use is at most one gc period older than the moment its last container went
//! away. Nothing extra to create or clean up: the record disappears with the path.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::nix::StorePath;
use crate::store::Store;

/// The record whose mtime is the path's last use: `{state-dir}/meta/<hash>.json`.
pub fn record_file(store: &Store, path: &StorePath) -> PathBuf {
    store
        .state_dir()
        .join("meta")
        .join(format!("{}.json", path.hash_str()))
}

/// Sets the last use of each path to now. Paths without a record (not valid) are skipped;
/// failures are logged, not returned (a stale last use only makes gc remove a path earlier
/// once nothing pins it).
pub fn touch(store: &Store, paths: &[StorePath]) {
    for p in paths {
        let file = record_file(store, p);
        if let Err(e) = touch_file(&file) {
            if e != nix::errno::Errno::ENOENT {
                tracing::warn!(file = %file.display(), error = %e, "cannot record last use");
            }
        }
    }
}

fn touch_file(file: &Path) -> nix::Result<()> {
    utimensat(
        nix::fcntl::AT_FDCWD,
        file,
        &TimeSpec::UTIME_OMIT,
        &TimeSpec::UTIME_NOW,
        UtimensatFlags::NoFollowSymlink,
    )
}

/// Sets the last use of `path` to `when` (tests, and `nixenv` tools that import paths).
pub fn set_last_use(store: &Store, path: &StorePath, when: SystemTime) -> std::io::Result<()> {
    let f = std::fs::File::options()
        .write(true)
        .open(record_file(store, path))?;
    f.set_modified(when)
}

/// The path's last use, if it has a record.
pub fn last_use(store: &Store, path: &StorePath) -> Option<SystemTime> {
    std::fs::symlink_metadata(record_file(store, path))
        .and_then(|m| m.modified())
        .ok()
}
