//! nixenv's end-to-end test harness.
//!
//! - [`fixtures`]: closures built by the host's real Nix (echoserver + glibc + busybox + data),
//!   signed binary caches (xz, zstd, bzip2, none, and spoiled ones for negative tests) and a
//!   catalog directory: `Fixtures::get()`.
//! - [`cache_server`]: a real HTTP/1.1 + h2c server on 127.0.0.1 serving a cache or catalog
//!   directory, counting requests per path, with fault injection (status codes, dropped
//!   connections, delays): `CacheServer::serve(dir)`.
//! - [`node`]: the workspace binaries (`nixenv_bin()`, `bin_path(name)`) and a private node
//!   (temp `state-dir` + `config.toml`): `TestNode::new()`.
//!
//! Typical use:
//!
//! ```no_run
//! use nixenv_testkit::{CacheServer, Cache, Fixtures, TestNode};
//!
//! let fx = Fixtures::get();
//! let caches = CacheServer::serve(fx.cache(Cache::Xz));
//! let catalog = CacheServer::serve(&fx.catalog);
//! let node = TestNode::new()
//!     .substituter(&caches.url())
//!     .trusting(&fx.trusted_key.public)
//!     .with_catalog(&catalog.url());
//! let out = node.nixenv(&["pull", "acme/echoserver"]).output().unwrap();
//! ```

pub mod cache_server;
pub mod containerd;
pub mod cri;
pub mod fixtures;
pub mod images;
pub mod node;
pub mod podman;

pub use cache_server::{CacheServer, Fault, RequestRecord};
pub use fixtures::{Cache, EchoReply, Fixtures};
pub use node::{bin_path, nixenv_bin, ServedNode, TestNode};
