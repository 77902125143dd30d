//! Store paths: `/nix/store/<32-char nixbase32 digest>-<name>`.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use super::nixbase32;

/// Length of the hash part of a store path's base name.
pub const HASH_PART_LEN: usize = 32;
/// Longest allowed name (after `<hash>-`), as in Nix.
pub const MAX_NAME_LEN: usize = 211;

/// A store path, independent of where the store lives on this node.
///
/// Ordered like its base name string (which is how Nix orders references).
/// Serialised (serde) as the absolute path string `/nix/store/<hash>-<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StorePath {
    digest: [u8; 20],
    /// The nixbase32 form of `digest` (ASCII).
    hash: [u8; HASH_PART_LEN],
    name: String,
}

/// Why a string is not a store path.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum StorePathError {
    #[error("{path:?} is not a store path: {reason}")]
    Invalid { path: String, reason: &'static str },
}

fn invalid(path: &str, reason: &'static str) -> StorePathError {
    StorePathError::Invalid {
        path: path.to_owned(),
        reason,
    }
}

/// Checks a store path name (the part after `<hash>-`) by Nix's rules.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("name longer than 211 characters");
    }
    if name.starts_with('.') {
        return Err("name starts with a period");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
    {
        return Err("name contains a character outside [A-Za-z0-9+-._?=]");
    }
    Ok(())
}

impl StorePath {
    /// A store path from its digest and name (the name is checked).
    pub fn new(digest: [u8; 20], name: &str) -> Result<Self, StorePathError> {
        let hash_s = nixbase32::encode(&digest);
        check_name(name).map_err(|r| invalid(&format!("{hash_s}-{name}"), r))?;
        let mut hash = [0u8; HASH_PART_LEN];
        hash.copy_from_slice(hash_s.as_bytes());
        Ok(StorePath {
            digest,
            hash,
            name: name.to_owned(),
        })
    }

    /// Parses `/nix/store/<hash>-<name>` (no trailing slash, no subpath).
    pub fn from_absolute_path(s: &str) -> Result<Self, StorePathError> {
        let base = s
            .strip_prefix(super::STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| invalid(s, "not in /nix/store"))?;
        if base.contains('/') {
            return Err(invalid(s, "contains a path below the store path"));
        }
        Self::parse_base(s, base)
    }

    /// Parses `<hash>-<name>`.
    pub fn from_base_name(s: &str) -> Result<Self, StorePathError> {
        Self::parse_base(s, s)
    }

    fn parse_base(input: &str, base: &str) -> Result<Self, StorePathError> {
        if base.len() < HASH_PART_LEN + 2 {
            return Err(invalid(input, "too short"));
        }
        // Not `split_at`: it panics when byte 32 falls inside a multi-byte character.
        let (hash_s, rest) = base
            .split_at_checked(HASH_PART_LEN)
            .ok_or_else(|| invalid(input, "hash part is not nixbase32"))?;
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| invalid(input, "no '-' after the 32-character hash"))?;
        let digest = nixbase32::decode_array::<20>(hash_s)
            .map_err(|_| invalid(input, "hash part is not nixbase32"))?;
        check_name(name).map_err(|r| invalid(input, r))?;
        let mut hash = [0u8; HASH_PART_LEN];
        hash.copy_from_slice(hash_s.as_bytes());
        Ok(StorePath {
            digest,
            hash,
            name: name.to_owned(),
        })
    }

    /// The 20-byte digest.
    pub fn digest(&self) -> &[u8; 20] {
        &self.digest
    }
    /// The name after the dash.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The 32-character nixbase32 hash part (what `<hash>.narinfo` is named after).
    pub fn hash_part(&self) -> String {
        self.hash_str().to_owned()
    }
    /// The hash part, borrowed.
    pub fn hash_str(&self) -> &str {
        // Always ASCII from the nixbase32 alphabet.
        std::str::from_utf8(&self.hash).unwrap_or_default()
    }
    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash_str(), self.name)
    }
    /// `/nix/store/<hash>-<name>`.
    pub fn to_absolute_path(&self) -> String {
        format!("{}/{}", super::STORE_DIR, self.base_name())
    }
}

