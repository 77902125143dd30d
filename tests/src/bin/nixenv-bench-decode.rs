//! `nixenv-bench-decode CACHE_DIR [UNPACK_DIR] < STORE_PATHS`: the CPU cost of a pull's work
//! without the pull, for `bench/pull.sh`. For each store path on standard input (absolute,
//! one a line) it reads `CACHE_DIR/<hash>.narinfo` and its NAR file into memory, then
//! measures, one part of the work at a time and one NAR after the other:
//!
//! 1. **loopback**: every compressed NAR sent over one TCP connection on 127.0.0.1, as a
//!    cache on the same machine sends it (the CPU time of the sending and the receiving
//!    thread: the kernel's copies, no HTTP);
//! 2. **decode**: decoding it with the decoder nixenv pulls with
//!    (`nixenv_core::substituter::decode::decoder`) into nothing;
//! 3. **hash**: SHA-256 of the decoded NAR (checked against the narinfo's NarHash);
//! 4. **unpack**: unpacking the decoded NAR from memory into a new directory under
//!    `UNPACK_DIR` (default: the system's temporary directory) with the store's unpacker
//!    (`nixenv_core::store::unpack::unpack`). On a disk file system part of that cost is
//!    the kernel's writeback, on other threads and not counted here; on tmpfs it is all
//!    on this thread. What was unpacked stays until every NAR is unpacked, as a pull's
//!    store keeps it (removing each tree at once lets the kernel hand the freed pages straight
//!    to the next NAR: 0.24–0.27 s instead of 0.30–0.32 s for the zstd benchmark's closure
//!    on tmpfs).
//!
//! 5. **one pass** (not part of the work): decoding, hashing and unpacking each NAR in one
//!    pass on one thread, interleaved as a pull does them, to show what the interleaving costs
//!    against the parts measured apart.
//!
//! The CPU time of each part (user + system, `getrusage(RUSAGE_THREAD)`; reading the files
//! and removing what was unpacked not counted) is printed as `key=value` lines, with the
//! longest single NAR's decode, which no parallelism across NARs can shorten.

use std::io::{self, BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use nixenv_core::nix::hash::{HashingReader, NarHash};
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

/// Sends every NAR file over one TCP connection on 127.0.0.1 and reads it on another
/// thread in 64 KiB reads; returns the CPU time of both threads.
fn loopback(nars: &[Nar]) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let total: u64 = nars.iter().map(|n| n.file.len() as u64).sum();
    std::thread::scope(|s| {
        let sender = s.spawn(move || -> io::Result<f64> {
            let mut conn = TcpStream::connect(addr)?;
            let t0 = thread_cpu();
            for nar in nars {
                conn.write_all(&nar.file)?;
            }
            conn.shutdown(std::net::Shutdown::Write)?;
            Ok(thread_cpu() - t0)
        });
        let (mut conn, _) = listener.accept()?;
        let mut buf = vec![0u8; 64 << 10];
        let t0 = thread_cpu();
        let mut got = 0u64;
        loop {
            match conn.read(&mut buf)? {
                0 => break,
                k => got += k as u64,
            }
        }
        let received = thread_cpu() - t0;
        let sent = sender.join().expect("the sending thread panicked")?;
        if got != total {
            bail!("loopback: received {got} of {total} bytes");
        }
        Ok(sent + received)
    })
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let cache = PathBuf::from(
        args.next()
            .context("usage: nixenv-bench-decode CACHE_DIR [UNPACK_DIR] < STORE_PATHS")?,
    );
    let unpack_dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
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

    let loopback_total = loopback(&nars)?;

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

    let tmp = tempfile::tempdir_in(&unpack_dir)
        .with_context(|| format!("a directory in {}", unpack_dir.display()))?;
    let (mut hash_total, mut unpack_total) = (0.0f64, 0.0f64);
    for (i, nar) in nars.iter().enumerate() {
        let mut decoded = Vec::with_capacity(usize::try_from(nar.info.nar_size)?);
        decoder(nar.info.compression, &nar.file[..])?.read_to_end(&mut decoded)?;

        let t0 = thread_cpu();
        let hash = NarHash::digest(&decoded);
        hash_total += thread_cpu() - t0;
        if hash != nar.info.nar_hash {
            bail!("{}: NarHash mismatch", nar.info.store_path);
        }

        let target = tmp.path().join(i.to_string());
        let t0 = thread_cpu();
        unpack(&decoded[..], &target, &NarLimits::default())?;
        unpack_total += thread_cpu() - t0;
    }
    remove_all(tmp.path())?;

    // The same work in one pass per NAR, as a pull does it: decoding, hashing and unpacking
    // interleaved on one thread (no network). Not part of the limit; it shows what the
    // interleaving itself costs against the parts measured apart.
    let mut one_pass_total = 0.0f64;
    for (i, nar) in nars.iter().enumerate() {
        let target = tmp.path().join(format!("one-pass-{i}"));
        let t0 = thread_cpu();
        let mut hashing = HashingReader::new(decoder(nar.info.compression, &nar.file[..])?);
        unpack(&mut hashing, &target, &NarLimits::default())?;
        let (hash, _) = hashing.finish();
        one_pass_total += thread_cpu() - t0;
        if hash != nar.info.nar_hash {
            bail!("{}: NarHash mismatch", nar.info.store_path);
        }
    }
    remove_all(tmp.path())?;

    println!("nars={}", nars.len());
    println!("nar_bytes={nar_bytes}");
    println!("file_bytes={file_bytes}");
    println!("loopback_cpu_s={loopback_total:.3}");
    println!("decode_cpu_s={decode_total:.3}");
    println!("longest_decode_s={longest:.3}");
    println!("hash_cpu_s={hash_total:.3}");
    println!("unpack_cpu_s={unpack_total:.3}");
    let work = loopback_total + decode_total + hash_total + unpack_total;
    println!("work_cpu_s={work:.3}");
    println!("one_pass_cpu_s={one_pass_total:.3}");
    Ok(())
}

/// Removes every tree unpacked under `dir`.
fn remove_all(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        nixenv_core::store::remove::remove_tree(&entry?.path())?;
    }
    Ok(())
}
