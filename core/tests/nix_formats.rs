//! Golden tests of the Nix formats against files produced by real Nix
//! (`data/make-golden.sh`, see `data/README.md`). The unpack-vs-Nix comparisons run
//! `nix-store` (Debian's nix-bin). Malicious NARs against the unpacker are in
//! `nar_unpack.rs`; each NAR direction's own tests are in `src/nix/nar/{read,write}.rs`.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use nixenv_core::nix::hash::HashingReader;
use nixenv_core::nix::nar::{self, NarLimits, NarNode};
use nixenv_core::nix::{
    nixbase32, Compression, NarHash, NarInfo, PublicKey, SecretKey, SignatureError, StorePath,
    TrustedKeys,
};
use nixenv_core::store::unpack::{unpack, unpack_with, UnpackOptions};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}
fn read(name: &str) -> Vec<u8> {
    std::fs::read(data(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}
fn text(name: &str) -> String {
    String::from_utf8(read(name)).unwrap()
}
fn narinfo(name: &str) -> NarInfo {
    NarInfo::parse(&text(name)).unwrap()
}
fn key(name: &str) -> PublicKey {
    PublicKey::parse(text(name).trim()).unwrap()
}

#[test]
fn nixbase32_matches_nix_hash() {
    let lines = text("nixbase32.txt");
    let mut n = 0;
    for line in lines.lines() {
        let (hex, b32) = line.split_once(' ').unwrap();
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        assert_eq!(nixbase32::encode(&bytes), b32, "{hex}");
        assert_eq!(nixbase32::decode(b32).unwrap(), bytes, "{b32}");
        if bytes.len() == 32 {
            let h = NarHash::parse(&format!("sha256:{hex}")).unwrap();
            assert_eq!(h.to_string(), format!("sha256:{b32}"));
            assert_eq!(NarHash::parse(&h.to_sri()).unwrap(), h);
        }
        n += 1;
    }
    assert_eq!(n, 10);
}

#[test]
fn narinfo_round_trips_byte_for_byte() {
    for name in ["golden-tree.narinfo", "golden-ref.narinfo"] {
        let raw = text(name);
        let ni = NarInfo::parse(&raw).unwrap();
        assert_eq!(ni.render(), raw, "{name}");
        assert_eq!(ni.compression, Compression::Xz);
        assert_eq!(ni.sigs.len(), 1);
    }
    let tree = narinfo("golden-tree.narinfo");
    let r = narinfo("golden-ref.narinfo");
    assert!(tree.references.is_empty());
    assert!(tree.ca.as_deref().unwrap().starts_with("fixed:r:sha256:"));
    assert_eq!(r.references(), vec![tree.store_path.clone()]);
    assert_eq!(r.store_path.name(), "golden-ref");
    assert_eq!(r.deriver.as_ref().unwrap().name(), "golden-ref.drv");
    assert_eq!(
        StorePath::from_absolute_path(&tree.store_path.to_string()).unwrap(),
        tree.store_path
    );
}

/// The fingerprint from the raw narinfo text, independently of the parser.
fn raw_fingerprint(raw: &str) -> String {
    let field = |k: &str| {
        raw.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or("")
            .to_owned()
    };
    let refs: Vec<String> = field("References")
        .split_whitespace()
        .map(|r| format!("/nix/store/{r}"))
        .collect();
    format!(
        "1;{};{};{};{}",
        field("StorePath"),
        field("NarHash"),
        field("NarSize"),
        refs.join(",")
    )
}

#[test]
fn fingerprint_and_real_signature() {
    let trusted = TrustedKeys {
        keys: vec![key("other-test-1.pub"), key("golden-test-1.pub")],
    };
    for name in ["golden-tree.narinfo", "golden-ref.narinfo"] {
        let raw = text(name);
        let ni = NarInfo::parse(&raw).unwrap();
        assert_eq!(ni.fingerprint(), raw_fingerprint(&raw));
        assert_eq!(trusted.verify(&ni).unwrap().name, "golden-test-1", "{name}");
    }
}

#[test]
fn signature_rejected_for_other_keys_and_tampering() {
    let ni = narinfo("golden-ref.narinfo");
    let other = TrustedKeys::from_strs([text("other-test-1.pub").trim()]).unwrap();
    let e = other.verify(&ni).unwrap_err();
    assert_eq!(e.to_string(), "signature not trusted (keys: golden-test-1)");
    assert_eq!(
        format!("{}: {e}", ni.store_path),
        "/nix/store/0cndcdgdmpilkli222kaj4f7b9dbhp3m-golden-ref: signature not trusted (keys: golden-test-1)"
    );

    // A key with the trusted name but other key material.
    let impostor = SecretKey::from_seed("golden-test-1", [42; 32]).public_key();
    let e = TrustedKeys {
        keys: vec![impostor],
    }
    .verify(&ni)
    .unwrap_err();
    assert_eq!(
        e,
        SignatureError::BadSignature {
            key: "golden-test-1".into()
        }
    );
    assert_eq!(e.to_string(), "bad signature by key golden-test-1");

    let good = TrustedKeys {
        keys: vec![key("golden-test-1.pub")],
    };
    let tree = narinfo("golden-tree.narinfo");
    let tampered = [
        text("golden-ref.narinfo").replace("NarSize: 600", "NarSize: 601"),
        text("golden-ref.narinfo").replace(
            &format!("NarHash: {}", ni.nar_hash),
            &format!("NarHash: {}", tree.nar_hash),
        ),
        text("golden-ref.narinfo").replace(
            "References: hggmvpm212m8359fj3g0cz69jksk7dnm-golden-tree",
            "References: ",
        ),
        text("golden-ref.narinfo").replace("-golden-ref\n", "-golden-reg\n"),
    ];
    for t in tampered {
        let t = NarInfo::parse(&t).unwrap();
        assert_ne!(t, ni);
        assert_eq!(
            good.verify(&t).unwrap_err(),
            SignatureError::BadSignature {
                key: "golden-test-1".into()
            }
        );
    }
    // Changing the signature itself.
    let mut t = ni.clone();
    let sig = t.sigs[0].clone();
    let flipped = if sig.contains("/CA==") {
        sig.replace("/CA==", "/CQ==")
    } else {
        sig.replace("==", "A=")
    };
    t.sigs[0] = flipped;
    assert!(good.verify(&t).is_err());
}

#[test]
fn nar_hashes_and_sizes_match_narinfo() {
    for (nar, info) in [
        ("golden-tree.nar", "golden-tree.narinfo"),
        ("golden-ref.nar", "golden-ref.narinfo"),
    ] {
        let bytes = read(nar);
        let ni = narinfo(info);
        assert_eq!(NarHash::digest(&bytes), ni.nar_hash, "{nar}");
        assert_eq!(bytes.len() as u64, ni.nar_size, "{nar}");
        // Streaming: hash while parsing.
        let mut r = HashingReader::new(&bytes[..]);
        let tree = nar::read_tree(&mut r, &NarLimits::default()).unwrap();
        assert_eq!(r.finish(), (ni.nar_hash, ni.nar_size));
        assert_eq!(tree.to_nar(), bytes, "{nar} re-serialised");
    }
    // The compressed file as `nix copy` wrote it.
    let ni = narinfo("golden-tree.narinfo");
    let xz = read("golden-tree.nar.xz");
    assert_eq!(Some(NarHash::digest(&xz)), ni.file_hash);
    assert_eq!(Some(xz.len() as u64), ni.file_size);
    assert!(ni.url.ends_with(".nar.xz"));
    let mut nar = Vec::new();
    xz2::read::XzDecoder::new(&xz[..])
        .read_to_end(&mut nar)
        .unwrap();
    assert_eq!(nar, read("golden-tree.nar"));
}

#[test]
fn golden_tree_structure() {
    let tree = nar::read_tree(&read("golden-tree.nar")[..], &NarLimits::default()).unwrap();
    let NarNode::Directory(top) = &tree else {
        panic!("root is a directory")
    };
    let names: Vec<&[u8]> = top.iter().map(|(n, _)| n.as_slice()).collect();
    assert_eq!(names, [&b"bin"[..], b"docs", b"empty-dir", b"share"]);
    let NarNode::Directory(bin) = &top[0].1 else {
        panic!()
    };
    assert!(bin.iter().any(|(n, e)| n == b"golden"
        && matches!(
            e,
            NarNode::File {
                executable: true,
                ..
            }
        )));
    assert!(bin
        .iter()
        .any(|(n, e)| n == b"golden-link" && *e == NarNode::symlink("golden")));
    let NarNode::Directory(share) = &top[3].1 else {
        panic!()
    };
    let names: Vec<&[u8]> = share.iter().map(|(n, _)| n.as_slice()).collect();
    assert_eq!(names, [&b"Zebra"[..], b"apple", b"doc", b"empty-file"]);
}

// ---------------------------------------------------------------- unpacking

fn nix_store(args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write as _;
    // nixenv's own Nix configuration (tests/nix/nix.conf), never the host's /etc/nix.
    let conf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/nix");
    let mut cmd = Command::new("nix-store");
    cmd.env("NIX_USER_CONF_FILES", conf_dir.join("nix.conf"))
        .env("NIX_CONF_DIR", &conf_dir)
        .env_remove("NIX_CONFIG")
        .args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("nix-store (Debian's nix-bin) must be installed");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nix-store {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    File { executable: bool, contents: Vec<u8> },
    Link(PathBuf),
}

fn walk(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn go(root: &Path, rel: PathBuf, out: &mut BTreeMap<PathBuf, Entry>) {
        let p = if rel.as_os_str().is_empty() {
            root.to_owned()
        } else {
            root.join(&rel)
        };
        let m = std::fs::symlink_metadata(&p).unwrap();
        let e = if m.file_type().is_symlink() {
            Entry::Link(std::fs::read_link(&p).unwrap())
        } else if m.is_dir() {
            for c in std::fs::read_dir(&p).unwrap() {
                go(root, rel.join(c.unwrap().file_name()), out);
            }
            Entry::Dir
        } else {
            Entry::File {
                executable: m.permissions().mode() & 0o100 != 0,
                contents: std::fs::read(&p).unwrap(),
            }
        };
        out.insert(rel, e);
    }
    let mut out = BTreeMap::new();
    go(root, PathBuf::new(), &mut out);
    out
}

/// Modes and mtimes as Nix leaves them in its store.
fn assert_canonical(root: &Path) {
    for (rel, e) in walk(root) {
        let p = if rel.as_os_str().is_empty() {
            root.to_owned()
        } else {
            root.join(&rel)
        };
        let m = std::fs::symlink_metadata(p).unwrap();
        let mode = m.permissions().mode() & 0o7777;
        match e {
            Entry::Dir => assert_eq!(mode, 0o555, "{rel:?}"),
            Entry::File {
                executable: true, ..
            } => assert_eq!(mode, 0o555, "{rel:?}"),
            Entry::File {
                executable: false, ..
            } => assert_eq!(mode, 0o444, "{rel:?}"),
            Entry::Link(_) => {}
        }
        assert_eq!(m.mtime(), 1, "{rel:?}");
    }
}

#[test]
fn unpack_matches_nix_restore_and_dumps_back_identically() {
    let d = tempfile::tempdir().unwrap();
    for (nar, dirs, files, links) in [
        ("golden-tree.nar", 7, 7, 3),
        ("golden-ref.nar", 1, 1, 1),
        ("single-file.nar", 0, 1, 0),
        ("single-symlink.nar", 0, 0, 1),
    ] {
        let bytes = read(nar);
        let ours = d.path().join(format!("ours-{nar}"));
        let stats = unpack_with(
            &bytes[..],
            &ours,
            &NarLimits::default(),
            &UnpackOptions { fsync: true },
        )
        .unwrap();
        assert_eq!(
            (stats.dirs, stats.files, stats.symlinks),
            (dirs, files, links),
            "{nar}"
        );

        // Byte-identical NAR when Nix serialises what we wrote.
        let dumped = nix_store(&["--dump", ours.to_str().unwrap()], None);
        assert_eq!(
            dumped, bytes,
            "{nar}: nix-store --dump of the unpacked tree"
        );

        // Same entries, types, executable bits, contents and link targets as Nix's own restore.
        let theirs = d.path().join(format!("theirs-{nar}"));
        nix_store(&["--restore", theirs.to_str().unwrap()], Some(&bytes));
        assert_eq!(walk(&ours), walk(&theirs), "{nar}");
        assert_canonical(&ours);
    }
}

#[test]
fn unpacked_tree_equals_the_store_path_nix_makes_from_it() {
    // `nix-store --add` of our tree gives the very store path the narinfo names,
    // and Nix's canonical store copy has the same modes and mtimes as ours.
    let d = tempfile::tempdir().unwrap();
    let ours = d.path().join("golden-tree");
    unpack(&read("golden-tree.nar")[..], &ours, &NarLimits::default()).unwrap();
    let added = String::from_utf8(nix_store(&["--add", ours.to_str().unwrap()], None)).unwrap();
    let ni = narinfo("golden-tree.narinfo");
    assert_eq!(added.trim(), ni.store_path.to_string());
    let store = Path::new(added.trim());
    assert_eq!(walk(&ours), walk(store));
    for (rel, _) in walk(store) {
        let a = std::fs::symlink_metadata(ours.join(&rel)).unwrap();
        let b = std::fs::symlink_metadata(store.join(&rel)).unwrap();
        assert_eq!(a.permissions().mode(), b.permissions().mode(), "{rel:?}");
        assert_eq!(a.mtime(), b.mtime(), "{rel:?}");
    }
}
