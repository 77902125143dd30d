//! The store-wide gc lock, `{state-dir}/gc.lock`, and the lock that serialises gc runs,
//! `{state-dir}/gc-run.lock` (see the module documentation of [`crate::gc`]).

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::store::StoreError;

/// `{state-dir}/gc.lock`: shared by pulls and pins, exclusive for gc's decide-and-rename phase.
pub fn gc_lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("gc.lock")
}

/// `{state-dir}/gc-run.lock`: exclusive for a whole gc run (one collector at a time).
pub fn run_lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("gc-run.lock")
}

/// A held flock (released on drop, or when the process dies).
#[derive(Debug)]
pub struct GcLock {
    _lock: Flock<File>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn open(path: &Path) -> Result<File, StoreError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open lock", path))
}

fn take(path: &Path, arg: FlockArg) -> Result<Option<GcLock>, StoreError> {
    let f = open(path)?;
    match Flock::lock(f, arg) {
        Ok(l) => Ok(Some(GcLock { _lock: l })),
        Err((_, nix::errno::Errno::EWOULDBLOCK))
            if matches!(
                arg,
                FlockArg::LockExclusiveNonblock | FlockArg::LockSharedNonblock
            ) =>
        {
            Ok(None)
        }
        Err((_, e)) => Err(io_err("lock", path)(e.into())),
    }
}

impl GcLock {
    /// Takes `{state-dir}/gc.lock` shared, waiting while a gc decides and renames. Held by
    /// every pull and pin from before it checks which paths are valid until the paths it
    /// returns are rooted (touched or pinned). Blocking.
    pub fn shared(state_dir: &Path) -> Result<GcLock, StoreError> {
        take(&gc_lock_path(state_dir), FlockArg::LockShared).map(|l| l.expect("blocking lock"))
    }

    /// [`GcLock::shared`] from async code (on a blocking thread).
    pub async fn shared_async(state_dir: &Path) -> Result<GcLock, StoreError> {
        let dir = state_dir.to_owned();
        match tokio::task::spawn_blocking(move || GcLock::shared(&dir)).await {
            Ok(r) => r,
            // Only a panic in `shared` (none expected) or a runtime shutting down.
            Err(e) => Err(io_err("lock", &gc_lock_path(state_dir))(
                std::io::Error::other(e),
            )),
        }
    }

    /// Takes `{state-dir}/gc.lock` exclusive (gc's decide-and-rename phase). Blocking.
    pub fn exclusive(state_dir: &Path) -> Result<GcLock, StoreError> {
        take(&gc_lock_path(state_dir), FlockArg::LockExclusive).map(|l| l.expect("blocking lock"))
    }

    /// [`GcLock::exclusive`] without waiting: `None` while a pull or pin holds it shared.
    pub fn try_exclusive(state_dir: &Path) -> Result<Option<GcLock>, StoreError> {
        take(&gc_lock_path(state_dir), FlockArg::LockExclusiveNonblock)
    }

    /// Takes `{state-dir}/gc-run.lock` exclusive: one gc run at a time. Blocking.
    pub fn run(state_dir: &Path) -> Result<GcLock, StoreError> {
        take(&run_lock_path(state_dir), FlockArg::LockExclusive).map(|l| l.expect("blocking lock"))
    }

    /// Whether some process holds `{state-dir}/gc-run.lock` (a gc is running).
    pub fn gc_running(state_dir: &Path) -> Result<bool, StoreError> {
        let path = run_lock_path(state_dir);
        if !path.exists() {
            return Ok(false);
        }
        Ok(take(&path, FlockArg::LockSharedNonblock)?.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_excludes_exclusive_across_descriptions() {
        let d = tempfile::tempdir().unwrap();
        let a = GcLock::shared(d.path()).unwrap();
        let b = GcLock::shared(d.path()).unwrap();
        let p = gc_lock_path(d.path());
        assert!(take(&p, FlockArg::LockExclusiveNonblock).unwrap().is_none());
        drop(a);
        assert!(take(&p, FlockArg::LockExclusiveNonblock).unwrap().is_none());
        drop(b);
        let x = take(&p, FlockArg::LockExclusiveNonblock).unwrap();
        assert!(x.is_some());
        assert!(take(&p, FlockArg::LockSharedNonblock).unwrap().is_none());
        drop(x);
        assert!(!GcLock::gc_running(d.path()).unwrap());
        let r = GcLock::run(d.path()).unwrap();
        assert!(GcLock::gc_running(d.path()).unwrap());
        drop(r);
        assert!(!GcLock::gc_running(d.path()).unwrap());
    }
}
