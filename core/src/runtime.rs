//! The one call the shim, the runc wrapper and the hooks make: decide whether a container is
//! nixenv's, resolve and materialise its environment, pin it, and rewrite its spec. Two entry
//! points: [`prepare_spec`] (a spec in memory, the precreate hook) and [`prepare_bundle`]
//! (`<bundle>/config.json`, the shim's helper and the runc wrapper); [`release`] undoes either.
//!
//! A container is nixenv's when its spec carries `nix.dev/environment`, it is not the pod
//! sandbox (containerd CRI `io.kubernetes.cri.container-type = sandbox`, CRI-O
//! `io.kubernetes.cri-o.ContainerType = sandbox`), and its name
//! (`io.kubernetes.cri.container-name` or `io.kubernetes.container.name`) is not listed in
//! `nix.dev/skip-containers`. Anything else passes through untouched.
//!
//! For nixenv's containers: build one [`Fetcher`] (so at most one HTTP client, shared by the
//! catalog and the substituter), parse the reference, resolve it (catalog and resolution
//! cache), take the store-wide gc lock shared (once, held until the pin is written),
//! materialise the closure, pin it (one write, with the whole closure), and rewrite the spec
//! ([`crate::spec::rewrite()`]). On any failure after pinning, or if the preparation is
//! dropped, the pin is removed, so nothing is left half-done. [`release`] removes the pin when
//! the container is deleted.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_spec::runtime::Spec;

use crate::annotations::{
    CRIO_CONTAINER_TYPE, CRI_CONTAINER_NAME, CRI_CONTAINER_TYPE, ENVIRONMENT_ANNOTATION,
    K8S_CONTAINER_NAME, SKIP_CONTAINERS_ANNOTATION,
};
use crate::config::Config;
use crate::environment::{resolve, Reference, ReferenceError, ResolveError, Resolved};
use crate::fetch::netrc::NetrcError;
use crate::fetch::{Fetch, Fetcher};
use crate::gc::GcLock;
use crate::nix::StorePath;
use crate::pin::{self, Pin, PinError};
use crate::spec::{
    self, BundleConfig, BundleError, EnvChange, IdmapError, RuncFeatures, RuntimeFeatures,
};
use crate::store::view::{View, Views};
use crate::store::{Closure, StoreError};
use crate::substituter::{self, NoProgress, SubstituteError};

pub use crate::pin::{Owner, OwnerKind};

/// What [`prepare_spec`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not nixenv's container (no annotation, sandbox, skipped): the spec is unchanged.
    PassThrough,
    /// The spec now mounts the closure.
    Rewritten(Prepared),
}

/// A prepared container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The reference as annotated (`acme/echoserver`, `acme/echoserver@2`, `/nix/store/…`).
    pub reference: String,
    /// The generation it resolved to, if it came from the catalog.
    pub generation: Option<u64>,
    /// The closure, as absolute `/nix/store/…` paths, sorted.
    pub closure: Vec<String>,
    /// What the rewrite changed in the process environment (PATH, the lock's env,
    /// `NIXENV_*`), in the spec's order.
    pub env: Vec<EnvChange>,
}

/// Why a container could not be prepared. `Display` is the one-line error users see
/// (without the `nixenv: ` prefix, which binaries add); it names the reference and the cause.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// config.json could not be read, parsed or written.
    #[error("{}{source}", reference_prefix(.reference))]
    Bundle {
        /// The reference, once known.
        reference: Option<String>,
        #[source]
        source: BundleError,
    },
    /// The annotation is not a valid reference (the message quotes it).
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("{reference}: {source}")]
    Resolve {
        reference: String,
        #[source]
        source: Box<ResolveError>,
    },
    #[error("{reference}: {source}")]
    Substitute {
        reference: String,
        #[source]
        source: Box<SubstituteError>,
    },
    #[error("{reference}: {source}")]
    Pin {
        reference: String,
        #[source]
        source: PinError,
    },
    #[error("{reference}: {source}")]
    Netrc {
        reference: String,
        #[source]
        source: NetrcError,
    },
    /// The store-wide gc lock could not be taken.
    #[error("{reference}: {source}")]
    Store {
        reference: String,
        #[source]
        source: Box<StoreError>,
    },
    /// The spec has a user namespace and its runtime cannot idmap the store binds.
    #[error("{reference}: {source}")]
    Idmap {
        reference: String,
        #[source]
        source: IdmapError,
    },
    /// A closure path is a symlink: a bind mount would resolve it on the host.
    #[error("{reference}: {path}: store path is a symlink, which cannot be bind-mounted into a container")]
    SymlinkPath { reference: String, path: String },
}

fn reference_prefix(r: &Option<String>) -> String {
    r.as_ref().map(|r| format!("{r}: ")).unwrap_or_default()
}

/// Materialises closures into the node store; a trait so runtime logic is testable without
/// caches. Called with the store-wide gc lock held shared: it must not take it again.
pub trait Materialise: Send + Sync {
    /// The closure of `roots`, every path valid in the node store.
    fn materialise(
        &self,
        roots: &[StorePath],
    ) -> impl Future<Output = Result<Closure, SubstituteError>> + Send;
}

impl<M: Materialise> Materialise for &M {
    fn materialise(
        &self,
        roots: &[StorePath],
    ) -> impl Future<Output = Result<Closure, SubstituteError>> + Send {
        (**self).materialise(roots)
    }
}

