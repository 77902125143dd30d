//! From a resolved, materialised environment to an OCI runtime spec: pure, no I/O.
//!
//! - With a closure view ([`crate::store::view`], the default): ONE bind mount of the view on
//!   `/nix/store`, `rbind,ro,nosuid,nodev`. The view holds exactly the closure, so the
//!   container sees nothing else there, whatever its image holds, and the mount count does not
//!   grow with the closure.
//! - Without one: a read-only tmpfs on `/nix/store` (`nosuid,nodev,mode=755,ro`), so the
//!   container sees nothing else there and cannot create files under it; runc creates the bind
//!   mountpoints in it before remounting it read-only (checked on runc 1.1); then one bind
//!   mount per closure path: `/nix/store/<base>` from `{store}/<base>`, `rbind,ro,nosuid,nodev`.
//! - Mounts the spec already had at or below `/nix/store` are dropped. In a user-namespaced
//!   spec each bind is idmapped with the container's own mappings ([`super::idmap`]), so the
//!   store appears owned by the container's root.
//! - A variable's value is its last entry in `process.env`, as runc reads it (it sets each
//!   entry in order; CRI-O's specs carry two `PATH` entries, its default first and the image's
//!   later). Every variable the rewrite sets ends with exactly one entry, holding the value it
//!   computed: the last entry is rewritten in place and earlier ones dropped, so no runtime,
//!   hook or `getenv` (which takes the first) can read another value. Other duplicates stay.
//! - `PATH` = `<p>/bin` for each lock path that has a `bin/`, in lock order, then the
//!   container's effective PATH (or [`DEFAULT_PATH`]).
//! - Each lock env entry is added unless the container sets that variable (the pod wins, with
//!   whichever value is its effective one).
//! - `NIXENV_ENVIRONMENT` = the reference as annotated; `NIXENV_GENERATION` = the generation
//!   number, and absent for store-path references.
//! - `process.args` are untouched.
//!
//! Applying the rewrite twice gives the same spec as applying it once.

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{Mount, Spec};

use super::idmap::user_mappings;
use crate::environment::EnvVars;
use crate::nix::{StorePath, STORE_DIR};

/// The PATH used when the container has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Names the environment the container runs (the annotation's value).
pub const ENV_ENVIRONMENT: &str = "NIXENV_ENVIRONMENT";
/// The generation the container runs; absent for store-path references.
pub const ENV_GENERATION: &str = "NIXENV_GENERATION";
/// Options of each closure bind mount.
pub const BIND_OPTIONS: [&str; 4] = ["rbind", "ro", "nosuid", "nodev"];
/// Options of the tmpfs under the closure.
pub const STORE_TMPFS_OPTIONS: [&str; 4] = ["nosuid", "nodev", "mode=755", "ro"];

/// A resolved and materialised environment, as the rewrite needs it.
#[derive(Debug, Clone, Copy)]
pub struct Environment<'a> {
    /// The reference as annotated (`acme/echoserver`, `acme/echoserver@2`, `/nix/store/…`).
    pub reference: &'a str,
    /// The generation, for catalog references.
    pub generation: Option<u64>,
    /// The lock's top-level paths, in lock order (PATH order).
    pub paths: &'a [StorePath],
    /// The lock's env, in lock order.
    pub env: &'a EnvVars,
    /// Every path of the closure (each gets a bind mount when there is no view).
    pub closure: &'a [StorePath],
    /// The closure's view, mounted on `/nix/store` instead of one bind per path.
    pub view: Option<&'a Path>,
}

/// Whether `path` is `/nix/store` or below it (component-wise, so `/nix/storex` is not).
pub fn is_under_store(path: &Path) -> bool {
    let norm: PathBuf = path
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    norm.starts_with(STORE_DIR)
}

fn bind(source: PathBuf, destination: PathBuf) -> Mount {
    let mut m = Mount::default();
    m.set_destination(destination)
        .set_typ(Some("bind".into()))
        .set_source(Some(source))
        .set_options(Some(BIND_OPTIONS.iter().map(|s| s.to_string()).collect()));
    m
}

