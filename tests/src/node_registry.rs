//! The node-local registry of the empty image (`nixenv registry`) as a child process on a
//! private loopback port, serving the archive the package ships (`packaging/empty-image`), and
//! the package's registry configuration files pointed at that port.
//!
//! ```no_run
//! use nixenv_testkit::node_registry::{shipped_config, NodeRegistry};
//!
//! let registry = NodeRegistry::start().unwrap();
//! let hosts = shipped_config("containerd/hosts.toml", registry.addr());
//! // … write `hosts` to CERTS_D/docker.io/hosts.toml, pull `empty:latest` …
//! ```

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{free_port, nixenv_bin};

/// The address the package's files name for the registry (`nixenv-registry.socket`).
pub const PACKAGE_ADDRESS: &str = "127.0.0.1:7475";

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The empty image's archive as the package ships it: `$NIXENV_TEST_EMPTY_ARCHIVE` when set
/// (`tests/matrix` makes it on the host: its roots have no `jq`), else made once per process
/// by `packaging/empty-image` in a temp dir.
pub fn shipped_empty_archive() -> PathBuf {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("NIXENV_TEST_EMPTY_ARCHIVE").filter(|p| !p.is_empty())
            {
                return PathBuf::from(p);
            }
            let dir =
                std::env::temp_dir().join(format!("nixenv-testkit-empty-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir for the empty image");
            let out = dir.join("empty-image.tar");
            let status = Command::new(format!("{WORKSPACE}/packaging/empty-image"))
                .arg(&out)
                .status()
                .expect("run packaging/empty-image");
            assert!(status.success(), "packaging/empty-image failed (needs jq)");
            out
        })
        .clone()
}

/// The manifest digest (`sha256:…`) the archive's `index.json` names.
pub fn archive_manifest_digest(archive: &Path) -> anyhow::Result<String> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg("index.json")
        .output()
        .context("run tar")?;
    let index: serde_json::Value = serde_json::from_slice(&out.stdout).context("index.json")?;
    index["manifests"][0]["digest"]
        .as_str()
        .map(str::to_owned)
        .context("index.json names no manifest")
}

/// The package's file `packaging/<relative>` with the registry's address replaced by `addr`.
pub fn shipped_config(relative: &str, addr: SocketAddr) -> String {
    let path = format!("{WORKSPACE}/packaging/{relative}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    assert!(
        text.contains(PACKAGE_ADDRESS),
        "{path} names {PACKAGE_ADDRESS}"
    );
    text.replace(PACKAGE_ADDRESS, &addr.to_string())
}

/// A running `nixenv registry`, killed on drop.
#[derive(Debug)]
pub struct NodeRegistry {
    child: Child,
    addr: SocketAddr,
}

impl NodeRegistry {
    /// Serves [`shipped_empty_archive`] on a free loopback port; returns once it accepts.
    pub fn start() -> anyhow::Result<NodeRegistry> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let child = Command::new(nixenv_bin())
            .arg("registry")
            .arg("--archive")
            .arg(shipped_empty_archive())
            .arg("--listen")
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .spawn()
            .context("start nixenv registry")?;
        let mut registry = NodeRegistry { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if let Some(status) = registry.child.try_wait()? {
                bail!("nixenv registry exited: {status}");
            }
            if Instant::now() > deadline {
                bail!("nixenv registry does not listen on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NodeRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
