//! A scratch directory in memory: a temp dir with a tmpfs mounted on it when the tests run as
//! root (as in CI), a plain temp dir otherwise. For tests whose subject is not the disk (the
//! memory of a pull of 100,000 paths), so that creating hundreds of thousands of files on the
//! machine's file system does not make up most of their time.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A temp dir, on a tmpfs of its own when possible; unmounted and removed on drop.
pub struct Scratch {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Scratch {
    /// A new scratch dir; the tmpfs (if any) holds at most `size_mib` MiB.
    pub fn new(size_mib: u64) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("nixenv-scratch-")
            .tempdir()
            .expect("temp dir for a scratch dir");
        let mounted = nix::unistd::geteuid().is_root()
            && mount(
                Some("nixenv-scratch"),
                dir.path(),
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(format!("size={size_mib}m,mode=0755").as_str()),
            )
            .is_ok();
        Scratch { dir, mounted }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Whether a tmpfs is mounted on it.
    pub fn in_memory(&self) -> bool {
        self.mounted
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.mounted {
            // Lazily: a process of the test may still hold a file open in it.
            let _ = umount2(self.dir.path(), MntFlags::MNT_DETACH);
        }
    }
}
