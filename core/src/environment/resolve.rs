//! Resolution: a [`Reference`] to the store paths and env of the node's system, through the
//! catalog and a cache under `{state-dir}/catalog/`.
//!
//! Cache layout (each file written atomically):
//! - `{state-dir}/catalog/<org>/<app>/generations/<N>.json` — a generation, stored once; resolving
//!   `org/app@N` again makes no request.
//! - `{state-dir}/catalog/<org>/<app>/current.json` — the last current lock the catalog gave;
//!   used with a warning when the catalog cannot be reached (`catalog-offline = "use-cached"`).
//!
//! Each file is `{"catalog": URL, "fetched": RFC 3339 time, "lock": <the lock>}`; an entry cached
//! from another catalog URL is ignored.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use url::Url;

use super::catalog::{Catalog, CatalogError};
use super::lock::{EnvVars, Lock, LockError};
use super::reference::{EnvName, Reference};
use crate::atomic;
use crate::config::{CatalogOffline, Config};
use crate::fetch::pace::PaceLimits;
use crate::fetch::retry::RetryPolicy;
use crate::fetch::Fetch;

/// Most attempts per catalog request.
pub const CATALOG_ATTEMPTS: u32 = 3;
use crate::nix::StorePath;

/// A reference resolved for this node's system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// What was asked.
    pub reference: Reference,
    /// The generation, for catalog references.
    pub generation: Option<u64>,
    /// The top-level store paths, in lock order.
    pub paths: Vec<StorePath>,
    /// The lock's env, in lock order.
    pub env: EnvVars,
    /// Where the lock came from.
    pub source: Source,
}

/// Where a resolution came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A store path reference: no lock.
    StorePath,
    /// Asked from the catalog just now.
    Catalog,
    /// A pinned generation from the local cache (no request).
    Cache,
    /// The last known current lock, because the catalog could not be reached.
    StaleCurrent,
}

/// Why a reference could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no catalog configured (set `catalog` in the nixenv config)")]
    NoCatalog,
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{source}; no cached lock of {name} to fall back on")]
    UnreachableNoCache {
        name: EnvName,
        #[source]
        source: Box<CatalogError>,
    },
    #[error(transparent)]
    System(#[from] LockError),
    #[error(transparent)]
    Netrc(#[from] crate::fetch::netrc::NetrcError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    catalog: String,
    fetched: String,
    lock: Lock,
}

/// `{state-dir}/catalog/<org>/<app>`.
pub fn cache_dir(state_dir: &Path, name: &EnvName) -> PathBuf {
    state_dir.join("catalog").join(name.org()).join(name.app())
}

fn cached_generation_path(state_dir: &Path, name: &EnvName, generation: u64) -> PathBuf {
    cache_dir(state_dir, name)
        .join("generations")
        .join(format!("{generation}.json"))
}

fn cached_current_path(state_dir: &Path, name: &EnvName) -> PathBuf {
    cache_dir(state_dir, name).join("current.json")
}

/// Reads a cache entry; anything unreadable, invalid or from another catalog is a miss.
fn read_cache(path: &Path, catalog: &Url, name: &EnvName, generation: Option<u64>) -> Option<Lock> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read cached lock");
            return None;
        }
    };
    let entry: CacheEntry = match serde_json::from_slice(&bytes) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a corrupt cached lock");
            return None;
        }
    };
    if entry.catalog != catalog.as_str()
        || entry.lock.name != *name
        || generation.is_some_and(|g| g != entry.lock.generation)
        || entry.lock.validate().is_err()
    {
        return None;
    }
    Some(entry.lock)
}

/// Writes a cache entry; a failure only costs a request later, so it is logged, not returned.
fn write_cache(path: &Path, catalog: &Url, lock: &Lock) {
    let entry = CacheEntry {
        catalog: catalog.to_string(),
        fetched: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        lock: lock.clone(),
    };
    let result = (|| {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = serde_json::to_vec_pretty(&entry).map_err(std::io::Error::other)?;
        atomic::write_atomic(path, &bytes, 0o644)
    })();
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot cache lock");
    }
}

