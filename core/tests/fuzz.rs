//! Property-based fuzzing of the formats nixenv reads from caches, catalogs and pod specs:
//! the narinfo parser, the NAR reader, the lock and catalog parsers, and `nix.dev/environment`
//! references. Properties: no input makes a parser panic, and where a renderer exists,
//! parse(render(x)) == x.
//!
//! CI runs each target with 1,000 cases (well under a second each). `NIXENV_FUZZ_CASES` raises
//! the count, e.g. for about an hour on two cores (see README, "Fuzzing"):
//!
//! ```text
//! NIXENV_FUZZ_CASES=6000000 cargo test -p nixenv-core --test fuzz -- --test-threads 1
//! ```

use nixenv_core::environment::catalog::check_lock;
use nixenv_core::environment::{EnvName, Lock, Reference};
use nixenv_core::nix::nar::{read_tree, NarNode};
use nixenv_core::nix::{narinfo, NarInfo, NarLimits};
use proptest::prelude::*;
use url::Url;

/// Cases per target: `NIXENV_FUZZ_CASES`, default 1,000.
fn config() -> ProptestConfig {
    let cases = std::env::var("NIXENV_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const GOLDEN_NARINFO: &str = include_str!("data/golden-tree.narinfo");
const GOLDEN_REF_NARINFO: &str = include_str!("data/golden-ref.narinfo");
const GOLDEN_NAR: &[u8] = include_bytes!("data/golden-tree.nar");

/// A golden text or bytes with a few random edits: replaced, inserted or removed spans.
fn mutated(golden: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = golden.len();
    prop::collection::vec(
        (
            0..len.max(1),
            0usize..3,
            prop::collection::vec(any::<u8>(), 0..8),
        ),
        0..6,
    )
    .prop_map(move |edits| {
        let mut v = golden.clone();
        for (at, kind, bytes) in edits {
            let at = at.min(v.len());
            match kind {
                0 => {
                    let end = (at + bytes.len()).min(v.len());
                    v.splice(at..end, bytes);
                }
                1 => {
                    v.splice(at..at, bytes);
                }
                _ => {
                    let end = (at + bytes.len()).min(v.len());
                    v.drain(at..end);
                }
            }
        }
        v
    })
}

/// Lines of narinfo-ish text: known keys with golden-like or random values.
fn narinfo_lines() -> impl Strategy<Value = String> {
    let mut keys = narinfo::FIELDS.to_vec();
    keys.extend(["Sig", "Other", ""]);
    let key = prop::sample::select(keys);
    let golden_values: Vec<String> = GOLDEN_NARINFO
        .lines()
        .chain(GOLDEN_REF_NARINFO.lines())
        .filter_map(|l| l.split_once(": ").map(|(_, v)| v.to_owned()))
        .collect();
    let value = prop_oneof![
        prop::sample::select(golden_values),
        "\\PC{0,40}",
        "[0-9]{0,25}",
        "sha256:[0-9a-z]{0,60}",
    ];
    prop::collection::vec((key, value), 0..14).prop_map(|lines| {
        lines
            .into_iter()
            .map(|(k, v)| format!("{k}: {v}\n"))
            .collect()
    })
}

fn check_narinfo(text: &str) {
    if let Ok(info) = NarInfo::parse(text) {
        let rendered = info.render();
        assert_eq!(NarInfo::parse(&rendered).as_ref(), Ok(&info), "{rendered}");
        let _ = info.fingerprint();
    }
}

/// An entry name a NAR may hold.
fn nar_name() -> impl Strategy<Value = Vec<u8>> {
    "[a-zA-Z0-9._+-]{1,12}"
        .prop_filter("not . or ..", |n| n != "." && n != "..")
        .prop_map(String::into_bytes)
}

/// A valid NAR tree: sorted, unique names.
fn nar_node() -> impl Strategy<Value = NarNode> {
    let leaf = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64).prop_map(NarNode::file),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(NarNode::executable),
        prop::collection::vec(1u8..=255, 1..32).prop_map(NarNode::symlink),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop::collection::btree_map(nar_name(), inner, 0..6)
            .prop_map(|entries| NarNode::Directory(entries.into_iter().collect()))
    })
}

