//! Publishing: write the next generation of an environment into a catalog directory, then move
//! `current.json` to it; and listing an environment's generations.
//!
//! - Before anything is written, every path's closure must be available from the configured
//!   substituters: each narinfo is fetched (many in flight), must describe its path and carry a
//!   trusted signature (unless `require-sigs = false`); NARs are not downloaded. So a lock can
//!   never name a path no cache holds.
//! - `generations/N.json` is created complete-or-absent and never replaced (a temporary file
//!   hard-linked to its final name, which fails if the name exists), so concurrent publishers
//!   get distinct generations and none is lost.
//! - `current.json` is replaced atomically (temporary file, fsync, rename) under an exclusive
//!   lock on `{org}/{app}/.publish.lock`, and only if the new generation is greater than the
//!   one it names: current never goes backwards.
//! - No generation follows `u64::MAX`: publishing then fails, numbers never wrap around.
//! - A catalog is published to as a directory or a `file://` URL; `http(s)://` is read-only.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use futures::stream::{FuturesUnordered, StreamExt};
use url::Url;

use super::catalog::{self, Catalog, CatalogError};
use super::lock::{self, EnvVars, Lock, LockError, SystemLock};
use super::reference::EnvName;
use crate::atomic;
use crate::config::Config;
use crate::fetch::{Fetch, Scheme};
use crate::nix::StorePath;
use crate::substituter::{Resolver, SubstituteError};

/// The lock file serialising publishers of one environment.
pub const PUBLISH_LOCK: &str = ".publish.lock";

