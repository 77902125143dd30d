//! End-to-end tests of `nixenv gc`: real fixture closures pulled over HTTP by `nixenv pull`,
//! pins made by the real runtime path (`nixenv_core::runtime::prepare_bundle`) for real
//! runc containers (`runc run -d` with a private `--root`), so staleness is decided by real
//! `runc state`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nixenv_core::config::Config;
use nixenv_core::gc::usage;
use nixenv_core::nix::{NarHash, StorePath};
use nixenv_core::pin::{self, Owner, OwnerKind};
use nixenv_core::runtime::{self, Decision};
use nixenv_core::store::Store;
use nixenv_testkit::fixtures::{nix_command, store_path_base};
use nixenv_testkit::{Cache, CacheServer, Fault, Fixtures, TestNode};
use rand::{Rng, SeedableRng};

const CACHE: Cache = Cache::Zstd;

fn node(server: &CacheServer) -> TestNode {
    TestNode::new()
        .substituter(&server.url())
        .trusting(&Fixtures::get().trusted_key.public)
        .with_config_line("download-attempts = 2")
}

fn run_ok(mut cmd: Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn nixenv(node: &TestNode, args: &[&str]) -> String {
    run_ok(node.nixenv(args))
}

/// Lines of stdout starting with `prefix`, with the prefix removed, first word only.
fn listed(out: &str, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|l| l.split_whitespace().next().unwrap_or("").to_owned())
        .collect();
    v.sort();
    v
}

/// The store's entries (names of `store/`), sorted.
fn store_entries(node: &TestNode) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(node.store_dir()) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Every file under `dir` with kind, mode, size and mtime (a "nothing changed" witness).
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        out.insert(
            p.strip_prefix(dir).unwrap().display().to_string(),
            format!(
                "{:o} {} {}.{}",
                m.mode(),
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            ),
        );
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

/// Whether the node's copy of `path` is byte-identical to Nix's: `nix-store --dump` hashes to
/// the fixture narinfo's NarHash.
fn verify(node: &TestNode, path: &str) -> Result<(), String> {
    let want = NarHash::parse(&Fixtures::get().narinfo(CACHE, path).nar_hash).unwrap();
    let real = node.store_dir().join(store_path_base(path));
    let out = nix_command("nix-store")
        .arg("--dump")
        .arg(&real)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "{path}: nix-store --dump: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let got = NarHash::digest(&out.stdout);
    if got != want {
        return Err(format!(
            "{path}: NAR hash {} != {}",
            got.to_nix_string(),
            want.to_nix_string()
        ));
    }
    Ok(())
}

