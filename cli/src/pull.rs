//! `nixenv pull REF…`: materialise each reference's closure into the node store and print
//! the closure's store paths (sorted, one per line) on stdout.

use std::io::Write;

use nixenv_core::config::{Config, ConfigError};
use nixenv_core::environment::{resolve_blocking, Reference, ReferenceError, ResolveError};
use nixenv_core::gc::GcLock;
use nixenv_core::metrics;
use nixenv_core::nix::store_path::StorePathError;
use nixenv_core::nix::StorePath;
use nixenv_core::store::view::Views;
use nixenv_core::store::{Closure, Store};
use nixenv_core::substituter::{self, SubstituteError, Substituter};

use crate::progress::CliProgress;
use crate::Globals;

/// Arguments of `nixenv pull`.
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// Store paths (`/nix/store/HASH-NAME`) or environments (`ORG/APP`, `ORG/APP@N`).
    #[arg(required = true, value_name = "REF")]
    pub refs: Vec<String>,
}

/// Why `nixenv pull` failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("{reference}: {source}")]
    Resolve {
        reference: String,
        #[source]
        source: Box<ResolveError>,
    },
    #[error("{reference}: not a store path ({reason})")]
    BadReference {
        reference: String,
        reason: &'static str,
    },
    /// The failing path is the reference itself (or one of several references).
    #[error(transparent)]
    Substitute(Box<SubstituteError>),
    /// A dependency of `reference` failed.
    #[error("{reference}: {source}")]
    Dependency {
        reference: String,
        #[source]
        source: Box<SubstituteError>,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
}

/// Resolves one command-line reference to the store paths it stands for. The one place
/// where references are interpreted: store paths, and environments `org/app[@N]` through
/// the catalog (with the resolution cache).
pub fn resolve_ref(cfg: &Config, reference: &str) -> Result<Vec<StorePath>, PullError> {
    if !reference.starts_with('/') {
        let parsed: Reference = reference.parse()?;
        return resolve_blocking(cfg, &parsed)
            .map(|r| r.paths)
            .map_err(|source| PullError::Resolve {
                reference: reference.to_owned(),
                source: Box::new(source),
            });
    }
    StorePath::from_absolute_path(reference.trim_end_matches('/'))
        .map(|p| vec![p])
        .map_err(
            |StorePathError::Invalid { reason, .. }| PullError::BadReference {
                reference: reference.to_owned(),
                reason,
            },
        )
}

pub fn run(globals: &Globals, args: &PullArgs) -> Result<(), PullError> {
    let cfg = globals.config()?;
    let result = pull(&cfg, args);
    // What the pull counted, failed or not (best effort).
    metrics::flush(&cfg.state_dir);
    result
}

fn pull(cfg: &Config, args: &PullArgs) -> Result<(), PullError> {
    let mut roots = Vec::new();
    let mut per_ref = Vec::new();
    for r in &args.refs {
        let these = resolve_ref(cfg, r)?;
        roots.extend(these.iter().cloned());
        per_ref.push(these);
    }
    // Held until the paths are printed: gc waits, or has finished and we fetch again.
    let done = materialise(cfg, &args.refs, &roots)?;
    // Each reference's closure view, so its first container starts with one mount.
    if cfg.closure_views {
        build_views(cfg, &per_ref, &done.closure);
    }

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for p in &done.closure.paths {
        writeln!(out, "{p}").map_err(PullError::Stdout)?;
    }
    out.flush().map_err(PullError::Stdout)
}

/// A closure valid in the node store, kept there (the gc lock held shared) while this lives.
pub struct Materialised {
    pub closure: Closure,
    pub store: Store,
    _gc: GcLock,
}

/// Materialises the closure of `roots` (what `refs`, as the user wrote them, stand for):
/// from local records when the store has it all (no runtime, no network), else from the
/// caches, with progress on stderr.
pub fn materialise(
    cfg: &Config,
    refs: &[String],
    roots: &[StorePath],
) -> Result<Materialised, PullError> {
    let attribute = |e: SubstituteError| -> PullError {
        match (e.path(), refs) {
            (Some(p), [only]) if p.to_absolute_path() != only.trim_end_matches('/') => {
                PullError::Dependency {
                    reference: only.clone(),
                    source: Box::new(e),
                }
            }
            _ => PullError::Substitute(Box::new(e)),
        }
    };

    let store = substituter::open_store(cfg).map_err(|e| PullError::Substitute(Box::new(e)))?;
    let gc = GcLock::shared(&cfg.state_dir).map_err(|source| {
        PullError::Substitute(Box::new(SubstituteError::OpenStore {
            state_dir: cfg.state_dir.clone(),
            source: Box::new(source),
        }))
    })?;
    let used = store.clone();
    let closure = match substituter::local_closure(&store, roots)
        .map_err(|e| PullError::Substitute(Box::new(e)))?
    {
        Some(c) => {
            metrics::note(|m| m.path_hits += c.paths.len() as u64);
            c
        }
        None => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(PullError::Runtime)?;
            let progress = CliProgress::for_stderr();
            let result = rt.block_on(async {
                let fetch =
                    nixenv_core::fetch::Fetcher::for_config(cfg).map_err(SubstituteError::from)?;
                Substituter::new(cfg, fetch, std::sync::Arc::new(store))?
                    .materialise(roots, &progress)
                    .await
            });
            progress.finish();
            result.map_err(attribute)?
        }
    };
    nixenv_core::gc::usage::touch(&used, &closure.paths);
    Ok(Materialised {
        closure,
        store: used,
        _gc: gc,
    })
}

/// Builds the closure view of each reference's roots (a failure is logged: containers then get
/// one bind per path).
fn build_views(cfg: &Config, per_ref: &[Vec<StorePath>], closure: &Closure) {
    let views = match Views::open(&cfg.state_dir) {
        Ok(v) => v,
        Err(e) => return tracing::warn!(error = %e, "no closure views"),
    };
    for roots in per_ref {
        if let Err(e) = views.build(roots, &closure.reachable_from(roots)) {
            tracing::warn!(error = %e, "cannot build closure view");
        }
    }
}
