//! `nixenv-bench-decode CACHE_DIR < STORE_PATHS`: the CPU cost of a pull's work without the
//! pull, for `bench/pull.sh`. For each store path on standard input (absolute, one a line)
//! it reads `CACHE_DIR/<hash>.narinfo` and its NAR file into memory, then, on this one
//! thread and one NAR after the other:
//!
//! 1. decodes it with the decoder nixenv pulls with
//!    (`nixenv_core::substituter::decode::decoder`) into nothing;
//! 2. decodes, hashes (SHA-256, checked against the narinfo's NarHash) and unpacks it into a
//!    temporary directory (`nixenv_core::store::unpack::unpack`), as a pull does minus the
//!    network, the store's lock and record, and the commit.
//!
//! The CPU time of each step (user + system, `getrusage(RUSAGE_THREAD)`, reading the file
//! not counted) is printed as `key=value` lines: totals over all NARs, and the longest single
//! NAR's decode, which no parallelism across NARs can shorten.

use std::io::{self, BufRead, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use nixenv_core::nix::hash::HashingReader;
use nixenv_core::nix::nar::NarLimits;
use nixenv_core::nix::{NarInfo, StorePath};
use nixenv_core::store::unpack::unpack;
use nixenv_core::substituter::decode::decoder;

/// CPU time of the calling thread so far, in seconds.
fn thread_cpu() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    assert_eq!(rc, 0, "getrusage: {}", io::Error::last_os_error());
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

struct Nar {
    info: NarInfo,
    file: Vec<u8>,
}

fn load(cache: &Path, path: &StorePath) -> anyhow::Result<Nar> {
    let narinfo = cache.join(format!("{}.narinfo", path.hash_str()));
    let text =
        std::fs::read_to_string(&narinfo).with_context(|| format!("read {}", narinfo.display()))?;
    let info = NarInfo::parse(&text).with_context(|| format!("parse {}", narinfo.display()))?;
    let file_path = cache.join(&info.url);
    let file =
        std::fs::read(&file_path).with_context(|| format!("read {}", file_path.display()))?;
    Ok(Nar { info, file })
}

/// Decodes `nar` into nothing; returns the decoded size.
fn decode(nar: &Nar) -> anyhow::Result<u64> {
    let mut r = decoder(nar.info.compression, &nar.file[..])?;
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf)? {
            0 => return Ok(n),
            k => n += k as u64,
        }
    }
}

/// Decodes, hashes and unpacks `nar` at `target`; checks NarHash and NarSize.
fn decode_hash_unpack(nar: &Nar, target: &Path) -> anyhow::Result<()> {
    let mut hashing = HashingReader::new(decoder(nar.info.compression, &nar.file[..])?);
    unpack(&mut hashing, target, &NarLimits::default())?;
    // The rest of the stream (none, for a well-formed NAR) is hashed too.
    io::copy(&mut hashing, &mut io::sink())?;
    let (hash, size) = hashing.finish();
    if hash != nar.info.nar_hash || size != nar.info.nar_size {
        bail!("{}: NarHash or NarSize mismatch", nar.info.store_path);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cache = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: nixenv-bench-decode CACHE_DIR < STORE_PATHS")?,
    );
    let mut nars = Vec::new();
    for line in io::stdin().lock().lines() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let path = StorePath::from_absolute_path(line)?;
        nars.push(load(&cache, &path)?);
    }
    if nars.is_empty() {
        bail!("no store path on standard input");
    }

    let (mut decode_total, mut longest) = (0.0f64, 0.0f64);
    let (mut nar_bytes, mut file_bytes) = (0u64, 0u64);
    for nar in &nars {
        let t0 = thread_cpu();
        let n = decode(nar)?;
        let t = thread_cpu() - t0;
        if n != nar.info.nar_size {
            bail!(
                "{}: decoded {n} bytes, NarSize {}",
                nar.info.store_path,
                nar.info.nar_size
            );
        }
        decode_total += t;
        longest = longest.max(t);
        nar_bytes += n;
        file_bytes += nar.file.len() as u64;
    }

    let tmp = tempfile::tempdir()?;
    let mut full_total = 0.0f64;
    for (i, nar) in nars.iter().enumerate() {
        let target = tmp.path().join(i.to_string());
        let t0 = thread_cpu();
        decode_hash_unpack(nar, &target)?;
        full_total += thread_cpu() - t0;
        nixenv_core::store::remove::remove_tree(&target)?;
    }

    println!("nars={}", nars.len());
    println!("nar_bytes={nar_bytes}");
    println!("file_bytes={file_bytes}");
    println!("decode_cpu_s={decode_total:.3}");
    println!("longest_decode_s={longest:.3}");
    println!("decode_hash_unpack_cpu_s={full_total:.3}");
    Ok(())
}
