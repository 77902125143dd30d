//! Running the workspace's binaries against a private node: a temp dir with a `state-dir` and
//! a `config.toml`.
//!
//! ```no_run
//! use nixenv_testkit::cache_server::CacheServer;
//! use nixenv_testkit::fixtures::{Cache, Fixtures};
//! use nixenv_testkit::node::TestNode;
//!
//! let fx = Fixtures::get();
//! let server = CacheServer::serve(fx.cache(Cache::Zstd));
//! let node = TestNode::new().substituter(&server.url()).trusting(&fx.trusted_key.public);
//! let out = node.nixenv(&["pull", &fx.echoserver]).output().unwrap();
//! assert!(out.status.success());
//! assert!(node.store_dir().join(nixenv_testkit::fixtures::store_path_base(&fx.glibc)).is_dir());
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The directory holding the workspace's built binaries (`target/<profile>`), found next to
/// the running test executable (`target/<profile>/deps/<test>-<hash>`), or
/// `$NIXENV_TEST_BIN_DIR` when set (e.g. to test installed binaries).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NIXENV_TEST_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current test executable");
    let mut dir = exe
        .parent()
        .expect("test executable directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The path of a workspace binary (`nixenv`, `nixenv-runc`, `nixenv-hook`,
/// `containerd-shim-nixenv-v2`, `nixenv-test-server`).
///
/// Unless `$NIXENV_TEST_BIN_DIR` is set, the first call per binary checks that it is newer
/// than every Rust source and manifest of the workspace; if it is missing or older, it runs
/// `cargo build --workspace --bin NAME` (for `nixenv-runc`: `cargo build --manifest-path
/// hook/runc/Cargo.toml`) into the same target directory and profile as the
/// running test, so `cargo test -p nixenv-testkit` never runs a stale binary. Under the CI's
/// `cargo build --workspace --all-targets` + `cargo test --workspace` nothing is rebuilt.
/// Panics if the binary cannot be built.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = bin_dir();
    if std::env::var_os("NIXENV_TEST_BIN_DIR").is_none_or(|d| d.is_empty()) {
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        if !built.iter().any(|b| b == name) {
            let binary = std::fs::metadata(dir.join(name))
                .and_then(|m| m.modified())
                .ok();
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
            let newest = newest_source(workspace);
            if binary.is_none_or(|b| newest.is_some_and(|n| n > b)) {
                build_bin(&dir, name);
            }
            built.push(name.to_string());
        }
    }
    let path = dir.join(name);
    assert!(path.is_file(), "{} does not exist", path.display());
    path
}

/// `containerd-shim-nixenv-v2`, with `nixenv-hook` (which prepares its containers) built next
/// to it; `$NIXENV_TEST_SHIM` when set (the shipped build of `packaging/build-shim`, with
/// `nixenv-hook` next to it).
pub fn shim_bin() -> PathBuf {
    if let Some(shim) = std::env::var_os("NIXENV_TEST_SHIM").filter(|s| !s.is_empty()) {
        let shim = PathBuf::from(shim);
        assert!(
            shim.is_file(),
            "NIXENV_TEST_SHIM={} does not exist",
            shim.display()
        );
        return shim;
    }
    bin_path("nixenv-hook");
    bin_path("containerd-shim-nixenv-v2")
}

/// The `nixenv` CLI.
pub fn nixenv_bin() -> PathBuf {
    bin_path("nixenv")
}

/// The newest modification time of the workspace's `*.rs`, `*.proto`, `Cargo.toml` and
/// `Cargo.lock` files (target directories and `.git` skipped).
fn newest_source(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return None;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Ok(ty) = e.file_type() else { continue };
        let t = if ty.is_dir() {
            if name.starts_with("target") || name.starts_with('.') || name == "fixtures" {
                continue;
            }
            newest_source(&e.path())
        } else if name.ends_with(".rs")
            || name.ends_with(".proto")
            || name == "Cargo.toml"
            || name == "Cargo.lock"
        {
            e.metadata().and_then(|m| m.modified()).ok()
        } else {
            None
        };
        newest = newest.max(t);
    }
    newest
}

