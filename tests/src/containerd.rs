//! A real containerd (Debian's 1.6: `/usr/bin/containerd`) on a private socket, root and state
//! under a temp dir, with a generated config: the CRI plugin's `sandbox_image` set to the
//! testkit's pause image, `restrict_oom_score_adj = true` (no CAP_SYS_RESOURCE here), no CNI
//! (pods use the node's network) unless [`ContainerdBuilder::cni`] names one, a configurable
//! table of runtime handlers, and extra directories (e.g. the shim's) on its PATH. Shims
//! inherit its environment (`NIXENV_CONFIG`, …).
//!
//! `NIXENV_TEST_CONTAINERD=/path/to/containerd` runs another containerd (default: `containerd`
//! on PATH). Its major version (`containerd --version`) picks the config: version 2 for 1.6 and
//! 1.7, version 3 (`io.containerd.cri.v1.runtime`, `io.containerd.cri.v1.images`, …) for 2.x.
//! With the variable set, the binary's directory comes right after [`ContainerdBuilder::path_dir`]
//! on containerd's PATH (so its own `containerd-shim-runc-v2` serves the `runc` handler), and
//! the `ctr` beside it, if any, imports images.
//!
//! On drop — even when the test panics — it kills the shims it started, deletes the runc
//! containers whose bundles live under its state dir, stops containerd, unmounts everything
//! under its temp dir and removes it.
//!
//! ```no_run
//! use nixenv_testkit::containerd::{Containerd, RuntimeHandler};
//! use nixenv_testkit::images;
//!
//! let shim_dir = nixenv_testkit::shim_bin().parent().unwrap().to_path_buf();
//! let containerd = Containerd::builder()
//!     .handler(RuntimeHandler::nixenv())
//!     .handler(RuntimeHandler::runc())
//!     .path_dir(&shim_dir)
//!     .env("NIXENV_CONFIG", "/path/to/config.toml")
//!     .start()
//!     .unwrap();
//! containerd.import(&images::busybox_image()).unwrap();
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::images::{self, ImageBuilder};

/// The CRI namespace of containerd.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// How long containerd may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The variable naming the containerd binary the tests run.
pub const CONTAINERD_ENV: &str = "NIXENV_TEST_CONTAINERD";

/// The containerd binary the tests run: `$NIXENV_TEST_CONTAINERD`, else `containerd` on PATH.
pub fn containerd_binary() -> PathBuf {
    match std::env::var_os(CONTAINERD_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("containerd"),
    }
}

/// The directory of `$NIXENV_TEST_CONTAINERD` (where its shims and `ctr` live), if set.
fn containerd_dir() -> Option<PathBuf> {
    let bin = PathBuf::from(std::env::var_os(CONTAINERD_ENV).filter(|p| !p.is_empty())?);
    let bin = std::fs::canonicalize(&bin).unwrap_or(bin);
    bin.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf)
}

