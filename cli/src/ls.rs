//! `nixenv ls [--catalog DIR_OR_URL] [--json] ORG/APP`: an environment's generations with their
//! store paths and env, marking the current one.

use std::io::Write;

use nixenv_core::config::ConfigError;
use nixenv_core::environment::publish::{self, Listing, PublishError};
use nixenv_core::environment::{EnvName, ReferenceError};
use nixenv_core::fetch::netrc::NetrcError;
use nixenv_core::fetch::Fetcher;

use crate::Globals;

/// Arguments of `nixenv ls`.
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    /// The catalog to read: a URL or a directory (default: `catalog` from the config).
    #[arg(long, value_name = "DIR_OR_URL")]
    pub catalog: Option<String>,
    /// Print JSON: `{"name", "current", "generations": [<lock> + "current": bool, …]}`.
    #[arg(long)]
    pub json: bool,
    /// The environment, `ORG/APP`.
    #[arg(value_name = "ORG/APP", required_unless_present = "store")]
    pub name: Option<String>,
    /// List the node store instead: every path with its size, last use and pinning containers.
    #[arg(long, conflicts_with_all = ["name", "catalog", "json"])]
    pub store: bool,
}

/// Why `nixenv ls` failed.
#[derive(Debug, thiserror::Error)]
pub enum LsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Name(#[from] ReferenceError),
    #[error("{name}: {source}")]
    List {
        name: EnvName,
        #[source]
        source: Box<PublishError>,
    },
    #[error(transparent)]
    Netrc(#[from] NetrcError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store_ls::StoreLsError),
}

pub fn run(globals: &Globals, args: &LsArgs) -> Result<(), LsError> {
    if args.store {
        return Ok(crate::store_ls::run(globals)?);
    }
    let cfg = globals.config()?;
    let name: EnvName = args.name.as_deref().unwrap_or_default().parse()?;
    let in_name = |source| LsError::List {
        name: name.clone(),
        source: Box::new(source),
    };
    let url = match (&args.catalog, &cfg.catalog) {
        (Some(c), _) => publish::catalog_url(c).map_err(in_name)?,
        (None, Some(url)) => url.clone(),
        (None, None) => return Err(in_name(PublishError::NoCatalog)),
    };
    let fetch = Fetcher::for_config(&cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LsError::Runtime)?;
    let listing = rt
        .block_on(publish::list(&url, &fetch, &name))
        .map_err(in_name)?;
    let text = if args.json {
        json(&listing)
    } else {
        text(&listing)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).map_err(LsError::Stdout)
}

fn json(l: &Listing) -> String {
    let generations: Vec<serde_json::Value> = l
        .generations
        .iter()
        .map(|g| {
            let mut v = serde_json::to_value(g).expect("locks serialise");
            v["current"] = serde_json::Value::Bool(Some(g.generation) == l.current);
            v
        })
        .collect();
    let v = serde_json::json!({
        "name": l.name.to_string(),
        "current": l.current,
        "generations": generations,
    });
    let mut s = serde_json::to_string_pretty(&v).expect("JSON serialises");
    s.push('\n');
    s
}

fn text(l: &Listing) -> String {
    let mut s = String::new();
    match l.current {
        Some(c) => s.push_str(&format!("{} (current: {c})\n", l.name)),
        None => s.push_str(&format!("{} (no current generation)\n", l.name)),
    }
    for g in &l.generations {
        let mark = if Some(g.generation) == l.current {
            " (current)"
        } else {
            ""
        };
        s.push_str(&format!("  {}{mark}\n", g.generation));
        for (system, sys) in &g.systems {
            s.push_str(&format!("    {system}\n"));
            for p in &sys.paths {
                s.push_str(&format!("      {p}\n"));
            }
            for (k, v) in sys.env.iter() {
                s.push_str(&format!("      env {k}={v}\n"));
            }
        }
    }
    s
}
