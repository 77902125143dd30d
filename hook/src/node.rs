//! The core library on this node: [`crate::wrapper::Core`] and [`crate::hook::Prepare`] over
//! `nixenv_core::runtime`, with the configuration loaded only when first needed.

use std::path::{Path, PathBuf};

use nixenv_core::config::{Config, ConfigError};
use nixenv_core::pin::{self, Owner, OwnerKind};
use nixenv_core::runtime::{self, Decision, RuntimeError};
use oci_spec::runtime::Spec;

/// runc's state directory when `--root` is not given (as root).
pub const RUNC_DEFAULT_ROOT: &str = "/run/runc";

/// Why the core could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("cannot start the async runtime: {0}")]
    Tokio(#[source] std::io::Error),
    #[error("cannot watch for {signal}: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{container}: preparation abandoned on {signal}")]
    Cancelled {
        container: String,
        signal: &'static str,
    },
}

/// The node's core, with a lazily loaded configuration.
#[derive(Debug, Default)]
pub struct Node {
    cfg: Option<Config>,
}

impl Node {
    /// A node whose configuration is loaded on first use (`$NIXENV_CONFIG` or the default path).
    pub fn new() -> Self {
        Node { cfg: None }
    }

    /// A node with a given configuration.
    pub fn with_config(cfg: Config) -> Self {
        Node { cfg: Some(cfg) }
    }

    fn config(&mut self) -> Result<&Config, NodeError> {
        if self.cfg.is_none() {
            self.cfg = Some(Config::load()?);
        }
        Ok(self.cfg.as_ref().expect("loaded above"))
    }

    fn block_on<F: std::future::Future>(fut: F) -> Result<F::Output, NodeError> {
        // Built only on the paths that materialise; dropped (threads joined) before any exec.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(NodeError::Tokio)?;
        Ok(rt.block_on(fut))
    }

    /// Drops the pin of `key` (idempotent); returns the configured runc.
    fn release_pin(&mut self, key: &str) -> Result<Option<PathBuf>, NodeError> {
        let cfg = self.config()?;
        runtime::release(cfg, key)?;
        Ok(cfg.runc.clone())
    }

    /// [`Node::block_on`], abandoned (the future dropped, which undoes its work) on SIGTERM
    /// or SIGINT.
    fn block_on_until_signal<F: std::future::Future>(
        container: &str,
        fut: F,
    ) -> Result<F::Output, NodeError> {
        use tokio::signal::unix::{signal, SignalKind};
        Self::block_on(async {
            let watch = |kind, name| {
                signal(kind).map_err(|source| NodeError::Signal {
                    signal: name,
                    source,
                })
            };
            let mut term = watch(SignalKind::terminate(), "SIGTERM")?;
            let mut int = watch(SignalKind::interrupt(), "SIGINT")?;
            let cancelled = |signal| NodeError::Cancelled {
                container: container.to_owned(),
                signal,
            };
            tokio::select! {
                out = fut => Ok(out),
                _ = term.recv() => Err(cancelled("SIGTERM")),
                _ = int.recv() => Err(cancelled("SIGINT")),
            }
        })?
    }
}

impl crate::shim::ShimCore for Node {
    type Error = NodeError;

    fn prepare(
        &mut self,
        req: &crate::shim::PrepareRequest,
    ) -> Result<(Decision, Option<PathBuf>), NodeError> {
        let cfg = match self.config() {
            Ok(cfg) => cfg.clone(),
            // Without a configuration the shim still runs the containers nixenv leaves alone.
            Err(e) => match runtime::bundle_wants(&req.bundle) {
                Some(_) => return Err(e),
                None => {
                    tracing::debug!(error = %e, "no usable nixenv config; plain containers only");
                    return Ok((Decision::PassThrough, None));
                }
            },
        };
        let owner = Owner {
            kind: OwnerKind::Shim,
            runtime_root: req.runtime_root.clone(),
            bundle: std::path::absolute(&req.bundle).ok(),
            namespace: req.namespace.clone(),
        };
        let decision = Self::block_on_until_signal(
            &req.id,
            runtime::prepare_bundle(&cfg, &req.id, &req.bundle, &owner),
        )??;
        Ok((decision, cfg.runc.clone()))
    }

    fn release(&mut self, id: &str) -> Result<Option<PathBuf>, NodeError> {
        self.release_pin(id)
    }

    fn configured_runc(&mut self) -> Result<Option<PathBuf>, NodeError> {
        Ok(self.config()?.runc.clone())
    }
}

impl crate::wrapper::Core for Node {
    type Error = NodeError;

    fn prepare_bundle(
        &mut self,
        id: &str,
        bundle: &Path,
        runtime_root: Option<&Path>,
    ) -> Result<Option<PathBuf>, NodeError> {
        let cfg = self.config()?.clone();
        let owner = Owner {
            kind: OwnerKind::RuncWrapper,
            runtime_root: Some(
                runtime_root
                    .unwrap_or(Path::new(RUNC_DEFAULT_ROOT))
                    .to_owned(),
            ),
            bundle: std::path::absolute(bundle).ok(),
            namespace: None,
        };
        let decision = Self::block_on(runtime::prepare_bundle(&cfg, id, bundle, &owner))??;
        if let Decision::Rewritten(p) = &decision {
            tracing::info!(container = id, reference = %p.reference, paths = p.closure.len(), "bundle prepared");
        }
        Ok(cfg.runc.clone())
    }

    fn may_be_pinned(&mut self, id: &str) -> bool {
        // One small file read (the config: state-dir, runc) and one stat. When in doubt (no
        // config, odd id), say yes: release reports the problem.
        let Ok(cfg) = self.config() else { return true };
        match pin::pin_path(&cfg.state_dir, id) {
            Ok(path) => std::fs::symlink_metadata(path).is_ok(),
            Err(_) => true,
        }
    }

    fn release(&mut self, id: &str) -> Result<Option<PathBuf>, NodeError> {
        self.release_pin(id)
    }

    fn configured_runc(&self) -> Option<PathBuf> {
        self.cfg.as_ref().and_then(|c| c.runc.clone())
    }
}

impl crate::hook::Prepare for Node {
    type Error = NodeError;

    fn prepare_spec(
        &mut self,
        key: &str,
        spec: &mut Spec,
        bundle: Option<&Path>,
    ) -> Result<Decision, NodeError> {
        let cfg = self.config()?.clone();
        let owner = Owner {
            kind: OwnerKind::Hook,
            runtime_root: None,
            bundle: bundle.map(Path::to_owned),
            namespace: None,
        };
        Ok(Self::block_on(runtime::prepare_spec(
            &cfg, key, spec, &owner,
        ))??)
    }

    fn release(&mut self, key: &str) -> Result<(), NodeError> {
        self.release_pin(key).map(|_| ())
    }

    fn store_dir(&self) -> PathBuf {
        self.cfg
            .as_ref()
            .map(Config::store_dir)
            .unwrap_or_else(|| Config::default().store_dir())
    }
}
