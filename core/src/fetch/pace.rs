//! Bounded transfer time: a trickling server (one byte a second never trips `stall-timeout`)
//! cannot hold a pull forever.
//!
//! - A narinfo request has an overall deadline (`narinfo-timeout`), headers and body.
//! - A NAR body must bring at least `min-transfer-rate` bytes per second, measured over each
//!   full window of `transfer-rate-window`, and the whole NAR request must end within
//!   `nar-timeout-base` + NarSize / `min-transfer-rate`.
//!
//! [`Pace`] is the pure bookkeeping (time is passed in); [`Paced`] applies it to a [`Body`]
//! with a tokio timer, so a server that sends nothing at all is caught too.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::time::{Instant, Sleep};
use url::Url;

use super::{Body, FetchError};
use crate::config::Config;

/// The limits of one kind of transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaceLimits {
    /// Bytes per second a NAR must average over each window.
    pub min_rate: u64,
    /// The window over which the rate is measured.
    pub window: Duration,
    /// A NAR's deadline is this plus NarSize / `min_rate`.
    pub nar_base: Duration,
    /// A narinfo's deadline.
    pub narinfo: Duration,
}

impl PaceLimits {
    /// From `min-transfer-rate`, `transfer-rate-window`, `nar-timeout-base`, `narinfo-timeout`.
    pub fn from_config(cfg: &Config) -> Self {
        PaceLimits {
            min_rate: cfg.min_transfer_rate,
            window: cfg.transfer_rate_window,
            nar_base: cfg.nar_timeout_base,
            narinfo: cfg.narinfo_timeout,
        }
    }

    /// The deadline of a NAR of `nar_size` bytes.
    pub fn nar_deadline(&self, nar_size: u64) -> Duration {
        let secs = nar_size / self.min_rate.max(1);
        self.nar_base.saturating_add(Duration::from_secs(secs))
    }
}

/// Why a transfer was cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooSlow {
    #[error("not complete within {}", humantime::format_duration(*.limit))]
    Deadline { limit: Duration },
    #[error(
        "{bytes} bytes in {}, below the minimum of {min_rate} bytes/s",
        humantime::format_duration(*.window)
    )]
    Rate {
        bytes: u64,
        window: Duration,
        min_rate: u64,
    },
}

/// Rate and deadline bookkeeping of one transfer.
#[derive(Debug, Clone)]
pub struct Pace {
    min_rate: u64,
    window: Duration,
    limit: Duration,
    deadline: Instant,
    window_start: Instant,
    window_bytes: u64,
}

impl Pace {
    /// A transfer started at `start` that must end within `limit`, at `min_rate` bytes/s per
    /// `window` (a rate of 0 checks only the deadline).
    pub fn new(start: Instant, limit: Duration, min_rate: u64, window: Duration) -> Self {
        Pace {
            min_rate,
            window,
            limit,
            deadline: start + limit,
            window_start: start,
            window_bytes: 0,
        }
    }

    /// Counts received bytes.
    pub fn add(&mut self, n: u64) {
        self.window_bytes = self.window_bytes.saturating_add(n);
    }

    /// Checks the limits at `now`; starts a new window when one is complete.
    pub fn check(&mut self, now: Instant) -> Result<(), TooSlow> {
        if now >= self.deadline {
            return Err(TooSlow::Deadline { limit: self.limit });
        }
        if self.min_rate > 0 && !self.window.is_zero() && now >= self.window_start + self.window {
            let need = (self.min_rate as u128 * self.window.as_millis() / 1000) as u64;
            if self.window_bytes < need {
                return Err(TooSlow::Rate {
                    bytes: self.window_bytes,
                    window: self.window,
                    min_rate: self.min_rate,
                });
            }
            self.window_start = now;
            self.window_bytes = 0;
        }
        Ok(())
    }

    /// When the next check is due: the end of the window or the deadline.
    pub fn next_check(&self) -> Instant {
        if self.min_rate > 0 && !self.window.is_zero() {
            (self.window_start + self.window).min(self.deadline)
        } else {
            self.deadline
        }
    }

    /// The overall deadline.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

/// A body whose transfer is cut by [`Pace`].
pub struct Paced {
    inner: Body,
    url: Url,
    pace: Pace,
    timer: Pin<Box<Sleep>>,
    failed: bool,
}

impl Paced {
    /// Wraps `inner`, fetched from `url`.
    pub fn new(inner: Body, url: Url, pace: Pace) -> Self {
        let timer = Box::pin(tokio::time::sleep_until(pace.next_check()));
        Paced {
            inner,
            url,
            pace,
            timer,
            failed: false,
        }
    }

