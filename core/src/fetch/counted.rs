//! A response body that logs how many bytes it carried when it ends (every backend's).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use url::Url;

use super::FetchError;

/// Logs the number of body bytes when the stream ends.
pub(super) struct Counted<S> {
    inner: S,
    url: Url,
    bytes: u64,
    done: bool,
}

impl<S> Counted<S> {
    pub(super) fn new(inner: S, url: Url) -> Self {
        Counted {
            inner,
            url,
            bytes: 0,
            done: false,
        }
    }
}

impl<S: Stream<Item = Result<Bytes, FetchError>> + Unpin> Stream for Counted<S> {
    type Item = Result<Bytes, FetchError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let r = self.inner.poll_next_unpin(cx);
        match &r {
            Poll::Ready(Some(Ok(b))) => self.bytes += b.len() as u64,
            Poll::Ready(Some(Err(e))) if !self.done => {
                self.done = true;
                tracing::debug!(url = %self.url, bytes = self.bytes, error = %e, "body failed");
            }
            Poll::Ready(None) if !self.done => {
                self.done = true;
                tracing::debug!(url = %self.url, bytes = self.bytes, "body complete");
            }
            _ => {}
        }
        r
    }
}
