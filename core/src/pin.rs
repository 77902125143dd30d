//! Pins: the GC roots held by containers, one file per container at
//! `{state-dir}/pins/<container-id>.json`, written atomically.
//!
//! ```json
//! {"version": 1, "container_id": "3f2a…", "reference": "acme/echoserver", "generation": 2,
//!  "paths": ["/nix/store/…-echoserver-0.1.0", …], "closure": ["/nix/store/…", …],
//!  "created": "2026-11-21T10:00:00Z",
//!  "owner": {"kind": "shim", "runtime_root": "/run/containerd/runc/k8s.io",
//!            "bundle": "/run/containerd/io.containerd.runtime.v2.task/k8s.io/3f2a…",
//!            "namespace": "k8s.io"}}
//! ```
//!
//! A pin is written once per container, with the full closure, after it is materialised
//! ([`crate::runtime`]); until then the shared gc lock, not a pin, keeps gc away from the paths
//! being installed. `paths` are the lock's roots, `closure` every path they reach; `system` and
//! `env` complete the part of the lock the container used, so a pin records what ran (`nixenv
//! sbom --container ID`). `owner` tells a collector where the container lives, so it can drop
//! pins of containers that no longer exist (no `<runtime_root>/<id>`, no bundle).
//!
//! When its container is deleted (or a collector finds it gone), a pin is *retired*: renamed
//! to `{state-dir}/history/<container-id>.json`, where it no longer roots anything but still
//! answers what the container ran; `nixenv gc` removes records retired more than
//! [`HISTORY_KEEP`] ago. A pin undone because its container never started is removed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::environment::EnvVars;
use crate::nix::StorePath;

/// The pin file format version.
pub const PIN_VERSION: u32 = 1;
/// Longest accepted container id.
pub const MAX_CONTAINER_ID_LEN: usize = 200;
/// How long a retired pin stays in `{state-dir}/history` (30 days).
pub const HISTORY_KEEP: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Who created a pin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OwnerKind {
    /// `containerd-shim-nixenv-v2`.
    Shim,
    /// `nixenv-runc` (CRI-O, podman, containerd `BinaryName`).
    RuncWrapper,
    /// `nixenv-hook` (`precreate` or `prestart`).
    Hook,
    /// Not said (or written by a newer version).
    #[default]
    #[serde(other)]
    Unknown,
}

/// Where the pinned container lives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Which nixenv component pinned it.
    pub kind: OwnerKind,
    /// runc's `--root` (its state directory); the container exists while `<root>/<id>` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_root: Option<PathBuf>,
    /// The OCI bundle directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
    /// The containerd namespace, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// One container's pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// [`PIN_VERSION`].
    pub version: u32,
    /// The container id (also the file name).
    pub container_id: String,
    /// The reference as annotated.
    pub reference: String,
    /// The generation, for catalog references.
    pub generation: Option<u64>,
    /// The lock's top-level paths (the roots).
    pub paths: Vec<StorePath>,
    /// The full closure; empty while it is being materialised.
    pub closure: Vec<StorePath>,
    /// The Nix system whose part of the lock was used (`x86_64-linux`); absent in pins of
    /// older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The lock's env, as the container got it.
    #[serde(default, skip_serializing_if = "EnvVars::is_empty")]
    pub env: EnvVars,
    /// RFC 3339 creation time.
    pub created: String,
    /// Where the container lives.
    #[serde(default)]
    pub owner: Owner,
}

/// Why a pin could not be written, removed or read.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("invalid container id {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },
    #[error("cannot write pin {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove pin {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read pin {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pin {} is corrupt: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },
}

/// Checks a container id before it names a file: `[A-Za-z0-9_+.-]`, at most 200 characters,
/// not starting with `.` (runc's own rule is `[\w+.-]+`).
pub fn check_container_id(id: &str) -> Result<(), PinError> {
    let bad = |reason| PinError::InvalidId {
        id: id.to_owned(),
        reason,
    };
    if id.is_empty() {
        return Err(bad("empty"));
    }
    if id.len() > MAX_CONTAINER_ID_LEN {
        return Err(bad("longer than 200 characters"));
    }
    if id.starts_with('.') {
        return Err(bad("starts with '.'"));
    }
    if !id
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'+' | b'.' | b'-'))
    {
        return Err(bad(
            "allowed characters are A-Z, a-z, 0-9, '_', '+', '.', '-'",
        ));
    }
    Ok(())
}

/// `{state-dir}/pins`.
pub fn pins_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pins")
}

