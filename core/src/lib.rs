//! nixenv core library.
//!
//! One concept per file:
//! - [`annotations`], [`atomic`], [`finding`] — shared vocabulary in leaves that import
//!   nothing of the crate: annotation names, atomic file replacement, a node check's finding;
//! - [`nix`] — Nix formats (store paths, nixbase32, hashes, narinfo, signatures, NAR), pure and I/O-free;
//! - [`config`] — `/etc/nixenv/config.toml`;
//! - [`fetch`] — the HTTP/`file://` edge, as a trait;
//! - [`substituter`] — closures from binary caches, streamed into the store;
//! - [`store`] — the node store (atomic install, locks, crash cleanup);
//! - [`environment`] — references, catalog, locks, resolution cache, publishing;
//! - [`spec`] — the OCI runtime spec rewrite;
//! - [`pin`] — GC roots held by running containers;
//! - [`doctor`] — `nixenv doctor`'s checks of a node;
//! - [`gc`] — garbage collection of the node store (roots, last use, locking, deletion);
//! - [`metrics`] — node metrics in the Prometheus text format (counters kept on the node, gauges read);
//! - [`registry`] — `nixenv registry`: the node-local, read-only registry of the empty image;
//! - [`runtime`] — the one call the shim, the runc wrapper and the hook make;
//! - [`failure`] — the kind of a [`runtime::RuntimeError`] (not found, invalid, unavailable).

pub mod annotations;
pub mod atomic;
pub mod config;
pub mod doctor;
pub mod environment;
pub mod failure;
pub mod fetch;
pub mod finding;
pub mod gc;
pub mod metrics;
pub mod nix;
pub mod pin;
pub mod registry;
pub mod runtime;
pub mod sbom;
pub mod spec;
pub mod store;
pub mod substituter;

/// `nixenv/<version>`, used as the HTTP User-Agent.
pub const USER_AGENT: &str = concat!("nixenv/", env!("CARGO_PKG_VERSION"));
