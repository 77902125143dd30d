//! CRI-O's configuration: `crio.conf` then the drop-ins of `crio.conf.d` in lexical order,
//! later keys overriding earlier ones.

use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CrioConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The merged configuration.
#[derive(Debug, Clone, Default)]
pub struct CrioConfig {
    /// Files read, in order.
    pub files: Vec<PathBuf>,
    pub merged: Table,
}

/// A `[crio.runtime.runtimes.NAME]` handler.
#[derive(Debug, Clone, PartialEq)]
pub struct CrioRuntime {
    pub runtime_path: Option<String>,
    pub runtime_type: Option<String>,
    pub allowed_annotations: Vec<String>,
    /// The drop-in that defines it last.
    pub defined_in: PathBuf,
}

fn merge(into: &mut Table, from: &Table) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Table(a)), Value::Table(b)) => merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

fn runtime_in<'a>(t: &'a Table, name: &str) -> Option<&'a Value> {
    t.get("crio")?.get("runtime")?.get("runtimes")?.get(name)
}

impl CrioConfig {
    /// Reads `main` (if it exists) and `dropins/*.conf` (if the directory exists).
    pub fn load(main: &Path, dropins: &Path) -> Result<CrioConfig, CrioConfigError> {
        let mut paths = Vec::new();
        if main.exists() {
            paths.push(main.to_owned());
        }
        let mut extra: Vec<PathBuf> = std::fs::read_dir(dropins)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conf"))
            .collect();
        extra.sort();
        paths.extend(extra);
        let mut cfg = CrioConfig::default();
        for p in paths {
            let text = std::fs::read_to_string(&p).map_err(|source| CrioConfigError::Read {
                path: p.clone(),
                source,
            })?;
            let t: Table = text
                .parse()
                .map_err(|e: toml::de::Error| CrioConfigError::Parse {
                    path: p.clone(),
                    message: e.message().trim().replace('\n', " "),
                })?;
            merge(&mut cfg.merged, &t);
            cfg.files.push(p);
        }
        Ok(cfg)
    }

    /// The handler `name`, if defined.
    pub fn runtime(&self, name: &str) -> Option<CrioRuntime> {
        let rt = runtime_in(&self.merged, name)?;
        let defined_in = self
            .files
            .iter()
            .rev()
            .find(|p| {
                std::fs::read_to_string(p)
                    .ok()
                    .and_then(|t| t.parse::<Table>().ok())
                    .is_some_and(|t| runtime_in(&t, name).is_some())
            })
            .cloned()
            .unwrap_or_default();
        let s = |k: &str| rt.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(CrioRuntime {
            runtime_path: s("runtime_path"),
            runtime_type: s("runtime_type"),
            allowed_annotations: rt
                .get("allowed_annotations")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            defined_in,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropins_override_in_order() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("crio.conf.d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("10-nixenv.conf"),
            "[crio.runtime.runtimes.nixenv]\nruntime_path = \"/usr/bin/nixenv-runc\"\nallowed_annotations = [\"nix.dev/environment\"]\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("20-local.conf"),
            "[crio.runtime.runtimes.nixenv]\nruntime_type = \"oci\"\n",
        )
        .unwrap();
        std::fs::write(dir.join("ignored.txt"), "not toml [").unwrap();
        let cfg = CrioConfig::load(&d.path().join("crio.conf"), &dir).unwrap();
        let rt = cfg.runtime("nixenv").unwrap();
        assert_eq!(rt.runtime_path.as_deref(), Some("/usr/bin/nixenv-runc"));
        assert_eq!(rt.runtime_type.as_deref(), Some("oci"));
        assert_eq!(rt.allowed_annotations, vec!["nix.dev/environment"]);
        assert_eq!(rt.defined_in, dir.join("20-local.conf"));
        assert!(cfg.runtime("runc").is_none());
    }
}
