//! The protocol between `containerd-shim-nixenv-v2` and its helper, `nixenv-hook`, written
//! once for both sides (`shim/src/helper.rs` runs the helper, `hook/src/shim.rs` is it).
//!
//! The shim runs one helper process per call:
//!
//! ```text
//! nixenv-hook shim-prepare --id ID --bundle DIR --namespace NS --runtime-root DIR
//! nixenv-hook shim-release --id ID
//! nixenv-hook shim-config --id ID
//! ```
//!
//! The helper's standard output is exactly one JSON [`Reply`] line, also on failure. A
//! [`Reply::Failed`] carries the [`FailureKind`] beside the one-line message, so the shim can
//! answer containerd with a code (not found, invalid argument, unavailable) without parsing
//! text; a [`Reply::Rewritten`] carries the environment changes the rewrite made
//! ([`EnvChange`]), so the shim never reads config.json to find them.
//!
//! This crate depends on serde only: the shim links it without linking nixenv's core.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The helper binary's name (looked up next to the shim, then on PATH).
pub const HELPER: &str = "nixenv-hook";
/// The stage that prepares a bundle.
pub const PREPARE_STAGE: &str = "shim-prepare";
/// The stage that drops a container's pin.
pub const RELEASE_STAGE: &str = "shim-release";
/// The stage that says which runc the configuration names.
pub const CONFIG_STAGE: &str = "shim-config";

/// `--id`: the container id (every stage).
pub const ID_FLAG: &str = "--id";
/// `--bundle`: the OCI bundle whose config.json is rewritten (`shim-prepare`).
pub const BUNDLE_FLAG: &str = "--bundle";
/// `--namespace`: the containerd namespace, recorded in the pin (`shim-prepare`).
pub const NAMESPACE_FLAG: &str = "--namespace";
/// `--runtime-root`: runc's state root, recorded in the pin (`shim-prepare`).
pub const RUNTIME_ROOT_FLAG: &str = "--runtime-root";

/// What kind of failure a [`Reply::Failed`] reports: what a caller may do about it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Something the node needs did not answer (catalog, binary cache): trying again later
    /// may succeed.
    Unavailable,
    /// The environment, generation or store path does not exist.
    NotFound,
    /// The request itself is malformed (a bad reference).
    Invalid,
    /// Anything else (the node, its configuration, its store). The default: a reply without
    /// a kind is internal, and internal is not written on the wire.
    #[default]
    Internal,
}

impl FailureKind {
    /// Whether this is [`FailureKind::Internal`] (which the wire leaves out).
    pub fn is_internal(&self) -> bool {
        *self == FailureKind::Internal
    }
}

/// One variable the rewrite set in the container's process environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvChange {
    /// The variable (`PATH`, a lock's `env` entry, `NIXENV_ENVIRONMENT`, …).
    pub name: String,
    /// Its value before the rewrite, if the container set it.
    pub before: Option<String>,
    /// Its value after the rewrite.
    pub after: String,
}

/// Gives an exec's process environment `env` (`KEY=VALUE` entries) the `changes` the rewrite
/// made to the container's, by runc's rule that the last entry of a key is the one a process
/// gets: where that entry still has the value from before the rewrite it takes the new one,
/// where the key is absent the new entry is appended, and where the exec set a value of its
/// own (the last entry differs from `before`) it is kept.
///
/// One rule for every runtime path that builds exec processes from its own copy of the
/// container's spec: the shim for containerd's execs, `nixenv-runc exec` for CRI-O's,
/// podman's and containerd's runc shim in `BinaryName` mode.
pub fn apply_env_changes(changes: &[EnvChange], env: &mut Vec<String>) {
    for change in changes {
        let last = env.iter().rposition(|kv| key_value(kv).0 == change.name);
        let new = format!("{}={}", change.name, change.after);
        match last {
            Some(i) => {
                if change.before.as_deref() == Some(key_value(&env[i]).1) {
                    env[i] = new;
                }
            }
            None => env.push(new),
        }
    }
}

/// A `KEY=VALUE` entry's key and value (no `=`: all key).
fn key_value(kv: &str) -> (&str, &str) {
    kv.split_once('=').unwrap_or((kv, ""))
}

