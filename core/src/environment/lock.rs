//! The lock: what a generation of an environment is, per Nix system.
//!
//! ```json
//! {"schema": 1, "name": "acme/echoserver", "generation": 2,
//!  "systems": {"x86_64-linux": {"paths": ["/nix/store/…-echoserver-0.1.0"],
//!                               "env": {"ECHO_MESSAGE": "hello from nix"}}}}
//! ```
//!
//! Unknown fields are ignored; a higher `schema` is an error. `env` keeps the lock's order and
//! may not set `PATH` or any `NIXENV_*` name ([`reserved_env`]).

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::reference::EnvName;
use crate::nix::StorePath;

/// The lock schema this version reads and writes.
pub const LOCK_SCHEMA: u64 = 1;

/// Variables a lock may not set besides [`RESERVED_ENV_PREFIX`]: nixenv computes them.
pub const RESERVED_ENV: &[&str] = &["PATH"];

/// Names starting with this are nixenv's own (`NIXENV_CONFIG`, `NIXENV_ENVIRONMENT`,
/// `NIXENV_GENERATION`, and any it adds later): no lock may set one.
pub const RESERVED_ENV_PREFIX: &str = "NIXENV_";

/// Why a lock may not set `name`, if it is reserved ([`RESERVED_ENV`], [`RESERVED_ENV_PREFIX`]).
pub fn reserved_env(name: &str) -> Option<&'static str> {
    if name.starts_with(RESERVED_ENV_PREFIX) {
        Some("NIXENV_* names belong to nixenv")
    } else if RESERVED_ENV.contains(&name) {
        Some("nixenv builds it from the lock's paths")
    } else {
        None
    }
}

/// A generation's lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// [`LOCK_SCHEMA`].
    pub schema: u64,
    /// `org/app`.
    pub name: EnvName,
    /// The generation number (positive).
    pub generation: u64,
    /// Per Nix system (`x86_64-linux`, …).
    pub systems: BTreeMap<String, SystemLock>,
}

/// One system's part of a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemLock {
    /// The top-level store paths, in order: PATH is built in this order.
    pub paths: Vec<StorePath>,
    /// Environment variables, in the lock's order.
    #[serde(default)]
    pub env: EnvVars,
}

/// An ordered list of `NAME=value` pairs, (de)serialised as a JSON object in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnvVars(pub Vec<(String, String)>);

impl EnvVars {
    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// Iterates in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
    /// Whether no variable is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for EnvVars {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for EnvVars {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = EnvVars;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of string values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EnvVars, A::Error> {
                let mut out: Vec<(String, String)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if out.iter().any(|(seen, _)| *seen == k) {
                        return Err(serde::de::Error::custom(format!(
                            "env variable {k:?} is set twice"
                        )));
                    }
                    out.push((k, v));
                }
                Ok(EnvVars(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Why a lock cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    #[error("not valid JSON: {message}")]
    Json { message: String },
    #[error("no \"schema\" field")]
    MissingSchema,
    #[error("lock schema {found} is newer than this nixenv understands (schema {LOCK_SCHEMA}); upgrade nixenv")]
    UnsupportedSchema { found: u64 },
    #[error("not a valid lock: {message}")]
    Invalid { message: String },
    #[error("generation must be a positive integer, not 0")]
    ZeroGeneration,
    #[error("{name} has no {system} (it has: {available})")]
    NoSystem {
        name: EnvName,
        system: String,
        available: String,
    },
    #[error("{system}: no store paths")]
    NoPaths { system: String },
    #[error("{system}: {path} is listed twice")]
    DuplicatePath { system: String, path: StorePath },
    #[error("{system}: invalid env variable name {name:?}: {reason}")]
    BadEnvName {
        system: String,
        name: String,
        reason: &'static str,
    },
    #[error("{system}: env variable {name} is reserved: {reason}")]
    ReservedEnvName {
        system: String,
        name: String,
        reason: &'static str,
    },
    #[error("{system}: env variable {name} has a value containing NUL")]
    BadEnvValue { system: String, name: String },
}

/// Checks an environment variable name as Kubernetes does: `[-._a-zA-Z][-._a-zA-Z0-9]*`,
/// and not reserved ([`reserved_env`]).
pub fn check_env_name(name: &str) -> Result<(), &'static str> {
    let mut bytes = name.bytes();
    match bytes.next() {
        None => return Err("empty"),
        Some(c) if c.is_ascii_digit() => return Err("starts with a digit"),
        _ => {}
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
    {
        return Err("allowed characters are A-Z, a-z, 0-9, '-', '.', '_'");
    }
    match reserved_env(name) {
        Some(_) => Err("reserved for nixenv"),
        None => Ok(()),
    }
}

/// Checks an environment variable value (no NUL).
pub fn check_env_value(value: &str) -> Result<(), &'static str> {
    if value.contains('\0') {
        return Err("contains NUL");
    }
    Ok(())
}

