//! End-to-end test of `nixenv metrics`: real pulls from a cache served over HTTP, a failing
//! pull, a gc, then the output read by Prometheus' own Python text parser
//! (`prometheus_client`, installed from PyPI into a venv under the target directory).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nixenv_testkit::fixtures::store_path_hash;
use nixenv_testkit::{Cache, CacheServer, Fixtures, TestNode};

/// The parser's version, pinned so a release cannot change what the test accepts.
const PROMETHEUS_CLIENT: &str = "prometheus_client==0.21.1";

/// Reads exposition text on stdin, prints `[family, type, sample, labels, value]` per sample.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        out.append([f.name, f.type, s.name, s.labels, s.value])
json.dump(out, sys.stdout)
"#;

/// `python3` with the pinned [`PROMETHEUS_CLIENT`].
fn python_with_parser() -> PathBuf {
    nixenv_testkit::python::venv_with(Path::new(env!("CARGO_TARGET_TMPDIR")), PROMETHEUS_CLIENT)
}

/// A parsed exposition: value per `sample{labels}` (labels sorted), and type per family.
#[derive(Debug)]
struct Parsed {
    values: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Parsed {
    fn get(&self, key: &str) -> f64 {
        *self
            .values
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in {:#?}", self.values))
    }
}

/// What the parser prints per sample: family, type, sample name, labels, value.
type ParsedSample = (String, String, String, BTreeMap<String, String>, f64);

fn parse(python: &Path, text: &[u8]) -> Parsed {
    let mut child = Command::new(python)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the parser");
    child.stdin.take().unwrap().write_all(text).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused:\n{}\n{}",
        String::from_utf8_lossy(text),
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<ParsedSample> = serde_json::from_slice(&out.stdout).unwrap();
    let mut parsed = Parsed {
        values: BTreeMap::new(),
        types: BTreeMap::new(),
    };
    for (family, kind, name, labels, value) in samples {
        parsed.types.insert(family, kind);
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let key = if labels.is_empty() {
            name
        } else {
            format!("{name}{{{}}}", labels.join(","))
        };
        assert!(
            parsed.values.insert(key.clone(), value).is_none(),
            "{key} twice"
        );
    }
    parsed
}

fn run(node: &TestNode, args: &[&str]) -> Output {
    node.nixenv(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nixenv")
}

fn metrics(node: &TestNode, python: &Path) -> Parsed {
    let out = run(node, &["metrics"]);
    assert!(
        out.status.success(),
        "nixenv metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(python, &out.stdout)
}

/// `FileSize` of each narinfo of `paths` in `cache`, summed: the bytes a pull downloads.
fn file_sizes(cache: &Path, paths: &[String]) -> u64 {
    paths
        .iter()
        .map(|p| {
            let narinfo =
                std::fs::read_to_string(cache.join(format!("{}.narinfo", store_path_hash(p))))
                    .unwrap();
            narinfo
                .lines()
                .find_map(|l| l.strip_prefix("FileSize: "))
                .expect("FileSize")
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

#[test]
fn metrics_count_pulls_failures_hits_and_gc_and_prometheus_parses_them() {
    let python = python_with_parser();
    let fx = Fixtures::get();
    let server = CacheServer::serve(fx.cache(Cache::Xz));
    let node = TestNode::new()
        .trusting(&fx.trusted_key.public)
        .substituter(&server.url());
    let closure = fx.echoserver_closure();
    let n = closure.len() as f64;

    // Nothing happened yet: every counter at zero, failure causes included.
    let m = metrics(&node, &python);
    assert_eq!(m.get("nixenv_pulls_total"), 0.0);
    assert_eq!(m.get("nixenv_pull_failures_total{cause=not_found}"), 0.0);
    assert_eq!(m.get("nixenv_store_paths"), 0.0);

    // A cold pull, a warm one (no fetch: only hits), a pull of a path no cache has.
    assert!(run(&node, &["pull", &fx.echoserver]).status.success());
    assert!(run(&node, &["pull", &fx.echoserver]).status.success());
    let missing = "/nix/store/00000000000000000000000000000000-missing";
    let failed = run(&node, &["pull", missing]);
    assert!(!failed.status.success());

    let m = metrics(&node, &python);
    assert_eq!(m.types["nixenv_pulls"], "counter");
    assert_eq!(m.types["nixenv_pull_duration_seconds"], "histogram");
    assert_eq!(m.types["nixenv_store_size_bytes"], "gauge");
    assert_eq!(
        m.get("nixenv_pulls_total"),
        2.0,
        "the warm pull fetched nothing"
    );
    assert_eq!(m.get("nixenv_pull_failures_total{cause=not_found}"), 1.0);
    assert_eq!(m.get("nixenv_pull_failures_total{cause=network}"), 0.0);
    assert_eq!(
        m.get("nixenv_pull_downloaded_bytes_total"),
        file_sizes(fx.cache(Cache::Xz), closure) as f64,
        "each NAR downloaded once"
    );
    assert_eq!(m.get("nixenv_pull_duration_seconds_count"), 2.0);
    assert_eq!(m.get("nixenv_pull_duration_seconds_bucket{le=+Inf}"), 2.0);
    assert!(m.get("nixenv_pull_duration_seconds_sum") > 0.0);
    assert_eq!(m.get("nixenv_store_path_fetches_total"), n);
    assert_eq!(m.get("nixenv_store_path_hits_total"), n, "the warm pull");
    assert_eq!(m.get("nixenv_store_paths"), n);
    let store_bytes = m.get("nixenv_store_size_bytes");
    assert!(store_bytes > 0.0);
    assert_eq!(m.get("nixenv_gc_runs_total"), 0.0);
    assert_eq!(m.get("nixenv_pins"), 0.0);
    assert_eq!(m.get("nixenv_prepare_duration_seconds_count"), 0.0);

    // gc: no container runs, so the whole closure goes; a dry run is not a run.
    assert!(run(&node, &["gc", "--dry-run"]).status.success());
    assert!(run(&node, &["gc"]).status.success());
    let m = metrics(&node, &python);
    assert_eq!(m.get("nixenv_gc_runs_total"), 1.0);
    assert_eq!(m.get("nixenv_gc_removed_paths_total"), n);
    assert_eq!(m.get("nixenv_gc_freed_bytes_total"), store_bytes);
    assert_eq!(m.get("nixenv_store_paths"), 0.0);
    assert_eq!(m.get("nixenv_store_size_bytes"), 0.0);
    assert_eq!(m.get("nixenv_pulls_total"), 2.0);

    // --textfile: the same metrics, in a file node-exporter's collector reads, nothing else
    // left in its directory.
    let dir = tempfile::tempdir().unwrap();
    let textfile = dir.path().join("nixenv.prom");
    let out = run(
        &node,
        &["metrics", "--textfile", textfile.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let from_file = parse(&python, &std::fs::read(&textfile).unwrap());
    assert_eq!(from_file.values, m.values);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["nixenv.prom"]);
}
