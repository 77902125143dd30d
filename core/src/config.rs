//! `config.toml`: kebab-case keys like nix.conf; an unknown key or a bad value is an error naming it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::fetch::scheme::Scheme;

/// Where the configuration is read from when `$NIXENV_CONFIG` is unset.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nixenv/config.toml";
/// Default `state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nixenv";

/// Default `max-lock-size`: 16 MiB, about 250,000 store paths.
pub const DEFAULT_MAX_LOCK_SIZE: u64 = 16 << 20;

/// What to do when the catalog cannot be reached while resolving `org/app` (current generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CatalogOffline {
    /// Use the last known current lock, with a warning.
    #[default]
    UseCached,
    /// Fail the container.
    Fail,
}

/// How the store makes an unpacked path durable before it appears (`store-durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreDurability {
    /// One `syncfs(2)` of the store's file system per path.
    #[default]
    Syncfs,
    /// One fsync per file and directory (slow for many small files; flushes nothing else).
    Fsync,
}

/// Hosts an HTTP redirect may lead to besides the requested URL's own origin
/// (`allowed-redirect-hosts`): a list applies to every substituter and the catalog, a table
/// maps a substituter's (or the catalog's) URL to the hosts allowed for requests to its origin.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowedRedirectHosts {
    /// Hosts allowed whatever was requested, normalised (`bucket.s3.example.com`, `[::1]`).
    pub everywhere: Vec<String>,
    /// Hosts allowed only for requests to that origin.
    pub per_origin: Vec<(url::Origin, Vec<String>)>,
}

impl AllowedRedirectHosts {
    /// The hosts a request for `url` may be redirected to (besides its own origin).
    pub fn for_origin<'a>(&'a self, url: &Url) -> impl Iterator<Item = &'a str> + 'a {
        let origin = url.origin();
        self.everywhere
            .iter()
            .chain(
                self.per_origin
                    .iter()
                    .filter(move |(o, _)| *o == origin)
                    .flat_map(|(_, hosts)| hosts.iter()),
            )
            .map(String::as_str)
    }
}

/// The node's configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Base URL of the environment catalog (`https://`, `http://`, `file://`).
    pub catalog: Option<Url>,
    /// Binary caches, tried in order.
    pub substituters: Vec<Url>,
    /// `name:base64` ed25519 public keys.
    pub trusted_public_keys: Vec<String>,
    /// Whether narinfos must carry a signature from a trusted key.
    pub require_sigs: bool,
    /// Root of nixenv's state: `store/`, pins, caches.
    pub state_dir: PathBuf,
    /// netrc file with credentials for private caches and catalogs.
    pub netrc_file: Option<PathBuf>,
    /// The real runc; `None` means `runc` on PATH.
    pub runc: Option<PathBuf>,
    /// Behaviour when the catalog is unreachable.
    pub catalog_offline: CatalogOffline,
    /// The node's Nix system (`x86_64-linux`, `aarch64-linux`); defaults to this machine's.
    pub system: String,
    /// Parallel HTTP requests (narinfo walk and NAR downloads).
    pub http_connections: usize,
    /// Timeout to connect to a cache or catalog.
    pub connect_timeout: Duration,
    /// Timeout without progress on a request (a stalled server).
    pub stall_timeout: Duration,
    /// Bytes per second a NAR download must average over each `transfer_rate_window`.
    pub min_transfer_rate: u64,
    /// The window over which `min_transfer_rate` is measured.
    pub transfer_rate_window: Duration,
    /// A NAR request must end within this plus NarSize / `min_transfer_rate`.
    pub nar_timeout_base: Duration,
    /// A narinfo request must end within this; then the next substituter is asked.
    pub narinfo_timeout: Duration,
    /// Hosts HTTP redirects may lead to besides the requested origin.
    pub allowed_redirect_hosts: AllowedRedirectHosts,
    /// Attempts per request for retryable failures (5xx, resets), including the first.
    pub download_attempts: u32,
    /// Largest lock read from the catalog, in bytes; reading stops there.
    pub max_lock_size: u64,
    /// How an install is made durable before its commit rename.
    pub store_durability: StoreDurability,
    /// Give each container its closure as one bind mount of a per-closure view
    /// (`closure-views`, default true) instead of one bind mount per store path.
    pub closure_views: bool,
    /// `nixenv gc`: keep paths used within this long.
    pub gc_keep_since: Option<Duration>,
    /// `nixenv gc`: shrink the store below this many bytes.
    pub gc_max_size: Option<u64>,
}

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: bad value for `{key}`: {value:?}: {reason}")]
    BadValue {
        path: PathBuf,
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// A list given either as a TOML array or, like nix.conf, as one whitespace-separated string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ListOrWords {
    List(Vec<String>),
    Words(String),
}

