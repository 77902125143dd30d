//! What to delete: a pure decision over the store's paths, their references and last uses.
//!
//! - A path reachable from a live pin is kept (*pinned*).
//! - Every other path gets an *effective last use*: the latest last use of itself and of
//!   every path that (transitively) refers to it, so a kept path's references are kept too
//!   and the store stays closed under references (a valid path's closure is valid).
//! - Paths whose effective last use is within `keep_since` are kept (*recent*).
//! - The rest are candidates, least recently used first; among equal times, referrers come
//!   before their references. Without `max_size` all candidates go; with it, candidates go
//!   only until the store (sum of NAR sizes) fits in `max_size`. Any prefix of that order is
//!   closed under referrers, so stopping early never strands a reference.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::nix::StorePath;

/// One valid store path, as gc sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: StorePath,
    /// Bytes (the NAR size).
    pub size: u64,
    pub last_use: SystemTime,
    /// Direct references (may include the path itself).
    pub references: Vec<StorePath>,
}

/// How much to collect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Keep paths (effectively) used within this long.
    pub keep_since: Duration,
    /// Stop once the store is at most this many bytes.
    pub max_size: Option<u64>,
    pub now: SystemTime,
}

/// Why a path stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kept {
    /// Reachable from a live pin.
    Pinned,
    /// Used within `keep_since` (itself or a path referring to it).
    Recent,
    /// The store fits `max_size` without removing it.
    Budget,
    /// Part of a reference cycle (not a valid Nix store; never removed).
    Cycle,
}

