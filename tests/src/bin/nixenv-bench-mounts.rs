//! What the kernel does per mount: the store of a container as runc builds it, one bind and one
//! read-only remount per store path under a read-only tmpfs, against one read-only bind of the
//! closure's view (`core/src/store/view.rs`), in fresh mount namespaces, alternated.
//!
//! `nixenv-bench-mounts [PATHS] [ROUNDS]` (root). Makes a temporary node store of PATHS
//! (default 1005) synthetic store paths (a directory with `bin/x` and a `share/doc` file each),
//! builds their view with the product's code, then per round, in a new mount namespace: mounts
//! the per-path store (tmpfs, mkdir + bind + remount per path, tmpfs remounted read-only), then
//! detaches it (`umount2(MNT_DETACH)`, which the kernel does when a container's namespace goes),
//! and the same with the view. Prints the median of each step, the cost per path, the kernel
//! memory of the mounts (`mnt_cache` objects in /proc/slabinfo), and the view's build time.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nixenv_core::nix::StorePath;
use nixenv_core::store::view::Views;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (active objects, object size) of the mount slab, if the kernel shows it.
fn mnt_cache() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("mnt_cache "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    Some((f[0], f[2]))
}

fn bind_ro(source: &Path, target: &Path) -> Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind {}", target.display()))?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .with_context(|| format!("remount {}", target.display()))?;
    Ok(())
}

/// runc's store for the per-path spec: a tmpfs, a mountpoint, bind and remount per path, the
/// tmpfs made read-only.
fn per_path(store: &Path, paths: &[StorePath], target: &Path) -> Result<()> {
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=755"),
    )?;
    for p in paths {
        let dst = target.join(p.base_name());
        std::fs::create_dir(&dst)?;
        bind_ro(&store.join(p.base_name()), &dst)?;
    }
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=755"),
    )?;
    Ok(())
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(1005), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(20), |a| a.parse())?;
    let dir = tempfile::Builder::new()
        .prefix("nixenv-bench-mounts")
        .tempdir_in("/var/tmp")?;
    let state = dir.path();
    let store = state.join("store");
    std::fs::create_dir_all(&store)?;
    let mut paths = Vec::with_capacity(n);
    for i in 0..n {
        let mut digest = [0u8; 20];
        digest[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        let p = StorePath::new(digest, &format!("bench-{i}"))?;
        let root = store.join(p.base_name());
        std::fs::create_dir_all(root.join("bin"))?;
        std::fs::create_dir_all(root.join("share/doc"))?;
        std::fs::write(root.join("bin/x"), b"#!/bin/sh\n")?;
        std::fs::write(root.join("share/doc/README"), b"bench\n")?;
        paths.push(p);
    }
    let views = Views::for_boot(state, "bench");
    let t = Instant::now();
    let view = views.build(&paths[..1], &paths)?;
    let build = t.elapsed();

    // Fresh namespace, nothing shared back to the host.
    unshare(CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    let (a, b) = (state.join("a"), state.join("b"));
    std::fs::create_dir(&a)?;
    std::fs::create_dir(&b)?;
    let (mut pp_mount, mut pp_umount, mut v_mount, mut v_umount) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut per_path_slab = None;
    for round in 0..rounds {
        let before = mnt_cache();
        let t = Instant::now();
        per_path(&store, &paths, &a)?;
        pp_mount.push(t.elapsed());
        if round == 0 {
            per_path_slab = before.zip(mnt_cache());
        }
        let t = Instant::now();
        umount2(&a, MntFlags::MNT_DETACH)?;
        pp_umount.push(t.elapsed());

        let t = Instant::now();
        bind_ro(&view.dir, &b)?;
        v_mount.push(t.elapsed());
        let t = Instant::now();
        umount2(&b, MntFlags::MNT_DETACH)?;
        v_umount.push(t.elapsed());
    }
    let (pm, pu, vm, vu) = (
        median(&mut pp_mount),
        median(&mut pp_umount),
        median(&mut v_mount),
        median(&mut v_umount),
    );
    println!("store paths: {n}, rounds: {rounds} (median of each step, ms)");
    println!("| store as | mount | detach | mounts in the container's namespace |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| one bind per path (runc's work for the per-path spec) | {:.2} | {:.2} | {} |",
        ms(pm),
        ms(pu),
        n + 1
    );
    println!(
        "| one bind of the closure view | {:.3} | {:.3} | 1 |",
        ms(vm),
        ms(vu)
    );
    println!(
        "per path: {:.1} µs to mount (bind + read-only remount + mkdir), {:.1} µs to detach",
        pm.as_secs_f64() * 1e6 / n as f64,
        pu.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "ratio per-path / view, mount + detach: {:.0}",
        (pm + pu).as_secs_f64() / (vm + vu).as_secs_f64()
    );
    if let Some(((before, size), (after, _))) = per_path_slab {
        println!(
            "kernel memory (mnt_cache): {} objects of {size} B for the per-path store ≈ {} KiB per container (active objects {before} -> {after})",
            after.saturating_sub(before),
            after.saturating_sub(before) * size / 1024
        );
    }
    println!(
        "building the view once (product code, {n} paths of 2 files and 4 directories): {:.1} ms",
        ms(build)
    );
    Ok(())
}