/// The `ctr` that talks to [`containerd_binary`]: the one beside `$NIXENV_TEST_CONTAINERD`
/// if there is one, else `ctr` on PATH.
pub fn ctr_binary() -> PathBuf {
    containerd_dir()
        .map(|d| d.join("ctr"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("ctr"))
}

/// The major version of `containerd --version` of `bin` (`containerd <module> v2.1.5 <commit>`,
/// Debian: `containerd <module> 1.6.20~ds1 …`).
pub fn major_version_of(bin: &Path) -> anyhow::Result<u32> {
    Ok(version_of(bin)?.0)
}

/// The (major, minor) version of `containerd --version` of `bin`.
pub fn version_of(bin: &Path) -> anyhow::Result<(u32, u32)> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| anyhow::anyhow!("run {} --version: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| {
        anyhow::anyhow!(
            "{} --version: no version in {:?}",
            bin.display(),
            text.trim()
        )
    })
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    text.split_whitespace()
        .skip(1)
        .map(|w| w.trim_start_matches('v'))
        .find_map(|w| {
            let (major, rest) = w.split_once('.')?;
            let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
}

/// The (major, minor) version of [`containerd_binary`] (cached; panics if it cannot be run).
pub fn version() -> (u32, u32) {
    static VERSION: OnceLock<(u32, u32)> = OnceLock::new();
    *VERSION.get_or_init(|| {
        version_of(&containerd_binary()).unwrap_or_else(|e| panic!("containerd: {e}"))
    })
}

/// The major version of [`containerd_binary`] (cached; panics if it cannot be run).
pub fn major_version() -> u32 {
    version().0
}

/// The config version a containerd of `version` reads without migrating it: 2 for 1.x, 3 for
/// 2.0–2.2, 4 for 2.3 and later (server settings moved under `plugins`).
pub fn config_version_for(version: (u32, u32)) -> u32 {
    match version {
        (0 | 1, _) => 2,
        (2, 0..=2) => 3,
        _ => 4,
    }
}

/// The config version [`containerd_binary`] reads ([`config_version_for`]).
pub fn config_version() -> u32 {
    config_version_for(version())
}

/// A CRI runtime handler (`plugins."io.containerd.grpc.v1.cri".containerd.runtimes.NAME`).
#[derive(Debug, Clone)]
pub struct RuntimeHandler {
    /// The handler name pods select (`runtimeHandler` / RuntimeClass `handler`).
    pub name: String,
    /// `runtime_type`, e.g. `io.containerd.nixenv.v2` or `io.containerd.runc.v2`.
    pub runtime_type: String,
    /// `pod_annotations` forwarded to the runtime (e.g. `nix.dev/*`).
    pub pod_annotations: Vec<String>,
    /// `[…runtimes.NAME.options]` entries: key and raw TOML value (e.g. `("BinaryName", "\"/x/nixenv-runc\"")`).
    pub options: Vec<(String, String)>,
}

impl RuntimeHandler {
    /// Any handler.
    pub fn new(name: &str, runtime_type: &str) -> RuntimeHandler {
        RuntimeHandler {
            name: name.to_owned(),
            runtime_type: runtime_type.to_owned(),
            pod_annotations: Vec::new(),
            options: Vec::new(),
        }
    }

    /// `nixenv`: our shim (`io.containerd.nixenv.v2`) with `pod_annotations = ["nix.dev/*"]`.
    pub fn nixenv() -> RuntimeHandler {
        RuntimeHandler::new("nixenv", "io.containerd.nixenv.v2").pod_annotation("nix.dev/*")
    }

    /// `runc`: containerd's own runc shim.
    pub fn runc() -> RuntimeHandler {
        RuntimeHandler::new("runc", "io.containerd.runc.v2")
    }

    /// Forwards pod annotations matching `pattern`.
    pub fn pod_annotation(mut self, pattern: &str) -> Self {
        self.pod_annotations.push(pattern.to_owned());
        self
    }

    /// Adds a runtime option with a raw TOML value, e.g. `.option("BinaryName", "\"/bin/x\"")`.
    pub fn option(mut self, key: &str, toml_value: &str) -> Self {
        self.options.push((key.to_owned(), toml_value.to_owned()));
        self
    }
}

/// Configures a [`Containerd`].
#[derive(Debug, Clone)]
pub struct ContainerdBuilder {
    handlers: Vec<RuntimeHandler>,
    default_handler: Option<String>,
    env: BTreeMap<String, String>,
    path_dirs: Vec<PathBuf>,
    sandbox_image: ImageBuilder,
    log_level: String,
    extra_cri_toml: Vec<String>,
    imports: Vec<PathBuf>,
    cni: Option<(PathBuf, PathBuf)>,
    config_version: Option<u32>,
    registry_config_path: Option<PathBuf>,
}

impl ContainerdBuilder {
    /// Appends a config file's tables (its `version` line dropped) to the generated config, e.g.
    /// the repository's `runtimeclass/containerd-config-v2.toml` (or `-v3.toml` when
    /// [`config_version`] is 3), to check that a shipped file works. (containerd 1.6's
    /// `imports` would replace the whole CRI plugin section.)
    pub fn append_config(mut self, path: &Path) -> Self {
        self.imports.push(path.to_owned());
        self
    }

    /// Adds a runtime handler (the first one is the default unless [`Self::default_handler`]).
    pub fn handler(mut self, h: RuntimeHandler) -> Self {
        self.handlers.push(h);
        self
    }

    /// The handler used when a pod names none.
    pub fn default_handler(mut self, name: &str) -> Self {
        self.default_handler = Some(name.to_owned());
        self
    }

    /// Sets an environment variable of containerd (and so of its shims).
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.env.insert(
            key.to_owned(),
            value.as_ref().to_string_lossy().into_owned(),
        );
        self
    }

    /// Puts `dir` first on containerd's PATH (where it finds `containerd-shim-*-v2`).
    pub fn path_dir(mut self, dir: &Path) -> Self {
        self.path_dirs.push(dir.to_owned());
        self
    }

    /// The sandbox image (default: [`images::pause_image`]); imported at start.
    pub fn sandbox_image(mut self, image: ImageBuilder) -> Self {
        self.sandbox_image = image;
        self
    }

    /// containerd's log level (default `debug`, so shim logs are kept).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_owned();
        self
    }

    /// A raw TOML line inside `[plugins."io.containerd.grpc.v1.cri"]` (config version 2) or
    /// `[plugins.'io.containerd.cri.v1.runtime']` (version 3).
    pub fn cri_line(mut self, line: &str) -> Self {
        self.extra_cri_toml.push(line.to_owned());
        self
    }

    /// Pod networking through CNI: plugins from `bin_dir`, network configs from `conf_dir`
    /// (default: empty private dirs, so pods must use the node's network).
    pub fn cni(mut self, bin_dir: &Path, conf_dir: &Path) -> Self {
        self.cni = Some((bin_dir.to_owned(), conf_dir.to_owned()));
        self
    }

    /// The CRI registry's `config_path`: containerd reads `DIR/<registry>/hosts.toml` (without
    /// it, 1.x and 2.0–2.2 pull from the registries themselves).
    pub fn registry_config_path(mut self, dir: &Path) -> Self {
        self.registry_config_path = Some(dir.to_owned());
        self
    }

    fn registry_table(&self, t: &mut String, plugin: &str) {
        if let Some(dir) = &self.registry_config_path {
            let _ = writeln!(
                t,
                "[plugins.{plugin}.registry]\n  config_path = {:?}",
                dir.display().to_string()
            );
        }
    }

    /// Writes config `version` (2 or 3) whatever [`containerd_binary`] is.
    pub fn config_version(mut self, version: u32) -> Self {
        self.config_version = Some(version);
        self
    }

    fn effective_config_version(&self) -> u32 {
        self.config_version.unwrap_or_else(config_version)
    }

    fn default_handler_name(&self) -> String {
        self.default_handler
            .clone()
            .or_else(|| self.handlers.first().map(|h| h.name.clone()))
            .unwrap_or_else(|| "runc".to_owned())
    }

    fn cni_dirs(&self, dir: &Path) -> (String, String) {
        match &self.cni {
            Some((bin, conf)) => (bin.display().to_string(), conf.display().to_string()),
            None => (
                dir.join("cni/bin").display().to_string(),
                dir.join("cni/conf").display().to_string(),
            ),
        }
    }

    fn imported_tables(&self, t: &mut String) {
        for path in &self.imports {
            let text = std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            for line in text
                .lines()
                .filter(|l| !l.trim_start().starts_with("version"))
            {
                let _ = writeln!(t, "{line}");
            }
        }
    }

    /// The config file for a root at `dir`: version 2 (containerd 1.6/1.7), 3 (2.0–2.2) or 4
    /// (2.3+), as [`config_version`] (or [`Self::config_version`]) says.
    pub fn config_toml(&self, dir: &Path) -> String {
        match self.effective_config_version() {
            0..=2 => self.config_toml_v2(dir),
            v => self.config_toml_v3(dir, v),
        }
    }

    /// The version 3 config (containerd 2.0–2.2): the same settings as
    /// [`Self::config_toml_v2`] under 2.x's plugin ids; with `version` 4 (2.3+), the server
    /// addresses are the `io.containerd.server.v1.*` plugins' (both set: version 4 no longer
    /// derives the TTRPC address from the gRPC one).
    pub fn config_toml_v3(&self, dir: &Path, version: u32) -> String {
        let mut t = String::new();
        let d = |p: &str| dir.join(p).display().to_string();
        let _ = writeln!(t, "version = {version}");
        let _ = writeln!(t, "root = {:?}", d("root"));
        let _ = writeln!(t, "state = {:?}", d("state"));
        let _ = writeln!(t, "temp = {:?}", d("tmp"));
        let _ = writeln!(
            t,
            "disabled_plugins = [\"io.containerd.internal.v1.opt\", \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.erofs\", \"io.containerd.tracing.processor.v1.otlp\"]"
        );
        if version >= 4 {
            let _ = writeln!(
                t,
                "[plugins.'io.containerd.server.v1.grpc']\n  address = {:?}",
                d("containerd.sock")
            );
            let _ = writeln!(
                t,
                "[plugins.'io.containerd.server.v1.ttrpc']\n  address = {:?}",
                d("containerd.sock.ttrpc")
            );
        } else {
            let _ = writeln!(t, "[grpc]\n  address = {:?}", d("containerd.sock"));
            let _ = writeln!(t, "[ttrpc]\n  address = {:?}", d("containerd.sock.ttrpc"));
        }
        let _ = writeln!(t, "[debug]\n  level = {:?}", self.log_level);
        // NRI (on by default in 2.x) listens on one socket per host: parallel containerds
        // would collide on it.
        let _ = writeln!(t, "[plugins.'io.containerd.nri.v1.nri']\n  disable = true");
        let _ = writeln!(t, "[plugins.'io.containerd.cri.v1.images']");
        let _ = writeln!(t, "  snapshotter = \"overlayfs\"");
        let _ = writeln!(t, "  [plugins.'io.containerd.cri.v1.images'.pinned_images]");
        let _ = writeln!(t, "    sandbox = {:?}", self.sandbox_image.name());
        let _ = writeln!(t, "[plugins.'io.containerd.grpc.v1.cri']");
        let _ = writeln!(t, "  stream_server_address = \"127.0.0.1\"");
        let _ = writeln!(t, "  stream_server_port = \"0\"");
        let _ = writeln!(t, "[plugins.'io.containerd.cri.v1.runtime']");
        let _ = writeln!(t, "  restrict_oom_score_adj = true");
        let _ = writeln!(t, "  disable_apparmor = true");
        for line in &self.extra_cri_toml {
            let _ = writeln!(t, "  {line}");
        }
        let (cni_bin, cni_conf) = self.cni_dirs(dir);
        let _ = writeln!(t, "  [plugins.'io.containerd.cri.v1.runtime'.cni]");
        let _ = writeln!(
            t,
            "    bin_dirs = [{cni_bin:?}]\n    conf_dir = {cni_conf:?}"
        );
        let _ = writeln!(t, "  [plugins.'io.containerd.cri.v1.runtime'.containerd]");
        let _ = writeln!(
            t,
            "    default_runtime_name = {:?}",
            self.default_handler_name()
        );
        self.runtime_tables(&mut t, "'io.containerd.cri.v1.runtime'");
        self.registry_table(&mut t, "'io.containerd.cri.v1.images'");
        self.imported_tables(&mut t);
        t
    }

    /// One `[plugins.PLUGIN.containerd.runtimes.NAME]` table (and its `options`) per handler.
    fn runtime_tables(&self, t: &mut String, plugin: &str) {
        let mut handlers = self.handlers.clone();
        if handlers.is_empty() {
            handlers.push(RuntimeHandler::runc());
        }
        for h in &handlers {
            let _ = writeln!(t, "    [plugins.{plugin}.containerd.runtimes.{:?}]", h.name);
            let _ = writeln!(t, "      runtime_type = {:?}", h.runtime_type);
            if !h.pod_annotations.is_empty() {
                let list: Vec<String> =
                    h.pod_annotations.iter().map(|a| format!("{a:?}")).collect();
                let _ = writeln!(t, "      pod_annotations = [{}]", list.join(", "));
            }
            if !h.options.is_empty() {
                let _ = writeln!(
                    t,
                    "      [plugins.{plugin}.containerd.runtimes.{:?}.options]",
                    h.name
                );
                for (k, v) in &h.options {
                    let _ = writeln!(t, "        {k} = {v}");
                }
            }
        }
    }

    /// The version 2 config (containerd 1.6/1.7).
    pub fn config_toml_v2(&self, dir: &Path) -> String {
        let mut t = String::new();
        let d = |p: &str| dir.join(p).display().to_string();
        let _ = writeln!(t, "version = 2");
        let _ = writeln!(t, "root = {:?}", d("root"));
        let _ = writeln!(t, "state = {:?}", d("state"));
        let _ = writeln!(t, "plugin_dir = {:?}", d("plugins"));
        let _ = writeln!(
            t,
            "disabled_plugins = [\"io.containerd.internal.v1.opt\", \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\", \"io.containerd.tracing.processor.v1.otlp\"]"
        );
        let _ = writeln!(t, "[grpc]\n  address = {:?}", d("containerd.sock"));
        let _ = writeln!(t, "[ttrpc]\n  address = {:?}", d("containerd.sock.ttrpc"));
        let _ = writeln!(t, "[debug]\n  level = {:?}", self.log_level);
        let _ = writeln!(t, "[plugins.\"io.containerd.grpc.v1.cri\"]");
        let _ = writeln!(t, "  sandbox_image = {:?}", self.sandbox_image.name());
        let _ = writeln!(t, "  restrict_oom_score_adj = true");
        let _ = writeln!(t, "  disable_apparmor = true");
        let _ = writeln!(t, "  stream_server_address = \"127.0.0.1\"");
        let _ = writeln!(t, "  stream_server_port = \"0\"");
        for line in &self.extra_cri_toml {
            let _ = writeln!(t, "  {line}");
        }
        let (cni_bin, cni_conf) = self.cni_dirs(dir);
        let _ = writeln!(t, "  [plugins.\"io.containerd.grpc.v1.cri\".cni]");
        let _ = writeln!(t, "    bin_dir = {cni_bin:?}\n    conf_dir = {cni_conf:?}");
        let _ = writeln!(t, "  [plugins.\"io.containerd.grpc.v1.cri\".containerd]");
        let _ = writeln!(t, "    snapshotter = \"overlayfs\"");
        let _ = writeln!(
            t,
            "    default_runtime_name = {:?}",
            self.default_handler_name()
        );
        self.runtime_tables(&mut t, "\"io.containerd.grpc.v1.cri\"");
        self.registry_table(&mut t, "\"io.containerd.grpc.v1.cri\"");
        self.imported_tables(&mut t);
        t
    }

    /// Starts containerd, waits until it serves, and imports the sandbox image.
    pub fn start(self) -> anyhow::Result<Containerd> {
        let dir = tempfile::Builder::new()
            .prefix("nixenv-containerd-")
            .tempdir()?;
        for sub in ["root", "state", "tmp", "cni/bin", "cni/conf", "plugins"] {
            std::fs::create_dir_all(dir.path().join(sub))?;
        }
        let config = dir.path().join("config.toml");
        std::fs::write(&config, self.config_toml(dir.path()))?;
        let log_path = dir.path().join("containerd.log");
        let log = File::create(&log_path)?;
        let mut path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .collect::<Vec<_>>();
        let mut first = self.path_dirs.clone();
        first.extend(containerd_dir());
        for (i, d) in first.into_iter().enumerate() {
            path.insert(i, d);
        }
        let mut cmd = Command::new(containerd_binary());
        cmd.arg("--config")
            .arg(&config)
            .env("PATH", std::env::join_paths(path)?)
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn()?;
        let mut c = Containerd {
            address: dir.path().join("containerd.sock"),
            log_path,
            child: Some(child),
            dir: Some(dir),
        };
        c.wait_ready()?;
        c.import(&self.sandbox_image)?;
        Ok(c)
    }
}