impl ListOrWords {
    fn into_vec(self) -> Vec<String> {
        match self {
            ListOrWords::List(v) => v,
            ListOrWords::Words(s) => s.split_whitespace().map(str::to_owned).collect(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    catalog: Option<String>,
    substituters: Option<ListOrWords>,
    trusted_public_keys: Option<ListOrWords>,
    require_sigs: Option<bool>,
    state_dir: Option<PathBuf>,
    netrc_file: Option<PathBuf>,
    runc: Option<PathBuf>,
    catalog_offline: Option<CatalogOffline>,
    system: Option<String>,
    http_connections: Option<i64>,
    connect_timeout: Option<String>,
    stall_timeout: Option<String>,
    download_attempts: Option<i64>,
    allowed_redirect_hosts: Option<toml::Value>,
    min_transfer_rate: Option<String>,
    transfer_rate_window: Option<String>,
    nar_timeout_base: Option<String>,
    narinfo_timeout: Option<String>,
    max_lock_size: Option<String>,
    store_durability: Option<String>,
    closure_views: Option<bool>,
    gc_keep_since: Option<String>,
    gc_max_size: Option<String>,
}

/// This machine's Nix system name.
pub fn native_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            catalog: None,
            substituters: Vec::new(),
            trusted_public_keys: Vec::new(),
            require_sigs: true,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            netrc_file: None,
            runc: None,
            catalog_offline: CatalogOffline::UseCached,
            system: native_system(),
            http_connections: 32,
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(60),
            download_attempts: 5,
            min_transfer_rate: 64 << 10,
            transfer_rate_window: Duration::from_secs(30),
            nar_timeout_base: Duration::from_secs(60),
            narinfo_timeout: Duration::from_secs(30),
            allowed_redirect_hosts: AllowedRedirectHosts::default(),
            max_lock_size: DEFAULT_MAX_LOCK_SIZE,
            store_durability: StoreDurability::Syncfs,
            closure_views: true,
            gc_keep_since: None,
            gc_max_size: None,
        }
    }
}

