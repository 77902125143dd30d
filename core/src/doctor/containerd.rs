//! containerd's configuration as containerd itself reads it: the main file, its `imports`
//! (globs), and the merge rule of each config version (version 2, containerd 1.x: an imported
//! file replaces a plugin's whole section; version 3, containerd 2.0–2.2, and 4, 2.3+: tables
//! merge key by key).

use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// Where config version 4 keeps the gRPC address (`[grpc]` before).
const GRPC_SERVER_PLUGIN: &str = "io.containerd.server.v1.grpc";

/// The CRI plugin that holds runtime handlers, per config version.
pub fn cri_plugin(version: i64) -> &'static str {
    if version >= 3 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    }
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    /// Top-level `version` of the main file (1 when absent).
    pub version: i64,
    /// Files read, main first.
    pub files: Vec<PathBuf>,
    /// `[grpc] address`, if set.
    pub address: Option<String>,
    /// `disabled_plugins`.
    pub disabled_plugins: Vec<String>,
    /// Effective `plugins` table after merging.
    pub plugins: Table,
    /// For each plugin, the file whose section won (version 2 replaces whole sections).
    pub plugin_source: Vec<(String, PathBuf)>,
}

/// A runtime handler entry.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeEntry {
    pub runtime_type: Option<String>,
    pub binary_name: Option<String>,
    pub pod_annotations: Vec<String>,
    pub container_annotations: Vec<String>,
}

fn parse_file(path: &Path) -> Result<Table, ContainerdConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ContainerdConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<Table>()
        .map_err(|e| ContainerdConfigError::Parse {
            path: path.to_owned(),
            message: e.message().trim().replace('\n', " "),
        })
}

