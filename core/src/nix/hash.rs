//! SHA-256 hashes as Nix writes them (`NarHash`, `FileHash`), and a hashing reader.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::nixbase32;

/// A SHA-256 digest, written `sha256:<52 nixbase32 characters>`.
///
/// Parses `sha256:<nixbase32>`, `sha256:<64 hex digits>`, `sha256:<base64>` and
/// SRI `sha256-<base64>`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NarHash(pub [u8; 32]);

/// The hash of a compressed NAR file (`FileHash`) has the same form.
pub type FileHash = NarHash;

/// Why a string is not a SHA-256 hash.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum HashError {
    #[error("hash {input:?} has unsupported type (expected sha256)")]
    UnsupportedType { input: String },
    #[error(
        "hash {input:?} has length {len} (expected 52 nixbase32, 64 hex or 44 base64 characters)"
    )]
    BadLength { input: String, len: usize },
    #[error("hash {input:?} is not valid nixbase32: {source}")]
    Base32 {
        input: String,
        source: nixbase32::Base32Error,
    },
    #[error("hash {input:?} is not valid hexadecimal")]
    Hex { input: String },
    #[error("hash {input:?} is not valid base64")]
    Base64 { input: String },
}

impl NarHash {
    /// The hash of `data`.
    pub fn digest(data: &[u8]) -> Self {
        NarHash(Sha256::digest(data).into())
    }

    /// Parses any of the accepted forms.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        if let Some(b64) = s.strip_prefix("sha256-") {
            return Self::from_base64(s, b64);
        }
        let Some(rest) = s.strip_prefix("sha256:") else {
            return Err(HashError::UnsupportedType {
                input: s.to_owned(),
            });
        };
        match rest.len() {
            52 => nixbase32::decode_array::<32>(rest)
                .map(NarHash)
                .map_err(|source| HashError::Base32 {
                    input: s.to_owned(),
                    source,
                }),
            64 => Self::from_hex(s, rest),
            44 => Self::from_base64(s, rest),
            len => Err(HashError::BadLength {
                input: s.to_owned(),
                len,
            }),
        }
    }

    fn from_hex(input: &str, hex: &str) -> Result<Self, HashError> {
        let bad = || HashError::Hex {
            input: input.to_owned(),
        };
        let b = hex.as_bytes();
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            let hi = (b[2 * i] as char).to_digit(16).ok_or_else(bad)?;
            let lo = (b[2 * i + 1] as char).to_digit(16).ok_or_else(bad)?;
            *o = (hi * 16 + lo) as u8;
        }
        Ok(NarHash(out))
    }

    fn from_base64(input: &str, b64: &str) -> Result<Self, HashError> {
        let v = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| HashError::Base64 {
                input: input.to_owned(),
            })?;
        let arr: [u8; 32] = v.try_into().map_err(|v: Vec<u8>| HashError::BadLength {
            input: input.to_owned(),
            len: v.len(),
        })?;
        Ok(NarHash(arr))
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// `sha256:<nixbase32>`, the form narinfo files and fingerprints use.
    pub fn to_nix_string(&self) -> String {
        format!("sha256:{}", nixbase32::encode(&self.0))
    }

    /// Lowercase hexadecimal, without prefix.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// SRI form, `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }
}

impl fmt::Display for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

impl fmt::Debug for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NarHash({self})")
    }
}

impl FromStr for NarHash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// An incremental SHA-256 that also counts bytes.
#[derive(Clone, Default)]
pub struct Hasher {
    sha: Sha256,
    len: u64,
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.len += data.len() as u64;
    }
    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The digest and the number of bytes hashed.
    pub fn finish(self) -> (NarHash, u64) {
        (NarHash(self.sha.finalize().into()), self.len)
    }
}

impl io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that hashes and counts every byte read through it.
///
/// Wrap the decompressed NAR stream in this before handing it to the NAR
/// parser; after parsing, [`HashingReader::finish`] gives the NAR's hash and
/// size to compare with the narinfo's `NarHash` and `NarSize`.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::new(),
        }
    }
    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.hasher.len()
    }
    /// The hash and size of everything read so far.
    pub fn finish(self) -> (NarHash, u64) {
        self.hasher.finish()
    }
    /// The wrapped reader, by reference.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }
    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_NIX: &str = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";

    #[test]
    fn forms_agree() {
        let h = NarHash::digest(b"");
        assert_eq!(h.to_hex(), EMPTY_HEX);
        assert_eq!(h.to_string(), EMPTY_NIX);
        assert_eq!(NarHash::parse(EMPTY_NIX).unwrap(), h);
        assert_eq!(NarHash::parse(&format!("sha256:{EMPTY_HEX}")).unwrap(), h);
        assert_eq!(NarHash::parse(&h.to_sri()).unwrap(), h);
        assert_eq!(
            h.to_sri(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert_eq!(
            NarHash::parse("sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").unwrap(),
            h
        );
        assert_eq!(EMPTY_NIX.parse::<NarHash>().unwrap(), h);
    }

    #[test]
    fn errors() {
        assert!(matches!(
            NarHash::parse("md5:abc"),
            Err(HashError::UnsupportedType { .. })
        ));
        assert!(matches!(
            NarHash::parse("sha256:abc"),
            Err(HashError::BadLength { len: 3, .. })
        ));
        assert!(matches!(
            NarHash::parse("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7e"),
            Err(HashError::Base32 { .. })
        ));
        assert!(matches!(
            NarHash::parse(&format!("sha256:{}", "g".repeat(64))),
            Err(HashError::Hex { .. })
        ));
        assert!(matches!(
            NarHash::parse("sha256-!!"),
            Err(HashError::Base64 { .. })
        ));
        let msg = NarHash::parse("sha256:abc").unwrap_err().to_string();
        assert!(msg.contains("\"sha256:abc\""), "{msg}");
    }

    #[test]
    fn hashing_reader_counts_and_hashes() {
        let data = vec![7u8; 100_000];
        let mut r = HashingReader::new(&data[..]);
        let mut sink = Vec::new();
        r.read_to_end(&mut sink).unwrap();
        let (h, n) = r.finish();
        assert_eq!(n, 100_000);
        assert_eq!(h, NarHash::digest(&data));
    }
}
