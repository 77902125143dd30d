//! Software bills of materials of closures: what an environment is (`nixenv sbom REF`) or what
//! a container ran (`nixenv sbom --container ID`, from its pin or its retired record, see
//! [`crate::pin`]), as SPDX 2.3 JSON ([`spdx`]) or CycloneDX 1.6 JSON ([`cyclonedx`]).
//!
//! Every store path of the closure is a package: its name and version split from the store
//! path name as Nix does ([`name`]), its NarHash (SHA-256 of the path's NAR serialisation) as
//! its checksum, its references as dependencies. The environment itself is the document's
//! subject, depending on the lock's top-level paths; the lock's generation is the document's
//! version. Rendering is pure; [`describe`] reads the node store's records.

pub mod cyclonedx;
mod describe;
pub mod name;
pub mod spdx;

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::nix::StorePath;
use crate::store::{PathInfo, StoreError};

pub use describe::describe;

/// What an SBOM describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The environment (`acme/echoserver`), or the store path's name for a store path reference.
    pub name: String,
    /// The lock's generation, for catalog references.
    pub generation: Option<u64>,
    /// The Nix system of the lock's part used (`x86_64-linux`).
    pub system: String,
    /// The lock's top-level paths, in lock order.
    pub roots: Vec<StorePath>,
    /// The container that ran it, for `--container`.
    pub container: Option<Container>,
}

/// A container an SBOM is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// When nixenv prepared it (RFC 3339).
    pub prepared: String,
}

/// A closure ready to render: the subject and every path's record, sorted, complete (every
/// reference and root is among the paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sbom {
    pub subject: Subject,
    pub paths: Vec<PathInfo>,
    /// The document's creation time (RFC 3339, seconds, UTC).
    pub created: String,
}

/// The output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// SPDX 2.3, JSON.
    SpdxJson,
    /// CycloneDX 1.6, JSON.
    CycloneDxJson,
}

impl FromStr for Format {
    type Err = SbomError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spdx-json" | "spdx" => Ok(Format::SpdxJson),
            "cyclonedx-json" | "cyclonedx" => Ok(Format::CycloneDxJson),
            other => Err(SbomError::UnknownFormat {
                format: other.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::SpdxJson => "spdx-json",
            Format::CycloneDxJson => "cyclonedx-json",
        })
    }
}

/// Why an SBOM cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SbomError {
    #[error("unknown sbom format {format:?} (known: spdx-json, cyclonedx-json)")]
    UnknownFormat { format: String },
    #[error("{path}: not in the node store (removed by gc since?): its record is needed")]
    NotInStore { path: StorePath },
    #[error("{path}: references {reference}, which is not in the closure")]
    MissingReference {
        path: Box<StorePath>,
        reference: Box<StorePath>,
    },
    #[error("{path}: a top-level path that is not in the closure")]
    MissingRoot { path: StorePath },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Sbom {
    /// Checks that `paths` is the closure of `subject.roots` and sorts it.
    pub fn new(
        subject: Subject,
        mut paths: Vec<PathInfo>,
        created: String,
    ) -> Result<Sbom, SbomError> {
        paths.sort_by(|a, b| a.path.cmp(&b.path));
        paths.dedup_by(|a, b| a.path == b.path);
        let present: BTreeSet<&StorePath> = paths.iter().map(|p| &p.path).collect();
        if let Some(root) = subject.roots.iter().find(|r| !present.contains(r)) {
            return Err(SbomError::MissingRoot { path: root.clone() });
        }
        for p in &paths {
            if let Some(r) = p.references.iter().find(|r| !present.contains(r)) {
                return Err(SbomError::MissingReference {
                    path: Box::new(p.path.clone()),
                    reference: Box::new(r.clone()),
                });
            }
        }
        Ok(Sbom {
            subject,
            paths,
            created,
        })
    }

    /// The document in `format`, pretty-printed JSON ending in a newline.
    pub fn render(&self, format: Format) -> Vec<u8> {
        let doc = match format {
            Format::SpdxJson => spdx::document(self),
            Format::CycloneDxJson => cyclonedx::document(self),
        };
        let mut out = serde_json::to_vec_pretty(&doc).expect("a JSON value serialises");
        out.push(b'\n');
        out
    }

    /// A UUID naming this document: SHA-256 of the subject, the closure's NarHashes and the
    /// creation time, shaped as an RFC 4122 name-based UUID (version 5 bits, variant 10).
    pub fn uuid(&self) -> String {
        let mut h = Sha256::new();
        let s = &self.subject;
        h.update(s.name.as_bytes());
        h.update(s.generation.unwrap_or(0).to_le_bytes());
        h.update(s.system.as_bytes());
        if let Some(c) = &s.container {
            h.update(c.id.as_bytes());
        }
        for p in &self.paths {
            h.update(p.path.to_absolute_path().as_bytes());
            h.update(p.nar_hash.as_bytes());
        }
        h.update(self.created.as_bytes());
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        b[6] = (b[6] & 0x0f) | 0x50;
        b[8] = (b[8] & 0x3f) | 0x80;
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }

    /// `acme/echoserver@2`, or the name alone without a generation.
    pub fn title(&self) -> String {
        match self.subject.generation {
            Some(g) => format!("{}@{g}", self.subject.name),
            None => self.subject.name.clone(),
        }
    }

    /// Each path's references other than itself, sorted.
    fn dependencies(p: &PathInfo) -> impl Iterator<Item = &StorePath> {
        p.references.iter().filter(move |r| **r != p.path)
    }
}

