//! NAR (Nix ARchive): the grammar, once; a streaming reader with strict validation
//! ([`read`]) and a writer ([`write`](mod@write)), as nix-compat splits them.
//!
//! Format: every token is a string, written as its length (u64 little endian),
//! its bytes, and zero padding to a multiple of 8:
//!
//! ```text
//! nar   = "nix-archive-1" node
//! node  = "(" "type" ( "regular" [ "executable" "" ] "contents" BYTES
//!                    | "symlink" "target" STRING
//!                    | "directory" { "entry" "(" "name" STRING "node" node ")" } ) ")"
//! ```
//!
//! The tokens of that grammar are the constants below; both directions use them.
//! [`parse`] walks the archive and calls a [`NarVisitor`]; file contents are
//! handed to the visitor as a reader, never buffered whole. Everything here
//! works on `std::io::Read`/`Write` and touches no file system.

pub mod read;
pub mod write;

use std::fmt;

pub use read::{parse, read_tree, NarError, NarLimits, NarStats, NarVisitor};
pub use write::{write, write_string};

/// The magic string a NAR starts with.
pub const MAGIC: &str = "nix-archive-1";
/// Opens a node or a directory entry.
pub const OPEN: &str = "(";
/// Closes a node, a directory entry, or a directory's list of entries.
pub const CLOSE: &str = ")";
/// Precedes a node's type.
pub const TYPE: &str = "type";
/// A regular file's type.
pub const REGULAR: &str = "regular";
/// Marks a regular file executable; followed by an empty string.
pub const EXECUTABLE: &str = "executable";
/// Precedes a regular file's contents.
pub const CONTENTS: &str = "contents";
/// A symlink's type.
pub const SYMLINK: &str = "symlink";
/// Precedes a symlink's target.
pub const TARGET: &str = "target";
/// A directory's type.
pub const DIRECTORY: &str = "directory";
/// Starts a directory entry.
pub const ENTRY: &str = "entry";
/// Precedes a directory entry's name.
pub const NAME: &str = "name";
/// Precedes a directory entry's node.
pub const NODE: &str = "node";

/// A path inside a NAR: the entry names from the root. Shown as `/a/b`
/// (the root as `/`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NarPath(Vec<Vec<u8>>);

impl NarPath {
    /// The root.
    pub fn root() -> Self {
        NarPath(Vec::new())
    }
    /// The entry names from the root.
    pub fn components(&self) -> &[Vec<u8>] {
        &self.0
    }
    /// The last entry name (`None` for the root).
    pub fn name(&self) -> Option<&[u8]> {
        self.0.last().map(|v| v.as_slice())
    }
    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        self.0.len()
    }
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
    /// The path relative to the root (empty for the root).
    pub fn to_relative_path(&self) -> std::path::PathBuf {
        use std::os::unix::ffi::OsStrExt as _;
        self.0
            .iter()
            .map(|c| std::ffi::OsStr::from_bytes(c))
            .collect()
    }
    fn push(&mut self, name: Vec<u8>) {
        self.0.push(name);
    }
    fn pop(&mut self) {
        self.0.pop();
    }
}

impl fmt::Display for NarPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("/");
        }
        for c in &self.0 {
            write!(f, "/{}", printable(&String::from_utf8_lossy(c)))?;
        }
        Ok(())
    }
}

/// `s` with control characters escaped (`\n`, `\u{1b}`), so that a hostile entry name
/// cannot split an error message over several lines.
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn show(bytes: &[u8]) -> String {
    let s = printable(&String::from_utf8_lossy(bytes));
    if s.chars().count() > 64 {
        let cut: String = s.chars().take(64).collect();
        format!("{cut}…")
    } else {
        s
    }
}

/// A NAR held in memory, for tests and tools. [`write()`] emits directory
/// entries in the order given (so tests can build invalid archives).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarNode {
    File { executable: bool, contents: Vec<u8> },
    Symlink { target: Vec<u8> },
    Directory(Vec<(Vec<u8>, NarNode)>),
}

impl NarNode {
    pub fn file(contents: impl Into<Vec<u8>>) -> Self {
        NarNode::File {
            executable: false,
            contents: contents.into(),
        }
    }
    pub fn executable(contents: impl Into<Vec<u8>>) -> Self {
        NarNode::File {
            executable: true,
            contents: contents.into(),
        }
    }
    pub fn symlink(target: impl Into<Vec<u8>>) -> Self {
        NarNode::Symlink {
            target: target.into(),
        }
    }
    pub fn dir<N: Into<Vec<u8>>>(entries: impl IntoIterator<Item = (N, NarNode)>) -> Self {
        NarNode::Directory(entries.into_iter().map(|(n, e)| (n.into(), e)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small tree with every kind of node.
    pub(super) fn sample() -> NarNode {
        NarNode::dir([
            (
                "bin",
                NarNode::dir([
                    (
                        "hello",
                        NarNode::executable(b"#!/bin/sh\necho hi\n".to_vec()),
                    ),
                    ("hi", NarNode::symlink("hello")),
                ]),
            ),
            ("empty", NarNode::dir(Vec::<(&str, NarNode)>::new())),
            (
                "share",
                NarNode::dir([("data", NarNode::file(vec![0u8; 13]))]),
            ),
        ])
    }
}
