//! `nixenv doctor`: checks a node end to end and says how to fix each finding.
//!
//! The checks read files directly and reach processes (`runc`, `ctr`, `podman`) through the
//! [`Host`] trait and the network through [`Fetch`], so they are testable without root.

pub mod containerd;
pub mod crio;

use std::path::{Path, PathBuf};
use std::process::Output;

use serde::Serialize;
use url::Url;

use crate::config::{Config, ConfigError};
use crate::fetch::{Fetch, FetchError, Scheme};
pub use crate::finding::{Finding, Status};

/// The image pods name as `empty:latest`.
pub const EMPTY_IMAGE: &str = "docker.io/library/empty:latest";
/// The runtime handler name (RuntimeClass `handler`).
pub const HANDLER: &str = "nixenv";
/// The annotation the runtime must receive.
pub const ANNOTATION: &str = crate::annotations::ENVIRONMENT_ANNOTATION;
/// containerd's runtime type for the nixenv shim.
pub const SHIM_RUNTIME_TYPE: &str = "io.containerd.nixenv.v2";

/// Where to look; every path is overridable so tests can point at a private containerd.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// nixenv's configuration file (`None`: `$NIXENV_CONFIG` or the default).
    pub config_path: Option<PathBuf>,
    pub containerd_config: PathBuf,
    /// containerd's socket (`None`: `[grpc] address` of its config, else the default).
    pub containerd_address: Option<PathBuf>,
    pub crio_config: PathBuf,
    pub crio_config_dir: PathBuf,
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions {
            config_path: None,
            containerd_config: PathBuf::from("/etc/containerd/config.toml"),
            containerd_address: None,
            crio_config: PathBuf::from("/etc/crio/crio.conf"),
            crio_config_dir: PathBuf::from("/etc/crio/crio.conf.d"),
        }
    }
}

/// The process edge: finding and running programs.
pub trait Host {
    /// `name` on PATH (or `name` itself when it contains a slash and exists).
    fn which(&self, name: &str) -> Option<PathBuf>;
    /// Runs a program to completion.
    fn run(&self, program: &Path, args: &[&str]) -> std::io::Result<Output>;
}

/// The real machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemHost;

impl Host for SystemHost {
    fn which(&self, name: &str) -> Option<PathBuf> {
        let is_exec = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        if name.contains('/') {
            let p = PathBuf::from(name);
            return is_exec(&p).then_some(p);
        }
        let path = std::env::var_os("PATH").unwrap_or_else(|| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        });
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| is_exec(p))
    }

    fn run(&self, program: &Path, args: &[&str]) -> std::io::Result<Output> {
        std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
    }
}

/// All findings of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether any check failed.
    pub fn failed(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.status == Status::Fail)
            .count()
    }

    /// The human-readable report: `ok|skip|warn|fail  check: message` and an indented fix.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for f in &self.findings {
            s.push_str(&format!(
                "{:<5} {}: {}\n",
                f.status.label(),
                f.check,
                f.message
            ));
            if let Some(fix) = &f.fix {
                s.push_str(&format!("      fix: {fix}\n"));
            }
        }
        s
    }
}

/// `url` with a trailing slash, so joins land below it.
fn as_directory(url: &Url) -> Url {
    let mut u = url.clone();
    if !u.path().ends_with('/') {
        let p = format!("{}/", u.path());
        u.set_path(&p);
    }
    u
}