/// Checks one system's paths and env.
pub fn validate_system(system: &str, s: &SystemLock) -> Result<(), LockError> {
    if s.paths.is_empty() {
        return Err(LockError::NoPaths {
            system: system.to_owned(),
        });
    }
    let mut seen = HashSet::new();
    for p in &s.paths {
        if !seen.insert(p) {
            return Err(LockError::DuplicatePath {
                system: system.to_owned(),
                path: p.clone(),
            });
        }
    }
    for (k, v) in s.env.iter() {
        if let Some(reason) = reserved_env(k) {
            return Err(LockError::ReservedEnvName {
                system: system.to_owned(),
                name: k.to_owned(),
                reason,
            });
        }
        check_env_name(k).map_err(|reason| LockError::BadEnvName {
            system: system.to_owned(),
            name: k.to_owned(),
            reason,
        })?;
        check_env_value(v).map_err(|_| LockError::BadEnvValue {
            system: system.to_owned(),
            name: k.to_owned(),
        })?;
    }
    Ok(())
}

fn one_line(e: &serde_json::Error) -> String {
    e.to_string().replace('\n', " ")
}

impl Lock {
    /// A new schema-1 lock.
    pub fn new(name: EnvName, generation: u64, systems: BTreeMap<String, SystemLock>) -> Self {
        Lock {
            schema: LOCK_SCHEMA,
            name,
            generation,
            systems,
        }
    }

    /// Parses and validates lock JSON.
    pub fn parse(bytes: &[u8]) -> Result<Lock, LockError> {
        // The schema first, so a newer lock says so instead of failing on its new layout.
        // Only `schema` is kept: a tree of the whole document (every path a `Value`) would
        // cost several times the lock's size. A document this cannot read is parsed again as
        // a tree, for the precise error.
        #[derive(serde::Deserialize)]
        struct Schema {
            // `Some(Null)` for `"schema": null`, `None` only when absent.
            #[serde(default, deserialize_with = "present")]
            schema: Option<serde_json::Value>,
        }
        fn present<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<serde_json::Value>, D::Error> {
            serde_json::Value::deserialize(d).map(Some)
        }
        // serde reads a struct from an array too: only an object takes the short way.
        let object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let peeked = object.then(|| serde_json::from_slice::<Schema>(bytes));
        let schema = match peeked {
            Some(Ok(peek)) => peek.schema,
            _ => {
                let value: serde_json::Value =
                    serde_json::from_slice(bytes).map_err(|e| LockError::Json {
                        message: one_line(&e),
                    })?;
                let object = value.as_object().ok_or_else(|| LockError::Invalid {
                    message: "expected a JSON object".into(),
                })?;
                object.get("schema").cloned()
            }
        };
        match schema.as_ref() {
            None => return Err(LockError::MissingSchema),
            Some(v) => match v.as_u64() {
                Some(n) if n > LOCK_SCHEMA => {
                    return Err(LockError::UnsupportedSchema { found: n })
                }
                Some(n) if n == LOCK_SCHEMA => {}
                _ => {
                    return Err(LockError::Invalid {
                        message: format!("\"schema\" must be {LOCK_SCHEMA}, not {v}"),
                    })
                }
            },
        }
        let lock: Lock = serde_json::from_slice(bytes).map_err(|e| LockError::Invalid {
            message: one_line(&e),
        })?;
        lock.validate()?;
        Ok(lock)
    }

    /// Checks the generation and every system.
    pub fn validate(&self) -> Result<(), LockError> {
        if self.schema != LOCK_SCHEMA {
            return Err(LockError::UnsupportedSchema { found: self.schema });
        }
        if self.generation == 0 {
            return Err(LockError::ZeroGeneration);
        }
        for (system, s) in &self.systems {
            validate_system(system, s)?;
        }
        Ok(())
    }

    /// The part for `system`, or the error listing the systems the lock has.
    pub fn for_system(&self, system: &str) -> Result<&SystemLock, LockError> {
        self.systems.get(system).ok_or_else(|| LockError::NoSystem {
            name: self.name.clone(),
            system: system.to_owned(),
            available: if self.systems.is_empty() {
                "none".to_owned()
            } else {
                self.systems.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        })
    }

    /// Pretty JSON, with a trailing newline.
    pub fn to_json_pretty(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a lock always serialises");
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-echoserver-0.1.0";
    const B: &str = "/nix/store/0c5dz6xgk7qd8s4w6djl1j46f8pbdjrs-busybox-1.35.0";

    fn lock_json(extra: &str) -> String {
        format!(
            r#"{{"schema": 1, "name": "acme/echoserver", "generation": 2, {extra}
               "systems": {{"x86_64-linux": {{"paths": ["{A}", "{B}"],
                 "env": {{"ZED": "last", "ECHO_MESSAGE": "hello from nix", "A_B": "x=y"}}}},
                 "aarch64-linux": {{"paths": ["{B}"]}}}}}}"#
        )
    }

