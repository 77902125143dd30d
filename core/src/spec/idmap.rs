//! Store binds in a user-namespaced container (Kubernetes `hostUsers: false`, CRI
//! `userns_options`): idmapped, so the store's files appear owned by the container's root.
//!
//! The node store is owned by host uid 0. Inside a user namespace that maps container 0 to host
//! 65536, a plain bind shows those files as owned by the overflow uid (`nobody`): readable when
//! world-readable, but ownership checks see a stranger. An idmapped bind whose mapping is the
//! container's own shows host uid 0 as container uid 0.
//!
//! - [`user_mappings`]: the spec's user namespace mappings, when it has a user namespace with
//!   both uid and gid mappings (containerd 2.x CRI puts them in `linux.uidMappings` and
//!   `linux.gidMappings`, beside the sandbox's namespace path).
//! - [`UserMappings::idmap`]: the OCI runtime-spec form of an idmapped bind: the mount's own
//!   `uidMappings`/`gidMappings` (runtime-spec 1.1; runc 1.2+ requires both) and the option
//!   [`IDMAP_OPTION`] (`ridmap`, runtime-spec 1.2: the mapping applies to the whole `rbind`
//!   tree, as runc applies it with `AT_RECURSIVE`).
//! - runc before 1.2 (Debian bookworm's 1.1.5, trixie's 1.1.15) ignores both the fields and
//!   the option, and would silently give the container a store owned by `nobody`. So before
//!   rewriting a user-namespaced spec the runtime asks runc ([`RuntimeFeatures`]): `runc
//!   features` reports `linux.mountExtensions.idmap.enabled` since runc 1.2; without it the
//!   create fails with one line ([`IdmapError`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType, Mount, Spec};

/// The mount option of the store binds in a user-namespaced container.
pub const IDMAP_OPTION: &str = "ridmap";

/// A user-namespaced spec's id mappings (each non-empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserMappings {
    /// `linux.uidMappings`.
    pub uids: Vec<LinuxIdMapping>,
    /// `linux.gidMappings`.
    pub gids: Vec<LinuxIdMapping>,
}

/// The mappings of `spec`'s user namespace, if it has one with uid and gid mappings.
pub fn user_mappings(spec: &Spec) -> Option<UserMappings> {
    let linux = spec.linux().as_ref()?;
    let has_userns = linux
        .namespaces()
        .as_ref()?
        .iter()
        .any(|ns| ns.typ() == LinuxNamespaceType::User);
    let uids = linux.uid_mappings().clone().unwrap_or_default();
    let gids = linux.gid_mappings().clone().unwrap_or_default();
    (has_userns && !uids.is_empty() && !gids.is_empty()).then_some(UserMappings { uids, gids })
}

impl UserMappings {
    /// Makes the bind `mount` idmapped with these mappings.
    pub fn idmap(&self, mount: &mut Mount) {
        let mut options = mount.options().clone().unwrap_or_default();
        if !options.iter().any(|o| o == IDMAP_OPTION) {
            options.push(IDMAP_OPTION.to_owned());
        }
        mount
            .set_uid_mappings(Some(self.uids.clone()))
            .set_gid_mappings(Some(self.gids.clone()))
            .set_options(Some(options));
    }
}