/// The production [`Materialise`]: the configured substituters, over the fetcher the catalog
/// used (no HTTP client at all when the closure is already in the store).
pub struct Substituters<'a, F> {
    cfg: &'a Config,
    fetch: Arc<F>,
}

impl<'a, F: Fetch> Substituters<'a, F> {
    /// For `cfg`, over `fetch`.
    pub fn new(cfg: &'a Config, fetch: Arc<F>) -> Self {
        Substituters { cfg, fetch }
    }
}

impl<F: Fetch> Materialise for Substituters<'_, F> {
    fn materialise(
        &self,
        roots: &[StorePath],
    ) -> impl Future<Output = Result<Closure, SubstituteError>> + Send {
        substituter::materialise(self.cfg, self.fetch.clone(), roots, &NoProgress)
    }
}

/// What a preparation reaches beyond the node store, built once per prepared container (a
/// pass-through builds nothing): the catalog's transport, the materialiser, and what the
/// container runtime can do (asked only for a user-namespaced spec).
type Edges<F, M, R> = Result<(F, M, R), NetrcError>;

/// The production edges: ONE [`Fetcher`] (so at most one HTTP client per container), shared
/// by the catalog and the substituters; the configured runc (or `runc` on PATH).
fn production_edges(cfg: &Config) -> Edges<Arc<Fetcher>, Substituters<'_, Fetcher>, RuncFeatures> {
    let fetch = Arc::new(Fetcher::for_config(cfg)?);
    let runc = RuncFeatures::new(cfg.runc.as_deref().unwrap_or(Path::new("runc")));
    Ok((fetch.clone(), Substituters::new(cfg, fetch), runc))
}

/// A user-namespaced `spec` needs idmapped store binds: refused, before anything is fetched
/// or pinned, when the runtime cannot make them.
fn check_idmap(
    features: &impl RuntimeFeatures,
    spec: &Spec,
    annotated: &str,
) -> Result<(), RuntimeError> {
    if spec::user_mappings(spec).is_none() {
        return Ok(());
    }
    features
        .idmapped_mounts()
        .map_err(|source| RuntimeError::Idmap {
            reference: annotated.to_owned(),
            source,
        })
}

fn edges_err(annotated: &str) -> impl FnOnce(NetrcError) -> RuntimeError + '_ {
    move |source| RuntimeError::Netrc {
        reference: annotated.to_owned(),
        source,
    }
}

/// The environment annotation's value if the container with these annotations is nixenv's;
/// `None` to pass it through.
pub fn wanted(annotations: &HashMap<String, String>) -> Option<&str> {
    let value = annotations.get(ENVIRONMENT_ANNOTATION)?;
    let is_sandbox = [CRI_CONTAINER_TYPE, CRIO_CONTAINER_TYPE]
        .iter()
        .any(|k| annotations.get(*k).is_some_and(|t| t == "sandbox"));
    if is_sandbox {
        return None;
    }
    let name = annotations
        .get(CRI_CONTAINER_NAME)
        .or_else(|| annotations.get(K8S_CONTAINER_NAME));
    if let (Some(name), Some(skip)) = (name, annotations.get(SKIP_CONTAINERS_ANNOTATION)) {
        if skip
            .split(',')
            .map(str::trim)
            .any(|s| !s.is_empty() && s == name)
        {
            return None;
        }
    }
    Some(value.as_str())
}

/// The environment `<bundle>/config.json` asks for, if its container is nixenv's; `None` when
/// it is not, or config.json cannot be read (the runtime will say why).
pub fn bundle_wants(bundle: &Path) -> Option<String> {
    let config = BundleConfig::read(bundle).ok()?;
    wanted(&config.annotations()).map(str::to_owned)
}

/// Whether `path` has a `bin/` (a directory, or a symlink as in profiles) in the node store.
pub fn store_has_bin(store_dir: &Path, path: &StorePath) -> bool {
    std::fs::symlink_metadata(store_dir.join(path.base_name()).join("bin"))
        .is_ok_and(|m| m.is_dir() || m.is_symlink())
}

/// A resolved, materialised and pinned environment; the pin goes unless [`Ready::keep`].
struct Ready<'a> {
    resolved: Resolved,
    closure: Vec<StorePath>,
    /// The closure's view, mounted instead of one bind per path.
    view: Option<PathBuf>,
    annotated: String,
    guard: PinGuard<'a>,
}

impl Ready<'_> {
    /// The container is prepared, its spec changed `env`: keep its pin.
    fn keep(self, env: Vec<EnvChange>) -> Prepared {
        let prepared = Prepared {
            reference: self.annotated.clone(),
            generation: self.resolved.generation,
            closure: self.closure.iter().map(|p| p.to_absolute_path()).collect(),
            env,
        };
        self.guard.keep();
        prepared
    }

    /// Rewrites `spec`; returns what changed in its process environment.
    fn rewrite(&self, cfg: &Config, spec: &mut Spec) -> Vec<EnvChange> {
        let process_env = |spec: &Spec| {
            spec.process()
                .as_ref()
                .and_then(|p| p.env().clone())
                .unwrap_or_default()
        };
        let before = process_env(spec);
        let store_dir = cfg.store_dir();
        let env = spec::Environment {
            reference: &self.annotated,
            generation: self.resolved.generation,
            paths: &self.resolved.paths,
            env: &self.resolved.env,
            closure: &self.closure,
            view: self.view.as_deref(),
        };
        spec::rewrite(spec, &env, &store_dir, |p| store_has_bin(&store_dir, p));
        spec::env_changes(&before, &process_env(spec))
    }
}

