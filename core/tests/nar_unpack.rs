//! Malicious NARs against the unpacker: bad names, symlink tricks, limits and framing errors
//! are refused, and nothing is left in the target's parent or written outside it.

use std::path::{Path, PathBuf};

use nixenv_core::nix::nar::{self, write_string, NarError, NarLimits, NarNode, MAGIC};
use nixenv_core::store::remove::remove_tree;
use nixenv_core::store::unpack::{unpack, UnpackError};

fn read(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name),
    )
    .unwrap()
}

struct Sandbox {
    _dir: tempfile::TempDir,
    parent: PathBuf,
    outside: PathBuf,
    target: PathBuf,
}

fn sandbox() -> Sandbox {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&parent).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let target = parent.join("target");
    Sandbox {
        _dir: dir,
        parent,
        outside,
        target,
    }
}

/// Unpacks `nar`, expects a failure, removes the target and checks nothing
/// is left anywhere.
fn refused(nar: &[u8], limits: &NarLimits) -> String {
    let s = sandbox();
    let e = unpack(nar, &s.target, limits).expect_err("malicious NAR accepted");
    remove_tree(&s.target).unwrap();
    assert_eq!(
        std::fs::read_dir(&s.parent).unwrap().count(),
        0,
        "left in parent: {e}"
    );
    assert_eq!(
        std::fs::read_dir(&s.outside).unwrap().count(),
        0,
        "written outside: {e}"
    );
    e.to_string()
}

fn dir<N: Into<Vec<u8>>>(e: impl IntoIterator<Item = (N, NarNode)>) -> NarNode {
    NarNode::dir(e)
}

#[test]
fn malicious_names_are_refused() {
    let l = NarLimits::default();
    let f = || NarNode::file("pwned");
    let cases: Vec<(NarNode, &str)> = vec![
        (
            dir([("..", dir([("x", f())]))]),
            "invalid NAR at /: entry name \"..\" is . or ..",
        ),
        (
            dir([("a", dir([("..", f())]))]),
            "invalid NAR at /a: entry name \"..\" is . or ..",
        ),
        (dir([(".", f())]), "is . or .."),
        (dir([("a/../../outside/x", f())]), "contains '/'"),
        (dir([("/etc", f())]), "contains '/'"),
        (dir([(&b"a\0b"[..], f())]), "contains NUL"),
        (dir([("", f())]), "is empty"),
        (
            dir([("b", f()), ("a", f())]),
            "entry \"a\" not sorted after \"b\"",
        ),
        (dir([("a", f()), ("a", f())]), "duplicate entry \"a\""),
    ];
    for (node, msg) in cases {
        let e = refused(&node.to_nar(), &l);
        assert!(e.contains(msg), "{e} does not contain {msg}");
    }
}

#[test]
fn cannot_write_through_a_symlink() {
    let s = sandbox();
    let outside = s.outside.to_str().unwrap().to_owned();
    // A symlink, then a directory of the same name (needs a duplicate entry).
    let nar = dir([
        ("a", NarNode::symlink(outside.clone())),
        ("a", dir([("x", NarNode::file("pwned"))])),
    ])
    .to_nar();
    assert!(refused(&nar, &NarLimits::default()).contains("duplicate entry \"a\""));
    // Same with a file entry.
    let nar = dir([
        ("a", NarNode::symlink(outside.clone())),
        ("a", NarNode::file("pwned")),
    ])
    .to_nar();
    assert!(refused(&nar, &NarLimits::default()).contains("duplicate"));
    // A valid NAR whose symlinks point outside: they stay symlinks, nothing is followed.
    let nar = dir([
        ("a", NarNode::symlink(outside.clone())),
        ("b", dir([("x", NarNode::file("ok"))])),
        ("c", NarNode::symlink("../../outside/y")),
    ])
    .to_nar();
    unpack(&nar[..], &s.target, &NarLimits::default()).unwrap();
    assert_eq!(
        std::fs::read_link(s.target.join("a")).unwrap(),
        Path::new(&outside)
    );
    assert_eq!(std::fs::read_dir(&s.outside).unwrap().count(), 0);
    remove_tree(&s.target).unwrap();
    assert_eq!(std::fs::read_dir(&s.outside).unwrap().count(), 0);
    // The target itself being a symlink to outside is refused.
    std::os::unix::fs::symlink(&s.outside, &s.target).unwrap();
    let e = unpack(
        &dir([("x", NarNode::file("pwned"))]).to_nar()[..],
        &s.target,
        &NarLimits::default(),
    )
    .unwrap_err();
    assert!(matches!(e, UnpackError::TargetExists { .. }), "{e}");
    assert_eq!(std::fs::read_dir(&s.outside).unwrap().count(), 0);
}