/// Every path the store considers valid verifies; nothing but valid paths and (while
/// something runs) staging areas is in `store/`.
fn assert_store_consistent(node: &TestNode) {
    let store = Store::open(&node.state_dir()).unwrap();
    for p in store.list().unwrap() {
        if store.is_valid(&p).unwrap() {
            verify(node, &p.to_absolute_path())
                .unwrap_or_else(|e| panic!("broken valid path: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Real runc containers whose pins come from the runtime path.

/// A runc state root and bundles under a temp dir; kills and deletes its containers on drop.
struct Runc {
    dir: tempfile::TempDir,
    ids: Vec<String>,
}

impl Runc {
    fn new() -> Runc {
        Runc {
            dir: tempfile::Builder::new()
                .prefix("nixenv-gc-runc-")
                .tempdir()
                .unwrap(),
            ids: Vec::new(),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn runc(&self, args: &[&str]) -> Output {
        Command::new("runc")
            .arg("--root")
            .arg(self.root())
            .args(args)
            .output()
            .unwrap()
    }

    /// A bundle with environment `reference` (a store path whose closure has busybox) running
    /// busybox's `sleep`, on an empty rootfs.
    fn bundle(&self, id: &str, reference: &str) -> PathBuf {
        let b = self.dir.path().join(format!("bundle-{id}"));
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        run_ok({
            let mut c = Command::new("runc");
            c.arg("spec").arg("--bundle").arg(&b);
            c
        });
        let file = b.join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        spec["root"] = serde_json::json!({"path": "rootfs", "readonly": false});
        spec["process"]["terminal"] = false.into();
        let sleep = format!("{}/bin/sleep", Fixtures::get().busybox);
        spec["process"]["args"] = serde_json::json!([sleep, "600"]);
        spec["annotations"] = serde_json::json!({"nix.dev/environment": reference});
        std::fs::write(&file, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
        b
    }

    fn owner(&self) -> Owner {
        Owner {
            kind: OwnerKind::RuncWrapper,
            runtime_root: Some(self.root()),
            ..Owner::default()
        }
    }

    /// prepare (pins) + `runc run -d`.
    fn start(&mut self, cfg: &Config, id: &str, reference: &str) -> Vec<String> {
        let b = self.bundle(id, reference);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let d = rt
            .block_on(runtime::prepare_bundle(cfg, id, &b, &self.owner()))
            .unwrap_or_else(|e| panic!("prepare {id}: {e}"));
        let Decision::Rewritten(prepared) = d else {
            panic!("{id} passed through")
        };
        self.ids.push(id.to_owned());
        // The detached container inherits runc's stdio: a file, not a pipe we would wait on.
        let log = self.dir.path().join(format!("{id}.log"));
        let status = Command::new("runc")
            .arg("--root")
            .arg(self.root())
            .args(["run", "-d", "--bundle"])
            .arg(&b)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "runc run {id}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let state: serde_json::Value =
            serde_json::from_slice(&self.runc(&["state", id]).stdout).unwrap();
        assert_eq!(state["status"], "running", "{state}");
        prepared.closure
    }

    /// `runc kill` + `runc delete` (the container is gone from runc's point of view).
    fn remove(&mut self, id: &str) {
        let _ = self.runc(&["kill", id, "KILL"]);
        for _ in 0..100 {
            if self.runc(&["delete", "--force", id]).status.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.ids.retain(|i| i != id);
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        for id in self.ids.clone() {
            self.remove(&id);
        }
    }
}

#[test]
fn gc_keeps_what_running_containers_use_and_frees_it_after_they_go() {
    let fx = Fixtures::get();
    let server = CacheServer::serve(fx.cache(CACHE));
    let node = node(&server);
    let cfg = Config::load_from(&node.write_config()).unwrap();
    let all: Vec<String> = fx.echoserver_closure().to_vec();
    let pulled = nixenv(&node, &["pull", &fx.echoserver]);
    assert_eq!(pulled.lines().collect::<Vec<_>>(), all);

    let mut runc = Runc::new();
    let c1 = runc.start(&cfg, "gc-c1", &fx.busybox);
    assert_eq!(c1, fx.closure(&fx.busybox));
    let c2 = runc.start(&cfg, "gc-c2", &fx.data);
    assert_eq!(c2, fx.closure(&fx.data));
    let pinned: Vec<String> = {
        let mut v: Vec<String> = c1.iter().chain(c2.iter()).cloned().collect();
        v.sort();
        v.dedup();
        v
    };
    let unpinned: Vec<String> = all
        .iter()
        .filter(|p| !pinned.contains(p))
        .cloned()
        .collect();
    assert!(!unpinned.is_empty());

    // --dry-run: says what it would do, changes nothing (not even a last-use time).
    let before = snapshot(&node.state_dir());
    let dry = nixenv(&node, &["gc", "--dry-run"]);
    assert_eq!(snapshot(&node.state_dir()), before, "{dry}");
    assert_eq!(listed(&dry, "would remove "), unpinned, "{dry}");
    assert!(
        dry.lines().last().unwrap().starts_with("would free "),
        "{dry}"
    );

    // `ls --store`-like view through the pins: both containers pin their closures.
    let out = nixenv(&node, &["gc"]);
    assert_eq!(listed(&out, "removed "), unpinned, "{out}");
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with("freed ") && last.contains(&format!("in {} path(s)", unpinned.len())),
        "{out}"
    );
    let mut want: Vec<String> = pinned
        .iter()
        .map(|p| store_path_base(p).to_owned())
        .collect();
    want.sort();
    assert_eq!(store_entries(&node), want);
    for p in &pinned {
        verify(&node, p).unwrap();
    }
    // Nothing left to do while they run.
    assert!(listed(&nixenv(&node, &["gc"]), "removed ").is_empty());

    // c1 is deleted and released the normal way: its paths go (unless c2 still needs them).
    runc.remove("gc-c1");
    runtime::release(&cfg, "gc-c1").unwrap();
    let out = nixenv(&node, &["gc"]);
    let only_c1: Vec<String> = c1.iter().filter(|p| !c2.contains(p)).cloned().collect();
    assert_eq!(listed(&out, "removed "), only_c1, "{out}");

    // c2's container disappears without a release and runc's state is wiped (a reboot):
    // the pin is stale. Young pins are protected by the grace period, old ones are dropped.
    runc.remove("gc-c2");
    std::fs::remove_dir_all(runc.root()).unwrap();
    let out = nixenv(&node, &["gc"]);
    assert!(
        listed(&out, "removed ").is_empty(),
        "within the grace period: {out}"
    );
    assert!(pin::read(&node.state_dir(), "gc-c2").unwrap().is_some());
    let out = nixenv(&node, &["gc", "--pin-grace", "0s"]);
    assert!(out.contains("dropped stale pin gc-c2 ("), "{out}");
    assert!(out.contains("does not exist"), "{out}");
    assert_eq!(listed(&out, "removed "), c2, "{out}");
    assert!(pin::list(&node.state_dir()).unwrap().is_empty());
    assert!(
        store_entries(&node).is_empty(),
        "{:?}",
        store_entries(&node)
    );

    // A pull afterwards fetches again and is complete.
    let again = nixenv(&node, &["pull", &fx.echoserver]);
    assert_eq!(again.lines().collect::<Vec<_>>(), all);
    for p in &all {
        verify(&node, p).unwrap();
    }
}

#[test]
fn keep_since_and_max_size_follow_last_use() {
    let fx = Fixtures::get();
    let server = CacheServer::serve(fx.cache(CACHE));
    let node = node(&server);
    nixenv(&node, &["pull", &fx.echoserver]);
    // A fresh pull is recent: --keep-since protects all of it.
    let out = nixenv(&node, &["gc", "--keep-since", "1h"]);
    assert!(listed(&out, "removed ").is_empty(), "{out}");

    // Age the paths: echoserver used 3h ago, data 2h ago, busybox and glibc 1h ago... but a
    // path's references are as recent as it, so only the order among leaves matters.
    let store = Store::open(&node.state_dir()).unwrap();
    let now = std::time::SystemTime::now();
    let age = |p: &str, h: u64| {
        let sp = StorePath::from_absolute_path(p).unwrap();
        usage::set_last_use(&store, &sp, now - Duration::from_secs(h * 3600)).unwrap();
    };
    age(&fx.echoserver, 5);
    age(&fx.data, 4);
    age(&fx.glibc, 4);
    age(&fx.busybox, 1);
    let out = nixenv(&node, &["gc", "--keep-since", "90m", "--dry-run"]);
    let mut want = vec![fx.echoserver.clone(), fx.data.clone(), fx.glibc.clone()];
    want.sort();
    assert_eq!(listed(&out, "would remove "), want, "{out}");

    // A budget that fits everything but echoserver: only the least recently used goes.
    let size = |p: &str| fx.narinfo(CACHE, p).nar_size;
    let total: u64 = fx.echoserver_closure().iter().map(|p| size(p)).sum();
    let budget = total - size(&fx.echoserver);
    let out = nixenv(&node, &["gc", "--max-size", &budget.to_string()]);
    assert_eq!(
        listed(&out, "removed "),
        vec![fx.echoserver.clone()],
        "{out}"
    );
    // Config defaults apply without flags.
    let node = node.with_config_line("gc-keep-since = \"5h\"");
    let out = nixenv(&node, &["gc"]);
    assert!(listed(&out, "removed ").is_empty(), "{out}");
    let out = nixenv(&node, &["gc", "--keep-since", "0s"]);
    assert_eq!(listed(&out, "removed ").len(), 3, "{out}");
    assert!(store_entries(&node).is_empty());
}

#[test]
fn gc_concurrent_with_pulls_of_the_same_paths_loses_nothing_a_pull_returned() {
    let fx = Fixtures::get();
    let server = CacheServer::serve(fx.cache(CACHE));
    let node = node(&server);
    nixenv(&node, &["pull", &fx.echoserver]);
    let store = Store::open(&node.state_dir()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6763);
    let (mut gc_won, mut pull_won) = (0, 0);
    let started = Instant::now();
    for round in 0..16 {
        // Every path is old: gc wants all of them, the pull wants all of them.
        let old = std::time::SystemTime::now() - Duration::from_secs(7200);
        for p in store.list().unwrap() {
            let _ = usage::set_last_use(&store, &p, old);
        }
        let delay = Duration::from_millis(rng.gen_range(0..60));
        let gc_first = rng.gen_bool(0.5);
        let spawn = |args: &[&str]| {
            node.nixenv(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (gc, pull) = if gc_first {
            let gc = spawn(&["gc", "--keep-since", "1h"]);
            std::thread::sleep(delay);
            (gc, spawn(&["pull", &fx.echoserver]))
        } else {
            let pull = spawn(&["pull", &fx.echoserver]);
            std::thread::sleep(delay);
            (spawn(&["gc", "--keep-since", "1h"]), pull)
        };
        let pull = pull.wait_with_output().unwrap();
        assert!(
            pull.status.success(),
            "round {round}: pull failed: {}",
            String::from_utf8_lossy(&pull.stderr)
        );
        let printed = String::from_utf8(pull.stdout).unwrap();
        // Checked after the pull returned, possibly while gc is still running.
        for p in printed.lines() {
            verify(&node, p)
                .unwrap_or_else(|e| panic!("round {round}: pull returned a lost path: {e}"));
        }
        let gc = gc.wait_with_output().unwrap();
        assert!(
            gc.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&gc.stderr)
        );
        let removed = listed(&String::from_utf8_lossy(&gc.stdout), "removed ");
        if removed.is_empty() {
            pull_won += 1;
        } else {
            gc_won += 1;
        }
        // And after gc finished too: nothing the pull returned is gone.
        for p in printed.lines() {
            verify(&node, p).unwrap_or_else(|e| panic!("round {round}: lost after gc: {e}"));
        }
    }
    eprintln!(
        "gc removed first in {gc_won} rounds, the pull held gc off in {pull_won}; {:?}",
        started.elapsed()
    );
    assert!(
        gc_won > 0,
        "the race was never exercised (gc never removed anything)"
    );
    assert!(
        pull_won > 0,
        "the race was never exercised (gc always ran first)"
    );
}

#[test]
fn sigkill_during_pulls_never_leaves_a_broken_path() {
    let fx = Fixtures::get();
    let server = CacheServer::serve(fx.cache(CACHE));
    // Slow NARs down so that kills land mid-download and mid-unpack, not only in the walk.
    server.inject("/nar/*", Fault::Delay(Duration::from_millis(40)));
    let node = node(&server);
    let t0 = Instant::now();
    nixenv(&node, &["pull", &fx.echoserver]);
    let cold = t0.elapsed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5151);
    for round in 0..20 {
        // Empty the store (gc also removes what earlier kills left behind).
        nixenv(&node, &["gc"]);
        assert!(
            store_entries(&node).is_empty(),
            "round {round}: {:?}",
            store_entries(&node)
        );
        let mut child = node
            .nixenv(&["pull", &fx.echoserver])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = cold.mul_f64(rng.gen_range(0.0..1.2));
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        assert_store_consistent(&node);
        let out = nixenv(&node, &["pull", &fx.echoserver]);
        for p in out.lines() {
            verify(&node, p)
                .unwrap_or_else(|e| panic!("round {round} (killed after {delay:?}): {e}"));
        }
    }
}

/// Run as a child by `sigkill_while_pinning_...`: prepares one bundle and exits.
#[test]
fn child_prepare_bundle() {
    let Ok(spec) = std::env::var("NIXENV_GC_TEST_CHILD") else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let cfg = Config::load_from(Path::new(v["config"].as_str().unwrap())).unwrap();
    let owner = Owner {
        kind: OwnerKind::RuncWrapper,
        runtime_root: Some(v["root"].as_str().unwrap().into()),
        ..Owner::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(runtime::prepare_bundle(
        &cfg,
        v["id"].as_str().unwrap(),
        Path::new(v["bundle"].as_str().unwrap()),
        &owner,
    ))
    .unwrap();
}

#[test]
fn sigkill_while_pinning_leaves_a_stale_pin_that_gc_drops() {
    let fx = Fixtures::get();
    let server = CacheServer::serve(fx.cache(CACHE));
    server.inject("/nar/*", Fault::Delay(Duration::from_millis(40)));
    let node = node(&server);
    let cfg = Config::load_from(&node.write_config()).unwrap();
    let runc = Runc::new();
    std::fs::create_dir_all(runc.root()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7069);
    let mut left_pins = 0;
    for round in 0..6 {
        let id = format!("pin-{round}");
        let bundle = runc.bundle(&id, &fx.echoserver);
        let spec = serde_json::json!({
            "config": node.config_path(), "root": runc.root(), "id": id, "bundle": bundle,
        });
        let t0 = Instant::now();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_prepare_bundle",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("NIXENV_GC_TEST_CHILD", spec.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..400)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let pinned = pin::read(&node.state_dir(), &id).unwrap();
        left_pins += usize::from(pinned.is_some());
        eprintln!(
            "round {round}: killed after {:?} ({status}); pin left: {}",
            t0.elapsed(),
            pinned.is_some()
        );
        assert_store_consistent(&node);
        // The container was never created: once past the grace period, gc drops the pin and
        // removes everything (nothing else pins the store).
        let out = nixenv(&node, &["gc", "--pin-grace", "0s"]);
        if pinned.is_some() {
            assert!(out.contains(&format!("dropped stale pin {id} (")), "{out}");
        }
        assert!(pin::list(&node.state_dir()).unwrap().is_empty());
        assert!(
            store_entries(&node).is_empty(),
            "{:?}\n{out}",
            store_entries(&node)
        );
    }
    // The same preparation then succeeds in full.
    let b = runc.bundle("pin-final", &fx.echoserver);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d = rt
        .block_on(runtime::prepare_bundle(
            &cfg,
            "pin-final",
            &b,
            &runc.owner(),
        ))
        .unwrap();
    let Decision::Rewritten(p) = d else { panic!() };
    for path in &p.closure {
        verify(&node, path).unwrap();
    }
    eprintln!("{left_pins} of 6 kills left a pin behind");
}

#[test]
fn ls_store_and_doctor_describe_the_store() {
    let fx = Fixtures::get();
    let server = CacheServer::serve(fx.cache(CACHE));
    let node = node(&server);
    nixenv(&node, &["pull", &fx.busybox]);
    let store = Store::open(&node.state_dir()).unwrap();
    let busybox = StorePath::from_absolute_path(&fx.busybox).unwrap();
    let mut p = pin::Pin::new(
        "ls-c1",
        &fx.busybox,
        None,
        vec![busybox.clone()],
        Owner::default(),
    );
    p.closure = vec![busybox.clone()];
    pin::pin(&node.state_dir(), &p).unwrap();
    usage::set_last_use(
        &store,
        &busybox,
        std::time::SystemTime::now() - Duration::from_secs(3 * 3600),
    )
    .unwrap();
    let out = nixenv(&node, &["ls", "--store"]);
    let line = out
        .lines()
        .find(|l| l.starts_with(&fx.busybox))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("3h ago") && line.ends_with("ls-c1") && line.contains("iB "),
        "{line}"
    );
    assert!(
        out.lines().last().unwrap().starts_with("1 path(s), "),
        "{out}"
    );

    // doctor: a crashed install's staging area older than an hour and a stale pin are reported.
    let staging = node
        .store_dir()
        .join(".tmp-0000000000000000000000000000000a");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::File::open(&staging)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    let mut q = pin::Pin::new(
        "gone-1",
        &fx.busybox,
        None,
        vec![busybox.clone()],
        Owner {
            kind: OwnerKind::Shim,
            runtime_root: Some(node.dir().join("no-such-runc-root")),
            ..Owner::default()
        },
    );
    q.closure = vec![busybox];
    pin::pin(&node.state_dir(), &q).unwrap();
    std::fs::File::options()
        .write(true)
        .open(pin::pin_path(&node.state_dir(), "gone-1").unwrap())
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    let out = node
        .nixenv(&["doctor"])
        .env("NIXENV_CONTAINERD_CONFIG", node.dir().join("none.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |check: &str| {
        text.lines()
            .find(|l| l.contains(&format!(" {check}: ")))
            .unwrap_or_else(|| panic!("no {check} in {text}"))
            .to_owned()
    };
    assert!(
        line("store leftovers").starts_with("warn")
            && line("store leftovers").contains(".tmp-0000"),
        "{text}"
    );
    assert!(
        line("stale pins").starts_with("warn") && line("stale pins").contains("gone-1"),
        "{text}"
    );
    assert!(line("store permissions").starts_with("ok"), "{text}");
    assert!(line("store free space").contains("free of"), "{text}");
}
