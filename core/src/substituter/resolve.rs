//! Finding and verifying narinfos: the substituters in order (a 404, or no answer within
//! `narinfo-timeout`, moves on to the next),
//! each cache's `nix-cache-info` checked once (`StoreDir: /nix/store`), the narinfo
//! describing the requested path and signed by a trusted key (unless `require-sigs = false`).
//! Used by [`Substituter`](super::Substituter) before each download, and by publishing, which
//! checks that a closure is available without downloading it ([`Resolver::closure`]).

use std::collections::HashSet;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{OnceCell, Semaphore};
use tracing::Instrument;
use url::Url;

use super::error::SubstituteError;
use crate::config::Config;
use crate::fetch::pace::{PaceLimits, TooSlow};
use crate::fetch::retry::RetryPolicy;
use crate::fetch::{Fetch, FetchError};
use crate::nix::{NarInfo, StorePath, TrustedKeys, STORE_DIR};

/// Largest accepted `.narinfo` or `nix-cache-info`.
const MAX_NARINFO: u64 = 1 << 20;

/// One substituter.
struct Cache {
    /// Base URL, with a trailing slash so that `join` appends.
    url: Url,
    /// Result of checking `nix-cache-info`, once.
    checked: OnceCell<Result<(), CacheProblem>>,
}

/// Why a cache's `nix-cache-info` check failed.
#[derive(Debug, Clone)]
enum CacheProblem {
    /// It did not answer (a retryable transport failure or status): the cache is down.
    Unreachable(String),
    /// It answered something unusable.
    Bad(String),
}

/// The configured caches and keys, and how to ask them.
pub struct Resolver {
    caches: Vec<Cache>,
    keys: TrustedKeys,
    require_sigs: bool,
    pub(crate) retry: RetryPolicy,
    /// Deadlines and minimum rate of transfers.
    pub(crate) pace: PaceLimits,
}

pub(crate) fn with_slash(mut u: Url) -> Url {
    if !u.path().ends_with('/') {
        let p = format!("{}/", u.path());
        u.set_path(&p);
    }
    u
}

impl Resolver {
    /// A resolver for `cfg`'s substituters, trusted keys and retry settings.
    pub fn new(cfg: &Config) -> Result<Self, SubstituteError> {
        let keys =
            TrustedKeys::from_strs(&cfg.trusted_public_keys).map_err(SubstituteError::Keys)?;
        Ok(Resolver {
            caches: cfg
                .substituters
                .iter()
                .map(|u| Cache {
                    url: with_slash(u.clone()),
                    checked: OnceCell::new(),
                })
                .collect(),
            keys,
            require_sigs: cfg.require_sigs,
            retry: RetryPolicy::with_attempts(cfg.download_attempts),
            pace: PaceLimits::from_config(cfg),
        })
    }

    /// The closure of `roots` as the caches describe it (sorted): every narinfo resolved and
    /// verified as for a download, no NAR fetched, at most `requests` narinfo requests in
    /// flight. The local store is not consulted.
    pub async fn closure<F: Fetch>(
        &self,
        fetch: &F,
        roots: &[StorePath],
        requests: usize,
    ) -> Result<Vec<StorePath>, SubstituteError> {
        let permits = Semaphore::new(requests.max(1));
        let mut seen: HashSet<StorePath> = HashSet::new();
        let mut queue: Vec<StorePath> = roots.to_vec();
        let mut pending = FuturesUnordered::new();
        loop {
            while let Some(p) = queue.pop() {
                if seen.insert(p.clone()) {
                    pending.push(self.resolve(fetch, p, &permits));
                }
            }
            match pending.next().await {
                None => break,
                Some(resolved) => {
                    let (info, _) = resolved?;
                    queue.extend(info.references.into_iter().filter(|r| !seen.contains(r)));
                }
            }
        }
        let mut closure: Vec<StorePath> = seen.into_iter().collect();
        closure.sort();
        Ok(closure)
    }

