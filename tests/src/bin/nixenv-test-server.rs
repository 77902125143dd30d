//! `nixenv-test-server [--log FILE] DIR [PORT]`: serves DIR over HTTP/1.1 and h2c on
//! 127.0.0.1:PORT (default: an OS-assigned port) with the test harness's server, prints the URL
//! on stdout, and runs until killed (SIGTERM/SIGINT). For scripts and benchmarks.
//!
//! With `--log FILE`, each SIGUSR1 (re)writes FILE atomically with every request so far, one
//! per line in arrival order: `METHOD PATH STATUS BYTES`, BYTES being the body bytes of the
//! served file sent (what a client downloaded, headers aside).

use std::io::Write;
use std::path::{Path, PathBuf};

use nixenv_testkit::cache_server::RequestRecord;

fn usage() -> anyhow::Error {
    anyhow::anyhow!("usage: nixenv-test-server [--log FILE] DIR [PORT]")
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1).peekable();
    let mut log = None;
    if args.peek().is_some_and(|a| a == "--log") {
        args.next();
        log = Some(PathBuf::from(args.next().ok_or_else(usage)?));
    }
    let dir = PathBuf::from(args.next().ok_or_else(usage)?);
    anyhow::ensure!(dir.is_dir(), "{}: not a directory", dir.display());
    let port: u16 = match args.next() {
        Some(p) => p.to_string_lossy().parse()?,
        None => 0,
    };
    let server = nixenv_testkit::CacheServer::serve_on(&dir, port);
    println!("{}", server.url());
    std::io::stdout().flush()?;
    let Some(log) = log else {
        // Serve until a signal ends the process.
        loop {
            std::thread::park();
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
        while usr1.recv().await.is_some() {
            write_log(&log, &server.request_log())?;
        }
        Ok(())
    })
}

/// Writes the request log to `path` through a temporary file and a rename.
fn write_log(path: &Path, records: &[RequestRecord]) -> anyhow::Result<()> {
    let text: String = records
        .iter()
        .map(|r| format!("{} {} {} {}\n", r.method, r.path, r.status, r.bytes))
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(())
}
