//! Fixture closures built by the host's real Nix, their signed binary caches and a catalog.
//! Nix always runs with nixenv's own configuration, `tests/nix/nix.conf` ([`nix_command`]).
//!
//! [`Fixtures::get`] runs `tests/fixtures/build.sh` once per machine into
//! `/var/tmp/nixenv-fixtures-<hash of the fixture sources and host inputs>` (or
//! `$NIXENV_FIXTURES_DIR`), under an exclusive `flock`, so any number of test processes may
//! call it at once; later calls (and later test runs) just read `fixtures.json`. A cold build
//! takes about 10–20 s (mostly `nix copy` compressing with xz), a warm one is instant.
//!
//! What is there (see `tests/fixtures/default.nix` and `build.sh`):
//! - closures: `echoserver-0.1.0` → {`glibc-2.36`, `busybox-1.35.0`, `echoserver-data-0.1.0`},
//!   `echoserver-data` → `busybox`; `bin/echoserver` is an ELF whose interpreter and RPATH
//!   point into the glibc path; busybox has applet symlinks in `bin/`;
//! - caches signed by the trusted key `nixenv-test-1` ([`Cache::Xz`], [`Cache::Zstd`],
//!   [`Cache::Bzip2`], [`Cache::None`]) and negative caches with one spoiled "victim" path
//!   ([`Cache::Untrusted`], [`Cache::BadSig`], [`Cache::TamperedNar`], [`Cache::TruncatedNar`]);
//! - a catalog directory: `acme/echoserver` (generations 1 and 2, current = 2, paths
//!   `[echoserver, busybox]`, env `ECHO_MESSAGE` = `hello from generation 1` / `hello from nix`),
//!   `acme/busybox` (generation 1, `[busybox]`), `acme/missing-path` (generation 1, a path no
//!   cache has: [`Fixtures::missing_path`]).
//!
//! The fixture directory is shared and read-only by convention: copy what you need to modify
//! ([`copy_dir`], [`Fixtures::catalog_copy`]).
//!
//! `echoserver` serves HTTP/1.1 on `0.0.0.0:$PORT` (or `--port N`; default 8080; 0 picks a free
//! port), prints `echoserver listening on 0.0.0.0:PORT`, answers every request with
//! [`EchoReply`] as JSON, and exits with status 0 on SIGTERM/SIGINT.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The fixture sources; their hash names the fixture directory.
const SOURCES: &[(&str, &[u8])] = &[
    ("build.sh", include_bytes!("../fixtures/build.sh")),
    ("nix.conf", include_bytes!("../nix/nix.conf")),
    ("default.nix", include_bytes!("../fixtures/default.nix")),
    ("echoserver.c", include_bytes!("../fixtures/echoserver.c")),
    (
        "nixenv-test-1.pub",
        include_bytes!("../fixtures/keys/nixenv-test-1.pub"),
    ),
    (
        "nixenv-test-1.sec",
        include_bytes!("../fixtures/keys/nixenv-test-1.sec"),
    ),
    (
        "untrusted-1.pub",
        include_bytes!("../fixtures/keys/untrusted-1.pub"),
    ),
    (
        "untrusted-1.sec",
        include_bytes!("../fixtures/keys/untrusted-1.sec"),
    ),
];

/// Host files copied into the fixtures; a change (new Debian package) means a new directory.
const HOST_INPUTS: &[&str] = &[
    "/bin/busybox",
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
];

/// The binary caches made by `build.sh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cache {
    /// Complete, xz-compressed, signed by `nixenv-test-1`.
    Xz,
    /// Complete, zstd-compressed (`.nar.zst`), signed by `nixenv-test-1`.
    Zstd,
    /// Complete, bzip2-compressed, signed by `nixenv-test-1`.
    Bzip2,
    /// Complete, uncompressed (`.nar`), signed by `nixenv-test-1`.
    None,
    /// Like `Xz`, but every narinfo is signed only by `untrusted-1` (victim: echoserver).
    Untrusted,
    /// Like `Xz`, but the echoserver narinfo's Sig is corrupted (64 bytes, wrong value).
    BadSig,
    /// Like `None`, but one byte in the middle of glibc's NAR is flipped (same size).
    TamperedNar,
    /// Like `Xz`, but glibc's `.nar.xz` is cut to half its size.
    TruncatedNar,
}

