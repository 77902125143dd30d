//! Packaging, end to end on this machine: `packaging/build --profile dev --workspace` writes the
//! .deb and the .rpm; the .deb is installed with dpkg over a clean containerd configuration (a
//! private containerd: its own root, state and socket in a temp dir); `nixenv doctor` checks the
//! node against that containerd started from the installed configuration; remove restores the
//! containerd configuration byte for byte, purge removes the store. The rpm holds the same files.
//!
//! Installing tests take a machine-wide lock and serialize with each other, and a Drop guard
//! puts back everything they touch (`/etc/containerd/config.toml`, `/etc/containerd/conf.d`,
//! `/etc/nixenv`, `/var/lib/nixenv`, the package), even when they fail. Other test binaries use
//! the target dir's binaries, and cargo runs test binaries one at a time, so nothing else runs
//! the `/usr/bin/nixenv*` this test installs.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nixenv_testkit::cri::{ContainerSpec, Cri, PodSpec};
use nixenv_testkit::fixtures::http_get;
use nixenv_testkit::{images, Cache, CacheServer, EchoReply, Fixtures};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
const EMPTY_IMAGE: &str = "docker.io/library/empty:latest";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The target dir the test binary runs from (packaging/build builds into it).
fn target_dir() -> PathBuf {
    nixenv_testkit::node::bin_dir()
        .parent()
        .expect("target dir")
        .to_path_buf()
}

struct Packages {
    deb: PathBuf,
    rpm: PathBuf,
    /// `nixenv-dbgsym`: the deb's debug info.
    dbgsym: PathBuf,
    /// `nixenv-debuginfo`: the rpm's debug info.
    debuginfo: PathBuf,
    _dir: tempfile::TempDir,
}

/// Both packages, built once per test process from the dev-profile binaries.
fn packages() -> &'static Packages {
    static P: OnceLock<Packages> = OnceLock::new();
    P.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let out = run_ok(
            Command::new(format!("{WORKSPACE}/packaging/build"))
                // --workspace: the workspace's feature set, so the tests' build is reused.
                .args(["--profile", "dev", "--workspace", "--out"])
                .arg(dir.path())
                .env("CARGO_TARGET_DIR", target_dir()),
        );
        eprintln!(
            "packaging/build --profile dev --workspace: {:.1?}",
            start.elapsed()
        );
        let lines: Vec<PathBuf> = text(&out.stdout).lines().map(PathBuf::from).collect();
        let version = env!("CARGO_PKG_VERSION");
        let names: Vec<&str> = lines
            .iter()
            .filter_map(|p| p.file_name()?.to_str())
            .collect();
        assert_eq!(
            names,
            [
                format!("nixenv_{version}_amd64.deb"),
                format!("nixenv-{version}.x86_64.rpm"),
                format!("nixenv-dbgsym_{version}_amd64.deb"),
                format!("nixenv-debuginfo-{version}.x86_64.rpm"),
            ],
            "packaging/build prints the main packages, then their debug packages"
        );
        for p in &lines {
            assert!(p.is_file(), "{} does not exist", p.display());
        }
        Packages {
            deb: lines[0].clone(),
            rpm: lines[1].clone(),
            dbgsym: lines[2].clone(),
            debuginfo: lines[3].clone(),
            _dir: dir,
        }
    })
}

fn packaging_tools_present() -> bool {
    // packaging/build installs rpm itself when run as root.
    have("dpkg-deb") && have("jq") && (have("rpmbuild") || is_root())
}

/// Serializes the installing tests in this process and across processes (two checkouts).
struct MachineLock {
    _guard: MutexGuard<'static, ()>,
    _file: fs::File,
}

fn machine_lock() -> MachineLock {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let file = fs::File::create("/run/lock/nixenv-packaging-test.lock").expect("create lock file");
    // SAFETY: flock on an fd we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    MachineLock {
        _guard: guard,
        _file: file,
    }
}

fn dpkg_status() -> String {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "nixenv"]));
    text(&out.stdout)
}

/// What the installing test touches outside its temp dir, put back on drop.
struct MachineGuard {
    config: Option<(Vec<u8>, u32)>,
    containerd_dir_existed: bool,
    moved: Vec<(PathBuf, PathBuf)>,
}

impl MachineGuard {
    fn save() -> MachineGuard {
        let config = fs::read(CONTAINERD_CONFIG).ok().map(|b| {
            let mode = fs::metadata(CONTAINERD_CONFIG)
                .unwrap()
                .permissions()
                .mode();
            (b, mode)
        });
        let mut moved = Vec::new();
        for p in [
            "/etc/containerd/conf.d",
            "/etc/containerd/certs.d",
            "/etc/nixenv",
            "/var/lib/nixenv",
        ] {
            let p = PathBuf::from(p);
            if p.exists() {
                let aside = PathBuf::from(format!(
                    "{}.nixenv-test-{}",
                    p.display(),
                    std::process::id()
                ));
                fs::rename(&p, &aside)
                    .unwrap_or_else(|e| panic!("move {} aside: {e}", p.display()));
                moved.push((p, aside));
            }
        }
        MachineGuard {
            config,
            containerd_dir_existed: Path::new("/etc/containerd").exists(),
            moved,
        }
    }
}

impl Drop for MachineGuard {
    fn drop(&mut self) {
        if !dpkg_status().is_empty() && !dpkg_status().contains("not-installed") {
            let _ = Command::new("dpkg")
                .args(["--purge", "nixenv"])
                .env("NIXENV_SKIP_IMAGE", "1")
                .output();
        }
        let _ = fs::remove_file(format!("{CONTAINERD_CONFIG}.nixenv-tmp"));
        match &self.config {
            Some((bytes, mode)) => {
                let _ = fs::create_dir_all("/etc/containerd");
                let _ = fs::write(CONTAINERD_CONFIG, bytes);
                let _ = fs::set_permissions(CONTAINERD_CONFIG, fs::Permissions::from_mode(*mode));
            }
            None => {
                let _ = fs::remove_file(CONTAINERD_CONFIG);
            }
        }
        for p in [
            "/etc/containerd/conf.d",
            "/etc/containerd/certs.d",
            "/etc/nixenv",
            "/var/lib/nixenv",
        ] {
            let _ = fs::remove_dir_all(p);
        }
        for (orig, aside) in &self.moved {
            let _ = fs::rename(aside, orig);
        }
        if !self.containerd_dir_existed {
            let _ = fs::remove_dir("/etc/containerd");
        }
    }
}

