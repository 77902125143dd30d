use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;
use crate::nix::nar::NarNode;

fn sp(name: &str, n: u8) -> StorePath {
    StorePath::new([n; 20], name).unwrap()
}

fn tree() -> NarNode {
    NarNode::dir([
        (
            "bin",
            NarNode::dir([(
                "hello",
                NarNode::executable(b"#!/bin/sh\necho hi\n".to_vec()),
            )]),
        ),
        ("share", NarNode::symlink(b"bin".to_vec())),
    ])
}

fn info_for(path: &StorePath, nar: &[u8], refs: Vec<StorePath>) -> PathInfo {
    PathInfo {
        path: path.clone(),
        references: refs,
        nar_hash: NarHash::digest(nar),
        nar_size: nar.len() as u64,
        registration_time: 0,
    }
}

fn install(store: &Store, path: &StorePath, nar: &[u8], refs: Vec<StorePath>) {
    let lock = Arc::new(store.lock(path).unwrap());
    let st = store.stage(&lock).unwrap();
    st.unpack(nar, &NarLimits::default()).unwrap();
    st.commit(&info_for(path, nar, refs)).unwrap();
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn install_query_and_local_closure() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for d in ["store", "meta", "locks"] {
        let mode = std::fs::metadata(dir.path().join(d))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755, "{d}");
    }
    let (a, b, c) = (sp("a", 1), sp("b", 2), sp("c", 3));
    let nar = tree().to_nar();
    assert_eq!(store.local_closure(std::slice::from_ref(&a)).unwrap(), None);
    install(&store, &c, &nar, vec![]);
    install(&store, &b, &nar, vec![c.clone(), b.clone()]);
    install(&store, &a, &nar, vec![b.clone(), c.clone()]);

    let hello = store.real_path(&a).join("bin/hello");
    let mode = std::fs::metadata(&hello).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o555);
    let mode = std::fs::metadata(store.real_path(&a))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o555);
    let info = store.query(&b).unwrap().unwrap();
    assert_eq!(info.references, vec![b.clone(), c.clone()]);
    assert_eq!(info.nar_hash, NarHash::digest(&nar));
    assert!(info.registration_time > 0);

    let cl = store
        .local_closure(std::slice::from_ref(&a))
        .unwrap()
        .unwrap();
    let mut want = vec![a.clone(), b.clone(), c.clone()];
    want.sort();
    assert_eq!(cl.paths, want);
    assert_eq!(cl.references[&a], vec![b.clone(), c.clone()]);
    assert_eq!(store.list().unwrap(), want);
    // Nothing temporary is left.
    assert!(entries(store.store_dir())
        .iter()
        .all(|e| !e.starts_with('.')));

    // Installing again is refused under the lock.
    let lock = Arc::new(store.lock(&a).unwrap());
    assert!(matches!(
        store.stage(&lock),
        Err(StoreError::AlreadyPresent { .. })
    ));
    drop(lock);

    // A missing dependency makes the local closure unknown.
    let lock = store.lock(&c).unwrap();
    store.delete(&lock).unwrap();
    drop(lock);
    assert!(!store.is_valid(&c).unwrap());
    assert_eq!(store.local_closure(std::slice::from_ref(&a)).unwrap(), None);
    assert!(!store.real_path(&c).exists());
}

#[test]
fn failed_unpack_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let p = sp("broken", 7);
    let nar = tree().to_nar();
    let lock = Arc::new(store.lock(&p).unwrap());
    {
        let st = store.stage(&lock).unwrap();
        assert!(st
            .unpack(&nar[..nar.len() - 24], &NarLimits::default())
            .is_err());
        // dropped without commit
    }
    assert_eq!(entries(store.store_dir()), Vec::<String>::new());
    assert_eq!(entries(&dir.path().join("meta")), Vec::<String>::new());
    assert!(!store.is_valid(&p).unwrap());
}

