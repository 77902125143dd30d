//! The node store's checks for `nixenv doctor`: free space, permissions, leftovers of
//! interrupted installs or gc runs, and stale pins.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::finding::{Finding, Status};
use crate::pin;

use super::delete::{STAGING_PREFIX, TRASH_PREFIX};
use super::roots::{self, ContainerProbe};
use super::run::DEFAULT_PIN_GRACE;
use super::GcLock;

/// Free space below this fails the check.
pub const MIN_FREE_FAIL: u64 = 512 << 20;
/// Free space below this warns.
pub const MIN_FREE_WARN: u64 = 2 << 30;
/// A staging area older than this, with no install holding it, is stale.
pub const STALE_STAGING_AGE: Duration = Duration::from_secs(3600);

fn finding(status: Status, check: &str, message: String, fix: Option<String>) -> Finding {
    Finding {
        status,
        check: check.to_owned(),
        message,
        fix,
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Every store check.
pub fn store_checks<P: ContainerProbe>(cfg: &Config, probe: &P) -> Vec<Finding> {
    let store_dir = cfg.store_dir();
    if !store_dir.exists() {
        return vec![finding(
            Status::Skip,
            "store",
            format!(
                "{} does not exist yet (created by the first pull)",
                store_dir.display()
            ),
            None,
        )];
    }
    vec![
        check_free_space(&cfg.state_dir),
        check_permissions(&store_dir),
        check_leftovers(&cfg.state_dir, &store_dir),
        check_stale_pins(&cfg.state_dir, probe),
    ]
}

/// Free space on the state directory's file system.
pub fn check_free_space(state_dir: &Path) -> Finding {
    let check = "store free space";
    match nix::sys::statvfs::statvfs(state_dir) {
        Ok(s) => {
            // fsblkcnt_t and c_ulong are u64 here but narrower on 32-bit targets.
            #[allow(clippy::useless_conversion)]
            let free = u64::from(s.blocks_available()) * u64::from(s.fragment_size());
            #[allow(clippy::useless_conversion)]
            let total = u64::from(s.blocks()) * u64::from(s.fragment_size());
            let msg = format!(
                "{} free of {} on {}",
                gib(free),
                gib(total),
                state_dir.display()
            );
            let fix = || {
                Some("run `nixenv gc` (or lower gc-max-size / gc-keep-since), or grow the file system".to_owned())
            };
            if free < MIN_FREE_FAIL {
                finding(Status::Fail, check, msg, fix())
            } else if free < MIN_FREE_WARN {
                finding(Status::Warn, check, msg, fix())
            } else {
                finding(Status::Ok, check, msg, None)
            }
        }
        Err(e) => finding(
            Status::Warn,
            check,
            format!("cannot statvfs {}: {e}", state_dir.display()),
            Some("check the state directory".into()),
        ),
    }
}

/// The store directory and its paths must not be writable by anyone but their owner root
/// (store paths themselves are read-only for everybody).
pub fn check_permissions(store_dir: &Path) -> Finding {
    let check = "store permissions";
    let fix = Some(format!(
        "chown root {0} && chmod 0755 {0}; remove the listed paths and pull them again",
        store_dir.display()
    ));
    let m = match std::fs::symlink_metadata(store_dir) {
        Ok(m) => m,
        Err(e) => {
            return finding(
                Status::Fail,
                check,
                format!("cannot inspect {}: {e}", store_dir.display()),
                fix,
            )
        }
    };
    let mode = m.permissions().mode() & 0o7777;
    if !m.is_dir() || mode & 0o022 != 0 || m.uid() != nix::unistd::geteuid().as_raw() {
        return finding(
            Status::Fail,
            check,
            format!(
                "{} has mode {mode:04o}, owner uid {}: others could change what containers run",
                store_dir.display(),
                m.uid()
            ),
            fix,
        );
    }
    let mut writable = Vec::new();
    if let Ok(rd) = std::fs::read_dir(store_dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if let Ok(m) = e.metadata() {
                if !m.file_type().is_symlink() && m.permissions().mode() & 0o222 != 0 {
                    writable.push(name.to_string_lossy().into_owned());
                }
            }
        }
    }
    if writable.is_empty() {
        finding(
            Status::Ok,
            check,
            format!(
                "{} mode {mode:04o}, store paths read-only",
                store_dir.display()
            ),
            None,
        )
    } else {
        writable.sort();
        finding(
            Status::Fail,
            check,
            format!("writable store paths: {}", writable.join(", ")),
            fix,
        )
    }
}

/// `.tmp-*` older than an hour (an install killed midway) and `.trash-*` while no gc runs.
pub fn check_leftovers(state_dir: &Path, store_dir: &Path) -> Finding {
    let check = "store leftovers";
    let gc_running = GcLock::gc_running(state_dir).unwrap_or(true);
    let now = SystemTime::now();
    let mut stale = Vec::new();
    if let Ok(rd) = std::fs::read_dir(store_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE_STAGING_AGE);
            if (name.starts_with(STAGING_PREFIX) && old)
                || (name.starts_with(TRASH_PREFIX) && !gc_running)
            {
                stale.push(name);
            }
        }
    }
    if stale.is_empty() {
        return finding(
            Status::Ok,
            check,
            "no leftovers of interrupted installs or gc runs".into(),
            None,
        );
    }
    stale.sort();
    finding(
        Status::Warn,
        check,
        format!(
            "{} leftover(s) of interrupted installs or gc runs: {}",
            stale.len(),
            stale.join(", ")
        ),
        Some("run `nixenv gc` (it removes them)".into()),
    )
}

/// Pins whose container is gone.
pub fn check_stale_pins<P: ContainerProbe>(state_dir: &Path, probe: &P) -> Finding {
    let check = "stale pins";
    match roots::classify(state_dir, probe, SystemTime::now(), DEFAULT_PIN_GRACE) {
        Ok(all) => {
            let stale: Vec<String> = all
                .iter()
                .filter_map(|s| {
                    s.stale
                        .as_ref()
                        .map(|why| format!("{} ({why})", s.pin.container_id))
                })
                .collect();
            if stale.is_empty() {
                finding(
                    Status::Ok,
                    check,
                    format!("{} pin(s), all of existing containers", all.len()),
                    None,
                )
            } else {
                finding(
                    Status::Warn,
                    check,
                    format!(
                        "{} of {} pin(s) belong to containers that are gone: {}",
                        stale.len(),
                        all.len(),
                        stale.join(", ")
                    ),
                    Some("run `nixenv gc` (it drops them and frees their paths)".into()),
                )
            }
        }
        Err(e) => finding(
            Status::Fail,
            check,
            e.to_string(),
            Some(format!(
                "remove or repair the file under {}",
                pin::pins_dir(state_dir).display()
            )),
        ),
    }
}
