//! `nixenv ls --store`: what is on the node — every store path with its size, last use and
//! the containers whose pins reach it — and a total.

use std::io::Write;
use std::time::SystemTime;

use nixenv_core::config::ConfigError;
use nixenv_core::gc::inventory;
use nixenv_core::gc::GcError;
use nixenv_core::store::{Store, StoreError};

use crate::gc::{ago, human_size};
use crate::Globals;

/// Why `nixenv ls --store` failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreLsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("ls --store: {0}")]
    List(#[from] GcError),
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
}

/// Prints the store listing on stdout.
pub fn run(globals: &Globals) -> Result<(), StoreLsError> {
    let cfg = globals.config()?;
    let store = Store::open(&cfg.state_dir)?;
    let (items, pins) = inventory::list_store(&store)?;
    let now = SystemTime::now();
    let width = items
        .iter()
        .map(|i| i.path.to_absolute_path().len())
        .max()
        .unwrap_or(4)
        .max(4);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut w = |line: String| writeln!(out, "{line}").map_err(StoreLsError::Stdout);
    w(format!(
        "{:<width$}  {:>10}  {:>9}  PINNED BY",
        "PATH", "SIZE", "LAST USE"
    ))?;
    let mut pinned = 0;
    for i in &items {
        if !i.pinned_by.is_empty() {
            pinned += 1;
        }
        w(format!(
            "{:<width$}  {:>10}  {:>9}  {}",
            i.path.to_absolute_path(),
            human_size(i.size),
            ago(i.last_use, now),
            if i.pinned_by.is_empty() {
                "-".to_owned()
            } else {
                i.pinned_by.join(",")
            },
        ))?;
    }
    w(format!(
        "{} path(s), {}; {} pinned by {} container(s)",
        items.len(),
        human_size(items.iter().map(|i| i.size).sum()),
        pinned,
        pins.len()
    ))?;
    out.flush().map_err(StoreLsError::Stdout)
}
