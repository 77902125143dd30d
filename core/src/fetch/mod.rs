//! The network edge: GET a URL (`http://`, `https://`, `file://`) as a byte stream.
//!
//! Logic that fetches (substituter, catalog) is generic over [`Fetch`], so tests can
//! inject failures without a server; production uses [`Fetcher`], built from the
//! configuration by [`Fetcher::for_config`] only. Its backends are one file each
//! ([`http`], [`file`](mod@file)), chosen by [`Scheme`] ([`scheme`], the only scheme check).

mod counted;
pub mod fetcher;
pub mod file;
pub mod http;
pub mod netrc;
pub mod pace;
pub mod redirect;
pub mod retry;
pub mod s3;
pub mod scheme;
pub mod sigv4;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use url::Url;

pub use fetcher::Fetcher;
pub use scheme::Scheme;

/// A response body, streamed.
pub type Body = Pin<Box<dyn Stream<Item = Result<Bytes, FetchError>> + Send>>;

/// Why a fetch failed. `NotFound` is not an error for callers that try several caches.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: not found")]
    NotFound { url: Url },
    #[error("{url}: HTTP {status}")]
    Status { url: Url, status: u16 },
    #[error("{url}: {message}")]
    Transport {
        url: Url,
        message: String,
        /// Worth retrying (connection reset, timeout, 5xx).
        retryable: bool,
    },
    #[error("{url}: {source}")]
    Io {
        url: Url,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {refused}")]
    Redirect {
        url: Url,
        refused: Box<redirect::RedirectRefused>,
    },
    #[error("{url}: too slow: {reason}")]
    TooSlow {
        url: Url,
        reason: Box<pace::TooSlow>,
    },
    #[error("{url}: response larger than {limit} bytes")]
    TooLarge {
        url: Url,
        limit: u64,
        /// Bytes received when reading stopped (just over `limit`).
        read: u64,
    },
}

impl FetchError {
    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            FetchError::Status { status, .. } => *status >= 500 || *status == 429,
            FetchError::Transport { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

/// GET over some transport.
pub trait Fetch: Send + Sync + 'static {
    /// Starts a GET; the body streams. `Err(FetchError::NotFound)` on HTTP 404/410 or a missing file.
    fn get(&self, url: &Url) -> impl Future<Output = Result<Body, FetchError>> + Send;

    /// GET the whole body, refusing more than `limit` bytes: reading stops at the chunk that
    /// crosses the limit, the rest of the body is never asked for.
    fn get_bytes(
        &self,
        url: &Url,
        limit: u64,
    ) -> impl Future<Output = Result<Vec<u8>, FetchError>> + Send {
        async move {
            use futures::StreamExt;
            let mut body = self.get(url).await?;
            let mut out = Vec::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                let read = out.len() as u64 + chunk.len() as u64;
                if read > limit {
                    return Err(FetchError::TooLarge {
                        url: url.clone(),
                        limit,
                        read,
                    });
                }
                out.extend_from_slice(&chunk);
            }
            Ok(out)
        }
    }
}

/// A shared fetcher fetches like the fetcher it shares: one [`Fetcher`] (one HTTP client) for
/// the catalog and the substituter of an operation.
impl<T: Fetch> Fetch for Arc<T> {
    fn get(&self, url: &Url) -> impl Future<Output = Result<Body, FetchError>> + Send {
        (**self).get(url)
    }
}
