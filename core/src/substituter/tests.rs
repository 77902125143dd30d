//! The substituter against an in-memory cache behind a fake [`Fetch`].

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::resolve::with_slash;
use super::*;
use crate::fetch::Body;
use crate::nix::hash::NarHash;
use crate::nix::nar::NarNode;
use crate::nix::narinfo::Compression;
use crate::nix::signature::SecretKey;

/// What the fake server does on the next request for a URL.
#[derive(Debug, Clone)]
enum Misbehave {
    /// Answer with this HTTP status.
    Status(u16),
    /// Send this many bytes, then fail as a reset connection.
    BreakAfter(usize),
    /// Send this many bytes, then end the body cleanly.
    EndAfter(usize),
}

#[derive(Default)]
struct FakeFetch {
    files: Mutex<HashMap<String, Vec<u8>>>,
    misbehave: Mutex<HashMap<String, VecDeque<Misbehave>>>,
    log: Mutex<Vec<String>>,
}

impl FakeFetch {
    fn put(&self, url: &str, data: Vec<u8>) {
        self.files.lock().unwrap().insert(url.to_owned(), data);
    }
    fn misbehave(&self, url: &str, m: Misbehave) {
        self.misbehave
            .lock()
            .unwrap()
            .entry(url.to_owned())
            .or_default()
            .push_back(m);
    }
    fn requests(&self, suffix: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|u| u.ends_with(suffix))
            .count()
    }
    fn total(&self) -> usize {
        self.log.lock().unwrap().len()
    }
}