/// A containerd started from a config file (whose root, state and socket are private).
struct Containerd {
    child: Child,
    socket: PathBuf,
}

impl Containerd {
    fn start(config: &Path, socket: &Path, log: &Path) -> Containerd {
        let log = fs::File::create(log).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            child,
            socket: socket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if c.socket.exists() && c.ctr(&["version"]).status.success() {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ctr(&self, args: &[&str]) -> Output {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args))
    }

    fn images(&self) -> Vec<String> {
        let out = self.ctr(&["-n", "k8s.io", "images", "ls", "-q"]);
        assert!(out.status.success(), "ctr images ls: {}", text(&out.stderr));
        text(&out.stdout).lines().map(str::to_owned).collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers left by a failed test: kill and delete their tasks (the shims exit).
        let tasks = self.ctr(&["-n", "k8s.io", "tasks", "ls", "-q"]);
        for id in text(&tasks.stdout).lines() {
            let _ = self.ctr(&["-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", id]);
            let _ = self.ctr(&["-n", "k8s.io", "tasks", "delete", "-f", id]);
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An operator's containerd configuration (version 2, a CRI section of their own), private paths.
fn clean_containerd_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"# the operator's containerd configuration
version = 2
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{d}/containerd.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    restrict_oom_score_adj = true
    sandbox_image = "{pause}"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{d}/cni"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt""#,
        pause = images::PAUSE_IMAGE
    )
}

/// A cache and a catalog on 127.0.0.1 and a config naming them with a trusted key.
fn good_nixenv_config(dir: &Path) -> (CacheServer, PathBuf) {
    let www = dir.join("www");
    fs::create_dir_all(www.join("cache")).unwrap();
    fs::create_dir_all(www.join("catalog/acme")).unwrap();
    fs::write(
        www.join("cache/nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
    )
    .unwrap();
    let server = CacheServer::serve(&www);
    let key =
        fs::read_to_string(format!("{WORKSPACE}/tests/fixtures/keys/nixenv-test-1.pub")).unwrap();
    let cfg = dir.join("nixenv.toml");
    fs::write(
        &cfg,
        format!(
            "catalog = \"{u}/catalog\"\nsubstituters = [\"{u}/cache\"]\ntrusted-public-keys = [\"{k}\"]\nstate-dir = \"{s}\"\n",
            u = server.url().trim_end_matches('/'),
            k = key.trim(),
            s = dir.join("state").display()
        ),
    )
    .unwrap();
    (server, cfg)
}

fn doctor(bin: &Path, config: Option<&Path>, extra: &[&str]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.arg("doctor").args(extra);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    )
    .env_remove("NIXENV_CONFIG")
    .env_remove("NIXENV_CONTAINERD_CONFIG")
    .env_remove("NIXENV_CONTAINERD_ADDRESS");
    run(&mut cmd)
}

fn line_starting<'a>(report: &'a str, prefix: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{report}"))
}

fn dpkg(args: &[&str], containerd_socket: &Path) -> Output {
    run_ok(
        Command::new("dpkg")
            .args(args)
            .env("NIXENV_CONTAINERD_ADDRESS", containerd_socket)
            .env("NIXENV_SKIP_SYSTEMD", "1"),
    )
}