#[test]
fn leftovers_are_cleaned_by_the_next_install() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let p = sp("left", 9);
    let nar = tree().to_nar();
    // A crash mid-unpack: a read-only partial tree at .tmp-<hash>.
    let tmp = store.staging_path(&p);
    unpack::unpack(&nar[..], &tmp, &NarLimits::default()).unwrap();
    // A path without a record (e.g. the record was lost).
    let real = store.real_path(&p);
    unpack::unpack(&nar[..], &real, &NarLimits::default()).unwrap();
    assert!(!store.is_valid(&p).unwrap());
    assert_eq!(store.local_closure(std::slice::from_ref(&p)).unwrap(), None);
    // A record without its path is not valid either.
    let q = sp("recordonly", 10);
    store
        .write_record(&info_for(&q, &nar, vec![]), true)
        .unwrap();
    assert!(!store.is_valid(&q).unwrap());

    install(&store, &p, &nar, vec![]);
    assert!(store.is_valid(&p).unwrap());
    assert!(!tmp.exists());
    install(&store, &q, &nar, vec![]);
    assert_eq!(
        entries(store.store_dir()),
        vec![p.base_name(), q.base_name()]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_corrupt_record_is_not_valid() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let p = sp("corrupt", 11);
    let nar = tree().to_nar();
    install(&store, &p, &nar, vec![]);
    std::fs::write(store.record_path(&p), b"").unwrap();
    assert!(!store.is_valid(&p).unwrap());
    // A record naming another path does not validate this one.
    let other = sp("other", 11);
    assert!(!store.is_valid(&other).unwrap());
}

#[test]
fn concurrent_installs_of_one_path_fetch_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let p = sp("shared", 12);
    let nar = Arc::new(tree().to_nar());
    let fetches = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (store, p, nar, fetches) = (store.clone(), p.clone(), nar.clone(), fetches.clone());
            std::thread::spawn(move || {
                if store.is_valid(&p).unwrap() {
                    return;
                }
                let lock = Arc::new(store.lock(&p).unwrap());
                let st = match store.stage(&lock) {
                    Ok(st) => st,
                    Err(StoreError::AlreadyPresent { .. }) => return,
                    Err(e) => panic!("{e}"),
                };
                fetches.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(20));
                st.unpack(&nar[..], &NarLimits::default()).unwrap();
                st.commit(&info_for(&p, &nar, vec![])).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    assert!(store.is_valid(&p).unwrap());
}

#[test]
fn single_file_and_symlink_paths() {
    let dir = tempfile::tempdir().unwrap();
    for durability in [Durability::Fsync, Durability::Syncfs, Durability::None] {
        let store = Store::open(dir.path()).unwrap().with_durability(durability);
        let f = sp("file", 20 + durability as u8);
        let nar = NarNode::file(b"data".to_vec()).to_nar();
        install(&store, &f, &nar, vec![]);
        assert_eq!(std::fs::read(store.real_path(&f)).unwrap(), b"data");
        let l = sp("link", 30 + durability as u8);
        let nar = NarNode::symlink(b"/nix/store/x".to_vec()).to_nar();
        install(&store, &l, &nar, vec![]);
        assert_eq!(
            std::fs::read_link(store.real_path(&l)).unwrap(),
            Path::new("/nix/store/x")
        );
        assert!(store.is_valid(&l).unwrap());
    }
}

/// A directory of `dirs` directories of `files` files each (plus one symlink per directory).
fn many_entries(dirs: usize, files: usize) -> NarNode {
    NarNode::dir((0..dirs).map(|d| {
        let mut entries: Vec<(String, NarNode)> = (0..files)
            .map(|f| {
                (
                    format!("f{f:06}"),
                    NarNode::file(format!("{d}/{f}").into_bytes()),
                )
            })
            .collect();
        entries.push(("link".into(), NarNode::symlink(b"f000000".to_vec())));
        (format!("d{d:06}"), NarNode::dir(entries))
    }))
}

