//! gc over a real temporary store, with a fake container probe.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::roots::tests::FakeProbe;
use super::*;
use crate::nix::nar::{NarLimits, NarNode};
use crate::nix::{NarHash, StorePath};
use crate::pin::{self, Owner, OwnerKind, Pin};
use crate::store::{PathInfo, Store};

fn sp(name: &str, n: u8) -> StorePath {
    StorePath::new([n; 20], name).unwrap()
}

fn install(store: &Store, path: &StorePath, refs: &[&StorePath]) {
    let nar = NarNode::dir([
        (
            "bin",
            NarNode::dir([("x", NarNode::executable(path.name().as_bytes().to_vec()))]),
        ),
        ("link", NarNode::symlink(b"bin".to_vec())),
    ])
    .to_nar();
    let lock = Arc::new(store.lock(path).unwrap());
    let st = store.stage(&lock).unwrap();
    st.unpack(&nar[..], &NarLimits::default()).unwrap();
    st.commit(&PathInfo {
        path: path.clone(),
        references: refs.iter().map(|r| (*r).clone()).collect(),
        nar_hash: NarHash::digest(&nar),
        nar_size: nar.len() as u64,
        registration_time: 0,
    })
    .unwrap();
}

/// Every file under `dir` with its kind, mode, size and mtime: a "nothing changed" witness.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
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

fn age_pin(state: &Path, id: &str, by: Duration) {
    let f = std::fs::File::options()
        .write(true)
        .open(pin::pin_path(state, id).unwrap())
        .unwrap();
    f.set_modified(SystemTime::now() - by).unwrap();
}

fn runc_owner() -> Owner {
    Owner {
        kind: OwnerKind::RuncWrapper,
        runtime_root: Some("/run/test-runc".into()),
        ..Owner::default()
    }
}

struct World {
    _dir: tempfile::TempDir,
    store: Store,
    app: StorePath,
    lib: StorePath,
    libc: StorePath,
    old: StorePath,
    gone: StorePath,
    probe: FakeProbe,
}

/// app -> lib -> libc (pinned by live "c1"); gone -> libc (pinned by stale "c2"); old alone.
fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (app, lib, libc, old, gone) = (
        sp("app", 1),
        sp("lib", 2),
        sp("libc", 3),
        sp("old", 4),
        sp("gone", 5),
    );
    install(&store, &libc, &[]);
    install(&store, &lib, &[&libc, &lib]);
    install(&store, &app, &[&lib]);
    install(&store, &old, &[]);
    install(&store, &gone, &[&libc]);
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for p in [&app, &lib, &libc, &old, &gone] {
        usage::set_last_use(&store, p, hour_ago).unwrap();
    }
    // c1 pinned only its root (as the runtime does before the closure is known).
    pin::pin(
        dir.path(),
        &Pin::new("c1", "acme/app", Some(1), vec![app.clone()], runc_owner()),
    )
    .unwrap();
    let mut p2 = Pin::new("c2", "acme/gone", Some(1), vec![gone.clone()], runc_owner());
    p2.closure = vec![gone.clone(), libc.clone()];
    pin::pin(dir.path(), &p2).unwrap();
    age_pin(dir.path(), "c1", Duration::from_secs(7200));
    age_pin(dir.path(), "c2", Duration::from_secs(7200));
    let mut probe = FakeProbe::default();
    probe
        .answers
        .insert("c1".into(), Presence::Exists("running".into()));
    World {
        _dir: dir,
        store,
        app,
        lib,
        libc,
        old,
        gone,
        probe,
    }
}

