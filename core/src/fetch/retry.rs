//! Retries with exponential backoff and jitter, for failures worth retrying
//! (5xx, 429, connection resets, timeouts).

use std::future::Future;
use std::time::Duration;

use rand::Rng;

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, including the first (at least 1).
    pub attempts: u32,
    /// Delay before the second attempt; doubles each time.
    pub base_delay: Duration,
    /// Upper bound of one delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The default delays with `attempts` attempts (`download-attempts`).
    pub fn with_attempts(attempts: u32) -> Self {
        RetryPolicy {
            attempts: attempts.max(1),
            ..RetryPolicy::default()
        }
    }

    /// The delay after failed attempt number `attempt` (1-based): `base * 2^(attempt-1)`,
    /// capped, with jitter drawn from its upper half.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(20));
        let d = exp.min(self.max_delay);
        let half = d / 2;
        let jitter = rand::thread_rng().gen_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }

    /// Runs `op` until it succeeds, fails with an error `retryable` says is final, or the
    /// attempts are used up; returns the last error. `op` receives the attempt number (1-based).
    pub async fn run<T, E, Fut>(
        &self,
        mut op: impl FnMut(u32) -> Fut,
        retryable: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let mut attempt = 1;
        loop {
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < self.attempts && retryable(&e) => {
                    let delay = self.delay(attempt);
                    // Worth an operator's attention: a cache or the network is flaky.
                    tracing::warn!(attempt, delay_ms = delay.as_millis() as u64, error = %e, "retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn delays_grow_and_are_capped() {
        let p = RetryPolicy {
            attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        };
        for _ in 0..50 {
            let d1 = p.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = p.delay(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d9 = p.delay(9);
            assert!(d9 >= Duration::from_millis(500) && d9 <= Duration::from_millis(1000));
        }
    }

    #[tokio::test]
    async fn retries_only_retryable_errors() {
        let p = RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        };
        let calls = Cell::new(0);
        let r: Result<(), &str> = p
            .run(
                |_| {
                    calls.set(calls.get() + 1);
                    async { Err("transient") }
                },
                |_| true,
            )
            .await;
        assert_eq!(r, Err("transient"));
        assert_eq!(calls.get(), 3);

        calls.set(0);
        let r: Result<(), &str> = p
            .run(
                |_| {
                    calls.set(calls.get() + 1);
                    async { Err("final") }
                },
                |_| false,
            )
            .await;
        assert_eq!(r, Err("final"));
        assert_eq!(calls.get(), 1);

        let r: Result<u32, &str> = p
            .run(
                |n| async move {
                    if n < 2 {
                        Err("once")
                    } else {
                        Ok(n)
                    }
                },
                |_| true,
            )
            .await;
        assert_eq!(r, Ok(2));
    }
}
