//! The OCI runtime spec: the pure rewrite from an environment to mounts, PATH and env, and
//! reading/writing a bundle's config.json.

pub mod bundle;
pub mod idmap;
pub mod rewrite;

pub use bundle::{BundleConfig, BundleError};
pub use idmap::{user_mappings, IdmapError, RuncFeatures, RuntimeFeatures};
pub use rewrite::{effective, env_changes, rewrite, EnvChange, Environment};
