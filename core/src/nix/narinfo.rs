//! `.narinfo` files: parse, render and the signing fingerprint.

use std::fmt;
use std::str::FromStr;

use super::hash::{FileHash, HashError, NarHash};
use super::store_path::{StorePath, StorePathError};

/// How the NAR file named by `URL` is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    Bzip2,
}

/// A `Compression` value this implementation does not support.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[error("unsupported compression {0:?} (supported: none, xz, zstd, bzip2)")]
pub struct UnsupportedCompression(pub String);

impl Compression {
    /// The name used in narinfo files and in `nix copy --to …?compression=`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
        }
    }

    /// The file name suffix `nix copy` gives NARs so compressed (`.xz`, `.zst`, `.bz2`, ``).
    pub fn extension(&self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
            Compression::Bzip2 => ".bz2",
        }
    }
}

impl FromStr for Compression {
    type Err = UnsupportedCompression;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "xz" => Ok(Compression::Xz),
            "zstd" => Ok(Compression::Zstd),
            "bzip2" => Ok(Compression::Bzip2),
            other => Err(UnsupportedCompression(other.to_owned())),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed `.narinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// `StorePath`
    pub store_path: StorePath,
    /// `URL`, relative to the cache (e.g. `nar/<filehash>.nar.xz`).
    pub url: String,
    /// `Compression` (`bzip2` when absent, as in Nix).
    pub compression: Compression,
    /// `FileHash`, the hash of the (compressed) file at `URL`.
    pub file_hash: Option<FileHash>,
    /// `FileSize`, the size of the file at `URL`.
    pub file_size: Option<u64>,
    /// `NarHash`, the hash of the uncompressed NAR.
    pub nar_hash: NarHash,
    /// `NarSize`, the size of the uncompressed NAR.
    pub nar_size: u64,
    /// `References`, in file order.
    pub references: Vec<StorePath>,
    /// `Deriver` (a base name like `<hash>-foo.drv`).
    pub deriver: Option<StorePath>,
    /// `System`
    pub system: Option<String>,
    /// `Sig` lines, verbatim (`name:base64`), in file order.
    pub sigs: Vec<String>,
    /// `CA`, verbatim.
    pub ca: Option<String>,
}

/// Why a narinfo could not be parsed. Lines are numbered from 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum NarInfoError {
    #[error("narinfo line {line}: expected 'Key: value'")]
    MalformedLine { line: usize },
    #[error("narinfo line {line}: duplicate field {field}")]
    DuplicateField { field: &'static str, line: usize },
    #[error("narinfo: missing field {field}")]
    MissingField { field: &'static str },
    #[error("narinfo line {line}: bad {field}: {source}")]
    BadStorePath {
        field: &'static str,
        line: usize,
        source: StorePathError,
    },
    #[error("narinfo line {line}: bad {field}: {source}")]
    BadHash {
        field: &'static str,
        line: usize,
        source: HashError,
    },
    #[error("narinfo line {line}: bad {field}: {value:?} is not a number")]
    BadNumber {
        field: &'static str,
        line: usize,
        value: String,
    },
    #[error("narinfo line {line}: bad Compression: {source}")]
    BadCompression {
        line: usize,
        source: UnsupportedCompression,
    },
    #[error("narinfo line {line}: empty {field}")]
    EmptyField { field: &'static str, line: usize },
}

/// The single-valued fields a narinfo may hold (`Sig` may repeat; others are ignored).
pub const FIELDS: &[&str] = &[
    "StorePath",
    "URL",
    "Compression",
    "FileHash",
    "FileSize",
    "NarHash",
    "NarSize",
    "References",
    "Deriver",
    "System",
    "CA",
];

fn set_once<T>(
    slot: &mut Option<T>,
    field: &'static str,
    line: usize,
    v: T,
) -> Result<(), NarInfoError> {
    if slot.is_some() {
        return Err(NarInfoError::DuplicateField { field, line });
    }
    *slot = Some(v);
    Ok(())
}

impl NarInfo {
    /// Parses a narinfo. Unknown keys are ignored; `Sig` may repeat, any
    /// other field may not.
    pub fn parse(s: &str) -> Result<Self, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver: Option<Option<StorePath>> = None;
        let mut system = None;
        let mut sigs = Vec::new();
        let mut ca = None;

        for (idx, raw) in s.split('\n').enumerate() {
            let line = idx + 1;
            if raw.is_empty() {
                continue;
            }
            let (key, value) = raw
                .split_once(": ")
                .or_else(|| raw.strip_suffix(':').map(|k| (k, "")))
                .ok_or(NarInfoError::MalformedLine { line })?;
            let Some(field) = FIELDS.iter().copied().find(|f| *f == key) else {
                if key == "Sig" {
                    if value.is_empty() {
                        return Err(NarInfoError::EmptyField { field: "Sig", line });
                    }
                    sigs.push(value.to_owned());
                }
                continue;
            };
            let path = |v: &str| {
                StorePath::from_absolute_path(v).map_err(|source| NarInfoError::BadStorePath {
                    field,
                    line,
                    source,
                })
            };
            let hash = |v: &str| {
                NarHash::parse(v).map_err(|source| NarInfoError::BadHash {
                    field,
                    line,
                    source,
                })
            };
            let number = |v: &str| {
                v.parse::<u64>().map_err(|_| NarInfoError::BadNumber {
                    field,
                    line,
                    value: v.to_owned(),
                })
            };
            match field {
                "StorePath" => set_once(&mut store_path, field, line, path(value)?)?,
                "URL" => {
                    if value.is_empty() {
                        return Err(NarInfoError::EmptyField { field, line });
                    }
                    set_once(&mut url, field, line, value.to_owned())?
                }
                "Compression" => {
                    // Nix treats an empty value like an absent one.
                    let c = if value.is_empty() {
                        Compression::Bzip2
                    } else {
                        value
                            .parse()
                            .map_err(|source| NarInfoError::BadCompression { line, source })?
                    };
                    set_once(&mut compression, field, line, c)?
                }
                "FileHash" => set_once(&mut file_hash, field, line, hash(value)?)?,
                "FileSize" => set_once(&mut file_size, field, line, number(value)?)?,
                "NarHash" => set_once(&mut nar_hash, field, line, hash(value)?)?,
                "NarSize" => set_once(&mut nar_size, field, line, number(value)?)?,
                "References" => {
                    let refs = value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(|r| {
                            StorePath::from_base_name(r).map_err(|source| {
                                NarInfoError::BadStorePath {
                                    field,
                                    line,
                                    source,
                                }
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    set_once(&mut references, field, line, refs)?
                }
                "Deriver" => {
                    let d = if value == "unknown-deriver" || value.is_empty() {
                        None
                    } else {
                        Some(StorePath::from_base_name(value).map_err(|source| {
                            NarInfoError::BadStorePath {
                                field,
                                line,
                                source,
                            }
                        })?)
                    };
                    set_once(&mut deriver, field, line, d)?
                }
                "System" => set_once(&mut system, field, line, value.to_owned())?,
                "CA" => set_once(&mut ca, field, line, value.to_owned())?,
                _ => unreachable!("every entry of FIELDS is matched"),
            }
        }

        let missing = |field| NarInfoError::MissingField { field };
        Ok(NarInfo {
            store_path: store_path.ok_or_else(|| missing("StorePath"))?,
            url: url.ok_or_else(|| missing("URL"))?,
            compression: compression.unwrap_or(Compression::Bzip2),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size: nar_size.ok_or_else(|| missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver: deriver.flatten(),
            system: system.filter(|s| !s.is_empty()),
            sigs,
            ca: ca.filter(|s| !s.is_empty()),
        })
    }

    /// The references as store paths (file order).
    pub fn references(&self) -> Vec<StorePath> {
        self.references.clone()
    }

    /// The string the `Sig` lines sign:
    /// `1;<store path>;<NarHash>;<NarSize>;<comma-separated absolute references>`,
    /// references sorted (as Nix keeps them in an ordered set).
    pub fn fingerprint(&self) -> String {
        let mut refs: Vec<&StorePath> = self.references.iter().collect();
        refs.sort();
        refs.dedup();
        let refs: Vec<String> = refs.iter().map(|r| r.to_absolute_path()).collect();
        format!(
            "1;{};{};{};{}",
            self.store_path,
            self.nar_hash.to_nix_string(),
            self.nar_size,
            refs.join(",")
        )
    }

    /// Renders the narinfo the way Nix writes it (field order and spelling).
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "StorePath: {}", self.store_path);
        let _ = writeln!(s, "URL: {}", self.url);
        let _ = writeln!(s, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {h}");
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash);
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        let refs: Vec<String> = self.references.iter().map(|r| r.base_name()).collect();
        let _ = writeln!(s, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {}", d.base_name());
        }
        if let Some(sys) = &self.system {
            let _ = writeln!(s, "System: {sys}");
        }
        for sig in &self.sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        s
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl FromStr for NarInfo {
    type Err = NarInfoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";

    fn sample() -> String {
        format!(
            "StorePath: /nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1\n\
             URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz\n\
             Compression: xz\n\
             FileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3\n\
             FileSize: 50088\n\
             NarHash: sha256:{H1}\n\
             NarSize: 226560\n\
             References: 7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1 3n58xw4373jp0ljirf06d8077j15pc4j-glibc-2.37-8\n\
             Deriver: xy7pbqcyl1cks8hsmwgwm6l0l6yirbbi-hello-2.12.1.drv\n\
             System: x86_64-linux\n\
             Sig: cache.nixos.org-1:aaaa\n\
             Sig: other-1:bbbb\n\
             CA: fixed:r:sha256:{H1}\n"
        )
    }

    #[test]
    fn parse_render_round_trip() {
        let s = sample();
        let ni = NarInfo::parse(&s).unwrap();
        assert_eq!(ni.compression, Compression::Xz);
        assert_eq!(ni.file_size, Some(50088));
        assert_eq!(ni.nar_size, 226560);
        assert_eq!(ni.references().len(), 2);
        assert_eq!(ni.sigs, vec!["cache.nixos.org-1:aaaa", "other-1:bbbb"]);
        assert_eq!(ni.system.as_deref(), Some("x86_64-linux"));
        assert_eq!(ni.render(), s);
        assert_eq!(NarInfo::parse(&ni.render()).unwrap(), ni);
    }

    #[test]
    fn fingerprint_sorts_references() {
        let ni = NarInfo::parse(&sample()).unwrap();
        assert_eq!(
            ni.fingerprint(),
            format!(
                "1;/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1;sha256:{H1};226560;\
                 /nix/store/3n58xw4373jp0ljirf06d8077j15pc4j-glibc-2.37-8,\
                 /nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1"
            )
        );
    }

    #[test]
    fn defaults_and_unknown_keys() {
        let s = format!(
            "StorePath: /nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1\n\
             URL: nar/x.nar\n\
             NarHash: sha256:{H1}\n\
             NarSize: 8\n\
             Frobnicate: yes\n\
             References: \n"
        );
        let ni = NarInfo::parse(&s).unwrap();
        assert_eq!(ni.compression, Compression::Bzip2);
        assert!(ni.references.is_empty());
        assert_eq!(ni.file_hash, None);
        assert!(ni.sigs.is_empty());
        assert_eq!(
            ni.fingerprint(),
            format!("1;/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1;sha256:{H1};8;")
        );
        // No final newline, no References line at all.
        let s2 = s.replace("References: \n", "").trim_end().to_owned();
        assert_eq!(NarInfo::parse(&s2).unwrap().references, vec![]);
    }

    #[test]
    fn errors_name_field_and_line() {
        let s = sample();
        let dup = s.replace(
            "System: x86_64-linux\n",
            "System: x86_64-linux\nNarSize: 1\n",
        );
        assert_eq!(
            NarInfo::parse(&dup).unwrap_err().to_string(),
            "narinfo line 11: duplicate field NarSize"
        );
        let missing = s.replace(
            "URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz\n",
            "",
        );
        assert_eq!(
            NarInfo::parse(&missing).unwrap_err().to_string(),
            "narinfo: missing field URL"
        );
        for f in ["StorePath", "NarHash", "NarSize"] {
            let t: String = s
                .lines()
                .filter(|l| !l.starts_with(&format!("{f}:")))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(
                NarInfo::parse(&t).unwrap_err(),
                NarInfoError::MissingField { field: f }
            );
        }
        let bad = s.replace("NarSize: 226560", "NarSize: lots");
        assert_eq!(
            NarInfo::parse(&bad).unwrap_err().to_string(),
            "narinfo line 7: bad NarSize: \"lots\" is not a number"
        );
        let bad = s.replace("Compression: xz", "Compression: br");
        assert_eq!(
            NarInfo::parse(&bad).unwrap_err().to_string(),
            "narinfo line 3: bad Compression: unsupported compression \"br\" (supported: none, xz, zstd, bzip2)"
        );
        let bad = s.replace("NarHash: sha256:", "NarHash: md5:");
        assert!(NarInfo::parse(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("narinfo line 6: bad NarHash: "));
        let bad = s.replace("References: 7h7q", "References: 7h7e");
        assert!(NarInfo::parse(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("narinfo line 8: bad References: "));
        let bad = s.replace("System: x86_64-linux", "System x86_64-linux");
        assert_eq!(
            NarInfo::parse(&bad).unwrap_err(),
            NarInfoError::MalformedLine { line: 10 }
        );
        let dup_sp =
            format!("{s}StorePath: /nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1\n");
        assert!(matches!(
            NarInfo::parse(&dup_sp),
            Err(NarInfoError::DuplicateField {
                field: "StorePath",
                line: 14
            })
        ));
    }
}