    fn fail(&mut self, reason: TooSlow) -> Poll<Option<Result<Bytes, FetchError>>> {
        self.failed = true;
        tracing::debug!(url = %self.url, %reason, "transfer too slow");
        Poll::Ready(Some(Err(FetchError::TooSlow {
            url: self.url.clone(),
            reason: Box::new(reason),
        })))
    }
}

impl Stream for Paced {
    type Item = Result<Bytes, FetchError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(b))) => {
                self.pace.add(b.len() as u64);
                if let Err(reason) = self.pace.check(Instant::now()) {
                    return self.fail(reason);
                }
                let next = self.pace.next_check();
                self.timer.as_mut().reset(next);
                return Poll::Ready(Some(Ok(b)));
            }
            Poll::Ready(other) => return Poll::Ready(other),
            Poll::Pending => {}
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if let Err(reason) = self.pace.check(Instant::now()) {
                return self.fail(reason);
            }
            let next = self.pace.next_check();
            self.timer.as_mut().reset(next);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn rate_is_measured_per_window() {
        let t0 = Instant::now();
        let mut p = Pace::new(t0, 100 * S, 1000, 10 * S);
        p.add(9_999);
        p.check(t0 + 9 * S).unwrap();
        assert_eq!(p.next_check(), t0 + 10 * S);
        assert_eq!(
            p.check(t0 + 10 * S),
            Err(TooSlow::Rate {
                bytes: 9_999,
                window: 10 * S,
                min_rate: 1000
            })
        );
        let mut p = Pace::new(t0, 100 * S, 1000, 10 * S);
        p.add(10_000);
        p.check(t0 + 10 * S).unwrap();
        // A new window: what came before does not count.
        assert_eq!(p.next_check(), t0 + 20 * S);
        p.add(500);
        assert!(matches!(
            p.check(t0 + 20 * S),
            Err(TooSlow::Rate { bytes: 500, .. })
        ));
    }

    #[test]
    fn one_byte_a_second_trips_the_rate_and_the_deadline_ends_everything() {
        let t0 = Instant::now();
        let mut p = Pace::new(t0, 5 * S, 64 * 1024, 2 * S);
        p.add(1);
        p.check(t0 + S).unwrap();
        p.add(1);
        assert!(matches!(
            p.check(t0 + 2 * S),
            Err(TooSlow::Rate { bytes: 2, .. })
        ));
        // Rate 0: only the deadline.
        let mut p = Pace::new(t0, 5 * S, 0, 2 * S);
        p.check(t0 + 4 * S).unwrap();
        assert_eq!(p.next_check(), t0 + 5 * S);
        let e = p.check(t0 + 5 * S).unwrap_err();
        assert_eq!(e.to_string(), "not complete within 5s");
    }

    #[test]
    fn nar_deadline_grows_with_nar_size() {
        let l = PaceLimits {
            min_rate: 64 * 1024,
            window: 30 * S,
            nar_base: 60 * S,
            narinfo: 30 * S,
        };
        assert_eq!(l.nar_deadline(0), 60 * S);
        assert_eq!(l.nar_deadline(64 * 1024 * 100), 160 * S);
        assert_eq!(
            l.nar_deadline(u64::MAX),
            60 * S + Duration::from_secs(u64::MAX / 65536)
        );
    }

    #[tokio::test]
    async fn a_silent_body_is_cut_by_the_timer() {
        let silent: Body = Box::pin(futures::stream::pending());
        let url = Url::parse("http://127.0.0.1:1/nar/x.nar").unwrap();
        let pace = Pace::new(Instant::now(), 10 * S, 1000, Duration::from_millis(200));
        let t = std::time::Instant::now();
        let mut body = Paced::new(silent, url, pace);
        let e = body.next().await.unwrap().unwrap_err();
        assert!(t.elapsed() < 2 * S, "{:?}", t.elapsed());
        assert!(matches!(e, FetchError::TooSlow { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "http://127.0.0.1:1/nar/x.nar: too slow: 0 bytes in 200ms, below the minimum of 1000 bytes/s"
        );
        assert!(body.next().await.is_none());
    }

    #[tokio::test]
    async fn a_fast_body_passes() {
        let chunks: Vec<Result<Bytes, FetchError>> =
            (0..10).map(|_| Ok(Bytes::from(vec![0u8; 1000]))).collect();
        let body: Body = Box::pin(futures::stream::iter(chunks));
        let url = Url::parse("http://127.0.0.1:1/nar/x.nar").unwrap();
        let pace = Pace::new(Instant::now(), 10 * S, 1000, S);
        let got: Vec<_> = Paced::new(body, url, pace).collect().await;
        assert_eq!(got.len(), 10);
        assert!(got.iter().all(Result::is_ok));
    }
}
