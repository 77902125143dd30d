//! `nixenv sbom REF` / `nixenv sbom --container ID`: the closure of an environment (pulled
//! first if the node lacks it) or of what a container ran, as SPDX 2.3 or CycloneDX 1.6 JSON,
//! on stdout or atomically into `--output`.

use std::io::Write;
use std::path::PathBuf;

use nixenv_core::config::Config;
use nixenv_core::environment::{resolve_blocking, Reference};
use nixenv_core::pin::{self, PinError};
use nixenv_core::sbom::{self, Container, Format, SbomError, Subject};
use nixenv_core::{atomic, metrics};

use crate::pull::{materialise, PullError};
use crate::Globals;

/// Arguments of `nixenv sbom`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["reference", "container"])))]
pub struct SbomArgs {
    /// An environment (`ORG/APP`, `ORG/APP@N`) or a store path.
    #[arg(value_name = "REF")]
    pub reference: Option<String>,
    /// What the container with this id ran (while it exists, and for 30 days after).
    #[arg(long, value_name = "ID")]
    pub container: Option<String>,
    /// `spdx-json` (SPDX 2.3) or `cyclonedx-json` (CycloneDX 1.6).
    #[arg(long, short, default_value = "spdx-json", value_name = "FORMAT")]
    pub format: String,
    /// Write the document to this file (atomically) instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Why `nixenv sbom` failed.
#[derive(Debug, thiserror::Error)]
pub enum SbomCliError {
    /// Configuration, reference, resolution and pull failures, as `nixenv pull` says them.
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error("container {id}: {source}")]
    Record {
        id: String,
        #[source]
        source: PinError,
    },
    #[error("container {id}: no record: nixenv prepared no container of that id on this node (or it went more than 30 days ago)")]
    NoRecord { id: String },
    #[error("{what}: {source}")]
    Sbom {
        what: String,
        #[source]
        source: Box<SbomError>,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
}

pub fn run(globals: &Globals, args: &SbomArgs) -> Result<(), SbomCliError> {
    let format: Format = args.format.parse().map_err(|source| SbomCliError::Sbom {
        what: "--format".to_owned(),
        source: Box::new(source),
    })?;
    let cfg = globals.config().map_err(PullError::from)?;
    let doc = match (&args.reference, &args.container) {
        (Some(r), _) => {
            let result = of_reference(&cfg, r, format);
            metrics::flush(&cfg.state_dir);
            result?
        }
        (None, Some(id)) => of_container(&cfg, id, format)?,
        (None, None) => unreachable!("clap requires REF or --container"),
    };
    match &args.output {
        Some(path) => {
            atomic::write_replace(path, &doc, 0o644).map_err(|source| SbomCliError::Write {
                path: path.clone(),
                source,
            })
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&doc)
                .and_then(|()| out.flush())
                .map_err(SbomCliError::Stdout)
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The subject's name: the environment, or the store path's name.
fn subject_name(reference: &Reference) -> String {
    match reference {
        Reference::Environment { name, .. } => name.to_string(),
        Reference::StorePath(p) => p.name().to_owned(),
    }
}

fn of_reference(cfg: &Config, r: &str, format: Format) -> Result<Vec<u8>, SbomCliError> {
    let reference: Reference = r.trim_end_matches('/').parse().map_err(PullError::from)?;
    let resolved = resolve_blocking(cfg, &reference).map_err(|source| PullError::Resolve {
        reference: r.to_owned(),
        source: Box::new(source),
    })?;
    let done = materialise(cfg, &[r.to_owned()], &resolved.paths)?;
    let subject = Subject {
        name: subject_name(&reference),
        generation: resolved.generation,
        system: cfg.system.clone(),
        roots: resolved.paths.clone(),
        container: None,
    };
    let sbom =
        sbom::describe(&done.store, subject, &done.closure.paths, now()).map_err(|source| {
            SbomCliError::Sbom {
                what: r.to_owned(),
                source: Box::new(source),
            }
        })?;
    Ok(sbom.render(format))
}

fn of_container(cfg: &Config, id: &str, format: Format) -> Result<Vec<u8>, SbomCliError> {
    let record = pin::read_record(&cfg.state_dir, id)
        .map_err(|source| SbomCliError::Record {
            id: id.to_owned(),
            source,
        })?
        .ok_or_else(|| SbomCliError::NoRecord { id: id.to_owned() })?;
    let sbom_err = |source| SbomCliError::Sbom {
        what: format!("container {id}"),
        source: Box::new(source),
    };
    let store = nixenv_core::store::Store::open(&cfg.state_dir)
        .map_err(|e| sbom_err(SbomError::Store(e)))?;
    let subject = Subject {
        name: record
            .reference
            .parse::<Reference>()
            .map(|r| subject_name(&r))
            .unwrap_or_else(|_| record.reference.clone()),
        generation: record.generation,
        system: record.system.clone().unwrap_or_else(|| cfg.system.clone()),
        roots: record.paths.clone(),
        container: Some(Container {
            id: record.container_id.clone(),
            prepared: record.created.clone(),
        }),
    };
    let sbom = sbom::describe(&store, subject, &record.closure, now()).map_err(sbom_err)?;
    Ok(sbom.render(format))
}