fn first_line(out: &Output) -> String {
    let text = if out.stdout.is_empty() {
        &out.stderr
    } else {
        &out.stdout
    };
    String::from_utf8_lossy(text)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// Runs every check. The configuration is loaded here so that a bad config is a finding.
pub async fn run<H: Host, F: Fetch>(
    opts: &DoctorOptions,
    host: &H,
    fetch: impl FnOnce(&Config) -> Option<F>,
) -> Report {
    let mut r = Report::default();
    let cfg_path = opts
        .config_path
        .clone()
        .unwrap_or_else(Config::default_path);
    let loaded: Result<Config, ConfigError> = match &opts.config_path {
        Some(p) => Config::load_from(p),
        None => Config::load(),
    };
    let cfg = match loaded {
        Ok(c) => {
            let what = if cfg_path.exists() {
                format!("{} is valid", cfg_path.display())
            } else {
                format!("{} missing: using the defaults", cfg_path.display())
            };
            r.findings.push(Finding::ok("config", what));
            Some(c)
        }
        Err(e) => {
            r.findings.push(Finding::fail(
                "config",
                e.to_string(),
                format!(
                    "correct {} (see the commented defaults shipped in it)",
                    cfg_path.display()
                ),
            ));
            None
        }
    };
    r.findings.push(check_runc(cfg.as_ref(), host));
    r.findings.extend(check_binaries(host));
    let containerd_address = check_runtimes(opts, host, &mut r);
    r.findings
        .push(check_empty_image(host, containerd_address.as_deref()));
    if let Some(cfg) = &cfg {
        r.findings.push(check_state_dir(&cfg.state_dir));
        let probe = crate::gc::RuncProbe::new(cfg.runc.clone().unwrap_or_else(|| "runc".into()));
        r.findings
            .extend(crate::gc::doctor::store_checks(cfg, &probe));
        r.findings.push(check_keys(cfg));
        match fetch(cfg) {
            Some(f) => {
                for s in &cfg.substituters {
                    r.findings.push(check_cache(&f, s).await);
                }
                r.findings
                    .push(check_catalog(&f, cfg.catalog.as_ref()).await);
            }
            None => r.findings.push(Finding::fail(
                "network",
                "cannot set up the HTTP client (netrc-file unreadable?)",
                "check netrc-file in the config",
            )),
        }
    }
    r
}

fn check_runc<H: Host>(cfg: Option<&Config>, host: &H) -> Finding {
    let configured = cfg.and_then(|c| c.runc.clone());
    let name = configured
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "runc".into());
    let Some(path) = host.which(&name) else {
        return Finding::fail(
            "runc",
            format!("{name} not found"),
            "install runc (apt-get install runc), or set `runc` in the config to its path",
        );
    };
    match host.run(&path, &["--version"]) {
        Ok(out) if out.status.success() => {
            let v = first_line(&out);
            let version = v.strip_prefix("runc version ").unwrap_or(&v);
            Finding::ok("runc", format!("{} ({})", version, path.display()))
        }
        Ok(out) => Finding::fail(
            "runc",
            format!("{} --version failed: {}", path.display(), first_line(&out)),
            "reinstall runc",
        ),
        Err(e) => Finding::fail(
            "runc",
            format!("cannot run {}: {e}", path.display()),
            "reinstall runc",
        ),
    }
}

fn check_binaries<H: Host>(host: &H) -> Vec<Finding> {
    ["containerd-shim-nixenv-v2", "nixenv-runc", "nixenv-hook"]
        .iter()
        .map(|b| match host.which(b) {
            Some(p) => Finding::ok(*b, p.display().to_string()),
            None => Finding::fail(
                *b,
                "not found on PATH",
                "install the nixenv package (it puts the binaries in /usr/bin)",
            ),
        })
        .collect()
}

/// containerd and CRI-O; returns containerd's socket when containerd is configured.
fn check_runtimes<H: Host>(opts: &DoctorOptions, host: &H, r: &mut Report) -> Option<PathBuf> {
    let has_containerd = opts.containerd_config.exists() || host.which("containerd").is_some();
    let has_crio = host.which("crio").is_some()
        || std::fs::metadata(&opts.crio_config).is_ok() && host.which("crio").is_some();
    let mut configured = 0;
    let mut address = None;
    if has_containerd {
        let (f, addr) = check_containerd(opts, host);
        if f.status == Status::Ok {
            configured += 1;
        }
        address = addr;
        r.findings.push(f);
    } else {
        r.findings
            .push(Finding::skip("containerd", "not installed"));
    }
    if has_crio {
        let f = check_crio(opts, host);
        if f.status == Status::Ok {
            configured += 1;
        }
        r.findings.push(f);
    } else {
        r.findings.push(Finding::skip("cri-o", "not installed"));
    }
    if !has_containerd && !has_crio {
        r.findings.push(Finding::fail(
            "runtime",
            "neither containerd nor CRI-O is installed",
            "install containerd (apt-get install containerd) or CRI-O, then reinstall nixenv",
        ));
    } else if configured == 0 {
        r.findings.push(Finding::fail(
            "runtime",
            format!("no container runtime is configured for the `{HANDLER}` handler"),
            "see the containerd/cri-o findings above",
        ));
    }
    address
}

