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
//! - The walk goes depth first, with at most `http-connections` narinfo lookups in flight (a
//!   path waiting for a lookup costs one queue entry, not a task), so leaves resolve early;
//!   past 8,192 resolved paths not yet launched it resolves more only when the installs run
//!   dry, so narinfos do not pile up in memory ahead of slow installs.
//! - A resolved path is *launched* once each of its references is launched or valid
//!   ([`schedule`]), at most 256 at once: its NAR is downloaded, in parallel with the rest of
//!   the walk, under the path's store lock (re-checking validity, so concurrent processes
//!   fetch each path once); body chunks go through a bounded channel to a blocking thread that
//!   decompresses, hashes, unpacks into a staging area and verifies NarHash/NarSize before
//!   the commit rename. Several NARs are decoded at once, one thread each; when a core is
//!   spare (fewer NARs in work than cores, as at the end of a pull), a NAR of 1 MiB or more
//!   moves its decompression to a second thread that hands decoded chunks over a bounded
//!   channel to the hashing and unpacking one ([`decode`]), so that one big NAR uses two
//!   cores. A failed attempt that may succeed again (5xx, reset, timeout, a
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
//! - A staged path is committed once each of its references is valid, so the store never
//!   holds a valid path whose references are missing. Launching only above launched paths
//!   keeps the staged-and-waiting paths bounded (open lock files, staging areas) and the
//!   walk free of deadlock; what the walk holds per path of the closure is its references
//!   (the returned [`Closure`]) and a few set entries: a closure of 100,000 paths pulls in
//!   well under 256 MiB (`bench/wide-pull.sh`).
//! - The returned closure is complete only when every install has succeeded. On the first
//!   failure the others are cancelled and their staging areas removed before the error is
//!   returned.

pub mod confine;
pub mod cycle;
pub mod decode;
pub mod error;
pub mod progress;
pub mod resolve;
pub mod schedule;
mod stream;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use url::Url;

pub use error::SubstituteError;
pub use progress::{NoProgress, Progress};
pub use resolve::Resolver;
pub use schedule::Schedule;

use crate::config::{Config, StoreDurability};
use crate::fetch::pace::{Pace, Paced, TooSlow};
use crate::fetch::retry::RetryPolicy;
use crate::fetch::{Fetch, FetchError};
use crate::nix::nar::NarLimits;
use crate::nix::{NarInfo, StorePath};
use crate::store::space::{FreeSpace, Statvfs};
use crate::store::{Closure, Durability, PathInfo, PathLock, Staging, Store};

/// The most paths launched at once (each holds its lock file, and its staging area once
/// downloaded): well under the default limit of 1,024 open files, and many times the
/// downloads in flight, so that paths staged early and waiting for their references to be
/// committed do not stall the downloads.
const MAX_LAUNCHED: usize = 256;

/// Resolved paths not yet launched (each holds its narinfo) past which the walk resolves
/// more only when the installs run dry.
const MAX_WAITING: usize = 8192;

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
        Some(c) => {
            crate::metrics::note(|m| m.path_hits += c.paths.len() as u64);
            c
        }
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

/// A substituter over some [`Fetch`] transport, checking free disk space with `S`.
pub struct Substituter<F: Fetch, S: FreeSpace = Statvfs> {
    fetch: F,
    resolver: Resolver,
    store: Arc<Store>,
    requests: usize,
    downloads: usize,
    limits: NarLimits,
    /// The threads working on NARs against the cores: a big NAR's decoding gets a thread of
    /// its own only on a spare core.
    cores: Arc<decode::Cores>,
    free_space: S,
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
}

/// One finished unit of work of the walk.
enum Event {
    Resolved(StorePath, Result<Box<(NarInfo, Url)>, SubstituteError>),
    /// A launched path (with its NarSize): downloaded and staged, or found valid (`None`),
    /// or failed.
    Downloaded(
        StorePath,
        u64,
        Result<Option<Box<(Staging, PathInfo)>>, SubstituteError>,
    ),
    /// A staged path committed (the NarSize it had reserved), or failed.
    Committed(StorePath, u64, Result<(), SubstituteError>),
}

