//! Why a pull failed, as a label value from a small fixed set (never a path or a URL: label
//! values that vary without bound would make a new time series per failure).

use crate::fetch::FetchError;
use crate::nix::nar::NarError;
use crate::store::unpack::UnpackError;
use crate::substituter::SubstituteError;

/// The `cause` label of `nixenv_pull_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureCause {
    /// No substituter has the path (or none is configured).
    NotFound,
    /// A narinfo is not signed by a trusted key, or the keys are unusable.
    Signature,
    /// A NAR's hash or size differs from its narinfo, or the NAR is cut short.
    HashMismatch,
    /// A cache or a transfer was too slow.
    Timeout,
    /// A response or a NAR entry exceeds a limit.
    TooLarge,
    /// The connection failed, a cache answered with an error status or refused redirect.
    Network,
    /// The store's filesystem has no room for the closure.
    DiskSpace,
    /// A cache sent something invalid: narinfo, NAR URL, NAR format, compression, a cycle.
    Invalid,
    /// The node store could not be read or written.
    Store,
    /// The pull was cancelled (a container start abandoned).
    Cancelled,
    /// Anything else (an internal error).
    Other,
}

impl FailureCause {
    /// Every cause, in label order (each is exposed, at zero until it happens).
    pub const ALL: [FailureCause; 11] = [
        FailureCause::NotFound,
        FailureCause::Signature,
        FailureCause::HashMismatch,
        FailureCause::Timeout,
        FailureCause::TooLarge,
        FailureCause::Network,
        FailureCause::DiskSpace,
        FailureCause::Invalid,
        FailureCause::Store,
        FailureCause::Cancelled,
        FailureCause::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCause::NotFound => "not_found",
            FailureCause::Signature => "signature",
            FailureCause::HashMismatch => "hash_mismatch",
            FailureCause::Timeout => "timeout",
            FailureCause::TooLarge => "too_large",
            FailureCause::Network => "network",
            FailureCause::DiskSpace => "disk_space",
            FailureCause::Invalid => "invalid",
            FailureCause::Store => "store",
            FailureCause::Cancelled => "cancelled",
            FailureCause::Other => "other",
        }
    }

    /// The cause of a failed pull.
    pub fn of(e: &SubstituteError) -> FailureCause {
        use SubstituteError as E;
        match e {
            E::NotFound { .. } | E::NoSubstituters { .. } => FailureCause::NotFound,
            E::Signature { .. } | E::Keys(_) => FailureCause::Signature,
            E::HashMismatch { .. } | E::SizeMismatch { .. } | E::Truncated { .. } => {
                FailureCause::HashMismatch
            }
            E::Fetch { source, .. } => FailureCause::of_fetch(source),
            E::BadCache { fault, .. } if fault.is_too_slow() => FailureCause::Timeout,
            E::Interrupted { .. } => FailureCause::Network,
            E::NoSpace { .. } => FailureCause::DiskSpace,
            E::Unpack { source, .. } => match source.as_ref() {
                UnpackError::Nar(NarError::TooLarge { .. }) => FailureCause::TooLarge,
                UnpackError::Nar(_) => FailureCause::Invalid,
                _ => FailureCause::Store,
            },
            E::BadCache { .. }
            | E::NarUrl { .. }
            | E::BadNarInfo { .. }
            | E::WrongNarInfo { .. }
            | E::Decompress { .. }
            | E::Cycle { .. } => FailureCause::Invalid,
            E::Store { .. } | E::OpenStore { .. } => FailureCause::Store,
            E::Cancelled { .. } => FailureCause::Cancelled,
            E::Netrc(_) | E::Task { .. } | E::Unfinished { .. } => FailureCause::Other,
        }
    }

    fn of_fetch(e: &FetchError) -> FailureCause {
        match e {
            FetchError::NotFound { .. } => FailureCause::NotFound,
            FetchError::TooSlow { .. } => FailureCause::Timeout,
            FetchError::TooLarge { .. } => FailureCause::TooLarge,
            FetchError::Status { .. }
            | FetchError::Transport { .. }
            | FetchError::Io { .. }
            | FetchError::Redirect { .. } => FailureCause::Network,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::StorePath;

    #[test]
    fn errors_map_to_their_cause() {
        let path = StorePath::from_absolute_path(
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1",
        )
        .unwrap();
        let url = url::Url::parse("https://cache.example/x.narinfo").unwrap();
        let cases = [
            (
                SubstituteError::NotFound {
                    path: path.clone(),
                    caches: vec![],
                },
                "not_found",
            ),
            (
                SubstituteError::Truncated { path: path.clone() },
                "hash_mismatch",
            ),
            (
                SubstituteError::Fetch {
                    path: path.clone(),
                    source: Box::new(FetchError::Status {
                        url: url.clone(),
                        status: 503,
                    }),
                },
                "network",
            ),
            (
                SubstituteError::Fetch {
                    path: path.clone(),
                    source: Box::new(FetchError::TooLarge {
                        url,
                        limit: 1,
                        read: 2,
                    }),
                },
                "too_large",
            ),
            (SubstituteError::Cancelled { path }, "cancelled"),
        ];
        for (e, want) in cases {
            assert_eq!(FailureCause::of(&e).as_str(), want, "{e}");
        }
        let mut labels: Vec<_> = FailureCause::ALL.iter().map(|c| c.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), FailureCause::ALL.len());
    }
}