fn check_containerd<H: Host>(opts: &DoctorOptions, host: &H) -> (Finding, Option<PathBuf>) {
    let path = &opts.containerd_config;
    let check = "containerd";
    let reinstall = "run /usr/lib/nixenv/node-config install (or add the table from /usr/share/nixenv/containerd/), then restart containerd";
    if !path.exists() {
        let addr = opts.containerd_address.clone();
        return (
            Finding::fail(
                check,
                format!(
                    "{} missing: containerd runs with defaults and has no `{HANDLER}` runtime",
                    path.display()
                ),
                reinstall,
            ),
            addr,
        );
    }
    let cfg = match containerd::ContainerdConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            return (
                Finding::fail(
                    check,
                    e.to_string(),
                    "correct the file; `containerd config dump` shows what containerd reads",
                ),
                opts.containerd_address.clone(),
            )
        }
    };
    let address = opts
        .containerd_address
        .clone()
        .or_else(|| cfg.address.as_ref().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/run/containerd/containerd.sock"));
    let plugin = containerd::cri_plugin(cfg.version);
    let where_ = format!("{} (config version {})", path.display(), cfg.version);
    if cfg.version < 2 {
        return (
            Finding::fail(
                check,
                format!("{where_}: nixenv needs config version 2, 3 or 4"),
                "migrate it: containerd config migrate > new.toml, then reinstall nixenv",
            ),
            Some(address),
        );
    }
    if cfg.cri_disabled() {
        return (
            Finding::fail(
                check,
                format!("{where_}: the CRI plugin is disabled"),
                "remove \"cri\" from disabled_plugins",
            ),
            Some(address),
        );
    }
    let default_rt = cfg
        .plugins
        .get(plugin)
        .and_then(|p| p.get("containerd"))
        .and_then(|c| c.get("default_runtime_name"))
        .and_then(|v| v.as_str())
        .unwrap_or("runc")
        .to_owned();
    if cfg.version == 2 && cfg.runtime(HANDLER).is_some() && cfg.runtime(&default_rt).is_none() {
        return (
            Finding::fail(
                check,
                format!("{where_}: default_runtime_name {default_rt:?} has no runtime table: the CRI plugin will not load"),
                format!("add [plugins.\"{plugin}\".containerd.runtimes.{default_rt}] with runtime_type = \"io.containerd.runc.v2\""),
            ),
            Some(address),
        );
    }
    let Some(rt) = cfg.runtime(HANDLER) else {
        let mut msg = format!("{where_}: no runtime `{HANDLER}` under plugins.\"{plugin}\"");
        if let Some(src) = cfg.source_of(plugin).filter(|s| *s != path.as_path()) {
            if cfg.version == 2 {
                msg.push_str(&format!(
                    "; {} replaces the whole plugins.\"{plugin}\" section (containerd 1.x merges imports by section)",
                    src.display()
                ));
            }
        }
        return (Finding::fail(check, msg, reinstall), Some(address));
    };
    let rt_type = rt.runtime_type.as_deref().unwrap_or("");
    let via = if rt_type == SHIM_RUNTIME_TYPE {
        if host.which("containerd-shim-nixenv-v2").is_none() {
            return (
                Finding::fail(check, format!("{where_}: runtime `{HANDLER}` uses {SHIM_RUNTIME_TYPE} but containerd-shim-nixenv-v2 is not on PATH"), "install the nixenv package"),
                Some(address),
            );
        }
        "shim containerd-shim-nixenv-v2".to_owned()
    } else if rt_type == "io.containerd.runc.v2"
        && rt
            .binary_name
            .as_deref()
            .is_some_and(|b| b.ends_with("nixenv-runc"))
    {
        format!(
            "runc shim with BinaryName {}",
            rt.binary_name.as_deref().unwrap_or("")
        )
    } else {
        return (
            Finding::fail(
                check,
                format!("{where_}: runtime `{HANDLER}` has runtime_type {rt_type:?}, which does not run nixenv"),
                format!("set runtime_type = \"{SHIM_RUNTIME_TYPE}\" (or io.containerd.runc.v2 with options.BinaryName = \"/usr/bin/nixenv-runc\")"),
            ),
            Some(address),
        );
    };
    if !containerd::passes(&rt.pod_annotations, ANNOTATION) {
        return (
            Finding::fail(
                check,
                format!("{where_}: runtime `{HANDLER}` does not pass the {ANNOTATION} annotation (pod_annotations = {:?})", rt.pod_annotations),
                "add pod_annotations = [\"nix.dev/*\"] to the runtime, then restart containerd",
            ),
            Some(address),
        );
    }
    (
        Finding::ok(
            check,
            format!("{where_}: runtime `{HANDLER}` via {via}, nix.dev/* annotations passed"),
        ),
        Some(address),
    )
}