/// The views of the node store, when `closure-views` is on and the boot is known.
fn views(cfg: &Config) -> Option<Views> {
    if !cfg.closure_views {
        return None;
    }
    Views::open(&cfg.state_dir)
        .inspect_err(|e| tracing::warn!(error = %e, "closure views off: one bind per path"))
        .ok()
}

/// The view of `roots`' closure, if this boot built one (with the gc lock held shared).
fn lookup_view(cfg: &Config, roots: &[StorePath]) -> Option<View> {
    views(cfg)?
        .lookup(roots)
        .inspect_err(|e| tracing::warn!(error = %e, "cannot read closure view: building it"))
        .ok()
        .flatten()
}

/// Builds the view of `roots`' closure; `None` (one bind per path, logged) if it cannot.
fn build_view(cfg: &Config, roots: &[StorePath], closure: &[StorePath]) -> Option<PathBuf> {
    let views = views(cfg)?;
    match views.build(roots, closure) {
        Ok(v) => Some(v.dir),
        Err(e) => {
            tracing::warn!(error = %e, "cannot build closure view: one bind per path");
            None
        }
    }
}

/// Without a view each closure path is bind-mounted on its own, and a root that is a
/// symlink would be resolved on the host by runc's bind mount.
fn refuse_symlink_roots(
    cfg: &Config,
    annotated: &str,
    closure: &[StorePath],
) -> Result<(), RuntimeError> {
    let store_dir = cfg.store_dir();
    match closure.iter().find(|p| {
        std::fs::symlink_metadata(store_dir.join(p.base_name())).is_ok_and(|m| m.is_symlink())
    }) {
        Some(link) => Err(RuntimeError::SymlinkPath {
            reference: annotated.to_owned(),
            path: link.to_absolute_path(),
        }),
        None => Ok(()),
    }
}

/// Resolve, materialise (under the shared gc lock), pin the closure; unpins on failure.
async fn make_ready<'a, F: Fetch, M: Materialise>(
    cfg: &'a Config,
    fetch: &F,
    materialiser: &M,
    container_id: &'a str,
    annotated: &str,
    owner: &Owner,
) -> Result<Ready<'a>, RuntimeError> {
    let reference: Reference = annotated.parse()?;
    let pin_err = |source| RuntimeError::Pin {
        reference: annotated.to_owned(),
        source,
    };
    pin::check_container_id(container_id).map_err(pin_err)?;
    let resolved =
        resolve(cfg, fetch, &reference)
            .await
            .map_err(|source| RuntimeError::Resolve {
                reference: annotated.to_owned(),
                source: Box::new(source),
            })?;
    // Held shared until the closure is pinned: a gc that decides meanwhile waits, so the
    // paths being materialised, installed and not yet pinned, are never collected. That makes
    // a pin of the roots before materialising unnecessary: the container's pin is written
    // once, with the whole closure (one write, one fsync, on every container start).
    let _gc = GcLock::shared_async(&cfg.state_dir)
        .await
        .map_err(|source| RuntimeError::Store {
            reference: annotated.to_owned(),
            source: Box::new(source),
        })?;
    let (closure, view) = match lookup_view(cfg, &resolved.paths) {
        // Warm: the view's entries are the closure, every one valid (see store::view).
        Some(view) => (view.closure, Some(view.dir)),
        None => {
            let closure = materialiser
                .materialise(&resolved.paths)
                .await
                .map_err(|source| RuntimeError::Substitute {
                    reference: annotated.to_owned(),
                    source: Box::new(source),
                })?;
            let view = build_view(cfg, &resolved.paths, &closure.paths);
            if view.is_none() {
                refuse_symlink_roots(cfg, annotated, &closure.paths)?;
            }
            (closure.paths, view)
        }
    };
    let mut record = Pin::new(
        container_id,
        annotated,
        resolved.generation,
        resolved.paths.clone(),
        owner.clone(),
    );
    record.closure = closure;
    record.system = Some(cfg.system.clone());
    record.env = resolved.env.clone();
    pin::pin(&cfg.state_dir, &record).map_err(pin_err)?;
    // From here on the pin is removed on failure, and also if this future is dropped
    // (a cancelled CreateContainer): nothing is left half-done.
    let guard = PinGuard {
        cfg,
        container_id,
        armed: true,
    };
    tracing::info!(
        container = %container_id,
        reference = %annotated,
        generation = ?resolved.generation,
        source = ?resolved.source,
        paths = record.closure.len(),
        view = ?view,
        "environment ready"
    );
    Ok(Ready {
        resolved,
        closure: record.closure,
        view,
        annotated: annotated.to_owned(),
        guard,
    })
}

/// Removes a container's pin when dropped armed.
struct PinGuard<'a> {
    cfg: &'a Config,
    container_id: &'a str,
    armed: bool,
}

impl PinGuard<'_> {
    /// Keeps the pin.
    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            undo_pin(self.cfg, self.container_id);
        }
    }
}

fn undo_pin(cfg: &Config, container_id: &str) {
    if let Err(e) = pin::unpin(&cfg.state_dir, container_id) {
        tracing::warn!(container = %container_id, error = %e, "cannot remove pin after a failure");
    }
}