/// nixenv-runc's first stage, built from `hook/runc/`, not from the main workspace.
const FIRST_STAGE: &str = "nixenv-runc";

fn build_bin(profile_dir: &Path, name: &str) {
    let Some(target_dir) = profile_dir.parent() else {
        return;
    };
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--bin", name, "--target-dir"])
        .arg(target_dir);
    if name == FIRST_STAGE {
        // A workspace of its own (a `no_std` binary needs `panic = "abort"`).
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        cmd.arg("--manifest-path")
            .arg(workspace.join("hook/runc/Cargo.toml"));
    } else {
        cmd.arg("--workspace");
    }
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run cargo build --bin {name}: {e}"));
    assert!(
        out.status.success(),
        "cargo build --bin {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private node: a temp dir holding `state/` (the `state-dir`) and `config.toml`.
///
/// The configuration is written again before every command, from the builder fields.
/// The temp dir is removed on drop (store files are read-only; removal fixes modes first).
#[derive(Debug)]
pub struct TestNode {
    dir: tempfile::TempDir,
    /// `substituters`, in order.
    pub substituters: Vec<String>,
    /// `trusted-public-keys`.
    pub trusted_public_keys: Vec<String>,
    /// `catalog`.
    pub catalog: Option<String>,
    /// `require-sigs` (omitted when `None`).
    pub require_sigs: Option<bool>,
    /// Extra TOML lines appended verbatim (e.g. `download-attempts = 2`).
    pub extra: Vec<String>,
}

impl Default for TestNode {
    fn default() -> Self {
        Self::new()
    }
}

impl TestNode {
    /// A new node in a fresh temp dir, with no caches or keys configured.
    pub fn new() -> TestNode {
        Self::new_in(&std::env::temp_dir())
    }

    /// [`TestNode::new`] with its temp dir under `base`.
    pub fn new_in(base: &Path) -> TestNode {
        let dir = tempfile::Builder::new()
            .prefix("nixenv-node-")
            .tempdir_in(base)
            .expect("temp dir for a test node");
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        TestNode {
            dir,
            substituters: Vec::new(),
            trusted_public_keys: Vec::new(),
            catalog: None,
            require_sigs: None,
            extra: Vec::new(),
        }
    }

    /// Adds a substituter URL.
    pub fn substituter(mut self, url: &str) -> Self {
        self.substituters.push(url.to_string());
        self
    }

    /// Adds a trusted public key (`name:base64`).
    pub fn trusting(mut self, key: &str) -> Self {
        self.trusted_public_keys.push(key.to_string());
        self
    }

    /// Sets the catalog URL.
    pub fn with_catalog(mut self, url: &str) -> Self {
        self.catalog = Some(url.to_string());
        self
    }

    /// Appends a raw TOML line to the config.
    pub fn with_config_line(mut self, line: &str) -> Self {
        self.extra.push(line.to_string());
        self
    }

    /// The node's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `state-dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `{state-dir}/store`.
    pub fn store_dir(&self) -> PathBuf {
        self.state_dir().join("store")
    }

    /// The path of the config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The config TOML for the current fields.
    pub fn config_toml(&self) -> String {
        let list = |v: &[String]| {
            let items: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
            format!("[{}]", items.join(", "))
        };
        let mut toml = format!(
            "state-dir = {:?}\nsubstituters = {}\ntrusted-public-keys = {}\n",
            self.state_dir().display().to_string(),
            list(&self.substituters),
            list(&self.trusted_public_keys)
        );
        if let Some(c) = &self.catalog {
            toml.push_str(&format!("catalog = {c:?}\n"));
        }
        if let Some(r) = self.require_sigs {
            toml.push_str(&format!("require-sigs = {r}\n"));
        }
        for line in &self.extra {
            toml.push_str(line);
            toml.push('\n');
        }
        toml
    }

    /// Writes `config.toml` (atomically, so processes started earlier never read a partial
    /// file) and returns its path.
    pub fn write_config(&self) -> PathBuf {
        let path = self.config_path();
        let toml = self.config_toml();
        if std::fs::read_to_string(&path).ok().as_deref() != Some(toml.as_str()) {
            let tmp = tempfile::NamedTempFile::new_in(self.dir.path()).expect("temp config");
            std::fs::write(tmp.path(), toml).expect("write config.toml");
            tmp.persist(&path).expect("rename config.toml into place");
        }
        path
    }

    /// A `nixenv ARGS…` command with `NIXENV_CONFIG` pointing at this node's config
    /// (written now). Inherits the test's environment otherwise.
    pub fn nixenv(&self, args: &[&str]) -> Command {
        self.command(&nixenv_bin(), args)
    }

    /// Any binary with `NIXENV_CONFIG` set to this node's config.
    pub fn command(&self, bin: &Path, args: &[&str]) -> Command {
        let config = self.write_config();
        let mut cmd = Command::new(bin);
        cmd.args(args).env("NIXENV_CONFIG", config);
        cmd
    }

    /// The pin files in `{state-dir}/pins` (`<key>.json`; temporaries skipped), sorted.
    pub fn pins(&self) -> Vec<String> {
        list_dir(&self.state_dir().join("pins"))
            .into_iter()
            .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
            .collect()
    }

    /// `nixenv sbom --container ID` as CycloneDX: its components' store paths, in the document's
    /// order, or the error line. Panics if the document is not about that container.
    pub fn sbom_of_container(&self, id: &str) -> Result<Vec<String>, String> {
        let out = self
            .nixenv(&["sbom", "--container", id, "--format", "cyclonedx-json"])
            .output()
            .expect("run nixenv sbom");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let bom: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let properties = &bom["metadata"]["component"]["properties"];
        assert!(
            properties
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "nixenv:container-id" && p["value"] == id),
            "{properties}"
        );
        Ok(bom["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["bom-ref"].as_str().unwrap().to_owned())
            .collect())
    }

    /// Sorted names of the entries of `{state-dir}/store` (empty if it does not exist).
    pub fn store_entries(&self) -> Vec<String> {
        list_dir(&self.store_dir())
    }

    /// Every file or directory anywhere under `state-dir` whose name suggests a leftover of an
    /// interrupted install (contains `tmp`, `.partial`, `.download` or starts with `.`),
    /// as paths relative to `state-dir`. Locks are not counted.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.state_dir(), &self.state_dir(), &mut out);
        out
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        let is_store_path = dir == root.join("store") && name.len() > 33 && !name.starts_with('.');
        if is_store_path {
            continue; // complete store paths are not leftovers; do not descend
        }
        let lower = name.to_lowercase();
        let suspicious = (lower.contains("tmp")
            || lower.contains("partial")
            || lower.contains("download")
            || lower.contains("incomplete")
            || name.starts_with('.'))
            && !lower.ends_with(".lock");
        if suspicious {
            out.push(rel);
        }
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(root, &path, out);
        }
    }
}

