//! The node-side installer for managed nodes (`packaging/lib/install-node`, what the installer
//! DaemonSet's init container runs) against prepared host roots: k3s and RKE2 (their containerd
//! config templates), containerd config version 2 and 3 (node-config, run chrooted into the
//! root), CRI-O drop-ins. Install, re-apply after the node's tooling rewrote its config, and
//! uninstall, each twice: the second run changes nothing, and uninstall gives back the root as
//! it was, byte for byte.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The installer's payload as the DaemonSet's image holds it, staged by
/// `packaging/installer/stage` from this build's binaries.
fn payload(dir: &Path) -> PathBuf {
    let p = dir.join("payload");
    let bin = nixenv_testkit::bin_path("nixenv");
    for b in ["containerd-shim-nixenv-v2", "nixenv-hook", "nixenv-runc"] {
        nixenv_testkit::bin_path(b);
    }
    let st = Command::new(repo().join("packaging/installer/stage"))
        .arg(&p)
        .arg(bin.parent().unwrap())
        .status()
        .unwrap();
    assert!(st.success(), "packaging/installer/stage");
    p
}

/// A node's root: the usual directories, and (for node-config, which runs chrooted) the
/// machine's programs bound read-only under it. The binds go when dropped.
struct HostRoot {
    _dir: tempfile::TempDir,
    root: PathBuf,
    payload: PathBuf,
    mounts: Vec<PathBuf>,
}

/// Directories bound from the machine so that `chroot ROOT /bin/sh` works; never written.
const BOUND: &[&str] = &[
    "usr/bin",
    "usr/sbin",
    "usr/lib",
    "usr/lib64",
    "etc/alternatives",
];

