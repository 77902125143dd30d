//! What `nix.dev/environment` names: `ORG/APP`, `ORG/APP@N` or `/nix/store/HASH-NAME`.

use std::fmt;
use std::str::FromStr;

use crate::nix::StorePath;

/// Longest ORG or APP (`[a-z0-9][a-z0-9._-]{0,62}`).
pub const MAX_NAME_PART_LEN: usize = 63;

/// A parsed `nix.dev/environment` value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// `org/app` (the catalog's current generation) or `org/app@N`.
    Environment {
        /// The environment's name.
        name: EnvName,
        /// `Some(N)` for `@N`, `None` for the current generation.
        generation: Option<u64>,
    },
    /// A store path; no catalog involved.
    StorePath(StorePath),
}

/// `org/app`, both parts checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnvName {
    org: String,
    app: String,
}

/// Why a value is not a reference. `Display` quotes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid environment reference {value:?}: {reason}")]
    Invalid { value: String, reason: String },
    #[error("invalid environment name {value:?}: {reason}")]
    InvalidName { value: String, reason: String },
}

fn invalid(value: &str, reason: impl Into<String>) -> ReferenceError {
    ReferenceError::Invalid {
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Checks an ORG or APP part: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn check_name_part(part: &str) -> Result<(), String> {
    let mut bytes = part.bytes();
    match bytes.next() {
        None => return Err("empty part".into()),
        Some(c) if !(c.is_ascii_lowercase() || c.is_ascii_digit()) => {
            return Err(format!(
                "{part:?} must start with a lowercase letter or a digit"
            ))
        }
        Some(_) => {}
    }
    if part.len() > MAX_NAME_PART_LEN {
        return Err(format!(
            "{:?}… is longer than {MAX_NAME_PART_LEN} characters",
            part.chars().take(16).collect::<String>()
        ));
    }
    if let Some(c) = part
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{part:?} contains {c:?} (allowed: a-z, 0-9, '.', '_', '-')"
        ));
    }
    Ok(())
}

impl EnvName {
    /// An environment name from its parts, checked.
    pub fn new(org: &str, app: &str) -> Result<Self, ReferenceError> {
        let value = format!("{org}/{app}");
        let bad = |r: String| ReferenceError::InvalidName {
            value: value.clone(),
            reason: r,
        };
        check_name_part(org).map_err(bad)?;
        check_name_part(app).map_err(bad)?;
        Ok(EnvName {
            org: org.to_owned(),
            app: app.to_owned(),
        })
    }

    /// The organisation.
    pub fn org(&self) -> &str {
        &self.org
    }

    /// The application.
    pub fn app(&self) -> &str {
        &self.app
    }
}

impl fmt::Display for EnvName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.org, self.app)
    }
}

impl FromStr for EnvName {
    type Err = ReferenceError;
    /// Parses `org/app` (no generation).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (org, app) = s
            .split_once('/')
            .ok_or_else(|| ReferenceError::InvalidName {
                value: s.to_owned(),
                reason: "expected ORG/APP".into(),
            })?;
        if app.contains('/') {
            return Err(ReferenceError::InvalidName {
                value: s.to_owned(),
                reason: "expected ORG/APP with exactly one '/'".into(),
            });
        }
        EnvName::new(org, app)
    }
}

impl serde::Serialize for EnvName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for EnvName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a generation number: a positive decimal integer, no sign, no leading zero.
pub fn parse_generation(s: &str) -> Result<u64, String> {
    if s.is_empty() {
        return Err("empty generation after '@'".into());
    }
    if !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("generation {s:?} is not a positive integer"));
    }
    if s.starts_with('0') {
        return Err(format!(
            "generation {s:?} must be a positive integer without leading zeros"
        ));
    }
    s.parse::<u64>()
        .map_err(|_| format!("generation {s:?} is too large"))
}

