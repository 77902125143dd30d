//! Task Stats: the cgroup metrics of a container's init process, as containerd expects them
//! (`io.containerd.cgroups.v1.Metrics` on cgroup v1 and hybrid hosts,
//! `io.containerd.cgroups.v2.Metrics` on the unified hierarchy).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;

/// The cgroup v1 metrics type URL.
pub const V1_TYPE_URL: &str = "io.containerd.cgroups.v1.Metrics";
/// The cgroup v2 metrics type URL.
pub const V2_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Why metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("read cgroups of pid {pid}: {source}")]
    Proc {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("encode metrics: {0}")]
    Encode(#[from] containerd_shim::protos::protobuf::Error),
}

/// Where a process's cgroups are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// The unified hierarchy: one directory.
    V2(PathBuf),
    /// Per controller directories (a hybrid host counts as v1: controllers live there).
    V1(HashMap<String, PathBuf>),
}

/// Parses `/proc/<pid>/cgroup` against the cgroup root.
pub fn parse_proc_cgroup(text: &str, root: &Path, unified_only: bool) -> Cgroups {
    let mut v1 = HashMap::new();
    let mut unified = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            unified = Some(rel.to_owned());
            continue;
        }
        for c in controllers.split(',') {
            let c = c.trim_start_matches("name=");
            let joined = root.join(controllers.replace("name=", "")).join(rel);
            let dir = if joined.exists() {
                joined
            } else {
                root.join(c).join(rel)
            };
            v1.insert(c.to_owned(), dir);
        }
    }
    if unified_only || v1.is_empty() {
        return Cgroups::V2(root.join(unified.unwrap_or_default()));
    }
    Cgroups::V1(v1)
}

/// The cgroups of `pid`.
pub fn cgroups_of(pid: u32) -> Result<Cgroups, StatsError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|source| StatsError::Proc { pid, source })?;
    let unified_only = Path::new(CGROUP_ROOT).join("cgroup.controllers").exists();
    Ok(parse_proc_cgroup(
        &text,
        Path::new(CGROUP_ROOT),
        unified_only,
    ))
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

/// cgroup v1 metrics from per-controller directories.
pub fn metrics_v1(dirs: &HashMap<String, PathBuf>) -> v1::Metrics {
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

/// The metrics of `pid`'s cgroups, packed for a Stats response.
pub fn collect(pid: u32) -> Result<Any, StatsError> {
    let (type_url, value) = match cgroups_of(pid)? {
        Cgroups::V1(dirs) => (V1_TYPE_URL, metrics_v1(&dirs).write_to_bytes()?),
        Cgroups::V2(dir) => (V2_TYPE_URL, metrics_v2(&dir).write_to_bytes()?),
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
    fn hybrid_proc_cgroup_is_v1() {
        let text = "9:name=systemd:/\n4:memory:/k8s.io/abc\n2:cpu,cpuacct:/k8s.io/abc\n0::/\n";
        let Cgroups::V1(dirs) = parse_proc_cgroup(text, Path::new("/nonexistent"), false) else {
            panic!("expected v1")
        };
        assert_eq!(dirs["memory"], Path::new("/nonexistent/memory/k8s.io/abc"));
        assert_eq!(
            dirs["cpuacct"],
            Path::new("/nonexistent/cpuacct/k8s.io/abc")
        );
    }

    #[test]
    fn unified_proc_cgroup_is_v2() {
        let text = "0::/kubepods/pod1/abc\n";
        assert_eq!(
            parse_proc_cgroup(text, Path::new("/sys/fs/cgroup"), true),
            Cgroups::V2(PathBuf::from("/sys/fs/cgroup/kubepods/pod1/abc"))
        );
    }

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
        let any = collect(std::process::id()).unwrap();
        assert!(any.type_url == V1_TYPE_URL || any.type_url == V2_TYPE_URL);
    }
}
