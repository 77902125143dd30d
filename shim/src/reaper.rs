//! Exit reaping. The shim is a child subreaper: container processes (whose `runc` parent
//! exits) and every `runc` invocation are its children, and only this module waits for them
//! (`waitpid(-1)` on each SIGCHLD). Whoever needs an exit asks [`wait`] for its pid; an exit
//! reaped before anyone asked is kept for a while, so a process that exits before its pid is
//! known (a short `exec`) is not lost.
//!
//! [`Wait`] is that edge as a trait, injected into the task logic: [`Reaped`] (this module's
//! table) in the serving shim, [`Direct`] (`waitpid` on one pid) in the `delete` action and in
//! tests, which run no reaper.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How long an exit nobody waits for is kept.
const UNCLAIMED_TTL: Duration = Duration::from_secs(120);
/// At most this many unclaimed exits are kept.
const UNCLAIMED_MAX: usize = 4096;

/// A reaped child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Its pid.
    pub pid: i32,
    /// Exit code, or 128 + signal number when killed by a signal.
    pub code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// When it was reaped.
    pub at: SystemTime,
}

impl Exit {
    /// The raw wait status, as [`std::process::ExitStatus`] encodes it.
    pub fn wait_status(&self) -> i32 {
        match self.signal {
            Some(sig) => sig,
            None => (self.code & 0xff) << 8,
        }
    }
}

#[derive(Default)]
struct Table {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
    unclaimed: HashMap<i32, (Exit, Instant)>,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(Mutex::default);

/// Waits for the exit of child `pid` (which may already have been reaped).
pub async fn wait(pid: i32) -> Exit {
    let rx = {
        let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((exit, _)) = table.unclaimed.remove(&pid) {
            return exit;
        }
        let (tx, rx) = oneshot::channel();
        table.waiters.insert(pid, tx);
        rx
    };
    match rx.await {
        Ok(exit) => exit,
        // The sender is only dropped when replaced by a second waiter for the same pid.
        Err(_) => std::future::pending().await,
    }
}

/// Whether an exit for `pid` was reaped and not claimed yet (without claiming it).
pub fn has_exited(pid: i32) -> bool {
    let table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    table.unclaimed.contains_key(&pid)
}

fn deliver(exit: Exit) {
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(tx) = table.waiters.remove(&exit.pid) {
        if let Err(exit) = tx.send(exit) {
            table.unclaimed.insert(exit.pid, (exit, Instant::now()));
        }
        return;
    }
    let now = Instant::now();
    table
        .unclaimed
        .retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
    if table.unclaimed.len() >= UNCLAIMED_MAX {
        if let Some(oldest) = table
            .unclaimed
            .iter()
            .min_by_key(|(_, (_, at))| *at)
            .map(|(pid, _)| *pid)
        {
            table.unclaimed.remove(&oldest);
        }
    }
    table.unclaimed.insert(exit.pid, (exit, now));
}

/// The exit a wait status reports (`None` for stops, continues and the like).
pub fn exit_of(status: WaitStatus) -> Option<Exit> {
    let (pid, code, signal) = match status {
        WaitStatus::Exited(pid, code) => (pid, code, None),
        WaitStatus::Signaled(pid, sig, _) => (pid, 128 + sig as i32, Some(sig as i32)),
        _ => return None,
    };
    Some(Exit {
        pid: pid.as_raw(),
        code,
        signal,
        at: SystemTime::now(),
    })
}

/// Reaps every child that has exited so far.
pub fn reap_all() {
    loop {
        let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(status) => status,
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        };
        if status == WaitStatus::StillAlive {
            return;
        }
        let Some(exit) = exit_of(status) else {
            continue;
        };
        tracing::debug!(pid = exit.pid, code = exit.code, "reaped");
        deliver(exit);
    }
}

/// Makes this process a child subreaper and reaps children on every SIGCHLD, in a task.
pub fn start() -> std::io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)?;
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    tokio::spawn(async move {
        reap_all();
        while sigchld.recv().await.is_some() {
            reap_all();
        }
    });
    Ok(())
}

/// Waits for a child's exit: the process edge shared by everything the shim starts (the
/// helper, runc, the container's processes). The serving shim reaps all its children in one place ([`Reaped`]); the `delete`
/// action and tests wait directly ([`Direct`]).
pub trait Wait: Send + Sync + std::fmt::Debug + 'static {
    /// The exit of child `pid`.
    fn wait(&self, pid: i32) -> impl Future<Output = Exit> + Send;
}

/// Exits from the shim's reaper.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reaped;

impl Wait for Reaped {
    fn wait(&self, pid: i32) -> impl Future<Output = Exit> + Send {
        wait(pid)
    }
}

/// `waitpid` on a blocking thread (a process without the reaper).
#[derive(Debug, Clone, Copy, Default)]
pub struct Direct;

impl Wait for Direct {
    async fn wait(&self, pid: i32) -> Exit {
        let status = tokio::task::spawn_blocking(move || loop {
            match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => return other,
            }
        })
        .await;
        match status {
            Ok(Ok(status)) => exit_of(status),
            _ => None,
        }
        .unwrap_or(Exit {
            pid,
            code: 255,
            signal: None,
            at: std::time::SystemTime::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(pid: i32, code: i32) -> Exit {
        Exit {
            pid,
            code,
            signal: None,
            at: SystemTime::now(),
        }
    }

    #[tokio::test]
    async fn an_exit_before_the_wait_is_kept() {
        deliver(exit(999_001, 3));
        assert!(has_exited(999_001));
        assert_eq!(wait(999_001).await.code, 3);
        assert!(!has_exited(999_001));
    }

    #[tokio::test]
    async fn a_waiter_gets_the_exit() {
        let waiter = tokio::spawn(wait(999_002));
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        deliver(exit(999_002, 7));
        assert_eq!(waiter.await.unwrap().code, 7);
    }

    #[test]
    fn wait_status_encodes_like_std() {
        use std::os::unix::process::ExitStatusExt;
        let e = exit(1, 3);
        assert_eq!(
            std::process::ExitStatus::from_raw(e.wait_status()).code(),
            Some(3)
        );
        let killed = Exit {
            signal: Some(9),
            code: 137,
            ..e
        };
        assert_eq!(
            std::process::ExitStatus::from_raw(killed.wait_status()).signal(),
            Some(9)
        );
    }
}