impl Config {
    /// The path named by `$NIXENV_CONFIG`, or the default.
    pub fn default_path() -> PathBuf {
        std::env::var_os("NIXENV_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
    }

    /// Loads `$NIXENV_CONFIG` or `/etc/nixenv/config.toml`. A missing default file gives the defaults;
    /// a missing file named by `$NIXENV_CONFIG` is an error.
    pub fn load() -> Result<Config, ConfigError> {
        let explicit = std::env::var_os("NIXENV_CONFIG").is_some_and(|v| !v.is_empty());
        let path = Self::default_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_toml_str(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// Loads a given file.
    pub fn load_from(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and validates TOML text; `path` only names the file in errors.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: one_line_toml_error(&e, text),
        })?;
        let bad = |key: &'static str, value: &str, reason: String| ConfigError::BadValue {
            path: path.to_owned(),
            key,
            value: value.to_owned(),
            reason,
        };
        let mut cfg = Config::default();
        if let Some(c) = raw.catalog {
            cfg.catalog = Some(parse_url(&c).map_err(|r| bad("catalog", &c, r))?);
        }
        if let Some(list) = raw.substituters {
            cfg.substituters = list
                .into_vec()
                .iter()
                .map(|s| parse_url(s).map_err(|r| bad("substituters", s, r)))
                .collect::<Result<_, _>>()?;
        }
        if let Some(keys) = raw.trusted_public_keys {
            cfg.trusted_public_keys = keys.into_vec();
            for k in &cfg.trusted_public_keys {
                crate::nix::PublicKey::parse(k)
                    .map_err(|e| bad("trusted-public-keys", k, e.to_string()))?;
            }
        }
        if let Some(v) = raw.require_sigs {
            cfg.require_sigs = v;
        }
        if let Some(v) = raw.closure_views {
            cfg.closure_views = v;
        }
        if let Some(d) = raw.state_dir {
            if !d.is_absolute() {
                return Err(bad(
                    "state-dir",
                    &d.display().to_string(),
                    "must be an absolute path".into(),
                ));
            }
            cfg.state_dir = d;
        }
        cfg.netrc_file = raw.netrc_file;
        cfg.runc = raw.runc;
        if let Some(o) = raw.catalog_offline {
            cfg.catalog_offline = o;
        }
        if let Some(s) = raw.system {
            if !s.contains('-') || s.chars().any(|c| c.is_whitespace()) {
                return Err(bad(
                    "system",
                    &s,
                    "expected a Nix system like x86_64-linux".into(),
                ));
            }
            cfg.system = s;
        }
        if let Some(n) = raw.http_connections {
            if !(1..=1024).contains(&n) {
                return Err(bad(
                    "http-connections",
                    &n.to_string(),
                    "must be 1 to 1024".into(),
                ));
            }
            cfg.http_connections = n as usize;
        }
        if let Some(n) = raw.download_attempts {
            if !(1..=100).contains(&n) {
                return Err(bad(
                    "download-attempts",
                    &n.to_string(),
                    "must be 1 to 100".into(),
                ));
            }
            cfg.download_attempts = n as u32;
        }
        if let Some(v) = raw.allowed_redirect_hosts {
            cfg.allowed_redirect_hosts = parse_redirect_hosts(&v)
                .map_err(|(value, r)| bad("allowed-redirect-hosts", &value, r))?;
        }
        let duration = |key: &'static str, v: &str| {
            humantime::parse_duration(v).map_err(|e| bad(key, v, e.to_string()))
        };
        if let Some(v) = raw.connect_timeout {
            cfg.connect_timeout = duration("connect-timeout", &v)?;
        }
        if let Some(v) = raw.stall_timeout {
            cfg.stall_timeout = duration("stall-timeout", &v)?;
        }
        let positive = |key: &'static str, v: &str| {
            let d = duration(key, v)?;
            if d.is_zero() {
                return Err(bad(key, v, "must be more than zero".into()));
            }
            Ok(d)
        };
        if let Some(v) = raw.min_transfer_rate {
            cfg.min_transfer_rate = parse_size(&v).map_err(|r| bad("min-transfer-rate", &v, r))?;
        }
        if let Some(v) = raw.transfer_rate_window {
            cfg.transfer_rate_window = positive("transfer-rate-window", &v)?;
        }
        if let Some(v) = raw.nar_timeout_base {
            cfg.nar_timeout_base = positive("nar-timeout-base", &v)?;
        }
        if let Some(v) = raw.narinfo_timeout {
            cfg.narinfo_timeout = positive("narinfo-timeout", &v)?;
        }
        if let Some(v) = raw.max_lock_size {
            cfg.max_lock_size = match parse_size(&v) {
                Ok(0) => return Err(bad("max-lock-size", &v, "must be more than zero".into())),
                Ok(n) => n,
                Err(r) => return Err(bad("max-lock-size", &v, r)),
            };
        }
        if let Some(v) = raw.store_durability {
            cfg.store_durability = match v.as_str() {
                "syncfs" => StoreDurability::Syncfs,
                "fsync" => StoreDurability::Fsync,
                _ => {
                    return Err(bad(
                        "store-durability",
                        &v,
                        "expected \"syncfs\" or \"fsync\"".into(),
                    ))
                }
            };
        }
        if let Some(v) = raw.gc_keep_since {
            cfg.gc_keep_since = Some(duration("gc-keep-since", &v)?);
        }
        if let Some(v) = raw.gc_max_size {
            cfg.gc_max_size = Some(parse_size(&v).map_err(|r| bad("gc-max-size", &v, r))?);
        }
        if cfg.require_sigs && !cfg.substituters.is_empty() && cfg.trusted_public_keys.is_empty() {
            return Err(bad(
                "trusted-public-keys",
                "",
                "empty while require-sigs = true: no narinfo could be accepted".into(),
            ));
        }
        Ok(cfg)
    }

    /// `{state-dir}/store`.
    pub fn store_dir(&self) -> PathBuf {
        self.state_dir.join("store")
    }
}