/// The version of nixenv that writes SBOMs.
pub(crate) const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nix::NarHash;

    pub const A: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-echoserver-0.1.0";
    pub const B: &str = "/nix/store/0c8m4ilwaxc1qpvby4x6m8hss1hwiy6i-busybox-1.36.1";
    pub const C: &str = "/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-gcc-13.2.0-lib";

    fn info(path: &str, refs: &[&str], fill: u8) -> PathInfo {
        PathInfo {
            path: path.parse().unwrap(),
            references: refs.iter().map(|r| r.parse().unwrap()).collect(),
            nar_hash: NarHash([fill; 32]),
            nar_size: 1000 + fill as u64,
            registration_time: 0,
        }
    }

    /// A → B, C; B → B (self), C; C.
    pub fn sample() -> Sbom {
        Sbom::new(
            Subject {
                name: "acme/echoserver".into(),
                generation: Some(2),
                system: "x86_64-linux".into(),
                roots: vec![A.parse().unwrap()],
                container: None,
            },
            vec![info(C, &[], 3), info(A, &[B, C], 1), info(B, &[B, C], 2)],
            "2026-12-05T10:00:00Z".into(),
        )
        .unwrap()
    }

    #[test]
    fn new_sorts_and_checks_completeness() {
        let s = sample();
        let names: Vec<String> = s.paths.iter().map(|p| p.path.to_absolute_path()).collect();
        assert_eq!(names, vec![B, C, A]);
        let mut subject = s.subject.clone();
        let e = Sbom::new(subject.clone(), vec![info(A, &[B], 1)], "t".into()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{A}: references {B}, which is not in the closure")
        );
        subject.roots = vec![B.parse().unwrap()];
        let e = Sbom::new(subject, vec![info(A, &[], 1)], "t".into()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{B}: a top-level path that is not in the closure")
        );
    }

    #[test]
    fn uuid_is_shaped_as_rfc_4122_and_changes_with_the_content() {
        let s = sample();
        let u = s.uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "5");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        assert_eq!(u, sample().uuid(), "the same document, the same uuid");
        let mut t = sample();
        t.created = "2026-12-05T10:00:01Z".into();
        assert_ne!(u, t.uuid());
    }

    #[test]
    fn formats_parse_and_print() {
        for f in [Format::SpdxJson, Format::CycloneDxJson] {
            assert_eq!(f.to_string().parse::<Format>().unwrap(), f);
        }
        assert_eq!(
            "xml".parse::<Format>().unwrap_err().to_string(),
            "unknown sbom format \"xml\" (known: spdx-json, cyclonedx-json)"
        );
    }
}