fn check_crio<H: Host>(opts: &DoctorOptions, host: &H) -> Finding {
    let check = "cri-o";
    let cfg = match crio::CrioConfig::load(&opts.crio_config, &opts.crio_config_dir) {
        Ok(c) => c,
        Err(e) => return Finding::fail(check, e.to_string(), "correct the file"),
    };
    let fix =
        "install /etc/crio/crio.conf.d/10-nixenv.conf from the nixenv package, then restart crio";
    let Some(rt) = cfg.runtime(HANDLER) else {
        return Finding::fail(
            check,
            format!(
                "no [crio.runtime.runtimes.{HANDLER}] in {} or {}",
                opts.crio_config.display(),
                opts.crio_config_dir.display()
            ),
            fix,
        );
    };
    let src = rt.defined_in.display().to_string();
    let path = rt.runtime_path.clone().unwrap_or_default();
    if let Some(r) = crio::rejections(&rt, |p| host.which(p).is_some())
        .into_iter()
        .next()
    {
        let fix = match r {
            crio::Rejection::Annotation(_) => {
                "remove allowed_annotations from the handler (CRI-O passes pod annotations to the runtime anyway), then restart crio"
            }
            crio::Rejection::MonitorPath(_) => {
                "remove monitor_path (CRI-O then finds conmon on its PATH) or point it at conmon, then restart crio"
            }
            crio::Rejection::RuntimePath(_) => "install the nixenv package",
            crio::Rejection::RuntimeType(_) => "set runtime_type = \"oci\", then restart crio",
        };
        return Finding::fail(check, format!("{src}: {r}"), fix);
    }
    if !path.ends_with("nixenv-runc") {
        return Finding::fail(
            check,
            format!("{src}: runtime_path is {path:?}, not nixenv-runc"),
            "set runtime_path = \"/usr/bin/nixenv-runc\"",
        );
    }
    if !matches!(rt.runtime_type.as_deref(), None | Some("" | "oci")) {
        return Finding::fail(
            check,
            format!(
                "{src}: runtime_type is {:?}: nixenv-runc is an oci runtime",
                rt.runtime_type.as_deref().unwrap_or_default()
            ),
            "set runtime_type = \"oci\", then restart crio",
        );
    }
    Finding::ok(
        check,
        format!("{src}: runtime `{HANDLER}` via {path}, pod annotations passed to it"),
    )
}

fn check_empty_image<H: Host>(host: &H, address: Option<&Path>) -> Finding {
    let check = "empty image";
    let import = "ctr -n k8s.io images import /usr/share/nixenv/empty-image.tar";
    let Some(addr) = address else {
        return Finding::skip(check, "containerd not configured");
    };
    let Some(ctr) = host.which("ctr") else {
        return Finding::warn(
            check,
            "ctr not found: cannot list containerd's images",
            "install containerd's ctr",
        );
    };
    if !addr.exists() {
        return Finding::warn(
            check,
            format!("containerd is not running ({} missing)", addr.display()),
            format!("start containerd, then: {import}"),
        );
    }
    let a = addr.display().to_string();
    match host.run(
        &ctr,
        &["--address", &a, "-n", "k8s.io", "images", "ls", "-q"],
    ) {
        Ok(out) if out.status.success() => {
            let listed = String::from_utf8_lossy(&out.stdout);
            if listed.lines().any(|l| l.trim() == EMPTY_IMAGE) {
                Finding::ok(
                    check,
                    format!("{EMPTY_IMAGE} present in containerd (k8s.io)"),
                )
            } else {
                Finding::fail(
                    check,
                    format!("{EMPTY_IMAGE} missing from containerd (k8s.io)"),
                    import,
                )
            }
        }
        Ok(out) => Finding::warn(
            check,
            format!("ctr images ls failed: {}", first_line(&out)),
            format!("check containerd at {a}"),
        ),
        Err(e) => Finding::warn(
            check,
            format!("cannot run {}: {e}", ctr.display()),
            "reinstall containerd",
        ),
    }
}