fn chunks(data: Vec<u8>, then: Option<FetchError>) -> Body {
    let mut items: Vec<Result<Bytes, FetchError>> = data
        .chunks(1000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    if let Some(e) = then {
        items.push(Err(e));
    }
    Box::pin(futures::stream::iter(items))
}

impl Fetch for FakeFetch {
    async fn get(&self, url: &Url) -> Result<Body, FetchError> {
        let key = url.as_str().to_owned();
        self.log.lock().unwrap().push(key.clone());
        tokio::task::yield_now().await;
        let m = self
            .misbehave
            .lock()
            .unwrap()
            .get_mut(&key)
            .and_then(|q| q.pop_front());
        let data = self.files.lock().unwrap().get(&key).cloned();
        let Some(data) = data else {
            return Err(FetchError::NotFound { url: url.clone() });
        };
        match m {
            None => Ok(chunks(data, None)),
            Some(Misbehave::Status(status)) => Err(FetchError::Status {
                url: url.clone(),
                status,
            }),
            Some(Misbehave::BreakAfter(n)) => Ok(chunks(
                data[..n.min(data.len())].to_vec(),
                Some(FetchError::Transport {
                    url: url.clone(),
                    message: "connection closed".into(),
                    retryable: true,
                }),
            )),
            Some(Misbehave::EndAfter(n)) => Ok(chunks(data[..n.min(data.len())].to_vec(), None)),
        }
    }
}

const CACHE1: &str = "http://cache1.test/";
const EVERY_COMPRESSION: [Compression; 4] = [
    Compression::None,
    Compression::Xz,
    Compression::Zstd,
    Compression::Bzip2,
];
const CACHE2: &str = "http://cache2.test/sub";

fn key() -> SecretKey {
    SecretKey::from_seed("acceptance-1", [42; 32])
}

fn sp(name: &str, n: u8) -> StorePath {
    StorePath::new([n; 20], name).unwrap()
}

fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    match c {
        Compression::None => data.to_vec(),
        Compression::Xz => {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
        Compression::Bzip2 => {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    }
}

fn node(tag: &str) -> NarNode {
    NarNode::dir([
        (
            "bin",
            NarNode::dir([(
                "prog",
                NarNode::executable(format!("#!/bin/sh\necho {tag}\n").repeat(500).into_bytes()),
            )]),
        ),
        ("lib", NarNode::symlink(b"bin".to_vec())),
    ])
}

/// Publishes `path` in the cache at `base`, signed by `signer` (if any); returns the NAR URL.
fn publish(
    fake: &FakeFetch,
    base: &str,
    path: &StorePath,
    refs: &[StorePath],
    c: Compression,
    signer: Option<&SecretKey>,
) -> String {
    let nar = node(path.name()).to_nar();
    let file = compress(c, &nar);
    let ext = match c {
        Compression::None => "",
        Compression::Xz => ".xz",
        Compression::Zstd => ".zst",
        Compression::Bzip2 => ".bz2",
    };
    let file_hash = NarHash::digest(&file);
    let rel = format!(
        "nar/{}.nar{ext}",
        crate::nix::nixbase32::encode(file_hash.as_bytes())
    );
    let mut info = NarInfo {
        store_path: path.clone(),
        url: rel.clone(),
        compression: c,
        file_hash: Some(file_hash),
        file_size: Some(file.len() as u64),
        nar_hash: NarHash::digest(&nar),
        nar_size: nar.len() as u64,
        references: refs.to_vec(),
        deriver: None,
        system: Some("x86_64-linux".into()),
        sigs: vec![],
        ca: None,
    };
    if let Some(k) = signer {
        k.sign_narinfo(&mut info);
    }
    let base = with_slash(Url::parse(base).unwrap());
    fake.put(
        base.join(&format!("{}.narinfo", path.hash_str()))
            .unwrap()
            .as_str(),
        info.render().into_bytes(),
    );
    let nar_url = base.join(&rel).unwrap().to_string();
    fake.put(&nar_url, file);
    nar_url
}

fn config(state: &Path, caches: &[&str]) -> Config {
    Config {
        substituters: caches.iter().map(|c| Url::parse(c).unwrap()).collect(),
        trusted_public_keys: vec![key().public_key().to_string()],
        state_dir: state.to_owned(),
        http_connections: 8,
        download_attempts: 3,
        ..Config::default()
    }
}

fn substituter(cfg: &Config, fake: FakeFetch) -> Substituter<FakeFetch> {
    let store = Arc::new(Store::open(&cfg.state_dir).unwrap());
    Substituter::new(cfg, fake, store)
        .unwrap()
        .with_retry(RetryPolicy {
            attempts: cfg.download_attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        })
}

/// Names in `{state}/store` and `{state}/meta` (temporary ones included).
fn store_entries(state: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for d in ["store", "meta"] {
        if let Ok(rd) = std::fs::read_dir(state.join(d)) {
            for e in rd {
                v.push(format!("{d}/{}", e.unwrap().file_name().to_string_lossy()));
            }
        }
    }
    v.sort();
    v
}

#[derive(Default)]
struct Counting {
    started: AtomicU64,
    present: AtomicU64,
    bytes: AtomicU64,
    restarted: AtomicU64,
}

impl Progress for Counting {
    fn present(&self, _: &StorePath) {
        self.present.fetch_add(1, Ordering::SeqCst);
    }
    fn download_started(&self, _: &StorePath, _: &Url, _: Option<u64>, _: u64) {
        self.started.fetch_add(1, Ordering::SeqCst);
    }
    fn download_bytes(&self, _: &StorePath, n: u64) {
        self.bytes.fetch_add(n, Ordering::SeqCst);
    }
    fn download_restarted(&self, _: &StorePath, _: u64, _: &str) {
        self.restarted.fetch_add(1, Ordering::SeqCst);
    }
}

/// root → {left, right} → base (a diamond), and base → glibc.
fn diamond(fake: &FakeFetch, base_url: &str, c: Compression) -> Vec<StorePath> {
    let (root, left, right, base, glibc) = (
        sp("root", 1),
        sp("left", 2),
        sp("right", 3),
        sp("base", 4),
        sp("glibc-2.37", 5),
    );
    let k = key();
    publish(
        fake,
        base_url,
        &glibc,
        std::slice::from_ref(&glibc),
        c,
        Some(&k),
    );
    publish(
        fake,
        base_url,
        &base,
        std::slice::from_ref(&glibc),
        c,
        Some(&k),
    );
    publish(
        fake,
        base_url,
        &left,
        std::slice::from_ref(&base),
        c,
        Some(&k),
    );
    publish(
        fake,
        base_url,
        &right,
        &[base.clone(), right.clone()],
        c,
        Some(&k),
    );
    publish(
        fake,
        base_url,
        &root,
        &[left.clone(), right.clone()],
        c,
        Some(&k),
    );
    vec![root, left, right, base, glibc]
}

#[tokio::test]
async fn diamond_closure_every_compression_then_warm_without_requests() {
    for c in EVERY_COMPRESSION {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeFetch::default();
        let paths = diamond(&fake, CACHE1, c);
        let cfg = config(dir.path(), &[CACHE1]);
        let sub = substituter(&cfg, fake);
        let progress = Counting::default();
        let closure = sub.materialise(&paths[..1], &progress).await.unwrap();
        let mut want = paths.clone();
        want.sort();
        assert_eq!(closure.paths, want, "{c}");
        assert_eq!(closure.references[&paths[0]], {
            let mut r = vec![paths[1].clone(), paths[2].clone()];
            r.sort();
            r
        });
        // Each narinfo and each NAR once, plus nix-cache-info once.
        assert_eq!(sub.fetch.requests(".narinfo"), 5, "{c}");
        assert_eq!(sub.fetch.requests("nix-cache-info"), 1);
        assert_eq!(sub.fetch.total(), 11);
        assert_eq!(progress.started.load(Ordering::SeqCst), 5);
        for p in &paths {
            let prog = sub.store().real_path(p).join("bin/prog");
            let text = std::fs::read_to_string(&prog).unwrap();
            assert!(text.starts_with(&format!("#!/bin/sh\necho {}\n", p.name())));
            assert_eq!(
                std::fs::read_link(sub.store().real_path(p).join("lib")).unwrap(),
                Path::new("bin")
            );
        }

        // Warm: the same closure without a single request.
        let before = sub.fetch.total();
        let again = sub.materialise(&paths[..1], &NoProgress).await.unwrap();
        assert_eq!(again, closure);
        assert_eq!(sub.fetch.total(), before);
        assert_eq!(
            local_closure(sub.store(), &paths[..1]).unwrap(),
            Some(closure)
        );
    }
}

#[tokio::test]
async fn partly_warm_store_fetches_only_missing_paths() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let paths = diamond(&fake, CACHE1, Compression::Zstd);
    let cfg = config(dir.path(), &[CACHE1]);
    let sub = substituter(&cfg, fake);
    sub.materialise(&paths[3..4], &NoProgress).await.unwrap(); // base and glibc
    let narinfos = sub.fetch.requests(".narinfo");
    assert_eq!(narinfos, 2);
    sub.materialise(&paths[..1], &NoProgress).await.unwrap();
    // root, left, right only.
    assert_eq!(sub.fetch.requests(".narinfo"), 5);
    assert_eq!(sub.fetch.requests(".nar.zst"), 5);
}

#[tokio::test]
async fn not_found_in_first_cache_uses_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let (a, b) = (sp("a", 1), sp("b", 2));
    publish(&fake, CACHE1, &b, &[], Compression::Xz, Some(&key()));
    publish(
        &fake,
        CACHE2,
        &a,
        std::slice::from_ref(&b),
        Compression::Xz,
        Some(&key()),
    );
    fake.put(
        "http://cache2.test/sub/nix-cache-info",
        b"StoreDir: /nix/store\nWantMassQuery: 1\n".to_vec(),
    );
    let cfg = config(dir.path(), &[CACHE1, CACHE2]);
    let sub = substituter(&cfg, fake);
    let cl = sub
        .materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap();
    assert_eq!(cl.paths.len(), 2);
    assert_eq!(sub.fetch.requests("cache2.test/sub/nix-cache-info"), 1);
    assert_eq!(
        sub.fetch
            .requests(&format!("cache1.test/{}.narinfo", a.hash_str())),
        1
    );
    assert_eq!(
        sub.fetch
            .requests(&format!("cache2.test/sub/{}.narinfo", a.hash_str())),
        1
    );
}