/// `*`/`?` wildcard match of one path component.
pub fn wildcard(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Expands an `imports` entry (relative to the main file's directory; wildcards in the last
/// component), sorted like Go's `filepath.Glob`.
fn expand_import(entry: &str, base: &Path) -> Vec<PathBuf> {
    let path = if Path::new(entry).is_absolute() {
        PathBuf::from(entry)
    } else {
        base.join(entry)
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return if path.exists() {
            vec![path]
        } else {
            Vec::new()
        };
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| wildcard(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn deep_merge(into: &mut Table, from: &Table) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Table(a)), Value::Table(b)) => deep_merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

impl ContainerdConfig {
    /// Reads `path` and its imports.
    pub fn load(path: &Path) -> Result<ContainerdConfig, ContainerdConfigError> {
        let main = parse_file(path)?;
        let version = main.get("version").and_then(Value::as_integer).unwrap_or(1);
        let base = path.parent().unwrap_or(Path::new("/"));
        let mut files = vec![(path.to_owned(), main.clone())];
        for entry in strings(main.get("imports")) {
            for p in expand_import(&entry, base) {
                if p != path {
                    let t = parse_file(&p)?;
                    files.push((p, t));
                }
            }
        }
        let mut cfg = ContainerdConfig {
            version,
            files: files.iter().map(|(p, _)| p.clone()).collect(),
            address: None,
            disabled_plugins: Vec::new(),
            plugins: Table::new(),
            plugin_source: Vec::new(),
        };
        for (p, t) in &files {
            // Version 4 (containerd 2.3+) moved `[grpc]` to its server plugin.
            let v4 = t
                .get("plugins")
                .and_then(|p| p.get(GRPC_SERVER_PLUGIN))
                .and_then(|g| g.get("address"));
            if let Some(a) = t
                .get("grpc")
                .and_then(|g| g.get("address"))
                .or(v4)
                .and_then(Value::as_str)
            {
                cfg.address = Some(a.to_owned());
            }
            cfg.disabled_plugins
                .extend(strings(t.get("disabled_plugins")));
            if let Some(Value::Table(plugins)) = t.get("plugins") {
                for (name, section) in plugins {
                    if version >= 3 {
                        match (cfg.plugins.get_mut(name), section) {
                            (Some(Value::Table(a)), Value::Table(b)) => deep_merge(a, b),
                            _ => {
                                cfg.plugins.insert(name.clone(), section.clone());
                            }
                        }
                    } else {
                        cfg.plugins.insert(name.clone(), section.clone());
                    }
                    cfg.plugin_source.retain(|(n, _)| n != name);
                    cfg.plugin_source.push((name.clone(), p.clone()));
                }
            }
        }
        Ok(cfg)
    }

    /// The file whose section of `plugin` containerd uses.
    pub fn source_of(&self, plugin: &str) -> Option<&Path> {
        self.plugin_source
            .iter()
            .find(|(n, _)| n == plugin)
            .map(|(_, p)| p.as_path())
    }

    /// The runtime handler `name`, if the effective configuration defines it.
    pub fn runtime(&self, name: &str) -> Option<RuntimeEntry> {
        let rt = self
            .plugins
            .get(cri_plugin(self.version))?
            .get("containerd")?
            .get("runtimes")?
            .get(name)?;
        Some(RuntimeEntry {
            runtime_type: rt
                .get("runtime_type")
                .and_then(Value::as_str)
                .map(str::to_owned),
            binary_name: rt
                .get("options")
                .and_then(|o| o.get("BinaryName"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            pod_annotations: strings(rt.get("pod_annotations")),
            container_annotations: strings(rt.get("container_annotations")),
        })
    }

    /// Whether the CRI plugin is disabled.
    pub fn cri_disabled(&self) -> bool {
        self.disabled_plugins.iter().any(|p| {
            p == "cri" || p == "io.containerd.grpc.v1.cri" || p == cri_plugin(self.version)
        })
    }
}

/// Whether one of containerd's annotation patterns lets `annotation` through.
pub fn passes(patterns: &[String], annotation: &str) -> bool {
    patterns.iter().any(|p| wildcard(p, annotation))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const RT2: &str = r#"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nixenv]
  runtime_type = "io.containerd.nixenv.v2"
  pod_annotations = ["nix.dev/*"]
"#;

    const RT3: &str = r#"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.nixenv]
  runtime_type = "io.containerd.nixenv.v2"
  pod_annotations = ["nix.dev/*"]
"#;

    #[test]
    fn wildcards() {
        assert!(wildcard("nix.dev/*", "nix.dev/environment"));
        assert!(wildcard("*.toml", "a.toml"));
        assert!(!wildcard("*.toml", "a.conf"));
        assert!(wildcard("a?c", "abc"));
        assert!(!wildcard("nix.dev/env", "nix.dev/environment"));
    }

    #[test]
    fn version2_runtime_in_main_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "config.toml", &format!("version = 2\n{RT2}"));
        let cfg = ContainerdConfig::load(&p).unwrap();
        let rt = cfg.runtime("nixenv").unwrap();
        assert_eq!(rt.runtime_type.as_deref(), Some("io.containerd.nixenv.v2"));
        assert!(passes(&rt.pod_annotations, "nix.dev/environment"));
    }

    #[test]
    fn version2_import_replaces_the_whole_plugin_section() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "other.toml",
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"p\"\n",
        );
        let p = write(
            d.path(),
            "config.toml",
            &format!("version = 2\nimports = [\"*.toml\"]\n{RT2}"),
        );
        let cfg = ContainerdConfig::load(&p).unwrap();
        assert!(cfg.runtime("nixenv").is_none());
        assert_eq!(
            cfg.source_of("io.containerd.grpc.v1.cri"),
            Some(d.path().join("other.toml").as_path())
        );
    }

    #[test]
    fn version3_imports_merge() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("conf.d");
        std::fs::create_dir(&conf).unwrap();
        write(
            &conf,
            "nixenv.toml",
            "version = 3\n[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.nixenv]\nruntime_type = \"io.containerd.nixenv.v2\"\n",
        );
        let p = write(
            d.path(),
            "config.toml",
            "version = 3\nimports = [\"conf.d/*.toml\"]\n[plugins.\"io.containerd.cri.v1.runtime\"]\nenable_selinux = false\n[grpc]\naddress = \"/x.sock\"\n",
        );
        let cfg = ContainerdConfig::load(&p).unwrap();
        assert_eq!(cfg.version, 3);
        assert_eq!(cfg.address.as_deref(), Some("/x.sock"));
        let rt = cfg.runtime("nixenv").unwrap();
        assert!(rt.pod_annotations.is_empty());
        assert!(cfg.plugins["io.containerd.cri.v1.runtime"]
            .get("enable_selinux")
            .is_some());
    }

    #[test]
    fn version4_reads_the_address_from_the_grpc_server_plugin() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "config.toml",
            &format!("version = 4\n[plugins.\"io.containerd.server.v1.grpc\"]\naddress = \"/y.sock\"\n{RT3}"),
        );
        let cfg = ContainerdConfig::load(&p).unwrap();
        assert_eq!(cfg.version, 4);
        assert_eq!(cfg.address.as_deref(), Some("/y.sock"));
        assert!(cfg.runtime("nixenv").is_some());
    }

    #[test]
    fn parse_error_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "config.toml", "version = \n");
        let e = ContainerdConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("config.toml"), "{e}");
    }
}
