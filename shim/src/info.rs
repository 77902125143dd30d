//! `-info`: the shim's `RuntimeInfo`, as containerd asks for it (`shim -info`, the runtime
//! options `Any` on standard input, or nothing) to learn what the runtime supports.
//!
//! Like containerd's runc shim, the answer carries the features of the runc that would run the
//! containers (the options' `BinaryName`, else nixenv's configured runc, else `runc` on PATH):
//! `runc features` JSON as an `Any` of the type containerd registers for the OCI
//! `features.Features` ([`FEATURES_TYPE_URL`]). Kubelets read it, through containerd, to decide
//! whether the handler can run user-namespaced pods (`linux.namespaces` with `user`,
//! `linux.mountExtensions.idmap.enabled`). The features are runc's unchanged: nixenv's spec
//! rewrite only adds read-only bind mounts and environment, which every runc supports (in a
//! user-namespaced pod the binds are idmapped: exactly `mountExtensions.idmap`, which runc
//! reports, and without which the rewrite refuses the container), and takes nothing away that a
//! feature would promise.
//!
//! A runc without `features` (older than 1.1) gives an answer without features, as on
//! containerd's runc shim; that is logged, not an error.

use std::path::Path;
use std::process::{Command, Stdio};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};

/// The type URL containerd gives the OCI runtime-spec `features.Features` (JSON-encoded).
pub const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// Why runc's features are missing from the answer.
#[derive(Debug, thiserror::Error)]
pub enum FeaturesError {
    #[error("run {runc} features: {source}")]
    Spawn {
        runc: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{runc} features failed ({status}): {stderr}")]
    Failed {
        runc: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{runc} features printed no JSON object: {source}")]
    NotJson {
        runc: String,
        #[source]
        source: serde_json::Error,
    },
}

/// `<runc> features`: its JSON, checked to be an object.
pub fn runc_features(runc: &Path) -> Result<Vec<u8>, FeaturesError> {
    let name = runc.display().to_string();
    let out = Command::new(runc)
        .arg("features")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| FeaturesError::Spawn {
            runc: name.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(FeaturesError::Failed {
            runc: name,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&out.stdout)
        .map_err(|source| FeaturesError::NotJson { runc: name, source })?;
    Ok(out.stdout)
}

/// The `RuntimeInfo` for runtime `name`: the options echoed back, and the features of `runc`
/// when it reports them.
pub fn runtime_info(name: &str, options: Option<Any>, runc: &Path) -> RuntimeInfo {
    let mut info = RuntimeInfo {
        name: name.to_owned(),
        version: Some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
        .into(),
        options: options.into(),
        ..Default::default()
    };
    match runc_features(runc) {
        Ok(json) => {
            let mut features = Any::new();
            features.type_url = FEATURES_TYPE_URL.to_owned();
            features.value = json;
            info.features = Some(features).into();
        }
        Err(e) => tracing::warn!(error = %e, "runtime info without runc features"),
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::helper::tests::install_script;

    /// An executable shell script `name` in `dir` (put in place as the helper's fakes are).
    fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        install_script(&path, &format!("#!/bin/sh\n{body}\n"));
        path
    }

    #[test]
    fn features_are_runcs_json_under_containerds_type() {
        let dir = tempfile::tempdir().unwrap();
        let json =
            r#"{"ociVersionMin":"1.0.0","ociVersionMax":"1.2.1","linux":{"namespaces":["user"]}}"#;
        let runc = script(
            dir.path(),
            "runc",
            &format!("[ \"$1\" = features ] || exit 3\necho '{json}'"),
        );
        let mut opts = Any::new();
        opts.type_url = "containerd.runc.v1.Options".into();
        let info = runtime_info("io.containerd.nixenv.v2", Some(opts.clone()), &runc);
        assert_eq!(info.name, "io.containerd.nixenv.v2");
        assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.options.as_ref(), Some(&opts));
        let features = info.features.as_ref().expect("features");
        assert_eq!(features.type_url, FEATURES_TYPE_URL);
        let got: serde_json::Value = serde_json::from_slice(&features.value).unwrap();
        assert_eq!(got["ociVersionMax"], "1.2.1");
        assert_eq!(got["linux"]["namespaces"][0], "user");
    }

    #[test]
    fn a_runc_without_features_gives_no_features() {
        let dir = tempfile::tempdir().unwrap();
        let old = script(
            dir.path(),
            "old",
            "echo 'No help topic for features' >&2; exit 1",
        );
        let info = runtime_info("n", None, &old);
        assert!(info.features.is_none());
        assert!(matches!(
            runc_features(&old),
            Err(FeaturesError::Failed { stderr, .. }) if stderr.contains("features")
        ));
        let garbage = script(dir.path(), "garbage", "echo 'runc version 1.0'");
        assert!(runtime_info("n", None, &garbage).features.is_none());
        let missing = dir.path().join("missing");
        assert!(matches!(
            runc_features(&missing),
            Err(FeaturesError::Spawn { .. })
        ));
    }
}
