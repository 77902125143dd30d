//! The order of installs in one pull: which resolved path may start downloading, and which
//! downloaded path may be committed. Pure bookkeeping over the reference graph; no I/O.
//!
//! Two rules keep a pull of any width in bounded memory and free of deadlock:
//!
//! - **Launch** a path (take its store lock, download, stage) only once each of its
//!   references (other than itself) is launched or valid. The launched-but-not-valid paths
//!   are then closed under references, so in an acyclic graph one of them always has all its
//!   references valid and can commit: the walk may cap how many paths are launched at once
//!   (open lock files, staging areas) without ever waiting on a path it has not launched.
//! - **Commit** a staged path once each of its references is valid, so the store never holds
//!   a valid path with a missing reference.
//!
//! Each edge is visited a constant number of times: a path that becomes launched or valid
//! releases exactly the paths that were waiting for it.

use std::collections::{HashMap, HashSet};

use crate::nix::StorePath;

/// Where each path of the pull stands; see the module documentation.
#[derive(Default)]
pub struct Schedule {
    /// Launched (lock taken or being taken, downloading, staged, committing), not yet valid.
    launched: HashSet<StorePath>,
    /// Valid in the store (found valid, or committed by this pull).
    valid: HashSet<StorePath>,
    /// Resolved paths not yet launchable: how many of their references are neither launched
    /// nor valid.
    unlaunchable: HashMap<StorePath, usize>,
    /// Reference → the resolved paths waiting for it to be launched or valid.
    launch_waiters: HashMap<StorePath, Vec<StorePath>>,
    /// Staged paths not yet committable: how many of their references are not valid.
    uncommittable: HashMap<StorePath, usize>,
    /// Reference → the staged paths waiting for it to be valid.
    commit_waiters: HashMap<StorePath, Vec<StorePath>>,
}

/// What a change of state made possible.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Paths that may now be launched.
    pub launch: Vec<StorePath>,
    /// Staged paths that may now be committed.
    pub commit: Vec<StorePath>,
}

impl Schedule {
    /// `path` was resolved with `references`: whether it may be launched now. If not, it is
    /// returned by a later [`Schedule::launched`] or [`Schedule::valid`].
    pub fn resolved(&mut self, path: &StorePath, references: &[StorePath]) -> bool {
        let (launched, valid) = (&self.launched, &self.valid);
        wait(
            &mut self.unlaunchable,
            &mut self.launch_waiters,
            path,
            references,
            |r| launched.contains(r) || valid.contains(r),
        )
    }

    /// `path` is being launched: returns the paths that may now be launched too.
    pub fn launched(&mut self, path: &StorePath) -> Vec<StorePath> {
        self.launched.insert(path.clone());
        release(&mut self.unlaunchable, &mut self.launch_waiters, path)
    }

    /// `path` was staged with `references`: whether it may be committed now. If not, it is
    /// returned by a later [`Schedule::valid`].
    pub fn staged(&mut self, path: &StorePath, references: &[StorePath]) -> bool {
        let valid = &self.valid;
        wait(
            &mut self.uncommittable,
            &mut self.commit_waiters,
            path,
            references,
            |r| valid.contains(r),
        )
    }

    /// `path` is valid in the store (found so, or committed): what that released.
    pub fn valid(&mut self, path: &StorePath) -> Released {
        self.launched.remove(path);
        self.valid.insert(path.clone());
        Released {
            launch: release(&mut self.unlaunchable, &mut self.launch_waiters, path),
            commit: release(&mut self.uncommittable, &mut self.commit_waiters, path),
        }
    }

    /// Whether `path` is valid in the store.
    pub fn is_valid(&self, path: &StorePath) -> bool {
        self.valid.contains(path)
    }

    /// How many paths are launched and not yet valid.
    pub fn in_flight(&self) -> usize {
        self.launched.len()
    }

