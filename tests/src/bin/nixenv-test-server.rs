//! `nixenv-test-server DIR [PORT]`: serves DIR over HTTP/1.1 and h2c on 127.0.0.1:PORT
//! (default: an OS-assigned port) with the test harness's server, prints the URL on stdout,
//! and runs until killed (SIGTERM/SIGINT). For scripts and benchmarks.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: nixenv-test-server DIR [PORT]"))?,
    );
    anyhow::ensure!(dir.is_dir(), "{}: not a directory", dir.display());
    let port: u16 = match args.next() {
        Some(p) => p.to_string_lossy().parse()?,
        None => 0,
    };
    let server = nixenv_testkit::CacheServer::serve_on(&dir, port);
    println!("{}", server.url());
    use std::io::Write;
    std::io::stdout().flush()?;
    // Serve until a signal ends the process.
    loop {
        std::thread::park();
    }
}
