//! A process's stdio: the FIFOs containerd hands over (opened here and given to runc as the
//! process's own stdin/stdout/stderr, so no copying for plain processes) or, with a terminal,
//! runc's console socket and copies between the pty master and the FIFOs.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::io::Pty;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

/// Why stdio could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("console socket {path}: {source}")]
    Console {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("resize console: {0}")]
    Resize(#[source] nix::Error),
}

/// The stdio paths of a process, as containerd gives them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

fn open(path: &Path, opts: &mut OpenOptions) -> Result<File, IoError> {
    opts.custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| IoError::Open {
            path: path.to_owned(),
            source,
        })
}

fn dev_null(write: bool) -> Result<File, IoError> {
    open(
        Path::new("/dev/null"),
        OpenOptions::new().read(!write).write(write),
    )
}

/// Opens a FIFO for writing without waiting for its reader (read-write never blocks).
fn open_writer(path: &str) -> Result<File, IoError> {
    if path.is_empty() {
        return dev_null(true);
    }
    open(Path::new(path), OpenOptions::new().read(true).write(true))
}

/// The descriptors handed to `runc create`/`runc exec` as the process's stdio. Dropped (our
/// copies closed) once runc has started the process.
#[derive(Debug)]
pub struct RuncStdio {
    fds: Mutex<Option<[OwnedFd; 3]>>,
}

impl RuncStdio {
    fn new(stdin: File, stdout: File, stderr: File) -> RuncStdio {
        RuncStdio {
            fds: Mutex::new(Some([stdin.into(), stdout.into(), stderr.into()])),
        }
    }
}

#[async_trait]
impl runc::io::Io for RuncStdio {
    async fn set(&self, cmd: &mut tokio::process::Command) -> std::io::Result<()> {
        let guard = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        let Some([i, o, e]) = guard.as_ref() else {
            return Err(std::io::Error::other("stdio already used"));
        };
        cmd.stdin(i.try_clone()?)
            .stdout(o.try_clone()?)
            .stderr(e.try_clone()?);
        Ok(())
    }