/// Why publishing or listing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("catalog {url} is read-only over {scheme}: publish to a directory or a file:// URL")]
    ReadOnlyCatalog { url: Box<Url>, scheme: String },
    #[error("invalid catalog {value:?}: {reason}")]
    BadCatalog { value: String, reason: String },
    #[error("no catalog given (use --catalog or set `catalog` in the nixenv config)")]
    NoCatalog,
    /// The caller names the environment (as for every variant).
    #[error("{source}")]
    InvalidLock {
        name: EnvName,
        #[source]
        source: Box<LockError>,
    },
    #[error("invalid --env {value:?}: {reason}")]
    BadEnv { value: String, reason: String },
    /// A path of the closure is not available (or not acceptable) from the substituters.
    #[error(transparent)]
    Unavailable(#[from] SubstituteError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The newest generation is `u64::MAX`: there is no next number.
    #[error("generation {newest} is the largest possible, no generation can follow it")]
    GenerationsExhausted { name: EnvName, newest: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The directory a `--catalog` value names: a path, or a `file://` URL. `http(s)://` is refused.
pub fn catalog_dir(value: &str) -> Result<PathBuf, PublishError> {
    if value.contains("://") {
        let url = Url::parse(value).map_err(|e| PublishError::BadCatalog {
            value: value.to_owned(),
            reason: e.to_string(),
        })?;
        return match Scheme::of(&url) {
            Some(Scheme::File) => url.to_file_path().map_err(|()| PublishError::BadCatalog {
                value: value.to_owned(),
                reason: "not a local path".into(),
            }),
            Some(Scheme::Http | Scheme::S3) => Err(PublishError::ReadOnlyCatalog {
                scheme: url.scheme().to_owned(),
                url: Box::new(url),
            }),
            None => Err(PublishError::BadCatalog {
                value: value.to_owned(),
                reason: format!("unsupported scheme {:?}", url.scheme()),
            }),
        };
    }
    if value.is_empty() {
        return Err(PublishError::BadCatalog {
            value: value.to_owned(),
            reason: "empty".into(),
        });
    }
    Ok(std::path::absolute(value).unwrap_or_else(|_| PathBuf::from(value)))
}

/// The URL a `--catalog` value names for reading: a URL as given, or a directory as `file://`.
pub fn catalog_url(value: &str) -> Result<Url, PublishError> {
    if value.contains("://") {
        return Url::parse(value).map_err(|e| PublishError::BadCatalog {
            value: value.to_owned(),
            reason: e.to_string(),
        });
    }
    let dir = catalog_dir(value)?;
    Url::from_directory_path(&dir).map_err(|()| PublishError::BadCatalog {
        value: value.to_owned(),
        reason: "not an absolute path".into(),
    })
}

/// Parses `K=V` as given to `--env` (the name checked like a lock's).
pub fn parse_env_assignment(value: &str) -> Result<(String, String), PublishError> {
    let bad = |reason: String| PublishError::BadEnv {
        value: value.to_owned(),
        reason,
    };
    let (k, v) = value
        .split_once('=')
        .ok_or_else(|| bad("expected NAME=VALUE".into()))?;
    lock::check_env_name(k).map_err(|r| bad(format!("name {k:?}: {r}")))?;
    lock::check_env_value(v).map_err(|r| bad(r.into()))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Checks that the closure of `roots` is available from the configured substituters: every
/// narinfo fetched, describing its path and signed by a trusted key (unless `require-sigs =
/// false`), as the substituter does before a download; no NAR is fetched. Returns the closure.
pub async fn check_available<F: Fetch>(
    cfg: &Config,
    fetch: &F,
    roots: &[StorePath],
) -> Result<Vec<StorePath>, PublishError> {
    let resolver = Resolver::new(cfg)?;
    Ok(resolver.closure(fetch, roots, cfg.http_connections).await?)
}

/// What [`write_generation`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The new generation.
    pub generation: u64,
    /// Whether `current.json` now names it (false if a newer generation was current already).
    pub current: bool,
    /// The file written.
    pub path: PathBuf,
}

/// Holds an exclusive `flock` until dropped.
struct DirLock {
    _file: nix::fcntl::Flock<fs::File>,
}

fn lock_dir(env_dir: &Path) -> Result<DirLock, PublishError> {
    let path = env_dir.join(PUBLISH_LOCK);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(
        |(_, errno)| PublishError::Io {
            path: path.clone(),
            source: std::io::Error::from(errno),
        },
    )?;
    Ok(DirLock { _file: file })
}

/// Generation numbers present in `generations/` (files `N.json`, N positive, no leading zero).
fn existing_generations(gen_dir: &Path) -> Result<Vec<u64>, PublishError> {
    let entries = match fs::read_dir(gen_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(gen_dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(gen_dir))?;
        let name = entry.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| super::reference::parse_generation(n).ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The lock `current.json` holds, if it exists and parses.
fn current_lock(env_dir: &Path) -> Option<Lock> {
    let bytes = fs::read(env_dir.join("current.json")).ok()?;
    Lock::parse(&bytes).ok()
}

/// The generation `current.json` names, if it exists and parses.
fn current_generation(env_dir: &Path) -> Option<u64> {
    current_lock(env_dir).map(|l| l.generation)
}

/// Writes the next generation of `name` with `systems` into the catalog directory `dir`, then
/// moves `current.json` to it (if it is the newest).
///
/// Systems the current lock has and `systems` does not are carried over, so publishing one
/// system never takes the others away from `current`. The next number is above both every
/// generation file and what `current.json` names (a catalog mirrored or pruned down to its
/// current lock never reuses a number nodes may have cached).
pub fn write_generation(
    dir: &Path,
    name: &EnvName,
    mut systems: BTreeMap<String, SystemLock>,
) -> Result<Published, PublishError> {
    let env_dir = dir.join(name.org()).join(name.app());
    let gen_dir = env_dir.join("generations");
    fs::create_dir_all(&gen_dir).map_err(io_err(&gen_dir))?;
    let _lock = lock_dir(&env_dir)?;
    let current = current_lock(&env_dir);
    if let Some(current) = &current {
        for (system, lock) in &current.systems {
            systems
                .entry(system.clone())
                .or_insert_with(|| lock.clone());
        }
    }
    let newest_file = existing_generations(&gen_dir)?.last().copied().unwrap_or(0);
    let newest = newest_file.max(current.map_or(0, |c| c.generation));
    let next = |newest: u64| {
        newest
            .checked_add(1)
            .ok_or_else(|| PublishError::GenerationsExhausted {
                name: name.clone(),
                newest,
            })
    };
    let mut generation = next(newest)?;
    let (bytes, path) = loop {
        let lock = Lock::new(name.clone(), generation, systems.clone());
        lock.validate()
            .map_err(|source| PublishError::InvalidLock {
                name: name.clone(),
                source: Box::new(source),
            })?;
        let bytes = lock.to_json_pretty();
        let path = gen_dir.join(format!("{generation}.json"));
        // Another publisher that ignores the lock file (or a lock-less file system) may
        // have taken this number: never replace, take the next one.
        if atomic::create_exclusive(&path, &bytes, 0o644).map_err(io_err(&path))? {
            break (bytes, path);
        }
        generation = next(generation)?;
    };
    let current_path = env_dir.join("current.json");
    let moved = match current_generation(&env_dir) {
        Some(c) if c >= generation => false,
        _ => {
            atomic::write_atomic(&current_path, &bytes, 0o644).map_err(io_err(&current_path))?;
            true
        }
    };
    tracing::info!(environment = %name, generation, current = moved, "published");
    Ok(Published {
        generation,
        current: moved,
        path,
    })
}

/// Publishes `paths` (and `env`) for `system` as the next generation of `name` in the catalog
/// directory `dir`, after checking the closure is available from the substituters.
pub async fn publish<F: Fetch>(
    cfg: &Config,
    fetch: &F,
    dir: &Path,
    name: &EnvName,
    system: &str,
    paths: Vec<StorePath>,
    env: EnvVars,
) -> Result<Published, PublishError> {
    let sys = SystemLock { paths, env };
    lock::validate_system(system, &sys).map_err(|source| PublishError::InvalidLock {
        name: name.clone(),
        source: Box::new(source),
    })?;
    check_available(cfg, fetch, &sys.paths).await?;
    let mut systems = BTreeMap::new();
    systems.insert(system.to_owned(), sys);
    write_generation(dir, name, systems)
}

/// An environment's generations as the catalog has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub name: EnvName,
    /// What `current.json` names, if it exists.
    pub current: Option<u64>,
    /// Every generation found, ascending.
    pub generations: Vec<Lock>,
}

/// Lists `name`'s generations in the catalog at `url`: a `file://` catalog's `generations/`
/// directory is read; over HTTP (no directory listings) generations 1 to current are asked.
pub async fn list<F: Fetch>(url: &Url, fetch: &F, name: &EnvName) -> Result<Listing, PublishError> {
    let catalog = Catalog::new(url.clone(), fetch);
    let current = match catalog.current(name).await {
        Ok(l) => Some(l),
        Err(CatalogError::EnvironmentNotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let numbers: Vec<u64> = match Scheme::of(url) {
        Some(Scheme::File) => {
            let dir = catalog::environment_url(url, name)?
                .to_file_path()
                .map_err(|()| PublishError::BadCatalog {
                    value: url.to_string(),
                    reason: "not a local path".into(),
                })?;
            existing_generations(&dir.join("generations"))?
        }
        _ => (1..=current.as_ref().map_or(0, |l| l.generation)).collect(),
    };
    if current.is_none() && numbers.is_empty() {
        return Err(CatalogError::EnvironmentNotFound {
            name: name.clone(),
            catalog: Box::new(url.clone()),
        }
        .into());
    }
    let mut generations = Vec::new();
    let mut pending: FuturesUnordered<_> = numbers
        .iter()
        .map(|n| catalog.generation(name, *n))
        .collect();
    while let Some(r) = pending.next().await {
        match r {
            Ok(l) => generations.push(l),
            Err(CatalogError::GenerationNotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    generations.sort_by_key(|l| l.generation);
    Ok(Listing {
        name: name.clone(),
        current: current.map(|l| l.generation),
        generations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::environment::catalog::tests::{FakeFetch, A, B};

    fn systems(paths: &[&str], env: &[(&str, &str)]) -> BTreeMap<String, SystemLock> {
        let mut m = BTreeMap::new();
        m.insert(
            "x86_64-linux".to_string(),
            SystemLock {
                paths: paths.iter().map(|p| p.parse().unwrap()).collect(),
                env: EnvVars(
                    env.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
            },
        );
        m
    }

    #[test]
    fn no_generation_follows_the_largest_one() {
        let d = tempfile::tempdir().unwrap();
        let name: EnvName = "acme/app".parse().unwrap();
        let gen_dir = d.path().join("acme/app/generations");
        fs::create_dir_all(&gen_dir).unwrap();
        fs::write(gen_dir.join(format!("{}.json", u64::MAX)), b"{}").unwrap();
        let e = write_generation(d.path(), &name, systems(&[A], &[])).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "generation {} is the largest possible, no generation can follow it",
                u64::MAX
            )
        );
        // Nothing was written: no generation 0, no current.json.
        let names: Vec<_> = fs::read_dir(&gen_dir).unwrap().collect();
        assert_eq!(names.len(), 1);
        assert!(!d.path().join("acme/app/current.json").exists());
    }

    #[test]
    fn generations_are_numbered_and_current_moves_forward_only() {
        let d = tempfile::tempdir().unwrap();
        let name: EnvName = "acme/app".parse().unwrap();
        let p1 = write_generation(d.path(), &name, systems(&[A], &[("K", "1")])).unwrap();
        assert_eq!((p1.generation, p1.current), (1, true));
        let p2 = write_generation(d.path(), &name, systems(&[A, B], &[])).unwrap();
        assert_eq!((p2.generation, p2.current), (2, true));
        let env_dir = d.path().join("acme/app");
        let cur = Lock::parse(&fs::read(env_dir.join("current.json")).unwrap()).unwrap();
        assert_eq!(cur.generation, 2);
        assert_eq!(
            fs::read(env_dir.join("current.json")).unwrap(),
            fs::read(env_dir.join("generations/2.json")).unwrap()
        );
        // A generation someone else wrote (say 5) is never replaced, and a number current
        // names (7, its file pruned) is never reused: the next one is 8, and current moves.
        fs::write(env_dir.join("generations/5.json"), b"taken").unwrap();
        let mut seven = cur.clone();
        seven.generation = 7;
        fs::write(env_dir.join("current.json"), seven.to_json_pretty()).unwrap();
        let p8 = write_generation(d.path(), &name, systems(&[B], &[])).unwrap();
        assert_eq!((p8.generation, p8.current), (8, true));
        assert_eq!(
            fs::read(env_dir.join("generations/5.json")).unwrap(),
            b"taken"
        );
        assert_eq!(current_generation(&env_dir), Some(8));
        let names: Vec<String> = fs::read_dir(env_dir.join("generations"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 4, "no temporaries left: {names:?}");
    }

    #[test]
    fn publishing_one_system_keeps_the_others() {
        let d = tempfile::tempdir().unwrap();
        let name: EnvName = "acme/app".parse().unwrap();
        write_generation(d.path(), &name, systems(&[A], &[])).unwrap();
        let mut arm = systems(&[B], &[]);
        let lock = arm.remove("x86_64-linux").unwrap();
        arm.insert("aarch64-linux".into(), lock);
        let p = write_generation(d.path(), &name, arm).unwrap();
        assert_eq!((p.generation, p.current), (2, true));
        let cur = current_lock(&d.path().join("acme/app")).unwrap();
        assert_eq!(
            cur.systems.keys().collect::<Vec<_>>(),
            ["aarch64-linux", "x86_64-linux"]
        );
        assert_eq!(cur.systems["x86_64-linux"].paths, [A.parse().unwrap()]);
        assert_eq!(cur.systems["aarch64-linux"].paths, [B.parse().unwrap()]);
    }

    #[test]
    fn catalog_targets() {
        assert_eq!(catalog_dir("/srv/cat").unwrap(), PathBuf::from("/srv/cat"));
        assert_eq!(
            catalog_dir("file:///srv/cat").unwrap(),
            PathBuf::from("/srv/cat")
        );
        assert_eq!(
            catalog_dir("https://cat.example/x").unwrap_err().to_string(),
            "catalog https://cat.example/x is read-only over https: publish to a directory or a file:// URL"
        );
        assert!(catalog_dir("ftp://x/y")
            .unwrap_err()
            .to_string()
            .contains("unsupported scheme"));
        assert_eq!(
            catalog_url("/srv/cat").unwrap().as_str(),
            "file:///srv/cat/"
        );
        assert_eq!(
            parse_env_assignment("A=b=c").unwrap(),
            ("A".into(), "b=c".into())
        );
        assert!(parse_env_assignment("A")
            .unwrap_err()
            .to_string()
            .contains("expected NAME=VALUE"));
        assert!(parse_env_assignment("PATH=/x")
            .unwrap_err()
            .to_string()
            .contains("reserved"));
    }

    #[tokio::test]
    async fn unavailable_paths_are_refused_before_anything_is_written() {
        let d = tempfile::tempdir().unwrap();
        let cfg = Config {
            substituters: vec![Url::parse("http://127.0.0.1:9/cache").unwrap()],
            require_sigs: false,
            download_attempts: 1,
            ..Config::default()
        };
        let name: EnvName = "acme/app".parse().unwrap();
        let e = publish(
            &cfg,
            &FakeFetch::default(),
            d.path(),
            &name,
            "x86_64-linux",
            vec![A.parse().unwrap()],
            EnvVars::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{A}: not found in any substituter (http://127.0.0.1:9/cache/)")
        );
        assert!(!d.path().join("acme").exists());
    }
}