/// Counts (files, dirs, symlinks) below and including `path`, without following links.
fn count_tree(path: &Path) -> (u64, u64, u64) {
    let m = std::fs::symlink_metadata(path).unwrap();
    if m.file_type().is_symlink() {
        return (0, 0, 1);
    }
    if m.is_file() {
        return (1, 0, 0);
    }
    let mut n = (0, 1, 0);
    for e in std::fs::read_dir(path).unwrap() {
        let (f, d, s) = count_tree(&e.unwrap().path());
        n = (n.0 + f, n.1 + d, n.2 + s);
    }
    n
}

#[test]
fn durability_is_batched_by_default() {
    // syncfs per commit (shared by concurrent commits), not one fsync per entry.
    assert_eq!(Durability::default(), Durability::Syncfs);
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        Store::open(dir.path()).unwrap().durability,
        Durability::Syncfs
    );
    // And the substituter's store follows `store-durability`.
    let mut cfg = crate::config::Config {
        state_dir: dir.path().to_owned(),
        ..Default::default()
    };
    let open = |cfg: &crate::config::Config| crate::substituter::open_store(cfg).unwrap();
    assert_eq!(open(&cfg).durability, Durability::Syncfs);
    cfg.store_durability = crate::config::StoreDurability::Fsync;
    assert_eq!(open(&cfg).durability, Durability::Fsync);
}

#[test]
fn a_nar_of_many_entries_installs_complete() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let p = sp("many", 60);
    let nar = many_entries(100, 200).to_nar();
    let lock = Arc::new(store.lock(&p).unwrap());
    let st = store.stage(&lock).unwrap();
    let stats = st.unpack(&nar[..], &NarLimits::default()).unwrap();
    st.commit(&info_for(&p, &nar, vec![])).unwrap();
    assert_eq!(
        (stats.files, stats.dirs, stats.symlinks),
        (20_000, 101, 100)
    );
    let real = store.real_path(&p);
    assert_eq!(count_tree(&real), (20_000, 101, 100));
    assert_eq!(
        std::fs::read(real.join("d000042/f000199")).unwrap(),
        b"42/199"
    );
    assert_eq!(
        std::fs::read_link(real.join("d000099/link")).unwrap(),
        Path::new("f000000")
    );
    assert!(store.is_valid(&p).unwrap());
    // Nothing left in staging.
    assert_eq!(entries(&dir.path().join("store")), [p.base_name()]);
}

/// `bench/many-files.sh`: times unpack + commit of one NAR of `NIXENV_BENCH_ENTRIES` files
/// (default 100,000) under each durability, in `NIXENV_BENCH_DIR` (default `/var/tmp`).
#[test]
#[ignore = "benchmark: bench/many-files.sh"]
fn bench_many_entries() {
    let entries_wanted: usize = std::env::var("NIXENV_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let base = std::env::var_os("NIXENV_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into());
    let dirs = entries_wanted.div_ceil(1000).max(1);
    let nar = many_entries(dirs, entries_wanted / dirs).to_nar();
    for (n, durability) in [Durability::Syncfs, Durability::Fsync]
        .into_iter()
        .enumerate()
    {
        let dir = tempfile::tempdir_in(&base).unwrap();
        let store = Store::open(dir.path()).unwrap().with_durability(durability);
        let p = sp("bench", 70 + n as u8);
        let start = std::time::Instant::now();
        let lock = Arc::new(store.lock(&p).unwrap());
        let st = store.stage(&lock).unwrap();
        let stats = st.unpack(&nar[..], &NarLimits::default()).unwrap();
        st.commit(&info_for(&p, &nar, vec![])).unwrap();
        let took = start.elapsed();
        println!(
            "{durability:?}: {} files, {} dirs, {} symlinks ({} NAR bytes) in {:.2} s",
            stats.files,
            stats.dirs,
            stats.symlinks,
            nar.len(),
            took.as_secs_f64()
        );
    }
}
