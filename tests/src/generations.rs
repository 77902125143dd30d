//! A next generation of the fixture environment: the echoserver closure rebuilt by the host's
//! real Nix with one package changed (`tests/fixtures/default.nix`'s `changed` argument), so
//! that package and every package depending on it get new store paths while the others keep
//! theirs, as with any Nix rebuild; and a binary cache holding both generations.
//!
//! ```no_run
//! use nixenv_testkit::generations::{Changed, NextGeneration};
//! let dir = tempfile::tempdir().unwrap();
//! let next = NextGeneration::build(Changed::Data, dir.path());
//! // next.changed_paths(): the new data and echoserver paths
//! let cache = next.write_cache(&dir.path().join("cache")); // the fixture xz cache + them
//! ```

use std::path::{Path, PathBuf};

use crate::fixtures::{nix_command, Cache, Fixtures};

/// The package of the fixture closure that changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed {
    /// `echoserver`, the app at the top: only its own store path changes.
    Echoserver,
    /// `echoserver-data`, a dependency: its store path and echoserver's change.
    Data,
}

impl Changed {
    /// The `changed` argument of `tests/fixtures/default.nix`.
    pub fn nix_name(self) -> &'static str {
        match self {
            Changed::Echoserver => "echoserver",
            Changed::Data => "data",
        }
    }
}

/// The rebuilt echoserver closure (its store paths are rooted by a link in the directory given
/// to [`NextGeneration::build`]).
#[derive(Debug, Clone)]
pub struct NextGeneration {
    /// What changed.
    pub changed: Changed,
    /// The new `/nix/store/…-echoserver-0.1.0`.
    pub echoserver: String,
    /// Its sorted closure.
    pub closure: Vec<String>,
}

impl NextGeneration {
    /// Builds the next generation with Nix (seconds: echoserver is compiled again), signed by
    /// the fixtures' trusted key; `root_dir` receives the GC root link `result`.
    ///
    /// Panics with Nix's output if a step fails.
    pub fn build(changed: Changed, root_dir: &Path) -> NextGeneration {
        let fx = Fixtures::get();
        let default_nix = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/default.nix");
        let link = root_dir.join("result");
        let echoserver = nix(nix_command("nix-build")
            .arg(&default_nix)
            .args(["--quiet", "--option", "substituters", ""])
            .arg("--arg")
            .arg("bootstrap")
            .arg(fx.dir.join("bootstrap"))
            .args(["--argstr", "system", &fx.system])
            .args(["--argstr", "changed", changed.nix_name()])
            .args(["-A", "echoserver", "-o"])
            .arg(&link));
        nix(nix_command("nix")
            .args(["store", "sign", "--key-file"])
            .arg(&fx.trusted_key.secret_file)
            .args(["--recursive", &echoserver]));
        let mut closure: Vec<String> = nix(nix_command("nix-store").args(["-qR", &echoserver]))
            .lines()
            .map(str::to_owned)
            .collect();
        closure.sort();
        NextGeneration {
            changed,
            echoserver,
            closure,
        }
    }

    /// The sorted store paths of this generation that the fixture generation does not have.
    pub fn changed_paths(&self) -> Vec<String> {
        let old = Fixtures::get().echoserver_closure();
        self.closure
            .iter()
            .filter(|p| !old.contains(p))
            .cloned()
            .collect()
    }

    /// Writes a binary cache holding both generations into `dest`: a copy of the fixtures' xz
    /// cache to which `nix copy` adds the new paths (xz, signed by the trusted key only).
    pub fn write_cache(&self, dest: &Path) -> PathBuf {
        let fx = Fixtures::get();
        fx.cache_copy(Cache::Xz, dest);
        let url = format!("file://{}?compression=xz", dest.display());
        nix(nix_command("nix")
            .args(["copy", "--quiet", "--to", &url])
            .args(self.changed_paths()));
        dest.to_path_buf()
    }
}

/// Runs a Nix command, panicking with its stderr on failure; returns its trimmed stdout.
fn nix(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
