//! Closures from Nix binary caches, streamed into the node store.
//!
//! [`materialise`] is the one call the rest of the system makes: it returns the closure of
//! some root store paths once every path in it is valid in the node store.
//!
//! - Paths already valid locally are not looked up at all: their references come from the
//!   store's records, so a warm closure costs no network request (and [`materialise`] then
//!   builds no HTTP client and no task).
//! - Other paths are resolved with many `<hash>.narinfo` requests in flight (at most
//!   `http-connections`), over the substituters in order (a 404, or no complete answer
//!   within `narinfo-timeout`, moves on to the next one);
//!   each cache's `nix-cache-info` is checked once (`StoreDir: /nix/store`); the narinfo must
//!   describe the requested path and carry a signature by a trusted key (unless
//!   `require-sigs = false`). Its NAR URL is not signed: it must stay inside the cache that
//!   served the narinfo, encoded separators included ([`confine`]).
//! - As soon as a path is resolved its NAR is downloaded, in parallel with the rest of the
//!   walk: under the path's store lock (re-checking validity, so concurrent processes fetch
//!   each path once), body chunks go through a bounded channel to a blocking thread that
//!   decompresses, hashes, unpacks into a staging area and verifies NarHash/NarSize before
//!   the commit rename. A failed attempt that may succeed again (5xx, reset, timeout, a
//!   stream broken midway) restarts that NAR from scratch, with backoff. A NAR below
//!   `min-transfer-rate` over a `transfer-rate-window`, or not complete within
//!   `nar-timeout-base` + NarSize / `min-transfer-rate`, fails at once ([`crate::fetch::pace`]).
//! - Before a NAR is downloaded, the store's filesystem must have room for the NarSize of
//!   every path resolved and not yet installed by this run (`statvfs`, [`FreeSpace`]);
//!   otherwise the pull fails at once naming both numbers (and `gc-max-size`, if set).
//! - Once every path of the closure is resolved, the reference graph is checked for a cycle
//!   (self-references aside; Nix never makes one, a signer might): a cycle is refused, as
//!   its paths would each wait for the others to be committed first ([`cycle`]).
//! - Before it downloads anything, a run removes the staging areas (`.tmp-<hash>`) that no
//!   live process holds: leftovers of pulls killed midway.
//! - Paths are installed in parallel, not in reference order; the returned closure is
//!   complete only when every install has succeeded. On the first failure the others are
//!   cancelled and their staging areas removed before the error is returned.

pub mod confine;
pub mod cycle;
pub mod error;
pub mod progress;
pub mod resolve;
mod stream;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use url::Url;

pub use error::SubstituteError;
pub use progress::{NoProgress, Progress};
pub use resolve::Resolver;

use crate::config::{Config, StoreDurability};
use crate::fetch::pace::{Pace, Paced, TooSlow};
use crate::fetch::retry::RetryPolicy;
use crate::fetch::{Fetch, FetchError};
use crate::nix::nar::NarLimits;
use crate::nix::{NarInfo, StorePath};
use crate::store::space::{FreeSpace, Statvfs};
use crate::store::{Closure, Durability, PathInfo, PathLock, Staging, Store};

/// How often to retry a store lock another process holds.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Materialises the closure of `roots` into the store under `cfg.state_dir`, fetching
/// missing paths from `cfg.substituters` over `fetch`; returns the closure (sorted, with
/// references). The caller holds the shared gc lock ([`crate::gc::GcLock::shared`]) from
/// before this call until the closure is rooted (see `crate::gc`).
pub async fn materialise<F: Fetch, P: Progress>(
    cfg: &Config,
    fetch: F,
    roots: &[StorePath],
    progress: &P,
) -> Result<Closure, SubstituteError> {
    let store = open_store(cfg)?;
    let closure = match local_closure(&store, roots)? {
        Some(c) => c,
        None => {
            Substituter::new(cfg, fetch, Arc::new(store.clone()))?
                .materialise(roots, progress)
                .await?
        }
    };
    crate::gc::usage::touch(&store, &closure.paths);
    Ok(closure)
}