/// A running containerd; stopped and cleaned up on drop.
#[derive(Debug)]
pub struct Containerd {
    address: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
}

impl Containerd {
    /// A builder with the default sandbox image and no handlers (containerd's runc by default).
    pub fn builder() -> ContainerdBuilder {
        ContainerdBuilder {
            handlers: Vec::new(),
            default_handler: None,
            env: BTreeMap::new(),
            path_dirs: Vec::new(),
            sandbox_image: images::pause_image(),
            log_level: "debug".to_owned(),
            extra_cri_toml: Vec::new(),
            registry_config_path: None,
            imports: Vec::new(),
            cni: None,
            config_version: None,
        }
    }

    /// The gRPC socket (CRI and containerd API).
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The temp dir holding root, state, config and log.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/nonexistent"))
    }

    /// containerd's state dir (bundles live under `io.containerd.runtime.v2.task/`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// What containerd (and, through it, the shims) logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A `ctr` command against this containerd in the `k8s.io` namespace.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new(ctr_binary());
        cmd.arg("--address")
            .arg(&self.address)
            .args(["-n", K8S_NAMESPACE]);
        cmd
    }

    /// Builds `image` into an archive and imports it into the `k8s.io` namespace.
    pub fn import(&self, image: &ImageBuilder) -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let archive = image.write_archive(tmp.path())?;
        images::import(&self.address, K8S_NAMESPACE, &archive)?;
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    anyhow::bail!("containerd exited with {status}:\n{}", self.log());
                }
            }
            if self.address.exists() {
                let ok = self
                    .ctr()
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if ok {
                    // A config of another version than containerd expects is migrated in
                    // memory with a warning, and settings may silently move or go.
                    let log = self.log();
                    if let Some(line) = log.lines().find(|l| l.contains("migrated")) {
                        anyhow::bail!("containerd did not take its config as written: {line}");
                    }
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "containerd did not come up in {START_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pids of shim processes started by this containerd (their command line names its socket).
    pub fn shim_pids(&self) -> Vec<i32> {
        let needle = self.address.display().to_string();
        crate::pids_where(|args| {
            let is_shim = args.first().is_some_and(|a| a.contains("containerd-shim"));
            let ours = args
                .windows(2)
                .any(|w| w[0] == "-address" && w[1] == needle);
            is_shim && ours
        })
    }

    /// After every pod is gone: waits (10 s at most) for this containerd's shims to exit,
    /// then asserts that no runc container (in containerd's default runc root for `k8s.io`)
    /// and no mount outside containerd's root is left.
    pub async fn assert_clean(&self) {
        crate::wait_for("shims to exit", std::time::Duration::from_secs(10), || {
            self.shim_pids().is_empty()
        })
        .await;
        let root = Path::new("/run/containerd/runc/k8s.io");
        assert!(
            self.runc_containers(root).is_empty(),
            "runc containers left: {:?}",
            self.runc_containers(root)
        );
        let mounts: Vec<PathBuf> = self
            .mounts()
            .into_iter()
            .filter(|m| !m.starts_with(self.dir().join("root")))
            .collect();
        assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    }

    /// runc containers (in `root`) whose bundle lives under this containerd's state dir.
    pub fn runc_containers(&self, root: &Path) -> Vec<String> {
        let out = Command::new("runc")
            .arg("--root")
            .arg(root)
            .args(["list", "--format", "json"])
            .stderr(Stdio::null())
            .output();
        let Ok(out) = out else { return Vec::new() };
        let list: Vec<serde_json::Value> =
            serde_json::from_slice::<Option<Vec<serde_json::Value>>>(&out.stdout)
                .ok()
                .flatten()
                .unwrap_or_default();
        let state = self.state_dir();
        list.iter()
            .filter(|c| {
                c.get("bundle")
                    .and_then(|b| b.as_str())
                    .is_some_and(|b| Path::new(b).starts_with(&state))
            })
            .filter_map(|c| c.get("id").and_then(|i| i.as_str()).map(str::to_owned))
            .collect()
    }

    /// Mount points under this containerd's temp dir, deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        mounts_under(self.dir())
    }

    fn cleanup(&mut self) {
        let default_root = Path::new("/run/containerd/runc").join(K8S_NAMESPACE);
        // Shims first, so nothing restarts what we delete; then their sockets.
        let mut sockets = Vec::new();
        for pid in self.shim_pids() {
            if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                let args: Vec<String> = cmdline
                    .split(|&b| b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                if let Some(w) = args.windows(2).find(|w| w[0] == "-socket") {
                    sockets.push(PathBuf::from(w[1].trim_start_matches("unix://")));
                }
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for socket in sockets {
            let _ = std::fs::remove_file(socket);
        }
        for id in self.runc_containers(&default_root) {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&default_root)
                .args(["delete", "--force", &id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        for m in self.mounts() {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        // Shim sockets live in containerd's global socket dir; ours are named by our address.
        if let Some(dir) = self.dir.take() {
            if std::env::var_os("NIXENV_KEEP_CONTAINERD").is_some() {
                let kept = dir.keep();
                eprintln!("nixenv-testkit: kept containerd dir {}", kept.display());
            } else {
                let _ = dir.close();
            }
        }
    }
}

/// Mount points at or below `dir` (from `/proc/self/mountinfo`), deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    v.dedup();
    v
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_containerd() {
        assert_eq!(
            parse_version(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u1\n"
            ),
            Some((1, 6))
        );
        assert_eq!(
            parse_version("containerd github.com/containerd/containerd/v2 v2.1.5 v2.1.5\n"),
            Some((2, 1))
        );
        assert_eq!(
            parse_version("containerd github.com/containerd/containerd/v2 2.1.9+unknown \n"),
            Some((2, 1))
        );
        assert_eq!(parse_version("containerd\n"), None);
        assert_eq!(config_version_for((1, 7)), 2);
        assert_eq!(config_version_for((2, 2)), 3);
        assert_eq!(config_version_for((2, 3)), 4);
        assert_eq!(config_version_for((2, 4)), 4);
    }

    #[test]
    fn version_3_config_uses_the_2x_plugin_ids() {
        let b = Containerd::builder()
            .handler(RuntimeHandler::runc())
            .handler(RuntimeHandler::nixenv().option("BinaryName", "\"/x\""))
            .config_version(3);
        let t = b.config_toml(Path::new("/tmp/c"));
        assert!(t.starts_with("version = 3\n"), "{t}");
        assert!(t.contains("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.\"nixenv\"]\n      runtime_type = \"io.containerd.nixenv.v2\"\n      pod_annotations = [\"nix.dev/*\"]"), "{t}");
        assert!(t.contains("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.\"nixenv\".options]\n        BinaryName = \"/x\""), "{t}");
        assert!(t.contains("[plugins.'io.containerd.cri.v1.images'.pinned_images]\n    sandbox = \"docker.io/nixenv/pause:test\""), "{t}");
        assert!(t.contains("restrict_oom_score_adj = true"), "{t}");
        assert!(
            t.contains("[plugins.'io.containerd.nri.v1.nri']\n  disable = true"),
            "{t}"
        );
        assert!(t.contains("default_runtime_name = \"runc\""), "{t}");
        assert!(!t.contains("io.containerd.grpc.v1.cri\".containerd"), "{t}");
        assert!(
            t.contains("[grpc]\n  address = \"/tmp/c/containerd.sock\""),
            "{t}"
        );
        let v4 = b.clone().config_version(4).config_toml(Path::new("/tmp/c"));
        assert!(v4.starts_with("version = 4\n"), "{v4}");
        assert!(!v4.contains("[grpc]") && !v4.contains("[ttrpc]"), "{v4}");
        assert!(v4.contains("[plugins.'io.containerd.server.v1.ttrpc']\n  address = \"/tmp/c/containerd.sock.ttrpc\""), "{v4}");
        let v2 = b.config_version(2).config_toml(Path::new("/tmp/c"));
        assert!(
            v2.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.\"nixenv\"]"),
            "{v2}"
        );
    }
}
