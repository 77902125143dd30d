//! One gc run: probe pins, decide and retire under the exclusive gc lock, remove the trash.
//! See the module documentation of [`crate::gc`] for the concurrency protocol.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::nix::StorePath;
use crate::pin;
use crate::store::view::Views;
use crate::store::Store;

use super::collect::{self, Kept, Policy};
use super::delete::{self, STAGING_PREFIX, TRASH_PREFIX};
use super::roots::{self, ContainerProbe};
use super::{inventory, usage, GcError, GcLock};

/// Default [`GcOptions::pin_grace`].
pub const DEFAULT_PIN_GRACE: Duration = Duration::from_secs(600);

/// What a gc run may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcOptions {
    /// Keep paths used within this long (zero: keep only what pins reach).
    pub keep_since: Duration,
    /// Remove only until the store is at most this many bytes.
    pub max_size: Option<u64>,
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// Pins younger than this are live even when their container is not found.
    pub pin_grace: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            keep_since: Duration::ZERO,
            max_size: None,
            dry_run: false,
            pin_grace: DEFAULT_PIN_GRACE,
        }
    }
}

/// A removed (or, in a dry run, removable) path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub path: StorePath,
    pub size: u64,
    pub last_use: SystemTime,
}

/// A dropped (or droppable) stale pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StalePin {
    pub container_id: String,
    pub reference: String,
    pub reason: String,
}

/// A leftover of a crash, removed (or removable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub file: PathBuf,
    pub what: &'static str,
    pub size: u64,
}

/// What a gc run did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub dry_run: bool,
    /// In removal order.
    pub removed: Vec<Removed>,
    pub stale_pins: Vec<StalePin>,
    pub leftovers: Vec<Leftover>,
    /// Live pins.
    pub live_pins: usize,
    /// Valid paths and their bytes before the run.
    pub paths_before: usize,
    pub size_before: u64,
    /// Kept paths by reason: (count, bytes).
    pub kept: BTreeMap<Kept, (usize, u64)>,
    /// Closure views removed with a path they held, and views of earlier boots or
    /// unfinished builds (see [`crate::store::view`]).
    pub views_removed: usize,
    /// Records of gone containers removed from `{state-dir}/history` (older than
    /// [`pin::HISTORY_KEEP`]).
    pub history_pruned: usize,
}

impl GcReport {
    /// Bytes freed by removing paths (NAR sizes) and leftovers.
    pub fn freed(&self) -> u64 {
        self.removed.iter().map(|r| r.size).sum::<u64>()
            + self.leftovers.iter().map(|l| l.size).sum::<u64>()
    }

    /// Valid paths left and their bytes.
    pub fn after(&self) -> (usize, u64) {
        (
            self.paths_before - self.removed.len(),
            self.size_before - self.removed.iter().map(|r| r.size).sum::<u64>(),
        )
    }
}

