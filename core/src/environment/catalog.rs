//! The catalog client: `{catalog}/{org}/{app}/current.json` and `generations/{N}.json`,
//! over any [`Fetch`] (`http(s)://`, `file://`).

use std::time::Duration;

use url::Url;

use super::lock::{Lock, LockError};
use super::reference::EnvName;
use crate::fetch::pace::{PaceLimits, TooSlow};
use crate::fetch::retry::RetryPolicy;
use crate::fetch::{Fetch, FetchError};

/// Largest lock accepted unless the configuration says otherwise (`max-lock-size`).
pub const MAX_LOCK_BYTES: u64 = crate::config::DEFAULT_MAX_LOCK_SIZE;

/// Why a lock could not be read from the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("environment {name} not found in catalog {catalog}")]
    EnvironmentNotFound { name: EnvName, catalog: Box<Url> },
    #[error("generation {generation} of {name} not found in catalog {catalog}")]
    GenerationNotFound {
        name: EnvName,
        generation: u64,
        catalog: Box<Url>,
    },
    #[error("catalog unreachable: {source}")]
    Unreachable {
        #[source]
        source: Box<FetchError>,
    },
    #[error("{url}: malformed lock: {source}")]
    Malformed {
        url: Box<Url>,
        #[source]
        source: LockError,
    },
    #[error("{url}: the lock is {found_name} generation {found_generation}, expected {expected}")]
    Mismatch {
        url: Box<Url>,
        found_name: EnvName,
        found_generation: u64,
        expected: String,
    },
    #[error("{url}: lock refused: larger than max-lock-size ({limit} bytes), reading stopped at {read} bytes")]
    TooLarge {
        url: Box<Url>,
        limit: u64,
        read: u64,
    },
    #[error("catalog URL {url} cannot hold environments (it cannot be a base)")]
    BadUrl { url: Box<Url> },
}

impl CatalogError {
    /// Whether the catalog could not be reached at all (as opposed to answering "no" or garbage).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, CatalogError::Unreachable { .. })
    }
}

/// A catalog at a base URL, read through `F`.
#[derive(Debug, Clone)]
pub struct Catalog<'a, F> {
    base: Url,
    fetch: &'a F,
    retry: RetryPolicy,
    max_lock_size: u64,
    pace: PaceLimits,
}

/// `url` with a trailing slash, so relative joins land below it.
pub fn as_directory(url: &Url) -> Url {
    let mut u = url.clone();
    if !u.path().ends_with('/') {
        let p = format!("{}/", u.path());
        u.set_path(&p);
    }
    u
}

/// `{catalog}/{org}/{app}/` (always ends with `/`).
pub fn environment_url(catalog: &Url, name: &EnvName) -> Result<Url, CatalogError> {
    let base = as_directory(catalog);
    if base.cannot_be_a_base() {
        return Err(CatalogError::BadUrl {
            url: Box::new(catalog.clone()),
        });
    }
    base.join(&format!("{}/{}/", name.org(), name.app()))
        .map_err(|_| CatalogError::BadUrl {
            url: Box::new(catalog.clone()),
        })
}

/// `{catalog}/{org}/{app}/current.json`.
pub fn current_url(catalog: &Url, name: &EnvName) -> Result<Url, CatalogError> {
    let dir = environment_url(catalog, name)?;
    dir.join("current.json").map_err(|_| CatalogError::BadUrl {
        url: Box::new(catalog.clone()),
    })
}

/// `{catalog}/{org}/{app}/generations/{N}.json`.
pub fn generation_url(catalog: &Url, name: &EnvName, generation: u64) -> Result<Url, CatalogError> {
    let dir = environment_url(catalog, name)?;
    dir.join(&format!("generations/{generation}.json"))
        .map_err(|_| CatalogError::BadUrl {
            url: Box::new(catalog.clone()),
        })
}

impl<'a, F: Fetch> Catalog<'a, F> {
    /// A catalog at `base`.
    pub fn new(base: Url, fetch: &'a F) -> Self {
        Catalog {
            base,
            fetch,
            retry: RetryPolicy::with_attempts(1),
            max_lock_size: MAX_LOCK_BYTES,
            pace: PaceLimits::from_config(&crate::config::Config::default()),
        }
    }

    /// Refuses locks larger than `bytes` (default [`MAX_LOCK_BYTES`]): reading stops there.
    pub fn with_max_lock_size(mut self, bytes: u64) -> Self {
        self.max_lock_size = bytes;
        self
    }

