//! Wide synthetic caches: a signed binary cache of many tiny store paths shaped like a real
//! closure (a root, a tree of fan-out 4 below it, one more reference per path to a path
//! deeper down, and one base path every other path references, as glibc is), for measuring
//! what a pull costs per path (memory, time) without building the paths with Nix.
//!
//! The cache is deterministic for a given `n`: the same store paths, NARs and signatures.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use nixenv_core::nix::nar::NarNode;
use nixenv_core::nix::narinfo::Compression;
use nixenv_core::nix::signature::SecretKey;
use nixenv_core::nix::{nixbase32, NarHash, NarInfo, StorePath};
use sha2::{Digest, Sha256};

/// How many paths each path references below it in the tree.
const FANOUT: usize = 4;
/// Extra references per path, to pseudo-random paths deeper down.
const EXTRA_REFS: usize = 1;

/// The store path of member `i` of the `n`-path wide closure (`i == 0` is the root).
pub fn wide_path(n: usize, i: usize) -> StorePath {
    let digest: [u8; 32] = Sha256::digest(format!("nixenv-wide {n} {i}").as_bytes()).into();
    let mut d = [0u8; 20];
    d.copy_from_slice(&digest[..20]);
    let name = if i == 0 {
        "wide-root".to_owned()
    } else if i == n - 1 {
        "wide-base".to_owned()
    } else {
        format!("wide-{i}")
    };
    StorePath::new(d, &name).expect("a valid generated store path")
}

/// The references of member `i` (indices), sorted, without duplicates: always higher than
/// `i`, so the graph has no cycle.
pub fn wide_references(n: usize, i: usize) -> Vec<usize> {
    let mut refs = Vec::new();
    for c in 1..=FANOUT {
        let child = i * FANOUT + c;
        if child < n - 1 {
            refs.push(child);
        }
    }
    // Pseudo-random paths deeper down (a splitmix step of i), and the base.
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n as u64;
    for _ in 0..EXTRA_REFS {
        x ^= x >> 31;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let span = (n - 1).saturating_sub(i + 1);
        if span > 0 {
            refs.push(i + 1 + (x % span as u64) as usize);
        }
    }
    if i != n - 1 {
        refs.push(n - 1);
    }
    refs.sort_unstable();
    refs.dedup();
    refs
}

/// Writes an `n`-path wide cache (uncompressed NARs) into `dir`, signed with `key`; returns
/// the root. `n` must be at least 2.
pub fn write_wide_cache(dir: &Path, n: usize, key: &SecretKey) -> io::Result<StorePath> {
    assert!(n >= 2, "a wide closure has at least a root and a base");
    fs::create_dir_all(dir.join("nar"))?;
    fs::write(
        dir.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
    )?;
    let paths: Vec<StorePath> = (0..n).map(|i| wide_path(n, i)).collect();
    for (i, path) in paths.iter().enumerate() {
        let nar = NarNode::dir([
            ("index", NarNode::file(format!("{i}\n").into_bytes())),
            ("name", NarNode::file(format!("{path}\n").into_bytes())),
        ])
        .to_nar();
        let nar_hash = NarHash::digest(&nar);
        let rel = format!("nar/{}.nar", nixbase32::encode(nar_hash.as_bytes()));
        let mut info = NarInfo {
            store_path: path.clone(),
            url: rel.clone(),
            compression: Compression::None,
            file_hash: Some(nar_hash),
            file_size: Some(nar.len() as u64),
            nar_hash,
            nar_size: nar.len() as u64,
            references: wide_references(n, i)
                .into_iter()
                .map(|r| paths[r].clone())
                .collect(),
            deriver: None,
            system: Some("x86_64-linux".into()),
            sigs: vec![],
            ca: None,
        };
        key.sign_narinfo(&mut info);
        fs::write(dir.join(&rel), &nar)?;
        let mut f = fs::File::create(dir.join(format!("{}.narinfo", path.hash_str())))?;
        f.write_all(info.render().as_bytes())?;
    }
    Ok(paths[0].clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_is_reachable_from_the_root_and_references_point_down() {
        let n = 1000;
        let mut seen = vec![false; n];
        let mut stack = vec![0usize];
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            for r in wide_references(n, i) {
                assert!(r > i, "{i} references {r}");
                stack.push(r);
            }
        }
        assert!(seen.iter().all(|s| *s));
    }
}