/// The mounts the rewrite adds, in order: the view's one bind, or the per-path binds.
pub fn store_mounts(env: &Environment<'_>, store_dir: &Path) -> Vec<Mount> {
    match env.view {
        Some(view) => vec![bind(view.to_owned(), PathBuf::from(STORE_DIR))],
        None => closure_mounts(env.closure, store_dir),
    }
}

/// The per-path mounts: a read-only tmpfs, then one bind per closure path.
pub fn closure_mounts(closure: &[StorePath], store_dir: &Path) -> Vec<Mount> {
    let mut out = Vec::with_capacity(closure.len() + 1);
    let mut tmpfs = Mount::default();
    tmpfs
        .set_destination(PathBuf::from(STORE_DIR))
        .set_typ(Some("tmpfs".into()))
        .set_source(Some(PathBuf::from("tmpfs")))
        .set_options(Some(
            STORE_TMPFS_OPTIONS.iter().map(|s| s.to_string()).collect(),
        ));
    out.push(tmpfs);
    let mut sorted: Vec<&StorePath> = closure.iter().collect();
    sorted.sort();
    sorted.dedup();
    for p in sorted {
        out.push(bind(
            store_dir.join(p.base_name()),
            PathBuf::from(p.to_absolute_path()),
        ));
    }
    out
}

/// One variable the rewrite set in the process environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvChange {
    /// The variable.
    pub name: String,
    /// Its value before the rewrite, if the container set it.
    pub before: Option<String>,
    /// Its value after.
    pub after: String,
}

fn entry(kv: &str) -> (&str, &str) {
    kv.split_once('=').unwrap_or((kv, ""))
}