impl Cache {
    /// Every cache.
    pub const ALL: [Cache; 8] = [
        Cache::Xz,
        Cache::Zstd,
        Cache::Bzip2,
        Cache::None,
        Cache::Untrusted,
        Cache::BadSig,
        Cache::TamperedNar,
        Cache::TruncatedNar,
    ];

    /// The name used in `fixtures.json` and as the directory name under `caches/`.
    pub fn name(self) -> &'static str {
        match self {
            Cache::Xz => "xz",
            Cache::Zstd => "zstd",
            Cache::Bzip2 => "bzip2",
            Cache::None => "none",
            Cache::Untrusted => "untrusted",
            Cache::BadSig => "bad-sig",
            Cache::TamperedNar => "tampered-nar",
            Cache::TruncatedNar => "truncated-nar",
        }
    }
}

/// An ed25519 binary-cache key pair (test keys, committed under `tests/fixtures/keys/`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Key {
    /// Key name, e.g. `nixenv-test-1`.
    pub name: String,
    /// `name:base64` public key, as `trusted-public-keys` takes it.
    pub public: String,
    /// The `name:base64` secret key file (for `nix store sign --key-file`).
    pub secret_file: PathBuf,
}

impl Key {
    /// The key with its secret file in this checkout's `tests/fixtures/keys/`: the fixtures
    /// are shared by every checkout on the machine (their hash covers the keys' contents), so
    /// the path recorded by the checkout that built them may be gone.
    fn in_this_checkout(mut self) -> Key {
        self.secret_file = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/keys")
            .join(format!("{}.sec", self.name));
        self
    }
}

#[derive(Debug, Deserialize)]
struct Keys {
    trusted: Key,
    untrusted: Key,
}

