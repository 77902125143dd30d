//! What the node holds now, read from the state directory when the metrics are read: no
//! process has to keep these up to date.

use std::path::Path;

use crate::gc::inventory;
use crate::pin;
use crate::store::view::Views;
use crate::store::Store;

use super::MetricsError;

/// The node's gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    /// Valid store paths.
    pub store_paths: u64,
    /// Their NarSize, summed.
    pub store_bytes: u64,
    /// Pins (containers holding a closure; stale ones until gc drops them).
    pub pins: u64,
    /// Closure views of this boot.
    pub closure_views: u64,
}

/// Reads the gauges of the store under `state_dir`.
pub fn read(state_dir: &Path) -> Result<Gauges, MetricsError> {
    let store = Store::open(state_dir)?;
    let (valid, _invalid) = inventory::entries(&store)?;
    let closure_views = Views::open(state_dir)?.list()?.len() as u64;
    Ok(Gauges {
        store_paths: valid.len() as u64,
        store_bytes: valid.iter().map(|e| e.size).sum(),
        pins: pin::list(state_dir)?.len() as u64,
        closure_views,
    })
}