    /// Checks a cache's `nix-cache-info` once: its `StoreDir` must be `/nix/store`. A cache
    /// without the file is accepted (its narinfos name their paths anyway).
    async fn check_cache<F: Fetch>(&self, fetch: &F, cache: &Cache) -> Result<(), CacheProblem> {
        cache
            .checked
            .get_or_init(|| async {
                let url = cache
                    .url
                    .join("nix-cache-info")
                    .map_err(|e| CacheProblem::Bad(e.to_string()))?;
                let got = self
                    .retry
                    .run(
                        |_| self.narinfo_bytes(fetch, &url),
                        FetchError::is_retryable,
                    )
                    .await;
                let text = match got {
                    Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                    Err(FetchError::NotFound { .. }) => return Ok(()),
                    Err(e) if e.is_retryable() => {
                        return Err(CacheProblem::Unreachable(e.to_string()))
                    }
                    Err(e) => return Err(CacheProblem::Bad(e.to_string())),
                };
                for line in text.lines() {
                    if let Some(dir) = line.strip_prefix("StoreDir:") {
                        let dir = dir.trim();
                        if dir != STORE_DIR {
                            return Err(CacheProblem::Bad(format!(
                                "store directory is {dir}, not {STORE_DIR}"
                            )));
                        }
                    }
                }
                Ok(())
            })
            .await
            .clone()
    }

    /// Finds, checks and verifies the narinfo of `path`; returns it with its cache's URL.
    pub(crate) async fn resolve<F: Fetch>(
        &self,
        fetch: &F,
        path: StorePath,
        requests: &Semaphore,
    ) -> Result<(NarInfo, Url), SubstituteError> {
        if self.caches.is_empty() {
            return Err(SubstituteError::NoSubstituters { path });
        }
        let name = format!("{}.narinfo", path.hash_str());
        // A cache too slow to answer is skipped; if no other has the path, this is the error.
        let mut slow: Option<FetchError> = None;
        for cache in &self.caches {
            self.check_cache(fetch, cache)
                .await
                .map_err(|problem| match problem {
                    CacheProblem::Unreachable(message) => SubstituteError::Unreachable {
                        path: path.clone(),
                        cache: Box::new(cache.url.clone()),
                        message,
                    },
                    CacheProblem::Bad(message) => SubstituteError::BadCache {
                        path: path.clone(),
                        cache: Box::new(cache.url.clone()),
                        message,
                    },
                })?;
            let url = cache
                .url
                .join(&name)
                .map_err(|e| SubstituteError::BadCache {
                    path: path.clone(),
                    cache: Box::new(cache.url.clone()),
                    message: e.to_string(),
                })?;
            let got = {
                let _permit = requests.acquire().await;
                self.retry
                    .run(
                        |_| self.narinfo_bytes(fetch, &url),
                        FetchError::is_retryable,
                    )
                    .instrument(tracing::debug_span!("narinfo", %url))
                    .await
            };
            let bytes = match got {
                Ok(b) => b,
                Err(FetchError::NotFound { .. }) => {
                    tracing::debug!(%path, %url, "not in this substituter");
                    continue;
                }
                Err(e @ FetchError::TooSlow { .. }) => {
                    tracing::warn!(%path, error = %e, "substituter too slow, trying the next");
                    slow = Some(e);
                    continue;
                }
                Err(source) => {
                    return Err(SubstituteError::Fetch {
                        path,
                        source: Box::new(source),
                    })
                }
            };
            let text = String::from_utf8_lossy(&bytes);
            let info = NarInfo::parse(&text).map_err(|source| SubstituteError::BadNarInfo {
                path: path.clone(),
                url: Box::new(url.clone()),
                source: Box::new(source),
            })?;
            if info.store_path != path {
                return Err(SubstituteError::WrongNarInfo {
                    path,
                    url: Box::new(url),
                    found: Box::new(info.store_path),
                });
            }
            if self.require_sigs {
                self.keys
                    .verify(&info)
                    .map_err(|source| SubstituteError::Signature {
                        path: path.clone(),
                        source: Box::new(source),
                    })?;
            }
            tracing::debug!(%path, %url, nar_size = info.nar_size, "resolved");
            return Ok((info, cache.url.clone()));
        }
        if let Some(source) = slow {
            return Err(SubstituteError::Fetch {
                path,
                source: Box::new(source),
            });
        }
        Err(SubstituteError::NotFound {
            path,
            caches: self.caches.iter().map(|c| c.url.clone()).collect(),
        })
    }

    /// One narinfo (or `nix-cache-info`) request, headers and body within `narinfo-timeout`.
    async fn narinfo_bytes<F: Fetch>(&self, fetch: &F, url: &Url) -> Result<Vec<u8>, FetchError> {
        let limit = self.pace.narinfo;
        tokio::time::timeout(limit, fetch.get_bytes(url, MAX_NARINFO))
            .await
            .unwrap_or_else(|_| {
                Err(FetchError::TooSlow {
                    url: url.clone(),
                    reason: Box::new(TooSlow::Deadline { limit }),
                })
            })
    }
}
