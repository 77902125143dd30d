//! Counts what a materialisation did while passing its progress events on.

use std::sync::atomic::{AtomicU64, Ordering};

use url::Url;

use crate::nix::{NarInfo, StorePath};
use crate::substituter::Progress;

/// A [`Progress`] that counts paths found valid, paths installed and bytes received, and
/// forwards every event to `inner`.
pub struct Tally<'a, P> {
    inner: &'a P,
    present: AtomicU64,
    installed: AtomicU64,
    bytes: AtomicU64,
}

impl<'a, P: Progress> Tally<'a, P> {
    /// Counting in front of `inner`.
    pub fn new(inner: &'a P) -> Self {
        Tally {
            inner,
            present: AtomicU64::new(0),
            installed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// Paths already valid in the store.
    pub fn present(&self) -> u64 {
        self.present.load(Ordering::Relaxed)
    }

    /// Paths downloaded and installed.
    pub fn installed(&self) -> u64 {
        self.installed.load(Ordering::Relaxed)
    }

    /// Bytes received (compressed).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl<P: Progress> Progress for Tally<'_, P> {
    fn resolved(&self, path: &StorePath, info: &NarInfo) {
        self.inner.resolved(path, info);
    }
    fn present(&self, path: &StorePath) {
        self.present.fetch_add(1, Ordering::Relaxed);
        self.inner.present(path);
    }
    fn download_started(&self, path: &StorePath, url: &Url, file_size: Option<u64>, nar_size: u64) {
        self.inner.download_started(path, url, file_size, nar_size);
    }
    fn download_bytes(&self, path: &StorePath, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.inner.download_bytes(path, bytes);
    }
    fn download_restarted(&self, path: &StorePath, received: u64, error: &str) {
        self.inner.download_restarted(path, received, error);
    }
    fn download_finished(&self, path: &StorePath) {
        self.installed.fetch_add(1, Ordering::Relaxed);
        self.inner.download_finished(path);
    }
}
