//! CRI-O's configuration: `crio.conf` then the drop-ins of `crio.conf.d` in lexical order,
//! later keys overriding earlier ones; and the rules by which CRI-O (1.36) ignores a runtime
//! handler or refuses to start ([`rejections`]).

use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CrioConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The merged configuration.
#[derive(Debug, Clone, Default)]
pub struct CrioConfig {
    /// Files read, in order.
    pub files: Vec<PathBuf>,
    pub merged: Table,
}

/// A `[crio.runtime.runtimes.NAME]` handler.
#[derive(Debug, Clone, PartialEq)]
pub struct CrioRuntime {
    pub runtime_path: Option<String>,
    pub runtime_type: Option<String>,
    pub allowed_annotations: Vec<String>,
    pub monitor_path: Option<String>,
    /// The drop-in that defines it last.
    pub defined_in: PathBuf,
}

fn merge(into: &mut Table, from: &Table) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Table(a)), Value::Table(b)) => merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

fn runtime_in<'a>(t: &'a Table, name: &str) -> Option<&'a Value> {
    t.get("crio")?.get("runtime")?.get("runtimes")?.get(name)
}

impl CrioConfig {
    /// Reads `main` (if it exists) and `dropins/*.conf` (if the directory exists).
    pub fn load(main: &Path, dropins: &Path) -> Result<CrioConfig, CrioConfigError> {
        let mut paths = Vec::new();
        if main.exists() {
            paths.push(main.to_owned());
        }
        let mut extra: Vec<PathBuf> = std::fs::read_dir(dropins)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conf"))
            .collect();
        extra.sort();
        paths.extend(extra);
        let mut cfg = CrioConfig::default();
        for p in paths {
            let text = std::fs::read_to_string(&p).map_err(|source| CrioConfigError::Read {
                path: p.clone(),
                source,
            })?;
            let t: Table = text
                .parse()
                .map_err(|e: toml::de::Error| CrioConfigError::Parse {
                    path: p.clone(),
                    message: e.message().trim().replace('\n', " "),
                })?;
            merge(&mut cfg.merged, &t);
            cfg.files.push(p);
        }
        Ok(cfg)
    }

    /// The handler `name`, if defined.
    pub fn runtime(&self, name: &str) -> Option<CrioRuntime> {
        let rt = runtime_in(&self.merged, name)?;
        let defined_in = self
            .files
            .iter()
            .rev()
            .find(|p| {
                std::fs::read_to_string(p)
                    .ok()
                    .and_then(|t| t.parse::<Table>().ok())
                    .is_some_and(|t| runtime_in(&t, name).is_some())
            })
            .cloned()
            .unwrap_or_default();
        let s = |k: &str| rt.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(CrioRuntime {
            runtime_path: s("runtime_path"),
            runtime_type: s("runtime_type"),
            allowed_annotations: rt
                .get("allowed_annotations")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            monitor_path: s("monitor_path"),
            defined_in,
        })
    }
}

/// The keys CRI-O 1.36 accepts in a handler's `allowed_annotations` (its own annotations, v2
/// and deprecated v1 names, and a few runtime ones); any other entry makes CRI-O ignore the
/// handler ("invalid allowed_annotation"). Pod annotations reach the runtime without being
/// listed there.
pub const CRIO_ANNOTATIONS: &[&str] = &[
    "io.kubernetes.cri.rdt-class",
    "bundle",
    "org.systemd.property.",
    "org.criu.config",
    "module.wasm.image/variant",
    "io.kubernetes.cri.container-type",
    "run.oci.",
    "cgroup2-mount-hierarchy-rw.crio.io",
    "cpu-c-states.crio.io",
    "cpu-freq-governor.crio.io",
    "cpu-load-balancing.crio.io",
    "cpu-quota.crio.io",
    "cpu-shared.crio.io",
    "devices.crio.io",
    "disable-fips.crio.io",
    "irq-load-balancing.crio.io",
    "link-logs.crio.io",
    "io.containers.trace-syscall",
    "platform-runtime-path.crio.io",
    "pod-linux-overhead.crio.io",
    "pod-linux-resources.crio.io",
    "seccomp-notifier-action.crio.io",
    "seccomp-profile.crio.io",
    "shm-size.crio.io",
    "spoofed.crio.io",
    "org.opencontainers.image.stopSignal",
    "try-skip-volume-selinux-label.crio.io",
    "umask.crio.io",
    "unified-cgroup.crio.io",
    "userns-mode.crio.io",
    "io.kubernetes.cri-o.cgroup2-mount-hierarchy-rw",
    "io.kubernetes.cri-o.Devices",
    "io.kubernetes.cri-o.DisableFIPS",
    "io.kubernetes.cri-o.LinkLogs",
    "io.kubernetes.cri-o.PlatformRuntimePath",
    "io.kubernetes.cri-o.PodLinuxOverhead",
    "io.kubernetes.cri-o.PodLinuxResources",
    "io.kubernetes.cri-o.seccompNotifierAction",
    "seccomp-profile.kubernetes.cri-o.io",
    "io.kubernetes.cri-o.ShmSize",
    "io.kubernetes.cri-o.Spoofed",
    "io.kubernetes.cri-o.TrySkipVolumeSELinuxLabel",
    "io.kubernetes.cri-o.umask",
    "io.kubernetes.cri-o.UnifiedCgroup",
    "io.kubernetes.cri-o.userns-mode",
];