/// Opens the store of `cfg` (creating its directories).
pub fn open_store(cfg: &Config) -> Result<Store, SubstituteError> {
    let durability = match cfg.store_durability {
        StoreDurability::Syncfs => Durability::Syncfs,
        StoreDurability::Fsync => Durability::Fsync,
    };
    Store::open(&cfg.state_dir)
        .map(|store| store.with_durability(durability))
        .map_err(|source| SubstituteError::OpenStore {
            state_dir: cfg.state_dir.clone(),
            source: Box::new(source),
        })
}

/// The closure of `roots` if it is entirely valid in `store` (no network), else `None`.
pub fn local_closure(
    store: &Store,
    roots: &[StorePath],
) -> Result<Option<Closure>, SubstituteError> {
    store
        .local_closure(roots)
        .map_err(|source| SubstituteError::OpenStore {
            state_dir: store.state_dir().to_owned(),
            source: Box::new(source),
        })
}

/// A substituter over some [`Fetch`] transport.
pub struct Substituter<F: Fetch> {
    fetch: F,
    resolver: Resolver,
    store: Arc<Store>,
    requests: usize,
    downloads: usize,
    limits: NarLimits,
    free_space: Arc<dyn FreeSpace>,
    /// `gc-max-size`, named in a lack-of-space error.
    budget: Option<u64>,
}

/// What the tasks of one materialisation share.
struct RunState {
    /// Narinfo requests in flight.
    requests: Semaphore,
    /// NAR downloads in flight.
    downloads: Semaphore,
    /// Set on the first failure: everything else stops and cleans up.
    cancel: CancellationToken,
    /// Paths valid in the store (found valid, or committed by this run).
    done: std::sync::Mutex<HashSet<StorePath>>,
    /// Signalled whenever `done` grows.
    changed: Notify,
}

impl RunState {
    fn mark_done(&self, path: &StorePath) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.clone());
        self.changed.notify_waiters();
    }

    /// Waits until every reference (other than `me`) is valid; `Err` if the run is cancelled.
    async fn wait_for(&self, me: &StorePath, refs: &[StorePath]) -> Result<(), ()> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
                if refs.iter().all(|r| r == me || done.contains(r)) {
                    return Ok(());
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = self.cancel.cancelled() => return Err(()),
            }
        }
    }
}

/// One finished unit of work of the walk.
enum Event {
    Resolved(StorePath, Result<Box<(NarInfo, Url)>, SubstituteError>),
    /// The NarSize the install had reserved, and its outcome.
    Installed(u64, Result<(), SubstituteError>),
}