/// Resolves `reference` for `cfg.system`, reading the catalog `cfg.catalog` through `fetch`.
pub async fn resolve<F: Fetch>(
    cfg: &Config,
    fetch: &F,
    reference: &Reference,
) -> Result<Resolved, ResolveError> {
    let (name, generation) = match reference {
        Reference::StorePath(p) => {
            return Ok(Resolved {
                reference: reference.clone(),
                generation: None,
                paths: vec![p.clone()],
                env: EnvVars::default(),
                source: Source::StorePath,
            })
        }
        Reference::Environment { name, generation } => (name, *generation),
    };
    let base = cfg.catalog.as_ref().ok_or(ResolveError::NoCatalog)?;
    // A few quick retries: an outage falls back to the cached current lock soon after.
    let catalog = Catalog::new(base.clone(), fetch)
        .with_retry(RetryPolicy::with_attempts(
            cfg.download_attempts.min(CATALOG_ATTEMPTS),
        ))
        .with_max_lock_size(cfg.max_lock_size)
        .with_pace(PaceLimits::from_config(cfg));
    let state = &cfg.state_dir;
    let (lock, source) = match generation {
        Some(g) => {
            let path = cached_generation_path(state, name, g);
            match read_cache(&path, base, name, Some(g)) {
                Some(lock) => {
                    tracing::debug!(environment = %name, generation = g, "pinned generation from cache");
                    (lock, Source::Cache)
                }
                None => {
                    let lock = catalog.generation(name, g).await?;
                    write_cache(&path, base, &lock);
                    (lock, Source::Catalog)
                }
            }
        }
        None => match catalog.current(name).await {
            Ok(lock) => {
                let cur_path = cached_current_path(state, name);
                // Unchanged since last time: no write (and no fsync) on the pod start path.
                if read_cache(&cur_path, base, name, None).as_ref() != Some(&lock) {
                    write_cache(&cur_path, base, &lock);
                }
                let gen_path = cached_generation_path(state, name, lock.generation);
                if read_cache(&gen_path, base, name, Some(lock.generation)).is_none() {
                    write_cache(&gen_path, base, &lock);
                }
                (lock, Source::Catalog)
            }
            Err(e) if e.is_unreachable() => match cfg.catalog_offline {
                CatalogOffline::Fail => return Err(e.into()),
                CatalogOffline::UseCached => {
                    match read_cache(&cached_current_path(state, name), base, name, None) {
                        Some(lock) => {
                            tracing::warn!(
                                environment = %name,
                                generation = lock.generation,
                                error = %e,
                                "catalog unreachable; using the last known current generation"
                            );
                            (lock, Source::StaleCurrent)
                        }
                        None => {
                            return Err(ResolveError::UnreachableNoCache {
                                name: name.clone(),
                                source: Box::new(e),
                            })
                        }
                    }
                }
            },
            Err(e) => return Err(e.into()),
        },
    };
    let sys = lock.for_system(&cfg.system)?;
    Ok(Resolved {
        reference: reference.clone(),
        generation: Some(lock.generation),
        paths: sys.paths.clone(),
        env: sys.env.clone(),
        source,
    })
}

/// [`resolve`] with the production fetcher, on a private single-threaded runtime (for
/// command-line tools; not to be called from async code).
pub fn resolve_blocking(cfg: &Config, reference: &Reference) -> Result<Resolved, ResolveError> {
    if let Reference::StorePath(_) = reference {
        // No request: no client, no runtime.
        return futures::executor::block_on(resolve(cfg, &NoFetch, reference));
    }
    let fetch = crate::fetch::Fetcher::for_config(cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ResolveError::Runtime)?;
    rt.block_on(resolve(cfg, &fetch, reference))
}

/// A transport for resolutions that make no request.
struct NoFetch;

