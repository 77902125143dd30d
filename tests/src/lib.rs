//! nixenv's end-to-end test harness.
//!
//! - [`fixtures`]: closures built by the host's real Nix (echoserver + glibc + busybox + data),
//!   signed binary caches (xz, zstd, bzip2, none, and spoiled ones for negative tests) and a
//!   catalog directory: `Fixtures::get()`.
//! - [`generations`]: a next generation of the fixture closure, rebuilt by Nix with one
//!   package changed, and a cache holding both generations.
//! - [`cache_server`]: a real HTTP/1.1 + h2c server on 127.0.0.1 serving a cache or catalog
//!   directory, counting requests per path, with fault injection (status codes, dropped
//!   connections, delays): `CacheServer::serve(dir)`.
//! - [`node_registry`]: `nixenv registry` serving the shipped empty image on a private port,
//!   and the package's registry configuration pointed at it.
//! - [`node`]: the workspace binaries (`nixenv_bin()`, `bin_path(name)`) and a private node
//!   (temp `state-dir` + `config.toml`): `TestNode::new()`.
//!
//! Typical use:
//!
//! ```no_run
//! use nixenv_testkit::{CacheServer, Cache, Fixtures, TestNode};
//!
//! let fx = Fixtures::get();
//! let caches = CacheServer::serve(fx.cache(Cache::Xz));
//! let catalog = CacheServer::serve(&fx.catalog);
//! let node = TestNode::new()
//!     .substituter(&caches.url())
//!     .trusting(&fx.trusted_key.public)
//!     .with_catalog(&catalog.url());
//! let out = node.nixenv(&["pull", "acme/echoserver"]).output().unwrap();
//! ```

pub mod cache_server;
pub mod cni;
pub mod containerd;
pub mod cri;
pub mod fixtures;
pub mod generations;
pub mod images;
pub mod node;
pub mod node_registry;
pub mod podman;
pub mod python;
pub mod scratch;
pub mod wide;

pub use cache_server::{CacheServer, Fault, RequestRecord};
pub use fixtures::{Cache, EchoReply, Fixtures};
pub use node::{bin_path, list_dir, nixenv_bin, shim_bin, ServedNode, TestNode};

/// Pids of this host's processes whose argv (from `/proc/<pid>/cmdline`, lossily decoded)
/// satisfies `matches`.
pub fn pids_where(mut matches: impl FnMut(&[String]) -> bool) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = cmdline
                .strip_suffix(b"\0")
                .unwrap_or(&cmdline)
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            matches(&args)
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 (bound, then released, so a server can take it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_for<F: FnMut() -> bool>(what: &str, timeout: std::time::Duration, mut f: F) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The host's runc, as `command -v runc` finds it (Debian: `/usr/sbin/runc`).
pub fn host_runc() -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d: std::path::PathBuf| d.join("runc"))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .expect("runc is installed")
}

/// The directory of `pid`'s cgroup for v1 controller `controller` (on a cgroup v2 host, its
/// unified directory).
pub fn cgroup_dir(pid: i32, controller: &str) -> std::path::PathBuf {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let unified = root.join("cgroup.controllers").exists();
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|line| {
            let mut f = line.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let ours = if unified {
                controllers.is_empty()
            } else {
                controllers.split(',').any(|c| c == controller)
            };
            let dir = if unified {
                root.to_owned()
            } else {
                root.join(controller)
            };
            ours.then(|| dir.join(path.trim_start_matches('/')))
        })
        .unwrap_or_else(|| panic!("no {controller} cgroup for {pid}: {text}"))
}

/// The value of `name` in the output of `env` (`NAME=value` lines): its last line, the one a
/// process sees.
pub fn env_var(env_output: &str, name: &str) -> Option<String> {
    env_output
        .lines()
        .filter_map(|l| l.split_once('='))
        .rfind(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}
