//! Progress events of a materialisation, rendered by the CLI (a bar or plain lines).

use url::Url;

use crate::nix::{NarInfo, StorePath};

/// Receives progress events. Every method has a no-op default; calls come from several
/// tasks at once.
pub trait Progress: Send + Sync {
    /// The path's narinfo was fetched and verified.
    fn resolved(&self, _path: &StorePath, _info: &NarInfo) {}
    /// The path is already valid in the store (no download).
    fn present(&self, _path: &StorePath) {}
    /// The NAR download starts: compressed size if the narinfo gives it, and the NAR size.
    fn download_started(
        &self,
        _path: &StorePath,
        _url: &Url,
        _file_size: Option<u64>,
        _nar_size: u64,
    ) {
    }
    /// Compressed bytes received.
    fn download_bytes(&self, _path: &StorePath, _bytes: u64) {}
    /// The download failed and starts again from the beginning; `received` bytes are discarded.
    fn download_restarted(&self, _path: &StorePath, _received: u64, _error: &str) {}
    /// The path is installed and verified.
    fn download_finished(&self, _path: &StorePath) {}
}

/// Ignores every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}
