//! Shim logs through `tracing` to the `log` FIFO containerd opens in the bundle directory
//! (the shim's working directory); containerd copies it into its own log.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;

use tracing_subscriber::EnvFilter;

/// Sends `tracing` output to `./log` (non-blocking, so a slow reader never stalls the shim;
/// without a reader, to stderr). `RUST_LOG` overrides the level.
pub fn init(debug: bool, id: &str) {
    let default = if debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fifo = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("log");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    let result = match fifo {
        Ok(file) => builder.with_writer(std::sync::Mutex::new(file)).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
    if result.is_ok() {
        tracing::info!(
            shim = id,
            pid = std::process::id(),
            "containerd-shim-nixenv-v2 serving"
        );
    }
}
