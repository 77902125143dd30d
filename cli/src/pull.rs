//! `nixenv pull REF…`: materialise each reference's closure into the node store and print
//! the closure's store paths (sorted, one per line) on stdout.

use std::io::Write;

use nixenv_core::config::{Config, ConfigError};
use nixenv_core::environment::{resolve_blocking, Reference, ReferenceError, ResolveError};
use nixenv_core::nix::store_path::StorePathError;
use nixenv_core::nix::StorePath;
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
    let mut roots = Vec::new();
    for r in &args.refs {
        roots.extend(resolve_ref(&cfg, r)?);
    }
    let attribute = |e: SubstituteError| -> PullError {
        match (e.path(), args.refs.as_slice()) {
            (Some(p), [only]) if p.to_absolute_path() != only.trim_end_matches('/') => {
                PullError::Dependency {
                    reference: only.clone(),
                    source: Box::new(e),
                }
            }
            _ => PullError::Substitute(Box::new(e)),
        }
    };

    // Warm store: the closure from local records, no runtime, no network.
    let store = substituter::open_store(&cfg).map_err(|e| PullError::Substitute(Box::new(e)))?;
    // Held until the paths are printed: gc waits, or has finished and we fetch again.
    let _gc = nixenv_core::gc::GcLock::shared(&cfg.state_dir).map_err(|source| {
        PullError::Substitute(Box::new(SubstituteError::OpenStore {
            state_dir: cfg.state_dir.clone(),
            source: Box::new(source),
        }))
    })?;
    let used = store.clone();
    let closure = match substituter::local_closure(&store, &roots)
        .map_err(|e| PullError::Substitute(Box::new(e)))?
    {
        Some(c) => c,
        None => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(PullError::Runtime)?;
            let progress = CliProgress::for_stderr();
            let result = rt.block_on(async {
                let fetch =
                    nixenv_core::fetch::Fetcher::for_config(&cfg).map_err(SubstituteError::from)?;
                Substituter::new(&cfg, fetch, std::sync::Arc::new(store))?
                    .materialise(&roots, &progress)
                    .await
            });
            progress.finish();
            result.map_err(attribute)?
        }
    };
    nixenv_core::gc::usage::touch(&used, &closure.paths);

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for p in &closure.paths {
        writeln!(out, "{p}").map_err(PullError::Stdout)?;
    }
    out.flush().map_err(PullError::Stdout)
}