    /// Retries failures worth retrying (5xx, resets) under `retry` (default: one attempt).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Bounds each request by `pace`: a lock must arrive within `narinfo-timeout` plus
    /// `max-lock-size` / `min-transfer-rate` (default: the default settings'), however slowly
    /// the server trickles it.
    pub fn with_pace(mut self, pace: PaceLimits) -> Self {
        self.pace = pace;
        self
    }

    /// The overall deadline of one request for a lock.
    fn deadline(&self) -> Duration {
        let trickle = self.max_lock_size / self.pace.min_rate.max(1);
        self.pace
            .narinfo
            .saturating_add(Duration::from_secs(trickle))
    }

    /// The base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The fetcher.
    pub fn fetcher(&self) -> &'a F {
        self.fetch
    }

    /// The current generation's lock.
    pub async fn current(&self, name: &EnvName) -> Result<Lock, CatalogError> {
        let url = current_url(&self.base, name)?;
        let lock = self.get_lock(&url, name, None).await?;
        Ok(lock)
    }

    /// Generation `generation`'s lock.
    pub async fn generation(&self, name: &EnvName, generation: u64) -> Result<Lock, CatalogError> {
        let url = generation_url(&self.base, name, generation)?;
        self.get_lock(&url, name, Some(generation)).await
    }

    async fn get_lock(
        &self,
        url: &Url,
        name: &EnvName,
        generation: Option<u64>,
    ) -> Result<Lock, CatalogError> {
        tracing::debug!(%url, environment = %name, ?generation, "fetching lock");
        let fetched = self
            .retry
            .run(
                |_| async {
                    let limit = self.deadline();
                    tokio::time::timeout(limit, self.fetch.get_bytes(url, self.max_lock_size))
                        .await
                        .unwrap_or_else(|_| {
                            Err(FetchError::TooSlow {
                                url: url.clone(),
                                reason: Box::new(TooSlow::Deadline { limit }),
                            })
                        })
                },
                FetchError::is_retryable,
            )
            .await;
        let bytes = match fetched {
            Ok(b) => b,
            Err(FetchError::NotFound { .. }) => {
                return Err(match generation {
                    None => CatalogError::EnvironmentNotFound {
                        name: name.clone(),
                        catalog: Box::new(self.base.clone()),
                    },
                    Some(generation) => CatalogError::GenerationNotFound {
                        name: name.clone(),
                        generation,
                        catalog: Box::new(self.base.clone()),
                    },
                })
            }
            Err(FetchError::TooLarge { limit, read, .. }) => {
                return Err(CatalogError::TooLarge {
                    url: Box::new(url.clone()),
                    limit,
                    read,
                })
            }
            Err(source) => {
                tracing::warn!(%url, environment = %name, error = %source, "catalog request failed");
                return Err(CatalogError::Unreachable {
                    source: Box::new(source),
                });
            }
        };
        check_lock(url, &bytes, name, generation)
    }
}

