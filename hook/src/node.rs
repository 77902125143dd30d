//! The core library on this node, behind one narrow trait: [`Node`] is what the runc wrapper
//! ([`crate::wrapper`]), the OCI hook ([`crate::hook`]) and the shim's helper ([`crate::shim`])
//! need from `nixenv_core::runtime` — its two entry points, [`runtime::prepare_spec`] and
//! [`runtime::prepare_bundle`], [`runtime::release`], and three cheap questions about this node.
//!
//! [`RealNode`] is the production implementation, with the configuration loaded only when first
//! needed; the tests drive the three callers with the one fake beside it (`node/fake.rs`). Each
//! caller builds the pin's [`Owner`] itself: it alone knows which runtime it is, runc's root and
//! the namespace.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nixenv_core::config::{Config, ConfigError};
use nixenv_core::runtime::{self, Decision, Owner, RuntimeError};
use nixenv_core::{metrics, pin};
use oci_spec::runtime::Spec;

#[cfg(test)]
pub(crate) mod fake;

/// runc's state directory when `--root` is not given (as root).
pub const RUNC_DEFAULT_ROOT: &str = "/run/runc";

/// The node-side preparation of a container, as the wrapper, the hook and the shim's helper
/// see it.
pub trait Node {
    /// Error type; its `Display` is the one-line cause.
    type Error: std::fmt::Display;
    /// [`runtime::prepare_spec`]: prepares container `key` and rewrites `spec` in place,
    /// recording `owner` in the pin.
    fn prepare_spec(
        &mut self,
        key: &str,
        spec: &mut Spec,
        owner: &Owner,
    ) -> Result<Decision, Self::Error>;
    /// [`runtime::prepare_bundle`]: prepares container `id` and rewrites `<bundle>/config.json`,
    /// recording `owner` in the pin (its `bundle`, when `None`, is `bundle`).
    fn prepare_bundle(
        &mut self,
        id: &str,
        bundle: &Path,
        owner: &Owner,
    ) -> Result<Decision, Self::Error>;
    /// [`runtime::release`]: drops the pin of container `id` (idempotent).
    fn release(&mut self, id: &str) -> Result<(), Self::Error>;
    /// Whether container `id` may hold a pin. Called on every runc `delete`: it must be cheap.
    fn may_be_pinned(&mut self, id: &str) -> bool;
    /// The configured runc (`runc` in the config), if any.
    fn runc(&mut self) -> Result<Option<PathBuf>, Self::Error>;
    /// Where the node store keeps `/nix/store/<base>`.
    fn store_dir(&self) -> PathBuf;
}

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

/// The production [`Node`]: the core on this node, with a lazily loaded configuration.
#[derive(Debug, Default)]
pub struct RealNode {
    cfg: Option<Config>,
    abandon_on_signal: bool,
}

impl RealNode {
    /// A node whose configuration is loaded on first use (`$NIXENV_CONFIG` or the default path).
    pub fn new() -> Self {
        RealNode::default()
    }

    /// A node with a given configuration.
    pub fn with_config(cfg: Config) -> Self {
        RealNode {
            cfg: Some(cfg),
            ..RealNode::default()
        }
    }

    /// This node, with each preparation abandoned (its future dropped, which undoes its work)
    /// on SIGTERM or SIGINT, failing with [`NodeError::Cancelled`]: the shim's helper, whose
    /// shim sends SIGTERM on shutdown or dies.
    pub fn abandon_on_signal(self) -> Self {
        RealNode {
            abandon_on_signal: true,
            ..self
        }
    }

    fn config(&mut self) -> Result<&Config, NodeError> {
        if self.cfg.is_none() {
            self.cfg = Some(Config::load()?);
        }
        Ok(self.cfg.as_ref().expect("loaded above"))
    }

    /// What a preparation runs with: the configuration, and whether to abandon it on a signal.
    fn preparing(&mut self) -> Result<(&Config, bool), NodeError> {
        let abandon = self.abandon_on_signal;
        Ok((self.config()?, abandon))
    }
}

impl Node for RealNode {
    type Error = NodeError;

    fn prepare_spec(
        &mut self,
        key: &str,
        spec: &mut Spec,
        owner: &Owner,
    ) -> Result<Decision, NodeError> {
        let (cfg, abandon) = self.preparing()?;
        let started = Instant::now();
        let out = block_on(abandon, key, runtime::prepare_spec(cfg, key, spec, owner));
        count_preparation(cfg, started, &out);
        Ok(out??)
    }

    fn prepare_bundle(
        &mut self,
        id: &str,
        bundle: &Path,
        owner: &Owner,
    ) -> Result<Decision, NodeError> {
        let (cfg, abandon) = self.preparing()?;
        let started = Instant::now();
        let out = block_on(abandon, id, runtime::prepare_bundle(cfg, id, bundle, owner));
        count_preparation(cfg, started, &out);
        Ok(out??)
    }

    fn release(&mut self, id: &str) -> Result<(), NodeError> {
        Ok(runtime::release(self.config()?, id)?)
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

    fn runc(&mut self) -> Result<Option<PathBuf>, NodeError> {
        Ok(self.config()?.runc.clone())
    }

    fn store_dir(&self) -> PathBuf {
        self.cfg
            .as_ref()
            .map(Config::store_dir)
            .unwrap_or_else(|| Config::default().store_dir())
    }
}

/// Counts a preparation of one of nixenv's containers (a pass-through is not counted and
/// costs no write) in the node's metrics, and writes what this process counted (its pull,
/// if any): one small file update, whose failure is only logged.
fn count_preparation(
    cfg: &Config,
    started: Instant,
    out: &Result<Result<Decision, RuntimeError>, NodeError>,
) {
    if !matches!(out, Ok(Ok(Decision::PassThrough))) {
        let took = started.elapsed().as_secs_f64();
        metrics::note(|m| m.prepare_duration.observe(took));
    }
    metrics::flush(&cfg.state_dir);
}

/// Runs `fut` (the preparation of `container`) to completion on a runtime built for it, and
/// dropped (threads joined) before any exec; when `abandon_on_signal`, drops it instead on
/// SIGTERM or SIGINT.
fn block_on<F: Future>(
    abandon_on_signal: bool,
    container: &str,
    fut: F,
) -> Result<F::Output, NodeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(NodeError::Tokio)?;
    if !abandon_on_signal {
        return Ok(rt.block_on(fut));
    }
    rt.block_on(async {
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
    })
}