    async fn close_after_start(&self) {
        self.fds.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// What the shim holds for a running process's stdio.
pub struct ProcessIo {
    /// Non-terminal: a read-write descriptor of the stdin FIFO that keeps a writer alive until
    /// CloseIO, so the process does not see EOF before containerd opens its end.
    stdin_keepalive: Mutex<Option<File>>,
    /// Terminal: the pty master, its copy tasks.
    console: Mutex<Option<Console>>,
}

struct Console {
    pty: Pty,
    stdin_copy: Option<JoinHandle<()>>,
    stdout_copy: Option<JoinHandle<()>>,
}

impl ProcessIo {
    /// Prepares stdio for a process without a terminal: returns what runc gets and what the
    /// shim keeps.
    pub fn plain(paths: &StdioPaths) -> Result<(RuncStdio, ProcessIo), IoError> {
        let (stdin, keepalive) = if paths.stdin.is_empty() {
            (dev_null(false)?, None)
        } else {
            let keepalive = open_writer(&paths.stdin)?;
            let reader = open(Path::new(&paths.stdin), OpenOptions::new().read(true))?;
            (reader, Some(keepalive))
        };
        let stdout = open_writer(&paths.stdout)?;
        let stderr = open_writer(&paths.stderr)?;
        Ok((
            RuncStdio::new(stdin, stdout, stderr),
            ProcessIo {
                stdin_keepalive: Mutex::new(keepalive),
                console: Mutex::new(None),
            },
        ))
    }

    /// Stdio for runc when the process gets a terminal (runc's own output is discarded).
    pub fn for_terminal() -> Result<RuncStdio, IoError> {
        Ok(RuncStdio::new(
            dev_null(false)?,
            dev_null(true)?,
            dev_null(true)?,
        ))
    }

    /// The shim's side of a terminal process: copies between `master` and the FIFOs.
    pub fn terminal(master: File, paths: &StdioPaths) -> Result<ProcessIo, IoError> {
        let pty = Pty::new(master).map_err(|e| IoError::Console {
            path: PathBuf::from("ptmx"),
            source: std::io::Error::other(e.to_string()),
        })?;
        let stdin_copy = if paths.stdin.is_empty() {
            None
        } else {
            let fifo = open_writer(&paths.stdin)?;
            let rx = tokio::net::unix::pipe::Receiver::from_file(fifo).map_err(|source| {
                IoError::Open {
                    path: PathBuf::from(&paths.stdin),
                    source,
                }
            })?;
            let mut to = pty.clone();
            Some(tokio::spawn(async move {
                let mut rx = rx;
                let _ = tokio::io::copy(&mut rx, &mut to).await;
            }))
        };
        let stdout_copy = if paths.stdout.is_empty() {
            None
        } else {
            let fifo = open_writer(&paths.stdout)?;
            let mut tx = tokio::net::unix::pipe::Sender::from_file(fifo).map_err(|source| {
                IoError::Open {
                    path: PathBuf::from(&paths.stdout),
                    source,
                }
            })?;
            let mut from = pty.clone();
            Some(tokio::spawn(async move {
                // Reading the master fails with EIO once the last slave is closed: that is EOF.
                let _ = tokio::io::copy(&mut from, &mut tx).await;
                let _ = tx.flush().await;
            }))
        };
        Ok(ProcessIo {
            stdin_keepalive: Mutex::new(None),
            console: Mutex::new(Some(Console {
                pty,
                stdin_copy,
                stdout_copy,
            })),
        })
    }

    /// A process whose stdio is not held by the shim.
    pub fn none() -> ProcessIo {
        ProcessIo {
            stdin_keepalive: Mutex::new(None),
            console: Mutex::new(None),
        }
    }

    /// CloseIO: the process sees EOF on stdin.
    pub fn close_stdin(&self) {
        self.stdin_keepalive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(console) = self
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            if let Some(copy) = console.stdin_copy.take() {
                copy.abort();
            }
        }
    }

    /// ResizePty.
    pub fn resize(&self, width: u32, height: u32) -> Result<(), IoError> {
        let guard = self.console.lock().unwrap_or_else(|e| e.into_inner());
        let Some(console) = guard.as_ref() else {
            return Ok(());
        };
        let ws = libc::winsize {
            ws_row: height as u16,
            ws_col: width as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid for the call.
        let rc = unsafe { libc::ioctl(console.pty.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(IoError::Resize(nix::Error::last()));
        }
        Ok(())
    }

    /// After the process exited: lets the output copy drain (bounded), then releases
    /// everything, so containerd's readers see EOF.
    pub async fn finish(&self) {
        let copy = self
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|c| c.stdout_copy.take());
        if let Some(copy) = copy {
            let abort = copy.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), copy)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.close_stdin();
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

/// A listening console socket for runc's `--console-socket`; runc sends the pty master over it.
pub struct ConsoleSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl ConsoleSocket {
    /// Listens on a fresh socket under the temp dir (bundle paths exceed the socket path limit).
    pub fn new() -> Result<ConsoleSocket, IoError> {
        let path = std::env::temp_dir().join(format!(
            "nixenv-pty-{}-{:016x}.sock",
            std::process::id(),
            rand_u64()
        ));
        let listener = UnixListener::bind(&path).map_err(|source| IoError::Console {
            path: path.clone(),
            source,
        })?;
        Ok(ConsoleSocket {
            path,
            listener: Some(listener),
        })
    }

    /// The socket's path, for runc.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts runc's connection and receives the master, in a blocking task.
    pub fn receive(&mut self) -> JoinHandle<Result<File, IoError>> {
        let listener = self.listener.take();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let err = |source: std::io::Error| IoError::Console {
                path: path.clone(),
                source,
            };
            let listener = listener.ok_or_else(|| err(std::io::Error::other("already used")))?;
            let (stream, _) = listener.accept().map_err(err)?;
            receive_fd(&stream).map_err(err)
        })
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn receive_fd(stream: &std::os::unix::net::UnixStream) -> std::io::Result<File> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::io::IoSliceMut;
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor for us.
                return Ok(unsafe { File::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::other("no descriptor received"))
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn fifo(dir: &Path, name: &str) -> String {
        let p = dir.join(name);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p.to_string_lossy().into_owned()
    }

    #[tokio::test]
    async fn plain_stdin_sees_eof_only_after_close() {
        let dir = tempdir();
        let paths = StdioPaths {
            stdin: fifo(&dir, "in"),
            stdout: fifo(&dir, "out"),
            stderr: String::new(),
            terminal: false,
        };
        let (runc_io, io) = ProcessIo::plain(&paths).unwrap();
        let [stdin, _, _] = runc_io.fds.lock().unwrap().take().unwrap();
        let mut writer = OpenOptions::new().write(true).open(&paths.stdin).unwrap();
        writer.write_all(b"hi").unwrap();
        drop(writer);
        let mut stdin = File::from(stdin);
        let mut buf = [0u8; 2];
        stdin.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        io.close_stdin();
        let mut rest = Vec::new();
        stdin.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("nixenv-shim-io-{:016x}", rand_u64()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
