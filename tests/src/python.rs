//! Python tools from PyPI that tests use as independent judges (Prometheus' text parser, the
//! JSON schema validator), each in its own venv.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `python3` of a venv under `dir` holding `requirement` (`name==version`, pinned so a
/// release cannot change what a test accepts), made once: the marker is written last, so a
/// venv without it is made again.
pub fn venv_with(dir: &Path, requirement: &str) -> PathBuf {
    let name = requirement.split("==").next().unwrap_or(requirement);
    let venv = dir.join(format!("{name}-venv"));
    let python = venv.join("bin/python3");
    let marker = venv.join(requirement);
    if marker.exists() {
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("run python3");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        requirement,
    ]));
    std::fs::write(&marker, b"").unwrap();
    python
}
