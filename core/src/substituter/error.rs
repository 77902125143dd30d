//! Why a path could not be substituted. Each message is one line starting with the store path.

use std::sync::Arc;

use url::Url;

use crate::fetch::netrc::NetrcError;
use crate::fetch::FetchError;
use crate::nix::narinfo::NarInfoError;
use crate::nix::signature::SignatureError;
use crate::nix::{NarHash, StorePath, STORE_DIR};
use crate::store::unpack::UnpackError;
use crate::store::StoreError;

use super::confine::NarUrlError;

fn list(urls: &[Url]) -> String {
    urls.iter().map(Url::as_str).collect::<Vec<_>>().join(", ")
}

fn chain(paths: &[StorePath]) -> String {
    paths
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// What makes a substituter unusable for a path.
#[derive(Debug, thiserror::Error)]
pub enum CacheFault {
    /// Its `nix-cache-info` names another store directory.
    #[error("store directory is {found}, not {STORE_DIR}")]
    StoreDir { found: String },
    /// Its `nix-cache-info` could not be read (not found is fine: the cache is then accepted).
    #[error("{source}")]
    CacheInfo { source: FetchError },
    /// A URL relative to the cache (a narinfo's name, a NAR's `URL`) does not make a URL.
    #[error("bad URL {relative:?}: {source}")]
    Url {
        relative: String,
        source: url::ParseError,
    },
}

impl CacheFault {
    /// Whether the cache was only too slow to answer: the next substituter is tried.
    pub fn is_too_slow(&self) -> bool {
        matches!(
            self,
            CacheFault::CacheInfo {
                source: FetchError::TooSlow { .. }
            }
        )
    }
}

/// The numbers of a lack of disk space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// NarSize of the paths still to download, this one included.
    pub needed: u64,
    /// Bytes free in `dir`.
    pub available: u64,
    /// The store directory.
    pub dir: std::path::PathBuf,
    /// `gc-max-size`, if set.
    pub budget: Option<u64>,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes (NarSize) still to download, {} bytes free in {}",
            self.needed,
            self.available,
            self.dir.display()
        )?;
        if let Some(b) = self.budget {
            write!(f, " (store budget gc-max-size: {b} bytes)")?;
        }
        Ok(())
    }
}

/// A failure of the substituter.
#[derive(Debug, thiserror::Error)]
pub enum SubstituteError {
    #[error("{path}: not found in any substituter ({})", list(.caches))]
    NotFound { path: StorePath, caches: Vec<Url> },
    #[error("{path}: not enough disk space: {shortfall}")]
    NoSpace {
        path: StorePath,
        shortfall: Box<Shortfall>,
    },
    #[error("{path}: no substituters configured")]
    NoSubstituters { path: StorePath },
    #[error("{path}: substituter {cache}: {fault}")]
    BadCache {
        path: StorePath,
        cache: Box<Url>,
        fault: Arc<CacheFault>,
    },
    #[error("{path}: NAR URL {url:?} of substituter {cache} {source}")]
    NarUrl {
        path: StorePath,
        url: String,
        cache: Box<Url>,
        #[source]
        source: Box<NarUrlError>,
    },
    #[error("{path}: bad narinfo {url}: {source}")]
    BadNarInfo {
        path: StorePath,
        url: Box<Url>,
        #[source]
        source: Box<NarInfoError>,
    },
    #[error("{path}: narinfo {url} describes {found}")]
    WrongNarInfo {
        path: StorePath,
        url: Box<Url>,
        found: Box<StorePath>,
    },
    #[error("{path}: {source}")]
    Signature {
        path: StorePath,
        #[source]
        source: Box<SignatureError>,
    },
    #[error("{path}: {source}")]
    Fetch {
        path: StorePath,
        #[source]
        source: Box<FetchError>,
    },
    #[error("{path}: {cause} while downloading {url}")]
    Interrupted {
        path: StorePath,
        url: Box<Url>,
        cause: String,
    },
    #[error("{path}: NAR hash mismatch (expected {expected}, got {got})")]
    HashMismatch {
        path: StorePath,
        expected: Box<NarHash>,
        got: Box<NarHash>,
    },
    #[error("{path}: NAR size mismatch (expected {expected} bytes, got {got})")]
    SizeMismatch {
        path: StorePath,
        expected: u64,
        got: u64,
    },
    #[error("{path}: NAR truncated")]
    Truncated { path: StorePath },
    #[error("{path}: cannot decompress {compression} NAR {url}: {source}")]
    Decompress {
        path: StorePath,
        url: Box<Url>,
        compression: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Unpack {
        path: StorePath,
        #[source]
        source: Box<UnpackError>,
    },
    #[error("{path}: {source}")]
    Store {
        path: StorePath,
        #[source]
        source: Box<StoreError>,
    },
    #[error("store {}: {source}", state_dir.display())]
    OpenStore {
        state_dir: std::path::PathBuf,
        #[source]
        source: Box<StoreError>,
    },
    #[error(transparent)]
    Netrc(#[from] Box<NetrcError>),
    #[error("trusted-public-keys: {0}")]
    Keys(SignatureError),
    #[error("{path}: installer task failed: {message}")]
    Task { path: StorePath, message: String },
    #[error("{path}: reference cycle {}, refused", chain(.cycle))]
    Cycle {
        path: StorePath,
        cycle: Vec<StorePath>,
    },
    #[error("{path}: cancelled")]
    Cancelled { path: StorePath },
    /// The walk ended with a path neither installed nor failed (a bug, not a cache's doing).
    #[error("{path}: not installed although the pull ended (internal error)")]
    Unfinished { path: StorePath },
}

impl From<NetrcError> for SubstituteError {
    fn from(e: NetrcError) -> Self {
        SubstituteError::Netrc(Box::new(e))
    }
}

impl SubstituteError {
    /// Whether another attempt (of the same request or NAR download) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            SubstituteError::Fetch { source, .. } => source.is_retryable(),
            SubstituteError::Interrupted { .. } => true,
            _ => false,
        }
    }

    /// The store path the error is about, if any.
    pub fn path(&self) -> Option<&StorePath> {
        use SubstituteError::*;
        match self {
            NotFound { path, .. }
            | NoSpace { path, .. }
            | NoSubstituters { path }
            | BadCache { path, .. }
            | NarUrl { path, .. }
            | BadNarInfo { path, .. }
            | WrongNarInfo { path, .. }
            | Signature { path, .. }
            | Fetch { path, .. }
            | Interrupted { path, .. }
            | HashMismatch { path, .. }
            | SizeMismatch { path, .. }
            | Truncated { path }
            | Decompress { path, .. }
            | Unpack { path, .. }
            | Store { path, .. }
            | Task { path, .. }
            | Cycle { path, .. }
            | Cancelled { path }
            | Unfinished { path } => Some(path),
            OpenStore { .. } | Netrc(_) | Keys(_) => None,
        }
    }
}
