//! Free disk space, the edge to `statvfs(2)`: behind [`FreeSpace`] so tests can fake a full
//! disk.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// How many bytes an unprivileged writer may still use on the filesystem holding a directory.
pub trait FreeSpace: Send + Sync + 'static {
    /// Bytes available in `dir`'s filesystem.
    fn available(&self, dir: &Path) -> io::Result<u64>;
}

/// The real filesystem: `f_bavail × f_frsize` from `statvfs(2)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Statvfs;

impl FreeSpace for Statvfs {
    fn available(&self, dir: &Path) -> io::Result<u64> {
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `c` is a valid NUL-terminated path; `st` is written by statvfs only.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statvfs_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Statvfs.available(dir.path()).unwrap() > 0);
        assert!(Statvfs.available(&dir.path().join("missing")).is_err());
    }
}