#[test]
fn deb_installs_configures_containerd_passes_doctor_and_removes_cleanly() {
    if !is_root()
        || !have("dpkg")
        || !have("containerd")
        || !have("ctr")
        || !packaging_tools_present()
    {
        eprintln!("skipped: needs root, dpkg, containerd, ctr, jq and dpkg-deb");
        return;
    }
    let _lock = machine_lock();
    if dpkg_status().contains("installed") && !dpkg_status().contains("not-installed") {
        eprintln!("skipped: the nixenv package is installed on this machine; not touching it");
        return;
    }
    let pkgs = packages();
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("containerd.sock");
    let _guard = MachineGuard::save();

    // A clean containerd configuration, and that containerd running.
    fs::create_dir_all("/etc/containerd").unwrap();
    let before = clean_containerd_config(tmp.path());
    fs::write(CONTAINERD_CONFIG, &before).unwrap();
    fs::set_permissions(CONTAINERD_CONFIG, fs::Permissions::from_mode(0o640)).unwrap();
    let containerd = Containerd::start(
        Path::new(CONTAINERD_CONFIG),
        &socket,
        &tmp.path().join("containerd-1.log"),
    );
    let (_server, good) = good_nixenv_config(tmp.path());

    // Before install, doctor (the workspace build) finds the node not configured.
    let out = doctor(&nixenv_testkit::nixenv_bin(), Some(&good), &[]);
    let report = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "doctor before install:\n{report}"
    );
    assert!(
        line_starting(&report, "fail  containerd:").contains("no runtime `nixenv`"),
        "{report}"
    );

    // Install.
    let t = Instant::now();
    let out = dpkg(&["-i", pkgs.deb.to_str().unwrap()], &socket);
    eprintln!("dpkg -i: {:.1?}", t.elapsed());
    let log = text(&out.stderr) + &text(&out.stdout);
    assert!(
        log.contains("systemctl restart containerd"),
        "postinst says how to restart:\n{log}"
    );
    for b in [
        "nixenv",
        "containerd-shim-nixenv-v2",
        "nixenv-runc",
        "nixenv-hook",
    ] {
        assert!(
            Path::new("/usr/bin").join(b).is_file(),
            "/usr/bin/{b} installed"
        );
    }
    let after = fs::read_to_string(CONTAINERD_CONFIG).unwrap();
    assert!(
        after.starts_with(&before),
        "the operator's config is kept and only appended to:\n{after}"
    );
    assert!(
        after.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nixenv]"),
        "{after}"
    );
    assert_eq!(
        fs::metadata(CONTAINERD_CONFIG)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    assert!(
        containerd.images().iter().any(|i| i == EMPTY_IMAGE),
        "postinst imported the empty image"
    );
    // docker.io's first host is the node registry of the empty image, read through config_path.
    let hosts = fs::read_to_string(DOCKER_IO_HOSTS).expect("postinst wrote docker.io's hosts.toml");
    assert!(hosts.contains(NODE_REGISTRY_HOST), "{hosts}");
    assert!(
        after.contains("config_path = \"/etc/containerd/certs.d\""),
        "{after}"
    );
    assert!(Path::new(REGISTRIES_DROPIN).is_file());

    // containerd reads the result: the nixenv runtime and the operator's own CRI settings.
    let dump = text(
        &run_ok(Command::new("containerd").args(["--config", CONTAINERD_CONFIG, "config", "dump"]))
            .stdout,
    );
    assert!(dump.contains("runtimes.nixenv]"), "{dump}");
    assert!(dump.contains("pod_annotations = [\"nix.dev/*\"]"), "{dump}");
    assert!(
        dump.contains("restrict_oom_score_adj = true"),
        "the operator's CRI section survives:\n{dump}"
    );

    // Restart containerd on the installed configuration; doctor (installed) passes.
    drop(containerd);
    let containerd = Containerd::start(
        Path::new(CONTAINERD_CONFIG),
        &socket,
        &tmp.path().join("containerd-2.log"),
    );
    let out = doctor(Path::new("/usr/bin/nixenv"), Some(&good), &[]);
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "doctor after install:\n{report}\n{}",
        text(&out.stderr)
    );
    assert!(
        line_starting(&report, "ok    containerd:").contains("via shim containerd-shim-nixenv-v2"),
        "{report}"
    );
    assert!(
        line_starting(&report, "ok    empty image:").contains(EMPTY_IMAGE),
        "{report}"
    );
    assert!(
        line_starting(&report, "ok    runc:").contains("runc"),
        "{report}"
    );
    line_starting(&report, "ok    cache http://127.0.0.1");
    line_starting(&report, "ok    catalog:");
    assert!(
        line_starting(&report, "ok    trusted keys:").contains("nixenv-test-1"),
        "{report}"
    );
    line_starting(&report, "ok    state dir:");
    let out = doctor(Path::new("/usr/bin/nixenv"), Some(&good), &["--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor --json");
    let findings = json["findings"].as_array().expect("findings");
    assert!(findings.iter().all(|f| f["status"] != "fail"), "{json}");

    // The installed CRI-O drop-in is the one the README names, and passes CRI-O's own checks
    // of a handler as `nixenv doctor` makes them (runtime_path, no allowed_annotations entry
    // CRI-O refuses, no monitor_path).
    assert_eq!(
        fs::read_to_string("/etc/crio/crio.conf.d/10-nixenv.conf").unwrap(),
        fs::read_to_string(format!("{WORKSPACE}/runtimeclass/crio-nixenv.conf")).unwrap()
    );
    let crio_dir = tempfile::tempdir().unwrap();
    fs::create_dir(crio_dir.path().join("crio.conf.d")).unwrap();
    fs::copy(
        "/etc/crio/crio.conf.d/10-nixenv.conf",
        crio_dir.path().join("crio.conf.d/10-nixenv.conf"),
    )
    .unwrap();
    let fake_crio = crio_dir.path().join("bin/crio");
    fs::create_dir(fake_crio.parent().unwrap()).unwrap();
    fs::write(&fake_crio, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&fake_crio, fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(Command::new("/usr/bin/nixenv")
        .arg("doctor")
        .arg("--crio-config")
        .arg(crio_dir.path().join("crio.conf"))
        .arg("--crio-config-dir")
        .arg(crio_dir.path().join("crio.conf.d"))
        .env(
            "PATH",
            format!(
                "{}:/usr/sbin:/usr/bin:/sbin:/bin",
                fake_crio.parent().unwrap().display()
            ),
        ));
    let report = text(&out.stdout);
    assert!(
        line_starting(&report, "ok    cri-o:")
            .contains("runtime `nixenv` via /usr/bin/nixenv-runc"),
        "{report}"
    );

    // The shipped /etc/nixenv/config.toml parses (all defaults); doctor flags the missing keys.
    let out = doctor(Path::new("/usr/bin/nixenv"), None, &[]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        line_starting(&report, "ok    config:").contains("/etc/nixenv/config.toml is valid"),
        "{report}"
    );
    assert!(
        report.contains("fail  trusted keys: trusted-public-keys is empty"),
        "{report}"
    );
    assert!(
        report.contains("      fix: add the binary caches' public keys"),
        "{report}"
    );

    // The mission pod through the installed files: this containerd on the installed config,
    // the installed shim from /usr/bin, /etc/nixenv/config.toml naming a cache and a catalog.
    let fx = Fixtures::get();
    let server = CacheServer::serve_mounts([
        ("/cache", fx.cache(Cache::Xz)),
        ("/catalog", fx.catalog.as_path()),
    ]);
    fs::write(
        "/etc/nixenv/config.toml",
        format!(
            "catalog = {:?}\nsubstituters = [{:?}]\ntrusted-public-keys = [{:?}]\nstate-dir = {:?}\n",
            server.url_of("/catalog"),
            server.url_of("/cache"),
            fx.trusted_key.public,
            tmp.path().join("node-state").display().to_string()
        ),
    )
    .unwrap();
    let pause_dir = tmp.path().join("images");
    fs::create_dir_all(&pause_dir).unwrap();
    let pause = images::pause_image().write_archive(&pause_dir).unwrap();
    images::import(&socket, "k8s.io", &pause).unwrap();
    let reply = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(mission_pod(&socket))
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\ncontainerd log:\n{}",
                fs::read_to_string(tmp.path().join("containerd-2.log")).unwrap_or_default()
            )
        });
    assert_eq!(
        reply.message.as_deref(),
        Some("hello from nix"),
        "the lock's env"
    );
    let store = reply.store.clone().unwrap_or_default();
    assert!(
        store.iter().any(|p| fx.echoserver.ends_with(p.as_str())),
        "the closure under /nix/store: {store:?}"
    );

    // Remove: the containerd configuration is byte-identical to before, the image is gone.
    let t = Instant::now();
    dpkg(&["-r", "nixenv"], &socket);
    eprintln!("dpkg -r: {:.1?}", t.elapsed());
    assert_eq!(fs::read_to_string(CONTAINERD_CONFIG).unwrap(), before);
    assert_eq!(
        fs::metadata(CONTAINERD_CONFIG)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    assert!(!Path::new("/usr/bin/nixenv").exists());
    assert!(
        !Path::new("/etc/containerd/certs.d").exists(),
        "prerm removed the hosts.toml (and dirs) it wrote"
    );
    assert!(
        !containerd.images().iter().any(|i| i == EMPTY_IMAGE),
        "prerm removed the image it imported"
    );
    assert!(
        Path::new("/etc/nixenv/config.toml").is_file(),
        "remove keeps the conffile"
    );
    assert!(
        !Path::new("/var/lib/nixenv/package").exists(),
        "the install record is gone"
    );

    // Purge: the store and the configuration go too.
    fs::create_dir_all("/var/lib/nixenv/store/00000000000000000000000000000000-x").unwrap();
    dpkg(&["--purge", "nixenv"], &socket);
    assert!(
        !Path::new("/var/lib/nixenv").exists(),
        "purge removes the store"
    );
    assert!(
        !Path::new("/etc/nixenv").exists(),
        "purge removes /etc/nixenv"
    );
    assert!(
        !Path::new(REGISTRIES_DROPIN).exists(),
        "purge removes the drop-in"
    );
    assert!(!dpkg_status().contains("installed") || dpkg_status().contains("not-installed"));
    drop(containerd);

    // No containerd config and containerd stopped: install creates a minimal one, purge deletes it.
    fs::remove_file(CONTAINERD_CONFIG).unwrap();
    let out = dpkg(&["-i", pkgs.deb.to_str().unwrap()], &socket);
    let log = text(&out.stderr);
    assert!(log.contains("containerd is not running"), "{log}");
    let created = fs::read_to_string(CONTAINERD_CONFIG).unwrap();
    assert!(
        created.starts_with("version = 2\n") && created.contains("runtimes.nixenv]"),
        "{created}"
    );
    run_ok(Command::new("containerd").args(["--config", CONTAINERD_CONFIG, "config", "dump"]));
    dpkg(&["--purge", "nixenv"], &socket);
    assert!(
        !Path::new(CONTAINERD_CONFIG).exists(),
        "the config nixenv created is removed"
    );
}

