//! What kind of failure a [`RuntimeError`] is, for callers that answer with a code rather
//! than a line of text (the containerd shim: `NotFound`, `InvalidArgument`, `Unavailable`).
//!
//! The kind is read off the error's variants and their sources, never off its message. Only
//! three situations have a kind of their own: the reference is malformed, what it names does
//! not exist, or a catalog or binary cache could not be reached; everything else is
//! [`FailureKind::Internal`].

use crate::environment::{CatalogError, LockError, ResolveError};
use crate::fetch::FetchError;
use crate::runtime::RuntimeError;
use crate::substituter::error::CacheFault;
use crate::substituter::SubstituteError;

/// The kind of a failure to prepare a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// A catalog or binary cache did not answer (refused, timed out, 5xx): a later attempt
    /// may succeed.
    Unavailable,
    /// The environment, generation, system or store path does not exist.
    NotFound,
    /// The reference is malformed.
    Invalid,
    /// Anything else: the node, its configuration, its store, a cache serving garbage.
    Internal,
}

impl RuntimeError {
    /// What kind of failure this is.
    pub fn kind(&self) -> FailureKind {
        match self {
            RuntimeError::Reference(_) => FailureKind::Invalid,
            RuntimeError::Resolve { source, .. } => resolve_kind(source),
            RuntimeError::Substitute { source, .. } => substitute_kind(source),
            RuntimeError::Bundle { .. }
            | RuntimeError::Pin { .. }
            | RuntimeError::Netrc { .. }
            | RuntimeError::Store { .. }
            | RuntimeError::SymlinkPath { .. }
            | RuntimeError::Idmap { .. } => FailureKind::Internal,
        }
    }
}

fn resolve_kind(e: &ResolveError) -> FailureKind {
    match e {
        ResolveError::Catalog(e) => catalog_kind(e),
        ResolveError::UnreachableNoCache { .. } => FailureKind::Unavailable,
        ResolveError::System(LockError::NoSystem { .. }) => FailureKind::NotFound,
        ResolveError::NoCatalog
        | ResolveError::System(_)
        | ResolveError::Netrc(_)
        | ResolveError::Runtime(_) => FailureKind::Internal,
    }
}

fn catalog_kind(e: &CatalogError) -> FailureKind {
    match e {
        CatalogError::EnvironmentNotFound { .. } | CatalogError::GenerationNotFound { .. } => {
            FailureKind::NotFound
        }
        CatalogError::Unreachable { source } => fetch_kind(source),
        CatalogError::Malformed { .. }
        | CatalogError::Mismatch { .. }
        | CatalogError::TooLarge { .. }
        | CatalogError::BadUrl { .. } => FailureKind::Internal,
    }
}

fn substitute_kind(e: &SubstituteError) -> FailureKind {
    match e {
        SubstituteError::NotFound { .. } => FailureKind::NotFound,
        SubstituteError::Interrupted { .. } => FailureKind::Unavailable,
        SubstituteError::BadCache { fault, .. } => match &**fault {
            CacheFault::CacheInfo { source } => fetch_kind(source),
            CacheFault::StoreDir { .. } | CacheFault::Url { .. } => FailureKind::Internal,
        },
        SubstituteError::Fetch { source, .. } => fetch_kind(source),
        _ => FailureKind::Internal,
    }
}

/// A transport failure worth retrying (refused, reset, timeout, 5xx, too slow) is the
/// remote side being unavailable; a 404 is not found; anything else is internal.
fn fetch_kind(e: &FetchError) -> FailureKind {
    match e {
        FetchError::NotFound { .. } => FailureKind::NotFound,
        FetchError::TooSlow { .. } => FailureKind::Unavailable,
        e if e.is_retryable() => FailureKind::Unavailable,
        _ => FailureKind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::environment::{EnvName, Reference};
    use crate::nix::StorePath;
    use url::Url;

    fn url() -> Url {
        Url::parse("http://127.0.0.1:1/").unwrap()
    }

    fn path() -> StorePath {
        StorePath::from_absolute_path(
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-echoserver-0.1.0",
        )
        .unwrap()
    }

    fn resolve(source: ResolveError) -> RuntimeError {
        RuntimeError::Resolve {
            reference: "acme/echoserver".into(),
            source: Box::new(source),
        }
    }

    fn substitute(source: SubstituteError) -> RuntimeError {
        RuntimeError::Substitute {
            reference: "acme/echoserver".into(),
            source: Box::new(source),
        }
    }

    #[test]
    fn a_bad_reference_is_invalid() {
        let e = "Acme/echo server".parse::<Reference>().unwrap_err();
        assert_eq!(RuntimeError::Reference(e).kind(), FailureKind::Invalid);
    }

    #[test]
    fn a_missing_environment_generation_or_path_is_not_found() {
        let name: EnvName = "acme/nope".parse().unwrap();
        let missing = CatalogError::EnvironmentNotFound {
            name: name.clone(),
            catalog: Box::new(url()),
        };
        assert_eq!(
            resolve(ResolveError::Catalog(missing)).kind(),
            FailureKind::NotFound
        );
        let generation = CatalogError::GenerationNotFound {
            name,
            generation: 9,
            catalog: Box::new(url()),
        };
        assert_eq!(
            resolve(ResolveError::Catalog(generation)).kind(),
            FailureKind::NotFound
        );
        let e = substitute(SubstituteError::NotFound {
            path: path(),
            caches: vec![url()],
        });
        assert_eq!(e.kind(), FailureKind::NotFound);
    }

    #[test]
    fn an_unreachable_catalog_or_cache_is_unavailable() {
        let refused = || FetchError::Transport {
            url: url(),
            message: "connection refused".into(),
            retryable: true,
        };
        let e = resolve(ResolveError::Catalog(CatalogError::Unreachable {
            source: Box::new(refused()),
        }));
        assert_eq!(e.kind(), FailureKind::Unavailable);
        let e = substitute(SubstituteError::BadCache {
            path: path(),
            cache: Box::new(url()),
            fault: std::sync::Arc::new(CacheFault::CacheInfo { source: refused() }),
        });
        assert_eq!(e.kind(), FailureKind::Unavailable);
        let e = substitute(SubstituteError::Fetch {
            path: path(),
            source: Box::new(FetchError::Status {
                url: url(),
                status: 503,
            }),
        });
        assert_eq!(e.kind(), FailureKind::Unavailable);
    }

    #[test]
    fn everything_else_is_internal() {
        let e = substitute(SubstituteError::Fetch {
            path: path(),
            source: Box::new(FetchError::Status {
                url: url(),
                status: 403,
            }),
        });
        assert_eq!(e.kind(), FailureKind::Internal);
        assert_eq!(
            resolve(ResolveError::NoCatalog).kind(),
            FailureKind::Internal
        );
        let e = RuntimeError::SymlinkPath {
            reference: "acme/echoserver".into(),
            path: "/nix/store/x".into(),
        };
        assert_eq!(e.kind(), FailureKind::Internal);
    }
}