fn parse_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| e.to_string())?;
    match Scheme::of(&url) {
        Some(Scheme::S3) => crate::fetch::s3::S3Location::from_url(&url)
            .map(|_| url)
            .map_err(|e| e.to_string()),
        Some(_) => Ok(url),
        None => Err(format!(
            "unsupported scheme {:?} (use {})",
            url.scheme(),
            Scheme::SUPPORTED
        )),
    }
}

/// `allowed-redirect-hosts`: a list of hosts, or a table from cache URL to a list of hosts.
/// On error, the offending value and why.
fn parse_redirect_hosts(v: &toml::Value) -> Result<AllowedRedirectHosts, (String, String)> {
    let hosts = |v: &toml::Value| -> Result<Vec<String>, (String, String)> {
        let toml::Value::Array(items) = v else {
            return Err((v.to_string(), "expected a list of host names".into()));
        };
        items
            .iter()
            .map(|item| {
                let toml::Value::String(h) = item else {
                    return Err((item.to_string(), "expected a host name".into()));
                };
                let bad = || {
                    (
                        h.clone(),
                        "expected a host name or IP address, without scheme, port or path"
                            .to_string(),
                    )
                };
                if h.is_empty() || h.contains(['/', '@', '*']) || h.chars().any(char::is_whitespace)
                {
                    return Err(bad());
                }
                // A host with a port ("h:1") parses as an opaque host only in brackets-free
                // form; refuse it explicitly.
                if !h.starts_with('[') && h.contains(':') {
                    return Err(bad());
                }
                url::Host::parse(h)
                    .map(|h| h.to_string())
                    .map_err(|_| bad())
            })
            .collect()
    };
    let mut out = AllowedRedirectHosts::default();
    match v {
        toml::Value::Array(_) => out.everywhere = hosts(v)?,
        toml::Value::Table(t) => {
            for (from, list) in t {
                let url = Url::parse(from).map_err(|e| (from.clone(), e.to_string()))?;
                if Scheme::of(&url) != Some(Scheme::Http) {
                    return Err((
                        from.clone(),
                        "expected an http:// or https:// cache URL".into(),
                    ));
                }
                out.per_origin.push((url.origin(), hosts(list)?));
            }
        }
        other => {
            return Err((
                other.to_string(),
                "expected a list of hosts or a table from cache URL to hosts".into(),
            ))
        }
    }
    Ok(out)
}

/// Parses `10G`, `512M`, `2048`, `1.5T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| "expected a size like 20G or 512M".to_string())?;
    let mult: u64 = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?} (use K, M, G or T)")),
    };
    if !n.is_finite() || n < 0.0 {
        return Err("expected a non-negative size".into());
    }
    Ok((n * mult as f64) as u64)
}

