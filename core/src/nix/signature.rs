//! ed25519 keys and signatures (`name:base64`), and narinfo verification.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::Signer as _;

use super::narinfo::NarInfo;

/// A trusted public key, `name:base64(32 bytes)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    pub key: [u8; 32],
}

/// A signature, `name:base64(64 bytes)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub name: String,
    pub bytes: [u8; 64],
}

/// A secret signing key, `name:base64(64 bytes: seed then public key)`, as
/// written by `nix-store --generate-binary-cache-key`. For tests and tools.
#[derive(Clone)]
pub struct SecretKey {
    pub name: String,
    key: ed25519_dalek::SigningKey,
}

/// The set of trusted keys.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    pub keys: Vec<PublicKey>,
}

/// Errors about keys, signatures and verification. The verification errors
/// read well after `<store path>: `.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum SignatureError {
    /// A public key that is not `name:base64(32-byte ed25519 key)`.
    #[error("bad key {input:?}: {reason}")]
    BadKey { input: String, reason: &'static str },
    /// A secret key that is not `name:base64(64 bytes)` (the key material is not repeated).
    #[error("bad secret key {name:?}: {reason}")]
    BadSecretKey { name: String, reason: &'static str },
    /// A signature that is not `name:base64(64 bytes)`.
    #[error("bad signature {input:?}: {reason}")]
    BadSignatureFormat { input: String, reason: &'static str },
    /// No `Sig` is by a trusted key; `keys` are the names of the keys that did sign.
    #[error("signature not trusted ({})", seen(.keys))]
    NotTrusted { keys: Vec<String> },
    /// A `Sig` by a trusted key (by name) does not verify.
    #[error("bad signature by key {key}")]
    BadSignature { key: String },
}

fn seen(keys: &[String]) -> String {
    if keys.is_empty() {
        "no signatures".to_owned()
    } else {
        format!("keys: {}", keys.join(", "))
    }
}

fn split_named(s: &str) -> Option<(&str, &str)> {
    let (name, b64) = s.split_once(':')?;
    if name.is_empty() {
        return None;
    }
    Some((name, b64))
}

fn decode_fixed<const N: usize>(b64: &str) -> Result<[u8; N], &'static str> {
    let v = BASE64.decode(b64.trim()).map_err(|_| "not valid base64")?;
    v.try_into().map_err(|_| match N {
        32 => "not 32 bytes",
        64 => "not 64 bytes",
        _ => "wrong length",
    })
}

impl PublicKey {
    /// Parses `name:base64(32 bytes)`, checking that it is an ed25519 point.
    pub fn parse(s: &str) -> Result<Self, SignatureError> {
        let bad = |reason| SignatureError::BadKey {
            input: s.to_owned(),
            reason,
        };
        let (name, b64) = split_named(s).ok_or_else(|| bad("expected name:base64"))?;
        let key = decode_fixed::<32>(b64).map_err(bad)?;
        ed25519_dalek::VerifyingKey::from_bytes(&key)
            .map_err(|_| bad("not an ed25519 public key"))?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    /// Whether `sig` is a valid signature of `message` by this key (names are not compared).
    pub fn verify(&self, message: &[u8], sig: &Signature) -> bool {
        let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(&self.key) else {
            return false;
        };
        let s = ed25519_dalek::Signature::from_bytes(&sig.bytes);
        vk.verify_strict(message, &s).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key))
    }
}

impl Signature {
    /// Parses `name:base64(64 bytes)`.
    pub fn parse(s: &str) -> Result<Self, SignatureError> {
        let bad = |reason| SignatureError::BadSignatureFormat {
            input: s.to_owned(),
            reason,
        };
        let (name, b64) = split_named(s).ok_or_else(|| bad("expected name:base64"))?;
        let bytes = decode_fixed::<64>(b64).map_err(bad)?;
        Ok(Signature {
            name: name.to_owned(),
            bytes,
        })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.bytes))
    }
}

impl SecretKey {
    /// Parses `name:base64(64 bytes)` as written by `nix-store --generate-binary-cache-key`.
    pub fn parse(s: &str) -> Result<Self, SignatureError> {
        let name = s.split_once(':').map(|(n, _)| n).unwrap_or("");
        let bad = |reason| SignatureError::BadSecretKey {
            name: name.to_owned(),
            reason,
        };
        let (name, b64) = split_named(s).ok_or_else(|| bad("expected name:base64"))?;
        let bytes = decode_fixed::<64>(b64).map_err(bad)?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| bad("public half does not match the secret half"))?;
        Ok(SecretKey {
            name: name.to_owned(),
            key,
        })
    }

    /// A key from a 32-byte seed (deterministic; for tests).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        SecretKey {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key().to_bytes(),
        }
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature {
            name: self.name.clone(),
            bytes: self.key.sign(message).to_bytes(),
        }
    }

    /// Adds a `Sig` over the narinfo's fingerprint.
    pub fn sign_narinfo(&self, info: &mut NarInfo) {
        let sig = self.sign(info.fingerprint().as_bytes());
        info.sigs.push(sig.to_string());
    }

    /// `name:base64(64 bytes)`, the form [`SecretKey::parse`] reads.
    pub fn to_nix_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({:?})", self.name)
    }
}

