//! The `file://` backend of [`super::Fetcher`]: a cache or catalog on a local file system,
//! read in chunks. A missing file is [`FetchError::NotFound`], like an HTTP 404.

use futures::TryStreamExt;
use url::Url;

use super::counted::Counted;
use super::{Body, Fetch, FetchError};

/// Read buffer for `file://` bodies.
const FILE_CHUNK: usize = 256 * 1024;

/// GET over `file://`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileFetcher;

impl Fetch for FileFetcher {
    async fn get(&self, url: &Url) -> Result<Body, FetchError> {
        let path = url.to_file_path().map_err(|()| FetchError::Io {
            url: url.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a local file path"),
        })?;
        let file = tokio::fs::File::open(&path).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                FetchError::NotFound { url: url.clone() }
            } else {
                FetchError::Io {
                    url: url.clone(),
                    source,
                }
            }
        })?;
        let u = url.clone();
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, FILE_CHUNK).map_err(move |source| {
                FetchError::Io {
                    url: u.clone(),
                    source,
                }
            });
        tracing::debug!(%url, "open file");
        Ok(Box::pin(Counted::new(stream, url.clone())))
    }
}