/// Parses lock bytes read from `url` and checks they are `name` (generation `generation` if given).
pub fn check_lock(
    url: &Url,
    bytes: &[u8],
    name: &EnvName,
    generation: Option<u64>,
) -> Result<Lock, CatalogError> {
    let lock = Lock::parse(bytes).map_err(|source| CatalogError::Malformed {
        url: Box::new(url.clone()),
        source,
    })?;
    if lock.name != *name || generation.is_some_and(|g| g != lock.generation) {
        return Err(CatalogError::Mismatch {
            url: Box::new(url.clone()),
            found_name: lock.name,
            found_generation: lock.generation,
            expected: match generation {
                Some(g) => format!("{name} generation {g}"),
                None => name.to_string(),
            },
        });
    }
    Ok(lock)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::fetch::Body;

    /// What a fake URL answers.
    #[derive(Clone, Debug)]
    pub enum Answer {
        Ok(Vec<u8>),
        NotFound,
        Status(u16),
        Down,
    }

    /// A fake catalog: answers by URL, counts requests; unknown URLs are 404.
    #[derive(Clone, Default)]
    pub struct FakeFetch {
        pub answers: Arc<Mutex<HashMap<String, Answer>>>,
        pub requests: Arc<Mutex<Vec<String>>>,
    }

    impl FakeFetch {
        pub fn set(&self, url: &str, a: Answer) {
            self.answers.lock().unwrap().insert(url.to_owned(), a);
        }
        pub fn count(&self, url: &str) -> usize {
            self.requests
                .lock()
                .unwrap()
                .iter()
                .filter(|u| *u == url)
                .count()
        }
        pub fn total(&self) -> usize {
            self.requests.lock().unwrap().len()
        }
    }

    impl Fetch for FakeFetch {
        async fn get(&self, url: &Url) -> Result<Body, FetchError> {
            self.requests.lock().unwrap().push(url.to_string());
            let a = self
                .answers
                .lock()
                .unwrap()
                .get(url.as_str())
                .cloned()
                .unwrap_or(Answer::NotFound);
            match a {
                Answer::Ok(b) => Ok(Box::pin(futures::stream::once(async move {
                    Ok(bytes::Bytes::from(b))
                }))),
                Answer::NotFound => Err(FetchError::NotFound { url: url.clone() }),
                Answer::Status(status) => Err(FetchError::Status {
                    url: url.clone(),
                    status,
                }),
                Answer::Down => Err(FetchError::Transport {
                    url: url.clone(),
                    message: "connection refused".into(),
                    retryable: true,
                }),
            }
        }
    }

    pub const A: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-echoserver-0.1.0";
    pub const B: &str = "/nix/store/0c5dz6xgk7qd8s4w6djl1j46f8pbdjrs-busybox-1.35.0";
    pub const BASE: &str = "http://127.0.0.1:9/cat";

    pub fn lock_bytes(name: &str, generation: u64) -> Vec<u8> {
        format!(
            r#"{{"schema": 1, "name": "{name}", "generation": {generation},
               "systems": {{"x86_64-linux": {{"paths": ["{A}", "{B}"], "env": {{"G": "{generation}"}}}}}}}}"#
        )
        .into_bytes()
    }

    fn catalog(f: &FakeFetch) -> Catalog<'_, FakeFetch> {
        Catalog::new(Url::parse(BASE).unwrap(), f)
    }

    #[tokio::test]
    async fn reads_current_and_pinned() {
        let f = FakeFetch::default();
        f.set(
            &format!("{BASE}/acme/app/current.json"),
            Answer::Ok(lock_bytes("acme/app", 3)),
        );
        f.set(
            &format!("{BASE}/acme/app/generations/2.json"),
            Answer::Ok(lock_bytes("acme/app", 2)),
        );
        let name: EnvName = "acme/app".parse().unwrap();
        let c = catalog(&f);
        assert_eq!(c.current(&name).await.unwrap().generation, 3);
        assert_eq!(c.generation(&name, 2).await.unwrap().generation, 2);
        // A base with a trailing slash gives the same URLs.
        let c2 = Catalog::new(Url::parse(&format!("{BASE}/")).unwrap(), &f);
        assert_eq!(c2.generation(&name, 2).await.unwrap().generation, 2);
        assert_eq!(f.count(&format!("{BASE}/acme/app/generations/2.json")), 2);
    }

    #[tokio::test]
    async fn not_found_is_said_plainly() {
        let f = FakeFetch::default();
        let name: EnvName = "acme/app".parse().unwrap();
        let c = catalog(&f);
        assert_eq!(
            c.current(&name).await.unwrap_err().to_string(),
            format!("environment acme/app not found in catalog {BASE}")
        );
        assert_eq!(
            c.generation(&name, 9).await.unwrap_err().to_string(),
            format!("generation 9 of acme/app not found in catalog {BASE}")
        );
    }

    #[tokio::test]
    async fn unreachable_malformed_and_mismatched() {
        let f = FakeFetch::default();
        let name: EnvName = "acme/app".parse().unwrap();
        let c = catalog(&f);
        let cur = format!("{BASE}/acme/app/current.json");
        f.set(&cur, Answer::Down);
        let e = c.current(&name).await.unwrap_err();
        assert!(e.is_unreachable());
        assert_eq!(
            e.to_string(),
            format!("catalog unreachable: {cur}: connection refused")
        );
        f.set(&cur, Answer::Status(503));
        assert!(c.current(&name).await.unwrap_err().is_unreachable());
        f.set(&cur, Answer::Ok(b"{\"schema\": 1, ".to_vec()));
        let e = c.current(&name).await.unwrap_err();
        assert!(!e.is_unreachable());
        assert!(
            e.to_string()
                .starts_with(&format!("{cur}: malformed lock: not valid JSON: EOF")),
            "{e}"
        );
        f.set(&cur, Answer::Ok(lock_bytes("acme/other", 3)));
        assert_eq!(
            c.current(&name).await.unwrap_err().to_string(),
            format!("{cur}: the lock is acme/other generation 3, expected acme/app")
        );
        let g4 = format!("{BASE}/acme/app/generations/4.json");
        f.set(&g4, Answer::Ok(lock_bytes("acme/app", 3)));
        assert_eq!(
            c.generation(&name, 4).await.unwrap_err().to_string(),
            format!("{g4}: the lock is acme/app generation 3, expected acme/app generation 4")
        );
    }

    /// A catalog whose every answer is an endless body of 64 KiB chunks, counting those taken.
    #[derive(Clone, Default)]
    struct Endless {
        chunks: Arc<std::sync::atomic::AtomicU64>,
    }

    impl Fetch for Endless {
        async fn get(&self, _url: &Url) -> Result<Body, FetchError> {
            let chunks = self.chunks.clone();
            Ok(Box::pin(futures::stream::repeat_with(move || {
                chunks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(bytes::Bytes::from(vec![b' '; 64 << 10]))
            })))
        }
    }

    /// A catalog that sends one byte of a lock, then nothing, forever.
    struct Trickle;

    impl Fetch for Trickle {
        async fn get(&self, _url: &Url) -> Result<Body, FetchError> {
            use futures::StreamExt;
            let first = futures::stream::iter([Ok(bytes::Bytes::from_static(b"{"))]);
            Ok(Box::pin(first.chain(futures::stream::pending())))
        }
    }

    #[tokio::test]
    async fn a_trickling_catalog_is_cut_at_its_deadline_and_counts_as_unreachable() {
        let name: EnvName = "acme/app".parse().unwrap();
        let pace = PaceLimits {
            min_rate: 1 << 20,
            window: Duration::from_secs(30),
            nar_base: Duration::from_secs(60),
            narinfo: Duration::from_millis(300),
        };
        // 300 ms, plus 1 MiB at 1 MiB/s.
        let c = Catalog::new(Url::parse(BASE).unwrap(), &Trickle)
            .with_max_lock_size(1 << 20)
            .with_pace(pace);
        let started = std::time::Instant::now();
        let e = c.current(&name).await.unwrap_err();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1300), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert!(e.is_unreachable(), "{e}");
        assert!(
            e.to_string()
                .ends_with("acme/app/current.json: too slow: not complete within 1s 300ms"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_lock_over_the_cap_is_refused_once_the_cap_is_read() {
        let f = Endless::default();
        let name: EnvName = "acme/app".parse().unwrap();
        let c = Catalog::new(Url::parse(BASE).unwrap(), &f).with_max_lock_size(1 << 20);
        let e = c.current(&name).await.unwrap_err();
        assert!(!e.is_unreachable());
        let cur = format!("{BASE}/acme/app/current.json");
        assert_eq!(
            e.to_string(),
            format!(
                "{cur}: lock refused: larger than max-lock-size (1048576 bytes), \
                 reading stopped at 1114112 bytes"
            )
        );
        // 16 chunks make the cap, the 17th crosses it; nothing after it is asked for.
        assert_eq!(f.chunks.load(std::sync::atomic::Ordering::SeqCst), 17);
        // The default cap applies when none is set.
        let f = Endless::default();
        let e = Catalog::new(Url::parse(BASE).unwrap(), &f)
            .current(&name)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains(&format!("({MAX_LOCK_BYTES} bytes)")),
            "{e}"
        );
        assert_eq!(
            f.chunks.load(std::sync::atomic::Ordering::SeqCst),
            MAX_LOCK_BYTES / (64 << 10) + 1
        );
    }

    #[test]
    fn urls() {
        let name: EnvName = "acme/app".parse().unwrap();
        let file = Url::parse("file:///srv/catalog").unwrap();
        assert_eq!(
            current_url(&file, &name).unwrap().as_str(),
            "file:///srv/catalog/acme/app/current.json"
        );
        assert_eq!(
            generation_url(&file, &name, 12).unwrap().as_str(),
            "file:///srv/catalog/acme/app/generations/12.json"
        );
        let q = Url::parse("https://c.example/base/?x=1").unwrap();
        assert!(current_url(&q, &name)
            .unwrap()
            .as_str()
            .starts_with("https://c.example/base/acme/app/current.json"));
        assert!(current_url(&Url::parse("data:text/plain,x").unwrap(), &name).is_err());
    }
}