/// What CRI-O does with a handler it rejects, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("runtime_type {0:?} is not oci, vm or pod: CRI-O ignores the handler")]
    RuntimeType(String),
    #[error("runtime_path {0} does not exist: CRI-O ignores the handler")]
    RuntimePath(String),
    #[error("allowed_annotations holds {0:?}, which is not a CRI-O annotation: CRI-O ignores the handler")]
    Annotation(String),
    #[error("monitor_path {0} does not exist: CRI-O does not start")]
    MonitorPath(String),
}

/// CRI-O's checks of a handler (`RuntimeHandler.Validate` and the monitor path check at start),
/// with `exists` telling whether a path exists on the node.
pub fn rejections(rt: &CrioRuntime, exists: impl Fn(&str) -> bool) -> Vec<Rejection> {
    let mut found = Vec::new();
    if let Some(t) = rt.runtime_type.as_deref() {
        if !matches!(t, "" | "oci" | "vm" | "pod") {
            found.push(Rejection::RuntimeType(t.to_owned()));
        }
    }
    if let Some(p) = rt.runtime_path.as_deref().filter(|p| !p.is_empty()) {
        if !exists(p) {
            found.push(Rejection::RuntimePath(p.to_owned()));
        }
    }
    found.extend(
        rt.allowed_annotations
            .iter()
            .filter(|a| !CRIO_ANNOTATIONS.contains(&a.as_str()))
            .map(|a| Rejection::Annotation(a.clone())),
    );
    if let Some(p) = rt.monitor_path.as_deref().filter(|p| !p.is_empty()) {
        if !exists(p) {
            found.push(Rejection::MonitorPath(p.to_owned()));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropins_override_in_order() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("crio.conf.d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("10-nixenv.conf"),
            "[crio.runtime.runtimes.nixenv]\nruntime_path = \"/usr/bin/nixenv-runc\"\nallowed_annotations = [\"nix.dev/environment\"]\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("20-local.conf"),
            "[crio.runtime.runtimes.nixenv]\nruntime_type = \"oci\"\n",
        )
        .unwrap();
        std::fs::write(dir.join("ignored.txt"), "not toml [").unwrap();
        let cfg = CrioConfig::load(&d.path().join("crio.conf"), &dir).unwrap();
        let rt = cfg.runtime("nixenv").unwrap();
        assert_eq!(rt.runtime_path.as_deref(), Some("/usr/bin/nixenv-runc"));
        assert_eq!(rt.runtime_type.as_deref(), Some("oci"));
        assert_eq!(rt.allowed_annotations, vec!["nix.dev/environment"]);
        assert_eq!(rt.defined_in, dir.join("20-local.conf"));
        assert!(cfg.runtime("runc").is_none());
    }

    fn runtime(text: &str) -> CrioRuntime {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("crio.conf.d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("10-nixenv.conf"), text).unwrap();
        CrioConfig::load(&d.path().join("crio.conf"), &dir)
            .unwrap()
            .runtime("nixenv")
            .unwrap()
    }

    #[test]
    fn the_shipped_drop_in_passes_crio_s_checks() {
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtimeclass/crio-nixenv.conf"),
        )
        .unwrap();
        let rt = runtime(&shipped);
        assert_eq!(rt.runtime_path.as_deref(), Some("/usr/bin/nixenv-runc"));
        assert_eq!(rt.runtime_type.as_deref(), Some("oci"));
        assert!(rt.monitor_path.is_none());
        assert_eq!(rejections(&rt, |p| p == "/usr/bin/nixenv-runc"), vec![]);
    }

    #[test]
    fn what_crio_rejects() {
        // The handler the earlier package shipped: CRI-O 1.36 logs "is being ignored due to:
        // invalid allowed_annotation: nix.dev/environment", and without conmon at that path
        // CRI-O does not start.
        let old = runtime(
            "[crio.runtime.runtimes.nixenv]\nruntime_path = \"/usr/bin/nixenv-runc\"\nruntime_type = \"oci\"\nmonitor_path = \"/usr/libexec/crio/conmon\"\nallowed_annotations = [\"io.kubernetes.cri-o.Devices\", \"nix.dev/environment\"]\n",
        );
        assert_eq!(
            rejections(&old, |p| p == "/usr/bin/nixenv-runc"),
            vec![
                Rejection::Annotation("nix.dev/environment".into()),
                Rejection::MonitorPath("/usr/libexec/crio/conmon".into()),
            ]
        );
        let odd = runtime(
            "[crio.runtime.runtimes.nixenv]\nruntime_path = \"/opt/nixenv-runc\"\nruntime_type = \"runc\"\n",
        );
        assert_eq!(
            rejections(&odd, |_| false),
            vec![
                Rejection::RuntimeType("runc".into()),
                Rejection::RuntimePath("/opt/nixenv-runc".into()),
            ]
        );
    }
}
