//! `nixenv publish [--catalog DIR_OR_URL] ORG/APP STORE_PATH… [--env K=V]…`: check that every
//! path's closure is available from the substituters, write the next generation's lock into
//! the catalog directory and move `current` to it. Prints `ORG/APP@N` on stdout.

use std::io::Write;

use nixenv_core::config::ConfigError;
use nixenv_core::environment::publish::{self, PublishError};
use nixenv_core::environment::{EnvName, EnvVars, ReferenceError};
use nixenv_core::fetch::netrc::NetrcError;
use nixenv_core::fetch::Fetcher;
use nixenv_core::nix::store_path::StorePathError;
use nixenv_core::nix::StorePath;

use crate::Globals;

/// Arguments of `nixenv publish`.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The catalog to write: a directory or a `file://` URL (default: `catalog` from the config).
    #[arg(long, value_name = "DIR_OR_URL")]
    pub catalog: Option<String>,
    /// The Nix system the paths are for (default: the node's).
    #[arg(long, value_name = "SYSTEM")]
    pub system: Option<String>,
    /// An environment variable for the lock, `NAME=VALUE` (repeatable, kept in order).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// The environment, `ORG/APP`.
    #[arg(value_name = "ORG/APP")]
    pub name: String,
    /// Its top-level store paths, in PATH order.
    #[arg(required = true, value_name = "STORE_PATH")]
    pub paths: Vec<String>,
}

/// Why `nixenv publish` failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishCliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Name(#[from] ReferenceError),
    #[error(transparent)]
    Path(#[from] StorePathError),
    #[error("{name}: {source}")]
    Publish {
        name: EnvName,
        #[source]
        source: Box<PublishError>,
    },
    #[error("{name}: --env {var} is given twice")]
    DuplicateEnv { name: EnvName, var: String },
    #[error(transparent)]
    Netrc(#[from] NetrcError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
}

pub fn run(globals: &Globals, args: &PublishArgs) -> Result<(), PublishCliError> {
    let cfg = globals.config()?;
    let name: EnvName = args.name.parse()?;
    let in_name = |source| PublishCliError::Publish {
        name: name.clone(),
        source: Box::new(source),
    };
    let paths = args
        .paths
        .iter()
        .map(|p| StorePath::from_absolute_path(p.trim_end_matches('/')))
        .collect::<Result<Vec<_>, _>>()?;
    let mut env = EnvVars::default();
    for e in &args.env {
        let (k, v) = publish::parse_env_assignment(e).map_err(in_name)?;
        if env.get(&k).is_some() {
            return Err(PublishCliError::DuplicateEnv {
                name: name.clone(),
                var: k,
            });
        }
        env.0.push((k, v));
    }
    let target = match (&args.catalog, &cfg.catalog) {
        (Some(c), _) => c.clone(),
        (None, Some(url)) => url.to_string(),
        (None, None) => return Err(in_name(PublishError::NoCatalog)),
    };
    let dir = publish::catalog_dir(&target).map_err(in_name)?;
    let system = args.system.clone().unwrap_or_else(|| cfg.system.clone());
    let fetch = Fetcher::for_config(&cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(PublishCliError::Runtime)?;
    let published = rt
        .block_on(publish::publish(
            &cfg, &fetch, &dir, &name, &system, paths, env,
        ))
        .map_err(in_name)?;
    eprintln!(
        "published {name} generation {}{} in {}",
        published.generation,
        if published.current {
            " (now current)"
        } else {
            " (a newer generation stays current)"
        },
        dir.display()
    );
    let mut out = std::io::stdout().lock();
    writeln!(out, "{name}@{}", published.generation).map_err(PublishCliError::Stdout)
}