#[derive(Debug, Deserialize)]
struct Paths {
    glibc: String,
    busybox: String,
    data: String,
    echoserver: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Manifest {
    schema: u32,
    system: String,
    dir: PathBuf,
    paths: Paths,
    closures: BTreeMap<String, Vec<String>>,
    keys: Keys,
    caches: BTreeMap<String, PathBuf>,
    victims: BTreeMap<String, String>,
    catalog: PathBuf,
    missing_path: String,
}

/// The built fixtures. Store paths are full `/nix/store/<hash>-<name>` strings.
#[derive(Debug)]
pub struct Fixtures {
    /// The fixture directory (holds `fixtures.json`, `caches/`, `catalog/`, `roots/`).
    pub dir: PathBuf,
    /// Nix system, e.g. `x86_64-linux`.
    pub system: String,
    /// `/nix/store/…-glibc-2.36`: `lib/ld-linux-x86-64.so.2`, `lib/libc.so.6`, `lib64 -> lib`.
    pub glibc: String,
    /// `/nix/store/…-busybox-1.35.0`: static `bin/busybox` and applet symlinks
    /// (`sh`, `ls`, `cat`, `env`, `wget`, `touch`, `id`, `sleep`, `nc`, …).
    pub busybox: String,
    /// `/nix/store/…-echoserver-data-0.1.0`: nested dirs, a symlink chain
    /// (`share/echoserver/link1 -> link2 -> link3 -> a/b/c/d/deep.txt`), a dangling symlink,
    /// empty file and dir, odd names, `bin/data-hello` (a busybox `sh` script).
    pub data: String,
    /// `/nix/store/…-echoserver-0.1.0`: `bin/echoserver` (ELF, glibc), `bin/echoserver-sh`
    /// (busybox shebang wrapper setting `ECHO_DATA`), `share/echoserver/data -> <data>`.
    pub echoserver: String,
    /// The trusted key `nixenv-test-1` (every good cache is signed by it).
    pub trusted_key: Key,
    /// `untrusted-1`, for negative tests.
    pub untrusted_key: Key,
    /// The catalog directory (see the module docs). Do not modify: use [`Fixtures::catalog_copy`].
    pub catalog: PathBuf,
    closures: BTreeMap<String, Vec<String>>,
    caches: BTreeMap<String, PathBuf>,
    victims: BTreeMap<String, String>,
    missing_path: String,
}

static FIXTURES: OnceLock<Fixtures> = OnceLock::new();

impl Fixtures {
    /// The fixtures, built on first use (once per machine, shared by every test process).
    ///
    /// Panics with Nix's output if the build fails.
    pub fn get() -> &'static Fixtures {
        Fixtures::try_get().unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Fixtures::get`], but a failed build is an error (naming the build log,
    /// [`build_log`]) instead of a panic.
    pub fn try_get() -> anyhow::Result<&'static Fixtures> {
        if let Some(f) = FIXTURES.get() {
            return Ok(f);
        }
        let built =
            build_or_load().map_err(|e| e.context("building nixenv test fixtures failed"))?;
        Ok(FIXTURES.get_or_init(|| built))
    }

    /// The root store paths, for iteration: glibc, busybox, data, echoserver.
    pub fn roots(&self) -> [&str; 4] {
        [&self.glibc, &self.busybox, &self.data, &self.echoserver]
    }

    /// The sorted closure of one of the root store paths.
    pub fn closure(&self, root: &str) -> &[String] {
        let name = match root {
            r if r == self.glibc => "glibc",
            r if r == self.busybox => "busybox",
            r if r == self.data => "data",
            r if r == self.echoserver => "echoserver",
            other => panic!("{other} is not a fixture root"),
        };
        &self.closures[name]
    }

    /// The sorted closure of echoserver (all four fixture paths).
    pub fn echoserver_closure(&self) -> &[String] {
        &self.closures["echoserver"]
    }

    /// What `ls /nix/store` shows in an echoserver container: its closure's base names, sorted.
    pub fn echoserver_store_listing(&self) -> Vec<String> {
        let mut bases: Vec<String> = self
            .echoserver_closure()
            .iter()
            .map(|p| store_path_base(p).to_owned())
            .collect();
        bases.sort();
        bases
    }

    /// A cache directory.
    pub fn cache(&self, cache: Cache) -> &Path {
        &self.caches[cache.name()]
    }

    /// `file://` URL of a cache directory.
    pub fn cache_file_url(&self, cache: Cache) -> String {
        format!("file://{}", self.cache(cache).display())
    }

    /// The store path a negative cache spoils (`None` for the good caches).
    pub fn victim(&self, cache: Cache) -> Option<&str> {
        self.victims.get(cache.name()).map(String::as_str)
    }

    /// A syntactically valid store path that no cache holds (named by `acme/missing-path`).
    pub fn missing_path(&self) -> &str {
        &self.missing_path
    }

    /// The parsed narinfo of `store_path` in `cache` (fields as written, `Sig` lines joined
    /// by spaces).
    pub fn narinfo(&self, cache: Cache, store_path: &str) -> Narinfo {
        let file = self
            .cache(cache)
            .join(format!("{}.narinfo", store_path_hash(store_path)));
        let text =
            fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        Narinfo::parse(&text)
    }

    /// Copies the catalog to `dest` (created), for tests that publish or break locks.
    pub fn catalog_copy(&self, dest: &Path) -> PathBuf {
        copy_dir(&self.catalog, dest);
        dest.to_path_buf()
    }

    /// Copies a cache to `dest` (created), for tests that want to modify one.
    pub fn cache_copy(&self, cache: Cache, dest: &Path) -> PathBuf {
        copy_dir(self.cache(cache), dest);
        dest.to_path_buf()
    }
}

/// A narinfo's fields, as far as tests care.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Narinfo {
    /// `StorePath`.
    pub store_path: String,
    /// `URL`, relative to the cache.
    pub url: String,
    /// `Compression`.
    pub compression: String,
    /// `NarHash`, e.g. `sha256:0abc…` (nixbase32).
    pub nar_hash: String,
    /// `NarSize`.
    pub nar_size: u64,
    /// `References`, base names (`<hash>-<name>`).
    pub references: Vec<String>,
    /// `Sig` values (`name:base64`).
    pub sigs: Vec<String>,
}