/// The walk's own state: the graph so far and the installs waiting for their turn.
#[derive(Default)]
struct Walk {
    /// Paths to look at, depth first (so leaves resolve early and installs start early).
    queue: Vec<StorePath>,
    /// Paths looked at.
    seen: HashSet<StorePath>,
    /// The references of every path of the closure known so far.
    refs: BTreeMap<StorePath, Vec<StorePath>>,
    /// Launch and commit order.
    schedule: Schedule,
    /// Resolved paths waiting for their references to be launched (see [`schedule`]).
    resolved: HashMap<StorePath, Box<(NarInfo, Url)>>,
    /// Paths that may be launched, waiting for a free slot.
    ready: Vec<StorePath>,
    /// Staged paths waiting for their references to be committed.
    staged: HashMap<StorePath, Box<(Staging, PathInfo)>>,
    /// Narinfo lookups in flight; once none is left and the queue is empty, the whole graph
    /// is known.
    resolving: usize,
    /// NarSize of the paths resolved and not yet installed: what the disk must still hold.
    outstanding: u64,
}

impl Walk {
    /// A walk from `roots`.
    fn new(roots: &[StorePath]) -> Self {
        Walk {
            queue: roots.iter().rev().cloned().collect(),
            ..Walk::default()
        }
    }

    /// The next path to look at, if any: the one queued last, so that a path many others
    /// reference (glibc) is looked at as soon as the first of them is resolved, and installs
    /// can start before the whole graph is known.
    fn next(&mut self) -> Option<StorePath> {
        while let Some(p) = self.queue.pop() {
            if self.seen.insert(p.clone()) {
                return Some(p);
            }
        }
        None
    }

    /// Queues the references of `path` not looked at yet and records them. A path queued
    /// again moves to the top; the queue holds at most one entry per edge of the graph.
    fn add_references(&mut self, path: &StorePath, mut references: Vec<StorePath>) {
        references.sort();
        references.dedup();
        self.queue.extend(
            references
                .iter()
                .filter(|r| !self.seen.contains(*r))
                .cloned(),
        );
        self.refs.insert(path.clone(), references);
    }
}

impl<F: Fetch> Substituter<F> {
    /// A substituter for `cfg`'s caches, keys and limits, over `fetch`, into `store`.
    pub fn new(cfg: &Config, fetch: F, store: Arc<Store>) -> Result<Self, SubstituteError> {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let downloads = cfg.http_connections.clamp(1, (cpus * 4).max(4));
        Ok(Substituter {
            fetch,
            resolver: Resolver::new(cfg)?,
            store,
            requests: cfg.http_connections.max(1),
            // Each download decompresses on its own thread; a few per core keep the
            // network busy without holding many decoder windows in memory. A second thread
            // per download decodes only on a spare core ([`decode::Cores`]).
            downloads,
            limits: NarLimits::default(),
            cores: Arc::new(decode::Cores::new(cpus)),
            free_space: Statvfs,
            budget: cfg.gc_max_size,
        })
    }

    /// Replaces the free-space probe (tests fake a full disk).
    pub fn with_free_space<S: FreeSpace>(self, free_space: S) -> Substituter<F, S> {
        Substituter {
            fetch: self.fetch,
            resolver: self.resolver,
            store: self.store,
            requests: self.requests,
            downloads: self.downloads,
            limits: self.limits,
            cores: self.cores,
            free_space,
            budget: self.budget,
        }
    }
}

impl<F: Fetch, S: FreeSpace> Substituter<F, S> {
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

