//! `nixenv-hook`: the OCI hook stages.
//!
//! - `precreate` (podman's hooks.d): runtime spec on stdin, rewritten spec on stdout; the input
//!   bytes unchanged when the container is not nixenv's. A precreate hook is not told the
//!   container id, so the pin is keyed by the container's rootfs path ([`rootfs_key`]), which
//!   the `poststop` stage finds again in the bundle.
//! - `prestart`/`createRuntime`: container state on stdin; materialises and pins the closure
//!   and mounts it read-only into the container's mount namespace ([`crate::prestart`]).
//! - `poststop`: container state on stdin; releases the pins.
//!
//! The core is a [`Node`] (`prepare_spec`, `release`, `store_dir`), the mount helper a
//! [`Helper`]: type parameters, so the stages are testable without root.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use nixenv_core::runtime::{Decision, Owner, OwnerKind};
use oci_spec::runtime::Spec;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::node::Node;

/// Why a hook stage failed. `Display` is the one-line error (without `nixenv: `).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot read the hook's stdin: {0}")]
    Stdin(#[source] std::io::Error),
    #[error("cannot write the hook's stdout: {0}")]
    Stdout(#[source] std::io::Error),
    #[error("runtime spec on stdin is not valid: {0}")]
    Spec(#[source] serde_json::Error),
    #[error("container state on stdin is not valid: {0}")]
    State(#[source] serde_json::Error),
    #[error("{path}: {source}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("container {id} has no root filesystem in its spec")]
    NoRoot { id: String },
    #[error("container {id} has no pid in its state: prestart runs after the runtime created it")]
    NoPid { id: String },
    #[error("cannot serialize the rewritten spec: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("{0}")]
    Core(String),
    #[error("cannot run the mount helper {path}: {source}")]
    Helper {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Mount(String),
}

/// The part of the OCI container state the hooks use.
#[derive(Debug, Clone, Deserialize)]
pub struct ContainerState {
    /// The container id.
    pub id: String,
    /// The container's init pid (present from `created` on).
    #[serde(default)]
    pub pid: Option<i32>,
    /// The bundle directory.
    pub bundle: PathBuf,
}

/// The pin key of a container prepared by the precreate hook: `rootfs-` and 32 hex digits of
/// the SHA-256 of its root path (podman's rootfs mountpoints are unique per container).
pub fn rootfs_key(root_path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let digest = Sha256::digest(root_path.as_os_str().as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("rootfs-{hex}")
}

/// The pin's owner for a container the hook prepares, in `dir` (its bundle, or its rootfs).
fn owner(dir: Option<&Path>) -> Owner {
    Owner {
        kind: OwnerKind::Hook,
        runtime_root: None,
        bundle: dir.map(Path::to_owned),
        namespace: None,
    }
}

/// `precreate`: `input` is the spec; returns the bytes to write on stdout.
pub fn precreate<N: Node>(node: &mut N, input: Vec<u8>) -> Result<Vec<u8>, HookError> {
    let mut spec: Spec = serde_json::from_slice(&input).map_err(HookError::Spec)?;
    let (key, rootfs) = match spec.root() {
        Some(root) => (rootfs_key(root.path()), root.path().clone()),
        None => return Ok(input), // nothing to mount into; not ours to fail
    };
    // The hook is not told the container id; the rootfs stands in for the bundle in the pin,
    // so gc can tell the pin is stale once the container's rootfs is gone (poststop missed).
    let owner_dir = rootfs.is_absolute().then_some(rootfs.as_path());
    match node
        .prepare_spec(&key, &mut spec, &owner(owner_dir))
        .map_err(|e| HookError::Core(e.to_string()))?
    {
        Decision::PassThrough => Ok(input),
        Decision::Rewritten(_) => {
            let mut out = serde_json::to_vec(&spec).map_err(HookError::Serialize)?;
            out.push(b'\n');
            Ok(out)
        }
    }
}

fn load_bundle_spec(bundle: &Path) -> Result<Spec, HookError> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|source| HookError::Bundle { path, source })
}

fn rootfs_of(spec: &Spec, bundle: &Path, id: &str) -> Result<PathBuf, HookError> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| HookError::NoRoot { id: id.to_owned() })?;
    Ok(bundle.join(root.path()))
}

/// Runs the mount helper: `program args…` in a fresh process.
pub trait Helper {
    /// Runs it; `Ok(Err(stderr))` when it exited non-zero.
    fn run(&mut self, args: &[OsString]) -> Result<Result<(), String>, HookError>;
}

/// `/proc/self/exe` with the helper subcommand.
#[derive(Debug, Default)]
pub struct SelfHelper;

impl Helper for SelfHelper {
    fn run(&mut self, args: &[OsString]) -> Result<Result<(), String>, HookError> {
        let path = PathBuf::from("/proc/self/exe");
        let out = std::process::Command::new(&path)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| HookError::Helper { path, source })?;
        if out.status.success() {
            return Ok(Ok(()));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("mount helper failed");
        Ok(Err(line.trim().trim_start_matches("nixenv: ").to_owned()))
    }
}

/// `prestart`/`createRuntime`: prepares, pins and mounts the closure of the container in
/// `state`. Returns the closure it mounted (empty when the container is not nixenv's).
pub fn prestart<N: Node, H: Helper>(
    node: &mut N,
    helper: &mut H,
    state: &[u8],
) -> Result<Vec<String>, HookError> {
    let state: ContainerState = serde_json::from_slice(state).map_err(HookError::State)?;
    let mut spec = load_bundle_spec(&state.bundle)?;
    let rootfs = rootfs_of(&spec, &state.bundle, &state.id)?;
    let pid = state
        .pid
        .filter(|p| *p > 0)
        .ok_or_else(|| HookError::NoPid {
            id: state.id.clone(),
        })?;
    let prepared = match node
        .prepare_spec(&state.id, &mut spec, &owner(Some(&state.bundle)))
        .map_err(|e| HookError::Core(e.to_string()))?
    {
        Decision::PassThrough => return Ok(Vec::new()),
        Decision::Rewritten(p) => p,
    };
    let store = node.store_dir();
    let sources: Vec<PathBuf> = prepared
        .closure
        .iter()
        .filter_map(|p| Path::new(p).file_name().map(|base| store.join(base)))
        .collect();
    let args = crate::prestart::mount_args(pid, &rootfs, &sources);
    let outcome = helper.run(&args);
    let failed = match outcome {
        Ok(Ok(())) => return Ok(prepared.closure),
        Ok(Err(msg)) => HookError::Mount(format!(
            "{}: mounting the closure: {msg}",
            prepared.reference
        )),
        Err(e) => e,
    };
    // The container will not start: do not keep its closure pinned.
    let _ = node.release(&state.id);
    Err(failed)
}

/// `poststop`: releases the pins of the container in `state` (by id, and by rootfs key for a
/// container the precreate hook prepared).
pub fn poststop<N: Node>(node: &mut N, state: &[u8]) -> Result<(), HookError> {
    let state: ContainerState = serde_json::from_slice(state).map_err(HookError::State)?;
    node.release(&state.id)
        .map_err(|e| HookError::Core(e.to_string()))?;
    if let Ok(spec) = load_bundle_spec(&state.bundle) {
        if let Some(root) = spec.root() {
            node.release(&rootfs_key(root.path()))
                .map_err(|e| HookError::Core(e.to_string()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::fake::FakeNode;
    use nixenv_core::runtime::Prepared;

    /// A node that prepares `closure` (`None`: passes through).
    fn fake_node(closure: Option<Vec<&str>>) -> FakeNode {
        FakeNode {
            prepared: closure.map(|c| Prepared {
                reference: "acme/echoserver".into(),
                generation: Some(1),
                closure: c.into_iter().map(String::from).collect(),
                env: Vec::new(),
            }),
            ..FakeNode::default()
        }
    }

    const SPEC: &str = r#"{ "ociVersion": "1.0.2", "root": {"path": "/r/merged"},
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/"},  "annotations": {"a": "b"} }"#;

    #[test]
    fn precreate_passes_bytes_through_or_rewrites() {
        let mut node = fake_node(None);
        let out = precreate(&mut node, SPEC.as_bytes().to_vec()).unwrap();
        assert_eq!(out, SPEC.as_bytes());
        assert_eq!(
            node.calls,
            [format!("prepare {}", rootfs_key(Path::new("/r/merged")))]
        );
        assert_eq!(node.owners, [owner(Some(Path::new("/r/merged")))]);

        let mut node = fake_node(Some(vec!["/nix/store/x-a"]));
        let out = precreate(&mut node, SPEC.as_bytes().to_vec()).unwrap();
        let spec: Spec = serde_json::from_slice(&out).unwrap();
        assert_eq!(spec.hostname().as_deref(), Some("rewritten"));
    }

    #[test]
    fn precreate_rejects_garbage_with_a_one_line_error() {
        let mut node = fake_node(None);
        let err = precreate(&mut node, b"{not json".to_vec()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("runtime spec on stdin is not valid"),
            "{err}"
        );
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn rootfs_keys_are_stable_and_distinct() {
        let a = rootfs_key(Path::new("/var/lib/containers/storage/overlay/aaa/merged"));
        assert_eq!(
            a,
            rootfs_key(Path::new("/var/lib/containers/storage/overlay/aaa/merged"))
        );
        assert_ne!(
            a,
            rootfs_key(Path::new("/var/lib/containers/storage/overlay/bbb/merged"))
        );
        assert_eq!(a.len(), "rootfs-".len() + 32);
    }

    struct FakeHelper(Vec<Vec<OsString>>, Result<(), String>);
    impl Helper for FakeHelper {
        fn run(&mut self, args: &[OsString]) -> Result<Result<(), String>, HookError> {
            self.0.push(args.to_vec());
            Ok(self.1.clone())
        }
    }

    fn bundle_with_spec() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            SPEC.replace("/r/merged", "rootfs"),
        )
        .unwrap();
        dir
    }

    #[test]
    fn prestart_mounts_the_closure_from_the_store() {
        let bundle = bundle_with_spec();
        let state = serde_json::json!({"ociVersion": "1.0.2", "id": "c1", "status": "created",
            "pid": 4242, "bundle": bundle.path(), "annotations": {}});
        let mut node = fake_node(Some(vec!["/nix/store/aaa-glibc", "/nix/store/bbb-echo"]));
        let mut helper = FakeHelper(vec![], Ok(()));
        let closure = prestart(&mut node, &mut helper, state.to_string().as_bytes()).unwrap();
        assert_eq!(closure.len(), 2);
        assert_eq!(node.calls, ["prepare c1"]);
        assert_eq!(node.owners, [owner(Some(bundle.path()))]);
        let rootfs = bundle.path().join("rootfs");
        assert_eq!(
            helper.0,
            [crate::prestart::mount_args(
                4242,
                &rootfs,
                &[
                    "/var/lib/nixenv/store/aaa-glibc".into(),
                    "/var/lib/nixenv/store/bbb-echo".into()
                ]
            )]
        );
    }

    #[test]
    fn prestart_failure_releases_the_pin() {
        let bundle = bundle_with_spec();
        let state = serde_json::json!({"id": "c1", "pid": 4242, "bundle": bundle.path()});
        let mut node = fake_node(Some(vec!["/nix/store/aaa-glibc"]));
        let mut helper = FakeHelper(vec![], Err("bind mount onto /x: permission denied".into()));
        let err = prestart(&mut node, &mut helper, state.to_string().as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "acme/echoserver: mounting the closure: bind mount onto /x: permission denied"
        );
        assert_eq!(node.calls, ["prepare c1", "release c1"]);
    }

    #[test]
    fn prestart_without_annotation_mounts_nothing() {
        let bundle = bundle_with_spec();
        let state = serde_json::json!({"id": "c1", "pid": 1, "bundle": bundle.path()});
        let mut node = fake_node(None);
        let mut helper = FakeHelper(vec![], Ok(()));
        assert!(
            prestart(&mut node, &mut helper, state.to_string().as_bytes())
                .unwrap()
                .is_empty()
        );
        assert!(helper.0.is_empty());
    }

    #[test]
    fn poststop_releases_by_id_and_rootfs_key() {
        let bundle = bundle_with_spec();
        let state = serde_json::json!({"id": "c1", "bundle": bundle.path()});
        let mut node = fake_node(None);
        poststop(&mut node, state.to_string().as_bytes()).unwrap();
        assert_eq!(
            node.calls,
            [
                "release c1".to_string(),
                format!("release {}", rootfs_key(Path::new("rootfs")))
            ]
        );
    }
}