impl Reference {
    /// The environment name, for catalog references.
    pub fn env_name(&self) -> Option<&EnvName> {
        match self {
            Reference::Environment { name, .. } => Some(name),
            Reference::StorePath(_) => None,
        }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(c) = s.chars().find(|c| c.is_control()) {
            return Err(invalid(s, format!("contains the control character {c:?}")));
        }
        if s.starts_with('/') {
            return StorePath::from_absolute_path(s)
                .map(Reference::StorePath)
                .map_err(|e| match e {
                    crate::nix::store_path::StorePathError::Invalid { reason, .. } => {
                        invalid(s, format!("not a store path: {reason}"))
                    }
                });
        }
        if s.is_empty() {
            return Err(invalid(s, "empty value"));
        }
        let (name, generation) = match s.split_once('@') {
            Some((name, g)) => (name, Some(parse_generation(g).map_err(|r| invalid(s, r))?)),
            None => (s, None),
        };
        let parts: Vec<&str> = name.split('/').collect();
        if parts.len() != 2 {
            return Err(invalid(
                s,
                "expected ORG/APP, ORG/APP@GENERATION or /nix/store/HASH-NAME",
            ));
        }
        for part in &parts {
            check_name_part(part).map_err(|r| invalid(s, r))?;
        }
        Ok(Reference::Environment {
            name: EnvName {
                org: parts[0].to_owned(),
                app: parts[1].to_owned(),
            },
            generation,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Environment {
                name,
                generation: Some(n),
            } => write!(f, "{name}@{n}"),
            Reference::Environment {
                name,
                generation: None,
            } => write!(f, "{name}"),
            Reference::StorePath(p) => write!(f, "{p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SP: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1";

    #[test]
    fn parses_valid_references() {
        let r: Reference = "acme/echoserver".parse().unwrap();
        assert_eq!(
            r,
            Reference::Environment {
                name: EnvName::new("acme", "echoserver").unwrap(),
                generation: None
            }
        );
        assert_eq!(r.to_string(), "acme/echoserver");

        let r: Reference = "acme/echo-server_1.2@7".parse().unwrap();
        match &r {
            Reference::Environment { name, generation } => {
                assert_eq!(name.org(), "acme");
                assert_eq!(name.app(), "echo-server_1.2");
                assert_eq!(*generation, Some(7));
            }
            _ => panic!("{r:?}"),
        }
        assert_eq!(r.to_string(), "acme/echo-server_1.2@7");

        let r: Reference = SP.parse().unwrap();
        assert_eq!(r, Reference::StorePath(SP.parse().unwrap()));
        assert_eq!(r.to_string(), SP);
        assert!(r.env_name().is_none());

        let long = "a".repeat(63);
        assert!(format!("{long}/{long}@18446744073709551615")
            .parse::<Reference>()
            .is_ok());
        assert!("0/9".parse::<Reference>().is_ok());
        assert!("a.b/c..d".parse::<Reference>().is_ok());
    }

    #[test]
    fn rejects_everything_else_quoting_the_value() {
        let long = "a".repeat(64);
        let cases = [
            ("", "empty"),
            ("acme", "expected ORG/APP"),
            ("Acme/app", "lowercase"),
            ("acme/App", "must start"),
            ("acme/aPp", "contains 'P'"),
            ("acme/..", "must start"),
            ("../app", "must start"),
            ("acme/.app", "must start"),
            ("/acme/app", "not a store path"),
            ("acme//app", "expected ORG/APP"),
            ("acme/app/x", "expected ORG/APP"),
            ("acme/", "empty part"),
            ("/app", "not a store path"),
            ("acme/app@", "empty generation"),
            ("acme/app@0", "leading zeros"),
            ("acme/app@007", "leading zeros"),
            ("acme/app@-1", "not a positive integer"),
            ("acme/app@+1", "not a positive integer"),
            ("acme/app@1.0", "not a positive integer"),
            ("acme/app@1@2", "not a positive integer"),
            ("acme/app@99999999999999999999", "too large"),
            ("acme/app\n", "control character"),
            ("acme/a\u{7f}pp", "control character"),
            ("acme/a pp", "contains ' '"),
            ("acme/aäpp", "contains 'ä'"),
            ("acme/app ", "contains ' '"),
            ("/nix/store/xyz-hello", "not a store path"),
            (
                "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello/bin",
                "not a store path",
            ),
            (
                "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello@2",
                "not a store path",
            ),
        ];
        for (value, why) in cases {
            let e = value.parse::<Reference>().unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("invalid environment reference {value:?}: ")),
                "{value:?}: {e}"
            );
            assert!(e.contains(why), "{value:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = format!("{long}/app")
            .parse::<Reference>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than 63"), "{e}");
        let e = format!("acme/{long}@2")
            .parse::<Reference>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than 63"), "{e}");
    }

    #[test]
    fn env_name_round_trips_and_serialises_as_string() {
        let n: EnvName = "acme/echoserver".parse().unwrap();
        assert_eq!(n.to_string(), "acme/echoserver");
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"acme/echoserver\"");
        assert_eq!(
            serde_json::from_str::<EnvName>("\"acme/echoserver\"").unwrap(),
            n
        );
        assert!(serde_json::from_str::<EnvName>("\"acme/Echo\"").is_err());
        assert!("acme/echo@2".parse::<EnvName>().is_err());
        assert!("acme/a/b".parse::<EnvName>().is_err());
        let e = "ACME/x".parse::<EnvName>().unwrap_err().to_string();
        assert!(
            e.starts_with("invalid environment name \"ACME/x\": "),
            "{e}"
        );
    }
}