#[tokio::test]
async fn not_found_anywhere_names_path_and_caches() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let (a, missing) = (sp("a", 1), sp("busybox-1.35.0", 9));
    publish(
        &fake,
        CACHE1,
        &a,
        std::slice::from_ref(&missing),
        Compression::Xz,
        Some(&key()),
    );
    let cfg = config(dir.path(), &[CACHE1, "file:///srv/cache"]);
    let sub = substituter(&cfg, fake);
    let e = sub
        .materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{missing}: not found in any substituter (http://cache1.test/, file:///srv/cache/)"
        )
    );
    assert_eq!(e.path(), Some(&missing));
    // `a` was fine, but is not installed without its reference.
    assert_eq!(store_entries(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn server_errors_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let a = sp("a", 1);
    let nar_url = publish(&fake, CACHE1, &a, &[], Compression::Xz, Some(&key()));
    let narinfo = format!("{CACHE1}{}.narinfo", a.hash_str());
    fake.misbehave(&narinfo, Misbehave::Status(500));
    fake.misbehave(&nar_url, Misbehave::Status(503));
    fake.misbehave(&nar_url, Misbehave::BreakAfter(100));
    let cfg = config(dir.path(), &[CACHE1]);
    let sub = substituter(&cfg, fake);
    let progress = Counting::default();
    sub.materialise(std::slice::from_ref(&a), &progress)
        .await
        .unwrap();
    assert_eq!(sub.fetch.requests(".narinfo"), 2);
    assert_eq!(sub.fetch.requests(".nar.xz"), 3);
    assert_eq!(progress.restarted.load(Ordering::SeqCst), 2);
    assert!(sub.store().is_valid(&a).unwrap());
    assert!(store_entries(dir.path())
        .iter()
        .all(|e| !e.contains(".tmp")));
}

#[tokio::test]
async fn persistent_failures_give_up_after_the_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let a = sp("busybox", 1);
    let nar_url = publish(&fake, CACHE1, &a, &[], Compression::Xz, Some(&key()));
    for _ in 0..3 {
        fake.misbehave(&nar_url, Misbehave::BreakAfter(500));
    }
    let cfg = config(dir.path(), &[CACHE1]);
    let sub = substituter(&cfg, fake);
    let e = sub
        .materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{a}: connection closed while downloading {nar_url}")
    );
    assert_eq!(sub.fetch.requests(".nar.xz"), 3);
    assert_eq!(store_entries(dir.path()), Vec::<String>::new());

    // A 404 on the NAR is not retried.
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let nar_url = publish(&fake, CACHE1, &a, &[], Compression::Xz, Some(&key()));
    fake.files.lock().unwrap().remove(&nar_url);
    let sub = substituter(&config(dir.path(), &[CACHE1]), fake);
    let e = sub
        .materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), format!("{a}: {nar_url}: not found"));
    assert_eq!(sub.fetch.requests(".nar.xz"), 1);
}

