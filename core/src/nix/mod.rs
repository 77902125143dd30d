//! Nix formats. Everything here is pure: no file system, no network.

pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod signature;
pub mod store_path;

pub use hash::NarHash;
pub use narinfo::NarInfo;
pub use signature::{PublicKey, Signature, TrustedKeys};
pub use store_path::StorePath;

/// The Nix store directory as seen inside containers (and in every narinfo).
pub const STORE_DIR: &str = "/nix/store";
