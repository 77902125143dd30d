//! `nixenv-fixtures`: builds the test fixtures with the host's Nix if they are missing or stale
//! (as the first test needing them would) and prints their directory. For scripts that run the
//! test executables elsewhere, e.g. `tests/matrix` inside another Debian root, which passes the
//! directory on as `NIXENV_FIXTURES_DIR`.

fn main() -> anyhow::Result<()> {
    let fixtures = nixenv_testkit::fixtures::Fixtures::try_get()?;
    println!("{}", fixtures.dir.display());
    Ok(())
}