fn lock_json() -> impl Strategy<Value = String> {
    let path = "[0-9a-df-np-sv-z]{32}-[a-z0-9.+-]{1,20}".prop_map(|p| format!("/nix/store/{p}"));
    let env = prop::collection::vec(("[A-Z_][A-Z0-9_]{0,10}", "\\PC{0,20}"), 0..4);
    (
        prop_oneof![Just(1u64), 0u64..4],
        "[a-z0-9][a-z0-9._-]{0,8}/[a-z0-9][a-z0-9._-]{0,8}",
        prop_oneof![1u64..1000, Just(0), Just(u64::MAX)],
        prop::sample::select(vec!["x86_64-linux", "aarch64-linux", "", "weird"]),
        prop::collection::vec(path, 0..5),
        env,
    )
        .prop_map(|(schema, name, generation, system, paths, env)| {
            let env: serde_json::Map<String, serde_json::Value> =
                env.into_iter().map(|(k, v)| (k, v.into())).collect();
            serde_json::json!({
                "schema": schema, "name": name, "generation": generation,
                "systems": {system: {"paths": paths, "env": env}},
                "unknown": [1, {"x": null}],
            })
            .to_string()
        })
}

fn check_lock_bytes(bytes: &[u8]) {
    if let Ok(lock) = Lock::parse(bytes) {
        let rendered = lock.to_json_pretty();
        assert_eq!(Lock::parse(&rendered).as_ref(), Ok(&lock));
        // The catalog's check of the same bytes agrees on the lock.
        let url = Url::parse("https://catalog.example/acme/app/current.json").unwrap();
        let checked = check_lock(&url, bytes, &lock.name, Some(lock.generation)).unwrap();
        assert_eq!(checked, lock);
    }
    let url = Url::parse("file:///srv/catalog/acme/app/generations/3.json").unwrap();
    let name: EnvName = "acme/app".parse().unwrap();
    let _ = check_lock(&url, bytes, &name, Some(3));
    let _ = check_lock(&url, bytes, &name, None);
}

fn check_reference(s: &str) {
    if let Ok(r) = s.parse::<Reference>() {
        let shown = r.to_string();
        assert_eq!(shown.parse::<Reference>().ok(), Some(r), "{shown}");
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn narinfo_arbitrary_text(text in "\\PC{0,400}") {
        check_narinfo(&text);
    }

    #[test]
    fn narinfo_key_value_lines(text in narinfo_lines()) {
        check_narinfo(&text);
    }

    #[test]
    fn narinfo_mutated_golden(bytes in mutated(GOLDEN_NARINFO.as_bytes().to_vec())) {
        check_narinfo(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn nar_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_tree(&bytes[..], &NarLimits::default());
    }

    #[test]
    fn nar_mutated_golden(bytes in mutated(GOLDEN_NAR.to_vec())) {
        let _ = read_tree(&bytes[..], &NarLimits::default());
    }

    #[test]
    fn nar_round_trip(node in nar_node()) {
        let nar = node.to_nar();
        prop_assert_eq!(read_tree(&nar[..], &NarLimits::default()).unwrap(), node);
    }

    #[test]
    fn lock_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_lock_bytes(&bytes);
    }

    #[test]
    fn lock_generated_json(json in lock_json()) {
        check_lock_bytes(json.as_bytes());
    }

    #[test]
    fn lock_mutated_json(bytes in lock_json().prop_flat_map(|j| mutated(j.into_bytes()))) {
        check_lock_bytes(&bytes);
    }

    #[test]
    fn reference_arbitrary_text(text in "\\PC{0,80}") {
        check_reference(&text);
    }

    #[test]
    fn reference_shaped_text(
        text in "(/nix/store/[0-9a-z]{32}-[a-z0-9.+_?=-]{0,12}|[a-z0-9._-]{0,12}/[a-z0-9._-]{0,12})(@[0-9+-]{0,22})?"
    ) {
        check_reference(&text);
    }
}