/// Decides, resolves, materialises, pins `container_id` and rewrites `spec` in place, recording
/// `owner` (runtime kind, runc root, bundle) in the pin.
pub async fn prepare_spec(
    cfg: &Config,
    container_id: &str,
    spec: &mut Spec,
    owner: &Owner,
) -> Result<Decision, RuntimeError> {
    prepare_spec_via(cfg, || production_edges(cfg), container_id, spec, owner).await
}

/// [`prepare_spec`] on `<bundle>/config.json`, rewritten atomically; untouched (byte for byte)
/// on [`Decision::PassThrough`]. The pin's owner `bundle` defaults to `bundle`.
pub async fn prepare_bundle(
    cfg: &Config,
    container_id: &str,
    bundle: &Path,
    owner: &Owner,
) -> Result<Decision, RuntimeError> {
    prepare_bundle_via(cfg, || production_edges(cfg), container_id, bundle, owner).await
}

/// [`prepare_spec`] with the edges `edges` builds (called once, and only for nixenv's
/// containers).
async fn prepare_spec_via<F: Fetch, M: Materialise, R: RuntimeFeatures>(
    cfg: &Config,
    edges: impl FnOnce() -> Edges<F, M, R>,
    container_id: &str,
    spec: &mut Spec,
    owner: &Owner,
) -> Result<Decision, RuntimeError> {
    let annotations = spec.annotations().clone().unwrap_or_default();
    let Some(annotated) = wanted(&annotations) else {
        return Ok(Decision::PassThrough);
    };
    let (fetch, materialiser, features) = edges().map_err(edges_err(annotated))?;
    check_idmap(&features, spec, annotated)?;
    let ready = make_ready(cfg, &fetch, &materialiser, container_id, annotated, owner).await?;
    let env = ready.rewrite(cfg, spec);
    Ok(Decision::Rewritten(ready.keep(env)))
}

/// [`prepare_bundle`] with the edges `edges` builds (called once, and only for nixenv's
/// containers).
async fn prepare_bundle_via<F: Fetch, M: Materialise, R: RuntimeFeatures>(
    cfg: &Config,
    edges: impl FnOnce() -> Edges<F, M, R>,
    container_id: &str,
    bundle: &Path,
    owner: &Owner,
) -> Result<Decision, RuntimeError> {
    let config = BundleConfig::read(bundle).map_err(|source| RuntimeError::Bundle {
        reference: None,
        source,
    })?;
    let annotations = config.annotations();
    let Some(annotated) = wanted(&annotations) else {
        return Ok(Decision::PassThrough);
    };
    let (fetch, materialiser, features) = edges().map_err(edges_err(annotated))?;
    let bundle_err = |source| RuntimeError::Bundle {
        reference: Some(annotated.to_owned()),
        source,
    };
    let mut spec = config.spec().map_err(bundle_err)?;
    check_idmap(&features, &spec, annotated)?;
    let mut owner = owner.clone();
    if owner.bundle.is_none() {
        owner.bundle = Some(std::path::absolute(bundle).unwrap_or_else(|_| bundle.to_owned()));
    }
    let ready = make_ready(cfg, &fetch, &materialiser, container_id, annotated, &owner).await?;
    let env = ready.rewrite(cfg, &mut spec);
    // On failure `ready` is dropped, which removes the pin.
    config.write_rewritten(&spec).map_err(bundle_err)?;
    Ok(Decision::Rewritten(ready.keep(env)))
}

