//! Garbage collection of the node store: roots, last use, what to delete, and deleting it
//! without ever losing a path in use.
//!
//! - [`roots`]: pins of containers that still exist (staleness through a [`ContainerProbe`]);
//! - [`usage`]: a path's last use (the mtime of its record, touched by pulls, pins and gc);
//! - [`collect`]: the pure decision (pinned, recent, LRU order, disk budget);
//! - [`delete`]: atomic retirement into `.trash-*`, trash and leftover removal;
//! - [`run`]: one gc run ([`run::collect_garbage`]);
//! - [`inventory`]: what is on the node (`nixenv ls --store`);
//! - [`doctor`]: the store's checks for `nixenv doctor`.
//!
//! # Concurrency: gc never deletes a path in use and never races a pull or a pin
//!
//! One store-wide lock, `flock(2)` on `{state-dir}/gc.lock` ([`GcLock`]):
//!
//! - **Pulls and pins take it shared** ([`GcLock::shared`], once per container start in
//!   `runtime.rs`, and in `nixenv pull`) from before they check which paths are valid until the paths they return
//!   are *rooted*: touched ([`usage::touch`], last use = now) and, for containers, covered by
//!   the container's pin. Shared holders do not block each other.
//! - **gc takes it exclusive** while it decides and retires: it reads the pins, the records
//!   and the last uses, plans, drops stale pins, and renames each victim to `.trash-<hash>`
//!   (under the path's own store lock) and removes its record. The slow part — removing the
//!   trash trees — happens after the exclusive lock is released, so gc blocks pulls and
//!   container starts only for the renames.
//!
//! Why that suffices:
//!
//! - A pull that starts while gc holds the lock waits, then checks validity and fetches
//!   again whatever gc removed. A pull that holds the lock makes gc wait; when gc gets it,
//!   the pull's paths have a fresh last use (kept by `--keep-since`) and, for a container,
//!   are reachable from its pin. Nothing a pull returned is removed while it returns it.
//! - The runtime holds the shared lock from before it materialises a container's closure until
//!   it has written the container's pin, once, with the full closure (`runtime.rs`): gc either
//!   ran before (and the start fetches again what gc removed) or runs after the pin exists.
//!   gc expands every live pin's paths through the local references as well.
//! - A pin is live unless its container is known to be gone *and* the pin is older than a
//!   grace period ([`run::GcOptions::pin_grace`], 10 minutes): between the pin and `runc
//!   create` the container does not exist yet. Probing runs before the exclusive phase (it
//!   spawns `runc`); in the exclusive phase a pin counts as stale only if its file is
//!   unchanged since it was probed.
//! - Installs hold the path's store lock and stage into `.tmp-<hash>`; gc takes the same lock
//!   to retire a path, so it never removes an install in progress, and a `.tmp-<hash>` it
//!   finds under the lock is a crashed install's leftover.
//! - The store stays closed under references: a path is removed only with every path that
//!   refers to it ([`collect`]), matching the substituter's rule that a path is committed only
//!   after its references.
//! - Gc runs are serialised by `{state-dir}/gc-run.lock` (the trash belongs to one run).
//!
//! Lock order everywhere: `gc-run.lock`, then `gc.lock`, then per-path store locks.
//!
//! # Crash recovery
//!
//! A SIGKILL at any point leaves: `.tmp-<hash>` staging areas (removed by the next install of
//! that path, by the next pull that downloads anything, or by gc, each only under their
//! lock), records without a path (not valid; replaced
//! by the next install, removed by gc), `.trash-*` (removed by the next gc), pins of containers
//! that were never created (stale after the grace period). None of these is ever mistaken
//! for a valid path.

pub mod collect;
pub mod delete;
pub mod doctor;
pub mod inventory;
pub mod lock;
pub mod roots;
pub mod run;
pub mod usage;

use std::io;
use std::path::{Path, PathBuf};

pub use collect::{Kept, Plan, Policy};
pub use lock::GcLock;
pub use roots::{ContainerProbe, Presence, RuncProbe};
pub use run::{collect_garbage, GcOptions, GcReport};

use crate::pin::PinError;
use crate::store::remove::RemoveError;
use crate::store::StoreError;

/// Why gc (or a store listing) failed. Each variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Remove(#[from] RemoveError),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    View(#[from] crate::store::view::ViewError),
}

impl GcError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> GcError + 'a {
        move |source| GcError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

#[cfg(test)]
mod tests;