fn dry_run(w: &World) -> GcReport {
    collect_garbage(
        &w.store,
        &w.probe,
        &GcOptions {
            dry_run: true,
            ..GcOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn keeps_live_closures_drops_stale_pins_and_removes_the_rest() {
    let w = world();
    let state = w.store.state_dir().to_owned();
    let dry = dry_run(&w);
    let before = snapshot(&state);
    let again = dry_run(&w);
    assert_eq!(snapshot(&state), before, "a dry run changes nothing");
    assert_eq!(dry, again);

    let r = collect_garbage(&w.store, &w.probe, &GcOptions::default()).unwrap();
    let removed: Vec<_> = r.removed.iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        removed,
        dry.removed
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(r.stale_pins.len(), 1);
    assert_eq!(r.stale_pins[0].container_id, "c2");
    let mut sorted = removed.clone();
    sorted.sort();
    let mut want = vec![w.old.clone(), w.gone.clone()];
    want.sort();
    assert_eq!(sorted, want);
    for p in [&w.app, &w.lib, &w.libc] {
        assert!(w.store.is_valid(p).unwrap(), "{p} kept");
        // Pinned paths count as used now.
        let age = SystemTime::now()
            .duration_since(usage::last_use(&w.store, p).unwrap())
            .unwrap();
        assert!(age < Duration::from_secs(60), "{p} touched");
    }
    for p in [&w.old, &w.gone] {
        assert!(!w.store.is_valid(p).unwrap());
        assert!(!w.store.real_path(p).exists());
        assert!(!usage::record_file(&w.store, p).exists());
    }
    assert!(
        delete::entries_with_prefix(&w.store, ".")
            .unwrap()
            .is_empty(),
        "no trash left"
    );
    assert_eq!(pin::list(&state).unwrap().len(), 1);
    assert_eq!(r.kept[&Kept::Pinned].0, 3);
    assert_eq!(r.freed(), r.removed.iter().map(|r| r.size).sum::<u64>());

    // The container goes away (its runtime says so); the next gc frees its closure.
    let mut probe = FakeProbe::default();
    probe
        .answers
        .insert("c1".into(), Presence::Gone("runc root wiped".into()));
    let r = collect_garbage(&w.store, &probe, &GcOptions::default()).unwrap();
    assert_eq!(r.stale_pins[0].reason, "runc root wiped");
    assert_eq!(
        r.removed.iter().map(|r| r.path.name()).collect::<Vec<_>>(),
        ["app", "lib", "libc"]
    );
    assert!(w.store.list().unwrap().is_empty());
    assert!(pin::list(&state).unwrap().is_empty());
}

#[test]
fn young_pins_and_recent_paths_are_kept_and_max_size_trims_lru_first() {
    let w = world();
    let state = w.store.state_dir().to_owned();
    // c2 rewritten just now (a container being created): live even though runc lacks it.
    pin::pin(&state, &pin::read(&state, "c2").unwrap().unwrap()).unwrap();
    usage::set_last_use(
        &w.store,
        &w.old,
        SystemTime::now() - Duration::from_secs(10),
    )
    .unwrap();
    let r = collect_garbage(
        &w.store,
        &w.probe,
        &GcOptions {
            keep_since: Duration::from_secs(60),
            ..GcOptions::default()
        },
    )
    .unwrap();
    assert!(r.removed.is_empty(), "{r:?}");
    assert!(r.stale_pins.is_empty());
    assert_eq!(r.kept[&Kept::Recent].0, 1);

    // No pins at all; a budget of two paths' size removes the least recently used first.
    pin::unpin(&state, "c1").unwrap();
    pin::unpin(&state, "c2").unwrap();
    let size = w.store.query(&w.app).unwrap().unwrap().nar_size;
    let t = |m: u64| SystemTime::now() - Duration::from_secs(m * 60);
    for (p, m) in [
        (&w.gone, 50),
        (&w.app, 40),
        (&w.lib, 30),
        (&w.libc, 20),
        (&w.old, 10),
    ] {
        usage::set_last_use(&w.store, p, t(m)).unwrap();
    }
    let r = collect_garbage(
        &w.store,
        &w.probe,
        &GcOptions {
            max_size: Some(2 * size),
            ..GcOptions::default()
        },
    )
    .unwrap();
    // gone (50m) first, then app (40m), then lib (30m); libc (20m) and old (10m) fit.
    let removed: Vec<_> = r.removed.iter().map(|r| r.path.name()).collect();
    assert_eq!(removed, ["gone", "app", "lib"]);
    assert_eq!(w.store.list().unwrap(), {
        let mut v = vec![w.libc.clone(), w.old.clone()];
        v.sort();
        v
    });
}

#[test]
fn leftovers_of_crashes_are_removed() {
    let w = world();
    let sd = w.store.store_dir().to_owned();
    // A crashed install (staging area), a crashed gc (trash), a record without its path,
    // and a path without its record.
    std::fs::create_dir_all(
        sd.join(format!(".tmp-{}", sp("x", 9).hash_str()))
            .join("ro"),
    )
    .unwrap();
    std::fs::create_dir_all(sd.join(".trash-abc/d")).unwrap();
    std::fs::rename(w.store.real_path(&w.old), sd.join(".trash-old")).unwrap();
    std::fs::remove_file(usage::record_file(&w.store, &w.gone)).unwrap();
    let r = collect_garbage(
        &w.store,
        &w.probe,
        &GcOptions {
            keep_since: Duration::from_secs(1 << 30),
            ..GcOptions::default()
        },
    )
    .unwrap();
    let mut what: Vec<_> = r.leftovers.iter().map(|l| l.what).collect();
    what.sort();
    assert_eq!(
        what,
        [
            "record of an absent path",
            "staging area of an interrupted install",
            "store path without a valid record",
            "trash of an interrupted gc",
            "trash of an interrupted gc",
        ]
    );
    assert!(r.removed.is_empty());
    let mut names: Vec<String> = std::fs::read_dir(&sd)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = [&w.app, &w.lib, &w.libc]
        .iter()
        .map(|p| p.base_name())
        .collect();
    want.sort();
    assert_eq!(names, want);
    assert!(!usage::record_file(&w.store, &w.old).exists());
}

#[test]
fn gc_waits_for_pulls_holding_the_shared_lock() {
    let w = world();
    let state = w.store.state_dir().to_owned();
    let pull = GcLock::shared(&state).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let store = w.store.clone();
    let t = std::thread::spawn(move || {
        let r = collect_garbage(&store, &FakeProbe::default(), &GcOptions::default());
        tx.send(()).unwrap();
        r.unwrap()
    });
    // While the "pull" holds the lock, gc decides nothing: the old path is still there.
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    assert!(w.store.is_valid(&w.old).unwrap());
    // The pull touches what it returns, then releases.
    usage::touch(&w.store, std::slice::from_ref(&w.old));
    drop(pull);
    let _ = t.join().unwrap();
    // keep_since is zero, so the unpinned path goes once gc may run: only after the pull let go.
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(!w.store.is_valid(&w.old).unwrap());
}

#[test]
fn closure_views_go_with_the_paths_they_hold_and_live_ones_stay() {
    use crate::store::view::Views;
    let w = world();
    let state = w.store.state_dir().to_owned();
    let views = Views::open(&state).unwrap();
    let live = views
        .build(
            std::slice::from_ref(&w.app),
            &[w.app.clone(), w.lib.clone(), w.libc.clone()],
        )
        .unwrap();
    let dead = views
        .build(
            std::slice::from_ref(&w.gone),
            &[w.gone.clone(), w.libc.clone()],
        )
        .unwrap();
    let alone = views
        .build(std::slice::from_ref(&w.old), std::slice::from_ref(&w.old))
        .unwrap();
    // A view of an earlier boot is never used again.
    let earlier = Views::for_boot(&state, "an-earlier-boot")
        .build(std::slice::from_ref(&w.app), std::slice::from_ref(&w.app))
        .unwrap();

    let dry = dry_run(&w);
    assert_eq!(dry.views_removed, 0);
    assert!(dead.dir.exists(), "a dry run removes no view");

    let r = collect_garbage(&w.store, &w.probe, &GcOptions::default()).unwrap();
    assert_eq!(r.views_removed, 3);
    assert!(!dead.dir.exists() && !alone.dir.exists() && !earlier.dir.exists());
    assert_eq!(views.list().unwrap(), vec![live.clone()]);
    // The live view still shows the whole closure.
    assert!(live.dir.join(w.app.base_name()).join("bin/x").is_file());

    // Its container goes away: the next gc removes the view with the closure.
    let mut probe = FakeProbe::default();
    probe
        .answers
        .insert("c1".into(), Presence::Gone("runc root wiped".into()));
    let r = collect_garbage(&w.store, &probe, &GcOptions::default()).unwrap();
    assert_eq!(r.views_removed, 1);
    assert!(views.list().unwrap().is_empty());
    let left: Vec<_> = std::fs::read_dir(state.join("views"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left.len(),
        1,
        "only this boot's (empty) directory: {left:?}"
    );
}