impl TrustedKeys {
    /// Parses each `name:base64` key.
    pub fn from_strs<I, S>(keys: I) -> Result<Self, SignatureError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let keys = keys
            .into_iter()
            .map(|k| PublicKey::parse(k.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(TrustedKeys { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Accepts the narinfo when at least one `Sig` by a trusted key (matched by
    /// name) verifies over its fingerprint; returns that key.
    ///
    /// Errors: [`SignatureError::BadSignature`] when some `Sig` is by a trusted
    /// key name but none verifies, else [`SignatureError::NotTrusted`] listing
    /// the key names of the `Sig` lines.
    pub fn verify(&self, info: &NarInfo) -> Result<&PublicKey, SignatureError> {
        let fingerprint = info.fingerprint();
        let mut seen = Vec::new();
        let mut bad_by = None;
        for raw in &info.sigs {
            let name = raw.split_once(':').map(|(n, _)| n).unwrap_or(raw.as_str());
            if !seen.iter().any(|s| s == name) {
                seen.push(name.to_owned());
            }
            let trusted: Vec<&PublicKey> = self.keys.iter().filter(|k| k.name == name).collect();
            if trusted.is_empty() {
                continue;
            }
            let sig = Signature::parse(raw).ok();
            if let Some(sig) = sig {
                if let Some(k) = trusted
                    .into_iter()
                    .find(|k| k.verify(fingerprint.as_bytes(), &sig))
                {
                    return Ok(k);
                }
            }
            bad_by.get_or_insert_with(|| name.to_owned());
        }
        match bad_by {
            Some(key) => Err(SignatureError::BadSignature { key }),
            None => Err(SignatureError::NotTrusted { keys: seen }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> NarInfo {
        NarInfo::parse(
            "StorePath: /nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1\n\
             URL: nar/x.nar.xz\n\
             Compression: xz\n\
             NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
             NarSize: 120\n\
             References: 3n58xw4373jp0ljirf06d8077j15pc4j-glibc-2.37-8\n",
        )
        .unwrap()
    }

    #[test]
    fn key_round_trip_and_errors() {
        let sk = SecretKey::from_seed("cache-1", [3; 32]);
        let pk = sk.public_key();
        assert_eq!(PublicKey::parse(&pk.to_string()).unwrap(), pk);
        let sk2 = SecretKey::parse(&sk.to_nix_string()).unwrap();
        assert_eq!(sk2.public_key(), pk);
        assert!(!format!("{sk:?}").contains(&sk.to_nix_string()[8..]));

        for (k, why) in [
            ("nocolon", "expected name:base64"),
            (":AAAA", "expected name:base64"),
            ("k:!!!", "not valid base64"),
            ("k:AAAA", "not 32 bytes"),
        ] {
            let e = PublicKey::parse(k).unwrap_err();
            assert_eq!(e.to_string(), format!("bad key {k:?}: {why}"));
        }
        let e = SecretKey::parse("k:AAAA").unwrap_err().to_string();
        assert_eq!(e, "bad secret key \"k\": not 64 bytes");
        assert!(Signature::parse("k:AAAA").is_err());
        let sig = sk.sign(b"x");
        assert_eq!(Signature::parse(&sig.to_string()).unwrap(), sig);
    }

    #[test]
    fn verify_accepts_and_distinguishes_failures() {
        let sk = SecretKey::from_seed("cache-1", [1; 32]);
        let other = SecretKey::from_seed("acceptance-1", [2; 32]);
        let trusted = TrustedKeys::from_strs([sk.public_key().to_string()]).unwrap();

        let mut ni = info();
        assert_eq!(
            trusted.verify(&ni).unwrap_err().to_string(),
            "signature not trusted (no signatures)"
        );
        other.sign_narinfo(&mut ni);
        assert_eq!(
            trusted.verify(&ni).unwrap_err().to_string(),
            "signature not trusted (keys: acceptance-1)"
        );
        sk.sign_narinfo(&mut ni);
        assert_eq!(trusted.verify(&ni).unwrap().name, "cache-1");

        // Tampering with any signed field breaks it.
        let mut t = ni.clone();
        t.nar_size += 1;
        assert_eq!(
            trusted.verify(&t).unwrap_err(),
            SignatureError::BadSignature {
                key: "cache-1".into()
            }
        );
        assert_eq!(
            trusted.verify(&t).unwrap_err().to_string(),
            "bad signature by key cache-1"
        );
        let mut t = ni.clone();
        t.references.clear();
        assert!(matches!(
            trusted.verify(&t),
            Err(SignatureError::BadSignature { .. })
        ));
        // Unsigned fields (URL, compression) may change.
        let mut t = ni.clone();
        t.url = "nar/y.nar.zst".into();
        assert!(trusted.verify(&t).is_ok());

        // Same name, different key.
        let impostor = SecretKey::from_seed("cache-1", [9; 32]);
        let mut t = info();
        impostor.sign_narinfo(&mut t);
        assert_eq!(
            trusted.verify(&t).unwrap_err().to_string(),
            "bad signature by key cache-1"
        );
        // A malformed sig by a trusted name is a bad signature, and a good one later still wins.
        let mut t = info();
        t.sigs.push("cache-1:garbage".into());
        assert!(matches!(
            trusted.verify(&t),
            Err(SignatureError::BadSignature { .. })
        ));
        sk.sign_narinfo(&mut t);
        assert!(trusted.verify(&t).is_ok());
    }
}
