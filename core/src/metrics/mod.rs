//! Node metrics in the Prometheus text format: `nixenv metrics` prints them, or writes them
//! atomically as a textfile for node-exporter's textfile collector.
//!
//! The processes that do the work are short-lived and many (one `nixenv-hook shim-prepare` per
//! container, `nixenv-runc`, `nixenv pull`, `nixenv gc`), so:
//!
//! - **counters** persist on the node in `{state-dir}/metrics/counters.json` ([`counters`]):
//!   a process adds what it counted ([`note`]) to an in-memory delta and writes it with one
//!   locked read-modify-write ([`flush`]), once, at its end: a container start costs one small
//!   file update, never fsynced. A failure to write is logged and changes nothing else: no
//!   container start fails because of metrics;
//! - **gauges** (store paths and bytes, pins, closure views) are computed when the metrics
//!   are read ([`gauges`]).
//!
//! Label values come from small fixed sets ([`FailureCause`]), never from paths or URLs.

pub mod cause;
pub mod counters;
pub mod exposition;
pub mod gauges;
pub mod histogram;
pub mod tally;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

pub use cause::FailureCause;
pub use counters::Counters;
pub use exposition::{Family, Kind, Sample};
pub use tally::Tally;

use crate::gc::GcError;
use crate::pin::PinError;
use crate::store::view::ViewError;
use crate::store::StoreError;
use crate::substituter::{Progress, SubstituteError};

/// Why the metrics could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gc(#[from] GcError),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    View(#[from] ViewError),
}

/// What this process counted and has not written yet.
static PENDING: Mutex<Option<Counters>> = Mutex::new(None);

/// Counts something in this process; [`flush`] writes it to the node's counters.
pub fn note(f: impl FnOnce(&mut Counters)) {
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    f(pending.get_or_insert_with(Counters::default));
}

/// Counts a pull that went to the substituters: what `tally` saw, how long it took, and the
/// cause of its failure, if it failed.
pub fn note_pull<P: Progress>(
    tally: &Tally<'_, P>,
    took: Duration,
    error: Option<&SubstituteError>,
) {
    note(|c| {
        c.pulls += 1;
        c.pull_bytes += tally.bytes();
        c.path_hits += tally.present();
        c.path_fetches += tally.installed();
        c.pull_duration.observe(took.as_secs_f64());
        if let Some(e) = error {
            *c.pull_failures
                .entry(FailureCause::of(e).as_str().to_owned())
                .or_default() += 1;
        }
    });
}

/// Writes what this process counted to the counters under `state_dir` (nothing if it counted
/// nothing). Best effort: a failure is logged, and the counts are lost.
pub fn flush(state_dir: &Path) {
    let delta = PENDING.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(delta) = delta.filter(|d| !d.is_empty()) else {
        return;
    };
    if let Err(e) = counters::update(state_dir, &delta) {
        tracing::warn!(error = %e, "cannot write metrics counters");
    }
}

/// Every metric of the node under `state_dir`, as exposition text.
pub fn render(state_dir: &Path) -> Result<String, MetricsError> {
    let c = counters::load(state_dir)?;
    let g = gauges::read(state_dir)?;
    Ok(exposition::render(&families(&c, &g)))
}

/// The metric families, in documentation order (README, "Metrics").
pub fn families(c: &Counters, g: &gauges::Gauges) -> Vec<Family> {
    use Kind::{Counter, Gauge};
    let failures = FailureCause::ALL
        .iter()
        .map(|cause| Sample {
            suffix: "",
            labels: vec![("cause", cause.as_str().to_owned())],
            value: c.pull_failures.get(cause.as_str()).copied().unwrap_or(0) as f64,
        })
        .collect();
    vec![
        Family::single(
            "nixenv_pulls_total",
            "Pulls that fetched from a substituter (nixenv pull, container starts), successful or not.",
            Counter,
            c.pulls as f64,
        ),
        Family {
            name: "nixenv_pull_failures_total",
            help: "Failed pulls, by cause.",
            kind: Counter,
            samples: failures,
        },
        Family::single(
            "nixenv_pull_downloaded_bytes_total",
            "Bytes received from substituters (compressed NARs; restarted downloads included).",
            Counter,
            c.pull_bytes as f64,
        ),
        Family::histogram(
            "nixenv_pull_duration_seconds",
            "Duration of pulls that fetched from a substituter.",
            &c.pull_duration,
        ),
        Family::single(
            "nixenv_store_path_hits_total",
            "Store paths of a materialised closure already valid in the node store.",
            Counter,
            c.path_hits as f64,
        ),
        Family::single(
            "nixenv_store_path_fetches_total",
            "Store paths downloaded from a substituter and installed.",
            Counter,
            c.path_fetches as f64,
        ),
        Family::single(
            "nixenv_gc_runs_total",
            "Garbage collections run (dry runs aside).",
            Counter,
            c.gc_runs as f64,
        ),
        Family::single(
            "nixenv_gc_freed_bytes_total",
            "Bytes freed by garbage collection (NarSize of removed paths, and crash leftovers).",
            Counter,
            c.gc_freed_bytes as f64,
        ),
        Family::single(
            "nixenv_gc_removed_paths_total",
            "Store paths removed by garbage collection.",
            Counter,
            c.gc_removed_paths as f64,
        ),
        Family::histogram(
            "nixenv_prepare_duration_seconds",
            "Duration of preparing a container's environment (resolve, pull, pin, rewrite the spec).",
            &c.prepare_duration,
        ),
        Family::single(
            "nixenv_store_paths",
            "Valid store paths in the node store.",
            Gauge,
            g.store_paths as f64,
        ),
        Family::single(
            "nixenv_store_size_bytes",
            "NarSize of the valid store paths, summed.",
            Gauge,
            g.store_bytes as f64,
        ),
        Family::single(
            "nixenv_pins",
            "Pins: containers holding a closure (stale ones until gc drops them).",
            Gauge,
            g.pins as f64,
        ),
        Family::single(
            "nixenv_closure_views",
            "Closure views of this boot.",
            Gauge,
            g.closure_views as f64,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noted_counts_reach_the_file_once() {
        let d = tempfile::tempdir().unwrap();
        note(|c| c.gc_runs += 1);
        note(|c| c.gc_freed_bytes += 7);
        flush(d.path());
        flush(d.path());
        let c = counters::load(d.path()).unwrap();
        assert_eq!((c.gc_runs, c.gc_freed_bytes), (1, 7));

        let text = render(d.path()).unwrap();
        assert!(text.contains("\nnixenv_gc_runs_total 1\n"), "{text}");
        assert!(text.contains("\nnixenv_gc_freed_bytes_total 7\n"), "{text}");
        assert!(
            text.contains("nixenv_pull_failures_total{cause=\"not_found\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("\nnixenv_store_paths 0\n"), "{text}");
    }
}
