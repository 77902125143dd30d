//! `nixenv-make-wide-cache DIR N SECRET_KEY_FILE`: writes a signed cache of an N-path
//! synthetic closure into DIR (see `nixenv_testkit::wide`) and prints its root store path.
//! For benchmarks of what a pull costs per path.

use std::path::PathBuf;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, n, key] = args.as_slice() else {
        anyhow::bail!("usage: nixenv-make-wide-cache DIR N SECRET_KEY_FILE");
    };
    let n: usize = n
        .parse()
        .with_context(|| format!("N {n:?} is not a number"))?;
    anyhow::ensure!(n >= 2, "N must be at least 2");
    let key_text = std::fs::read_to_string(key).with_context(|| format!("reading {key}"))?;
    let key = nixenv_core::nix::SecretKey::parse(key_text.trim())
        .with_context(|| format!("{key}: not a Nix secret key"))?;
    let root = nixenv_testkit::wide::write_wide_cache(&PathBuf::from(dir), n, &key)
        .with_context(|| format!("writing the cache into {dir}"))?;
    println!("{}", root.to_absolute_path());
    Ok(())
}