impl HostRoot {
    fn new(files: &[(&str, &str)]) -> HostRoot {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for d in ["opt", "usr/local/bin", "var/lib", "etc", "tmp", "dev"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for (path, content) in files {
            let p = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            if !path.ends_with('/') {
                std::fs::write(&p, content).unwrap();
            }
        }
        let payload = payload(dir.path());
        let mut host = HostRoot {
            _dir: dir,
            root,
            payload,
            mounts: Vec::new(),
        };
        for d in ["bin", "sbin", "lib", "lib64"] {
            std::os::unix::fs::symlink(format!("usr/{d}"), host.root.join(d)).unwrap();
        }
        for d in BOUND {
            let from = Path::new("/").join(d);
            if !from.exists() {
                continue;
            }
            let to = host.root.join(d);
            std::fs::create_dir_all(&to).unwrap();
            host.bind(&from, &to, true);
        }
        let null = host.root.join("dev/null");
        std::fs::write(&null, b"").unwrap();
        host.bind(Path::new("/dev/null"), &null, false);
        host
    }

    fn bind(&mut self, from: &Path, to: &Path, read_only: bool) {
        let run = |args: &[&str]| {
            let st = Command::new("mount").args(args).status().unwrap();
            assert!(st.success(), "mount {args:?}");
        };
        run(&["--bind", from.to_str().unwrap(), to.to_str().unwrap()]);
        self.mounts.push(to.to_path_buf());
        if read_only {
            run(&["-o", "remount,bind,ro", to.to_str().unwrap()]);
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    fn read(&self, p: &str) -> String {
        std::fs::read_to_string(self.path(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    /// Runs `install-node ACTION`; returns its stderr; panics if it fails.
    fn run(&self, action: &str) -> String {
        let out = Command::new("sh")
            .arg(self.payload.join("lib/install-node"))
            .arg(action)
            .env("NIXENV_HOST", &self.root)
            .env("NIXENV_PAYLOAD", &self.payload)
            .env("NIXENV_SKIP_IMAGE", "1")
            .env_remove("NIXENV_RESTART")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "install-node {action}: {err}");
        err
    }

    /// Every entry under the root but the bound directories: type, mode, link target, SHA-256.
    fn snapshot(&self) -> BTreeMap<String, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
            let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let p = e.path();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                if BOUND.contains(&rel.as_str()) || rel == "dev/null" {
                    continue;
                }
                let m = std::fs::symlink_metadata(&p).unwrap();
                let mode = m.permissions().mode() & 0o7777;
                let what = if m.file_type().is_symlink() {
                    format!("link {}", std::fs::read_link(&p).unwrap().display())
                } else if m.is_dir() {
                    walk(root, &p, out);
                    format!("dir {mode:o} {}", m.uid())
                } else {
                    let sha = Sha256::digest(std::fs::read(&p).unwrap());
                    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
                    format!("file {mode:o} {hex}")
                };
                out.insert(rel, what);
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.root, &self.root, &mut out);
        out
    }

    /// Installs twice (the second changes nothing), checks with `check`, re-applies (nothing
    /// changes), uninstalls twice: the root is as before.
    fn round_trip(&self, check: impl Fn(&HostRoot)) {
        let before = self.snapshot();
        let err = self.run("install");
        assert!(err.contains("nothing restarted"), "{err}");
        let installed = self.snapshot();
        assert_ne!(installed, before);
        let mtime = |p: &str| std::fs::metadata(self.path(p)).unwrap().modified().unwrap();
        let copied = mtime("/opt/nixenv/bin/nixenv");
        let err = self.run("install");
        assert_eq!(
            self.snapshot(),
            installed,
            "a second install changes nothing"
        );
        assert_eq!(
            mtime("/opt/nixenv/bin/nixenv"),
            copied,
            "not even rewritten"
        );
        assert!(!err.contains("restart"), "nothing to restart for: {err}");
        check(self);
        self.run("reapply");
        assert_eq!(
            self.snapshot(),
            installed,
            "reapply of an intact node changes nothing"
        );
        for b in ["containerd-shim-nixenv-v2", "nixenv"] {
            let link = self.path(&format!("/usr/local/bin/{b}"));
            assert_eq!(
                std::fs::read_link(&link).unwrap(),
                Path::new("/opt/nixenv/bin").join(b)
            );
            let bin = self.path(&format!("/opt/nixenv/bin/{b}"));
            assert_eq!(
                std::fs::read(&bin).unwrap(),
                std::fs::read(self.payload.join("bin").join(b)).unwrap()
            );
            assert_ne!(std::fs::metadata(&bin).unwrap().mode() & 0o111, 0);
        }
        assert!(self.path("/etc/nixenv/config.toml").exists());
        self.run("uninstall");
        assert_eq!(self.snapshot(), before, "uninstall gives the root back");
        self.run("uninstall");
        assert_eq!(self.snapshot(), before);
    }
}

impl Drop for HostRoot {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// What k3s writes as its containerd config (it renders it again at every start).
const K3S_GENERATED: &str = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_address = \"127.0.0.1\"\n";

#[test]
fn k3s_gets_its_templates_which_survive_regeneration() {
    let dir = "/var/lib/rancher/k3s/agent/etc/containerd";
    let host = HostRoot::new(&[(&format!("{dir}/config.toml"), K3S_GENERATED)]);
    host.round_trip(|h| {
        let v2 = h.read(&format!("{dir}/config.toml.tmpl"));
        assert!(v2.starts_with("{{ template \"base\" . }}\n"), "{v2}");
        assert!(v2.contains(
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nixenv]\n  runtime_type = \"io.containerd.nixenv.v2\""
        ), "{v2}");
        let v3 = h.read(&format!("{dir}/config-v3.toml.tmpl"));
        assert!(v3.starts_with("{{ template \"base\" . }}\n"), "{v3}");
        assert!(
            v3.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.nixenv]"),
            "{v3}"
        );
        // k3s rewrites config.toml at its next start from the template: the installer never
        // touches the generated file.
        assert_eq!(h.read(&format!("{dir}/config.toml")), K3S_GENERATED);
        assert!(!h.path("/etc/crio/crio.conf.d").exists(), "no CRI-O here");
    });
}

#[test]
fn an_operators_rke2_template_gets_the_nixenv_block_and_keeps_the_rest() {
    let dir = "/var/lib/rancher/rke2/agent/etc/containerd";
    let own = "{{ template \"base\" . }}\n\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
    let host = HostRoot::new(&[
        (&format!("{dir}/config.toml"), K3S_GENERATED),
        (&format!("{dir}/config-v3.toml.tmpl"), own),
    ]);
    host.round_trip(|h| {
        let v3 = h.read(&format!("{dir}/config-v3.toml.tmpl"));
        assert!(v3.starts_with(own), "{v3}");
        assert!(v3.contains("runtimes.nixenv]"), "{v3}");
        assert!(h.path(&format!("{dir}/config.toml.tmpl")).exists());
    });
}

const CONTAINERD_V2: &str = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.10\"\n";
const CONTAINERD_V3: &str = "version = 3\n\n[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"registry.k8s.io/pause:3.10\"\n";

#[test]
fn containerd_v2_is_configured_by_node_config_and_reapplied_after_regeneration() {
    let host = HostRoot::new(&[("/etc/containerd/config.toml", CONTAINERD_V2)]);
    host.round_trip(|h| {
        let cfg = h.read("/etc/containerd/config.toml");
        assert!(cfg.starts_with(CONTAINERD_V2), "{cfg}");
        assert!(
            cfg.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nixenv]"),
            "{cfg}"
        );
        // The node's tooling writes its own config again: reapply puts the handler back.
        std::fs::write(h.path("/etc/containerd/config.toml"), CONTAINERD_V2).unwrap();
        let err = h.run("reapply");
        assert!(err.contains("lost the nixenv handler"), "{err}");
        assert_eq!(h.read("/etc/containerd/config.toml"), cfg);
    });
}

#[test]
fn containerd_v3_gets_a_drop_in_and_an_import() {
    let host = HostRoot::new(&[("/etc/containerd/config.toml", CONTAINERD_V3)]);
    host.round_trip(|h| {
        let cfg = h.read("/etc/containerd/config.toml");
        assert!(cfg.contains("/etc/containerd/conf.d/nixenv.toml"), "{cfg}");
        let dropin = h.read("/etc/containerd/conf.d/nixenv.toml");
        assert!(dropin.contains("\nversion = 3\n"), "{dropin}");
        assert!(
            dropin
                .contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.nixenv]"),
            "{dropin}"
        );
    });
}