/// A node fed over HTTP: the fixture cache `cache` and the catalog, each served on 127.0.0.1,
/// and a private [`TestNode`] that uses both and trusts the test key. Dropped, the servers
/// stop and the node's directory is removed.
#[derive(Debug)]
pub struct ServedNode {
    /// The binary cache server (request counts, fault injection).
    pub caches: crate::CacheServer,
    /// The catalog server.
    pub catalog: crate::CacheServer,
    /// The node.
    pub node: TestNode,
}

impl ServedNode {
    /// Serves `cache` and the catalog to a new node.
    pub fn new(cache: crate::Cache) -> ServedNode {
        ServedNode::with(cache, |node| node)
    }

    /// [`ServedNode::new`], with `configure` applied to the node (extra config lines, say).
    pub fn with(cache: crate::Cache, configure: impl FnOnce(TestNode) -> TestNode) -> ServedNode {
        let fx = crate::Fixtures::get();
        let caches = crate::CacheServer::serve(fx.cache(cache));
        let catalog = crate::CacheServer::serve(&fx.catalog);
        let node = configure(
            TestNode::new()
                .substituter(&caches.url())
                .trusting(&fx.trusted_key.public)
                .with_catalog(&catalog.url()),
        );
        ServedNode {
            caches,
            catalog,
            node,
        }
    }
}

/// Sorted entry names of a directory (empty if missing).
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // Store paths are read-only (0555 dirs): make them writable so TempDir can remove them.
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(self.dir.path())
            .status();
    }
}