impl Narinfo {
    /// Parses narinfo text (lenient: for tests only).
    pub fn parse(text: &str) -> Narinfo {
        let mut n = Narinfo::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once(": ").or_else(|| line.split_once(':')) else {
                continue;
            };
            match k {
                "StorePath" => n.store_path = v.to_string(),
                "URL" => n.url = v.to_string(),
                "Compression" => n.compression = v.to_string(),
                "NarHash" => n.nar_hash = v.to_string(),
                "NarSize" => n.nar_size = v.trim().parse().unwrap_or(0),
                "References" => n.references = v.split_whitespace().map(str::to_owned).collect(),
                "Sig" => n.sigs.push(v.to_string()),
                _ => {}
            }
        }
        n
    }
}

/// The 32-character hash part of `/nix/store/<hash>-<name>` (or of `<hash>-<name>`).
pub fn store_path_hash(store_path: &str) -> &str {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    &base[..32.min(base.len())]
}

/// The base name `<hash>-<name>` of a store path.
pub fn store_path_base(store_path: &str) -> &str {
    store_path.rsplit('/').next().unwrap_or(store_path)
}

/// Copies a directory tree (files, dirs, symlinks as symlinks) to `dest`, creating it.
pub fn copy_dir(src: &Path, dest: &Path) {
    fs::create_dir_all(dest).unwrap_or_else(|e| panic!("create {}: {e}", dest.display()));
    for entry in fs::read_dir(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display())) {
        let entry = entry.unwrap();
        let (from, to) = (entry.path(), dest.join(entry.file_name()));
        let ty = entry.file_type().unwrap();
        if ty.is_dir() {
            copy_dir(&from, &to);
        } else if ty.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from).unwrap(), &to).unwrap();
        } else {
            fs::copy(&from, &to)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
        }
    }
}

/// The fixture directory for these sources on this host.
pub fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NIXENV_FIXTURES_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let mut h = Sha256::new();
    for (name, bytes) in SOURCES {
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    for input in HOST_INPUTS {
        if let Ok(bytes) = fs::read(input) {
            h.update(input.as_bytes());
            h.update(Sha256::digest(&bytes));
        }
    }
    let digest = h.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    PathBuf::from(format!("/var/tmp/nixenv-fixtures-{hex}"))
}

/// A command running the Nix program `program` (`nix-store`, `nix-hash`, …) with nixenv's own
/// Nix configuration (`tests/nix/nix.conf`), never the host's `/etc/nix` or `NIX_CONFIG`.
pub fn nix_command(program: &str) -> Command {
    let conf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("nix");
    let mut cmd = Command::new(program);
    cmd.env("NIX_USER_CONF_FILES", conf_dir.join("nix.conf"))
        .env("NIX_CONF_DIR", conf_dir)
        .env_remove("NIX_CONFIG");
    cmd
}

/// Where the last fixture build on this host wrote its output (`build.sh`'s stdout and
/// stderr): next to the fixture directory, `<dir>.log`.
pub fn build_log() -> PathBuf {
    fixtures_dir().with_extension("log")
}

fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/build.sh")
}

fn load(dir: &Path) -> anyhow::Result<Option<Fixtures>> {
    let json = dir.join("fixtures.json");
    let Ok(text) = fs::read_to_string(&json) else {
        return Ok(None);
    };
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", json.display()))?;
    anyhow::ensure!(m.schema == 1, "{}: schema {}", json.display(), m.schema);
    // The store may have been garbage-collected or wiped since: then rebuild.
    let complete = [
        &m.paths.glibc,
        &m.paths.busybox,
        &m.paths.data,
        &m.paths.echoserver,
    ]
    .iter()
    .all(|p| Path::new(p).exists())
        && m.caches.values().all(|c| c.join(".complete").exists());
    if !complete || m.dir != dir {
        return Ok(None);
    }
    Ok(Some(Fixtures {
        dir: m.dir,
        system: m.system,
        glibc: m.paths.glibc,
        busybox: m.paths.busybox,
        data: m.paths.data,
        echoserver: m.paths.echoserver,
        trusted_key: m.keys.trusted.in_this_checkout(),
        untrusted_key: m.keys.untrusted.in_this_checkout(),
        catalog: m.catalog,
        closures: m.closures,
        caches: m.caches,
        victims: m.victims,
        missing_path: m.missing_path,
    }))
}