/// Drops the pin of `container_id` (idempotent; retired to `{state-dir}/history`, see
/// [`crate::pin`]), recording the last use of its closure: a
/// start from a view reads no record, so the closure's last use is when its last container
/// went away (see [`crate::gc::usage`]).
pub fn release(cfg: &Config, container_id: &str) -> Result<(), RuntimeError> {
    let pin_err = |source| RuntimeError::Pin {
        reference: container_id.to_owned(),
        source,
    };
    let pinned = pin::read(&cfg.state_dir, container_id).ok().flatten();
    // Kept as the record of what ran (`nixenv sbom --container`), rooting nothing.
    pin::retire(&cfg.state_dir, container_id).map_err(pin_err)?;
    if let Some(p) = pinned {
        if let Ok(store) = crate::store::Store::open(&cfg.state_dir) {
            crate::gc::usage::touch(&store, &p.closure);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};

    use url::Url;

    use super::*;
    use crate::environment::catalog::tests::{lock_bytes, Answer, FakeFetch, A, B, BASE};

    /// Installs fake paths (A with `bin/`, B without) into the store; fails when told to.
    struct FakeStore {
        store_dir: std::path::PathBuf,
        fail: AtomicBool,
        hang: AtomicBool,
        entered: AtomicBool,
    }

    impl Materialise for FakeStore {
        async fn materialise(&self, roots: &[StorePath]) -> Result<Closure, SubstituteError> {
            self.entered.store(true, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(SubstituteError::NotFound {
                    path: roots[0].clone(),
                    caches: vec![Url::parse("http://127.0.0.1:9/cache").unwrap()],
                });
            }
            let mut refs = BTreeMap::new();
            for r in roots {
                let dir = self.store_dir.join(r.base_name());
                std::fs::create_dir_all(&dir).unwrap();
                if r.name().starts_with("echoserver") {
                    std::fs::create_dir_all(dir.join("bin")).unwrap();
                }
                refs.insert(r.clone(), vec![]);
            }
            Ok(Closure::from_references(refs))
        }
    }

    /// A container runtime that makes idmapped mounts, or not; counts the questions.
    #[derive(Default)]
    struct FakeRuntime {
        no_idmap: AtomicBool,
        asked: std::sync::atomic::AtomicUsize,
    }

    impl RuntimeFeatures for FakeRuntime {
        fn idmapped_mounts(&self) -> Result<(), IdmapError> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            if self.no_idmap.load(Ordering::SeqCst) {
                return Err(IdmapError::Unsupported {
                    runc: "/usr/sbin/runc".into(),
                });
            }
            Ok(())
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        cfg: Config,
        fetch: FakeFetch,
        store: FakeStore,
        runtime: FakeRuntime,
    }

    /// One bind per path (`closure-views = false`).
    fn fixture() -> Fixture {
        fixture_with_views(false)
    }

    fn fixture_with_views(closure_views: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            catalog: Some(Url::parse(BASE).unwrap()),
            state_dir: dir.path().to_owned(),
            system: "x86_64-linux".into(),
            download_attempts: 1,
            closure_views,
            ..Config::default()
        };
        let fetch = FakeFetch::default();
        fetch.set(
            &format!("{BASE}/acme/app/current.json"),
            Answer::Ok(lock_bytes("acme/app", 3)),
        );
        let store = FakeStore {
            store_dir: cfg.store_dir(),
            fail: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            entered: AtomicBool::new(false),
        };
        Fixture {
            _dir: dir,
            cfg,
            fetch,
            store,
            runtime: FakeRuntime::default(),
        }
    }

    fn spec_with(annotations: &[(&str, &str)]) -> Spec {
        let mut s = Spec::default();
        s.set_annotations(Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        s
    }

    async fn prepare(f: &Fixture, id: &str, spec: &mut Spec) -> Result<Decision, RuntimeError> {
        prepare_spec_via(&f.cfg, || f.edges(), id, spec, &Owner::default()).await
    }

    impl Fixture {
        /// The fake edges: the fixture's catalog (its request log shared), store and runtime.
        fn edges(&self) -> Edges<FakeFetch, &FakeStore, &FakeRuntime> {
            Ok((self.fetch.clone(), &self.store, &self.runtime))
        }
    }

    /// A user-namespaced spec (containerd 2.x CRI, `hostUsers: false`): container 0 is host
    /// 65536.
    fn userns_spec(annotations: &[(&str, &str)]) -> Spec {
        let mut s = spec_with(annotations);
        let ids: oci_spec::runtime::LinuxIdMapping = serde_json::from_value(
            serde_json::json!({"containerID": 0, "hostID": 65536, "size": 65536}),
        )
        .unwrap();
        let user: oci_spec::runtime::LinuxNamespace =
            serde_json::from_value(serde_json::json!({"type": "user", "path": "/run/userns/p"}))
                .unwrap();
        let linux = s.linux_mut().as_mut().unwrap();
        let mut namespaces = linux.namespaces().clone().unwrap();
        namespaces.push(user);
        linux
            .set_namespaces(Some(namespaces))
            .set_uid_mappings(Some(vec![ids]))
            .set_gid_mappings(Some(vec![ids]));
        s
    }

    #[tokio::test]
    async fn a_user_namespaced_container_gets_idmapped_binds_or_one_line() {
        let f = fixture();
        // Without a user namespace the runtime is not even asked.
        let mut s = spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        prepare(&f, "c0", &mut s).await.unwrap();
        assert_eq!(f.runtime.asked.load(Ordering::SeqCst), 0);

        let mut s = userns_spec(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        prepare(&f, "c1", &mut s).await.unwrap();
        assert_eq!(f.runtime.asked.load(Ordering::SeqCst), 1);
        let bind = s
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new(A))
            .unwrap()
            .clone();
        assert_eq!(
            bind.uid_mappings(),
            s.linux().as_ref().unwrap().uid_mappings()
        );
        assert_eq!(
            bind.gid_mappings(),
            s.linux().as_ref().unwrap().gid_mappings()
        );
        assert!(bind.options().as_ref().unwrap().contains(&"ridmap".into()));

        // A runc that cannot: one line naming the environment and the cause, nothing fetched,
        // nothing pinned, the spec untouched.
        f.runtime.no_idmap.store(true, Ordering::SeqCst);
        let requests = f.fetch.total();
        let mut s = userns_spec(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        let before = s.clone();
        let e = prepare(&f, "c2", &mut s).await.unwrap_err().to_string();
        assert_eq!(
            e,
            "acme/app: the pod has a user namespace but /usr/sbin/runc cannot make idmapped mounts (`runc features` reports no linux.mountExtensions.idmap; runc 1.2 or newer can), so the store would appear owned by nobody"
        );
        assert_eq!(s, before);
        assert_eq!(f.fetch.total(), requests);
        assert!(pin::read(&f.cfg.state_dir, "c2").unwrap().is_none());
        // The same through a bundle.
        let b = tempfile::tempdir().unwrap();
        let cfg_path = b.path().join("config.json");
        std::fs::write(&cfg_path, serde_json::to_vec(&before).unwrap()).unwrap();
        let written = std::fs::read(&cfg_path).unwrap();
        let e = prepare_bundle_via(&f.cfg, || f.edges(), "c3", b.path(), &Owner::default())
            .await
            .unwrap_err();
        assert!(matches!(e, RuntimeError::Idmap { .. }), "{e}");
        assert_eq!(std::fs::read(&cfg_path).unwrap(), written);
        assert!(pin::read(&f.cfg.state_dir, "c3").unwrap().is_none());
    }

    #[test]
    fn decides_what_passes_through() {
        let m = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let env = (ENVIRONMENT_ANNOTATION, "acme/app");
        assert_eq!(wanted(&m(&[])), None);
        assert_eq!(wanted(&m(&[env])), Some("acme/app"));
        assert_eq!(wanted(&m(&[env, (CRI_CONTAINER_TYPE, "sandbox")])), None);
        assert_eq!(wanted(&m(&[env, (CRIO_CONTAINER_TYPE, "sandbox")])), None);
        assert_eq!(
            wanted(&m(&[env, (CRI_CONTAINER_TYPE, "container")])),
            Some("acme/app")
        );
        let skip = (SKIP_CONTAINERS_ANNOTATION, "istio-proxy, log-shipper");
        assert_eq!(
            wanted(&m(&[env, skip, (CRI_CONTAINER_NAME, "log-shipper")])),
            None
        );
        assert_eq!(
            wanted(&m(&[env, skip, (K8S_CONTAINER_NAME, "istio-proxy")])),
            None
        );
        assert_eq!(
            wanted(&m(&[env, skip, (CRI_CONTAINER_NAME, "app")])),
            Some("acme/app")
        );
        assert_eq!(
            wanted(&m(&[
                env,
                (SKIP_CONTAINERS_ANNOTATION, ""),
                (CRI_CONTAINER_NAME, "")
            ])),
            Some("acme/app")
        );
    }

    #[tokio::test]
    async fn pass_through_leaves_the_spec_and_makes_no_request() {
        let f = fixture();
        for ann in [
            vec![],
            vec![
                (ENVIRONMENT_ANNOTATION, "acme/app"),
                (CRI_CONTAINER_TYPE, "sandbox"),
            ],
        ] {
            let mut s = spec_with(&ann);
            let before = s.clone();
            assert_eq!(
                prepare(&f, "c1", &mut s).await.unwrap(),
                Decision::PassThrough
            );
            assert_eq!(s, before);
        }
        assert_eq!(f.fetch.total(), 0);
        assert!(pin::list(&f.cfg.state_dir).unwrap().is_empty());
    }

    #[tokio::test]
    async fn rewrites_pins_and_releases() {
        let f = fixture();
        let mut s = spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        let d = prepare(&f, "c1", &mut s).await.unwrap();
        assert_eq!(
            d,
            Decision::Rewritten(Prepared {
                reference: "acme/app".into(),
                generation: Some(3),
                closure: vec![B.to_string(), A.to_string()],
                env: [
                    (
                        "PATH",
                        Some("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
                        format!(
                            "{A}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                        ),
                    ),
                    ("G", None, "3".into()),
                    ("NIXENV_ENVIRONMENT", None, "acme/app".into()),
                    ("NIXENV_GENERATION", None, "3".into()),
                ]
                .into_iter()
                .map(|(name, before, after)| EnvChange {
                    name: name.into(),
                    before: before.map(Into::into),
                    after,
                })
                .collect(),
            })
        );
        let env = s.process().as_ref().unwrap().env().clone().unwrap();
        assert!(
            env.contains(&format!(
                "PATH={A}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            )),
            "{env:?}"
        );
        assert!(env.contains(&"G=3".to_string()));
        assert!(env.contains(&"NIXENV_ENVIRONMENT=acme/app".to_string()));
        assert!(env.contains(&"NIXENV_GENERATION=3".to_string()));
        let mounts = s.mounts().clone().unwrap();
        let src = mounts
            .iter()
            .find(|m| m.destination() == Path::new(A))
            .and_then(|m| m.source().clone())
            .unwrap();
        assert_eq!(src, f.cfg.store_dir().join(&A["/nix/store/".len()..]));

        let pins = pin::list(&f.cfg.state_dir).unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!(pins[0].container_id, "c1");
        assert_eq!(pins[0].generation, Some(3));
        assert_eq!(pins[0].closure.len(), 2);

        release(&f.cfg, "c1").unwrap();
        release(&f.cfg, "c1").unwrap();
        assert!(pin::list(&f.cfg.state_dir).unwrap().is_empty());
    }

    #[tokio::test]
    async fn errors_name_the_reference_and_leave_no_pin() {
        let f = fixture();
        let mut s = spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app@9")]);
        let e = prepare(&f, "c1", &mut s).await.unwrap_err().to_string();
        assert_eq!(
            e,
            format!("acme/app@9: generation 9 of acme/app not found in catalog {BASE}")
        );

        let mut s = spec_with(&[(ENVIRONMENT_ANNOTATION, "Acme/App")]);
        let e = prepare(&f, "c1", &mut s).await.unwrap_err().to_string();
        assert!(
            e.starts_with("invalid environment reference \"Acme/App\": "),
            "{e}"
        );

        let mut s = spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        let e = prepare(&f, "../x", &mut s).await.unwrap_err().to_string();
        assert!(
            e.starts_with("acme/app: invalid container id \"../x\""),
            "{e}"
        );

        f.store.fail.store(true, Ordering::SeqCst);
        let mut s = spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        let before = s.clone();
        let e = prepare(&f, "c1", &mut s).await.unwrap_err().to_string();
        assert_eq!(
            e,
            format!("acme/app: {A}: not found in any substituter (http://127.0.0.1:9/cache)")
        );
        assert_eq!(s, before);
        assert!(pin::list(&f.cfg.state_dir).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_store_path_that_is_a_symlink_is_refused() {
        let f = fixture();
        let a: StorePath = A.parse().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(f.cfg.store_dir()).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), f.cfg.store_dir().join(a.base_name()))
            .unwrap();
        let mut s = spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        let before = s.clone();
        let e = prepare(&f, "c2", &mut s).await.unwrap_err().to_string();
        assert_eq!(
            e,
            format!("acme/app: {A}: store path is a symlink, which cannot be bind-mounted into a container")
        );
        assert_eq!(s, before);
        assert!(pin::list(&f.cfg.state_dir).unwrap().is_empty());
    }

    fn store_mounts_of(s: &Spec) -> Vec<oci_spec::runtime::Mount> {
        s.mounts()
            .clone()
            .unwrap()
            .into_iter()
            .filter(|m| spec::rewrite::is_under_store(m.destination()))
            .collect()
    }

    #[tokio::test]
    async fn a_view_is_one_bind_and_a_warm_start_reads_nothing_per_path() {
        let f = fixture_with_views(true);
        let mut s = spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        prepare(&f, "c1", &mut s).await.unwrap();
        assert!(f.store.entered.load(Ordering::SeqCst));
        let ours = store_mounts_of(&s);
        assert_eq!(ours.len(), 1, "{ours:?}");
        assert_eq!(ours[0].destination(), Path::new("/nix/store"));
        assert_eq!(ours[0].typ().as_deref(), Some("bind"));
        assert!(ours[0].options().as_ref().unwrap().contains(&"ro".into()));
        let view = ours[0].source().clone().unwrap();
        assert!(view.starts_with(f.cfg.state_dir.join("views")));
        let mut entries: Vec<String> = std::fs::read_dir(&view)
            .unwrap()
            .map(|e| format!("/nix/store/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        entries.sort();
        let mut closure = vec![A.to_string(), B.to_string()];
        closure.sort();
        assert_eq!(entries, closure, "the view is exactly the closure");
        assert!(view.join(&A["/nix/store/".len()..]).join("bin").is_dir());

        // The next container of that environment: no materialiser, the same view, a pin of
        // the whole closure, and the same environment variables.
        f.store.entered.store(false, Ordering::SeqCst);
        let mut s2 = spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        prepare(&f, "c2", &mut s2).await.unwrap();
        assert!(!f.store.entered.load(Ordering::SeqCst));
        assert_eq!(store_mounts_of(&s2), ours);
        assert_eq!(s2.process(), s.process());
        let pins = pin::list(&f.cfg.state_dir).unwrap();
        assert_eq!(pins.len(), 2);
        assert_eq!(
            pins[1]
                .closure
                .iter()
                .map(|p| p.to_absolute_path())
                .collect::<Vec<_>>(),
            closure
        );
        release(&f.cfg, "c1").unwrap();
        release(&f.cfg, "c2").unwrap();
        assert!(pin::list(&f.cfg.state_dir).unwrap().is_empty());
    }

    #[tokio::test]
    async fn with_a_view_a_symlink_store_path_is_resolved_inside_the_container() {
        let f = fixture_with_views(true);
        let a: StorePath = A.parse().unwrap();
        std::fs::create_dir_all(f.cfg.store_dir()).unwrap();
        // The target exists on the host (so the fake materialiser is content): the view keeps
        // the link as it is, for the container to resolve in its own /nix/store.
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), f.cfg.store_dir().join(a.base_name()))
            .unwrap();
        let mut s = spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        prepare(&f, "c1", &mut s).await.unwrap();
        let view = store_mounts_of(&s)[0].source().clone().unwrap();
        assert_eq!(
            std::fs::read_link(view.join(a.base_name())).unwrap(),
            elsewhere.path()
        );
    }

    #[tokio::test]
    async fn a_user_namespaced_container_gets_its_view_idmapped() {
        let f = fixture_with_views(true);
        let mut s = userns_spec(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        prepare(&f, "c1", &mut s).await.unwrap();
        let ours = store_mounts_of(&s);
        assert_eq!(ours.len(), 1);
        assert_eq!(
            ours[0].uid_mappings(),
            s.linux().as_ref().unwrap().uid_mappings()
        );
        assert!(ours[0]
            .options()
            .as_ref()
            .unwrap()
            .contains(&"ridmap".into()));
    }

    #[tokio::test]
    async fn a_cancelled_prepare_leaves_no_pin() {
        let f = fixture();
        f.store.hang.store(true, Ordering::SeqCst);
        let mut s = spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        let pins = pin::pins_dir(&f.cfg.state_dir).join("c9.json");
        {
            let fut = prepare(&f, "c9", &mut s);
            tokio::pin!(fut);
            // Runs until the materialiser blocks (the gc lock is taken on a blocking thread
            // first, so poll until it is entered). Meanwhile the shared gc lock, not a pin,
            // keeps gc away.
            for _ in 0..500 {
                assert!(futures::poll!(fut.as_mut()).is_pending());
                if f.store.entered.load(Ordering::SeqCst) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert!(f.store.entered.load(Ordering::SeqCst));
            assert!(!pins.exists());
            assert!(
                crate::gc::GcLock::try_exclusive(&f.cfg.state_dir)
                    .unwrap()
                    .is_none(),
                "gc waits while a closure is materialised"
            );
        }
        assert!(!pins.exists());
        assert!(
            crate::gc::GcLock::try_exclusive(&f.cfg.state_dir)
                .unwrap()
                .is_some(),
            "a cancelled preparation lets gc run"
        );
    }

    #[tokio::test]
    async fn bundle_pass_through_is_byte_identical_and_rewrite_is_written() {
        let f = fixture();
        let b = tempfile::tempdir().unwrap();
        let cfg_path = b.path().join("config.json");
        let plain =
            b"{ \"ociVersion\": \"1.0.2\",\n  \"annotations\": {\"x\": \"y\"}, \"weird\": 1.50 }\n";
        std::fs::write(&cfg_path, plain).unwrap();
        let d = prepare_bundle_via(&f.cfg, || f.edges(), "c2", b.path(), &Owner::default())
            .await
            .unwrap();
        assert_eq!(d, Decision::PassThrough);
        assert_eq!(std::fs::read(&cfg_path).unwrap(), plain);

        let mut s = spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        std::fs::write(&cfg_path, serde_json::to_vec(&s).unwrap()).unwrap();
        let owner = Owner {
            kind: OwnerKind::RuncWrapper,
            runtime_root: Some("/run/runc".into()),
            ..Owner::default()
        };
        let d = prepare_bundle_via(&f.cfg, || f.edges(), "c2", b.path(), &owner)
            .await
            .unwrap();
        assert!(matches!(d, Decision::Rewritten(_)));
        prepare(&f, "c3", &mut s).await.unwrap();
        let written: Spec = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
        assert_eq!(written, s);
        let p = pin::read(&f.cfg.state_dir, "c2").unwrap().unwrap();
        assert_eq!(p.owner.kind, OwnerKind::RuncWrapper);
        assert_eq!(p.owner.bundle.as_deref(), Some(b.path()));

        // A failure leaves config.json as it was, and no pin.
        std::fs::write(
            &cfg_path,
            serde_json::to_vec(&spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app@9")])).unwrap(),
        )
        .unwrap();
        let before = std::fs::read(&cfg_path).unwrap();
        let e = prepare_bundle_via(&f.cfg, || f.edges(), "c4", b.path(), &owner)
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("acme/app@9: generation 9"), "{e}");
        assert_eq!(std::fs::read(&cfg_path).unwrap(), before);
        assert!(pin::read(&f.cfg.state_dir, "c4").unwrap().is_none());
    }

    /// A Create builds its edges (one fetcher, so at most one HTTP client) exactly once, and a
    /// pass-through builds none; the catalog and the materialiser get the same fetcher.
    #[tokio::test]
    async fn one_fetcher_per_prepared_container() {
        let f = fixture();
        let built = std::sync::atomic::AtomicUsize::new(0);
        let edges = || {
            built.fetch_add(1, Ordering::SeqCst);
            f.edges()
        };
        let mut s = spec_with(&[]);
        assert_eq!(
            prepare_spec_via(&f.cfg, edges, "c0", &mut s, &Owner::default())
                .await
                .unwrap(),
            Decision::PassThrough
        );
        assert_eq!(built.load(Ordering::SeqCst), 0);

        let edges = || {
            built.fetch_add(1, Ordering::SeqCst);
            f.edges()
        };
        let mut s = spec_with(&[(ENVIRONMENT_ANNOTATION, "acme/app")]);
        prepare_spec_via(&f.cfg, edges, "c1", &mut s, &Owner::default())
            .await
            .unwrap();
        assert_eq!(built.load(Ordering::SeqCst), 1);

        let b = tempfile::tempdir().unwrap();
        std::fs::write(
            b.path().join("config.json"),
            serde_json::to_vec(&s).unwrap(),
        )
        .unwrap();
        let edges = || {
            built.fetch_add(1, Ordering::SeqCst);
            f.edges()
        };
        prepare_bundle_via(&f.cfg, edges, "c2", b.path(), &Owner::default())
            .await
            .unwrap();
        assert_eq!(built.load(Ordering::SeqCst), 2);

        // The production materialiser fetches over the fetcher it is given (the one the
        // catalog used): a cold store's requests land in the same request log.
        let cfg = Config {
            substituters: vec![Url::parse("http://127.0.0.1:9/cache").unwrap()],
            ..f.cfg.clone()
        };
        let fetch = Arc::new(FakeFetch::default());
        let before = fetch.total();
        let a: StorePath = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-absent-1.0"
            .parse()
            .unwrap();
        Substituters::new(&cfg, fetch.clone())
            .materialise(&[a])
            .await
            .unwrap_err();
        assert!(fetch.total() > before);
    }

    /// A Create takes the gc lock once: the production materialiser relies on the caller's
    /// shared lock and does not take it again (it would wait here, gc holding it exclusive).
    #[tokio::test]
    async fn the_materialiser_does_not_take_the_gc_lock_again() {
        let f = fixture();
        let _gc = crate::gc::GcLock::exclusive(&f.cfg.state_dir).unwrap();
        let fetch = Arc::new(FakeFetch::default());
        let closure = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            Substituters::new(&f.cfg, fetch.clone()).materialise(&[]),
        )
        .await
        .expect("the materialiser waited for the gc lock")
        .unwrap();
        assert!(closure.paths.is_empty());
        assert_eq!(fetch.total(), 0);
    }
}
