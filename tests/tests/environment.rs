//! End to end: environments (references, catalog over HTTP and `file://`, locks, the resolution
//! cache, `nixenv publish`/`ls`/`pull`) and the runtime API (`prepare_bundle` on a real bundle,
//! run by the real runc), against fixture closures built by real Nix and served on 127.0.0.1.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use nixenv_core::config::Config;
use nixenv_core::runtime::{self, Decision, Owner, OwnerKind};
use nixenv_testkit::cache_server::CacheServer;
use nixenv_testkit::fixtures::copy_dir;
use nixenv_testkit::fixtures::{store_path_base, Cache, Fixtures};
use nixenv_testkit::{Fault, ServedNode, TestNode};
use serde_json::Value;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A node using the good xz cache and the fixture catalog, both over HTTP.
fn setup_http() -> ServedNode {
    ServedNode::new(Cache::Xz)
}

fn config_of(node: &TestNode) -> Config {
    let path = node.write_config();
    Config::load_from(&path).unwrap()
}

fn lines(s: &str) -> Vec<String> {
    s.lines().map(str::to_owned).collect()
}

// ---------------------------------------------------------------------------------------------
// The runtime API on real bundles.

/// runc run in a private root, deleted on drop.
struct Runc {
    root: tempfile::TempDir,
    id: String,
}

impl Runc {
    fn new() -> Runc {
        Runc {
            root: tempfile::Builder::new()
                .prefix("nixenv-runc-root-")
                .tempdir()
                .unwrap(),
            id: format!(
                "nixenv-env-{}-{:x}",
                std::process::id(),
                rand::random::<u32>()
            ),
        }
    }

    fn run(&self, bundle: &Path) -> Output {
        Command::new("runc")
            .arg("--root")
            .arg(self.root.path())
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(&self.id)
            .output()
            .unwrap()
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(self.root.path())
            .args(["delete", "--force", &self.id])
            .output();
    }
}