impl<F: Fetch> Substituter<F> {
    /// A substituter for `cfg`'s caches, keys and limits, over `fetch`, into `store`.
    pub fn new(cfg: &Config, fetch: F, store: Arc<Store>) -> Result<Self, SubstituteError> {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Substituter {
            fetch,
            resolver: Resolver::new(cfg)?,
            store,
            requests: cfg.http_connections.max(1),
            // Each download decompresses on its own thread; a few per core keep the
            // network busy without holding many decoder windows in memory.
            downloads: cfg.http_connections.clamp(1, (cpus * 4).max(4)),
            limits: NarLimits::default(),
            free_space: Arc::new(Statvfs),
            budget: cfg.gc_max_size,
        })
    }

    /// Replaces the free-space probe (tests fake a full disk).
    pub fn with_free_space(mut self, free_space: Arc<dyn FreeSpace>) -> Self {
        self.free_space = free_space;
        self
    }

    /// Whether the store's filesystem has room for `needed` bytes: the NarSize of every path
    /// resolved but not yet installed by this run, `path`'s included. A probe that fails is
    /// logged and does not stop the pull.
    fn check_space(&self, path: &StorePath, needed: u64) -> Result<(), SubstituteError> {
        let dir = self.store.store_dir();
        match self.free_space.available(dir) {
            Ok(available) if needed > available => Err(SubstituteError::NoSpace {
                path: path.clone(),
                shortfall: Box::new(error::Shortfall {
                    needed,
                    available,
                    dir: dir.to_owned(),
                    budget: self.budget,
                }),
            }),
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read free disk space");
                Ok(())
            }
        }
    }

    /// Replaces the retry policy (tests use short delays).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.resolver.retry = retry;
        self
    }

    /// The store this substituter installs into.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Materialises the closure of `roots`; see the module documentation.
    pub async fn materialise<P: Progress>(
        &self,
        roots: &[StorePath],
        progress: &P,
    ) -> Result<Closure, SubstituteError> {
        raise_fd_limit();
        // Staging areas no live process holds are leftovers of killed pulls: clear them
        // before adding new ones (best effort, a failure here does not stop the pull).
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.remove_stale_staging()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot remove stale staging areas"),
            Err(e) => tracing::warn!(error = %e, "cannot remove stale staging areas"),
        }
        let state = RunState {
            requests: Semaphore::new(self.requests),
            downloads: Semaphore::new(self.downloads),
            cancel: CancellationToken::new(),
            done: Default::default(),
            changed: Notify::new(),
        };
        let cancel = &state.cancel;
        let mut refs: BTreeMap<StorePath, Vec<StorePath>> = BTreeMap::new();
        let mut seen: HashSet<StorePath> = HashSet::new();
        let mut queue: VecDeque<StorePath> = roots.iter().cloned().collect();
        let mut pending: FuturesUnordered<BoxFuture<'_, Event>> = FuturesUnordered::new();
        let mut first_err: Option<SubstituteError> = None;
        // Narinfo lookups in flight; once none is left the whole graph is known.
        let mut resolving = 0usize;
        let mut cycles_checked = false;
        // NarSize of the paths resolved and not yet installed: what the disk must still hold.
        let mut outstanding = 0u64;

        loop {
            while first_err.is_none() {
                let Some(p) = queue.pop_front() else { break };
                if !seen.insert(p.clone()) {
                    continue;
                }
                match self.store.query(&p) {
                    Ok(Some(info)) => {
                        progress.present(&p);
                        state.mark_done(&p);
                        queue.extend(
                            info.references
                                .iter()
                                .filter(|r| !seen.contains(*r))
                                .cloned(),
                        );
                        refs.insert(p, info.references);
                    }
                    Ok(None) => {
                        let fut = self
                            .resolver
                            .resolve(&self.fetch, p.clone(), &state.requests);
                        resolving += 1;
                        pending.push(
                            async move {
                                let r = tokio::select! {
                                    r = fut => r.map(Box::new),
                                    _ = cancel.cancelled() => {
                                        Err(SubstituteError::Cancelled { path: p.clone() })
                                    }
                                };
                                Event::Resolved(p, r)
                            }
                            .boxed(),
                        );
                    }
                    Err(source) => {
                        first_err = Some(SubstituteError::Store {
                            path: p,
                            source: Box::new(source),
                        });
                        cancel.cancel();
                    }
                }
            }
            if first_err.is_none() && queue.is_empty() && resolving == 0 && !cycles_checked {
                // Members of a cycle would each wait for the others forever: refuse it.
                cycles_checked = true;
                if let Some(cycle) = cycle::find_cycle(&refs) {
                    first_err = Some(SubstituteError::Cycle {
                        path: cycle[0].clone(),
                        cycle,
                    });
                    cancel.cancel();
                }
            }
            let Some(ev) = pending.next().await else {
                break;
            };
            if let Event::Resolved(..) = ev {
                resolving -= 1;
            }
            match ev {
                Event::Resolved(p, Ok(resolved)) => {
                    let (info, cache) = *resolved;
                    progress.resolved(&p, &info);
                    if first_err.is_none() {
                        let mut r = info.references.clone();
                        r.sort();
                        r.dedup();
                        queue.extend(r.iter().filter(|r| !seen.contains(*r)).cloned());
                        refs.insert(p.clone(), r);
                        let size = info.nar_size;
                        let needed = outstanding.saturating_add(size);
                        if let Err(e) = self.check_space(&p, needed) {
                            first_err = Some(e);
                            cancel.cancel();
                        } else {
                            outstanding = needed;
                            let fut = self.install(info, cache, &state, progress);
                            pending.push(async move { Event::Installed(size, fut.await) }.boxed());
                        }
                    }
                }
                Event::Installed(size, Ok(())) => outstanding = outstanding.saturating_sub(size),
                Event::Resolved(_, Err(e)) | Event::Installed(_, Err(e)) => {
                    if first_err.is_none() && !matches!(e, SubstituteError::Cancelled { .. }) {
                        tracing::debug!(error = %e, "cancelling the other downloads");
                        first_err = Some(e);
                        cancel.cancel();
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(Closure::from_references(refs)),
        }
    }

    /// Downloads, verifies and installs one path (unless another process did meanwhile).
    ///
    /// Downloads run in parallel, but a path is committed only once all its references are
    /// valid, so a valid path's closure is always valid too (after a failure or a crash, the
    /// store never holds a path whose references are missing).
    async fn install<P: Progress>(
        &self,
        info: NarInfo,
        cache: Url,
        state: &RunState,
        progress: &P,
    ) -> Result<(), SubstituteError> {
        let path = info.store_path.clone();
        let task_err = |e: tokio::task::JoinError| SubstituteError::Task {
            path: path.clone(),
            message: e.to_string(),
        };
        let store_err = |source| SubstituteError::Store {
            path: path.clone(),
            source: Box::new(source),
        };
        // Wait for the lock without holding a thread or a download slot: whoever holds it
        // (another process, maybe waiting for paths this run installs) can always progress.
        let lock = loop {
            if let Some(l) = self.store.try_lock(&path).map_err(store_err)? {
                break l;
            }
            tokio::select! {
                _ = tokio::time::sleep(LOCK_POLL) => {}
                _ = state.cancel.cancelled() => return Err(SubstituteError::Cancelled { path }),
            }
        };
        let permit = state.downloads.acquire().await;
        if state.cancel.is_cancelled() {
            return Err(SubstituteError::Cancelled { path });
        }
        let lock = Arc::new(lock);
        if self.store.query(&path).map_err(store_err)?.is_some() {
            progress.present(&path);
            state.mark_done(&path);
            return Ok(());
        }
        let url = cache
            .join(&info.url)
            .map_err(|e| SubstituteError::BadCache {
                path: path.clone(),
                cache: Box::new(cache.clone()),
                message: format!("bad NAR URL {:?}: {e}", info.url),
            })?;
        // The narinfo's URL is not signed: it must stay within the cache that served it.
        confine::check(&cache, &url).map_err(|source| SubstituteError::NarUrl {
            path: path.clone(),
            url: info.url.clone(),
            cache: Box::new(cache.clone()),
            source: Box::new(source),
        })?;
        let info = Arc::new(info);
        progress.download_started(&path, &url, info.file_size, info.nar_size);
        let span = tracing::info_span!("nar", %path, %url);
        let path_ref = &path;
        let (staging, pinfo) = self
            .resolver
            .retry
            .run(
                |attempt| {
                    let (info, url, lock) = (info.clone(), url.clone(), lock.clone());
                    async move {
                        let r = self
                            .download_once(info, url, lock, &state.cancel, progress)
                            .await;
                        if let Err((e, received)) = &r {
                            if e.is_retryable() {
                                tracing::warn!(attempt, error = %e, "download failed, restarting");
                                progress.download_restarted(path_ref, *received, &e.to_string());
                            }
                        }
                        r.map_err(|(e, _)| e)
                    }
                },
                SubstituteError::is_retryable,
            )
            .instrument(span)
            .await?;
        drop(permit);
        if state.wait_for(&path, &pinfo.references).await.is_err() {
            return Err(SubstituteError::Cancelled { path });
        }
        tokio::task::spawn_blocking(move || staging.commit(&pinfo))
            .await
            .map_err(task_err)?
            .map_err(store_err)?;
        state.mark_done(&path);
        progress.download_finished(&path);
        Ok(())
    }

    /// One attempt at a NAR: stream the body into a blocking unpacker. Returns the verified,
    /// uncommitted path, or an error with the number of bytes received.
    async fn download_once<P: Progress>(
        &self,
        info: Arc<NarInfo>,
        url: Url,
        lock: Arc<PathLock>,
        cancel: &CancellationToken,
        progress: &P,
    ) -> Result<(Staging, PathInfo), (SubstituteError, u64)> {
        let path = info.store_path.clone();
        let pace = self.resolver.pace;
        let limit = pace.nar_deadline(info.nar_size);
        let pace = Pace::new(Instant::now(), limit, pace.min_rate, pace.window);
        let body = match tokio::time::timeout_at(pace.deadline(), self.fetch.get(&url)).await {
            Ok(Ok(b)) => b,
            Ok(Err(source)) => {
                return Err((fetch_failure(&path, &url, source), 0));
            }
            Err(_) => {
                let source = FetchError::TooSlow {
                    url: url.clone(),
                    reason: Box::new(TooSlow::Deadline { limit }),
                };
                return Err((fetch_failure(&path, &url, source), 0));
            }
        };
        let mut body = Paced::new(body, url.clone(), pace);
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(stream::CHANNEL_CHUNKS);
        let store = self.store.clone();
        let limits = self.limits.clone();
        let (winfo, wurl) = (info.clone(), url.clone());
        let worker = tokio::task::spawn_blocking(move || {
            stream::unpack_and_verify(
                &store,
                &lock,
                &winfo,
                &wurl,
                stream::ChannelReader::new(rx),
                &limits,
            )
        });
        let mut received = 0u64;
        let mut failure: Option<SubstituteError> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = tx.send(Err(io::Error::other("cancelled"))).await;
                    failure = Some(SubstituteError::Cancelled { path: path.clone() });
                    break;
                }
                chunk = body.next() => match chunk {
                    None => break,
                    Some(Ok(b)) => {
                        received += b.len() as u64;
                        progress.download_bytes(&path, b.len() as u64);
                        if tx.send(Ok(b)).await.is_err() {
                            // The unpacker stopped early: its result says why.
                            break;
                        }
                    }
                    Some(Err(source)) => {
                        let _ = tx.send(Err(io::Error::other("download failed"))).await;
                        failure = Some(fetch_failure(&path, &url, source));
                        break;
                    }
                }
            }
        }
        drop(tx);
        drop(body);
        let unpacked = worker.await.map_err(|e| SubstituteError::Task {
            path: path.clone(),
            message: e.to_string(),
        });
        tracing::debug!(%path, bytes = received, "NAR stream ended");
        match (failure, unpacked) {
            (Some(e), _) => Err((e, received)),
            (None, Err(e)) | (None, Ok(Err(e))) => Err((e, received)),
            (None, Ok(Ok(staged))) => Ok(staged),
        }
    }
}

/// Raises the soft open-file limit to the hard one (once per process): every path downloaded
/// but waiting for its references keeps its lock file open.
fn raise_fd_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read/write the struct passed by pointer.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                let want = lim.rlim_max.min(1 << 20);
                if lim.rlim_cur < want {
                    lim.rlim_cur = want;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                }
            }
        }
    });
}

/// A transport failure while fetching a NAR, as the user should read it.
fn fetch_failure(path: &StorePath, url: &Url, source: FetchError) -> SubstituteError {
    match source {
        FetchError::Transport {
            message,
            retryable: true,
            ..
        } => SubstituteError::Interrupted {
            path: path.clone(),
            url: Box::new(url.clone()),
            cause: message,
        },
        source => SubstituteError::Fetch {
            path: path.clone(),
            source: Box::new(source),
        },
    }
}