/// Why a user-namespaced container's store cannot be idmapped.
#[derive(Debug, thiserror::Error)]
pub enum IdmapError {
    #[error("the pod has a user namespace but {} cannot make idmapped mounts (`runc features` reports no linux.mountExtensions.idmap; runc 1.2 or newer can), so the store would appear owned by nobody", .runc.display())]
    Unsupported { runc: PathBuf },
    #[error("the pod has a user namespace but `{} features` failed ({status}), so idmapped mounts cannot be made: {stderr}", .runc.display())]
    Failed {
        runc: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("cannot run `{} features` to check for idmapped mounts: {source}", .runc.display())]
    Run {
        runc: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read `{} features`: {source}", .runc.display())]
    Parse {
        runc: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What the runtime that will run a container can do; asked only for user-namespaced specs.
pub trait RuntimeFeatures {
    /// `Ok` when the runtime makes idmapped bind mounts.
    fn idmapped_mounts(&self) -> Result<(), IdmapError>;
}

impl<R: RuntimeFeatures + ?Sized> RuntimeFeatures for &R {
    fn idmapped_mounts(&self) -> Result<(), IdmapError> {
        (**self).idmapped_mounts()
    }
}

/// Whether runc's `features` JSON (`runc features`, runtime-spec `features.md`) says it makes
/// idmapped mounts: `linux.mountExtensions.idmap.enabled`.
pub fn features_idmap(json: &[u8]) -> Result<bool, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_slice(json)?;
    Ok(v.pointer("/linux/mountExtensions/idmap/enabled")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false))
}

/// The production [`RuntimeFeatures`]: runs `<runc> features`.
#[derive(Debug, Clone)]
pub struct RuncFeatures {
    runc: PathBuf,
}

impl RuncFeatures {
    /// For the runc binary `runc` (a path, or a name looked up on PATH).
    pub fn new(runc: &Path) -> Self {
        RuncFeatures {
            runc: runc.to_owned(),
        }
    }
}

impl RuntimeFeatures for RuncFeatures {
    fn idmapped_mounts(&self) -> Result<(), IdmapError> {
        let runc = self.runc.clone();
        let out = Command::new(&runc)
            .arg("features")
            .output()
            .map_err(|source| IdmapError::Run {
                runc: runc.clone(),
                source,
            })?;
        if !out.status.success() {
            // runc 1.0 has no `features` command at all.
            return Err(IdmapError::Failed {
                runc,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        match features_idmap(&out.stdout) {
            Ok(true) => Ok(()),
            Ok(false) => Err(IdmapError::Unsupported { runc }),
            Err(source) => Err(IdmapError::Parse { runc, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxBuilder, LinuxIdMappingBuilder, LinuxNamespaceBuilder, SpecBuilder,
    };

    fn map(container: u32, host: u32, size: u32) -> LinuxIdMapping {
        LinuxIdMappingBuilder::default()
            .container_id(container)
            .host_id(host)
            .size(size)
            .build()
            .unwrap()
    }

    fn userns_spec(uids: Vec<LinuxIdMapping>, gids: Vec<LinuxIdMapping>) -> Spec {
        let mut namespaces = Spec::default()
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap();
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .path("/var/run/userns/pod")
                .build()
                .unwrap(),
        );
        SpecBuilder::default()
            .linux(
                LinuxBuilder::default()
                    .namespaces(namespaces)
                    .uid_mappings(uids)
                    .gid_mappings(gids)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    #[test]
    fn mappings_need_a_user_namespace_and_both_maps() {
        let m = vec![map(0, 65536, 65536)];
        assert_eq!(
            user_mappings(&userns_spec(m.clone(), m.clone())),
            Some(UserMappings {
                uids: m.clone(),
                gids: m.clone()
            })
        );
        assert_eq!(user_mappings(&userns_spec(m.clone(), vec![])), None);
        // The default spec has no user namespace; mappings alone are not one.
        assert_eq!(user_mappings(&Spec::default()), None);
        let mut no_ns = userns_spec(m.clone(), m.clone());
        let linux = no_ns.linux_mut().as_mut().unwrap();
        let without: Vec<_> = linux
            .namespaces()
            .clone()
            .unwrap()
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::User)
            .collect();
        linux.set_namespaces(Some(without));
        assert_eq!(user_mappings(&no_ns), None);
    }

    #[test]
    fn idmap_adds_the_fields_and_the_option_once() {
        let m = UserMappings {
            uids: vec![map(0, 65536, 65536)],
            gids: vec![map(0, 100000, 1000), map(1000, 200000, 10)],
        };
        let mut mount = Mount::default();
        mount.set_options(Some(vec!["rbind".into(), "ro".into()]));
        m.idmap(&mut mount);
        m.idmap(&mut mount);
        assert_eq!(
            serde_json::to_value(&mount).unwrap(),
            serde_json::json!({
                "destination": "",
                "options": ["rbind", "ro", "ridmap"],
                "uidMappings": [{"containerID": 0, "hostID": 65536, "size": 65536}],
                "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 1000},
                                {"containerID": 1000, "hostID": 200000, "size": 10}],
            })
        );
    }

    #[test]
    fn runc_features_idmap() {
        // runc 1.3's answer (abridged), runc 1.1's (no mountExtensions), a disabled one.
        let v13 = br#"{"ociVersionMin":"1.0.0","ociVersionMax":"1.2.1","linux":{"namespaces":["user"],"mountExtensions":{"idmap":{"enabled":true}}}}"#;
        let v11 = br#"{"ociVersionMin":"1.0.0","ociVersionMax":"1.0.2-runc.1","linux":{"namespaces":["user"]}}"#;
        let off = br#"{"linux":{"mountExtensions":{"idmap":{"enabled":false}}}}"#;
        assert!(features_idmap(v13).unwrap());
        assert!(!features_idmap(v11).unwrap());
        assert!(!features_idmap(off).unwrap());
        assert!(features_idmap(b"runc: no such command").is_err());
    }

    #[test]
    fn a_runc_without_features_or_idmap_is_refused_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let script = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            let exec = std::os::unix::fs::PermissionsExt::from_mode(0o755);
            std::fs::set_permissions(&p, exec).unwrap();
            p
        };
        let old = script("runc-1.0", "echo 'No help topic for features' >&2; exit 3");
        let e = RuncFeatures::new(&old)
            .idmapped_mounts()
            .unwrap_err()
            .to_string();
        assert!(e.contains("features` failed (exit status: 3)"), "{e}");
        assert!(e.ends_with("No help topic for features"), "{e}");
        let v11 = script("runc-1.1", r#"echo '{"linux":{"namespaces":["user"]}}'"#);
        let e = RuncFeatures::new(&v11)
            .idmapped_mounts()
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "the pod has a user namespace but {} cannot make idmapped mounts (`runc features` reports no linux.mountExtensions.idmap; runc 1.2 or newer can), so the store would appear owned by nobody",
                v11.display()
            )
        );
        let v13 = script(
            "runc-1.3",
            r#"echo '{"linux":{"mountExtensions":{"idmap":{"enabled":true}}}}'"#,
        );
        RuncFeatures::new(&v13).idmapped_mounts().unwrap();
        let e = RuncFeatures::new(&dir.path().join("absent"))
            .idmapped_mounts()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot run `"), "{e}");
    }
}