/// `{state-dir}/pins/<id>.json` (the id checked).
pub fn pin_path(state_dir: &Path, container_id: &str) -> Result<PathBuf, PinError> {
    check_container_id(container_id)?;
    Ok(pins_dir(state_dir).join(format!("{container_id}.json")))
}

impl Pin {
    /// A pin created now.
    pub fn new(
        container_id: &str,
        reference: &str,
        generation: Option<u64>,
        paths: Vec<StorePath>,
        owner: Owner,
    ) -> Self {
        Pin {
            version: PIN_VERSION,
            container_id: container_id.to_owned(),
            reference: reference.to_owned(),
            generation,
            paths,
            closure: Vec::new(),
            system: None,
            env: EnvVars::default(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            owner,
        }
    }
}

/// Writes (or replaces) the pin of `pin.container_id`, atomically.
pub fn pin(state_dir: &Path, pin: &Pin) -> Result<(), PinError> {
    let path = pin_path(state_dir, &pin.container_id)?;
    let write_err = |source| PinError::Write {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(pins_dir(state_dir)).map_err(write_err)?;
    let mut bytes = serde_json::to_vec_pretty(pin).expect("a pin serialises");
    bytes.push(b'\n');
    atomic::write_replace(&path, &bytes, 0o644).map_err(write_err)?;
    tracing::debug!(container = %pin.container_id, reference = %pin.reference, paths = pin.closure.len(), "pinned");
    Ok(())
}

/// Removes the pin of `container_id`; `Ok(false)` if there was none.
pub fn unpin(state_dir: &Path, container_id: &str) -> Result<bool, PinError> {
    let path = pin_path(state_dir, container_id)?;
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::debug!(container = %container_id, "unpinned");
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(PinError::Remove { path, source }),
    }
}

/// `{state-dir}/history`: pins of containers that are gone.
pub fn history_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("history")
}

/// Retires the pin of `container_id` (its container is gone): it moves to
/// `{state-dir}/history`, stamped with the time it was retired; `Ok(false)` if there was none.
pub fn retire(state_dir: &Path, container_id: &str) -> Result<bool, PinError> {
    let from = pin_path(state_dir, container_id)?;
    let to = history_dir(state_dir).join(format!("{container_id}.json"));
    let err = |source| PinError::Remove {
        path: from.clone(),
        source,
    };
    if !from.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(history_dir(state_dir)).map_err(err)?;
    // The stamp first: once renamed, a pin's mtime says when it was retired (best effort, the
    // record's `created` is older, so a failure only shortens its stay).
    if let Ok(f) = std::fs::File::options().append(true).open(&from) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
    match std::fs::rename(&from, &to) {
        Ok(()) => {
            tracing::debug!(container = %container_id, "pin retired");
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(err(source)),
    }
}

/// What ran in `container_id`: its pin while it exists, else its retired record.
pub fn read_record(state_dir: &Path, container_id: &str) -> Result<Option<Pin>, PinError> {
    if let Some(p) = read(state_dir, container_id)? {
        return Ok(Some(p));
    }
    check_container_id(container_id)?;
    read_file(&history_dir(state_dir).join(format!("{container_id}.json")))
}

/// Removes retired records older than `keep` (by the time they were retired); returns how many.
pub fn prune_history(state_dir: &Path, keep: std::time::Duration) -> Result<usize, PinError> {
    let dir = history_dir(state_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(PinError::Read { path: dir, source }),
    };
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > keep));
        if !old {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(PinError::Remove { path, source }),
        }
    }
    Ok(removed)
}

