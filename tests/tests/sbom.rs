//! End-to-end test of `nixenv sbom`: an environment served over HTTP (catalog and cache) is
//! written as SPDX 2.3 and CycloneDX 1.6 JSON, each validated against the official JSON schema
//! (vendored in `tests/schemas`) by the Python `jsonschema` package, and compared with what the
//! cache says: every closure path with its NarHash and references, the lock's generation.
//! What a container ran (`--container`) is checked in `shim.rs`, on a real container.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nixenv_testkit::fixtures::store_path_base;
use nixenv_testkit::{Cache, Fixtures, ServedNode};

/// The validator's version, pinned so a release cannot change what the test accepts.
const JSONSCHEMA: &str = "jsonschema==4.23.0";

/// `validate.py SCHEMA_DIR FORMAT DOC`: exits 0 if DOC is valid, else prints every error.
const VALIDATE: &str = r#"
import json, sys
from pathlib import Path
from jsonschema import Draft7Validator
from referencing import Registry, Resource
schemas, kind, doc = Path(sys.argv[1]), sys.argv[2], json.load(open(sys.argv[3]))
if kind == "spdx":
    schema = json.load(open(schemas / "spdx-2.3.schema.json"))
    registry = Registry()
else:
    load = lambda name: json.load(open(schemas / "cyclonedx" / name))
    schema = load("bom-1.6.schema.json")
    registry = Registry().with_resources(
        (s["$id"], Resource.from_contents(s))
        for s in (load("spdx.schema.json"), load("jsf-0.82.schema.json"))
    )
Draft7Validator.check_schema(schema)
errors = list(Draft7Validator(schema, registry=registry).iter_errors(doc))
for e in errors:
    print(f"{list(e.absolute_path)}: {e.message}")
sys.exit(1 if errors else 0)
"#;

/// `python3` with the pinned [`JSONSCHEMA`].
fn python_with_jsonschema() -> PathBuf {
    nixenv_testkit::python::venv_with(Path::new(env!("CARGO_TARGET_TMPDIR")), JSONSCHEMA)
}

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

/// Validates `doc` (`spdx` or `cyclonedx`) against its official schema; panics with the errors.
pub fn assert_valid(python: &Path, kind: &str, doc: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("doc.json");
    std::fs::write(&file, doc).unwrap();
    let out = Command::new(python)
        .args(["-c", VALIDATE])
        .arg(schemas_dir())
        .arg(kind)
        .arg(&file)
        .output()
        .expect("run the validator");
    assert!(
        out.status.success(),
        "the {kind} schema refuses the document:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(doc)
    );
}