    /// A resolved or staged path still waiting for a reference, if any: after the walk has
    /// ended, one means the graph could not be completed.
    pub fn stuck(&self) -> Option<&StorePath> {
        self.unlaunchable
            .keys()
            .chain(self.uncommittable.keys())
            .min()
    }
}

/// Makes `path` wait for each of its `references` (itself aside) that is not `ready` yet;
/// returns whether it need not wait at all.
fn wait(
    waiting: &mut HashMap<StorePath, usize>,
    waiters: &mut HashMap<StorePath, Vec<StorePath>>,
    path: &StorePath,
    references: &[StorePath],
    ready: impl Fn(&StorePath) -> bool,
) -> bool {
    let mut missing = 0;
    for r in references.iter().filter(|r| *r != path && !ready(r)) {
        waiters.entry(r.clone()).or_default().push(path.clone());
        missing += 1;
    }
    if missing > 0 {
        waiting.insert(path.clone(), missing);
    }
    missing == 0
}

/// The paths waiting for `path` (taken once: a second call releases nothing) that now wait
/// for nothing else.
fn release(
    waiting: &mut HashMap<StorePath, usize>,
    waiters: &mut HashMap<StorePath, Vec<StorePath>>,
    path: &StorePath,
) -> Vec<StorePath> {
    let mut free = Vec::new();
    for w in waiters.remove(path).unwrap_or_default() {
        if let Some(n) = waiting.get_mut(&w) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&w);
                free.push(w);
            }
        }
    }
    free
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(n: u8) -> StorePath {
        StorePath::new([n; 20], &format!("p{n}")).unwrap()
    }

    #[test]
    fn a_path_launches_after_its_references_and_commits_after_they_are_valid() {
        // 1 -> {2, 3}, 2 -> {3}, 3 -> {3} (a self-reference).
        let mut s = Schedule::default();
        assert!(!s.resolved(&sp(1), &[sp(2), sp(3)]));
        assert!(!s.resolved(&sp(2), &[sp(3)]));
        assert!(s.resolved(&sp(3), &[sp(3)]));
        assert_eq!(s.launched(&sp(3)), vec![sp(2)]);
        assert_eq!(s.launched(&sp(2)), vec![sp(1)]);
        assert!(s.launched(&sp(1)).is_empty());
        assert_eq!(s.in_flight(), 3);
        // 1 and 2 are staged before 3: both wait.
        assert!(!s.staged(&sp(1), &[sp(2), sp(3)]));
        assert!(!s.staged(&sp(2), &[sp(3)]));
        assert!(s.staged(&sp(3), &[sp(3)]));
        let r = s.valid(&sp(3));
        assert_eq!(r.commit, vec![sp(2)]);
        assert!(r.launch.is_empty());
        assert_eq!(s.valid(&sp(2)).commit, vec![sp(1)]);
        assert_eq!(s.valid(&sp(1)), Released::default());
        assert_eq!(s.in_flight(), 0);
        assert_eq!(s.stuck(), None);
    }

    #[test]
    fn a_reference_found_valid_releases_both_waits_once() {
        let mut s = Schedule::default();
        assert!(!s.resolved(&sp(1), &[sp(2), sp(2)]));
        let r = s.valid(&sp(2));
        assert_eq!(r.launch, vec![sp(1)]);
        assert!(s.is_valid(&sp(2)));
        // Launched and then valid: the waiter was released at launch, not again.
        assert!(!s.resolved(&sp(3), &[sp(4)]));
        assert_eq!(s.launched(&sp(4)), vec![sp(3)]);
        assert!(s.valid(&sp(4)).launch.is_empty());
    }

    #[test]
    fn members_of_a_cycle_stay_stuck() {
        let mut s = Schedule::default();
        assert!(!s.resolved(&sp(1), &[sp(2)]));
        assert!(!s.resolved(&sp(2), &[sp(1)]));
        assert_eq!(s.stuck(), Some(&sp(1).min(sp(2))));
    }
}