/// Runs the echoserver pod over CRI on the `nixenv` handler; returns its HTTP answer.
async fn mission_pod(socket: &Path) -> anyhow::Result<EchoReply> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cri = Cri::connect(socket).await?;
    let pod = PodSpec::new("echoserver")
        .handler("nixenv")
        .annotation("nix.dev/environment", "acme/echoserver");
    let pod_id = cri.run_pod(&pod).await?;
    let spec = ContainerSpec::new("echoserver", "empty:latest")
        .command(&["echoserver"])
        .env("PORT", &port.to_string());
    let result = async {
        let id = cri
            .create_container(&pod_id, &pod, &spec)
            .await
            .map_err(|s| anyhow::anyhow!("CreateContainer: {}", s.message()))?;
        cri.start_container(&id).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match http_get(&format!("127.0.0.1:{port}"), "/") {
                Ok((200, body)) => break Ok(serde_json::from_str::<EchoReply>(&body)?),
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                other => anyhow::bail!("echoserver did not answer: {other:?}"),
            }
        }
    }
    .await;
    let _ = cri.stop_pod(&pod_id).await;
    let _ = cri.remove_pod(&pod_id).await;
    result
}

fn deb_files(deb: &Path) -> BTreeSet<String> {
    let out = run_ok(Command::new("dpkg-deb").arg("-c").arg(deb));
    text(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_owned())
        .collect()
}

fn rpm_files(rpm: &Path) -> BTreeSet<String> {
    let out = run_ok(
        Command::new("rpm")
            .args(["-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\\n]"])
            .arg(rpm),
    );
    text(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .map(str::to_owned)
        .collect()
}

#[test]
fn rpm_holds_the_same_files_as_the_deb() {
    if !packaging_tools_present() {
        eprintln!("skipped: needs dpkg-deb, jq and rpmbuild (or root to install rpm)");
        return;
    }
    let pkgs = packages();
    let deb = deb_files(&pkgs.deb);
    let rpm = rpm_files(&pkgs.rpm);
    for f in [
        "/usr/bin/nixenv",
        "/usr/bin/containerd-shim-nixenv-v2",
        "/usr/bin/nixenv-runc",
        "/usr/bin/nixenv-hook",
        "/etc/nixenv/config.toml",
        "/etc/crio/crio.conf.d/10-nixenv.conf",
        "/usr/share/nixenv/containerd/nixenv-v2.toml",
        "/usr/share/nixenv/containerd/nixenv-v3.toml",
        "/usr/share/nixenv/containerd/hosts.toml",
        "/etc/containers/registries.conf.d/50-nixenv-empty.conf",
        "/usr/lib/systemd/system/nixenv-registry.socket",
        "/usr/lib/systemd/system/nixenv-registry.service",
        "/usr/share/nixenv/empty-image.tar",
        "/usr/share/nixenv/hooks.d/nixenv-precreate.json",
        "/usr/share/nixenv/hooks.d/nixenv-prestart.json",
        "/usr/lib/systemd/system/nixenv-gc.service",
        "/usr/lib/systemd/system/nixenv-gc.timer",
        "/usr/lib/nixenv/node-config",
    ] {
        assert!(deb.contains(f), "{f} in the deb: {deb:?}");
    }
    assert_eq!(deb, rpm, "rpm -qlp and dpkg -c list the same files");

    // The same configuration files are protected from upgrades in both formats.
    let conffiles = text(
        &run_ok(
            Command::new("dpkg-deb")
                .arg("-I")
                .arg(&pkgs.deb)
                .arg("conffiles"),
        )
        .stdout,
    );
    let deb_conf: BTreeSet<&str> = conffiles.lines().collect();
    let rpm_out = text(&run_ok(Command::new("rpm").arg("-qcp").arg(&pkgs.rpm)).stdout);
    let rpm_conf: BTreeSet<&str> = rpm_out.lines().collect();
    assert_eq!(deb_conf, rpm_conf);
    assert!(deb_conf.contains("/etc/nixenv/config.toml"));
    assert!(deb_conf.contains("/etc/containers/registries.conf.d/50-nixenv-empty.conf"));
    let scripts = text(
        &run_ok(
            Command::new("rpm")
                .args(["-qp", "--scripts"])
                .arg(&pkgs.rpm),
        )
        .stdout,
    );
    assert!(
        scripts.contains("node-config install") && scripts.contains("node-config remove"),
        "{scripts}"
    );
}

/// `readelf ARGS FILE`'s output.
fn readelf(args: &[&str], file: &Path) -> String {
    text(&run_ok(Command::new("readelf").args(args).arg(file)).stdout)
}

/// The GNU build-id of an ELF file (hex).
fn build_id(file: &Path) -> String {
    readelf(&["-n"], file)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("{} has no build-id", file.display()))
        .trim()
        .to_owned()
}