#[tokio::test]
async fn a_nar_padded_past_the_compressed_limit_is_refused_and_leaves_nothing() {
    // zstd skippable frames decompress to nothing: without a cap on compressed bytes a cache
    // could keep a download (and the path's lock) busy for as long as it likes.
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let a = sp("padded", 1);
    let nar_url = publish(&fake, CACHE1, &a, &[], Compression::Zstd, Some(&key()));
    let nar = fake.files.lock().unwrap().get(&nar_url).cloned().unwrap();
    // 2 MiB of skippable frames before the real one: read, decompressed to nothing.
    let mut file = Vec::new();
    let frame = 1usize << 20;
    for _ in 0..2 {
        file.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        file.extend_from_slice(&(frame as u32).to_le_bytes());
        file.extend(std::iter::repeat_n(0u8, frame));
    }
    file.extend_from_slice(&nar);
    fake.put(&nar_url, file);
    let sub = substituter(&config(dir.path(), &[CACHE1]), fake);
    let e = sub
        .materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("the compressed NAR is larger than"),
        "{e}"
    );
    assert_eq!(store_entries(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn untrusted_key_and_bad_signature_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let (a, b) = (sp("busybox-1.35.0", 1), sp("forged", 2));
    let other = SecretKey::from_seed("intruder-1", [7; 32]);
    publish(&fake, CACHE1, &a, &[], Compression::Xz, Some(&other));
    let cfg = config(dir.path(), &[CACHE1]);
    let sub = substituter(&cfg, fake);
    let e = sub
        .materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{a}: signature not trusted (keys: intruder-1)")
    );
    assert_eq!(sub.fetch.requests(".nar.xz"), 0);
    assert_eq!(store_entries(dir.path()), Vec::<String>::new());

    // Unsigned.
    let fake = FakeFetch::default();
    publish(&fake, CACHE1, &a, &[], Compression::Xz, None);
    let sub = substituter(&cfg, fake);
    let e = sub
        .materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{a}: signature not trusted")),
        "{e}"
    );

    // Signed by the trusted key's name but over other contents.
    let fake = FakeFetch::default();
    publish(&fake, CACHE1, &b, &[], Compression::Xz, Some(&key()));
    let narinfo_url = format!("{CACHE1}{}.narinfo", b.hash_str());
    let text = String::from_utf8(fake.files.lock().unwrap()[&narinfo_url].clone()).unwrap();
    let mut info = NarInfo::parse(&text).unwrap();
    info.nar_size += 1;
    fake.put(&narinfo_url, info.render().into_bytes());
    let sub = substituter(&cfg, fake);
    let e = sub
        .materialise(std::slice::from_ref(&b), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{b}: bad signature by key acceptance-1")
    );
    assert_eq!(store_entries(dir.path()), Vec::<String>::new());

    // require-sigs = false accepts the unsigned one.
    let fake = FakeFetch::default();
    publish(&fake, CACHE1, &a, &[], Compression::Xz, None);
    let mut cfg2 = cfg.clone();
    cfg2.require_sigs = false;
    let sub = substituter(&cfg2, fake);
    sub.materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap();
    assert!(sub.store().is_valid(&a).unwrap());
}

#[tokio::test]
async fn narinfo_for_another_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let (a, evil) = (sp("a", 1), sp("evil", 2));
    publish(&fake, CACHE1, &evil, &[], Compression::Xz, Some(&key()));
    let evil_url = format!("{CACHE1}{}.narinfo", evil.hash_str());
    let data = fake.files.lock().unwrap()[&evil_url].clone();
    fake.put(&format!("{CACHE1}{}.narinfo", a.hash_str()), data);
    let sub = substituter(&config(dir.path(), &[CACHE1]), fake);
    let e = sub
        .materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with(&format!("{a}: narinfo ")), "{e}");
    assert!(e.to_string().ends_with(&format!("describes {evil}")), "{e}");
}