fn build_or_load() -> anyhow::Result<Fixtures> {
    let dir = fixtures_dir();
    if let Some(f) = load(&dir)? {
        return Ok(f);
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent)?;
    let lock_path = dir.with_extension("lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| anyhow::anyhow!("open {}: {e}", lock_path.display()))?;
    // SAFETY: flock on a valid, owned file descriptor; released when `lock` is closed.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    anyhow::ensure!(
        rc == 0,
        "flock {}: {}",
        lock_path.display(),
        std::io::Error::last_os_error()
    );
    if let Some(f) = load(&dir)? {
        return Ok(f);
    }
    let started = std::time::Instant::now();
    let log_path = build_log();
    let log = fs::File::create(&log_path)
        .map_err(|e| anyhow::anyhow!("create {}: {e}", log_path.display()))?;
    let status = Command::new("sh")
        .arg(build_script())
        .arg(&dir)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .map_err(|e| anyhow::anyhow!("run {}: {e}", build_script().display()))?;
    if !status.success() {
        let output = fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = output.lines().collect();
        anyhow::bail!(
            "{} {} failed ({status}); its output is in {}, ending:\n{}",
            build_script().display(),
            dir.display(),
            log_path.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "nixenv-testkit: built fixtures in {} ({:.1?})",
        dir.display(),
        started.elapsed()
    );
    load(&dir)?
        .ok_or_else(|| anyhow::anyhow!("{} did not produce a complete fixture set", dir.display()))
}

/// What echoserver answers to every request.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct EchoReply {
    /// `$ECHO_MESSAGE`, if set.
    pub message: Option<String>,
    /// The whole environment.
    pub env: BTreeMap<String, String>,
    /// `argv`, including argv\[0\].
    pub argv: Vec<String>,
    /// `gethostname()`.
    pub hostname: String,
    /// `getuid()`.
    pub uid: u32,
    /// `getgid()`.
    pub gid: u32,
    /// The server's pid (in its pid namespace).
    pub pid: i32,
    /// `$PATH`, if set.
    pub path: Option<String>,
    /// The working directory.
    pub cwd: Option<String>,
    /// The sorted entries of `/nix/store` as the server sees it (`None` if unreadable).
    pub store: Option<Vec<String>>,
    /// The request line.
    pub request: EchoRequest,
}

/// The request line echoserver saw.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct EchoRequest {
    /// `GET`, …
    pub method: String,
    /// The request target, e.g. `/hello?x=1`.
    pub target: String,
}

/// `GET http://ADDR/target` with a plain blocking HTTP/1.1 client (no extra dependencies),
/// returning the status and body. `addr` is `host:port`.
pub fn http_get(addr: &str, target: &str) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad response: {head:?}"),
            )
        })?;
    Ok((status, body.to_string()))
}

/// Asks an echoserver at `addr` (`host:port`) and parses its answer, retrying connection
/// errors until `timeout` (the server may still be starting).
pub fn echo(addr: &str, timeout: std::time::Duration) -> anyhow::Result<EchoReply> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match http_get(addr, "/") {
            Ok((200, body)) => {
                return serde_json::from_str(&body)
                    .map_err(|e| anyhow::anyhow!("echoserver at {addr}: bad JSON {e}: {body}"))
            }
            Ok((status, body)) => anyhow::bail!("echoserver at {addr}: status {status}: {body}"),
            Err(e) if std::time::Instant::now() >= deadline => {
                anyhow::bail!("echoserver at {addr}: {e}")
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}
