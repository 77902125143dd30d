//! Nix formats. Everything here is pure: no file system, no network.

pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod signature;
pub mod store_path;

pub use hash::{FileHash, HashError, HashingReader, NarHash};
pub use nar::{NarError, NarLimits, NarPath, NarVisitor};
pub use narinfo::{Compression, NarInfo, NarInfoError};
pub use signature::{PublicKey, SecretKey, Signature, SignatureError, TrustedKeys};
pub use store_path::{StorePath, StorePathError};

/// The Nix store directory as seen inside containers (and in every narinfo).
pub const STORE_DIR: &str = "/nix/store";
