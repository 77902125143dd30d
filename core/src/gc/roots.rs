//! GC roots: the pins of containers that still exist.
//!
//! A pin (`{state-dir}/pins/<id>.json`, [`crate::pin`]) is *live* unless its container is
//! known to be gone. The container is asked about through a [`ContainerProbe`]: for pins that
//! record runc's `--root`, [`RuncProbe`] runs `runc --root <root> state <id>` (and treats a
//! missing root directory, e.g. a wiped `/run` after a reboot, as "gone" without asking).
//! Pins younger than a grace period are always live: a pin is written before its container
//! is created (while the closure is pulled and the spec rewritten), so "no such container"
//! is expected then. Pins that say nothing about where their container lives are kept
//! unless their recorded bundle directory is gone. When in doubt (runc missing, an
//! unexpected error) a pin is live: gc never guesses a container away.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::pin::{self, Pin};

use super::GcError;

/// What a probe found out about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// The runtime knows the container (its status, e.g. `running`, `created`, `stopped`).
    Exists(String),
    /// The runtime does not know the container (the reason, for the report).
    Gone(String),
    /// The runtime could not be asked (the reason); treated as present.
    Unknown(String),
}

/// The process edge: asks a runtime whether a container exists.
pub trait ContainerProbe {
    /// Whether container `id` exists in runc state directory `root`.
    fn runc_state(&self, root: &Path, id: &str) -> Presence;
}

/// The real probe: `runc --root <root> state <id>`.
#[derive(Debug, Clone)]
pub struct RuncProbe {
    runc: PathBuf,
}

impl RuncProbe {
    /// Asks `runc` (a path, or a name on PATH).
    pub fn new(runc: impl Into<PathBuf>) -> Self {
        RuncProbe { runc: runc.into() }
    }
}

impl ContainerProbe for RuncProbe {
    fn runc_state(&self, root: &Path, id: &str) -> Presence {
        match std::fs::symlink_metadata(root) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Presence::Gone(format!("runc root {} does not exist", root.display()))
            }
            _ => {}
        }
        let out = Command::new(&self.runc)
            .arg("--root")
            .arg(root)
            .arg("state")
            .arg(id)
            .output();
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                // Without runc, fall back to runc's state directory layout: `<root>/<id>/state.json`.
                tracing::debug!(runc = %self.runc.display(), error = %e, "cannot run runc, checking its state directory");
                return state_dir_presence(
                    root,
                    id,
                    &format!("cannot run {}: {e}", self.runc.display()),
                );
            }
        };
        tracing::debug!(runc = %self.runc.display(), root = %root.display(), container = %id, status = ?out.status.code(), "runc state");
        if out.status.success() {
            let status = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v.get("status").and_then(|s| s.as_str()).map(str::to_owned))
                .unwrap_or_else(|| "unknown".into());
            return Presence::Exists(status);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("does not exist") {
            Presence::Gone(format!(
                "runc --root {} has no container {id}",
                root.display()
            ))
        } else {
            Presence::Unknown(format!(
                "runc --root {} state {id} failed: {}",
                root.display(),
                stderr.lines().last().unwrap_or("").trim()
            ))
        }
    }
}