/// The section names of an ELF file.
fn sections(file: &Path) -> BTreeSet<String> {
    readelf(&["-S", "-W"], file)
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix('[')?.split_once(']')?.1;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn binaries_are_stripped_and_their_debug_info_ships_apart_by_build_id() {
    if !packaging_tools_present() {
        eprintln!("skipped: needs dpkg-deb, jq and rpmbuild (or root to install rpm)");
        return;
    }
    let pkgs = packages();
    let tmp = tempfile::tempdir().unwrap();
    let (main, dbg) = (tmp.path().join("main"), tmp.path().join("dbg"));
    run_ok(Command::new("dpkg-deb").arg("-x").arg(&pkgs.deb).arg(&main));
    run_ok(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&pkgs.dbgsym)
            .arg(&dbg),
    );
    let mut debug_files = BTreeSet::new();
    for bin in [
        "nixenv",
        "containerd-shim-nixenv-v2",
        "nixenv-runc",
        "nixenv-hook",
    ] {
        let f = main.join("usr/bin").join(bin);
        let secs = sections(&f);
        // `.debug_gdb_scripts` is loaded with the program (rustc's gdb pretty-printer hint):
        // stripping keeps it, and it holds no debug info.
        assert!(
            !secs
                .iter()
                .any(|s| s == ".symtab" || (s.starts_with(".debug_") && s != ".debug_gdb_scripts")),
            "{bin} is stripped: {secs:?}"
        );
        assert!(secs.contains(".gnu_debuglink"), "{bin}: {secs:?}");
        let id = build_id(&f);
        let rel = format!("usr/lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..]);
        let d = dbg.join(&rel);
        assert!(d.is_file(), "{bin}: {rel} is in the dbgsym package");
        assert_eq!(build_id(&d), id, "{rel}");
        let dsecs = sections(&d);
        assert!(
            dsecs.contains(".symtab"),
            "{rel} has the symbols: {dsecs:?}"
        );
        // The dev profile keeps line tables (`debug = "line-tables-only"`), except in the
        // no_std first stage.
        if bin != "nixenv-runc" {
            assert!(dsecs.contains(".debug_line"), "{rel}: {dsecs:?}");
        }
        debug_files.insert(format!("/{rel}"));
    }
    let control = text(
        &run_ok(
            Command::new("dpkg-deb")
                .arg("-f")
                .arg(&pkgs.dbgsym)
                .args(["Package", "Depends", "Section"]),
        )
        .stdout,
    );
    let version = env!("CARGO_PKG_VERSION");
    assert!(control.contains("Package: nixenv-dbgsym"), "{control}");
    assert!(
        control.contains(&format!("Depends: nixenv (= {version})")),
        "{control}"
    );
    assert_eq!(deb_files(&pkgs.dbgsym), debug_files);
    assert_eq!(rpm_files(&pkgs.debuginfo), debug_files);
}

#[test]
fn empty_image_is_an_oci_layout_with_zero_layers() {
    if !packaging_tools_present() {
        eprintln!("skipped: needs dpkg-deb, jq and rpmbuild");
        return;
    }
    let pkgs = packages();
    let tmp = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&pkgs.deb)
            .arg(tmp.path()),
    );
    let layout = tmp.path().join("layout");
    fs::create_dir(&layout).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(tmp.path().join("usr/share/nixenv/empty-image.tar"))
            .arg("-C")
            .arg(&layout),
    );
    let blob = |digest: &str| {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let bytes = fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
        use sha2::Digest;
        assert_eq!(
            format!("{:x}", sha2::Sha256::digest(&bytes)),
            hex,
            "blob content matches its digest"
        );
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = &index["manifests"][0];
    assert_eq!(m["annotations"]["io.containerd.image.name"], EMPTY_IMAGE);
    let manifest = blob(m["digest"].as_str().unwrap());
    assert_eq!(manifest["layers"], serde_json::json!([]));
    let config = blob(manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([]));
    assert_eq!(config["os"], "linux");
    assert!(layout.join("oci-layout").is_file());
}

/// node-config on files in a temp dir: the containerd edits for each config shape, and their undo.
struct NodeConfig {
    dir: tempfile::TempDir,
}

impl NodeConfig {
    fn new() -> NodeConfig {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("share/containerd")).unwrap();
        for f in ["nixenv-v2.toml", "nixenv-v3.toml", "hosts.toml"] {
            fs::copy(
                format!("{WORKSPACE}/packaging/containerd/{f}"),
                dir.path().join(format!("share/containerd/{f}")),
            )
            .unwrap();
        }
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        NodeConfig { dir }
    }
    fn config(&self) -> PathBuf {
        self.dir.path().join("etc/config.toml")
    }
    fn dropin(&self) -> PathBuf {
        self.dir.path().join("etc/conf.d/nixenv.toml")
    }
    /// The default certs.d root (`NIXENV_CONTAINERD_CERTS_D`).
    fn certs_d(&self) -> PathBuf {
        self.dir.path().join("etc/certs.d")
    }
    /// Runs `node-config ACTION`; `containerd` is the binary used for version and validation.
    fn run(&self, action: &str, containerd: &str) -> String {
        let d = self.dir.path();
        let out = run_ok(
            Command::new("sh")
                .arg(format!("{WORKSPACE}/packaging/lib/node-config"))
                .arg(action)
                .env("NIXENV_CONTAINERD_CONFIG", self.config())
                .env("NIXENV_CONTAINERD_CONFD", d.join("etc/conf.d"))
                .env("NIXENV_CONTAINERD_CERTS_D", self.certs_d())
                .env("NIXENV_CONTAINERD_ADDRESS", d.join("none.sock"))
                .env("NIXENV_CONTAINERD_BIN", containerd)
                .env("NIXENV_PKG_STATE", d.join("record"))
                .env("NIXENV_SHARE", d.join("share"))
                .env("NIXENV_SKIP_SYSTEMD", "1")
                .env("NIXENV_SKIP_IMAGE", "1"),
        );
        text(&out.stderr)
    }
}