/// The one line the helper writes on standard output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Reply {
    /// Not nixenv's container: config.json is untouched.
    PassThrough {
        /// The configured runc (`runc` in the config), if any.
        runc: Option<PathBuf>,
    },
    /// config.json now mounts the closure, which is pinned for the container.
    Rewritten {
        /// The reference as annotated.
        reference: String,
        /// The catalog generation it resolved to, if any.
        generation: Option<u64>,
        /// How many store paths the closure has.
        paths: usize,
        /// The configured runc, if any.
        runc: Option<PathBuf>,
        /// What the rewrite changed in the process environment, in order.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        env: Vec<EnvChange>,
    },
    /// The container's pin is gone (or never was).
    Released {
        /// The configured runc, if any.
        runc: Option<PathBuf>,
    },
    /// The configuration names this runc (or none).
    Configured {
        /// The configured runc, if any.
        runc: Option<PathBuf>,
    },
    /// Nothing was done.
    Failed {
        /// What kind of failure it is.
        #[serde(default, skip_serializing_if = "FailureKind::is_internal")]
        kind: FailureKind,
        /// nixenv's one-line error, naming the input and the cause (without the `nixenv: `
        /// prefix).
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_carries_its_kind_and_internal_is_the_default() {
        let reply = Reply::Failed {
            kind: FailureKind::NotFound,
            error: "acme/nope: environment acme/nope not found in catalog".into(),
        };
        let line = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            line,
            r#"{"result":"failed","kind":"not-found","error":"acme/nope: environment acme/nope not found in catalog"}"#
        );
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), reply);
        let old: Reply = serde_json::from_str(r#"{"result":"failed","error":"x"}"#).unwrap();
        assert_eq!(
            old,
            Reply::Failed {
                kind: FailureKind::Internal,
                error: "x".into()
            }
        );
        for (kind, wire) in [
            (FailureKind::Unavailable, "\"unavailable\""),
            (FailureKind::Invalid, "\"invalid\""),
            (FailureKind::Internal, "\"internal\""),
        ] {
            assert_eq!(serde_json::to_string(&kind).unwrap(), wire);
        }
    }

    #[test]
    fn a_rewrite_carries_its_env_changes() {
        let reply = Reply::Rewritten {
            reference: "acme/echoserver".into(),
            generation: Some(2),
            paths: 4,
            runc: None,
            env: vec![EnvChange {
                name: "PATH".into(),
                before: Some("/bin".into()),
                after: "/nix/store/a/bin:/bin".into(),
            }],
        };
        let line = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            line,
            r#"{"result":"rewritten","reference":"acme/echoserver","generation":2,"paths":4,"runc":null,"env":[{"name":"PATH","before":"/bin","after":"/nix/store/a/bin:/bin"}]}"#
        );
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), reply);
    }

    fn env(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn change(name: &str, before: Option<&str>, after: &str) -> EnvChange {
        EnvChange {
            name: name.into(),
            before: before.map(Into::into),
            after: after.into(),
        }
    }

    /// What the rewrite of a CRI-O-shaped spec reports: PATH built from the image's (last)
    /// entry, the lock's variable, nixenv's own.
    fn crio_changes() -> Vec<EnvChange> {
        vec![
            change(
                "PATH",
                Some("/image/bin:/bin"),
                "/nix/store/e/bin:/image/bin:/bin",
            ),
            change("ECHO_MESSAGE", None, "hi"),
            change("NIXENV_ENVIRONMENT", None, "acme/echoserver"),
        ]
    }

    #[test]
    fn the_last_entry_of_a_duplicated_key_is_the_one_changed() {
        let mut exec = env(&[
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME=pod",
            "PATH=/image/bin:/bin",
        ]);
        apply_env_changes(&crio_changes(), &mut exec);
        assert_eq!(
            exec,
            env(&[
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOSTNAME=pod",
                "PATH=/nix/store/e/bin:/image/bin:/bin",
                "ECHO_MESSAGE=hi",
                "NIXENV_ENVIRONMENT=acme/echoserver",
            ])
        );
    }

    #[test]
    fn a_variable_the_exec_set_itself_keeps_its_value() {
        // The exec's own PATH comes last (its value is not the container's): kept, even though
        // an earlier entry has the container's value.
        let mut exec = env(&["PATH=/image/bin:/bin", "PATH=/mine", "ECHO_MESSAGE=own"]);
        apply_env_changes(&crio_changes(), &mut exec);
        assert_eq!(
            exec,
            env(&[
                "PATH=/image/bin:/bin",
                "PATH=/mine",
                "ECHO_MESSAGE=own",
                "NIXENV_ENVIRONMENT=acme/echoserver",
            ])
        );
        // An exec that set a variable to the empty string set it too.
        let mut exec = env(&["PATH=/image/bin:/bin", "ECHO_MESSAGE="]);
        apply_env_changes(&crio_changes(), &mut exec);
        assert_eq!(exec[1], "ECHO_MESSAGE=");
    }

    #[test]
    fn absent_variables_are_appended() {
        let mut exec = Vec::new();
        apply_env_changes(&crio_changes(), &mut exec);
        assert_eq!(
            exec,
            env(&[
                "PATH=/nix/store/e/bin:/image/bin:/bin",
                "ECHO_MESSAGE=hi",
                "NIXENV_ENVIRONMENT=acme/echoserver",
            ])
        );
        // No changes, no difference.
        let mut exec = env(&["A=1", "A=2"]);
        apply_env_changes(&[], &mut exec);
        assert_eq!(exec, env(&["A=1", "A=2"]));
    }
}