/// Collects garbage in `store`. See [`crate::gc`].
pub fn collect_garbage<P: ContainerProbe>(
    store: &Store,
    probe: &P,
    opts: &GcOptions,
) -> Result<GcReport, GcError> {
    let state_dir = store.state_dir();
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..GcReport::default()
    };
    let _run = if opts.dry_run {
        None
    } else {
        Some(GcLock::run(state_dir)?)
    };

    // Trash of an interrupted run.
    for t in delete::entries_with_prefix(store, TRASH_PREFIX)? {
        report.leftovers.push(Leftover {
            size: delete::tree_size(&t),
            file: t,
            what: "trash of an interrupted gc",
        });
    }
    if !opts.dry_run {
        delete::purge_trash(store)?;
    }

    // Phase 1, no gc lock: ask the runtimes about every pin (spawns processes).
    let probed = roots::classify(state_dir, probe, SystemTime::now(), opts.pin_grace)?;
    let stale_then: HashMap<String, (SystemTime, String)> = probed
        .into_iter()
        .filter_map(|s| s.stale.map(|why| (s.pin.container_id, (s.written, why))))
        .collect();

    // Phase 2: decide and retire, with every pull and pin held off.
    let gc_lock = if opts.dry_run {
        GcLock::shared(state_dir)?
    } else {
        GcLock::exclusive(state_dir)?
    };
    let now = SystemTime::now();
    let mut live_roots: BTreeSet<StorePath> = BTreeSet::new();
    let mut stale = Vec::new();
    for p in pin::list(state_dir)? {
        let written = roots::pin_written(state_dir, &p.container_id);
        match stale_then.get(&p.container_id) {
            Some((w, why)) if *w == written => stale.push((p, written, why.clone())),
            _ => {
                report.live_pins += 1;
                live_roots.extend(p.paths.iter().cloned());
                live_roots.extend(p.closure.iter().cloned());
            }
        }
    }
    let (entries, invalid) = inventory::entries(store)?;
    // A path without a valid record (lost after a power failure, say) that a live pin names
    // may be mounted in a running container: leave it, and say so.
    let invalid: Vec<StorePath> = invalid
        .into_iter()
        .filter(|p| {
            let pinned = live_roots.contains(p);
            if pinned {
                tracing::warn!(path = %p, "store path without a valid record is pinned: kept");
            }
            !pinned
        })
        .collect();
    let plan = collect::plan(
        &entries,
        &live_roots,
        &Policy {
            keep_since: opts.keep_since,
            max_size: opts.max_size,
            now,
        },
    );
    report.paths_before = entries.len();
    report.size_before = plan.total;
    let by_path: BTreeMap<&StorePath, &collect::Entry> =
        entries.iter().map(|e| (&e.path, e)).collect();
    for (p, k) in &plan.kept {
        let slot = report.kept.entry(*k).or_default();
        slot.0 += 1;
        slot.1 += by_path.get(p).map_or(0, |e| e.size);
    }
    for (p, _, why) in &stale {
        report.stale_pins.push(StalePin {
            container_id: p.container_id.clone(),
            reference: p.reference.clone(),
            reason: why.clone(),
        });
    }
    for p in &plan.remove {
        let e = by_path[p];
        report.removed.push(Removed {
            path: p.clone(),
            size: e.size,
            last_use: e.last_use,
        });
    }
    for p in &invalid {
        report.leftovers.push(Leftover {
            file: store.real_path(p),
            what: "store path without a valid record",
            size: delete::tree_size(&store.real_path(p)),
        });
    }
    let staging = delete::entries_with_prefix(store, STAGING_PREFIX)?;
    for s in &staging {
        report.leftovers.push(Leftover {
            file: s.clone(),
            what: "staging area of an interrupted install",
            size: delete::tree_size(s),
        });
    }
    let orphans = delete::orphan_records(store)?;
    for o in &orphans {
        report.leftovers.push(Leftover {
            file: usage::record_file(store, o),
            what: "record of an absent path",
            size: 0,
        });
    }
    if opts.dry_run {
        return Ok(report);
    }

    for (p, written, why) in &stale {
        // Re-check: a pin rewritten since it was probed belongs to a new container.
        if roots::pin_written(state_dir, &p.container_id) == *written {
            pin::retire(state_dir, &p.container_id)?;
            tracing::info!(container = %p.container_id, reference = %p.reference, reason = %why, "dropped stale pin");
        }
    }
    report.history_pruned = pin::prune_history(state_dir, pin::HISTORY_KEEP)?;
    let pinned: Vec<StorePath> = plan
        .kept
        .iter()
        .filter(|(_, k)| **k == Kept::Pinned)
        .map(|(p, _)| p.clone())
        .collect();
    usage::touch(store, &pinned);
    // Views go before their paths: no view outlives a path it holds (hard links would keep
    // the path's files, and show them to the next container of that closure).
    let doomed: BTreeSet<StorePath> = plan.remove.iter().chain(invalid.iter()).cloned().collect();
    let collected = Views::open(state_dir)?.collect(&doomed)?;
    report.views_removed = collected.views + collected.leftovers;
    for p in plan.remove.iter().chain(invalid.iter()) {
        delete::retire(store, p)?;
        tracing::info!(path = %p, "removed");
    }
    for s in &staging {
        delete::remove_stale_staging(store, s)?;
    }
    for o in &orphans {
        delete::remove_orphan_record(store, o)?;
    }
    drop(gc_lock);

    // Phase 3: the slow part, without holding anyone off.
    delete::purge_trash(store)?;
    Ok(report)
}