/// The value a process started from `env` (`KEY=VALUE` entries) gets for `name`: its last
/// entry's, as runc sets each entry in order.
pub fn effective<'a>(env: &'a [String], name: &str) -> Option<&'a str> {
    env.iter()
        .map(|kv| entry(kv))
        .rfind(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Makes `name=value` the one entry of `name`: the last entry is rewritten in place and the
/// earlier ones dropped, or the entry is appended.
fn set_one(env: &mut Vec<String>, name: &str, value: &str) {
    let kv = format!("{name}={value}");
    match env.iter().rposition(|e| entry(e).0 == name) {
        Some(last) => {
            env[last] = kv;
            let mut i = 0;
            env.retain(|e| {
                let keep = i >= last || entry(e).0 != name;
                i += 1;
                keep
            });
        }
        None => env.push(kv),
    }
}

/// The variables whose effective value (see [`effective`]) differs from `before` to `after`
/// (`KEY=VALUE` entries), in the order of their effective entries in `after`: what [`rewrite`]
/// changed, for runtimes that must give execs the same changes.
pub fn env_changes(before: &[String], after: &[String]) -> Vec<EnvChange> {
    after
        .iter()
        .enumerate()
        .map(|(i, kv)| (i, entry(kv)))
        .filter(|(i, (name, _))| !after[i + 1..].iter().any(|kv| entry(kv).0 == *name))
        .filter_map(|(_, (name, value))| {
            let old = effective(before, name);
            (old != Some(value)).then(|| EnvChange {
                name: name.to_owned(),
                before: old.map(str::to_owned),
                after: value.to_owned(),
            })
        })
        .collect()
}

/// The new PATH value: our bin directories, then `existing` (or [`DEFAULT_PATH`]) without them.
pub fn compose_path(bins: &[String], existing: Option<&str>) -> String {
    let rest: Vec<&str> = existing
        .unwrap_or(DEFAULT_PATH)
        .split(':')
        .filter(|e| !bins.iter().any(|b| b == e))
        .collect();
    let mut parts: Vec<&str> = bins.iter().map(String::as_str).collect();
    if !(rest.len() == 1 && rest[0].is_empty()) {
        parts.extend(rest);
    }
    parts.join(":")
}

/// Rewrites `spec` to run `env` from the node store at `store_dir` (`{state-dir}/store`).
/// `has_bin` says whether a store path has a `bin/` directory.
pub fn rewrite(
    spec: &mut Spec,
    env: &Environment<'_>,
    store_dir: &Path,
    has_bin: impl Fn(&StorePath) -> bool,
) {
    let mut mounts: Vec<Mount> = spec
        .mounts()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| !is_under_store(m.destination()))
        .collect();
    let mut ours = store_mounts(env, store_dir);
    if let Some(mappings) = user_mappings(spec) {
        ours.iter_mut()
            .filter(|m| m.typ().as_deref() == Some("bind"))
            .for_each(|m| mappings.idmap(m));
    }
    mounts.extend(ours);
    spec.set_mounts(Some(mounts));

    let Some(process) = spec.process_mut().as_mut() else {
        // No process (nothing will run): mounts only.
        return;
    };
    let mut vars: Vec<String> = process.env().clone().unwrap_or_default();

    let bins: Vec<String> = env
        .paths
        .iter()
        .filter(|p| has_bin(p))
        .map(|p| format!("{}/bin", p.to_absolute_path()))
        .collect();
    let new_path = compose_path(&bins, effective(&vars, "PATH"));
    set_one(&mut vars, "PATH", &new_path);

    for (k, v) in env.env.iter() {
        if effective(&vars, k).is_none() {
            vars.push(format!("{k}={v}"));
        }
    }

    vars.retain(|e| entry(e).0 != ENV_ENVIRONMENT && entry(e).0 != ENV_GENERATION);
    vars.push(format!("{ENV_ENVIRONMENT}={}", env.reference));
    if let Some(g) = env.generation {
        vars.push(format!("{ENV_GENERATION}={g}"));
    }
    process.set_env(Some(vars));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_changes_are_the_variables_whose_value_differs() {
        let v = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let changes = env_changes(
            &v(&["PATH=/usr/bin:/bin", "A=1", "KEEP=x"]),
            &v(&[
                "PATH=/nix/store/e/bin:/usr/bin:/bin",
                "A=1",
                "KEEP=x",
                "ECHO_MESSAGE=hi",
            ]),
        );
        assert_eq!(
            changes,
            vec![
                EnvChange {
                    name: "PATH".into(),
                    before: Some("/usr/bin:/bin".into()),
                    after: "/nix/store/e/bin:/usr/bin:/bin".into(),
                },
                EnvChange {
                    name: "ECHO_MESSAGE".into(),
                    before: None,
                    after: "hi".into(),
                },
            ]
        );
    }
    use oci_spec::runtime::{ProcessBuilder, SpecBuilder};

    const A: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-echoserver-0.1.0";
    const B: &str = "/nix/store/0c5dz6xgk7qd8s4w6djl1j46f8pbdjrs-busybox-1.35.0";
    const C: &str = "/nix/store/1b5dz6xgk7qd8s4w6djl1j46f8pbdjrs-glibc-2.37";
    const D: &str = "/nix/store/2b5dz6xgk7qd8s4w6djl1j46f8pbdjrs-data";

    fn sp(s: &str) -> StorePath {
        s.parse().unwrap()
    }

    fn spec(env: &[&str]) -> Spec {
        let mut s = Spec::default();
        let mut mounts = s.mounts().clone().unwrap();
        let mut old = Mount::default();
        old.set_destination("/nix/store/old".into())
            .set_typ(Some("bind".into()))
            .set_source(Some("/somewhere".into()));
        mounts.push(old);
        let mut old_root = Mount::default();
        old_root
            .set_destination("/nix//store/".into())
            .set_typ(Some("bind".into()));
        mounts.push(old_root);
        let mut keep = Mount::default();
        keep.set_destination("/nix/storage".into());
        mounts.push(keep);
        s.set_mounts(Some(mounts));
        let p = ProcessBuilder::default()
            .args(vec![
                "echoserver".to_string(),
                "--port".into(),
                "8080".into(),
            ])
            .env(env.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .build()
            .unwrap();
        s.set_process(Some(p));
        s
    }

    fn envvars(pairs: &[(&str, &str)]) -> EnvVars {
        EnvVars(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn apply(s: &mut Spec, reference: &str, generation: Option<u64>, env: &EnvVars) {
        apply_with_view(s, reference, generation, env, None)
    }

    fn apply_with_view(
        s: &mut Spec,
        reference: &str,
        generation: Option<u64>,
        env: &EnvVars,
        view: Option<&Path>,
    ) {
        let paths = [sp(A), sp(D), sp(B)];
        let closure = [sp(C), sp(B), sp(A), sp(D), sp(A)];
        let e = Environment {
            reference,
            generation,
            paths: &paths,
            env,
            closure: &closure,
            view,
        };
        rewrite(s, &e, Path::new("/var/lib/nixenv/store"), |p| {
            p.name() != "data"
        });
    }

    fn env_of(s: &Spec) -> Vec<String> {
        s.process().as_ref().unwrap().env().clone().unwrap()
    }

    #[test]
    fn mounts_the_closure_read_only_over_an_empty_store() {
        let mut s = spec(&[]);
        let before: Vec<Mount> = Spec::default().mounts().clone().unwrap();
        apply(&mut s, "acme/echoserver", Some(2), &EnvVars::default());
        let mounts = s.mounts().clone().unwrap();
        // Defaults kept in order, /nix/store mounts dropped, unrelated /nix/storage kept.
        assert_eq!(&mounts[..before.len()], &before[..]);
        assert_eq!(
            mounts[before.len()].destination(),
            Path::new("/nix/storage")
        );
        let ours = &mounts[before.len() + 1..];
        let j = serde_json::to_value(ours).unwrap();
        let base = |p: &str| p.trim_start_matches("/nix/store/").to_owned();
        let bind = |p: &str| {
            serde_json::json!({"destination": p, "type": "bind",
                "source": format!("/var/lib/nixenv/store/{}", base(p)),
                "options": ["rbind", "ro", "nosuid", "nodev"]})
        };
        assert_eq!(
            j,
            serde_json::json!([
                {"destination": "/nix/store", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "nodev", "mode=755", "ro"]},
                bind(B), bind(C), bind(D), bind(A),
            ])
        );
        assert_eq!(
            s.process().as_ref().unwrap().args().clone().unwrap(),
            ["echoserver", "--port", "8080"]
        );
    }

    #[test]
    fn a_view_is_one_read_only_bind_on_the_store_whatever_the_closure() {
        let mut s = spec(&[]);
        let before: Vec<Mount> = Spec::default().mounts().clone().unwrap();
        let view = Path::new("/var/lib/nixenv/views/b/k");
        let apply_view = |s: &mut Spec| {
            apply_with_view(
                s,
                "acme/echoserver",
                Some(2),
                &EnvVars::default(),
                Some(view),
            )
        };
        apply_view(&mut s);
        let mounts = s.mounts().clone().unwrap();
        assert_eq!(&mounts[..before.len()], &before[..]);
        let ours = &mounts[before.len() + 1..];
        assert_eq!(
            serde_json::to_value(ours).unwrap(),
            serde_json::json!([{"destination": "/nix/store", "type": "bind",
                "source": "/var/lib/nixenv/views/b/k",
                "options": ["rbind", "ro", "nosuid", "nodev"]}])
        );
        // Applying it twice gives the same spec.
        let once = s.clone();
        apply_view(&mut s);
        assert_eq!(s, once);
    }

    #[test]
    fn in_a_user_namespace_the_binds_are_idmapped_with_the_containers_mappings() {
        use oci_spec::runtime::{LinuxIdMappingBuilder, LinuxNamespaceBuilder, LinuxNamespaceType};
        let map = |c: u32, h: u32, n: u32| {
            LinuxIdMappingBuilder::default()
                .container_id(c)
                .host_id(h)
                .size(n)
                .build()
                .unwrap()
        };
        let mut s = spec(&[]);
        let linux = s.linux_mut().as_mut().unwrap();
        let mut namespaces = linux.namespaces().clone().unwrap();
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .path("/run/userns/pod")
                .build()
                .unwrap(),
        );
        linux
            .set_namespaces(Some(namespaces))
            .set_uid_mappings(Some(vec![map(0, 65536, 65536)]))
            .set_gid_mappings(Some(vec![map(0, 65536, 65536)]));
        let defaults = s.mounts().clone().unwrap();
        apply(&mut s, "acme/echoserver", Some(2), &EnvVars::default());
        let mounts = s.mounts().clone().unwrap();
        let tmpfs_at = mounts
            .iter()
            .position(|m| m.destination() == Path::new(STORE_DIR))
            .unwrap();
        // The spec's other mounts (containerd's) are left alone.
        assert!(mounts[..tmpfs_at]
            .iter()
            .all(|m| m.uid_mappings().is_none() && defaults.contains(m)));
        let j = serde_json::to_value(&mounts[tmpfs_at..]).unwrap();
        let ids = serde_json::json!([{"containerID": 0, "hostID": 65536, "size": 65536}]);
        let bind = |p: &str| {
            serde_json::json!({"destination": p, "type": "bind",
                "source": format!("/var/lib/nixenv/store/{}", &p["/nix/store/".len()..]),
                "options": ["rbind", "ro", "nosuid", "nodev", "ridmap"],
                "uidMappings": ids, "gidMappings": ids})
        };
        assert_eq!(
            j,
            serde_json::json!([
                {"destination": "/nix/store", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "nodev", "mode=755", "ro"]},
                bind(B), bind(C), bind(D), bind(A),
            ])
        );
        let mut twice = s.clone();
        apply(&mut twice, "acme/echoserver", Some(2), &EnvVars::default());
        assert_eq!(s, twice, "idempotent");
    }

    #[test]
    fn path_order_only_bins_and_existing_path_kept() {
        let mut s = spec(&["HOME=/root", "PATH=/custom/bin:/bin"]);
        apply(&mut s, "acme/echoserver", Some(2), &EnvVars::default());
        let env = env_of(&s);
        assert_eq!(env[0], "HOME=/root");
        assert_eq!(env[1], format!("PATH={A}/bin:{B}/bin:/custom/bin:/bin"));

        let mut s = spec(&["HOME=/root"]);
        apply(&mut s, "acme/echoserver", Some(2), &EnvVars::default());
        assert!(env_of(&s).contains(&format!("PATH={A}/bin:{B}/bin:{DEFAULT_PATH}")));
    }

    #[test]
    fn pod_env_wins_and_lock_env_in_order() {
        let lock_env = envvars(&[
            ("ECHO_MESSAGE", "hello from nix"),
            ("ZZ", "1"),
            ("MODE", "lock"),
        ]);
        let mut s = spec(&["MODE=pod", "NIXENV_GENERATION=99"]);
        apply(&mut s, "acme/echoserver@2", Some(2), &lock_env);
        assert_eq!(
            env_of(&s),
            [
                "MODE=pod".to_string(),
                format!("PATH={A}/bin:{B}/bin:{DEFAULT_PATH}"),
                "ECHO_MESSAGE=hello from nix".into(),
                "ZZ=1".into(),
                "NIXENV_ENVIRONMENT=acme/echoserver@2".into(),
                "NIXENV_GENERATION=2".into(),
            ]
        );
    }

    #[test]
    fn store_path_reference_has_no_generation() {
        let mut s = spec(&["NIXENV_GENERATION=5"]);
        apply(&mut s, A, None, &EnvVars::default());
        let env = env_of(&s);
        assert!(env.contains(&format!("NIXENV_ENVIRONMENT={A}")));
        assert!(
            !env.iter().any(|e| e.starts_with("NIXENV_GENERATION")),
            "{env:?}"
        );
    }

    #[test]
    fn idempotent() {
        let lock_env = envvars(&[("ECHO_MESSAGE", "hi")]);
        let mut once = spec(&["PATH=/bin"]);
        apply(&mut once, "acme/echoserver", Some(3), &lock_env);
        let mut twice = once.clone();
        apply(&mut twice, "acme/echoserver", Some(3), &lock_env);
        assert_eq!(once, twice);
    }

    #[test]
    fn without_process_only_mounts() {
        let mut s = SpecBuilder::default().build().unwrap();
        s.set_process(None);
        apply(&mut s, "acme/echoserver", Some(3), &EnvVars::default());
        assert!(s.process().is_none());
        assert!(s
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.destination() == Path::new(A)));
    }

    /// CRI-O's shape: its default PATH first, the image's env (its own PATH) later, then the
    /// pod's; here also a lock variable set twice by the container and an unrelated duplicate.
    const CRIO_ENV: [&str; 9] = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "TERM=xterm",
        "HOSTNAME=echoserver",
        "DUP=1",
        "PATH=/image/bin:/usr/bin",
        "MODE=image",
        "DUP=2",
        "MODE=pod",
        "NIXENV_GENERATION=7",
    ];

    #[test]
    fn crio_shaped_env_gets_one_path_composed_from_the_last_entry() {
        let lock_env = envvars(&[("ECHO_MESSAGE", "hello from nix"), ("MODE", "lock")]);
        let mut s = spec(&CRIO_ENV);
        apply(&mut s, "acme/echoserver", Some(2), &lock_env);
        let after = env_of(&s);
        assert_eq!(
            after,
            [
                "TERM=xterm".to_string(),
                "HOSTNAME=echoserver".into(),
                "DUP=1".into(),
                format!("PATH={A}/bin:{B}/bin:/image/bin:/usr/bin"),
                "MODE=image".into(),
                "DUP=2".into(),
                "MODE=pod".into(),
                "ECHO_MESSAGE=hello from nix".into(),
                "NIXENV_ENVIRONMENT=acme/echoserver".into(),
                "NIXENV_GENERATION=2".into(),
            ]
        );
        // What runc runs with: our PATH, the pod's MODE, the unrelated duplicate's last value.
        assert_eq!(
            effective(&after, "PATH"),
            Some(format!("{A}/bin:{B}/bin:/image/bin:/usr/bin").as_str())
        );
        assert_eq!(effective(&after, "MODE"), Some("pod"));
        assert_eq!(effective(&after, "DUP"), Some("2"));

        // The changes name the values that were effective before.
        let before: Vec<String> = CRIO_ENV.iter().map(|s| s.to_string()).collect();
        let change = |name: &str, before: Option<&str>, after: &str| EnvChange {
            name: name.into(),
            before: before.map(Into::into),
            after: after.into(),
        };
        assert_eq!(
            env_changes(&before, &after),
            [
                change(
                    "PATH",
                    Some("/image/bin:/usr/bin"),
                    &format!("{A}/bin:{B}/bin:/image/bin:/usr/bin")
                ),
                change("ECHO_MESSAGE", None, "hello from nix"),
                change("NIXENV_ENVIRONMENT", None, "acme/echoserver"),
                change("NIXENV_GENERATION", Some("7"), "2"),
            ]
        );

        let mut twice = s.clone();
        apply(&mut twice, "acme/echoserver", Some(2), &lock_env);
        assert_eq!(s, twice, "idempotent on CRI-O's shape too");
    }

    #[test]
    fn env_changes_compare_effective_values() {
        let v = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Unrelated duplicates left as they were are no change.
        assert_eq!(
            env_changes(&v(&["X=1", "X=2", "Y=a"]), &v(&["X=1", "X=2", "Y=a"])),
            []
        );
        // Collapsing duplicates to their effective value is no change either.
        assert_eq!(env_changes(&v(&["X=1", "X=2"]), &v(&["X=2"])), []);
        // A duplicate whose last entry changed is, from the value that was effective.
        assert_eq!(
            env_changes(&v(&["X=1", "X=2"]), &v(&["X=2", "X=3"])),
            [EnvChange {
                name: "X".into(),
                before: Some("2".into()),
                after: "3".into(),
            }]
        );
        assert_eq!(effective(&v(&["X=1", "Y", "X=2"]), "Y"), Some(""));
        assert_eq!(effective(&v(&["X=1"]), "Z"), None);
    }

    #[test]
    fn set_one_keeps_the_last_position_and_drops_earlier_entries() {
        let v = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut env = v(&["P=1", "A=x", "P=2", "B=y", "P=3", "C=z"]);
        set_one(&mut env, "P", "new");
        assert_eq!(env, v(&["A=x", "B=y", "P=new", "C=z"]));
        let mut env = v(&["A=x"]);
        set_one(&mut env, "P", "new");
        assert_eq!(env, v(&["A=x", "P=new"]));
    }

    #[test]
    fn compose_path_edge_cases() {
        let bins = vec!["/nix/store/x/bin".to_string()];
        assert_eq!(compose_path(&bins, Some("")), "/nix/store/x/bin");
        assert_eq!(compose_path(&[], Some("/bin")), "/bin");
        assert_eq!(
            compose_path(&bins, Some("/nix/store/x/bin:/bin")),
            "/nix/store/x/bin:/bin"
        );
        assert!(is_under_store(Path::new("/nix/store")));
        assert!(is_under_store(Path::new("/nix/./store/a")));
        assert!(!is_under_store(Path::new("/nix/storex")));
        assert!(!is_under_store(Path::new("/nix")));
    }
}