#[tokio::test]
async fn tampered_and_truncated_nars_leave_nothing() {
    for c in [Compression::None, Compression::Zstd, Compression::Xz] {
        // Tampered: same structure, one byte of file contents changed.
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeFetch::default();
        let a = sp("busybox", 1);
        let nar_url = publish(&fake, CACHE1, &a, &[], c, Some(&key()));
        let nar = node(a.name()).to_nar();
        let mut bad = nar.clone();
        let pos = bad.windows(4).position(|w| w == b"echo").unwrap();
        bad[pos] = b'E';
        fake.put(&nar_url, compress(c, &bad));
        let sub = substituter(&config(dir.path(), &[CACHE1]), fake);
        let e = sub
            .materialise(std::slice::from_ref(&a), &NoProgress)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{a}: NAR hash mismatch (expected {}, got {})",
                NarHash::digest(&nar),
                NarHash::digest(&bad)
            )
        );
        assert_eq!(store_entries(dir.path()), Vec::<String>::new(), "{c}");

        // Structurally broken: the archive error, found without reading further.
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeFetch::default();
        let nar_url = publish(&fake, CACHE1, &a, &[], c, Some(&key()));
        let mut bad = nar.clone();
        let pos = bad.windows(7).position(|w| w == b"symlink").unwrap();
        bad[pos] = b'X';
        fake.put(&nar_url, compress(c, &bad));
        let sub = substituter(&config(dir.path(), &[CACHE1]), fake);
        let e = sub
            .materialise(std::slice::from_ref(&a), &NoProgress)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{a}: invalid NAR at /lib")),
            "{c}: {e}"
        );
        assert_eq!(store_entries(dir.path()), Vec::<String>::new(), "{c}");

        // Truncated: the server ends the body early, cleanly.
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeFetch::default();
        let nar_url = publish(&fake, CACHE1, &a, &[], c, Some(&key()));
        let len = fake.files.lock().unwrap()[&nar_url].len();
        for _ in 0..3 {
            fake.misbehave(&nar_url, Misbehave::EndAfter(len / 2));
        }
        let sub = substituter(&config(dir.path(), &[CACHE1]), fake);
        let e = sub
            .materialise(std::slice::from_ref(&a), &NoProgress)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), format!("{a}: NAR truncated"), "{c}");
        assert_eq!(store_entries(dir.path()), Vec::<String>::new(), "{c}");
    }
}

#[tokio::test]
async fn larger_nar_than_announced_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let a = sp("big", 1);
    let nar_url = publish(&fake, CACHE1, &a, &[], Compression::None, Some(&key()));
    let mut bigger = node(a.name()).to_nar();
    bigger.extend_from_slice(&[0u8; 4096]);
    fake.put(&nar_url, bigger);
    let sub = substituter(&config(dir.path(), &[CACHE1]), fake);
    let e = sub
        .materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{a}: NAR size mismatch")),
        "{e}"
    );
    assert_eq!(store_entries(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn wrong_store_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let a = sp("a", 1);
    publish(&fake, CACHE1, &a, &[], Compression::Xz, Some(&key()));
    fake.put(
        &format!("{CACHE1}nix-cache-info"),
        b"StoreDir: /gnu/store\n".to_vec(),
    );
    let sub = substituter(&config(dir.path(), &[CACHE1]), fake);
    let e = sub
        .materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{a}: substituter {CACHE1}: store directory is /gnu/store, not /nix/store")
    );
}

#[test]
fn concurrent_materialisations_fetch_each_nar_once() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeFetch::default());
    let paths = diamond(&fake, CACHE1, Compression::Xz);
    let cfg = config(dir.path(), &[CACHE1]);

    /// Shares one fake between substituters (each with its own store handle).
    struct Shared(Arc<FakeFetch>);
    impl Fetch for Shared {
        async fn get(&self, url: &Url) -> Result<Body, FetchError> {
            self.0.get(url).await
        }
    }

    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (cfg, fake, root) = (cfg.clone(), fake.clone(), paths[0].clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let store = Arc::new(Store::open(&cfg.state_dir).unwrap());
                    let sub = Substituter::new(&cfg, Shared(fake), store).unwrap();
                    sub.materialise(&[root], &NoProgress).await.unwrap()
                })
            })
        })
        .collect();
    let results: Vec<Closure> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for r in &results {
        assert_eq!(r, &results[0]);
    }
    assert_eq!(results[0].paths.len(), 5);
    for p in &paths {
        let nar = fake
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|u| u.ends_with(".nar.xz"))
            .count();
        assert_eq!(nar, 5, "{p}");
    }
    assert!(store_entries(dir.path())
        .iter()
        .all(|e| !e.contains(".tmp")));
}

#[tokio::test]
async fn referrers_of_a_failed_path_are_not_installed() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let paths = diamond(&fake, CACHE1, Compression::Zstd);
    let (glibc, unrelated) = (paths[4].clone(), sp("unrelated", 6));
    publish(
        &fake,
        CACHE1,
        &unrelated,
        &[],
        Compression::Zstd,
        Some(&key()),
    );
    // glibc's NAR is slow to fail: everything else is downloaded and verified first.
    let glibc_nar = format!("{CACHE1}{}", {
        let text = String::from_utf8(
            fake.files.lock().unwrap()[&format!("{CACHE1}{}.narinfo", glibc.hash_str())].clone(),
        )
        .unwrap();
        NarInfo::parse(&text).unwrap().url
    });
    let nar = node(glibc.name()).to_nar();
    let mut bad = nar.clone();
    let pos = bad.windows(4).position(|w| w == b"echo").unwrap();
    bad[pos] = b'E';
    fake.put(&glibc_nar, compress(Compression::Zstd, &bad));
    let sub = substituter(&config(dir.path(), &[CACHE1]), fake);
    let e = sub
        .materialise(&[paths[0].clone(), unrelated.clone()], &NoProgress)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{glibc}: NAR hash mismatch")),
        "{e}"
    );
    // Everything depends on glibc except `unrelated`, which may or may not have been
    // committed before the failure; nothing else is there, nothing temporary either.
    let left: Vec<String> = store_entries(dir.path())
        .into_iter()
        .filter(|e| !e.contains(unrelated.hash_str()))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}