fn read_file(path: &Path) -> Result<Option<Pin>, PinError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PinError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| PinError::Corrupt {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

/// The pin of `container_id`, if any.
pub fn read(state_dir: &Path, container_id: &str) -> Result<Option<Pin>, PinError> {
    read_file(&pin_path(state_dir, container_id)?)
}

/// Every pin, sorted by container id. An unreadable pin is an error (a collector must not
/// treat its paths as unrooted).
pub fn list(state_dir: &Path) -> Result<Vec<Pin>, PinError> {
    let dir = pins_dir(state_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(PinError::Read { path: dir, source }),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PinError::Read {
            path: dir.clone(),
            source,
        })?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Skip temporaries (`.<name>.tmp.…`) and anything else that is not `<id>.json`.
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        if check_container_id(id).is_err() {
            continue;
        }
        if let Some(p) = read_file(&entry.path())? {
            out.push(p);
        }
    }
    out.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-echoserver-0.1.0";

    #[test]
    fn pin_list_unpin() {
        let d = tempfile::tempdir().unwrap();
        assert!(list(d.path()).unwrap().is_empty());
        let owner = Owner {
            kind: OwnerKind::RuncWrapper,
            runtime_root: Some("/run/runc".into()),
            bundle: Some("/tmp/b".into()),
            namespace: None,
        };
        let mut p = Pin::new(
            "c1",
            "acme/echoserver",
            Some(2),
            vec![A.parse().unwrap()],
            owner,
        );
        pin(d.path(), &p).unwrap();
        p.closure = vec![A.parse().unwrap()];
        pin(d.path(), &p).unwrap();
        let q = Pin::new("b-2", A, None, vec![A.parse().unwrap()], Owner::default());
        pin(d.path(), &q).unwrap();
        std::fs::write(pins_dir(d.path()).join(".c1.json.tmp.1.2"), b"junk").unwrap();
        let all = list(d.path()).unwrap();
        assert_eq!(all, vec![q.clone(), p.clone()]);
        assert_eq!(read(d.path(), "c1").unwrap(), Some(p));
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join("pins/c1.json")).unwrap()).unwrap();
        assert_eq!(v["owner"]["kind"], "runc-wrapper");
        assert_eq!(v["closure"][0], A);
        assert!(unpin(d.path(), "c1").unwrap());
        assert!(!unpin(d.path(), "c1").unwrap());
        assert_eq!(list(d.path()).unwrap(), vec![q]);
        // Unknown owner kinds from a newer version still read.
        std::fs::write(
            d.path().join("pins/x.json"),
            format!(r#"{{"version":1,"container_id":"x","reference":"{A}","generation":null,"paths":[],"closure":[],"created":"t","owner":{{"kind":"future"}}}}"#),
        )
        .unwrap();
        assert_eq!(
            read(d.path(), "x").unwrap().unwrap().owner.kind,
            OwnerKind::Unknown
        );
        std::fs::write(d.path().join("pins/y.json"), b"{").unwrap();
        assert!(list(d.path())
            .unwrap_err()
            .to_string()
            .contains("y.json is corrupt"));
    }

    #[test]
    fn retired_pins_say_what_ran_root_nothing_and_go_after_a_while() {
        let d = tempfile::tempdir().unwrap();
        let mut p = Pin::new(
            "c1",
            "acme/echoserver",
            Some(2),
            vec![A.parse().unwrap()],
            Owner::default(),
        );
        p.closure = vec![A.parse().unwrap()];
        p.system = Some("x86_64-linux".into());
        p.env = EnvVars(vec![("GREETING".into(), "hi".into())]);
        pin(d.path(), &p).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join("pins/c1.json")).unwrap()).unwrap();
        assert_eq!(v["system"], "x86_64-linux");
        assert_eq!(v["env"]["GREETING"], "hi");

        assert!(retire(d.path(), "c1").unwrap());
        assert!(!retire(d.path(), "c1").unwrap(), "idempotent");
        assert!(list(d.path()).unwrap().is_empty(), "no longer a gc root");
        assert_eq!(read(d.path(), "c1").unwrap(), None);
        assert_eq!(read_record(d.path(), "c1").unwrap(), Some(p.clone()));
        assert_eq!(read_record(d.path(), "c2").unwrap(), None);
        assert!(read_record(d.path(), "../c1").is_err());

        // A new container of the same id: its pin is what it runs.
        let q = Pin::new("c1", A, None, vec![A.parse().unwrap()], Owner::default());
        pin(d.path(), &q).unwrap();
        assert_eq!(read_record(d.path(), "c1").unwrap(), Some(q));

        // Stamped when retired, so kept `keep` from then.
        let retired = history_dir(d.path()).join("c1.json");
        assert_eq!(prune_history(d.path(), HISTORY_KEEP).unwrap(), 0);
        let old = std::time::SystemTime::now() - HISTORY_KEEP - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .append(true)
            .open(&retired)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(prune_history(d.path(), HISTORY_KEEP).unwrap(), 1);
        assert!(!retired.exists());
        assert!(
            read(d.path(), "c1").unwrap().is_some(),
            "pins are never pruned"
        );
    }

    #[test]
    fn container_ids_are_checked() {
        let d = tempfile::tempdir().unwrap();
        for id in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a b",
            "a\0b",
            ".hidden",
            &"a".repeat(201),
        ] {
            let e = unpin(d.path(), id).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("invalid container id {id:?}: ")),
                "{e}"
            );
        }
        for id in ["abc", "3f2a9c", "k8s_POD+x.y-z", &"a".repeat(200)] {
            assert!(check_container_id(id).is_ok(), "{id}");
        }
    }
}
