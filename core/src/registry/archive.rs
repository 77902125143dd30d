//! The image of an OCI image-layout archive (`oci-layout`, `index.json`, `blobs/sha256/…`), as
//! the package ships the empty image: each manifest that `index.json` names with
//! `org.opencontainers.image.ref.name` (`docker.io/library/empty:latest`) becomes a tag of its
//! repository (`library/empty`), and every blob is served by its digest. Blobs are checked
//! against their digests when the archive is read, so the server never serves bytes that do
//! not match the name a client asked for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use super::tar::{self, TarError};
use crate::nix::hash::NarHash;

/// The largest archive read (the empty image is a few kilobytes).
pub const MAX_ARCHIVE_BYTES: u64 = 4 << 20;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A manifest, by reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub media_type: String,
    pub digest: String,
}

/// The repositories, tags and blobs of an archive.
#[derive(Debug, Clone, Default)]
pub struct Image {
    /// `(repository, tag)` → manifest, e.g. `("library/empty", "latest")`.
    tags: BTreeMap<(String, String), Manifest>,
    /// `sha256:…` → bytes.
    blobs: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Error)]
pub enum ArchiveError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, more than the {max} an image archive may have")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("{path}: {source}")]
    Tar { path: PathBuf, source: TarError },
    #[error("{path} has no index.json")]
    NoIndex { path: PathBuf },
    #[error("{path}: index.json is not an OCI index: {source}")]
    Index {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: blob {name} does not match its digest (sha256:{actual})")]
    Digest {
        path: PathBuf,
        name: String,
        actual: String,
    },
    #[error("{path}: index.json names {digest}, which is not among the blobs")]
    MissingBlob { path: PathBuf, digest: String },
    #[error("{path}: reference name {name:?} is not registry/repository:tag")]
    RefName { path: PathBuf, name: String },
    #[error("{path} names no manifest with a reference name")]
    NoTags { path: PathBuf },
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl Image {
    /// Reads the archive at `path`.
    pub fn read(path: &Path) -> Result<Image, ArchiveError> {
        let read = |source| ArchiveError::Read {
            path: path.to_owned(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > MAX_ARCHIVE_BYTES {
            return Err(ArchiveError::TooLarge {
                path: path.to_owned(),
                size,
                max: MAX_ARCHIVE_BYTES,
            });
        }
        let bytes = std::fs::read(path).map_err(read)?;
        Image::parse(path, &bytes)
    }

    /// The image of archive bytes (`path` names it in errors).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Image, ArchiveError> {
        let entries = tar::entries(bytes).map_err(|source| ArchiveError::Tar {
            path: path.to_owned(),
            source,
        })?;
        let mut image = Image::default();
        let mut index = None;
        for entry in entries {
            if entry.path == "index.json" {
                index = Some(entry.data);
            } else if let Some(hex) = entry.path.strip_prefix("blobs/sha256/") {
                let actual = sha256_hex(&entry.data);
                if actual != hex {
                    return Err(ArchiveError::Digest {
                        path: path.to_owned(),
                        name: entry.path.clone(),
                        actual,
                    });
                }
                image.blobs.insert(format!("sha256:{hex}"), entry.data);
            }
        }
        let index = index.ok_or_else(|| ArchiveError::NoIndex {
            path: path.to_owned(),
        })?;
        let index: Index =
            serde_json::from_slice(&index).map_err(|source| ArchiveError::Index {
                path: path.to_owned(),
                source,
            })?;
        for d in index.manifests {
            if !image.blobs.contains_key(&d.digest) {
                return Err(ArchiveError::MissingBlob {
                    path: path.to_owned(),
                    digest: d.digest,
                });
            }
            let Some(name) = d.annotations.get(REF_NAME) else {
                continue;
            };
            let (repository, tag) = split_ref(name).ok_or_else(|| ArchiveError::RefName {
                path: path.to_owned(),
                name: name.clone(),
            })?;
            image.tags.insert(
                (repository, tag),
                Manifest {
                    media_type: d.media_type,
                    digest: d.digest,
                },
            );
        }
        if image.tags.is_empty() {
            return Err(ArchiveError::NoTags {
                path: path.to_owned(),
            });
        }
        Ok(image)
    }

    /// Whether the archive holds a tag of `repository`.
    pub fn has_repository(&self, repository: &str) -> bool {
        self.tags.keys().any(|(r, _)| r == repository)
    }

    /// The manifest of `repository` that `reference` (a tag or a manifest digest) names.
    pub fn manifest(&self, repository: &str, reference: &str) -> Option<&Manifest> {
        if let Some(m) = self
            .tags
            .get(&(repository.to_owned(), reference.to_owned()))
        {
            return Some(m);
        }
        self.tags
            .iter()
            .find(|((r, _), m)| r == repository && m.digest == reference)
            .map(|(_, m)| m)
    }

    /// The bytes of blob `digest` (`sha256:…`), manifests included.
    pub fn blob(&self, digest: &str) -> Option<&[u8]> {
        self.blobs.get(digest).map(Vec::as_slice)
    }

    /// `(repository, tag, manifest)` for each tag.
    pub fn tags(&self) -> impl Iterator<Item = (&str, &str, &Manifest)> {
        self.tags
            .iter()
            .map(|((r, t), m)| (r.as_str(), t.as_str(), m))
    }
}

/// `registry/repository:tag` → `(repository, tag)`; `library/` is kept as the registry stores it.
fn split_ref(name: &str) -> Option<(String, String)> {
    let (registry, rest) = name.split_once('/')?;
    if !registry.contains('.') && !registry.contains(':') && registry != "localhost" {
        return None;
    }
    let (repository, tag) = rest.rsplit_once(':')?;
    if repository.is_empty() || tag.is_empty() || repository.contains('@') {
        return None;
    }
    Some((repository.to_owned(), tag.to_owned()))
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    NarHash::digest(bytes).to_hex()
}

#[cfg(test)]
mod tests {
    use super::super::testing::{empty_archive, tar_of};
    use super::*;

    #[test]
    fn tags_and_blobs_are_those_of_the_index() {
        let (bytes, manifest, config) = empty_archive();
        let image = Image::parse(Path::new("a.tar"), &bytes).unwrap();
        let tags: Vec<_> = image
            .tags()
            .map(|(r, t, m)| (r, t, m.digest.clone()))
            .collect();
        assert_eq!(tags, vec![("library/empty", "latest", manifest.clone())]);
        assert_eq!(
            image.manifest("library/empty", &manifest).unwrap().digest,
            manifest
        );
        assert!(image.manifest("library/other", "latest").is_none());
        assert_eq!(sha256_hex(image.blob(&config).unwrap()), config[7..]);
    }

    #[test]
    fn a_blob_that_does_not_match_its_name_is_refused() {
        let err = Image::parse(
            Path::new("a.tar"),
            &tar_of(&[
                ("index.json", b"{\"manifests\":[]}"),
                ("blobs/sha256/00", b"x"),
            ]),
        )
        .unwrap_err();
        assert!(matches!(err, ArchiveError::Digest { .. }), "{err}");
    }

    #[test]
    fn reference_names_split_into_repository_and_tag() {
        assert_eq!(
            split_ref("docker.io/library/empty:latest"),
            Some(("library/empty".into(), "latest".into()))
        );
        assert_eq!(
            split_ref("localhost:5000/a/b:1"),
            Some(("a/b".into(), "1".into()))
        );
        assert_eq!(split_ref("empty:latest"), None);
        assert_eq!(split_ref("docker.io/library/empty"), None);
    }
}