fn check_state_dir(dir: &Path) -> Finding {
    let check = "state dir";
    let fix = format!(
        "create {} writable by root, or set state-dir in the config",
        dir.display()
    );
    let existing = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    let probe = existing.join(format!(".nixenv-doctor-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            if existing == dir {
                Finding::ok(check, format!("{} writable", dir.display()))
            } else {
                Finding::ok(
                    check,
                    format!(
                        "{} will be created under {}",
                        dir.display(),
                        existing.display()
                    ),
                )
            }
        }
        Err(e) => Finding::fail(
            check,
            format!("{} not writable: {e}", existing.display()),
            fix,
        ),
    }
}

fn check_keys(cfg: &Config) -> Finding {
    let check = "trusted keys";
    if !cfg.require_sigs {
        return Finding::warn(
            check,
            "require-sigs = false: unsigned store paths are accepted",
            "set require-sigs = true and list the caches' keys in trusted-public-keys",
        );
    }
    if cfg.trusted_public_keys.is_empty() {
        return Finding::fail(
            check,
            "trusted-public-keys is empty: no narinfo can be accepted",
            "add the binary caches' public keys (name:base64) to trusted-public-keys",
        );
    }
    let names: Vec<&str> = cfg
        .trusted_public_keys
        .iter()
        .map(|k| k.split(':').next().unwrap_or(k))
        .collect();
    Finding::ok(
        check,
        format!("{} key(s): {}", names.len(), names.join(", ")),
    )
}

async fn check_cache<F: Fetch>(fetch: &F, cache: &Url) -> Finding {
    let check = format!("cache {cache}");
    let url = match as_directory(cache).join("nix-cache-info") {
        Ok(u) => u,
        Err(e) => return Finding::fail(check, format!("bad URL: {e}"), "correct substituters"),
    };
    match fetch.get_bytes(&url, 64 << 10).await {
        Ok(body) => {
            let text = String::from_utf8_lossy(&body);
            let store = text
                .lines()
                .find_map(|l| l.strip_prefix("StoreDir:"))
                .map(str::trim)
                .unwrap_or("");
            if store == "/nix/store" {
                Finding::ok(check, "nix-cache-info: StoreDir /nix/store")
            } else {
                Finding::fail(
                    check,
                    format!("nix-cache-info has StoreDir {store:?}, not /nix/store"),
                    "use a cache of /nix/store paths",
                )
            }
        }
        Err(FetchError::NotFound { .. }) => Finding::fail(
            check,
            format!("{url}: not found: not a Nix binary cache"),
            "correct substituters",
        ),
        Err(e) => Finding::fail(
            check,
            format!("unreachable: {e}"),
            "check the URL, the network and netrc-file",
        ),
    }
}

