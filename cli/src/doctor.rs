//! `nixenv doctor`: check this node end to end (runc, containerd/CRI-O configuration, empty
//! image, state dir, caches, catalog, keys). One `ok|skip|warn|fail` line per check with the fix;
//! exit code 1 when any check fails. The checks live in `nixenv_core::doctor`.

use std::path::PathBuf;

use nixenv_core::doctor::{self, DoctorOptions, SystemHost};
use nixenv_core::fetch::Fetcher;

use crate::Globals;

/// Arguments of `nixenv doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// containerd's configuration file.
    #[arg(
        long,
        env = "NIXENV_CONTAINERD_CONFIG",
        value_name = "PATH",
        default_value = "/etc/containerd/config.toml"
    )]
    pub containerd_config: PathBuf,

    /// containerd's socket (default: `[grpc] address` of its config, else /run/containerd/containerd.sock).
    #[arg(long, env = "NIXENV_CONTAINERD_ADDRESS", value_name = "PATH")]
    pub containerd_address: Option<PathBuf>,

    /// CRI-O's main configuration file.
    #[arg(
        long,
        env = "NIXENV_CRIO_CONFIG",
        value_name = "PATH",
        default_value = "/etc/crio/crio.conf"
    )]
    pub crio_config: PathBuf,

    /// CRI-O's drop-in directory.
    #[arg(
        long,
        env = "NIXENV_CRIO_CONFIG_DIR",
        value_name = "DIR",
        default_value = "/etc/crio/crio.conf.d"
    )]
    pub crio_config_dir: PathBuf,

    /// Print the findings as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Why `nixenv doctor` exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("doctor: {0} check(s) failed")]
    Failed(usize),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Runs the checks and prints the report on stdout.
pub fn run(globals: &Globals, args: &DoctorArgs) -> Result<(), DoctorError> {
    let opts = DoctorOptions {
        config_path: globals.config_path.clone(),
        containerd_config: args.containerd_config.clone(),
        containerd_address: args.containerd_address.clone(),
        crio_config: args.crio_config.clone(),
        crio_config_dir: args.crio_config_dir.clone(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DoctorError::Runtime)?;
    let report = rt.block_on(doctor::run(&opts, &SystemHost, |cfg| {
        Fetcher::for_config(cfg).ok()
    }));
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", report.render());
    }
    match report.failed() {
        0 => Ok(()),
        n => Err(DoctorError::Failed(n)),
    }
}