const NODE_REGISTRY_HOST: &str = "[host.\"http://127.0.0.1:7475\"]";
const DOCKER_IO_HOSTS: &str = "/etc/containerd/certs.d/docker.io/hosts.toml";
const REGISTRIES_DROPIN: &str = "/etc/containers/registries.conf.d/50-nixenv-empty.conf";

#[test]
fn node_config_puts_the_node_registry_first_for_docker_io_and_undoes_exactly_that() {
    if !have("awk") || !have("sha256sum") {
        eprintln!("skipped: needs awk and sha256sum");
        return;
    }
    let real = if have("containerd") && containerd_major() == Some(1) {
        "containerd"
    } else {
        "/nonexistent/containerd"
    };
    let shipped =
        fs::read_to_string(format!("{WORKSPACE}/packaging/containerd/hosts.toml")).unwrap();

    // No hosts.toml for docker.io: the shipped one is written, and removed with its dirs.
    // containerd 1.x reads it only with `config_path`: set in the default config's empty line.
    let n = NodeConfig::new();
    let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"\"\n  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors]\n";
    fs::write(n.config(), v2).unwrap();
    n.run("install", real);
    let hosts = n.certs_d().join("docker.io/hosts.toml");
    assert_eq!(fs::read_to_string(&hosts).unwrap(), shipped);
    let c = fs::read_to_string(n.config()).unwrap();
    assert!(
        c.contains(&format!(
            "\n  config_path = \"{}\"  # added by nixenv\n",
            n.certs_d().display()
        )),
        "{c}"
    );
    assert!(!c.contains("config_path = \"\""), "{c}");
    n.run("install", real); // idempotent
    assert_eq!(fs::read_to_string(n.config()).unwrap(), c);
    assert_eq!(fs::read_to_string(&hosts).unwrap(), shipped);
    // The operator edits the config after install: our line goes back to what it was.
    fs::write(n.config(), c.clone() + "# operator\n").unwrap();
    n.run("remove", real);
    assert_eq!(
        fs::read_to_string(n.config()).unwrap(),
        format!("{v2}# operator\n")
    );
    assert!(!n.certs_d().exists(), "certs.d created by nixenv is gone");

    // The operator's hosts.toml: our host goes first, their hosts and server stay; undo is exact.
    let n = NodeConfig::new();
    fs::write(n.config(), "version = 2\n").unwrap();
    fs::create_dir_all(n.certs_d().join("docker.io")).unwrap();
    let hosts = n.certs_d().join("docker.io/hosts.toml");
    let theirs = "server = \"https://registry-1.docker.io\"\n\n[host.\"https://mirror.example\"]\n  capabilities = [\"pull\"]\n";
    fs::write(&hosts, theirs).unwrap();
    n.run("install", real);
    let merged = fs::read_to_string(&hosts).unwrap();
    let ours = merged.find(NODE_REGISTRY_HOST).expect("our host added");
    let mirror = merged.find("[host.\"https://mirror.example\"]").unwrap();
    assert!(ours < mirror, "ours first: {merged}");
    assert!(
        merged.starts_with("server = \"https://registry-1.docker.io\"\n"),
        "{merged}"
    );
    // The config had no registry table: nixenv's block sets config_path.
    let c = fs::read_to_string(n.config()).unwrap();
    assert!(
        c.contains("[plugins.\"io.containerd.grpc.v1.cri\".registry]"),
        "{c}"
    );
    n.run("install", real);
    assert_eq!(fs::read_to_string(&hosts).unwrap(), merged);
    n.run("remove", real);
    assert_eq!(fs::read_to_string(&hosts).unwrap(), theirs);
    assert_eq!(fs::read_to_string(n.config()).unwrap(), "version = 2\n");

    // Edited after install: only our table goes.
    let n = NodeConfig::new();
    fs::write(n.config(), "version = 2\n").unwrap();
    fs::create_dir_all(n.certs_d().join("docker.io")).unwrap();
    let hosts = n.certs_d().join("docker.io/hosts.toml");
    fs::write(&hosts, theirs).unwrap();
    n.run("install", real);
    let edited = fs::read_to_string(&hosts).unwrap() + "# operator\n";
    fs::write(&hosts, &edited).unwrap();
    let log = n.run("remove", real);
    assert!(log.contains("removed only the nixenv host"), "{log}");
    assert_eq!(
        fs::read_to_string(&hosts).unwrap(),
        format!("{theirs}# operator\n")
    );

    // The operator's own config_path: left as is, our hosts.toml goes into its first root.
    let n = NodeConfig::new();
    let own_root = n.dir.path().join("srv/certs");
    let own = format!(
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}:/etc/docker/certs.d\"\n",
        own_root.display()
    );
    fs::write(n.config(), &own).unwrap();
    n.run("install", real);
    let c = fs::read_to_string(n.config()).unwrap();
    assert_eq!(c.matches("config_path").count(), 1, "{c}");
    assert_eq!(
        fs::read_to_string(own_root.join("docker.io/hosts.toml")).unwrap(),
        shipped
    );
    assert!(!n.certs_d().exists());
    n.run("remove", real);
    assert_eq!(fs::read_to_string(n.config()).unwrap(), own);
    assert!(!own_root.join("docker.io").exists());

    // registry.mirrors (refused by containerd together with config_path): not set, and said.
    let n = NodeConfig::new();
    let mirrors = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://m.example\"]\n";
    fs::write(n.config(), mirrors).unwrap();
    let log = n.run("install", real);
    assert!(log.contains("registry.mirrors"), "{log}");
    assert!(!fs::read_to_string(n.config())
        .unwrap()
        .contains("config_path"));
    n.run("remove", real);
    assert_eq!(fs::read_to_string(n.config()).unwrap(), mirrors);

    // Version 3: config_path in the drop-in (imports override the main file's empty value).
    let n = NodeConfig::new();
    fs::write(
        n.config(),
        "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = ''\n",
    )
    .unwrap();
    n.run("install", "/nonexistent/containerd");
    let dropin = fs::read_to_string(n.dropin()).unwrap();
    assert!(
        dropin.contains(&format!(
            "[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"{}\"",
            n.certs_d().display()
        )),
        "{dropin}"
    );
    n.run("remove", "/nonexistent/containerd");
    assert!(!n.certs_d().exists());
}