/// The decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Paths to remove, in removal order (each before the paths it refers to).
    pub remove: Vec<StorePath>,
    /// Every kept path and why.
    pub kept: BTreeMap<StorePath, Kept>,
    /// Sum of sizes of all paths.
    pub total: u64,
    /// Sum of sizes of `remove`.
    pub freed: u64,
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Decides what to remove. `live` are the roots of live pins (paths not in `entries` are
/// ignored: they are not installed).
pub fn plan(entries: &[Entry], live: &BTreeSet<StorePath>, policy: &Policy) -> Plan {
    let index: HashMap<&StorePath, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (&e.path, i))
        .collect();
    let refs: Vec<Vec<usize>> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut r: Vec<usize> = e
                .references
                .iter()
                .filter_map(|p| index.get(p).copied())
                .filter(|&j| j != i)
                .collect();
            r.sort_unstable();
            r.dedup();
            r
        })
        .collect();

    // Effective last use: propagate the maximum down the reference edges (live = MAX).
    let mut eff: Vec<Duration> = entries
        .iter()
        .map(|e| {
            if live.contains(&e.path) {
                Duration::MAX
            } else {
                since_epoch(e.last_use)
            }
        })
        .collect();
    let mut work: VecDeque<usize> = (0..entries.len()).collect();
    while let Some(i) = work.pop_front() {
        for &j in &refs[i] {
            if eff[j] < eff[i] {
                eff[j] = eff[i];
                work.push_back(j);
            }
        }
    }

    // Topological rank, referrers first (Kahn); paths on a cycle get none.
    let mut indegree = vec![0usize; entries.len()];
    for r in &refs {
        for &j in r {
            indegree[j] += 1;
        }
    }
    let mut rank: Vec<Option<usize>> = vec![None; entries.len()];
    let mut ready: VecDeque<usize> = (0..entries.len()).filter(|&i| indegree[i] == 0).collect();
    let mut next = 0;
    while let Some(i) = ready.pop_front() {
        rank[i] = Some(next);
        next += 1;
        for &j in &refs[i] {
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.push_back(j);
            }
        }
    }

    let cutoff = since_epoch(policy.now).saturating_sub(policy.keep_since);
    let mut plan = Plan {
        total: entries.iter().map(|e| e.size).sum(),
        ..Plan::default()
    };
    let mut candidates = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let why = if eff[i] == Duration::MAX {
            Some(Kept::Pinned)
        } else if eff[i] >= cutoff {
            Some(Kept::Recent)
        } else if rank[i].is_none() {
            Some(Kept::Cycle)
        } else {
            None
        };
        match why {
            Some(k) => {
                plan.kept.insert(e.path.clone(), k);
            }
            None => candidates.push(i),
        }
    }
    candidates.sort_by_key(|&i| (eff[i], rank[i]));
    let mut size = plan.total;
    for i in candidates {
        let e = &entries[i];
        if policy.max_size.is_some_and(|max| size <= max) {
            plan.kept.insert(e.path.clone(), Kept::Budget);
            continue;
        }
        size -= e.size;
        plan.freed += e.size;
        plan.remove.push(e.path.clone());
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(name: &str) -> StorePath {
        // A distinct valid hash per name.
        let h: String = name
            .bytes()
            .cycle()
            .take(32)
            .map(|b| b"0123456789abcdfghijklmnpqrsvwxyz"[(b as usize) % 32] as char)
            .collect();
        format!("/nix/store/{h}-{name}").parse().unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn e(name: &str, size: u64, used: u64, refs: &[&str]) -> Entry {
        Entry {
            path: sp(name),
            size,
            last_use: at(used),
            references: refs.iter().map(|r| sp(r)).collect(),
        }
    }

    /// app -> lib -> libc, tool -> libc, old -> oldlib, pinned -> libc.
    fn store() -> Vec<Entry> {
        vec![
            e("app", 10, 1000, &["app", "lib"]),
            e("lib", 20, 100, &["libc"]),
            e("libc", 40, 50, &[]),
            e("tool", 5, 500, &["libc"]),
            e("old", 1, 10, &["oldlib"]),
            e("oldlib", 2, 2000, &[]),
            e("pinned", 3, 1, &["libc"]),
        ]
    }

    fn policy(keep: u64, max: Option<u64>) -> Policy {
        Policy {
            keep_since: Duration::from_secs(keep),
            max_size: max,
            now: at(3000),
        }
    }

    fn names(v: &[StorePath]) -> Vec<&str> {
        v.iter().map(|p| p.name()).collect()
    }

    #[test]
    fn removes_everything_unpinned_least_recently_used_first_referrers_first() {
        let live: BTreeSet<_> = [sp("pinned")].into();
        let p = plan(&store(), &live, &policy(0, None));
        // old (10) before oldlib (whose own use is 2000 but effective... its own 2000),
        // tool 500, app 1000 and lib (effective 1000, after app).
        assert_eq!(names(&p.remove), ["old", "tool", "app", "lib", "oldlib"]);
        assert_eq!(p.kept[&sp("libc")], Kept::Pinned);
        assert_eq!(p.kept[&sp("pinned")], Kept::Pinned);
        assert_eq!(p.freed, 1 + 5 + 10 + 20 + 2);
        assert_eq!(p.total, 81);
    }

    #[test]
    fn keep_since_protects_recent_paths_and_their_references() {
        let p = plan(&store(), &BTreeSet::new(), &policy(2100, None));
        // cutoff 900: app (1000) keeps lib and libc; oldlib (2000) is recent itself.
        assert_eq!(names(&p.remove), ["pinned", "old", "tool"]);
        assert_eq!(p.kept[&sp("lib")], Kept::Recent);
        assert_eq!(p.kept[&sp("libc")], Kept::Recent);
    }

    #[test]
    fn max_size_stops_once_the_store_fits_and_never_strands_a_reference() {
        let p = plan(&store(), &BTreeSet::new(), &policy(0, Some(70)));
        // 81 total: pinned (3, used 1) -> 78, old (1) -> 77, tool (5) -> 72, app (10) -> 62.
        assert_eq!(names(&p.remove), ["pinned", "old", "tool", "app"]);
        assert_eq!(p.kept[&sp("lib")], Kept::Budget);
        let p = plan(&store(), &BTreeSet::new(), &policy(0, Some(1000)));
        assert!(p.remove.is_empty());
        // Whatever the budget, every kept path's references are kept.
        for max in 0..=81 {
            let p = plan(&store(), &BTreeSet::new(), &policy(0, Some(max)));
            let removed: BTreeSet<_> = p.remove.iter().collect();
            for entry in store() {
                if !removed.contains(&entry.path) {
                    for r in &entry.references {
                        assert!(
                            !removed.contains(r),
                            "max {max}: {} kept but {} removed",
                            entry.path,
                            r
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn cycles_and_unknown_references_are_kept_or_ignored() {
        let entries = vec![
            e("a", 1, 1, &["b", "missing"]),
            e("b", 1, 1, &["a"]),
            e("c", 1, 1, &["missing"]),
        ];
        let p = plan(&entries, &[sp("nothere")].into(), &policy(0, None));
        assert_eq!(names(&p.remove), ["c"]);
        assert_eq!(p.kept[&sp("a")], Kept::Cycle);
    }
}
