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
//! Errors are sticky. The kernel reports a write-back error once per open file (`errseq`), to
//! the first `syncfs` that sees it, and the pages that failed may belong to a caller that is
//! not among that flush's callers (its pages were written back early, or it arrived while
//! the flush ran). So once a flush fails, it and every later flush of this [`Flusher`] fail
//! with that error: no commit of this process is told its path is durable after the file
//! system lost data. The file systems are opened when the flusher is made, so a write-back
//! error after that is seen by the next flush.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};

use nix::errno::Errno;

/// The flush itself (a parameter so tests can watch, slow and fail it).
pub(crate) type SyncFn = dyn Fn() -> Result<(), Errno> + Send + Sync;

/// Flushes one file system (or two), in groups.
pub(crate) struct Flusher {
    sync: Box<SyncFn>,
    state: Mutex<State>,
    ended: Condvar,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    /// Flushes started so far (the number of the latest).
    started: u64,
    /// The number of the latest flush that ended.
    ended: u64,
    /// The error of the first flush that failed: every flush fails with it from then on.
    failed: Option<Errno>,
    running: bool,
    /// Callers waiting for a flush to end.
    waiting: usize,
}

/// `syncfs(2)` of the file systems that hold `dirs` (each file system once), opened now.
pub(crate) fn syncfs_of(dirs: &[&Path]) -> std::io::Result<Box<SyncFn>> {
    let mut files: Vec<File> = Vec::new();
    let mut devices = Vec::new();
    for dir in dirs {
        let f = File::open(dir)?;
        let dev = f.metadata()?.dev();
        if !devices.contains(&dev) {
            devices.push(dev);
            files.push(f);
        }
    }
    Ok(Box::new(move || {
        files.iter().try_for_each(nix::unistd::syncfs)
    }))
}

impl Flusher {
    /// A flusher that flushes with `sync`.
    pub(crate) fn new(sync: Box<SyncFn>) -> Self {
        Flusher {
            sync,
            state: Mutex::new(State {
                started: 0,
                ended: 0,
                failed: None,
                running: false,
                waiting: 0,
            }),
            ended: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is changed only under the lock and never left half-changed, so a lock
        // poisoned by a panic elsewhere is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once a flush that started after this call has ended: everything the caller
    /// wrote before the call is then on disk. Fails if that flush or any earlier one failed.
    pub(crate) fn flush(&self) -> Result<(), Errno> {
        let mut st = self.lock();
        let need = st.started + 1;
        loop {
            if let Some(e) = st.failed {
                return Err(e);
            }
            if st.ended >= need {
                return Ok(());
            }
            if st.running {
                st.waiting += 1;
                st = self.ended.wait(st).unwrap_or_else(|e| e.into_inner());
                st.waiting -= 1;
                continue;
            }
            st.started += 1;
            st.running = true;
            let number = st.started;
            drop(st);
            // A panicking flush must not leave `running` set: the waiters would wait forever.
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (self.sync)()))
                .unwrap_or(Err(Errno::EIO));
            st = self.lock();
            st.running = false;
            st.ended = number;
            if let Err(e) = outcome {
                st.failed.get_or_insert(e);
            }
            self.ended.notify_all();
        }
    }

    /// Flushes started so far.
    #[cfg(test)]
    pub(crate) fn started(&self) -> u64 {
        self.lock().started
    }

    /// Callers waiting for a flush to end.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, OnceLock, Weak};
    use std::time::Duration;

    fn counting(count: Arc<AtomicUsize>) -> Box<SyncFn> {
        Box::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    #[test]
    fn one_caller_runs_one_flush_per_call() {
        let count = Arc::new(AtomicUsize::new(0));
        let f = Flusher::new(counting(count.clone()));
        f.flush().unwrap();
        f.flush().unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert_eq!(f.started(), 2);
    }

    #[test]
    fn syncfs_of_opens_the_directories_at_once_and_flushes_them() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let f = Flusher::new(syncfs_of(&[dir.path(), &sub]).unwrap());
        f.flush().unwrap();
        assert!(syncfs_of(&[&dir.path().join("gone")]).is_err());
    }

    /// A flusher whose first flush holds until `waiters` callers wait for the next one, and
    /// whose flushes (failing while `fail` is set) are logged as "start" and "end".
    fn held_flusher(
        waiters: usize,
        fail: Arc<AtomicBool>,
    ) -> (Arc<Flusher>, Arc<Mutex<Vec<&'static str>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let me: Arc<OnceLock<Weak<Flusher>>> = Arc::new(OnceLock::new());
        let (log2, me2) = (log.clone(), me.clone());
        let f = Arc::new(Flusher::new(Box::new(move || {
            let first = log2.lock().unwrap().is_empty();
            log2.lock().unwrap().push("start");
            if first {
                let f = me2.get().unwrap().upgrade().unwrap();
                while f.waiting() < waiters {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            log2.lock().unwrap().push("end");
            if fail.load(Ordering::SeqCst) {
                Err(Errno::EIO)
            } else {
                Ok(())
            }
        })));
        me.set(Arc::downgrade(&f)).unwrap();
        (f, log)
    }

    #[test]
    fn callers_arriving_during_a_flush_share_the_next_one() {
        let (f, log) = held_flusher(8, Arc::new(AtomicBool::new(false)));
        std::thread::scope(|s| {
            s.spawn(|| f.flush().unwrap());
            while log.lock().unwrap().is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
            // The first flush runs (and holds until all eight wait): it may have passed
            // their writes, so they need the next one, and one flush serves them all.
            for _ in 0..8 {
                s.spawn(|| {
                    f.flush().unwrap();
                    // Returned only after a flush that started after the call.
                    assert_eq!(*log.lock().unwrap(), ["start", "end", "start", "end"]);
                });
            }
        });
        assert_eq!(f.started(), 2, "{:?}", log.lock().unwrap());
    }

    #[test]
    fn a_failed_flush_fails_every_caller_from_then_on() {
        let fail = Arc::new(AtomicBool::new(true));
        let (f, _log) = held_flusher(4, fail.clone());
        std::thread::scope(|s| {
            let first = s.spawn(|| f.flush());
            while f.started() == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let waiters: Vec<_> = (0..4).map(|_| s.spawn(|| f.flush())).collect();
            assert_eq!(first.join().unwrap(), Err(Errno::EIO));
            for w in waiters {
                // They waited on the failed flush: it may have lost their pages.
                assert_eq!(w.join().unwrap(), Err(Errno::EIO));
            }
        });
        // Sticky: a later flush that succeeds does not make this flusher trustworthy again.
        fail.store(false, Ordering::SeqCst);
        assert_eq!(f.flush(), Err(Errno::EIO));
        assert_eq!(f.started(), 1, "nothing is flushed after a failure");
    }

    #[test]
    fn a_panicking_flush_fails_its_callers_instead_of_hanging_them() {
        let calls = Arc::new(AtomicUsize::new(0));
        let calls2 = calls.clone();
        let f = Flusher::new(Box::new(move || {
            calls2.fetch_add(1, Ordering::SeqCst);
            panic!("flush panicked");
        }));
        assert_eq!(f.flush(), Err(Errno::EIO));
        assert_eq!(f.flush(), Err(Errno::EIO));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
