//! `nixenv`: the operator CLI. Thin glue over `nixenv_core`: `main` parses the command line,
//! sets up logging and dispatches to one file per subcommand (`pull.rs`, …). Every failure is
//! one line on stderr, `nixenv: <ref>: <cause>`, and exit code 1.

mod doctor;
mod gc;
mod ls;
mod metrics;
mod progress;
mod publish;
mod pull;
mod registry;
mod sbom;
mod store_ls;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nixenv_core::config::{Config, ConfigError};

/// Run Kubernetes pods from Nix closures: node-side operator tool.
#[derive(Debug, Parser)]
#[command(name = "nixenv", version, about)]
struct Cli {
    /// Configuration file (default: $NIXENV_CONFIG, else /etc/nixenv/config.toml).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Log what happens to stderr (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Materialise the closure of each reference into the node store; print its store paths.
    Pull(pull::PullArgs),
    /// Publish store paths as the next generation of an environment in a catalog directory.
    Publish(publish::PublishArgs),
    /// List an environment's generations and their store paths (`--store`: the node store).
    Ls(ls::LsArgs),
    /// Check this node: runc, containerd/CRI-O handler, empty image, state dir, caches, catalog, keys.
    Doctor(doctor::DoctorArgs),
    /// Remove store paths no running container uses, least recently used first; print what was freed.
    Gc(gc::GcArgs),
    /// Print this node's metrics in the Prometheus text format (`--textfile`: for node-exporter).
    Metrics(metrics::MetricsArgs),
    /// Write the closure of an environment, or of what a container ran, as SPDX or CycloneDX JSON.
    Sbom(sbom::SbomArgs),
    /// Serve the empty image (docker.io/library/empty) read-only on loopback, for this node's runtimes.
    Registry(registry::RegistryArgs),
}

/// Options every subcommand sees.
#[derive(Debug, Clone)]
pub struct Globals {
    /// `--config`, overriding `$NIXENV_CONFIG`.
    pub config_path: Option<PathBuf>,
    pub verbose: u8,
}

impl Globals {
    /// Loads the configuration: `--config`, else `$NIXENV_CONFIG`, else the default file.
    pub fn config(&self) -> Result<Config, ConfigError> {
        match &self.config_path {
            Some(p) => Config::load_from(p),
            None => Config::load(),
        }
    }
}

fn init_logging(verbose: u8) {
    let env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    if verbose == 0 && env.is_none() {
        return;
    }
    let filter = env.unwrap_or_else(|| match verbose {
        1 => "nixenv_core=debug,nixenv=debug,info".to_owned(),
        _ => "trace".to_owned(),
    });
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let globals = Globals {
        config_path: cli.config,
        verbose: cli.verbose,
    };
    let result: anyhow::Result<()> = match &cli.command {
        Command::Pull(args) => pull::run(&globals, args).map_err(anyhow::Error::from),
        Command::Publish(args) => publish::run(&globals, args).map_err(anyhow::Error::from),
        Command::Ls(args) => ls::run(&globals, args).map_err(anyhow::Error::from),
        Command::Doctor(args) => doctor::run(&globals, args).map_err(anyhow::Error::from),
        Command::Gc(args) => gc::run(&globals, args).map_err(anyhow::Error::from),
        Command::Metrics(args) => metrics::run(&globals, args).map_err(anyhow::Error::from),
        Command::Sbom(args) => sbom::run(&globals, args).map_err(anyhow::Error::from),
        Command::Registry(args) => registry::run(args).map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Error messages are single lines by construction; keep it so whatever happens.
            let msg = e.to_string().replace('\n', " ");
            eprintln!("nixenv: {msg}");
            ExitCode::FAILURE
        }
    }
}