#[test]
fn limits_are_enforced() {
    let mut deep = NarNode::file("x");
    for _ in 0..300 {
        deep = dir([("d", deep)]);
    }
    assert!(refused(&deep.to_nar(), &NarLimits::default()).contains("deeper than 256 levels"));
    let big = dir([
        ("a", NarNode::file(vec![0u8; 4096])),
        ("b", NarNode::file(vec![0u8; 4096])),
    ]);
    let l = NarLimits {
        max_total_size: 8191,
        ..NarLimits::default()
    };
    assert!(refused(&big.to_nar(), &l).contains("invalid NAR at /b: files larger than 8191 bytes"));
    let l = NarLimits {
        max_entries: 2,
        ..NarLimits::default()
    };
    assert!(refused(&big.to_nar(), &l).contains("more than 2 entries"));
    let long = dir([(vec![b'n'; 256], NarNode::file("x"))]);
    assert!(refused(&long.to_nar(), &NarLimits::default()).contains("longer than 255"));
    let target = dir([("l", NarNode::symlink(vec![b't'; 4096]))]);
    assert!(refused(&target.to_nar(), &NarLimits::default()).contains("symlink target too long"));
}

#[test]
fn framing_errors_are_refused() {
    let good = read("golden-tree.nar");
    let l = NarLimits::default();
    // Truncated at many points, including inside file contents.
    for cut in (0..good.len())
        .step_by(37)
        .chain([good.len() - 1, good.len() - 8])
    {
        let e = refused(&good[..cut], &l);
        assert!(
            e.contains("truncated") || e.contains("does not start with"),
            "cut {cut}: {e}"
        );
    }
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0u8; 8]);
    assert_eq!(
        refused(&trailing, &l),
        "invalid NAR: trailing data after the archive"
    );
    let mut garbage = good.clone();
    garbage.extend_from_slice(b"\x01");
    assert!(refused(&garbage, &l).contains("trailing data"));

    // Non-zero padding after a 1-byte file's contents.
    let nar = dir([("f", NarNode::file("x"))]).to_nar();
    let pos = nar
        .windows(8)
        .rposition(|w| w == b"x\0\0\0\0\0\0\0")
        .unwrap();
    let mut bad = nar.clone();
    bad[pos + 3] = b'!';
    assert_eq!(refused(&bad, &l), "invalid NAR at /f: non-zero padding");
    // ... and after a name.
    let pos = nar
        .windows(8)
        .position(|w| w == b"f\0\0\0\0\0\0\0")
        .unwrap();
    let mut bad = nar.clone();
    bad[pos + 7] = 1;
    assert!(refused(&bad, &l).contains("non-zero padding"));

    let mut magic = Vec::new();
    write_string(&mut magic, b"nix-archive-2").unwrap();
    assert_eq!(
        refused(&magic, &l),
        format!("invalid NAR: does not start with {MAGIC:?}")
    );
    assert!(matches!(
        nar::read_tree(&b""[..], &l),
        Err(NarError::BadMagic)
    ));
}