/// Rewrites the narinfo of `path` in the cache at `base` with `edit` (without re-signing).
fn edit_narinfo(fake: &FakeFetch, base: &str, path: &StorePath, edit: impl FnOnce(&mut NarInfo)) {
    let base = with_slash(Url::parse(base).unwrap());
    let url = base
        .join(&format!("{}.narinfo", path.hash_str()))
        .unwrap()
        .to_string();
    let text = String::from_utf8(fake.files.lock().unwrap()[&url].clone()).unwrap();
    let mut info = NarInfo::parse(&text).unwrap();
    edit(&mut info);
    fake.put(&url, info.render().into_bytes());
}

/// Publishes `path` in CACHE1, signed, with the NAR `nar` served as `file` (compressed with
/// `c`); returns the NAR URL.
fn publish_nar(
    fake: &FakeFetch,
    path: &StorePath,
    c: Compression,
    nar: &[u8],
    file: Vec<u8>,
) -> String {
    let nar_url = publish(fake, CACHE1, path, &[], c, Some(&key()));
    edit_narinfo(fake, CACHE1, path, |i| {
        i.nar_size = nar.len() as u64;
        i.nar_hash = NarHash::digest(nar);
        i.file_size = None;
        i.file_hash = None;
        i.sigs.clear();
        key().sign_narinfo(i);
    });
    fake.put(&nar_url, file);
    nar_url
}

