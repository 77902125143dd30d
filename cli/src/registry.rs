//! `nixenv registry [--archive PATH] [--listen ADDR] [--idle-exit DURATION]`: the node-local,
//! read-only registry of the empty image (`docker.io/library/empty`), on the socket systemd
//! passes (`nixenv-registry.socket`) or on a loopback address. The logic lives in
//! `nixenv_core::registry`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nixenv_core::registry::archive::{ArchiveError, Image};
use nixenv_core::registry::listen::{self, ListenError};
use nixenv_core::registry::serve::{self, Limits, ServeError};
use nixenv_core::registry::{DEFAULT_ARCHIVE, DEFAULT_LISTEN};

/// Arguments of `nixenv registry`.
#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// The OCI image-layout archive to serve.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ARCHIVE)]
    pub archive: PathBuf,

    /// Loopback address to listen on when systemd passes no socket.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Exit after this long without a connection, e.g. `30s` (`0`: never). Meant for socket
    /// activation, where systemd starts the registry again at the next connection.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0")]
    pub idle_exit: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("expected a duration like 30s: {e}"))
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

pub fn run(args: &RegistryArgs) -> Result<(), RegistryError> {
    let image = Arc::new(Image::read(&args.archive)?);
    let listener = listen::listener(args.listen)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RegistryError::Runtime)?;
    let limits = Limits {
        idle_exit: (!args.idle_exit.is_zero()).then_some(args.idle_exit),
        ..Limits::default()
    };
    rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|source| ServeError::Accept { source })?;
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, archive = %args.archive.display(), "serving the empty image");
        }
        serve::serve(listener, image, limits).await
    })?;
    Ok(())
}
