//! Shim logs through `tracing` to the `log` FIFO containerd opens in the bundle directory
//! (the shim's working directory); containerd copies it into its own log. The preparing
//! helper ([`crate::helper`]) writes its log to the same FIFO.
//!
//! Without the FIFO, the serving shim logs to its standard error. `start` never does: containerd
//! reads its standard output and error together as the answer. `-info` logs to standard error
//! only (containerd shows it when `-info` fails; the working directory is containerd's own).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::process::Stdio;
use std::sync::OnceLock;

use tracing::Level;

/// The log FIFO, for the helper's stderr.
static LOG: OnceLock<File> = OnceLock::new();
/// The level the shim runs at, for the helper's `RUST_LOG`.
static LEVEL: OnceLock<Level> = OnceLock::new();

/// The level: `RUST_LOG` when it is one plain level (`debug`, `info`, …), else debug with
/// containerd's `-debug`, else info. (A level, not a filter: the shim links no regex engine.)
fn level(debug: bool) -> Level {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(if debug { Level::DEBUG } else { Level::INFO })
}

/// Where `tracing` output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `./log` (non-blocking, so a slow reader never stalls the shim), else stderr: serving.
    FifoElseStderr,
    /// `./log`, else nowhere: `start`, whose stdout and stderr are its answer.
    FifoElseNowhere,
    /// stderr: `-info`.
    Stderr,
}

/// Installs the `tracing` subscriber writing to `target`; whether it was installed.
pub fn init(debug: bool, target: Target) -> bool {
    let level = level(debug);
    let _ = LEVEL.set(level);
    let fifo = match target {
        Target::Stderr => None,
        Target::FifoElseStderr | Target::FifoElseNowhere => OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("log")
            .ok(),
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false);
    let result = match (fifo, target) {
        (Some(file), _) => {
            if let Ok(copy) = file.try_clone() {
                let _ = LOG.set(copy);
            }
            builder.with_writer(std::sync::Mutex::new(file)).try_init()
        }
        (None, Target::FifoElseNowhere) => builder.with_writer(std::io::sink).try_init(),
        (None, _) => builder.with_writer(std::io::stderr).try_init(),
    };
    result.is_ok()
}

/// Standard error for a helper process: the log FIFO (else the shim's own stderr).
pub fn child_stderr() -> Stdio {
    LOG.get()
        .and_then(|f| f.try_clone().ok())
        .map(Stdio::from)
        .unwrap_or_else(Stdio::inherit)
}

/// Whether a helper process should log at debug: the shim does, and its environment sets no
/// `RUST_LOG` of its own (which the helper inherits).
pub fn child_wants_debug() -> bool {
    std::env::var_os("RUST_LOG").is_none() && LEVEL.get().is_some_and(|l| *l >= Level::DEBUG)
}
