//! The node store's side of an SBOM: each closure path's record.

use super::{Sbom, SbomError, Subject};
use crate::nix::StorePath;
use crate::store::Store;

/// The SBOM of `closure` (every path valid in `store`) for `subject`, created at `created`.
pub fn describe(
    store: &Store,
    subject: Subject,
    closure: &[StorePath],
    created: String,
) -> Result<Sbom, SbomError> {
    let mut paths = Vec::with_capacity(closure.len());
    for p in closure {
        match store.query(p)? {
            Some(info) => paths.push(info),
            None => return Err(SbomError::NotInStore { path: p.clone() }),
        }
    }
    Sbom::new(subject, paths, created)
}
