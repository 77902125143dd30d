//! `<bundle>/config.json`: read once, and on a rewrite replaced atomically (temporary file in
//! the bundle directory, fsync, rename, the original file mode kept). Only the fields the
//! rewrite changes (`mounts`, `process.env`) are replaced in the original JSON, so fields this
//! version of `oci-spec` does not know survive; on pass-through the file is never written.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde_json::Value;

use crate::atomic;

/// The file name of the runtime spec in a bundle.
pub const CONFIG_JSON: &str = "config.json";

/// Why a bundle's config.json could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a valid runtime spec: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A bundle's config.json as read.
#[derive(Debug, Clone)]
pub struct BundleConfig {
    path: PathBuf,
    json: Value,
    mode: u32,
}

fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string().replace('\n', " ")
}

impl BundleConfig {
    /// Reads `<bundle>/config.json`.
    pub fn read(bundle: &Path) -> Result<Self, BundleError> {
        let path = bundle.join(CONFIG_JSON);
        let read_err = |source| BundleError::Read {
            path: path.clone(),
            source,
        };
        let bytes = std::fs::read(&path).map_err(read_err)?;
        let mode = std::fs::metadata(&path)
            .map_err(read_err)?
            .permissions()
            .mode()
            & 0o7777;
        let json: Value = serde_json::from_slice(&bytes).map_err(|e| BundleError::Parse {
            path: path.clone(),
            message: one_line(&e),
        })?;
        if !json.is_object() {
            return Err(BundleError::Parse {
                path,
                message: "expected a JSON object".into(),
            });
        }
        Ok(BundleConfig { path, json, mode })
    }

    /// The config.json path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The string-valued annotations (others are ignored).
    pub fn annotations(&self) -> HashMap<String, String> {
        self.json
            .get("annotations")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The spec, typed.
    pub fn spec(&self) -> Result<Spec, BundleError> {
        serde_json::from_value(self.json.clone()).map_err(|e| BundleError::Parse {
            path: self.path.clone(),
            message: one_line(&e),
        })
    }

    /// The original JSON with `spec`'s `mounts` and `process.env` put in.
    pub fn merged(&self, spec: &Spec) -> Value {
        let mut json = self.json.clone();
        let obj = json.as_object_mut().expect("checked at read");
        match spec.mounts() {
            Some(m) => {
                obj.insert(
                    "mounts".into(),
                    serde_json::to_value(m).expect("mounts serialise"),
                );
            }
            None => {
                obj.remove("mounts");
            }
        }
        if let Some(env) = spec.process().as_ref().and_then(|p| p.env().as_ref()) {
            if let Some(process) = obj.get_mut("process").and_then(Value::as_object_mut) {
                process.insert(
                    "env".into(),
                    serde_json::to_value(env).expect("env serialises"),
                );
            }
        }
        json
    }

    /// Replaces config.json with the original JSON carrying `spec`'s mounts and env.
    pub fn write_rewritten(&self, spec: &Spec) -> Result<(), BundleError> {
        let bytes = serde_json::to_vec(&self.merged(spec)).expect("JSON values serialise");
        atomic::write_replace(&self.path, &bytes, self.mode).map_err(|source| BundleError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::Mount;

    #[test]
    fn keeps_unknown_fields_and_mode() {
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("config.json");
        std::fs::write(
            &cfg,
            br#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},"env":["A=1"],"futureField":7},
                "root":{"path":"rootfs"},"annotations":{"nix.dev/environment":"acme/app"},
                "vendorExtension":{"x":[1,2]}}"#,
        )
        .unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        let b = BundleConfig::read(d.path()).unwrap();
        assert_eq!(
            b.annotations().get("nix.dev/environment").unwrap(),
            "acme/app"
        );
        let mut spec = b.spec().unwrap();
        let mut m = Mount::default();
        m.set_destination("/nix/store/x".into());
        spec.set_mounts(Some(vec![m]));
        spec.process_mut()
            .as_mut()
            .unwrap()
            .set_env(Some(vec!["A=1".into(), "B=2".into()]));
        b.write_rewritten(&spec).unwrap();
        let v: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
        assert_eq!(v["vendorExtension"], serde_json::json!({"x": [1, 2]}));
        assert_eq!(v["process"]["futureField"], 7);
        assert_eq!(v["process"]["env"], serde_json::json!(["A=1", "B=2"]));
        assert_eq!(
            v["mounts"],
            serde_json::json!([{"destination": "/nix/store/x"}])
        );
        assert_eq!(v["annotations"]["nix.dev/environment"], "acme/app");
        assert_eq!(
            std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn errors_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        let e = BundleConfig::read(d.path()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot read {}/config.json: ", d.path().display())),
            "{e}"
        );
        std::fs::write(d.path().join("config.json"), b"[1]").unwrap();
        let e = BundleConfig::read(d.path()).unwrap_err().to_string();
        assert!(
            e.ends_with("config.json: not a valid runtime spec: expected a JSON object"),
            "{e}"
        );
    }
}