#[test]
fn crio_gets_a_drop_in_running_the_installed_wrapper() {
    let theirs = "[crio.runtime]\ncgroup_manager = \"systemd\"\n";
    let host = HostRoot::new(&[("/etc/crio/crio.conf.d/00-base.conf", theirs)]);
    host.round_trip(|h| {
        let dropin = h.read("/etc/crio/crio.conf.d/10-nixenv.conf");
        assert!(
            dropin.contains("[crio.runtime.runtimes.nixenv]"),
            "{dropin}"
        );
        assert!(
            dropin.contains("runtime_path = \"/opt/nixenv/bin/nixenv-runc\""),
            "{dropin}"
        );
        assert_eq!(h.read("/etc/crio/crio.conf.d/00-base.conf"), theirs);
    });
}

/// The manifest validator (PyPI), pinned: Kubernetes' OpenAPI schemas of 1.37, checked
/// strictly (an unknown field is an error). `kubectl apply --dry-run=client` needs an API
/// server for its resource mapping, which no registry gives.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

#[test]
fn shipped_manifests_validate_against_kubernetes_schemas() {
    let python = nixenv_testkit::python::venv_with(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        KUBERNETES_VALIDATE,
    );
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(repo().join("runtimeclass"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    manifests.sort();
    assert!(manifests.iter().any(|p| p.ends_with("installer.yaml")));
    let out = Command::new(python.with_file_name("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", "1.37"])
        .args(&manifests)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for m in &manifests {
        let name = m.strip_prefix(repo()).unwrap().display().to_string();
        assert!(text.contains(&format!("{name} passed")), "{name}: {text}");
    }
    assert!(text.contains("daemonset/nixenv-installer"), "{text}");
}
