//! The node's counters: `{state-dir}/metrics/counters.json`, updated by every process that
//! counts something (pulls, container preparations, gc runs) with one read-modify-write
//! under an `flock` on `metrics/counters.lock`, the new content renamed into place.
//!
//! Nothing is fsynced: counters are not worth a flush on the container-start path (a crash
//! may lose the last updates, or leave an empty or damaged file, which the next update
//! replaces, starting again from zero with a warning; Prometheus' `rate()` and `increase()`
//! treat that as a counter reset). Readers never lock: they see one complete version.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::histogram::{Histogram, PREPARE_BUCKETS, PULL_BUCKETS};
use super::MetricsError;

/// Every counter of the node (and, in memory, the increments one process has not yet
/// written: the same shape, added with [`Counters::add`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Pulls that fetched from a substituter, successful or not.
    pub pulls: u64,
    /// Failed pulls by cause label ([`super::FailureCause::as_str`]).
    pub pull_failures: BTreeMap<String, u64>,
    /// Bytes received from substituters (compressed, as sent; restarted downloads included).
    pub pull_bytes: u64,
    /// Seconds per pull.
    pub pull_duration: Histogram,
    /// Store paths of a materialised closure that were already valid in the node store.
    pub path_hits: u64,
    /// Store paths downloaded and installed.
    pub path_fetches: u64,
    /// gc runs that changed the store (dry runs are not counted).
    pub gc_runs: u64,
    /// Bytes freed by gc (NarSize of the paths removed, and leftovers).
    pub gc_freed_bytes: u64,
    /// Store paths removed by gc.
    pub gc_removed_paths: u64,
    /// Seconds per container preparation (nixenv's containers; pass-through ones aside).
    pub prepare_duration: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            pulls: 0,
            pull_failures: BTreeMap::new(),
            pull_bytes: 0,
            pull_duration: Histogram::new(PULL_BUCKETS),
            path_hits: 0,
            path_fetches: 0,
            gc_runs: 0,
            gc_freed_bytes: 0,
            gc_removed_paths: 0,
            prepare_duration: Histogram::new(PREPARE_BUCKETS),
        }
    }
}

impl Counters {
    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        *self == Counters::default()
    }

    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &Counters) {
        self.pulls += other.pulls;
        for (cause, n) in &other.pull_failures {
            *self.pull_failures.entry(cause.clone()).or_default() += n;
        }
        self.pull_bytes += other.pull_bytes;
        self.path_hits += other.path_hits;
        self.path_fetches += other.path_fetches;
        self.gc_runs += other.gc_runs;
        self.gc_freed_bytes += other.gc_freed_bytes;
        self.gc_removed_paths += other.gc_removed_paths;
        if !self.pull_duration.merge(&other.pull_duration) {
            tracing::warn!("pull duration buckets differ, observations dropped");
        }
        if !self.prepare_duration.merge(&other.prepare_duration) {
            tracing::warn!("prepare duration buckets differ, observations dropped");
        }
    }

    /// Histograms of another shape (other buckets, a damaged file) start again empty.
    fn normalise(mut self) -> Self {
        if !self.pull_duration.fits(PULL_BUCKETS) {
            self.pull_duration = Histogram::new(PULL_BUCKETS);
        }
        if !self.prepare_duration.fits(PREPARE_BUCKETS) {
            self.prepare_duration = Histogram::new(PREPARE_BUCKETS);
        }
        self
    }
}

/// `{state_dir}/metrics`.
pub fn metrics_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("metrics")
}

fn counters_path(state_dir: &Path) -> PathBuf {
    metrics_dir(state_dir).join("counters.json")
}

/// The node's counters; zero when none were written yet. A damaged file reads as zero (with
/// a warning): the next update replaces it.
pub fn load(state_dir: &Path) -> Result<Counters, MetricsError> {
    let path = counters_path(state_dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Counters::default()),
        Err(source) => return Err(MetricsError::Read { path, source }),
    };
    match serde_json::from_slice::<Counters>(&bytes) {
        Ok(c) => Ok(c.normalise()),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "damaged metrics counters, starting again from zero");
            Ok(Counters::default())
        }
    }
}

/// Adds `delta` to the node's counters: one locked read-modify-write, no fsync.
pub fn update(state_dir: &Path, delta: &Counters) -> Result<(), MetricsError> {
    let dir = metrics_dir(state_dir);
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| MetricsError::Write { path, source }
    };
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let lock_path = dir.join("counters.lock");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    let _lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io_err(&lock_path)(io::Error::from(errno)))?;
    let mut counters = load(state_dir)?;
    counters.add(delta);
    let bytes = serde_json::to_vec(&counters).expect("counters serialise");
    let path = counters_path(state_dir);
    crate::atomic::write_replace_unsynced(&path, &bytes, 0o644).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_add_up_and_damage_starts_again() {
        let d = tempfile::tempdir().unwrap();
        assert!(load(d.path()).unwrap().is_empty());
        let mut delta = Counters {
            pulls: 1,
            pull_bytes: 10,
            ..Counters::default()
        };
        delta.pull_failures.insert("not_found".into(), 1);
        delta.prepare_duration.observe(0.02);
        update(d.path(), &delta).unwrap();
        update(d.path(), &delta).unwrap();
        let c = load(d.path()).unwrap();
        assert_eq!(c.pulls, 2);
        assert_eq!(c.pull_bytes, 20);
        assert_eq!(c.pull_failures["not_found"], 2);
        assert_eq!(c.prepare_duration.count, 2);

        // Concurrent writers lose nothing.
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let dir = d.path().to_owned();
                let delta = delta.clone();
                std::thread::spawn(move || update(&dir, &delta).unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(load(d.path()).unwrap().pulls, 10);

        fs::write(counters_path(d.path()), b"{\"pulls\": 3, \"pull_duration\"").unwrap();
        assert!(load(d.path()).unwrap().is_empty());
        update(d.path(), &delta).unwrap();
        assert_eq!(load(d.path()).unwrap().pulls, 1);
    }
}
