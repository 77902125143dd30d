//! Where a container's cgroups are. The shim finds them once, right after `runc create`, and
//! keeps them until Delete: Stats and the OOM watch read them after the init has exited too,
//! as containerd's runc shim does (containerd 2.3+ asks Stats whether an exit 137 was an OOM
//! kill). They are the init's (`/proc/<pid>/cgroup`: right for either cgroup driver); if that
//! cannot be read, the spec's `linux.cgroupsPath` ([`crate::cgroup_path`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::cgroup_path::{self, CgroupPathError};

/// The controllers the shim reads (metrics, OOM kills).
const CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];

/// Why a container's cgroups are not known.
#[derive(Debug, thiserror::Error)]
pub enum CgroupsError {
    #[error("read cgroups of pid {pid}: {source}")]
    Proc {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Path(#[from] CgroupPathError),
    #[error("cgroupsPath {path:?} is relative to runc's own cgroup")]
    Relative { path: String },
}

/// Where a process's cgroups are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// The unified hierarchy: one directory.
    V2(PathBuf),
    /// Per controller directories (a hybrid host counts as v1: controllers live there).
    V1(HashMap<String, PathBuf>),
}

/// Parses `/proc/<pid>/cgroup` against the cgroup root.
pub fn parse_proc_cgroup(text: &str, root: &Path, unified_only: bool) -> Cgroups {
    let mut v1 = HashMap::new();
    let mut unified = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            unified = Some(rel.to_owned());
            continue;
        }
        for c in controllers.split(',') {
            let c = c.trim_start_matches("name=");
            let joined = root.join(controllers.replace("name=", "")).join(rel);
            let dir = if joined.exists() {
                joined
            } else {
                root.join(c).join(rel)
            };
            v1.insert(c.to_owned(), dir);
        }
    }
    if unified_only || v1.is_empty() {
        return Cgroups::V2(root.join(unified.unwrap_or_default()));
    }
    Cgroups::V1(v1)
}

/// The cgroup filesystem as the shim sees it: the hierarchies' root and the `/proc` holding
/// processes' cgroup files (tests give directories of their own).
#[derive(Debug, Clone)]
pub struct CgroupFs {
    pub root: PathBuf,
    pub proc: PathBuf,
}

impl CgroupFs {
    /// `/sys/fs/cgroup` and `/proc`.
    pub fn host() -> CgroupFs {
        CgroupFs {
            root: PathBuf::from("/sys/fs/cgroup"),
            proc: PathBuf::from("/proc"),
        }
    }

    /// Whether the host has the unified hierarchy only (no v1 controllers).
    fn unified_only(&self) -> bool {
        self.root.join("cgroup.controllers").exists()
    }

    /// The cgroups of `pid`.
    pub fn of_pid(&self, pid: u32) -> Result<Cgroups, CgroupsError> {
        let file = self.proc.join(pid.to_string()).join("cgroup");
        let text =
            std::fs::read_to_string(file).map_err(|source| CgroupsError::Proc { pid, source })?;
        Ok(parse_proc_cgroup(&text, &self.root, self.unified_only()))
    }

    /// The cgroups runc makes for container `id` from its spec's `cgroups_path` (`systemd`:
    /// runc runs with `--systemd-cgroup`).
    pub fn of_spec(
        &self,
        cgroups_path: &str,
        id: &str,
        systemd: bool,
    ) -> Result<Cgroups, CgroupsError> {
        let rel = cgroup_path::relative(cgroups_path, id, systemd)?.ok_or_else(|| {
            CgroupsError::Relative {
                path: cgroups_path.to_owned(),
            }
        })?;
        if self.unified_only() {
            return Ok(Cgroups::V2(self.root.join(rel)));
        }
        Ok(Cgroups::V1(
            CONTROLLERS
                .iter()
                .map(|c| (c.to_string(), self.root.join(c).join(&rel)))
                .collect(),
        ))
    }