    /// Counts `cores` cores for decoding threads instead of the machine's (tests).
    pub fn with_cores(mut self, cores: usize) -> Self {
        self.cores = Arc::new(decode::Cores::new(cores));
        self
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

    /// Materialises the closure of `roots`; see the module documentation. Counted in the
    /// process's metrics ([`crate::metrics::note_pull`]).
    pub async fn materialise<P: Progress>(
        &self,
        roots: &[StorePath],
        progress: &P,
    ) -> Result<Closure, SubstituteError> {
        let started = std::time::Instant::now();
        let tally = crate::metrics::Tally::new(progress);
        let result = self.materialise_walk(roots, &tally).await;
        crate::metrics::note_pull(&tally, started.elapsed(), result.as_ref().err());
        result
    }

    async fn materialise_walk<P: Progress>(
        &self,
        roots: &[StorePath],
        progress: &P,
    ) -> Result<Closure, SubstituteError> {
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
        };
        let state = &state;
        let mut walk = Walk::new(roots);
        let mut pending: FuturesUnordered<BoxFuture<'_, Event>> = FuturesUnordered::new();
        let mut first_err: Option<SubstituteError> = None;
        let mut cycles_checked = false;
        let fail = |first_err: &mut Option<SubstituteError>, e: SubstituteError| {
            if first_err.is_none() && !matches!(e, SubstituteError::Cancelled { .. }) {
                tracing::debug!(error = %e, "cancelling the other downloads");
                *first_err = Some(e);
                state.cancel.cancel();
            }
        };

        loop {
            // Look at queued paths, with at most `requests` narinfo lookups in flight (a
            // lookup not started holds one queued path, not a future). Resolving far ahead
            // of the installs would only pile up narinfos in memory: past `MAX_WAITING`
            // resolved paths not launched, resolve only when nothing is ready to launch and
            // few downloads are in flight (always so, eventually: no deadlock).
            while first_err.is_none()
                && walk.resolving < self.requests
                && (walk.resolved.len() < MAX_WAITING
                    || (walk.ready.is_empty() && walk.schedule.in_flight() < MAX_LAUNCHED / 4))
            {
                let Some(p) = walk.next() else { break };
                match self.store.query(&p) {
                    Ok(Some(info)) => {
                        progress.present(&p);
                        walk.add_references(&p, info.references);
                        self.now_valid(&mut walk, &p, &mut pending);
                    }
                    Ok(None) => {
                        let fut = self
                            .resolver
                            .resolve(&self.fetch, p.clone(), &state.requests);
                        walk.resolving += 1;
                        pending.push(
                            async move {
                                let r = tokio::select! {
                                    r = fut => r.map(Box::new),
                                    _ = state.cancel.cancelled() => {
                                        Err(SubstituteError::Cancelled { path: p.clone() })
                                    }
                                };
                                Event::Resolved(p, r)
                            }
                            .boxed(),
                        );
                    }
                    Err(source) => fail(
                        &mut first_err,
                        SubstituteError::Store {
                            path: p,
                            source: Box::new(source),
                        },
                    ),
                }
            }
            // Launch what may be launched, at most `MAX_LAUNCHED` at once.
            while first_err.is_none() && walk.schedule.in_flight() < MAX_LAUNCHED {
                let Some(p) = walk.ready.pop() else { break };
                let Some(resolved) = walk.resolved.remove(&p) else {
                    continue;
                };
                walk.ready.extend(walk.schedule.launched(&p));
                let (info, cache) = *resolved;
                let size = info.nar_size;
                let fut = self.download(info, cache, state, progress);
                pending.push(async move { Event::Downloaded(p, size, fut.await) }.boxed());
            }
            if first_err.is_none()
                && walk.queue.is_empty()
                && walk.resolving == 0
                && !cycles_checked
            {
                // Members of a cycle would each wait for the others forever: refuse it.
                cycles_checked = true;
                if let Some(cycle) = cycle::find_cycle(&walk.refs) {
                    fail(
                        &mut first_err,
                        SubstituteError::Cycle {
                            path: cycle[0].clone(),
                            cycle,
                        },
                    );
                }
            }
            let Some(ev) = pending.next().await else {
                break;
            };
            match ev {
                Event::Resolved(p, Ok(resolved)) => {
                    walk.resolving -= 1;
                    progress.resolved(&p, &resolved.0);
                    if first_err.is_some() {
                        continue;
                    }
                    walk.add_references(&p, resolved.0.references.clone());
                    let needed = walk.outstanding.saturating_add(resolved.0.nar_size);
                    if let Err(e) = self.check_space(&p, needed) {
                        fail(&mut first_err, e);
                        continue;
                    }
                    walk.outstanding = needed;
                    if walk.schedule.resolved(&p, &walk.refs[&p]) {
                        walk.ready.push(p.clone());
                    }
                    walk.resolved.insert(p, resolved);
                }
                Event::Resolved(_, Err(e)) => {
                    walk.resolving -= 1;
                    fail(&mut first_err, e);
                }
                Event::Downloaded(p, size, Ok(None)) => {
                    // Another process installed it meanwhile.
                    walk.outstanding = walk.outstanding.saturating_sub(size);
                    self.now_valid(&mut walk, &p, &mut pending);
                }
                Event::Downloaded(p, _, Ok(Some(staged))) => {
                    if first_err.is_some() {
                        continue;
                    }
                    let committable = walk.schedule.staged(&p, &staged.1.references);
                    walk.staged.insert(p.clone(), staged);
                    if committable {
                        pending.push(self.commit_staged(&mut walk, p));
                    }
                }
                Event::Committed(p, size, Ok(())) => {
                    walk.outstanding = walk.outstanding.saturating_sub(size);
                    progress.download_finished(&p);
                    self.now_valid(&mut walk, &p, &mut pending);
                }
                Event::Downloaded(_, _, Err(e)) | Event::Committed(_, _, Err(e)) => {
                    fail(&mut first_err, e)
                }
            }
        }
        if let Some(e) = first_err {
            // Staged paths not committed are removed as they drop.
            return Err(e);
        }
        if let Some(path) = walk.schedule.stuck() {
            return Err(SubstituteError::Unfinished { path: path.clone() });
        }
        Ok(Closure::from_references(walk.refs))
    }