/// A bundle with an empty rootfs and `runc spec`'s config, with our process and annotations.
fn bundle(args: &[&str], env: &[&str], annotations: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("nixenv-bundle-")
        .tempdir()
        .unwrap();
    std::fs::create_dir(dir.path().join("rootfs")).unwrap();
    let out = Command::new("runc")
        .arg("spec")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "runc spec: {}", stderr(&out));
    let path = dir.path().join("config.json");
    let mut spec: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    spec["process"]["terminal"] = Value::Bool(false);
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["env"] = serde_json::json!(env);
    spec["annotations"] = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect::<serde_json::Map<_, _>>()
        .into();
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    dir
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test]
async fn prepare_bundle_rewrites_config_json_and_runc_runs_the_closure() {
    let s = setup_http();
    let cfg = config_of(&s.node);
    let fx = Fixtures::get();
    let script = format!(
        "echo \"message=$ECHO_MESSAGE\"; echo \"path=$PATH\"; echo \"env=$NIXENV_ENVIRONMENT@$NIXENV_GENERATION\"; \
         ls /nix/store; touch /nix/store/new 2>/dev/null || echo store-ro; \
         touch {}/new 2>/dev/null || echo path-ro; {}/bin/data-hello",
        fx.echoserver, fx.data
    );
    let b = bundle(
        &["sh", "-c", &script],
        &["PATH=/usr/bin:/bin", "TERM=xterm"],
        &[("nix.dev/environment", "acme/echoserver")],
    );
    let runc = Runc::new();
    let owner = Owner {
        kind: OwnerKind::RuncWrapper,
        runtime_root: Some(runc.root.path().to_owned()),
        ..Owner::default()
    };
    let decision = runtime::prepare_bundle(&cfg, &runc.id, b.path(), &owner)
        .await
        .unwrap();
    let Decision::Rewritten(prepared) = decision else {
        panic!("not rewritten: {decision:?}")
    };
    assert_eq!(prepared.reference, "acme/echoserver");
    assert_eq!(prepared.generation, Some(2));
    assert_eq!(prepared.closure, fx.echoserver_closure());

    // config.json: the closure's view mounted read-only on /nix/store, PATH and env.
    let spec = read_json(&b.path().join("config.json"));
    let mounts = spec["mounts"].as_array().unwrap();
    let store_mounts: Vec<&Value> = mounts
        .iter()
        .filter(|m| m["destination"].as_str().unwrap().starts_with("/nix/store"))
        .collect();
    assert_eq!(store_mounts.len(), 1, "one mount: {store_mounts:?}");
    let view = Path::new(store_mounts[0]["source"].as_str().unwrap());
    assert!(
        view.starts_with(s.node.state_dir().join("views")),
        "{view:?}"
    );
    assert_eq!(
        store_mounts[0],
        &serde_json::json!({"destination": "/nix/store", "type": "bind",
            "source": view, "options": ["rbind", "ro", "nosuid", "nodev"]})
    );
    let mut closure: Vec<String> = fx
        .echoserver_closure()
        .iter()
        .map(|p| store_path_base(p).to_owned())
        .collect();
    closure.sort();
    assert_eq!(
        nixenv_testkit::list_dir(view),
        closure,
        "the view is the closure"
    );
    assert_eq!(
        mounts[0]["destination"], "/proc",
        "runc's own mounts stay first"
    );
    let env: Vec<&str> = spec["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let path = format!(
        "PATH={}/bin:{}/bin:/usr/bin:/bin",
        fx.echoserver, fx.busybox
    );
    assert_eq!(
        env,
        [
            path.as_str(),
            "TERM=xterm",
            "ECHO_MESSAGE=hello from nix",
            "NIXENV_ENVIRONMENT=acme/echoserver",
            "NIXENV_GENERATION=2"
        ]
    );
    assert_eq!(spec["process"]["args"][0], "sh");

    // The pin names the container, the closure and where it lives.
    let pin = read_json(&s.node.state_dir().join(format!("pins/{}.json", runc.id)));
    assert_eq!(pin["reference"], "acme/echoserver");
    assert_eq!(pin["generation"], 2);
    assert_eq!(pin["closure"], serde_json::json!(fx.echoserver_closure()));
    assert_eq!(pin["owner"]["kind"], "runc-wrapper");
    assert_eq!(pin["owner"]["bundle"], b.path().to_str().unwrap());

    // The real runc runs it: `sh` found through PATH in the closure, the store read-only.
    let out = runc.run(b.path());
    assert!(
        out.status.success(),
        "runc run: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let got = lines(&stdout(&out));
    let mut want = vec![
        "message=hello from nix".to_string(),
        path.replace("PATH=", "path="),
        "env=acme/echoserver@2".to_string(),
    ];
    want.extend(
        fx.echoserver_closure()
            .iter()
            .map(|p| store_path_base(p).to_string()),
    );
    want.extend([
        "store-ro".to_string(),
        "path-ro".into(),
        "hello from the data path".into(),
    ]);
    assert_eq!(got, want);

    runtime::release(&cfg, &runc.id).unwrap();
    assert!(!s
        .node
        .state_dir()
        .join(format!("pins/{}.json", runc.id))
        .exists());
    runtime::release(&cfg, &runc.id).unwrap();
}

#[tokio::test]
async fn bundles_that_are_not_ours_stay_byte_identical() {
    let s = setup_http();
    let cfg = config_of(&s.node);
    for annotations in [
        vec![],
        vec![
            ("nix.dev/environment", "acme/echoserver"),
            ("io.kubernetes.cri.container-type", "sandbox"),
        ],
        vec![
            ("nix.dev/environment", "acme/echoserver"),
            ("io.kubernetes.cri-o.ContainerType", "sandbox"),
        ],
        vec![
            ("nix.dev/environment", "acme/echoserver"),
            ("nix.dev/skip-containers", "sidecar,other"),
            ("io.kubernetes.cri.container-name", "sidecar"),
        ],
    ] {
        let b = bundle(&["sh"], &["PATH=/bin"], &annotations);
        let path = b.path().join("config.json");
        let before = std::fs::read(&path).unwrap();
        let d = runtime::prepare_bundle(&cfg, "plain-1", b.path(), &Owner::default())
            .await
            .unwrap();
        assert_eq!(d, Decision::PassThrough, "{annotations:?}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "{annotations:?}");
    }
    assert_eq!(s.catalog.total_requests(), 0);
    assert_eq!(s.caches.total_requests(), 0);
    assert!(!s.node.state_dir().join("pins/plain-1.json").exists());
}

#[tokio::test]
async fn runtime_errors_name_the_reference_and_leave_nothing() {
    let s = setup_http();
    let cfg = config_of(&s.node);
    let catalog = s.catalog.url();
    for (reference, want) in [
        (
            "acme/echoserver@9",
            format!("acme/echoserver@9: generation 9 of acme/echoserver not found in catalog {catalog}/"),
        ),
        (
            "acme/nothing",
            format!("acme/nothing: environment acme/nothing not found in catalog {catalog}/"),
        ),
        (
            "acme/Echoserver",
            "invalid environment reference \"acme/Echoserver\": \"Echoserver\" must start with a lowercase letter or a digit".to_string(),
        ),
        (
            "acme/missing-path",
            format!(
                "acme/missing-path: {}: not found in any substituter ({}/)",
                Fixtures::get().missing_path(),
                s.caches.url()
            ),
        ),
    ] {
        let b = bundle(&["sh"], &["PATH=/bin"], &[("nix.dev/environment", reference)]);
        let path = b.path().join("config.json");
        let before = std::fs::read(&path).unwrap();
        let e = runtime::prepare_bundle(&cfg, "bad-1", b.path(), &Owner::default()).await.unwrap_err();
        assert_eq!(e.to_string(), want);
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(!s.node.state_dir().join("pins/bad-1.json").exists());
    }
}

// ---------------------------------------------------------------------------------------------
// The CLI: pull, publish, ls.

fn run(node: &TestNode, args: &[&str]) -> Output {
    node.nixenv(args).output().unwrap()
}

fn ok(node: &TestNode, args: &[&str]) -> String {
    let out = run(node, args);
    assert!(
        out.status.success(),
        "nixenv {args:?} failed: {}",
        stderr(&out)
    );
    stdout(&out)
}

/// The one-line error of a failing command.
fn fails(node: &TestNode, args: &[&str]) -> String {
    fails_env(node, args, &[])
}

fn fails_env(node: &TestNode, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = node
        .nixenv(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "nixenv {args:?} succeeded: {}",
        stdout(&out)
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err.trim_end().to_string()
}

fn closure_lines(paths: &[String]) -> String {
    paths.iter().map(|p| format!("{p}\n")).collect()
}

#[test]
fn pull_current_and_pinned_generations_over_http_and_file() {
    let s = setup_http();
    let fx = Fixtures::get();
    let echo = closure_lines(fx.echoserver_closure());
    assert_eq!(ok(&s.node, &["pull", "acme/echoserver"]), echo);
    assert_eq!(ok(&s.node, &["pull", "acme/echoserver"]), echo);
    assert_eq!(
        s.catalog.requests("/acme/echoserver/current.json"),
        2,
        "current is asked each time"
    );
    assert_eq!(ok(&s.node, &["pull", "acme/echoserver@1"]), echo);
    assert_eq!(ok(&s.node, &["pull", "acme/echoserver@1"]), echo);
    assert_eq!(
        s.catalog.requests("/acme/echoserver/generations/1.json"),
        1,
        "a pinned generation is asked once"
    );
    // Generation 2 was learned through current: never asked for.
    assert_eq!(ok(&s.node, &["pull", "acme/echoserver@2"]), echo);
    assert_eq!(s.catalog.requests("/acme/echoserver/generations/2.json"), 0);
    assert_eq!(
        ok(&s.node, &["pull", "acme/busybox"]),
        closure_lines(fx.closure(&fx.busybox))
    );

    // The same catalog as file://, on a fresh node.
    let node = TestNode::new()
        .substituter(&s.caches.url())
        .trusting(&fx.trusted_key.public)
        .with_catalog(&format!("file://{}", fx.catalog.display()));
    assert_eq!(ok(&node, &["pull", "acme/echoserver@1"]), echo);
    assert_eq!(
        ok(&node, &["pull", "acme/busybox@1", "acme/echoserver"]),
        echo
    );
    let e = fails(&node, &["pull", "acme/echoserver@3"]);
    assert_eq!(
        e,
        format!(
            "nixenv: acme/echoserver@3: generation 3 of acme/echoserver not found in catalog file://{}",
            fx.catalog.display()
        )
    );
    let e = fails(&node, &["pull", "acme/Echoserver"]);
    assert!(
        e.starts_with("nixenv: invalid environment reference \"acme/Echoserver\": "),
        "{e}"
    );
}

#[test]
fn catalog_down_with_and_without_a_cached_lock() {
    let s = setup_http();
    let fx = Fixtures::get();
    let echo = closure_lines(fx.echoserver_closure());
    let catalog_url = s.catalog.url();

    // Nothing cached yet: the outage is an error naming the reference.
    s.catalog
        .inject("/acme/echoserver/current.json", Fault::Status(503));
    let e = fails(&s.node, &["pull", "acme/echoserver"]);
    assert_eq!(
        e,
        format!(
            "nixenv: acme/echoserver: catalog unreachable: {catalog_url}/acme/echoserver/current.json: HTTP 503; no cached lock of acme/echoserver to fall back on"
        )
    );
    s.catalog.clear_faults();
    assert_eq!(ok(&s.node, &["pull", "acme/echoserver"]), echo);

    // 5xx, then the server gone altogether: the last known current lock, with a warning.
    s.catalog
        .inject("/acme/echoserver/current.json", Fault::Status(500));
    let out = s
        .node
        .nixenv(&["pull", "acme/echoserver"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), echo);
    assert!(
        stderr(&out).contains("catalog unreachable; using the last known current generation"),
        "{}",
        stderr(&out)
    );
    let ServedNode { catalog, node, .. } = s;
    drop(catalog);
    assert_eq!(ok(&node, &["pull", "acme/echoserver"]), echo);

    // catalog-offline = "fail" refuses instead.
    let strict = node.with_config_line("catalog-offline = \"fail\"");
    let e = fails(&strict, &["pull", "acme/echoserver"]);
    assert!(
        e.starts_with(&format!(
            "nixenv: acme/echoserver: catalog unreachable: {catalog_url}/acme/echoserver/current.json: "
        )),
        "{e}"
    );
}

#[test]
fn a_trickling_catalog_is_cut_at_its_deadline_then_the_cached_lock_is_used() {
    let s = setup_http();
    let fx = Fixtures::get();
    let echo = closure_lines(fx.echoserver_closure());
    let catalog_url = s.catalog.url();
    // Five bytes a second: never a stall, but the lock would take minutes. The deadline is
    // narinfo-timeout + max-lock-size / min-transfer-rate = 1 s + 1 s.
    let node = s
        .node
        .with_config_line("narinfo-timeout = \"1s\"")
        .with_config_line("max-lock-size = \"64K\"")
        .with_config_line("min-transfer-rate = \"64K\"");
    s.catalog.inject(
        "/acme/echoserver/current.json",
        Fault::Trickle(Duration::from_millis(200)),
    );
    let started = std::time::Instant::now();
    let e = fails(&node, &["pull", "acme/echoserver"]);
    assert_eq!(
        e,
        format!(
            "nixenv: acme/echoserver: catalog unreachable: {catalog_url}/acme/echoserver/current.json: too slow: not complete within 2s; no cached lock of acme/echoserver to fall back on"
        )
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // With a lock cached, a catalog that slow counts as down: the cached lock is used.
    s.catalog.clear_faults();
    assert_eq!(ok(&node, &["pull", "acme/echoserver"]), echo);
    s.catalog.inject(
        "/acme/echoserver/current.json",
        Fault::Trickle(Duration::from_millis(200)),
    );
    assert_eq!(ok(&node, &["pull", "acme/echoserver"]), echo);
}

#[test]
fn publish_after_the_largest_generation_refuses_in_one_line() {
    let fx = Fixtures::get();
    let tmp = tempfile::tempdir().unwrap();
    let dir = fx.catalog_copy(&tmp.path().join("catalog"));
    let gens = dir.join("acme/echoserver/generations");
    let last = std::fs::read_to_string(gens.join("2.json"))
        .unwrap()
        .replace(
            "\"generation\": 2",
            &format!("\"generation\": {}", u64::MAX),
        );
    std::fs::write(gens.join(format!("{}.json", u64::MAX)), &last).unwrap();
    std::fs::write(dir.join("acme/echoserver/current.json"), &last).unwrap();
    let cache = CacheServer::serve(fx.cache(Cache::Zstd));
    let node = TestNode::new()
        .substituter(&cache.url())
        .trusting(&fx.trusted_key.public);
    let e = fails(
        &node,
        &[
            "publish",
            "--catalog",
            dir.to_str().unwrap(),
            "acme/echoserver",
            &fx.busybox,
        ],
    );
    assert_eq!(
        e,
        format!(
            "nixenv: acme/echoserver: generation {} is the largest possible, no generation can follow it",
            u64::MAX
        )
    );
    assert!(!gens.join("0.json").exists());
}

#[test]
fn a_lock_setting_a_reserved_variable_is_refused() {
    let fx = Fixtures::get();
    let tmp = tempfile::tempdir().unwrap();
    let dir = fx.catalog_copy(&tmp.path().join("catalog"));
    let good = std::fs::read_to_string(dir.join("acme/echoserver/current.json")).unwrap();
    let d = dir.join("acme/reserved");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("current.json"),
        good.replace("ECHO_MESSAGE", "NIXENV_CONFIG")
            .replace("acme/echoserver", "acme/reserved"),
    )
    .unwrap();
    let cache = CacheServer::serve(fx.cache(Cache::Zstd));
    let catalog = format!("file://{}", dir.display());
    let node = TestNode::new()
        .substituter(&cache.url())
        .trusting(&fx.trusted_key.public)
        .with_catalog(&catalog);
    assert_eq!(
        fails(&node, &["pull", "acme/reserved"]),
        format!(
            "nixenv: acme/reserved: {catalog}/acme/reserved/current.json: malformed lock: {}: \
             env variable NIXENV_CONFIG is reserved: NIXENV_* names belong to nixenv",
            fx.system
        )
    );
    assert!(node.store_entries().is_empty());
}

#[test]
fn malformed_locks_newer_schemas_and_missing_systems_are_refused() {
    let fx = Fixtures::get();
    let tmp = tempfile::tempdir().unwrap();
    let dir = fx.catalog_copy(&tmp.path().join("catalog"));
    let write = |env: &str, text: &str| {
        let d = dir.join(env);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("current.json"), text).unwrap();
    };
    let good = std::fs::read_to_string(dir.join("acme/echoserver/current.json")).unwrap();
    write("acme/broken", "{\"schema\": 1, \"name\": ");
    write(
        "acme/future",
        &good
            .replace("\"schema\": 1", "\"schema\": 2")
            .replace("acme/echoserver", "acme/future"),
    );
    write(
        "acme/arm-only",
        &good
            .replace(&fx.system, "aarch64-linux")
            .replace("acme/echoserver", "acme/arm-only"),
    );
    write("acme/impostor", &good);

    let cache = CacheServer::serve(fx.cache(Cache::Zstd));
    let server = CacheServer::serve(&dir);
    for catalog in [server.url(), format!("file://{}", dir.display())] {
        let node = TestNode::new()
            .substituter(&cache.url())
            .trusting(&fx.trusted_key.public)
            .with_catalog(&catalog);
        let url = |env: &str| format!("{catalog}/{env}/current.json");
        let e = fails(&node, &["pull", "acme/broken"]);
        assert!(
            e.starts_with(&format!(
                "nixenv: acme/broken: {}: malformed lock: not valid JSON: EOF while parsing",
                url("acme/broken")
            )),
            "{e}"
        );
        assert_eq!(
            fails(&node, &["pull", "acme/future"]),
            format!(
                "nixenv: acme/future: {}: malformed lock: lock schema 2 is newer than this nixenv understands (schema 1); upgrade nixenv",
                url("acme/future")
            )
        );
        assert_eq!(
            fails(&node, &["pull", "acme/arm-only"]),
            format!(
                "nixenv: acme/arm-only: acme/arm-only has no {} (it has: aarch64-linux)",
                fx.system
            )
        );
        assert_eq!(
            fails(&node, &["pull", "acme/impostor"]),
            format!(
                "nixenv: acme/impostor: {}: the lock is acme/echoserver generation 2, expected acme/impostor",
                url("acme/impostor")
            )
        );
        assert!(
            node.store_entries().is_empty(),
            "nothing fetched: {:?}",
            node.store_entries()
        );
    }
}

#[test]
fn a_path_no_cache_holds_fails_pull_and_publish_naming_it() {
    let s = setup_http();
    let missing = Fixtures::get().missing_path();
    let e = fails(&s.node, &["pull", "acme/missing-path"]);
    assert_eq!(
        e,
        format!(
            "nixenv: acme/missing-path: {missing}: not found in any substituter ({}/)",
            s.caches.url()
        )
    );
    let tmp = tempfile::tempdir().unwrap();
    let e = fails(
        &s.node,
        &[
            "publish",
            "--catalog",
            tmp.path().to_str().unwrap(),
            "acme/new",
            &Fixtures::get().busybox,
            missing,
        ],
    );
    assert_eq!(
        e,
        format!(
            "nixenv: acme/new: {missing}: not found in any substituter ({}/)",
            s.caches.url()
        )
    );
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing written"
    );

    // A closure whose dependency is unsigned is refused too, naming that dependency.
    let untrusted = CacheServer::serve(Fixtures::get().cache(Cache::Untrusted));
    let node = TestNode::new()
        .substituter(&untrusted.url())
        .trusting(&Fixtures::get().trusted_key.public);
    let victim = Fixtures::get().victim(Cache::Untrusted).unwrap();
    let e = fails(
        &node,
        &[
            "publish",
            "--catalog",
            tmp.path().to_str().unwrap(),
            "acme/new",
            &Fixtures::get().echoserver,
        ],
    );
    assert!(
        e.starts_with(&format!("nixenv: acme/new: {victim}: ")),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing written"
    );

    // An http(s) catalog is read-only.
    let e = fails(
        &s.node,
        &[
            "publish",
            "--catalog",
            &s.catalog.url(),
            "acme/new",
            &Fixtures::get().busybox,
        ],
    );
    assert_eq!(
        e,
        format!(
            "nixenv: acme/new: catalog {}/ is read-only over http: publish to a directory or a file:// URL",
            s.catalog.url()
        )
    );
}

#[test]
fn publish_then_ls_and_pull_round_trip() {
    let fx = Fixtures::get();
    let cache = CacheServer::serve(fx.cache(Cache::Xz));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("catalog");
    let dir_s = dir.to_str().unwrap();
    let node = TestNode::new()
        .substituter(&cache.url())
        .trusting(&fx.trusted_key.public)
        .with_catalog(&format!("file://{dir_s}"));

    let out = ok(
        &node,
        &[
            "publish",
            "--catalog",
            dir_s,
            "acme/web",
            &fx.echoserver,
            &fx.busybox,
            "--env",
            "ECHO_MESSAGE=first",
            "--env",
            "A=b=c",
        ],
    );
    assert_eq!(out, "acme/web@1\n");
    assert_eq!(
        cache.requests_matching("/nar/*"),
        0,
        "publish downloads no NAR"
    );
    // --catalog defaults to the configured one (file://).
    assert_eq!(
        ok(&node, &["publish", "acme/web", &fx.busybox]),
        "acme/web@2\n"
    );

    let lock: Value = read_json(&dir.join("acme/web/generations/1.json"));
    assert_eq!(
        lock,
        serde_json::json!({"schema": 1, "name": "acme/web", "generation": 1,
            "systems": {fx.system.clone(): {"paths": [fx.echoserver, fx.busybox],
                "env": {"ECHO_MESSAGE": "first", "A": "b=c"}}}})
    );
    assert_eq!(
        std::fs::read(dir.join("acme/web/current.json")).unwrap(),
        std::fs::read(dir.join("acme/web/generations/2.json")).unwrap()
    );

    let text = ok(&node, &["ls", "acme/web"]);
    assert_eq!(
        text,
        format!(
            "acme/web (current: 2)\n  1\n    {sys}\n      {e}\n      {b}\n      env ECHO_MESSAGE=first\n      env A=b=c\n  2 (current)\n    {sys}\n      {b}\n",
            sys = fx.system,
            e = fx.echoserver,
            b = fx.busybox
        )
    );
    let json: Value = serde_json::from_str(&ok(&node, &["ls", "--json", "acme/web"])).unwrap();
    assert_eq!(json["current"], 2);
    assert_eq!(json["generations"][0]["current"], false);
    assert_eq!(json["generations"][1]["current"], true);
    assert_eq!(
        json["generations"][1]["systems"][&fx.system]["paths"],
        serde_json::json!([fx.busybox])
    );

    // Pull what was published: current is generation 2 (busybox), @1 is echoserver's closure.
    assert_eq!(
        ok(&node, &["pull", "acme/web"]),
        closure_lines(fx.closure(&fx.busybox))
    );
    assert_eq!(
        ok(&node, &["pull", "acme/web@1"]),
        closure_lines(fx.echoserver_closure())
    );

    // The same catalog served over HTTP: ls walks generations 1..current.
    let server = CacheServer::serve(&dir);
    let over_http = ok(&node, &["ls", "--catalog", &server.url(), "acme/web"]);
    assert_eq!(over_http, text);
    let e = fails(&node, &["ls", "--catalog", &server.url(), "acme/nothing"]);
    assert_eq!(
        e,
        format!(
            "nixenv: acme/nothing: environment acme/nothing not found in catalog {}/",
            server.url()
        )
    );
    let e = fails(
        &node,
        &["publish", "acme/web", &fx.busybox, "--env", "PATH=/x"],
    );
    assert!(
        e.starts_with("nixenv: acme/web: invalid --env \"PATH=/x\": "),
        "{e}"
    );
}

#[test]
fn concurrent_publishes_never_lose_a_generation() {
    let fx = Fixtures::get();
    let cache = CacheServer::serve(fx.cache(Cache::Zstd));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("catalog");
    // Generation 1 exists already (copied from the fixture catalog).
    copy_dir(&fx.catalog.join("acme/busybox"), &dir.join("acme/busybox"));
    let node = TestNode::new()
        .substituter(&cache.url())
        .trusting(&fx.trusted_key.public);
    let dir_s = dir.to_str().unwrap().to_string();
    let children: Vec<_> = (0..8)
        .map(|i| {
            let msg = format!("ECHO_MESSAGE=publisher {i}");
            node.nixenv(&[
                "publish",
                "--catalog",
                &dir_s,
                "acme/busybox",
                &fx.busybox,
                "--env",
                &msg,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let mut got: Vec<u64> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
            stdout(&out)
                .trim()
                .strip_prefix("acme/busybox@")
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    got.sort();
    assert_eq!(got, (2..=9).collect::<Vec<u64>>());
    let mut messages = Vec::new();
    for n in 2..=9 {
        let lock = read_json(&dir.join(format!("acme/busybox/generations/{n}.json")));
        assert_eq!(lock["generation"], n);
        messages.push(
            lock["systems"][&fx.system]["env"]["ECHO_MESSAGE"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    messages.sort();
    assert_eq!(
        messages,
        (0..8).map(|i| format!("publisher {i}")).collect::<Vec<_>>()
    );
    assert_eq!(
        read_json(&dir.join("acme/busybox/current.json"))["generation"],
        9
    );
    let mut names = nixenv_testkit::node::list_dir(&dir.join("acme/busybox/generations"));
    names.sort_by_key(|n| n.trim_end_matches(".json").parse::<u64>().unwrap_or(0));
    assert_eq!(
        names,
        (1..=9).map(|n| format!("{n}.json")).collect::<Vec<_>>()
    );
}
