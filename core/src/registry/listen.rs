//! The listening socket: the one systemd passes (socket activation, `LISTEN_PID`/`LISTEN_FDS`,
//! the socket at fd 3) or a loopback address bound here. Either way it must be a loopback TCP
//! socket: the server is for this node's runtimes only.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, RawFd};

use thiserror::Error;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("systemd passed {count} sockets (LISTEN_FDS); the registry takes exactly one")]
    FdCount { count: String },
    #[error("the socket systemd passed is not a TCP socket: {source}")]
    NotTcp { source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{addr} is not a loopback address: the registry serves this node only")]
    NotLoopback { addr: SocketAddr },
}

/// The socket systemd passed to this process, if any: `LISTEN_PID` names this process and
/// `LISTEN_FDS` is 1.
pub fn systemd_fd(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    pid: u32,
) -> Result<Option<RawFd>, ListenError> {
    if listen_pid.and_then(|p| p.parse::<u32>().ok()) != Some(pid) {
        return Ok(None);
    }
    match listen_fds {
        None => Ok(None),
        Some("1") => Ok(Some(LISTEN_FDS_START)),
        Some(count) => Err(ListenError::FdCount {
            count: count.to_owned(),
        }),
    }
}

/// systemd's socket when it passed one to this process, else `addr` bound here; loopback only.
/// Clears the `LISTEN_*` variables, as `sd_listen_fds(1)` does, so children do not inherit them.
pub fn listener(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let fd = systemd_fd(
        std::env::var("LISTEN_PID").ok().as_deref(),
        std::env::var("LISTEN_FDS").ok().as_deref(),
        std::process::id(),
    )?;
    let listener = match fd {
        Some(fd) => {
            for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
                std::env::remove_var(key);
            }
            // SAFETY: systemd passed this fd to this process (LISTEN_PID is ours) and nothing
            // else in the process owns it.
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            listener
                .local_addr()
                .map_err(|source| ListenError::NotTcp { source })?;
            listener
        }
        None => TcpListener::bind(addr).map_err(|source| ListenError::Bind { addr, source })?,
    };
    let local = listener
        .local_addr()
        .map_err(|source| ListenError::NotTcp { source })?;
    if !local.ip().is_loopback() {
        return Err(ListenError::NotLoopback { addr: local });
    }
    listener
        .set_nonblocking(true)
        .map_err(|source| ListenError::Bind {
            addr: local,
            source,
        })?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_systemds_socket_only_when_it_is_for_this_process() {
        assert_eq!(systemd_fd(Some("42"), Some("1"), 42).unwrap(), Some(3));
        assert_eq!(systemd_fd(Some("41"), Some("1"), 42).unwrap(), None);
        assert_eq!(systemd_fd(None, Some("1"), 42).unwrap(), None);
        assert_eq!(systemd_fd(Some("42"), None, 42).unwrap(), None);
        assert!(matches!(
            systemd_fd(Some("42"), Some("2"), 42),
            Err(ListenError::FdCount { .. })
        ));
    }

    #[test]
    fn refuses_addresses_other_nodes_reach() {
        let err = listener("0.0.0.0:0".parse().unwrap()).unwrap_err();
        assert!(matches!(err, ListenError::NotLoopback { .. }), "{err}");
        let ok = listener("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(ok.local_addr().unwrap().ip().is_loopback());
    }
}