/// The major version of the host's containerd, if any.
fn containerd_major() -> Option<u32> {
    let out = Command::new("containerd").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .find_map(|w| w.trim_start_matches('v').split('.').next()?.parse().ok())
}

#[test]
fn node_config_edits_containerd_configs_and_undoes_exactly_that() {
    if !have("awk") || !have("sha256sum") {
        eprintln!("skipped: needs awk and sha256sum");
        return;
    }
    // containerd 1.x validates version 2 edits when installed; version 3 needs containerd 2.x,
    // so those cases run without a containerd binary (no validation).
    let real = if have("containerd") {
        "containerd"
    } else {
        "/nonexistent/containerd"
    };
    let none = "/nonexistent/containerd";

    // Version 3 without imports: an `imports` line after `version`, a drop-in; undo is exact.
    let n = NodeConfig::new();
    let v3 = "# mine\nversion = 3\n\n[plugins.\"io.containerd.cri.v1.runtime\"]\n  enable_selinux = false\n";
    fs::write(n.config(), v3).unwrap();
    n.run("install", none);
    let edited = fs::read_to_string(n.config()).unwrap();
    assert_eq!(
        edited,
        v3.replacen(
            "version = 3\n",
            &format!(
                "version = 3\nimports = [\"{}\"]  # added by nixenv\n",
                n.dropin().display()
            ),
            1
        )
    );
    assert!(fs::read_to_string(n.dropin())
        .unwrap()
        .contains("io.containerd.cri.v1.runtime\".containerd.runtimes.nixenv]"));
    n.run("install", none); // idempotent (upgrade)
    assert_eq!(fs::read_to_string(n.config()).unwrap(), edited);
    n.run("remove", none);
    assert_eq!(fs::read_to_string(n.config()).unwrap(), v3);
    assert!(!n.dropin().exists());

    // Version 4 (containerd 2.3+): the same tables in a drop-in that says version 4 (a
    // version-3 drop-in would be migrated, with a warning, at every start).
    let n = NodeConfig::new();
    let v4 =
        "version = 4\n[plugins.\"io.containerd.server.v1.grpc\"]\n  address = \"/run/c.sock\"\n";
    fs::write(n.config(), v4).unwrap();
    n.run("install", none);
    assert!(fs::read_to_string(n.config())
        .unwrap()
        .starts_with(&format!(
            "version = 4\nimports = [\"{}\"]  # added by nixenv\n",
            n.dropin().display()
        )));
    let dropin = fs::read_to_string(n.dropin()).unwrap();
    assert!(dropin.contains("\nversion = 4\n"), "{dropin}");
    assert!(!dropin.contains("version = 3"), "{dropin}");
    assert!(dropin.contains("io.containerd.cri.v1.runtime\".containerd.runtimes.nixenv]"));
    n.run("remove", none);
    assert_eq!(fs::read_to_string(n.config()).unwrap(), v4);
    assert!(!n.dropin().exists());

    // Version 3 with imports, edited by the operator after install: only nixenv's entry goes.
    let n = NodeConfig::new();
    fs::write(n.config(), "version = 3\nimports = [\"/x/*.toml\"]\n").unwrap();
    n.run("install", none);
    assert!(fs::read_to_string(n.config()).unwrap().contains(&format!(
        "imports = [\"{}\", \"/x/*.toml\"]",
        n.dropin().display()
    )));
    let mut c = fs::read_to_string(n.config()).unwrap();
    c.push_str("[metrics]\n  address = \"127.0.0.1:1338\"\n");
    fs::write(n.config(), &c).unwrap();
    let log = n.run("remove", none);
    assert!(log.contains("edited after install"), "{log}");
    assert_eq!(
        fs::read_to_string(n.config()).unwrap(),
        "version = 3\nimports = [\"/x/*.toml\"]\n[metrics]\n  address = \"127.0.0.1:1338\"\n"
    );

    // An import glob that already covers the drop-in: the config is not touched.
    let n = NodeConfig::new();
    let covered = format!(
        "version = 3\nimports = [\n  \"{}/*.toml\",\n]\n",
        n.dropin().parent().unwrap().display()
    );
    fs::write(n.config(), &covered).unwrap();
    n.run("install", none);
    assert_eq!(fs::read_to_string(n.config()).unwrap(), covered);
    assert!(n.dropin().is_file());
    n.run("remove", none);
    assert_eq!(fs::read_to_string(n.config()).unwrap(), covered);
    assert!(!n.dropin().exists());

    // Version 2 without a trailing newline, edited after install: the marked block goes.
    let n = NodeConfig::new();
    fs::write(
        n.config(),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"p:1\"",
    )
    .unwrap();
    n.run("install", real);
    let c = fs::read_to_string(n.config()).unwrap();
    assert!(c.contains("sandbox_image = \"p:1\"\n# BEGIN nixenv"), "{c}");
    fs::write(n.config(), c + "# operator\n").unwrap();
    n.run("remove", real);
    assert_eq!(
        fs::read_to_string(n.config()).unwrap(),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"p:1\"\n# operator\n"
    );

    // The runtime already defined by the operator: left alone, nothing undone later.
    let n = NodeConfig::new();
    let own = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nixenv]\n  runtime_type = \"io.containerd.runc.v2\"\n";
    fs::write(n.config(), own).unwrap();
    assert!(n
        .run("install", real)
        .contains("already defines the nixenv runtime"));
    n.run("remove", real);
    assert_eq!(fs::read_to_string(n.config()).unwrap(), own);

    // Version 1 (no `version` key): refused with the way out.
    let n = NodeConfig::new();
    fs::write(n.config(), "[plugins.cri]\n  sandbox_image = \"p\"\n").unwrap();
    let log = n.run("install", real);
    assert!(
        log.contains("nixenv needs version 2, 3 or 4") && log.contains("containerd config migrate"),
        "{log}"
    );
    assert_eq!(
        fs::read_to_string(n.config()).unwrap(),
        "[plugins.cri]\n  sandbox_image = \"p\"\n"
    );

    // A result containerd cannot load (here `runtimes` is not a table) is not written.
    if real == "containerd" {
        let n = NodeConfig::new();
        let odd =
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  runtimes = 5\n";
        fs::write(n.config(), odd).unwrap();
        let log = n.run("install", real);
        assert!(log.contains("left unchanged"), "{log}");
        assert_eq!(fs::read_to_string(n.config()).unwrap(), odd);
    }
}

