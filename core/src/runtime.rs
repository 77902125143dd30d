//! The one call the shim, the runc wrapper and the hooks make: decide whether a container is
//! nixenv's, resolve and materialise its environment, pin it, and rewrite its spec.
//!
//! STUB: until the environment helper lands, every spec passes through untouched.

use std::path::Path;

use oci_spec::runtime::Spec;

use crate::config::Config;

/// The annotation naming the environment.
pub const ENVIRONMENT_ANNOTATION: &str = "nix.dev/environment";
/// Comma-separated container names left untouched.
pub const SKIP_CONTAINERS_ANNOTATION: &str = "nix.dev/skip-containers";

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
}

/// Why a container could not be prepared. `Display` is the one-line error users see
/// (without the `nixenv: ` prefix, which binaries add).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{path}: {source}")]
    Bundle {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Decides, resolves, materialises, pins `container_id` and rewrites `spec` in place.
pub async fn prepare_spec(
    _cfg: &Config,
    _container_id: &str,
    _spec: &mut Spec,
) -> Result<Decision, RuntimeError> {
    Ok(Decision::PassThrough)
}

/// [`prepare_spec`] on `<bundle>/config.json`, rewritten atomically; untouched (byte for byte)
/// on [`Decision::PassThrough`].
pub async fn prepare_bundle(
    _cfg: &Config,
    _container_id: &str,
    _bundle: &Path,
) -> Result<Decision, RuntimeError> {
    Ok(Decision::PassThrough)
}

/// Drops the pin of `container_id` (idempotent).
pub fn release(_cfg: &Config, _container_id: &str) -> Result<(), RuntimeError> {
    Ok(())
}