impl Fetch for NoFetch {
    async fn get(&self, url: &Url) -> Result<crate::fetch::Body, crate::fetch::FetchError> {
        Err(crate::fetch::FetchError::NotFound { url: url.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::environment::catalog::tests::{lock_bytes, Answer, FakeFetch, A, B, BASE};

    fn cfg(state: &Path) -> Config {
        Config {
            catalog: Some(Url::parse(BASE).unwrap()),
            state_dir: state.to_owned(),
            system: "x86_64-linux".into(),
            download_attempts: 1,
            ..Config::default()
        }
    }

    fn cur() -> String {
        format!("{BASE}/acme/app/current.json")
    }
    fn gen(n: u64) -> String {
        format!("{BASE}/acme/app/generations/{n}.json")
    }

    #[tokio::test]
    async fn pinned_generation_is_requested_once() {
        let d = tempfile::tempdir().unwrap();
        let cfg = cfg(d.path());
        let f = FakeFetch::default();
        f.set(&gen(2), Answer::Ok(lock_bytes("acme/app", 2)));
        let r: Reference = "acme/app@2".parse().unwrap();
        let first = resolve(&cfg, &f, &r).await.unwrap();
        assert_eq!(first.source, Source::Catalog);
        assert_eq!(first.generation, Some(2));
        assert_eq!(
            first
                .paths
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
            [A, B]
        );
        assert_eq!(first.env.get("G"), Some("2"));
        // The catalog goes away; the pinned generation still resolves, with no request.
        f.set(&gen(2), Answer::Down);
        let second = resolve(&cfg, &f, &r).await.unwrap();
        assert_eq!(second.source, Source::Cache);
        assert_eq!(second.paths, first.paths);
        assert_eq!(f.total(), 1);
        assert!(d
            .path()
            .join("catalog/acme/app/generations/2.json")
            .is_file());
        // Another catalog URL does not reuse this cache.
        let mut other = cfg.clone();
        other.catalog = Some(Url::parse("http://127.0.0.1:9/other").unwrap());
        let e = resolve(&other, &f, &r).await.unwrap_err().to_string();
        assert_eq!(
            e,
            "generation 2 of acme/app not found in catalog http://127.0.0.1:9/other"
        );
    }

    #[tokio::test]
    async fn current_is_asked_each_time_and_falls_back_when_down() {
        let d = tempfile::tempdir().unwrap();
        let cfg = cfg(d.path());
        let f = FakeFetch::default();
        let r: Reference = "acme/app".parse().unwrap();

        // Down with nothing cached.
        f.set(&cur(), Answer::Down);
        let e = resolve(&cfg, &f, &r).await.unwrap_err().to_string();
        assert_eq!(
            e,
            format!("catalog unreachable: {}: connection refused; no cached lock of acme/app to fall back on", cur())
        );

        f.set(&cur(), Answer::Ok(lock_bytes("acme/app", 3)));
        assert_eq!(resolve(&cfg, &f, &r).await.unwrap().generation, Some(3));
        f.set(&cur(), Answer::Ok(lock_bytes("acme/app", 4)));
        let r4 = resolve(&cfg, &f, &r).await.unwrap();
        assert_eq!((r4.generation, r4.source), (Some(4), Source::Catalog));
        assert_eq!(f.count(&cur()), 3);

        // Down (transport or 5xx): the last known current, flagged stale.
        for down in [Answer::Down, Answer::Status(502)] {
            f.set(&cur(), down);
            let r = resolve(&cfg, &f, &r).await.unwrap();
            assert_eq!((r.generation, r.source), (Some(4), Source::StaleCurrent));
        }
        // Pinned generations learned through current resolve offline too.
        let p: Reference = "acme/app@3".parse().unwrap();
        assert_eq!(resolve(&cfg, &f, &p).await.unwrap().source, Source::Cache);

        // catalog-offline = "fail".
        let mut strict = cfg.clone();
        strict.catalog_offline = CatalogOffline::Fail;
        let e = resolve(&strict, &f, &r).await.unwrap_err().to_string();
        assert_eq!(e, format!("catalog unreachable: {}: HTTP 502", cur()));

        // 404 is an answer, not an outage: no fallback.
        f.set(&cur(), Answer::NotFound);
        let e = resolve(&cfg, &f, &r).await.unwrap_err().to_string();
        assert_eq!(
            e,
            format!("environment acme/app not found in catalog {BASE}")
        );
        // Neither is a malformed lock.
        f.set(&cur(), Answer::Ok(b"nonsense".to_vec()));
        let e = resolve(&cfg, &f, &r).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: malformed lock: not valid JSON", cur())),
            "{e}"
        );
    }

    #[tokio::test]
    async fn missing_system_and_store_paths() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = cfg(d.path());
        cfg.system = "aarch64-linux".into();
        let f = FakeFetch::default();
        f.set(&cur(), Answer::Ok(lock_bytes("acme/app", 1)));
        let e = resolve(&cfg, &f, &"acme/app".parse().unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(e, "acme/app has no aarch64-linux (it has: x86_64-linux)");

        let sp: Reference = A.parse().unwrap();
        cfg.catalog = None;
        let r = resolve(&cfg, &f, &sp).await.unwrap();
        assert_eq!(r.paths, vec![A.parse().unwrap()]);
        assert_eq!((r.generation, r.source), (None, Source::StorePath));
        let e = resolve(&cfg, &f, &"acme/app".parse().unwrap())
            .await
            .unwrap_err();
        assert!(matches!(e, ResolveError::NoCatalog));
    }

    #[tokio::test]
    async fn corrupt_cache_is_a_miss() {
        let d = tempfile::tempdir().unwrap();
        let cfg = cfg(d.path());
        let f = FakeFetch::default();
        f.set(&gen(5), Answer::Ok(lock_bytes("acme/app", 5)));
        let path = d.path().join("catalog/acme/app/generations/5.json");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{garbage").unwrap();
        let r = resolve(&cfg, &f, &"acme/app@5".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(r.source, Source::Catalog);
        assert!(
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(&path).unwrap()).is_ok()
        );
    }
}