#[tokio::test]
async fn percent_encoded_separators_in_a_nar_url_are_refused_before_any_request() {
    for (cache, rel) in [
        (CACHE1, "nar/..%2F..%2F..%2Fetc%2Fpasswd"),
        (CACHE1, "nar/..%5c..%5cetc%5cpasswd"),
        ("file:///srv/cache/", "nar/..%2f..%2f..%2fetc%2fshadow"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeFetch::default();
        let a = sp("escape", 1);
        publish(&fake, cache, &a, &[], Compression::None, Some(&key()));
        edit_narinfo(&fake, cache, &a, |i| i.url = rel.into());
        let sub = substituter(&config(dir.path(), &[cache]), fake);
        let e = sub
            .materialise(std::slice::from_ref(&a), &NoProgress)
            .await
            .unwrap_err();
        let encoded = &rel[6..9];
        assert_eq!(
            e.to_string(),
            format!(
                "{a}: NAR URL {rel:?} of substituter {cache} contains the percent-encoded \
                 separator {encoded}"
            )
        );
        // Only nix-cache-info and the narinfo were requested.
        assert_eq!(sub.fetch.total(), 2, "{cache} {rel}");
        assert_eq!(store_entries(dir.path()), Vec::<String>::new());
    }
}

#[tokio::test]
async fn a_reference_cycle_is_refused_instead_of_waiting_forever() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let (root, a, b) = (sp("root", 1), sp("a", 2), sp("b", 3));
    let k = key();
    publish(
        &fake,
        CACHE1,
        &a,
        &[b.clone(), a.clone()],
        Compression::Zstd,
        Some(&k),
    );
    publish(
        &fake,
        CACHE1,
        &b,
        std::slice::from_ref(&a),
        Compression::Zstd,
        Some(&k),
    );
    publish(
        &fake,
        CACHE1,
        &root,
        std::slice::from_ref(&a),
        Compression::Zstd,
        Some(&k),
    );
    let sub = substituter(&config(dir.path(), &[CACHE1]), fake);
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        sub.materialise(std::slice::from_ref(&root), &NoProgress),
    )
    .await
    .expect("the pull must not hang on a cycle")
    .unwrap_err();
    let (x, y) = (a.clone().min(b.clone()), a.max(b));
    assert_eq!(
        e.to_string(),
        format!("{x}: reference cycle {x} -> {y} -> {x}, refused")
    );
    assert_eq!(store_entries(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn an_archive_error_in_the_first_bytes_stops_the_download() {
    // An 8 MiB NAR (half of it incompressible) whose magic is wrong, as is and as xz (decoded
    // on a thread of its own: two cores): the unpacker fails on the first chunk, the decoder
    // stops at its next send, and the rest of the body is not read.
    let big = NarNode::dir([("blob", NarNode::file(mixed_bytes(8 << 20, 3)))]).to_nar();
    let mut bad = big.clone();
    bad[8] = b'X';
    for c in [Compression::None, Compression::Xz] {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeFetch::default();
        let a = sp("early", 1);
        let file = match c {
            Compression::Xz => {
                let mut e = xz2::write::XzEncoder::new(Vec::new(), 0);
                e.write_all(&bad).unwrap();
                e.finish().unwrap()
            }
            _ => bad.clone(),
        };
        let len = file.len();
        publish_nar(&fake, &a, c, &big, file);
        let sub = substituter(&config(dir.path(), &[CACHE1]), fake).with_cores(2);
        let progress = Counting::default();
        let e = sub
            .materialise(std::slice::from_ref(&a), &progress)
            .await
            .unwrap_err();
        assert!(
            e.to_string().starts_with(&format!("{a}: invalid NAR")),
            "{c}: {e}"
        );
        // At most the channels' worth of chunks past the first one, not the signed 8 MiB.
        let received = progress.bytes.load(Ordering::SeqCst);
        assert!(
            received < 1 << 20,
            "{c}: {received} of {len} bytes read after the error"
        );
        assert_eq!(store_entries(dir.path()), Vec::<String>::new(), "{c}");
    }
}

#[tokio::test]
async fn a_pull_removes_staging_left_by_killed_pulls_but_not_live_ones() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let a = sp("fresh", 1);
    publish(&fake, CACHE1, &a, &[], Compression::Zstd, Some(&key()));
    let sub = substituter(&config(dir.path(), &[CACHE1]), fake);
    let store = sub.store().clone();
    // A killed pull's staging area (read-only inside, as unpacked) and a live one.
    let (dead, live) = (sp("killed", 7), sp("busy", 8));
    let staging = |p: &StorePath| store.store_dir().join(format!(".tmp-{}", p.hash_str()));
    for p in [&dead, &live] {
        let bin = staging(p).join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("prog"), b"half").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let held = store.lock(&live).unwrap();
    sub.materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap();
    assert!(
        !staging(&dead).exists(),
        "the dead pull's staging is removed"
    );
    assert!(
        staging(&live).exists(),
        "a staging area whose lock is held stays"
    );
    drop(held);
    std::fs::set_permissions(
        staging(&live).join("bin"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
}

/// A disk with a fixed number of free bytes.
struct FixedSpace(u64);

impl crate::store::space::FreeSpace for FixedSpace {
    fn available(&self, _dir: &Path) -> io::Result<u64> {
        Ok(self.0)
    }
}

#[tokio::test]
async fn a_nar_size_beyond_the_free_space_fails_before_any_download() {
    const FREE: u64 = 10 << 30;
    for (budget, note) in [
        (None, String::new()),
        (
            Some(20u64 << 30),
            " (store budget gc-max-size: 21474836480 bytes)".to_string(),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeFetch::default();
        let (dep, top) = (sp("dep", 1), sp("huge", 2));
        publish(&fake, CACHE1, &dep, &[], Compression::None, Some(&key()));
        publish(
            &fake,
            CACHE1,
            &top,
            std::slice::from_ref(&dep),
            Compression::None,
            Some(&key()),
        );
        // Validly signed, and far larger than the disk.
        edit_narinfo(&fake, CACHE1, &top, |i| {
            i.nar_size = 1 << 40;
            i.sigs.clear();
            key().sign_narinfo(i);
        });
        let mut cfg = config(dir.path(), &[CACHE1]);
        cfg.gc_max_size = budget;
        let sub = substituter(&cfg, fake).with_free_space(FixedSpace(FREE));
        let e = sub
            .materialise(std::slice::from_ref(&top), &NoProgress)
            .await
            .unwrap_err();
        let store = dir.path().join("store");
        assert_eq!(
            e.to_string(),
            format!(
                "{top}: not enough disk space: 1099511627776 bytes (NarSize) still to download, \
                 10737418240 bytes free in {}{note}",
                store.display()
            )
        );
        // The huge NAR was never requested.
        assert_eq!(sub.fetch.requests(".nar"), 0);
        assert!(!store
            .join(top.to_string().trim_start_matches("/nix/store/"))
            .exists());
    }

    // A closure that fits is installed.
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let a = sp("fits", 3);
    publish(&fake, CACHE1, &a, &[], Compression::None, Some(&key()));
    let sub = substituter(&config(dir.path(), &[CACHE1]), fake).with_free_space(FixedSpace(FREE));
    sub.materialise(std::slice::from_ref(&a), &NoProgress)
        .await
        .unwrap();
}

/// `len` bytes, every other 4 KiB block pseudo-random (incompressible), the others text: a
/// NAR's worth of mixed content that compresses to about half.
fn mixed_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let block = v.len() / 4096;
        if block % 2 == 0 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        } else {
            v.extend_from_slice(format!("line {block}\n").as_bytes());
        }
    }
    v.truncate(len);
    v
}

/// A NAR of one 2 MiB executable, several times the decoded channel's bound.
fn big_nar(seed: u64) -> Vec<u8> {
    let blob = mixed_bytes(2 << 20, seed);
    let tree = NarNode::dir([
        ("bin", NarNode::dir([("big", NarNode::executable(blob))])),
        ("lib", NarNode::symlink(b"bin".to_vec())),
    ]);
    tree.to_nar()
}

#[tokio::test]
async fn a_big_nar_decoded_on_its_own_thread_gives_the_same_path() {
    let nar = big_nar(7);
    assert!(nar.len() as u64 >= decode::HANDOVER_MIN_NAR_SIZE);
    assert!(nar.len() > decode::DECODED_CHUNK * (decode::DECODED_CHUNKS + 2));
    let blob = mixed_bytes(2 << 20, 7);
    for c in EVERY_COMPRESSION {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeFetch::default();
        let a = sp("big", 1);
        publish_nar(&fake, &a, c, &nar, compress(c, &nar));
        // Two cores: this NAR's thread leaves one spare for its decoder, on any machine.
        let sub = substituter(&config(dir.path(), &[CACHE1]), fake).with_cores(2);
        let closure = sub
            .materialise(std::slice::from_ref(&a), &NoProgress)
            .await
            .unwrap();
        assert_eq!(closure.paths, vec![a.clone()], "{c}");
        let real = sub.store().real_path(&a);
        assert!(std::fs::read(real.join("bin/big")).unwrap() == blob, "{c}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(real.join("bin/big"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o555, "{c}");
        assert_eq!(
            std::fs::read_link(real.join("lib")).unwrap(),
            Path::new("bin")
        );
        let info = sub.store().query(&a).unwrap().unwrap();
        assert_eq!(info.nar_hash, NarHash::digest(&nar), "{c}");
        assert_eq!(
            store_entries(dir.path()),
            [
                format!("meta/{}.json", a.hash_str()),
                format!("store/{}-{}", a.hash_str(), a.name())
            ],
            "{c}"
        );
    }
}

/// Pulls `a`, signed with the NAR `nar` but served as `file`, every attempt ending after
/// `end_after` bytes if set, with two cores (this NAR's thread leaves one spare for its
/// decoder, on any machine); returns the error and what the store holds afterwards.
async fn pull_big_failing(
    c: Compression,
    a: &StorePath,
    nar: &[u8],
    file: Vec<u8>,
    end_after: Option<usize>,
) -> (SubstituteError, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeFetch::default();
    let nar_url = publish_nar(&fake, a, c, nar, file);
    if let Some(n) = end_after {
        for _ in 0..3 {
            fake.misbehave(&nar_url, Misbehave::EndAfter(n));
        }
    }
    let sub = substituter(&config(dir.path(), &[CACHE1]), fake).with_cores(2);
    let e = sub
        .materialise(std::slice::from_ref(a), &NoProgress)
        .await
        .unwrap_err();
    (e, store_entries(dir.path()))
}

#[tokio::test]
async fn a_big_nar_corrupt_midway_wrong_or_truncated_leaves_nothing() {
    let nar = big_nar(11);
    let a = sp("big", 1);
    for c in [Compression::Xz, Compression::Zstd] {
        // The compressed stream damaged in its middle: xz's check fails the decoding; zstd
        // (no content checksum, as Nix writes it) decodes to other bytes, and NarHash fails.
        let mut file = compress(c, &nar);
        let mid = file.len() / 2;
        for b in &mut file[mid..mid + 64] {
            *b ^= 0x55;
        }
        let (e, left) = pull_big_failing(c, &a, &nar, file, None).await;
        match c {
            Compression::Xz => assert!(matches!(e, SubstituteError::Decompress { .. }), "{c}: {e}"),
            _ => assert!(
                matches!(e, SubstituteError::HashMismatch { .. }),
                "{c}: {e}"
            ),
        }
        assert_eq!(left, Vec::<String>::new(), "{c}");

        // A well-formed stream of another NAR of the same size: NarHash mismatch.
        let other = big_nar(12);
        assert_eq!(other.len(), nar.len());
        let (e, left) = pull_big_failing(c, &a, &nar, compress(c, &other), None).await;
        assert_eq!(
            e.to_string(),
            format!(
                "{a}: NAR hash mismatch (expected {}, got {})",
                NarHash::digest(&nar),
                NarHash::digest(&other)
            ),
            "{c}"
        );
        assert_eq!(left, Vec::<String>::new(), "{c}");

        // Cut short by the server, cleanly, every attempt: truncated, as for a small NAR.
        let file = compress(c, &nar);
        let half = file.len() / 2;
        let (e, left) = pull_big_failing(c, &a, &nar, file, Some(half)).await;
        assert_eq!(e.to_string(), format!("{a}: NAR truncated"), "{c}");
        assert_eq!(left, Vec::<String>::new(), "{c}");
    }
}