    /// The cgroups of a container just created: its init's (`pid`), else those its spec's
    /// `cgroups_path` names; `None` (logged) if neither is known.
    pub fn of_container(
        &self,
        id: &str,
        pid: u32,
        cgroups_path: &str,
        systemd: bool,
    ) -> Option<Cgroups> {
        let from_pid = match self.of_pid(pid) {
            Ok(c) => return Some(c),
            Err(e) => e,
        };
        match self.of_spec(cgroups_path, id, systemd) {
            Ok(c) => {
                tracing::info!(%id, pid, error = %from_pid, "cgroups from the spec's cgroupsPath");
                Some(c)
            }
            Err(e) => {
                tracing::warn!(%id, pid, error = %from_pid, spec = %e, "cgroups not known: no stats");
                None
            }
        }
    }
}

/// The spec's `linux.cgroupsPath` (empty if it has none).
pub fn spec_cgroups_path(spec: &serde_json::Value) -> &str {
    spec.pointer("/linux/cgroupsPath")
        .and_then(|p| p.as_str())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_proc_cgroup_is_v1() {
        let text = "9:name=systemd:/\n4:memory:/k8s.io/abc\n2:cpu,cpuacct:/k8s.io/abc\n0::/\n";
        let Cgroups::V1(dirs) = parse_proc_cgroup(text, Path::new("/nonexistent"), false) else {
            panic!("expected v1")
        };
        assert_eq!(dirs["memory"], Path::new("/nonexistent/memory/k8s.io/abc"));
        assert_eq!(
            dirs["cpuacct"],
            Path::new("/nonexistent/cpuacct/k8s.io/abc")
        );
    }

    #[test]
    fn unified_proc_cgroup_is_v2() {
        let text = "0::/kubepods/pod1/abc\n";
        assert_eq!(
            parse_proc_cgroup(text, Path::new("/sys/fs/cgroup"), true),
            Cgroups::V2(PathBuf::from("/sys/fs/cgroup/kubepods/pod1/abc"))
        );
    }

    /// A cgroup root and a /proc in a temp dir: `unified` makes the root a v2 one.
    fn fs(dir: &Path, unified: bool) -> CgroupFs {
        let fs = CgroupFs {
            root: dir.join("cgroup"),
            proc: dir.join("proc"),
        };
        std::fs::create_dir_all(&fs.root).unwrap();
        std::fs::create_dir_all(fs.proc.join("42")).unwrap();
        if unified {
            std::fs::write(fs.root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        }
        fs
    }

    #[test]
    fn a_live_init_names_its_cgroups() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fs(dir.path(), true);
        std::fs::write(fs.proc.join("42/cgroup"), "0::/kubepods/pod1/abc\n").unwrap();
        assert_eq!(
            fs.of_container("abc", 42, "/elsewhere", false),
            Some(Cgroups::V2(fs.root.join("kubepods/pod1/abc")))
        );
    }

    #[test]
    fn without_the_init_the_spec_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fs(dir.path(), true);
        assert_eq!(
            fs.of_container("abc", 42, "kubepods-pod1.slice:cri-containerd:abc", true),
            Some(Cgroups::V2(fs.root.join(
                "kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope"
            )))
        );
        let fs = self::fs(&dir.path().join("v1"), false);
        let Some(Cgroups::V1(dirs)) = fs.of_container("abc", 42, "/k8s.io/abc", false) else {
            panic!("expected v1 cgroups")
        };
        assert_eq!(dirs["memory"], fs.root.join("memory/k8s.io/abc"));
        assert_eq!(dirs["cpuacct"], fs.root.join("cpuacct/k8s.io/abc"));
        // Neither the init nor a usable spec path: not known.
        assert_eq!(fs.of_container("abc", 42, "k8s.io/abc", false), None);
        assert_eq!(fs.of_container("abc", 42, "/a/b", true), None);
    }
}
