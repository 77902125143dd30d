//! Task Stats: the metrics of a container's cgroups, as containerd expects them
//! (`io.containerd.cgroups.v1.Metrics` on cgroup v1 and hybrid hosts,
//! `io.containerd.cgroups.v2.Metrics` on the unified hierarchy). A cgroup removed under the
//! shim gives what containerd's runc shim gives: on v1 the controllers whose directories are
//! left (none: empty metrics), on v2 an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;

use crate::cgroups::Cgroups;

/// The cgroup v1 metrics type URL.
pub const V1_TYPE_URL: &str = "io.containerd.cgroups.v1.Metrics";
/// The cgroup v2 metrics type URL.
pub const V2_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// Why metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cgroup {dir} does not exist")]
    Gone { dir: PathBuf },
    #[error("encode metrics: {0}")]
    Encode(#[from] containerd_shim::protos::protobuf::Error),
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A `max`-or-number file (`pids.max`, `memory.max`): `max` is 0 (unlimited).
fn read_limit(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Parses `key value` lines (`memory.stat`, `cpu.stat`).
pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
        })
        .collect()
}

fn read_keyed(path: &Path) -> HashMap<String, u64> {
    std::fs::read_to_string(path)
        .map(|t| parse_flat_keyed(&t))
        .unwrap_or_default()
}

