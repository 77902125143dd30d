//! `nixenv metrics [--textfile PATH]`: the node's metrics in the Prometheus text format, on
//! stdout or written atomically as a textfile for node-exporter's textfile collector. The
//! logic lives in `nixenv_core::metrics`.

use std::io::Write;
use std::path::PathBuf;

use nixenv_core::config::ConfigError;
use nixenv_core::metrics::{self, MetricsError};

use crate::Globals;

/// Arguments of `nixenv metrics`.
#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    /// Write the metrics to PATH atomically (a `.prom` file in node-exporter's
    /// `--collector.textfile.directory`) instead of printing them.
    #[arg(long, value_name = "PATH")]
    pub textfile: Option<PathBuf>,
}

/// Why `nixenv metrics` failed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsCliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("metrics: {0}")]
    Metrics(#[from] MetricsError),
    #[error("writing {}: {source}", path.display())]
    Textfile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
}

pub fn run(globals: &Globals, args: &MetricsArgs) -> Result<(), MetricsCliError> {
    let cfg = globals.config()?;
    let text = metrics::render(&cfg.state_dir)?;
    match &args.textfile {
        // node-exporter reads `*.prom` only, so it never sees the temporary file.
        Some(path) => {
            nixenv_core::atomic::write_atomic(path, text.as_bytes(), 0o644).map_err(|source| {
                MetricsCliError::Textfile {
                    path: path.clone(),
                    source,
                }
            })
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(MetricsCliError::Stdout)
        }
    }
}