async fn check_catalog<F: Fetch>(fetch: &F, catalog: Option<&Url>) -> Finding {
    let check = "catalog";
    let Some(catalog) = catalog else {
        return Finding::warn(
            check,
            "no catalog: only /nix/store/... references work",
            "set catalog in the config",
        );
    };
    if Scheme::of(catalog) == Some(Scheme::File) {
        return match catalog.to_file_path() {
            Ok(p) if p.is_dir() => Finding::ok(check, format!("{catalog}: directory present")),
            _ => Finding::fail(
                check,
                format!("{catalog}: no such directory"),
                "correct catalog",
            ),
        };
    }
    let base = as_directory(catalog);
    match fetch.get_bytes(&base, 1 << 20).await {
        Ok(_) => Finding::ok(check, format!("{catalog}: reachable")),
        Err(FetchError::NotFound { .. })
        | Err(FetchError::Status { .. })
        | Err(FetchError::TooLarge { .. }) => {
            Finding::ok(check, format!("{catalog}: reachable (server answers)"))
        }
        Err(e) => Finding::fail(
            check,
            format!("unreachable: {e}"),
            "check the URL, the network and netrc-file",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    struct FakeHost {
        found: Vec<&'static str>,
        runc_version: &'static str,
    }

    impl Host for FakeHost {
        fn which(&self, name: &str) -> Option<PathBuf> {
            let base = name.rsplit('/').next().unwrap_or(name);
            self.found
                .contains(&base)
                .then(|| PathBuf::from("/usr/bin").join(base))
        }
        fn run(&self, _program: &Path, _args: &[&str]) -> std::io::Result<Output> {
            Ok(Output {
                status: std::process::ExitStatus::from_raw(0),
                stdout: self.runc_version.as_bytes().to_vec(),
                stderr: Vec::new(),
            })
        }
    }

    #[test]
    fn runc_version_is_reported() {
        let h = FakeHost {
            found: vec!["runc"],
            runc_version: "runc version 1.1.5+ds1\ncommit: x\n",
        };
        let f = check_runc(None, &h);
        assert_eq!(f.status, Status::Ok);
        assert_eq!(f.message, "1.1.5+ds1 (/usr/bin/runc)");
        let h = FakeHost {
            found: vec![],
            runc_version: "",
        };
        assert_eq!(check_runc(None, &h).status, Status::Fail);
    }

    #[test]
    fn containerd_without_annotations_fails_with_fix() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.toml");
        std::fs::write(&p, "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nixenv]\nruntime_type = \"io.containerd.nixenv.v2\"\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\nruntime_type = \"io.containerd.runc.v2\"\n").unwrap();
        let opts = DoctorOptions {
            containerd_config: p,
            ..Default::default()
        };
        let h = FakeHost {
            found: vec!["containerd-shim-nixenv-v2"],
            runc_version: "",
        };
        let (f, addr) = check_containerd(&opts, &h);
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(f.message.contains("nix.dev/environment"), "{}", f.message);
        assert!(f.fix.unwrap().contains("pod_annotations"));
        assert_eq!(
            addr.unwrap(),
            PathBuf::from("/run/containerd/containerd.sock")
        );
    }

    #[test]
    fn crio_checks_what_crio_itself_checks() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("crio.conf.d");
        std::fs::create_dir(&dir).unwrap();
        let opts = DoctorOptions {
            crio_config: d.path().join("crio.conf"),
            crio_config_dir: dir.clone(),
            ..Default::default()
        };
        let h = FakeHost {
            found: vec!["nixenv-runc"],
            runc_version: "",
        };
        let f = check_crio(&opts, &h);
        assert_eq!(f.status, Status::Fail);
        assert!(
            f.message.contains("no [crio.runtime.runtimes.nixenv]"),
            "{}",
            f.message
        );

        // The shipped drop-in passes, without allowed_annotations or monitor_path.
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtimeclass/crio-nixenv.conf"),
            dir.join("10-nixenv.conf"),
        )
        .unwrap();
        let f = check_crio(&opts, &h);
        assert_eq!(f.status, Status::Ok, "{f:?}");

        // A later drop-in adding what CRI-O rejects: one line naming the file and the cause.
        let later = dir.join("20-local.conf");
        std::fs::write(
            &later,
            "[crio.runtime.runtimes.nixenv]\nallowed_annotations = [\"nix.dev/environment\"]\n",
        )
        .unwrap();
        let f = check_crio(&opts, &h);
        assert_eq!(f.status, Status::Fail);
        assert_eq!(
            f.message,
            format!("{}: allowed_annotations holds \"nix.dev/environment\", which is not a CRI-O annotation: CRI-O ignores the handler", later.display())
        );
        assert!(f.fix.unwrap().contains("remove allowed_annotations"));
        std::fs::write(
            &later,
            "[crio.runtime.runtimes.nixenv]\nmonitor_path = \"/usr/libexec/crio/conmon\"\n",
        )
        .unwrap();
        let f = check_crio(&opts, &h);
        assert!(
            f.message.ends_with(
                "monitor_path /usr/libexec/crio/conmon does not exist: CRI-O does not start"
            ),
            "{}",
            f.message
        );
        let with_conmon = FakeHost {
            found: vec!["nixenv-runc", "conmon"],
            runc_version: "",
        };
        assert_eq!(check_crio(&opts, &with_conmon).status, Status::Ok);
    }

    #[test]
    fn keys_and_state_dir() {
        let mut cfg = Config::default();
        assert_eq!(check_keys(&cfg).status, Status::Fail);
        cfg.trusted_public_keys = vec!["test-1:abc".into()];
        assert_eq!(check_keys(&cfg).message, "1 key(s): test-1");
        cfg.require_sigs = false;
        assert_eq!(check_keys(&cfg).status, Status::Warn);
        let d = tempfile::tempdir().unwrap();
        assert_eq!(check_state_dir(d.path()).status, Status::Ok);
        assert!(check_state_dir(&d.path().join("a/b"))
            .message
            .contains("will be created"));
    }

    #[test]
    fn render_shows_fix_lines() {
        let r = Report {
            findings: vec![
                Finding::ok("runc", "1.1.5"),
                Finding::fail("catalog", "unreachable", "check the URL"),
            ],
        };
        assert_eq!(r.failed(), 1);
        assert_eq!(
            r.render(),
            "ok    runc: 1.1.5\nfail  catalog: unreachable\n      fix: check the URL\n"
        );
    }
}
