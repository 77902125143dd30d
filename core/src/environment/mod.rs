//! Environments: references (`org/app[@N]`, store paths), the catalog and its locks, the
//! resolution cache, and publishing.

pub mod catalog;
pub mod lock;
pub mod publish;
pub mod reference;
pub mod resolve;

pub use catalog::{Catalog, CatalogError};
pub use lock::{EnvVars, Lock, LockError, SystemLock};
pub use reference::{EnvName, Reference, ReferenceError};
pub use resolve::{resolve, resolve_blocking, ResolveError, Resolved, Source};