    /// `path` is valid: launch and commit what waited for it.
    fn now_valid<'s>(
        &'s self,
        walk: &mut Walk,
        path: &StorePath,
        pending: &mut FuturesUnordered<BoxFuture<'s, Event>>,
    ) {
        let released = walk.schedule.valid(path);
        walk.ready.extend(released.launch);
        for c in released.commit {
            pending.push(self.commit_staged(walk, c));
        }
    }

    /// Commits the staged `path` on a blocking thread.
    fn commit_staged<'s>(&'s self, walk: &mut Walk, path: StorePath) -> BoxFuture<'s, Event> {
        let staged = walk.staged.remove(&path);
        async move {
            let Some(staged) = staged else {
                return Event::Committed(path, 0, Ok(()));
            };
            let (staging, pinfo) = *staged;
            let size = pinfo.nar_size;
            let p = path.clone();
            let r = match tokio::task::spawn_blocking(move || staging.commit(&pinfo)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(source)) => Err(SubstituteError::Store {
                    path: p,
                    source: Box::new(source),
                }),
                Err(e) => Err(SubstituteError::Task {
                    path: p,
                    message: e.to_string(),
                }),
            };
            Event::Committed(path, size, r)
        }
        .boxed()
    }

    /// Downloads, verifies and stages one path under its lock; `None` if it turned out valid
    /// (another process installed it meanwhile). The walk commits it once its references are.
    async fn download<P: Progress>(
        &self,
        info: NarInfo,
        cache: Url,
        state: &RunState,
        progress: &P,
    ) -> Result<Option<Box<(Staging, PathInfo)>>, SubstituteError> {
        let path = info.store_path.clone();
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
            return Ok(None);
        }
        let url = cache
            .join(&info.url)
            .map_err(|source| SubstituteError::BadCache {
                path: path.clone(),
                cache: Box::new(cache.clone()),
                fault: Arc::new(error::CacheFault::Url {
                    relative: info.url.clone(),
                    source,
                }),
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
        let staged = self
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
        Ok(Some(Box::new(staged)))
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
        let cores = self.cores.clone();
        let (winfo, wurl) = (info.clone(), url.clone());
        let worker = tokio::task::spawn_blocking(move || {
            stream::unpack_and_verify(
                &store,
                &lock,
                &winfo,
                &wurl,
                stream::ChannelReader::new(rx),
                &limits,
                &cores,
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