#[test]
fn vagrantfile_validates() {
    if !have("vagrant") {
        if is_root() && have("apt-get") {
            let _ = Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", "vagrant"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output();
        }
        if !have("vagrant") {
            eprintln!(
                "skipped: Debian's vagrant package is not installed and could not be installed"
            );
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let validate = |dir: &Path| {
        run(Command::new("vagrant")
            .args(["validate", "--ignore-provider"])
            .current_dir(dir)
            .env("VAGRANT_HOME", tmp.path().join("home"))
            .env("VAGRANT_DOTFILE_PATH", tmp.path().join("dot"))
            .env("VAGRANT_CHECKPOINT_DISABLE", "1"))
    };
    let vagrant_dir = Path::new(WORKSPACE).join("vagrant");
    let out = validate(&vagrant_dir);
    assert!(
        out.status.success(),
        "vagrant validate: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("validated successfully"));
    for m in ["containerd", "crio"] {
        assert!(vagrant_dir.join(format!("provision-{m}.sh")).is_file());
    }

    // The same Vagrantfile with a misspelt setting fails: validate does check.
    let broken = tmp.path().join("broken/vagrant");
    fs::create_dir_all(&broken).unwrap();
    for f in ["provision-containerd.sh", "provision-crio.sh", "common.sh"] {
        fs::copy(vagrant_dir.join(f), broken.join(f)).unwrap();
    }
    let vf = fs::read_to_string(vagrant_dir.join("Vagrantfile")).unwrap();
    fs::write(
        broken.join("Vagrantfile"),
        vf.replacen("m.vm.hostname =", "m.vm.hostnme =", 1),
    )
    .unwrap();
    let out = validate(&broken);
    assert!(
        !out.status.success(),
        "a broken Vagrantfile must not validate"
    );
}

/// `packaging/build` in a fresh clone of this repository's HEAD, as a user runs it: no
/// `CARGO_TARGET_DIR`, so everything lands in the clone's `./target`. Stale binaries planted
/// there beforehand (another ELF, another build-id) stand for an older build: the package must
/// hold the binaries this run just built, nixenv-runc's first stage (a workspace of its own)
/// included. The dev profile, as the other packaging tests use: the first stage's target dir
/// is chosen by the same line for every profile, and a release build from nothing (three
/// profiles' worth of dependencies) costs many minutes more. Only cargo's registry cache is
/// shared with this checkout.
#[test]
#[ignore = "a full build from nothing (over 6 minutes on 2 cores): run with --ignored"]
fn packaging_build_in_a_fresh_clone_packages_what_it_just_built() {
    if !(have("git") && have("dpkg-deb") && have("jq")) {
        eprintln!("skipped: needs git, dpkg-deb and jq");
        return;
    }
    let head =
        text(&run_ok(Command::new("git").args(["-C", WORKSPACE, "rev-parse", "HEAD"])).stdout)
            .trim()
            .to_owned();
    let tmp = tempfile::tempdir().unwrap();
    let clone = tmp.path().join("nixenv");
    run_ok(
        Command::new("git")
            .args(["clone", "--quiet", "--no-checkout", WORKSPACE])
            .arg(&clone),
    );
    run_ok(
        Command::new("git")
            .arg("-C")
            .arg(&clone)
            .args(["checkout", "--quiet", "--detach", &head]),
    );

    let bins = [
        "nixenv",
        "containerd-shim-nixenv-v2",
        "nixenv-runc",
        "nixenv-hook",
    ];
    let decoy = Path::new("/bin/true");
    let decoy_id = build_id(decoy);
    for profile in ["debug", "release"] {
        let dir = clone.join("target").join(profile);
        fs::create_dir_all(&dir).unwrap();
        for bin in bins {
            fs::copy(decoy, dir.join(bin)).unwrap();
        }
    }

    let out_dir = tmp.path().join("packages");
    let start = Instant::now();
    let out = run_ok(
        Command::new(clone.join("packaging/build"))
            .args(["--profile", "dev", "--no-rpm", "--out"])
            .arg(&out_dir)
            .current_dir(&clone)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR"),
    );
    eprintln!(
        "packaging/build --profile dev in a fresh clone: {:.1?}",
        start.elapsed()
    );
    let version = env!("CARGO_PKG_VERSION");
    let deb = out_dir.join(format!("nixenv_{version}_amd64.deb"));
    assert!(
        text(&out.stdout).lines().any(|l| Path::new(l) == deb),
        "{}",
        text(&out.stdout)
    );
    let unpacked = tmp.path().join("deb");
    run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked));
    for bin in bins {
        let built = clone.join("target/debug").join(bin);
        let built_id = build_id(&built);
        assert_ne!(
            built_id, decoy_id,
            "{bin}: this build replaced the stale one"
        );
        let packaged_id = build_id(&unpacked.join("usr/bin").join(bin));
        assert_eq!(
            packaged_id, built_id,
            "{bin}: the package holds the binary just built"
        );
    }
    assert!(
        !clone.join("hook/runc/target").exists(),
        "the first stage builds into the clone's target dir"
    );
    let status = text(
        &run_ok(
            Command::new("git")
                .arg("-C")
                .arg(&clone)
                .args(["status", "--porcelain"]),
        )
        .stdout,
    );
    assert_eq!(status, "", "the build leaves the checkout clean");
}