fn run(served: &ServedNode, args: &[&str]) -> Output {
    served
        .node
        .nixenv(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nixenv")
}

fn ok(served: &ServedNode, args: &[&str]) -> serde_json::Value {
    let out = run(served, args);
    assert!(
        out.status.success(),
        "nixenv {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// The cache's view of a closure: store path → (NarHash as hex SHA-256, references).
fn from_cache(fx: &Fixtures, closure: &[String]) -> BTreeMap<String, (String, BTreeSet<String>)> {
    closure
        .iter()
        .map(|p| {
            let n = fx.narinfo(Cache::Xz, p);
            let hex = nar_sha256(fx, &n.url);
            let refs = n
                .references
                .iter()
                .filter(|r| r.as_str() != store_path_base(p))
                .map(|r| format!("/nix/store/{r}"))
                .collect();
            (p.clone(), (hex, refs))
        })
        .collect()
}

/// SHA-256 of the NAR the cache serves for a path, as hex: what its NarHash must say.
fn nar_sha256(fx: &Fixtures, url: &str) -> String {
    let nar = fx.cache(Cache::Xz).join(url);
    let out = Command::new("sh")
        .args(["-c", "xz -dc \"$1\" | sha256sum", "sh"])
        .arg(&nar)
        .output()
        .expect("run xz and sha256sum");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// The generation and top-level paths of `acme/echoserver`'s current lock.
fn current_lock(fx: &Fixtures) -> (u64, Vec<String>) {
    let lock: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fx.catalog.join("acme/echoserver/current.json")).unwrap(),
    )
    .unwrap();
    let paths = lock["systems"][fx.system.as_str()]["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    (lock["generation"].as_u64().unwrap(), paths)
}

#[test]
fn sbom_of_an_environment_is_valid_spdx_and_cyclonedx_and_matches_the_cache() {
    let python = python_with_jsonschema();
    let fx = Fixtures::get();
    let served = ServedNode::new(Cache::Xz);
    let closure = fx.echoserver_closure();
    let want = from_cache(fx, closure);
    let (generation, lock_paths) = current_lock(fx);

    // SPDX, on a node that has nothing yet: the closure is pulled first.
    let out = run(
        &served,
        &["sbom", "acme/echoserver", "--format", "spdx-json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_valid(&python, "spdx", &out.stdout);
    let spdx: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(spdx["spdxVersion"], "SPDX-2.3");
    let packages = spdx["packages"].as_array().unwrap();
    let environment = &packages[0];
    assert_eq!(environment["name"], "acme/echoserver");
    assert_eq!(environment["versionInfo"], generation.to_string());
    let mut ids = BTreeMap::new();
    let mut got = BTreeMap::new();
    for p in &packages[1..] {
        let path = p["packageFileName"].as_str().unwrap().to_owned();
        assert_eq!(p["checksums"][0]["algorithm"], "SHA256");
        let hex = p["checksums"][0]["checksumValue"]
            .as_str()
            .unwrap()
            .to_owned();
        ids.insert(p["SPDXID"].as_str().unwrap().to_owned(), path.clone());
        got.insert(path, (hex, BTreeSet::new()));
    }
    let env_id = environment["SPDXID"].as_str().unwrap();
    let mut roots = Vec::new();
    for r in spdx["relationships"].as_array().unwrap() {
        let (from, kind, to) = (
            r["spdxElementId"].as_str().unwrap(),
            r["relationshipType"].as_str().unwrap(),
            r["relatedSpdxElement"].as_str().unwrap(),
        );
        match (from, kind) {
            ("SPDXRef-DOCUMENT", "DESCRIBES") => assert_eq!(to, env_id),
            (f, "DEPENDS_ON") if f == env_id => roots.push(ids[to].clone()),
            (f, "DEPENDS_ON") => {
                got.get_mut(&ids[f]).unwrap().1.insert(ids[to].clone());
            }
            other => panic!("unexpected relationship {other:?}"),
        }
    }
    assert_eq!(got, want, "every closure path, its NarHash and references");
    assert_eq!(roots, lock_paths, "the lock's top-level paths, in order");
    let echoserver = packages
        .iter()
        .find(|p| p["packageFileName"] == fx.echoserver.as_str())
        .unwrap();
    assert_eq!(
        (&echoserver["name"], &echoserver["versionInfo"]),
        (
            &serde_json::json!("echoserver"),
            &serde_json::json!("0.1.0")
        )
    );

    // CycloneDX, into a file, from the now warm node (no request to the cache).
    let before = served.caches.total_requests();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("echoserver.cdx.json");
    let out = run(
        &served,
        &[
            "sbom",
            "acme/echoserver",
            "-f",
            "cyclonedx-json",
            "-o",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert_eq!(
        served.caches.total_requests(),
        before,
        "warm: nothing fetched"
    );
    assert_eq!(
        nixenv_testkit::list_dir(dir.path()),
        vec!["echoserver.cdx.json"]
    );
    let bytes = std::fs::read(&file).unwrap();
    assert_valid(&python, "cyclonedx", &bytes);
    let cdx: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(cdx["bomFormat"], "CycloneDX");
    assert_eq!(cdx["specVersion"], "1.6");
    assert_eq!(cdx["version"], generation, "the lock's generation");
    let env_ref = cdx["metadata"]["component"]["bom-ref"].as_str().unwrap();
    let mut got = BTreeMap::new();
    for c in cdx["components"].as_array().unwrap() {
        assert_eq!(c["hashes"][0]["alg"], "SHA-256");
        got.insert(
            c["bom-ref"].as_str().unwrap().to_owned(),
            (
                c["hashes"][0]["content"].as_str().unwrap().to_owned(),
                BTreeSet::new(),
            ),
        );
    }
    for d in cdx["dependencies"].as_array().unwrap() {
        let on: BTreeSet<String> = d["dependsOn"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        match d["ref"].as_str().unwrap() {
            r if r == env_ref => assert_eq!(on, lock_paths.iter().cloned().collect()),
            r => got.get_mut(r).unwrap().1 = on,
        }
    }
    assert_eq!(got, want);

    // A store path reference: no catalog, no generation (CycloneDX version 1).
    let cdx = ok(
        &served,
        &["sbom", &fx.busybox, "--format", "cyclonedx-json"],
    );
    assert_eq!(cdx["version"], 1);
    let refs: Vec<&str> = cdx["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["bom-ref"].as_str().unwrap())
        .collect();
    assert_eq!(refs, fx.closure(&fx.busybox));
}

#[test]
fn sbom_failures_are_one_line_and_write_nothing() {
    let fx = Fixtures::get();
    let served = ServedNode::new(Cache::Xz);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.json");
    let file_s = file.to_str().unwrap();
    let missing = fx.missing_path();
    let cases: [(&[&str], String); 5] = [
        (
            &["sbom", "acme/echoserver", "--format", "xml"],
            "nixenv: --format: unknown sbom format \"xml\" (known: spdx-json, cyclonedx-json)"
                .to_owned(),
        ),
        (
            &["sbom", "--container", "nope", "-o", file_s],
            "nixenv: container nope: no record: nixenv prepared no container of that id on this node (or it went more than 30 days ago)".to_owned(),
        ),
        (
            &["sbom", "--container", "a/b"],
            "nixenv: container a/b: invalid container id \"a/b\": allowed characters are A-Z, a-z, 0-9, '_', '+', '.', '-'".to_owned(),
        ),
        (
            &["sbom", "acme/echoserver@999", "-o", file_s],
            "nixenv: acme/echoserver@999: generation 999 of acme/echoserver not found in catalog"
                .to_owned(),
        ),
        (
            &["sbom", missing, "-o", file_s],
            format!("nixenv: {missing}: "),
        ),
    ];
    for (args, want) in cases {
        let out = run(&served, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with(&want), "{args:?}: {err}");
        assert!(out.stdout.is_empty());
        assert!(nixenv_testkit::list_dir(dir.path()).is_empty(), "{args:?}");
    }
    assert!(
        served.node.leftovers().is_empty(),
        "{:?}",
        served.node.leftovers()
    );
}