/// Presence from runc's state directory alone.
fn state_dir_presence(root: &Path, id: &str, why_unknown: &str) -> Presence {
    match std::fs::symlink_metadata(root.join(id).join("state.json")) {
        Ok(_) => Presence::Exists("unknown".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Presence::Gone(format!(
            "runc root {} has no container {id}",
            root.display()
        )),
        Err(_) => Presence::Unknown(why_unknown.to_owned()),
    }
}

/// A pin and what gc concluded about it.
#[derive(Debug, Clone)]
pub struct PinStatus {
    pub pin: Pin,
    /// The pin file's modification time (its last write).
    pub written: SystemTime,
    /// `None` when live; else why the container is gone.
    pub stale: Option<String>,
}

impl PinStatus {
    /// Whether the pin roots its closure.
    pub fn is_live(&self) -> bool {
        self.stale.is_none()
    }
}

/// The pin file's mtime (`UNIX_EPOCH` if it cannot be read: then the pin counts as old).
pub fn pin_written(state_dir: &Path, id: &str) -> SystemTime {
    pin::pin_path(state_dir, id)
        .ok()
        .and_then(|p| std::fs::metadata(p).ok())
        .and_then(|m| m.modified().ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Whether one pin is stale, and why.
pub fn staleness<P: ContainerProbe>(
    probe: &P,
    pin: &Pin,
    written: SystemTime,
    now: SystemTime,
    grace: Duration,
) -> Option<String> {
    if now.duration_since(written).unwrap_or_default() < grace {
        return None;
    }
    let id = &pin.container_id;
    if let Some(root) = &pin.owner.runtime_root {
        return match probe.runc_state(root, id) {
            Presence::Exists(_) => None,
            Presence::Gone(why) => Some(why),
            Presence::Unknown(why) => {
                tracing::warn!(container = %id, reason = %why, "cannot tell whether the container exists; keeping its pin");
                None
            }
        };
    }
    if let Some(bundle) = &pin.owner.bundle {
        if let Err(e) = std::fs::symlink_metadata(bundle) {
            if e.kind() == std::io::ErrorKind::NotFound {
                return Some(format!("bundle {} does not exist", bundle.display()));
            }
        }
    }
    None
}

/// Every pin with its liveness.
pub fn classify<P: ContainerProbe>(
    state_dir: &Path,
    probe: &P,
    now: SystemTime,
    grace: Duration,
) -> Result<Vec<PinStatus>, GcError> {
    let pins = pin::list(state_dir)?;
    Ok(pins
        .into_iter()
        .map(|pin| {
            let written = pin_written(state_dir, &pin.container_id);
            let stale = staleness(probe, &pin, written, now, grace);
            PinStatus {
                pin,
                written,
                stale,
            }
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::pin::{Owner, OwnerKind};

    /// Answers from a table; counts calls.
    #[derive(Default)]
    pub(crate) struct FakeProbe {
        pub answers: HashMap<String, Presence>,
        pub calls: Mutex<Vec<String>>,
    }

    impl ContainerProbe for FakeProbe {
        fn runc_state(&self, _root: &Path, id: &str) -> Presence {
            self.calls.lock().unwrap().push(id.to_owned());
            self.answers
                .get(id)
                .cloned()
                .unwrap_or_else(|| Presence::Gone("no such container".into()))
        }
    }

    fn pin_with(owner: Owner) -> Pin {
        Pin::new("c1", "acme/app", None, vec![], owner)
    }

    #[test]
    fn stale_only_when_the_runtime_says_gone_and_the_pin_is_old() {
        let now = SystemTime::now();
        let old = now - Duration::from_secs(3600);
        let grace = Duration::from_secs(600);
        let rooted = pin_with(Owner {
            kind: OwnerKind::Shim,
            runtime_root: Some("/run/x".into()),
            ..Owner::default()
        });
        let mut probe = FakeProbe::default();
        assert!(staleness(&probe, &rooted, old, now, grace)
            .unwrap()
            .contains("no such"));
        // Young pins are live whatever runc says (the container is being created).
        assert_eq!(staleness(&probe, &rooted, now, now, grace), None);
        probe
            .answers
            .insert("c1".into(), Presence::Exists("running".into()));
        assert_eq!(staleness(&probe, &rooted, old, now, grace), None);
        probe
            .answers
            .insert("c1".into(), Presence::Unknown("permission denied".into()));
        assert_eq!(staleness(&probe, &rooted, old, now, grace), None);

        // No runtime root: the bundle decides; nothing recorded: live.
        let d = tempfile::tempdir().unwrap();
        let with_bundle = |b: PathBuf| {
            pin_with(Owner {
                bundle: Some(b),
                ..Owner::default()
            })
        };
        assert_eq!(
            staleness(&probe, &with_bundle(d.path().into()), old, now, grace),
            None
        );
        let gone = staleness(&probe, &with_bundle(d.path().join("x")), old, now, grace).unwrap();
        assert!(
            gone.contains("bundle") && gone.contains("does not exist"),
            "{gone}"
        );
        assert_eq!(
            staleness(&probe, &pin_with(Owner::default()), old, now, grace),
            None
        );
        assert_eq!(probe.calls.lock().unwrap().len(), 3);
    }

    #[test]
    fn runc_probe_reads_a_missing_root_as_gone_and_a_missing_runc_as_state_dir() {
        let d = tempfile::tempdir().unwrap();
        let probe = RuncProbe::new(d.path().join("no-runc"));
        let r = probe.runc_state(&d.path().join("wiped"), "c1");
        assert!(
            matches!(&r, Presence::Gone(w) if w.contains("does not exist")),
            "{r:?}"
        );
        assert!(matches!(
            probe.runc_state(d.path(), "c1"),
            Presence::Gone(_)
        ));
        std::fs::create_dir_all(d.path().join("c1")).unwrap();
        std::fs::write(d.path().join("c1/state.json"), b"{}").unwrap();
        assert!(matches!(
            probe.runc_state(d.path(), "c1"),
            Presence::Exists(_)
        ));
    }
}