/// cgroup v1 metrics from per-controller directories (those that exist).
pub fn metrics_v1(dirs: &HashMap<String, PathBuf>) -> v1::Metrics {
    let dirs: HashMap<&str, &PathBuf> = dirs
        .iter()
        .filter(|(_, d)| d.is_dir())
        .map(|(c, d)| (c.as_str(), d))
        .collect();
    let mut m = v1::Metrics::new();
    if let Some(d) = dirs.get("pids") {
        m.pids = Some(v1::PidsStat {
            current: read_u64(&d.join("pids.current")),
            limit: read_limit(&d.join("pids.max")),
            ..Default::default()
        })
        .into();
    }
    if let Some(d) = dirs.get("cpuacct") {
        let stat = read_keyed(&d.join("cpuacct.stat"));
        let tick_ns = 1_000_000_000 / 100;
        let per_cpu = std::fs::read_to_string(d.join("cpuacct.usage_percpu"))
            .map(|t| {
                t.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let throttle = dirs
            .get("cpu")
            .map(|c| read_keyed(&c.join("cpu.stat")))
            .unwrap_or_default();
        m.cpu = Some(v1::CPUStat {
            usage: Some(v1::CPUUsage {
                total: read_u64(&d.join("cpuacct.usage")),
                user: stat.get("user").copied().unwrap_or(0) * tick_ns,
                kernel: stat.get("system").copied().unwrap_or(0) * tick_ns,
                per_cpu,
                ..Default::default()
            })
            .into(),
            throttling: Some(v1::Throttle {
                periods: throttle.get("nr_periods").copied().unwrap_or(0),
                throttled_periods: throttle.get("nr_throttled").copied().unwrap_or(0),
                throttled_time: throttle.get("throttled_time").copied().unwrap_or(0),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into();
    }
    if let Some(d) = dirs.get("memory") {
        let s = read_keyed(&d.join("memory.stat"));
        let g = |k: &str| s.get(k).copied().unwrap_or(0);
        let entry = |prefix: &str| v1::MemoryEntry {
            usage: read_u64(&d.join(format!("{prefix}.usage_in_bytes"))),
            max: read_u64(&d.join(format!("{prefix}.max_usage_in_bytes"))),
            failcnt: read_u64(&d.join(format!("{prefix}.failcnt"))),
            limit: read_u64(&d.join(format!("{prefix}.limit_in_bytes"))),
            ..Default::default()
        };
        m.memory = Some(v1::MemoryStat {
            cache: g("cache"),
            rss: g("rss"),
            rss_huge: g("rss_huge"),
            mapped_file: g("mapped_file"),
            dirty: g("dirty"),
            writeback: g("writeback"),
            pg_pg_in: g("pgpgin"),
            pg_pg_out: g("pgpgout"),
            pg_fault: g("pgfault"),
            pg_maj_fault: g("pgmajfault"),
            inactive_anon: g("inactive_anon"),
            active_anon: g("active_anon"),
            inactive_file: g("inactive_file"),
            active_file: g("active_file"),
            unevictable: g("unevictable"),
            hierarchical_memory_limit: g("hierarchical_memory_limit"),
            hierarchical_swap_limit: g("hierarchical_memsw_limit"),
            total_cache: g("total_cache"),
            total_rss: g("total_rss"),
            total_rss_huge: g("total_rss_huge"),
            total_mapped_file: g("total_mapped_file"),
            total_dirty: g("total_dirty"),
            total_writeback: g("total_writeback"),
            total_pg_pg_in: g("total_pgpgin"),
            total_pg_pg_out: g("total_pgpgout"),
            total_pg_fault: g("total_pgfault"),
            total_pg_maj_fault: g("total_pgmajfault"),
            total_inactive_anon: g("total_inactive_anon"),
            total_active_anon: g("total_active_anon"),
            total_inactive_file: g("total_inactive_file"),
            total_active_file: g("total_active_file"),
            total_unevictable: g("total_unevictable"),
            usage: Some(entry("memory")).into(),
            swap: Some(entry("memory.memsw")).into(),
            kernel: Some(entry("memory.kmem")).into(),
            kernel_tcp: Some(entry("memory.kmem.tcp")).into(),
            ..Default::default()
        })
        .into();
        let oom = read_keyed(&d.join("memory.oom_control"));
        m.memory_oom_control = Some(v1::MemoryOomControl {
            oom_kill_disable: oom.get("oom_kill_disable").copied().unwrap_or(0),
            under_oom: oom.get("under_oom").copied().unwrap_or(0),
            oom_kill: oom.get("oom_kill").copied().unwrap_or(0),
            ..Default::default()
        })
        .into();
    }
    m
}

/// cgroup v2 metrics from the unified directory.
pub fn metrics_v2(d: &Path) -> v2::Metrics {
    let mut m = v2::Metrics::new();
    m.pids = Some(v2::PidsStat {
        current: read_u64(&d.join("pids.current")),
        limit: read_limit(&d.join("pids.max")),
        ..Default::default()
    })
    .into();
    let cpu = read_keyed(&d.join("cpu.stat"));
    let c = |k: &str| cpu.get(k).copied().unwrap_or(0);
    m.cpu = Some(v2::CPUStat {
        usage_usec: c("usage_usec"),
        user_usec: c("user_usec"),
        system_usec: c("system_usec"),
        nr_periods: c("nr_periods"),
        nr_throttled: c("nr_throttled"),
        throttled_usec: c("throttled_usec"),
        ..Default::default()
    })
    .into();
    let s = read_keyed(&d.join("memory.stat"));
    let g = |k: &str| s.get(k).copied().unwrap_or(0);
    m.memory = Some(v2::MemoryStat {
        anon: g("anon"),
        file: g("file"),
        kernel_stack: g("kernel_stack"),
        slab: g("slab"),
        sock: g("sock"),
        shmem: g("shmem"),
        file_mapped: g("file_mapped"),
        file_dirty: g("file_dirty"),
        file_writeback: g("file_writeback"),
        anon_thp: g("anon_thp"),
        inactive_anon: g("inactive_anon"),
        active_anon: g("active_anon"),
        inactive_file: g("inactive_file"),
        active_file: g("active_file"),
        unevictable: g("unevictable"),
        slab_reclaimable: g("slab_reclaimable"),
        slab_unreclaimable: g("slab_unreclaimable"),
        pgfault: g("pgfault"),
        pgmajfault: g("pgmajfault"),
        usage: read_u64(&d.join("memory.current")),
        usage_limit: read_limit(&d.join("memory.max")),
        swap_usage: read_u64(&d.join("memory.swap.current")),
        swap_limit: read_limit(&d.join("memory.swap.max")),
        max_usage: read_u64(&d.join("memory.peak")),
        ..Default::default()
    })
    .into();
    let ev = read_keyed(&d.join("memory.events"));
    let e = |k: &str| ev.get(k).copied().unwrap_or(0);
    m.memory_events = Some(v2::MemoryEvents {
        low: e("low"),
        high: e("high"),
        max: e("max"),
        oom: e("oom"),
        oom_kill: e("oom_kill"),
        ..Default::default()
    })
    .into();
    m
}

/// The metrics of `cgroups`, packed for a Stats response.
pub fn collect(cgroups: &Cgroups) -> Result<Any, StatsError> {
    let (type_url, value) = match cgroups {
        Cgroups::V1(dirs) => (V1_TYPE_URL, metrics_v1(dirs).write_to_bytes()?),
        Cgroups::V2(dir) if !dir.join("cgroup.controllers").exists() => {
            return Err(StatsError::Gone { dir: dir.clone() })
        }
        Cgroups::V2(dir) => (V2_TYPE_URL, metrics_v2(dir).write_to_bytes()?),
    };
    Ok(Any {
        type_url: type_url.to_owned(),
        value,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_metrics_from_files() {
        let d = std::env::temp_dir().join(format!("nixenv-shim-stats-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("memory.current"), "4096\n").unwrap();
        std::fs::write(d.join("memory.max"), "max\n").unwrap();
        std::fs::write(d.join("memory.stat"), "anon 1024\ninactive_file 512\n").unwrap();
        std::fs::write(d.join("cpu.stat"), "usage_usec 77\n").unwrap();
        std::fs::write(d.join("pids.current"), "2\n").unwrap();
        std::fs::write(d.join("memory.events"), "oom 1\noom_kill 1\n").unwrap();
        let m = metrics_v2(&d);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, 0);
        assert_eq!(m.memory.anon, 1024);
        assert_eq!(m.memory.inactive_file, 512);
        assert_eq!(m.cpu.usage_usec, 77);
        assert_eq!(m.pids.current, 2);
        assert_eq!(m.memory_events.oom_kill, 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn own_cgroups_give_metrics() {
        let cgroups = crate::cgroups::CgroupFs::host()
            .of_pid(std::process::id())
            .unwrap();
        let any = collect(&cgroups).unwrap();
        assert!(any.type_url == V1_TYPE_URL || any.type_url == V2_TYPE_URL);
    }

    /// Directory `rel` under `root`, with `files` (name, content) in it.
    fn cgroup_dir(root: &Path, rel: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = root.join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, content) in files {
            std::fs::write(dir.join(name), content).unwrap();
        }
        dir
    }

    #[test]
    fn v1_metrics_come_from_the_controllers_left() {
        let d = tempfile::tempdir().unwrap();
        let files = [
            ("memory.usage_in_bytes", "8192\n"),
            ("memory.oom_control", "oom_kill 1\n"),
        ];
        cgroup_dir(d.path(), "memory/k8s.io/abc", &files);
        let dirs: HashMap<String, PathBuf> = ["memory", "cpuacct", "pids"]
            .iter()
            .map(|c| (c.to_string(), d.path().join(c).join("k8s.io/abc")))
            .collect();
        let any = collect(&Cgroups::V1(dirs.clone())).unwrap();
        assert_eq!(any.type_url, V1_TYPE_URL);
        let m = v1::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.memory.usage.usage, 8192);
        assert_eq!(m.memory_oom_control.oom_kill, 1);
        assert!(m.cpu.is_none() && m.pids.is_none(), "{m:?}");

        // Every directory removed (as containerd's runc shim answers then): empty metrics.
        std::fs::remove_dir_all(d.path().join("memory")).unwrap();
        let any = collect(&Cgroups::V1(dirs)).unwrap();
        let m = v1::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m, v1::Metrics::new());
    }

    #[test]
    fn a_removed_v2_cgroup_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let dir = cgroup_dir(d.path(), "kubepods/abc", &[("memory.current", "4096\n")]);
        // A v2 cgroup directory always has this file.
        std::fs::write(dir.join("cgroup.controllers"), "memory\n").unwrap();
        let any = collect(&Cgroups::V2(dir.clone())).unwrap();
        let m = v2::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!((any.type_url.as_str(), m.memory.usage), (V2_TYPE_URL, 4096));
        std::fs::remove_dir_all(&dir).unwrap();
        let e = collect(&Cgroups::V2(dir.clone())).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cgroup {} does not exist", dir.display())
        );
    }
}