    #[test]
    fn parses_keeping_order_and_ignoring_unknown_fields() {
        let lock = Lock::parse(lock_json(r#""comment": {"x": [1]}, "#).as_bytes()).unwrap();
        assert_eq!(lock.name.to_string(), "acme/echoserver");
        assert_eq!(lock.generation, 2);
        let x = lock.for_system("x86_64-linux").unwrap();
        assert_eq!(
            x.paths.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            [A, B]
        );
        let keys: Vec<&str> = x.env.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["ZED", "ECHO_MESSAGE", "A_B"]);
        assert_eq!(x.env.get("A_B"), Some("x=y"));
        assert!(lock.for_system("aarch64-linux").unwrap().env.is_empty());
        // Round trip keeps the order too.
        let again = Lock::parse(&lock.to_json_pretty()).unwrap();
        assert_eq!(again, lock);
    }

    #[test]
    fn missing_system_lists_the_others() {
        let lock = Lock::parse(lock_json("").as_bytes()).unwrap();
        let e = lock.for_system("riscv64-linux").unwrap_err().to_string();
        assert_eq!(
            e,
            "acme/echoserver has no riscv64-linux (it has: aarch64-linux, x86_64-linux)"
        );
        let mut only = lock.clone();
        only.systems.remove("x86_64-linux");
        assert_eq!(
            only.for_system("x86_64-linux").unwrap_err().to_string(),
            "acme/echoserver has no x86_64-linux (it has: aarch64-linux)"
        );
    }

    #[test]
    fn schema_checks() {
        let two = lock_json("").replace("\"schema\": 1", "\"schema\": 2");
        assert_eq!(
            Lock::parse(two.as_bytes()).unwrap_err(),
            LockError::UnsupportedSchema { found: 2 }
        );
        // A schema-2 lock with a different layout still says "schema 2".
        let e = Lock::parse(br#"{"schema": 2, "systems": [1,2]}"#).unwrap_err();
        assert!(e.to_string().contains("lock schema 2 is newer"), "{e}");
        assert_eq!(
            Lock::parse(br#"{"name": "a/b"}"#).unwrap_err(),
            LockError::MissingSchema
        );
        for bad in [r#""1""#, "0", "-1", "1.5", "null"] {
            let j = lock_json("").replace("\"schema\": 1", &format!("\"schema\": {bad}"));
            let e = Lock::parse(j.as_bytes()).unwrap_err().to_string();
            assert!(e.contains("\"schema\" must be 1"), "{bad}: {e}");
        }
    }

    #[test]
    fn malformed_locks_are_refused() {
        let cases: Vec<(String, &str)> = vec![
            ("{".into(), "not valid JSON"),
            ("[1]".into(), "expected a JSON object"),
            (
                lock_json("").replace("acme/echoserver", "Acme/x"),
                "invalid environment name",
            ),
            (
                lock_json("").replace(A, "/nix/store/abc-x"),
                "is not a store path",
            ),
            (
                lock_json("").replace("\"generation\": 2", "\"generation\": 0"),
                "not 0",
            ),
            (
                lock_json("").replace("\"generation\": 2", "\"generation\": -2"),
                "not a valid lock",
            ),
            (
                lock_json("").replace("\"generation\": 2,", ""),
                "missing field `generation`",
            ),
            (lock_json("").replace(B, A), "is listed twice"),
            (
                lock_json("").replace("ZED", "Z=D"),
                "invalid env variable name \"Z=D\"",
            ),
            (
                lock_json("").replace("ZED", "PATH"),
                "x86_64-linux: env variable PATH is reserved: nixenv builds it from the lock's paths",
            ),
            (
                lock_json("").replace("ZED", "NIXENV_CONFIG"),
                "x86_64-linux: env variable NIXENV_CONFIG is reserved: NIXENV_* names belong to nixenv",
            ),
            (
                lock_json("").replace("ZED", "NIXENV_GENERATION"),
                "env variable NIXENV_GENERATION is reserved",
            ),
            (lock_json("").replace("ZED", ""), "empty"),
            (lock_json("").replace("ZED", "1X"), "digit"),
            (lock_json("").replace("\"last\"", "\"a\\u0000b\""), "NUL"),
            (lock_json("").replace("\"last\"", "3"), "not a valid lock"),
            (
                lock_json("").replace("\"ZED\"", "\"ECHO_MESSAGE\""),
                "set twice",
            ),
            (
                lock_json("").replace(&format!("[\"{B}\"]"), "[]"),
                "aarch64-linux: no store paths",
            ),
        ];
        for (json, why) in cases {
            let e = Lock::parse(json.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
