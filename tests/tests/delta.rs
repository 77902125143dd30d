//! End to end: updating an environment from generation N to N+1 when one package changed. The
//! next generation is rebuilt by the host's real Nix (testkit's `generations`), both are
//! published with `nixenv publish`, and the real `nixenv pull` fetches from a real HTTP server
//! on 127.0.0.1 that counts requests and bytes per NAR.

use std::process::Output;

use nixenv_testkit::fixtures::{store_path_base, store_path_hash, Narinfo};
use nixenv_testkit::generations::{Changed, NextGeneration};
use nixenv_testkit::{CacheServer, Fixtures, TestNode};

fn ok(node: &TestNode, args: &[&str]) -> String {
    let out: Output = node.nixenv(args).output().unwrap();
    assert!(
        out.status.success(),
        "nixenv {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn closure_lines(paths: &[String]) -> String {
    paths.iter().map(|p| format!("{p}\n")).collect()
}

/// Pulls generation 1 (the fixtures), then generation 2 (`changed` rebuilt): the update asks
/// for exactly one NAR per new store path, downloads exactly their compressed sizes, asks no
/// narinfo of a path the node has, and leaves both closures in the store.
fn update_fetches_only_the_new_paths(changed: Changed, expected_new: &[&str]) {
    let fx = Fixtures::get();
    let tmp = tempfile::tempdir().unwrap();
    let next = NextGeneration::build(changed, tmp.path());
    let new_paths = next.changed_paths();
    let mut new_names: Vec<&str> = new_paths
        .iter()
        .map(|p| &store_path_base(p)[33..])
        .collect();
    new_names.sort();
    assert_eq!(new_names, expected_new, "what Nix rebuilt");

    let cache_dir = next.write_cache(&tmp.path().join("cache"));
    let server = CacheServer::serve(&cache_dir);
    let catalog = tmp.path().join("catalog");
    let node = TestNode::new()
        .substituter(&server.url())
        .trusting(&fx.trusted_key.public)
        .with_catalog(&format!("file://{}", catalog.display()));
    let cat = catalog.to_str().unwrap();
    assert_eq!(
        ok(
            &node,
            &["publish", "--catalog", cat, "acme/app", &fx.echoserver]
        ),
        "acme/app@1\n"
    );
    assert_eq!(
        ok(
            &node,
            &["publish", "--catalog", cat, "acme/app", &next.echoserver]
        ),
        "acme/app@2\n"
    );

    assert_eq!(
        ok(&node, &["pull", "acme/app@1"]),
        closure_lines(fx.echoserver_closure())
    );
    assert_eq!(server.requests_matching("/nar/*"), 4, "the cold pull");
    server.reset_counts();
    assert_eq!(
        ok(&node, &["pull", "acme/app@2"]),
        closure_lines(&next.closure)
    );

    let narinfo = |p: &String| {
        let file = cache_dir.join(format!("{}.narinfo", store_path_hash(p)));
        Narinfo::parse(&std::fs::read_to_string(file).unwrap())
    };
    let mut expected: Vec<String> = new_paths
        .iter()
        .map(|p| format!("/{}", narinfo(p).url))
        .collect();
    expected.sort();
    assert_eq!(
        server.paths_matching("/nar/*"),
        expected,
        "one request per NAR of a new path"
    );
    let sizes: u64 = new_paths
        .iter()
        .map(|p| {
            std::fs::metadata(cache_dir.join(narinfo(p).url))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(server.bytes_matching("/nar/*"), sizes, "bytes of NARs sent");
    for p in fx.echoserver_closure() {
        if next.closure.contains(p) {
            assert_eq!(
                server.requests(&format!("/{}.narinfo", store_path_hash(p))),
                0,
                "{p} is on the node: nothing asked about it"
            );
        }
    }

    // Both closures are in the node store, nothing else.
    let mut both: Vec<String> = fx
        .echoserver_closure()
        .iter()
        .chain(&next.closure)
        .map(|p| store_path_base(p).to_owned())
        .collect();
    both.sort();
    both.dedup();
    assert_eq!(node.store_entries(), both);
    // And a warm pull of either asks nothing.
    server.reset_counts();
    ok(&node, &["pull", "acme/app@1", "acme/app@2"]);
    assert_eq!(server.total_requests(), 0);
    assert_eq!(server.bytes_matching("*"), 0);
}

#[test]
fn updating_the_app_at_the_top_fetches_its_one_new_path() {
    update_fetches_only_the_new_paths(Changed::Echoserver, &["echoserver-0.1.0"]);
}

#[test]
fn updating_a_dependency_fetches_it_and_its_dependants_only() {
    update_fetches_only_the_new_paths(
        Changed::Data,
        &["echoserver-0.1.0", "echoserver-data-0.1.0"],
    );
}
