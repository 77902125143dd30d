//! Group commit of the store's `syncfs(2)`: threads committing paths at the same time share
//! one flush of the store's file system instead of issuing one each.
//!
//! A caller needs a flush that *starts* after its writes (a flush already running may have
//! passed them). [`Flusher::flush`] therefore asks for the flush after the ones started so
//! far: if none is running it runs one itself; if one is running it waits, and when that one
//! ends, one of the waiters runs the next flush for all of them. A pull of a wide closure,
//! which commits many small paths at once, so pays for a few flushes where it paid one per
//! path (and one flush writes back every tree and record the waiters wrote).
//!
//! Errors: a caller is told the outcome of the latest flush that ended when it wakes, which
//! started after its writes; if that flush failed, so does the caller's commit (a failure
//! reported to a path whose own flush succeeded is safe: the path is not committed and the
//! next pull installs it again).

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use nix::errno::Errno;

/// The flush itself: `syncfs` of the file system holding a directory (a parameter so tests
/// can watch and slow it).
pub(crate) type SyncFn = dyn Fn(&Path) -> Result<(), Errno> + Send + Sync;

/// Flushes one file system, in groups.
pub(crate) struct Flusher {
    dir: PathBuf,
    sync: Box<SyncFn>,
    state: Mutex<State>,
    ended: Condvar,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher")
            .field("dir", &self.dir)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// `syncfs(2)` of the file system that holds `dir`.
pub(crate) fn syncfs(dir: &Path) -> Result<(), Errno> {
    let dir = std::fs::File::open(dir)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    nix::unistd::syncfs(&dir)
}

#[derive(Debug)]
struct State {
    /// Flushes started so far (the number of the latest).
    started: u64,
    /// The number of the latest flush that ended, and its outcome.
    ended: u64,
    outcome: Result<(), Errno>,
    running: bool,
}

impl Default for State {
    fn default() -> Self {
        State {
            started: 0,
            ended: 0,
            outcome: Ok(()),
            running: false,
        }
    }
}

impl Flusher {
    /// A flusher of the file system that holds `dir` (opened at each flush).
    pub(crate) fn new(dir: &Path) -> Self {
        Self::with_sync(dir, Box::new(syncfs))
    }

    /// A flusher that flushes with `sync`.
    pub(crate) fn with_sync(dir: &Path, sync: Box<SyncFn>) -> Self {
        Flusher {
            dir: dir.to_owned(),
            sync,
            state: Mutex::new(State::default()),
            ended: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the counters consistent (they are only
        // changed together), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once a `syncfs` of the file system that started after this call has ended:
    /// everything the caller wrote before the call is then on disk.
    pub(crate) fn flush(&self) -> Result<(), Errno> {
        let mut st = self.lock();
        let need = st.started + 1;
        loop {
            if st.ended >= need {
                return st.outcome;
            }
            if st.running {
                st = self.ended.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.started += 1;
            st.running = true;
            let number = st.started;
            drop(st);
            let outcome = (self.sync)(&self.dir);
            st = self.lock();
            st.running = false;
            st.ended = number;
            st.outcome = outcome;
            self.ended.notify_all();
        }
    }

    /// Flushes started so far.
    #[cfg(test)]
    pub(crate) fn started(&self) -> u64 {
        self.lock().started
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn one_caller_runs_one_flush_per_call() {
        let dir = tempfile::tempdir().unwrap();
        let f = Flusher::new(dir.path());
        f.flush().unwrap();
        f.flush().unwrap();
        assert_eq!(f.started(), 2);
    }

    /// A sync that takes `delay` and records when each one starts and ends.
    fn slow_sync(delay: Duration, log: Arc<Mutex<Vec<&'static str>>>) -> Box<SyncFn> {
        Box::new(move |_| {
            log.lock().unwrap().push("start");
            std::thread::sleep(delay);
            log.lock().unwrap().push("end");
            Ok(())
        })
    }

    #[test]
    fn callers_arriving_during_a_flush_share_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let f = Flusher::with_sync(dir.path(), slow_sync(Duration::from_secs(1), log.clone()));
        std::thread::scope(|s| {
            s.spawn(|| f.flush().unwrap());
            // Once the first flush runs, eight callers arrive: it may have passed their
            // writes, so they need the next one, and one flush serves them all.
            while log.lock().unwrap().is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
            for _ in 0..8 {
                s.spawn(|| {
                    f.flush().unwrap();
                    // Returned only after a flush that started after the call ended.
                    assert_eq!(*log.lock().unwrap(), ["start", "end", "start", "end"]);
                });
            }
        });
        assert_eq!(f.started(), 2, "{:?}", log.lock().unwrap());
    }

    #[test]
    fn a_failed_flush_fails_the_callers_it_covers_and_the_next_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f = {
            let fail = fail.clone();
            Flusher::with_sync(
                dir.path(),
                Box::new(move |_| {
                    if fail.load(std::sync::atomic::Ordering::SeqCst) {
                        Err(Errno::EIO)
                    } else {
                        Ok(())
                    }
                }),
            )
        };
        assert_eq!(f.flush(), Err(Errno::EIO));
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(f.flush(), Ok(()));
    }

    #[test]
    fn a_missing_directory_is_an_error_for_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let f = Flusher::new(&dir.path().join("gone"));
        assert_eq!(f.flush(), Err(Errno::ENOENT));
    }
}
