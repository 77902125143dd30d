//! OOM kills of a container, noticed by watching its memory cgroup's `oom_kill` counter
//! (`memory.oom_control` on cgroup v1, `memory.events` on v2) while its init runs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cgroups::Cgroups;
use crate::stats::parse_flat_keyed;

/// How often the counter is read.
const INTERVAL: Duration = Duration::from_millis(500);

/// The file holding `oom_kill` for the memory cgroup of `cgroups`.
fn counter_file(cgroups: &Cgroups) -> Option<PathBuf> {
    match cgroups {
        Cgroups::V1(dirs) => dirs.get("memory").map(|d| d.join("memory.oom_control")),
        Cgroups::V2(dir) => Some(dir.join("memory.events")),
    }
}

fn oom_kills(file: &PathBuf) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    parse_flat_keyed(&text).get("oom_kill").copied()
}

/// A running watch; [`OomWatch::finish`] stops it.
pub struct OomWatch {
    task: tokio::task::JoinHandle<()>,
    file: PathBuf,
    seen: Arc<AtomicU64>,
}

impl OomWatch {
    /// Stops watching; whether an OOM kill happened since the last check (the init's own, which
    /// races with its exit).
    pub fn finish(self) -> bool {
        self.task.abort();
        let seen = self.seen.load(Ordering::SeqCst);
        oom_kills(&self.file).is_some_and(|now| now > seen)
    }
}

/// Calls `on_oom` for each new OOM kill in the memory cgroup of `cgroups` until the cgroup is
/// gone or the watch is finished.
pub fn watch<F, Fut>(cgroups: &Cgroups, on_oom: F) -> Option<OomWatch>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let file = counter_file(cgroups)?;
    let seen = Arc::new(AtomicU64::new(oom_kills(&file)?));
    let task = tokio::spawn({
        let file = file.clone();
        let seen = seen.clone();
        async move {
            loop {
                tokio::time::sleep(INTERVAL).await;
                let Some(now) = oom_kills(&file) else { return };
                if now > seen.swap(now, Ordering::SeqCst) {
                    on_oom().await;
                }
            }
        }
    });
    Some(OomWatch { task, file, seen })
}
