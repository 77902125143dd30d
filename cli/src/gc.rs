//! `nixenv gc [--dry-run] [--keep-since DURATION] [--max-size SIZE]`: remove store paths no
//! live pin reaches, least recently used first; print what was freed. The logic lives in
//! `nixenv_core::gc`.

use std::io::Write;
use std::time::{Duration, SystemTime};

use nixenv_core::config::{parse_size, ConfigError};
use nixenv_core::gc::{self, GcError, GcOptions, Kept, RuncProbe};
use nixenv_core::metrics;
use nixenv_core::store::{Store, StoreError};

use crate::Globals;

/// Arguments of `nixenv gc`.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Print what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Keep paths used (pulled, pinned) within this long, e.g. `7d`, `12h` (default: config
    /// `gc-keep-since`, else 0: keep only what running containers use).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub keep_since: Option<Duration>,

    /// Remove least recently used paths only until the store fits in SIZE, e.g. `20G`
    /// (default: config `gc-max-size`, else remove every unused path).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub max_size: Option<u64>,

    /// Pins younger than this count as live even if their container is not found yet.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10m")]
    pub pin_grace: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("expected a duration like 7d or 12h: {e}"))
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

/// Why `nixenv gc` failed.
#[derive(Debug, thiserror::Error)]
pub enum GcCliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("gc: {0}")]
    Gc(#[from] GcError),
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
}

/// `1.5 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `3h ago`, `2d ago`, `just now`: the largest unit only.
pub fn ago(t: SystemTime, now: SystemTime) -> String {
    let s = now.duration_since(t).unwrap_or_default().as_secs();
    let (n, unit) = match s {
        0..=59 => return "just now".into(),
        60..=3599 => (s / 60, "m"),
        3600..=86_399 => (s / 3600, "h"),
        _ => (s / 86_400, "d"),
    };
    format!("{n}{unit} ago")
}

pub fn run(globals: &Globals, args: &GcArgs) -> Result<(), GcCliError> {
    let cfg = globals.config()?;
    let store = Store::open(&cfg.state_dir)?;
    let opts = GcOptions {
        keep_since: args
            .keep_since
            .or(cfg.gc_keep_since)
            .unwrap_or(Duration::ZERO),
        max_size: args.max_size.or(cfg.gc_max_size),
        dry_run: args.dry_run,
        pin_grace: args.pin_grace,
    };
    let probe = RuncProbe::new(cfg.runc.clone().unwrap_or_else(|| "runc".into()));
    let report = gc::collect_garbage(&store, &probe, &opts)?;
    if !report.dry_run {
        metrics::note(|m| {
            m.gc_runs += 1;
            m.gc_freed_bytes += report.freed();
            m.gc_removed_paths += report.removed.len() as u64;
        });
        metrics::flush(&cfg.state_dir);
    }

    let now = SystemTime::now();
    let (verb, pin_verb, left_verb, total_verb) = if report.dry_run {
        (
            "would remove",
            "would drop stale pin",
            "would remove leftover",
            "would free",
        )
    } else {
        ("removed", "dropped stale pin", "removed leftover", "freed")
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let w = |out: &mut dyn Write, line: String| writeln!(out, "{line}").map_err(GcCliError::Stdout);
    for p in &report.stale_pins {
        w(
            &mut out,
            format!(
                "{pin_verb} {} ({}): {}",
                p.container_id, p.reference, p.reason
            ),
        )?;
    }
    for r in &report.removed {
        w(
            &mut out,
            format!(
                "{verb} {}  {}  last used {}",
                r.path,
                human_size(r.size),
                ago(r.last_use, now)
            ),
        )?;
    }
    for l in &report.leftovers {
        w(
            &mut out,
            format!(
                "{left_verb} {} ({}, {})",
                l.file.display(),
                l.what,
                human_size(l.size)
            ),
        )?;
    }
    if report.views_removed > 0 {
        w(
            &mut out,
            format!("{} closure view(s) removed", report.views_removed),
        )?;
    }
    if report.history_pruned > 0 {
        w(
            &mut out,
            format!(
                "{} record(s) of containers gone for more than 30 days removed",
                report.history_pruned
            ),
        )?;
    }
    let (paths_after, size_after) = report.after();
    let kept = |k: Kept| report.kept.get(&k).map_or(0, |c| c.0);
    w(
        &mut out,
        format!(
            "{total_verb} {} in {} path(s){}; store {} {} in {} path(s) ({} pinned by {} container(s), {} recent, {} within max-size)",
            human_size(report.freed()),
            report.removed.len(),
            if report.stale_pins.is_empty() { String::new() } else { format!(", {} stale pin(s)", report.stale_pins.len()) },
            if report.dry_run { "would be" } else { "now" },
            human_size(size_after),
            paths_after,
            kept(Kept::Pinned),
            report.live_pins,
            kept(Kept::Recent),
            kept(Kept::Budget),
        ),
    )?;
    out.flush().map_err(GcCliError::Stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
        let now = SystemTime::now();
        assert_eq!(ago(now, now), "just now");
        assert_eq!(ago(now - Duration::from_secs(7200), now), "2h ago");
        assert_eq!(
            ago(now - Duration::from_secs(3 * 86_400 + 5), now),
            "3d ago"
        );
    }
}