impl Ord for StorePath {
    fn cmp(&self, other: &Self) -> Ordering {
        // The hash part has a fixed length, so this is the base name's string order.
        self.hash
            .cmp(&other.hash)
            .then_with(|| self.name.cmp(&other.name))
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_absolute_path())
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    /// Parses an absolute store path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_absolute_path(s)
    }
}

impl serde::Serialize for StorePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_absolute_path())
    }
}

impl<'de> serde::Deserialize<'de> for StorePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        StorePath::from_absolute_path(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1";

    #[test]
    fn parse_and_render() {
        let p = StorePath::from_absolute_path(P).unwrap();
        assert_eq!(p.name(), "hello-2.12.1");
        assert_eq!(p.hash_part(), "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz");
        assert_eq!(
            p.base_name(),
            "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1"
        );
        assert_eq!(p.to_string(), P);
        assert_eq!(StorePath::from_base_name(&p.base_name()).unwrap(), p);
        assert_eq!(P.parse::<StorePath>().unwrap(), p);
        assert_eq!(StorePath::new(*p.digest(), p.name()).unwrap(), p);
        assert_eq!(nixbase32::encode(p.digest()), p.hash_part());
    }

    #[test]
    fn rejects() {
        let h = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz";
        for (s, why) in [
            (format!("/nix/store/{h}-hello/"), "below"),
            (format!("/nix/store/{h}-hello/bin"), "below"),
            (format!("/nix/store/{h}-"), "short"),
            (format!("/nix/store/{h}"), "short"),
            (format!("/nix/store/{h}_hello"), "'-'"),
            (format!("/nix/store/{}-hello", "e".repeat(32)), "nixbase32"),
            (format!("/nix/store/{h}-.hello"), "period"),
            (format!("/nix/store/{h}-hel lo"), "character"),
            (format!("/nix/store/{h}-hel/lo"), "below"),
            (format!("/nix/store/{h}-{}", "a".repeat(212)), "211"),
            (format!("/nix/store//{h}-hello"), "below"),
            (format!("/gnu/store/{h}-hello"), "not in /nix/store"),
            (format!("{h}-hello"), "not in /nix/store"),
        ] {
            let e = StorePath::from_absolute_path(&s).unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
            assert!(
                e.starts_with(&format!("{s:?} is not a store path: ")),
                "{e}"
            );
        }
        assert!(
            StorePath::from_absolute_path(&format!("/nix/store/{h}-{}", "a".repeat(211))).is_ok()
        );
        assert!(StorePath::from_base_name(&format!("{h}-a+b-c._?=Z9")).is_ok());
        assert!(StorePath::from_base_name(&format!("/nix/store/{h}-hello")).is_err());
        // Byte 32 inside a multi-byte character (a narinfo's References, found by fuzzing):
        // an error, not a panic.
        for s in [
            format!("{}\u{a1}-hello", &h[..31]),
            "!A0\u{e01}AAa\u{1c3b}0\u{fffc}0\u{1e950}\u{1d546}\u{ae}\u{10ba9}\u{a1}\u{ae}"
                .to_owned(),
        ] {
            let e = StorePath::from_base_name(&s).unwrap_err().to_string();
            assert!(e.contains("nixbase32"), "{s}: {e}");
            assert!(StorePath::from_absolute_path(&format!("/nix/store/{s}")).is_err());
        }
    }

    #[test]
    fn order_is_string_order() {
        let mut names = [
            "00000000000000000000000000000000-z",
            "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-a",
            "1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-b",
            "1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a",
            "a0000000000000000000000000000001-a",
        ];
        let mut paths: Vec<StorePath> = names
            .iter()
            .map(|n| StorePath::from_base_name(n).unwrap())
            .collect();
        paths.sort();
        names.sort();
        let got: Vec<String> = paths.iter().map(|p| p.base_name()).collect();
        assert_eq!(got, names);
    }

    #[test]
    fn serde_as_absolute_path() {
        let p = StorePath::from_absolute_path(P).unwrap();
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(j, format!("{P:?}"));
        assert_eq!(serde_json::from_str::<StorePath>(&j).unwrap(), p);
        assert!(serde_json::from_str::<StorePath>("\"/nix/store/x\"").is_err());
    }
}