fn one_line_toml_error(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {msg}")
        }
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "nixenv-test-1:M/+03bQKDGjXB81brne1JroBlsoUhoaNf/BuQJLRYAs=";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("/etc/nixenv/config.toml"))
    }

    #[test]
    fn defaults_and_full_config() {
        assert_eq!(parse("").unwrap(), Config::default());
        let cfg = parse(&format!(
            r#"
            catalog = "https://catalog.example.org/envs"
            substituters = "http://127.0.0.1:8080 file:///srv/cache"
            trusted-public-keys = ["{KEY}"]
            state-dir = "/var/lib/nixenv-test"
            netrc-file = "/etc/nixenv/netrc"
            http-connections = 8
            connect-timeout = "2s"
            stall-timeout = "1m"
            download-attempts = 2
            gc-max-size = "20G"
            allowed-redirect-hosts = ["Bucket.S3.example.com", "[::1]"]
            min-transfer-rate = "1M"
            transfer-rate-window = "10s"
            nar-timeout-base = "2m"
            narinfo-timeout = "5s"
            max-lock-size = "2M"
            store-durability = "fsync"
            closure-views = false
            "#
        ))
        .unwrap();
        assert_eq!(cfg.substituters.len(), 2);
        assert_eq!(cfg.substituters[1].scheme(), "file");
        assert_eq!(cfg.store_dir(), Path::new("/var/lib/nixenv-test/store"));
        assert_eq!(cfg.http_connections, 8);
        assert_eq!(cfg.connect_timeout, Duration::from_secs(2));
        assert_eq!(cfg.stall_timeout, Duration::from_secs(60));
        assert_eq!(cfg.download_attempts, 2);
        assert_eq!(cfg.gc_max_size, Some(20 << 30));
        assert!(cfg.require_sigs);
        assert_eq!(cfg.min_transfer_rate, 1 << 20);
        assert_eq!(cfg.transfer_rate_window, Duration::from_secs(10));
        assert_eq!(cfg.nar_timeout_base, Duration::from_secs(120));
        assert_eq!(cfg.narinfo_timeout, Duration::from_secs(5));
        assert_eq!(Config::default().min_transfer_rate, 65536);
        assert_eq!(cfg.max_lock_size, 2 << 20);
        assert_eq!(Config::default().max_lock_size, 16 << 20);
        assert_eq!(cfg.store_durability, StoreDurability::Fsync);
        assert_eq!(Config::default().store_durability, StoreDurability::Syncfs);
        assert!(!cfg.closure_views);
        assert!(Config::default().closure_views);
        assert_eq!(
            cfg.allowed_redirect_hosts.everywhere,
            ["bucket.s3.example.com", "[::1]"]
        );
        let cfg = parse(
            r#"
            [allowed-redirect-hosts]
            "https://cache.example.com/nix" = ["bucket.s3.example.com"]
            "#,
        )
        .unwrap();
        let hosts = |u: &str| {
            cfg.allowed_redirect_hosts
                .for_origin(&Url::parse(u).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            hosts("https://cache.example.com/x.narinfo"),
            ["bucket.s3.example.com"]
        );
        assert!(hosts("https://cache.example.com:8443/x").is_empty());
        assert!(hosts("http://cache.example.com/x").is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("substituter = \"http://x\"").unwrap_err().to_string();
        assert!(
            e.starts_with("config /etc/nixenv/config.toml: line 1: "),
            "{e}"
        );
        assert!(e.contains("substituter"), "{e}");
        let cases = [
            (
                "substituters = [\"ftp://x\"]\nrequire-sigs = false",
                "substituters",
            ),
            (
                "substituters = [\"s3://b?scheme=ftp\"]\nrequire-sigs = false",
                "substituters",
            ),
            ("catalog = \"s3://b?endpoint=a/b\"", "catalog"),
            ("trusted-public-keys = [\"nokey\"]", "trusted-public-keys"),
            ("state-dir = \"relative\"", "state-dir"),
            ("http-connections = 0", "http-connections"),
            ("download-attempts = 1000", "download-attempts"),
            ("connect-timeout = \"soon\"", "connect-timeout"),
            ("gc-max-size = \"12Q\"", "gc-max-size"),
            (
                "allowed-redirect-hosts = \"x.example.com\"",
                "allowed-redirect-hosts",
            ),
            (
                "allowed-redirect-hosts = [\"x.example.com:443\"]",
                "allowed-redirect-hosts",
            ),
            (
                "allowed-redirect-hosts = [\"https://x.example.com\"]",
                "allowed-redirect-hosts",
            ),
            ("allowed-redirect-hosts = [1]", "allowed-redirect-hosts"),
            ("min-transfer-rate = \"fast\"", "min-transfer-rate"),
            ("transfer-rate-window = \"0s\"", "transfer-rate-window"),
            ("nar-timeout-base = \"later\"", "nar-timeout-base"),
            ("narinfo-timeout = \"0s\"", "narinfo-timeout"),
            ("max-lock-size = \"0\"", "max-lock-size"),
            ("max-lock-size = \"big\"", "max-lock-size"),
            // No "none": it is not crash safe.
            ("store-durability = \"none\"", "store-durability"),
            (
                "allowed-redirect-hosts = { \"ftp://c\" = [\"x\"] }",
                "allowed-redirect-hosts",
            ),
            (
                "allowed-redirect-hosts = { \"https://c\" = \"x\" }",
                "allowed-redirect-hosts",
            ),
            ("substituters = [\"http://x\"]", "trusted-public-keys"),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!(
                    "config /etc/nixenv/config.toml: bad value for `{key}`"
                )),
                "{text}: {e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
        let e = parse("require-sigs = \"yes\"").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
