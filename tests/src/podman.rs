//! A private podman (Debian's 4.3, with conmon): its own `--root`, `--runroot` and `--tmpdir`
//! in a temp dir, so tests run in parallel with each other and with the machine's podman.
//! Dropping it removes every container (stopping running ones), its images, any mount left
//! under the temp dir, and the temp dir.
//!
//! ```no_run
//! use nixenv_testkit::podman::Podman;
//!
//! let podman = Podman::new().runtime("/usr/sbin/runc");
//! podman.import_empty_image().unwrap();
//! let out = podman.run(&["--rm", "-v", "/bin/busybox:/bin/busybox:ro"], &["/bin/busybox", "true"]);
//! assert!(out.status.success());
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context};

/// The empty image tests run nixenv containers from.
pub const EMPTY_IMAGE: &str = "empty:latest";

/// A private podman instance.
#[derive(Debug)]
pub struct Podman {
    dir: tempfile::TempDir,
    runtime: PathBuf,
    hooks_dir: Option<PathBuf>,
}

impl Default for Podman {
    fn default() -> Self {
        Self::new()
    }
}

impl Podman {
    /// A podman with fresh storage, running containers with the system's runc.
    pub fn new() -> Podman {
        let dir = tempfile::Builder::new()
            .prefix("nixenv-podman-")
            .tempdir()
            .expect("temp dir for podman");
        for sub in ["root", "runroot", "tmp"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        Podman {
            dir,
            runtime: PathBuf::from("/usr/sbin/runc"),
            hooks_dir: None,
        }
    }

    /// Uses `path` as the OCI runtime (`podman --runtime`).
    pub fn runtime(mut self, path: impl Into<PathBuf>) -> Self {
        self.runtime = path.into();
        self
    }

    /// Runs hooks from `dir` (`podman --hooks-dir`).
    pub fn hooks_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.hooks_dir = Some(dir.into());
        self
    }

    /// The temp dir holding this podman's storage; tests may put their own files in it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `podman` with this instance's global flags.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        let d = self.dir.path();
        cmd.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args([
                "--storage-driver",
                "overlay",
                "--cgroup-manager",
                "cgroupfs",
            ])
            .args(["--events-backend", "file", "--log-level", "error"])
            .arg("--runtime")
            .arg(&self.runtime);
        if let Some(h) = &self.hooks_dir {
            cmd.arg("--hooks-dir").arg(h);
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `podman ARGS…` and returns its output.
    pub fn output(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run podman")
    }

    /// Runs `podman ARGS…`, failing with podman's stderr unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.output(args);
        if !out.status.success() {
            bail!(
                "podman {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Makes `empty:latest`: an image with no files (imported from an empty tar).
    pub fn import_empty_image(&self) -> anyhow::Result<()> {
        let tar = self.dir.path().join("empty.tar");
        // An empty tar archive is two 512-byte zero blocks.
        std::fs::write(&tar, vec![0u8; 1024]).context("write empty.tar")?;
        self.ok(&["import", "--quiet", tar.to_str().unwrap(), EMPTY_IMAGE])?;
        Ok(())
    }

    /// `podman run` with the flags this machine needs (`--ulimit`s, host network), then
    /// `extra` flags, the image `empty:latest` and `command`.
    pub fn run(&self, extra: &[&str], command: &[&str]) -> Output {
        self.command()
            .args(self.run_args(extra, command))
            .output()
            .expect("run podman run")
    }

    /// The argument list of [`Podman::run`].
    pub fn run_args(&self, extra: &[&str], command: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = ["run", "--ulimit", "nofile=1024:1024", "--ulimit"]
            .into_iter()
            .chain(["nproc=4096:4096", "--network", "host", "--pull", "never"])
            .map(OsString::from)
            .collect();
        args.extend(extra.iter().map(OsString::from));
        args.push(EMPTY_IMAGE.into());
        args.extend(command.iter().map(OsString::from));
        args
    }

    /// The container's config.json as podman handed it to the runtime (its bundle is podman's
    /// `userdata` directory).
    pub fn bundle_config(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let bundle = self.ok(&["inspect", "--format", "{{.StaticDir}}", name])?;
        let path = PathBuf::from(bundle.trim()).join("config.json");
        std::fs::read(&path).with_context(|| format!("read {}", path.display()))
    }

    /// `podman logs NAME` (stdout and stderr together).
    pub fn logs(&self, name: &str) -> String {
        let out = self.output(&["logs", name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Removes every container, stopping running ones at once.
    pub fn remove_all(&self) {
        let _ = self.output(&["rm", "--all", "--force", "--time", "0"]);
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        self.remove_all();
        let _ = self.output(&["rmi", "--all", "--force"]);
        unmount_under(self.dir.path());
    }
}

/// Detaches every mount at or below `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}
