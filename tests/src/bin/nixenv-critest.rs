//! `nixenv-critest`: cri-tools' validation suite (`critest`) against a private containerd, once
//! with the `runc` handler (containerd's own runc shim) and once with `nixenv`
//! (containerd-shim-nixenv-v2), then a comparison of the two per spec.
//!
//! ```text
//! nixenv-critest [--critest PATH] [--handlers runc,nixenv] [--out DIR]
//!                [--focus REGEX] [--skip REGEX] [--keep] [--debug] [-- CRITEST-ARGS…]
//! ```
//!
//! - `critest` is `$CRITEST`, else `--critest`, else `critest` on PATH; this program never
//!   builds it (see `tests/conformance/critest.sh`).
//! - containerd is `$NIXENV_TEST_CONTAINERD` or `containerd` on PATH (the test kit writes a
//!   version 2 or 3 config to match), with pod networking through the CNI plugins in
//!   `$NIXENV_CNI_BIN_DIR` (default `/usr/lib/cni`, then `/opt/cni/bin`): a private bridge
//!   with host-local addresses and portmap. Pods the suite creates carry no
//!   `nix.dev/environment`, so on `nixenv` they are plain pods served by our shim.
//! - critest pulls its images from public registries; there are none here, so stand-ins built
//!   from the host's static busybox are imported under the same names: the default busybox,
//!   the web servers (busybox `httpd` on the expected ports) and the image with a predefined
//!   group. Specs that pull (the image service specs) fail on both handlers.
//! - Per-spec results come from ginkgo's JSON report (`--out DIR/<handler>.json`, log in
//!   `DIR/<handler>.log`). Printed: passed/failed/skipped per handler, every spec whose result
//!   differs, and the specs failing on both with the first lines of their failure.
//!   containerd's log (with the shims' logs; `--debug` for debug level) is `DIR/containerd.log`.
//!
//! Exit status: 0 when no spec passes on `runc` and fails on `nixenv` (or, with other handlers,
//! on the first and fails on a later one; a skip is no failure), 1 otherwise, 2 when the run
//! itself failed.
//! containerd, its shims, runc containers, mounts and the bridge are removed at the end, also
//! on error or Ctrl-C.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use nixenv_testkit::containerd::{self, Containerd, RuntimeHandler};
use nixenv_testkit::images::ImageBuilder;
use nixenv_testkit::{shim_bin, TestNode};

const USAGE: &str = "usage: nixenv-critest [--critest PATH] [--handlers runc,nixenv] [--out DIR] [--focus REGEX] [--skip REGEX] [--keep] [--debug] [-- CRITEST-ARGS…]";

/// Where critest's e2e images live (`framework.DefaultRegistryE2ETestImagesPrefix`).
const E2E: &str = "registry.k8s.io/e2e-test-images/";
/// cri-tools' own test images (`registry` in `pkg/validate/consts.go`).
const CRI_TOOLS: &str = "gcr.io/k8s-staging-cri-tools/";

#[derive(Debug)]
struct Args {
    critest: PathBuf,
    handlers: Vec<String>,
    out: Option<PathBuf>,
    focus: Option<String>,
    skip: Option<String>,
    keep: bool,
    debug: bool,
    extra: Vec<String>,
}

fn parse_args(argv: &[String]) -> anyhow::Result<Args> {
    let mut args = Args {
        critest: std::env::var_os("CRITEST")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("critest")),
        handlers: vec!["runc".to_owned(), "nixenv".to_owned()],
        out: None,
        focus: None,
        skip: None,
        keep: false,
        debug: false,
        extra: Vec::new(),
    };
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--critest" => args.critest = PathBuf::from(value("--critest")?),
            "--handlers" => {
                args.handlers = value("--handlers")?
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            "--out" => args.out = Some(PathBuf::from(value("--out")?)),
            "--focus" => args.focus = Some(value("--focus")?),
            "--skip" => args.skip = Some(value("--skip")?),
            "--keep" => args.keep = true,
            "--debug" => args.debug = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--" => {
                args.extra = it.cloned().collect();
                break;
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    for h in &args.handlers {
        if !matches!(h.as_str(), "runc" | "nixenv") {
            bail!("--handlers: unknown handler {h:?} (known: runc, nixenv)");
        }
    }
    if args.handlers.is_empty() {
        bail!("--handlers: no handler given");
    }
    Ok(args)
}

/// The result of one spec in one run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SpecResult {
    /// `passed`, `failed`, `skipped`, `pending`, `panicked`, `timedout`, `interrupted`, `aborted`.
    state: String,
    /// The failure message's first lines, if any.
    failure: Option<String>,
}

impl SpecResult {
    fn passed(&self) -> bool {
        self.state == "passed"
    }
    fn skipped(&self) -> bool {
        matches!(self.state.as_str(), "skipped" | "pending")
    }
    fn failed(&self) -> bool {
        !self.passed() && !self.skipped()
    }
}

/// The `It` specs of a ginkgo v2 JSON report (`--ginkgo.json-report`), by full name
/// (container texts and leaf text joined by spaces).
fn parse_report(json: &[u8]) -> anyhow::Result<BTreeMap<String, SpecResult>> {
    let reports: Vec<serde_json::Value> =
        serde_json::from_slice(json).context("ginkgo JSON report is not a list of suites")?;
    let mut specs = BTreeMap::new();
    for suite in &reports {
        let Some(list) = suite.get("SpecReports").and_then(|v| v.as_array()) else {
            continue;
        };
        for spec in list {
            if spec.get("LeafNodeType").and_then(|v| v.as_str()) != Some("It") {
                continue;
            }
            let mut parts: Vec<String> = spec
                .get("ContainerHierarchyTexts")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(leaf) = spec.get("LeafNodeText").and_then(|v| v.as_str()) {
                parts.push(leaf.to_owned());
            }
            let name = parts.join(" ");
            let state = spec
                .get("State")
                .and_then(|v| v.as_str())
                .unwrap_or("unknown")
                .to_owned();
            let failure = spec
                .get("Failure")
                .and_then(|f| f.get("Message"))
                .and_then(|m| m.as_str())
                .map(|m| {
                    let lines: Vec<&str> = m
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .take(3)
                        .collect();
                    lines.join(" ").chars().take(240).collect::<String>()
                })
                .filter(|m| !m.is_empty());
            specs.insert(name, SpecResult { state, failure });
        }
    }
    Ok(specs)
}

/// Counts of one run.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    passed: usize,
    failed: usize,
    skipped: usize,
}

fn counts(run: &BTreeMap<String, SpecResult>) -> Counts {
    let mut c = Counts::default();
    for r in run.values() {
        if r.passed() {
            c.passed += 1;
        } else if r.skipped() {
            c.skipped += 1;
        } else {
            c.failed += 1;
        }
    }
    c
}

/// Specs whose state differs between `base` and `other` (a spec missing from one run counts
/// as `missing`): name, base state, other state.
fn differences(
    base: &BTreeMap<String, SpecResult>,
    other: &BTreeMap<String, SpecResult>,
) -> Vec<(String, String, String)> {
    let mut names: Vec<&String> = base.keys().chain(other.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|n| {
            let a = base.get(n).map(|r| r.state.as_str()).unwrap_or("missing");
            let b = other.get(n).map(|r| r.state.as_str()).unwrap_or("missing");
            (a != b).then(|| (n.clone(), a.to_owned(), b.to_owned()))
        })
        .collect()
}

/// Specs that pass on `base` but fail on `other`, or are missing from it (the regressions
/// this runner fails on). A spec `other` skips is no regression: critest skips what the
/// runtime handler does not advertise.
fn regressions(
    base: &BTreeMap<String, SpecResult>,
    other: &BTreeMap<String, SpecResult>,
) -> Vec<String> {
    base.iter()
        .filter(|(_, r)| r.passed())
        .filter(|(n, _)| other.get(*n).is_none_or(SpecResult::failed))
        .map(|(n, _)| n.clone())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Images

/// `pgrep PATTERN`: the pids whose command name contains PATTERN.
const PGREP: &str = r#"#!/bin/sh
# pgrep stand-in: pids whose command name contains $1
found=1
for d in /proc/[0-9]*; do
  read -r comm < "$d/comm" 2>/dev/null || continue
  case "$comm" in *"$1"*) echo "${d#/proc/}"; found=0 ;; esac
done
exit $found
"#;

/// `ipcs -m`: the System V shared memory segments (their ids are in the second column).
const IPCS: &str = "#!/bin/sh\n# ipcs stand-in\ncat /proc/sysvipc/shm\n";

/// nginx stand-in: busybox httpd on port 80 under a process named nginx, with nginx's pid file
/// (its arguments put "master process" in its command line, as nginx's master shows).
const NGINX: &str = r#"#!/bin/sh
mkdir -p /var/run
echo $$ > /var/run/nginx.pid
httpd -f -p 80 -h /var/www &
trap 'kill $! 2>/dev/null; exit 0' TERM INT
wait
"#;

/// httpd stand-in (the image's `httpd-foreground`): says its name on stderr, then serves.
const HTTPD: &str = r#"#!/bin/sh
echo "httpd: busybox httpd serving /var/www on port 80" >&2
exec httpd -f -p 80 -h /var/www
"#;

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

/// Debian's static busybox with every applet (`busybox --list-full`) linked where it belongs,
/// and `/etc/passwd` and `/etc/group` as given, as `name`.
fn full_busybox(name: &str, passwd: &str, group: &str) -> anyhow::Result<ImageBuilder> {
    let bin = std::fs::read("/bin/busybox").context("read /bin/busybox (busybox-static)")?;
    let out = std::process::Command::new("/bin/busybox")
        .arg("--list-full")
        .output()
        .context("run /bin/busybox --list-full")?;
    let mut b = ImageBuilder::new(name)
        .cmd(&["sh"])
        .dir("bin", 0o755)
        .dir("sbin", 0o755)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .dir("usr/sbin", 0o755)
        .dir("usr/local", 0o755)
        .dir("usr/local/bin", 0o755)
        .dir("tmp", 0o1777)
        .dir("etc", 0o755)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("dev", 0o755)
        .dir("root", 0o700)
        .dir("home", 0o755)
        .dir("var", 0o755)
        .dir("var/www", 0o755)
        .file("bin/busybox", 0o755, bin)
        .file("etc/passwd", 0o644, passwd.as_bytes().to_vec())
        .file("etc/group", 0o644, group.as_bytes().to_vec())
        .file(
            "var/www/index.html",
            0o644,
            b"<html><body>nixenv critest stand-in</body></html>\n".to_vec(),
        );
    // Applets Debian's busybox lacks and critest runs: small shell stand-ins.
    b = b
        .file("usr/bin/pgrep", 0o755, PGREP.as_bytes().to_vec())
        .file("usr/bin/ipcs", 0o755, IPCS.as_bytes().to_vec());
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" {
            continue;
        }
        // Hard links, as in the real image: masking one applet (MaskedPaths: /bin/ls) must
        // not mask busybox itself.
        b = b.hardlink(applet, "bin/busybox");
    }
    Ok(b)
}

/// The stand-ins for the images critest would pull (names as critest spells them).
fn stand_in_images() -> anyhow::Result<Vec<ImageBuilder>> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let web = |name: &str, port: u16| -> anyhow::Result<ImageBuilder> {
        let port = port.to_string();
        Ok(full_busybox(name, PASSWD, GROUP)?
            .entrypoint(&["httpd", "-f", "-p", &port, "-h", "/var/www"])
            .cmd(&[]))
    };
    // In cri-tools' image, the default user default-user (1000) also belongs to
    // group-defined-in-image (50000).
    let predefined_group = full_busybox(
        &format!("{CRI_TOOLS}test-image-predefined-group:latest"),
        "root:x:0:0:root:/root:/bin/sh\ndefault-user:x:1000:1000::/home:/bin/sh\n",
        "root:x:0:\ndefault-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n",
    )?
    .user("1000");
    let nginx = full_busybox(&format!("{E2E}nginx:1.14-2"), PASSWD, GROUP)?
        .file("usr/sbin/nginx", 0o755, NGINX.as_bytes().to_vec())
        .entrypoint(&["/usr/sbin/nginx"])
        .cmd(&["-g", "daemon off; nginx: master process"]);
    Ok(vec![
        full_busybox(&format!("{E2E}busybox:1.29-2"), PASSWD, GROUP)?,
        nginx,
        full_busybox(&format!("{E2E}httpd:2.4.39-4"), PASSWD, GROUP)?
            .file(
                "usr/local/bin/httpd-foreground",
                0o755,
                HTTPD.as_bytes().to_vec(),
            )
            .entrypoint(&["/usr/local/bin/httpd-foreground"])
            .cmd(&[]),
        web(&format!("{CRI_TOOLS}hostnet-nginx-{arch}:latest"), 12003)?,
        predefined_group,
    ])
}

// ---------------------------------------------------------------------------------------------
// CNI

/// A CNI network for this run: a bridge of its own, addresses from a private /24, portmap.
/// Removes the bridge on drop.
struct Network {
    bridge: String,
    conf_dir: PathBuf,
}

impl Network {
    fn new(dir: &Path) -> anyhow::Result<Network> {
        let conf_dir = dir.join("cni-conf");
        std::fs::create_dir_all(&conf_dir)?;
        let pid = std::process::id();
        let bridge = format!("nxcrit{}", pid % 100_000);
        let subnet = format!("10.{}.{}.0/24", 200 + (pid % 50), (pid / 50) % 250);
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": format!("nixenv-critest-{pid}"),
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": dir.join("cni-ipam"),
                        "ranges": [[{"subnet": subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}]
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ]
        });
        std::fs::write(
            conf_dir.join("10-nixenv-critest.conflist"),
            serde_json::to_vec_pretty(&conf)?,
        )?;
        Ok(Network { bridge, conf_dir })
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "delete", &self.bridge])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn cni_bin_dir() -> anyhow::Result<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("NIXENV_CNI_BIN_DIR") {
        Some(d) if !d.is_empty() => vec![PathBuf::from(d)],
        _ => vec![PathBuf::from("/usr/lib/cni"), PathBuf::from("/opt/cni/bin")],
    };
    candidates
        .iter()
        .find(|d| d.join("bridge").is_file() && d.join("host-local").is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no CNI plugins (bridge, host-local) in {:?}: install containernetworking-plugins or set NIXENV_CNI_BIN_DIR",
                candidates
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Runs

fn resolve_program(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(p))
        .find(|c| c.is_file())
}

/// Runs critest with `handler`; returns the JSON report's path. Ctrl-C kills critest and
/// fails the run (so every guard drops and cleans up).
async fn run_critest(
    args: &Args,
    critest: &Path,
    c: &Containerd,
    handler: &str,
    out: &Path,
) -> anyhow::Result<PathBuf> {
    let report = out.join(format!("{handler}.json"));
    let log_path = out.join(format!("{handler}.log"));
    let _ = std::fs::remove_file(&report);
    let endpoint = format!("unix://{}", c.address().display());
    let mut cmd = tokio::process::Command::new(critest);
    cmd.arg(format!("-runtime-endpoint={endpoint}"))
        .arg(format!("-image-endpoint={endpoint}"))
        .arg(format!("-runtime-handler={handler}"))
        .arg(format!("-config={}", out.join("crictl.yaml").display()))
        .arg(format!("-ginkgo.json-report={}", report.display()))
        .arg("-ginkgo.no-color");
    if let Some(f) = &args.focus {
        cmd.arg(format!("-ginkgo.focus={f}"));
    }
    if let Some(s) = &args.skip {
        cmd.arg(format!("-ginkgo.skip={s}"));
    }
    cmd.args(&args.extra)
        .current_dir(out)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log_path)?)
        .stderr(std::fs::File::create(
            out.join(format!("{handler}.stderr")),
        )?)
        .kill_on_drop(true);
    eprintln!(
        "==> critest -runtime-handler={handler} (log: {})",
        log_path.display()
    );
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("run {}", critest.display()))?;
    let status = tokio::select! {
        s = child.wait() => s?,
        _ = tokio::signal::ctrl_c() => {
            let _ = child.kill().await;
            bail!("interrupted");
        }
    };
    eprintln!(
        "    critest ({handler}) exited with {status} after {:.0?}",
        started.elapsed()
    );
    if !report.is_file() {
        bail!(
            "critest ({handler}) wrote no report {}; see {}",
            report.display(),
            log_path.display()
        );
    }
    Ok(report)
}

fn print_summary(runs: &[(String, BTreeMap<String, SpecResult>)], version: &str) -> bool {
    println!("critest conformance against {version}");
    for (h, run) in runs {
        let c = counts(run);
        println!(
            "  {h:<8} passed {:>3}  failed {:>3}  skipped {:>3}  (specs {})",
            c.passed,
            c.failed,
            c.skipped,
            run.len()
        );
    }
    let mut ok = true;
    let (base_name, base) = &runs[0];
    for (h, run) in &runs[1..] {
        let diff = differences(base, run);
        println!(
            "specs whose result differs ({base_name} -> {h}): {}",
            diff.len()
        );
        for (name, a, b) in &diff {
            let why = run
                .get(name)
                .and_then(|r| r.failure.clone())
                .or_else(|| base.get(name).and_then(|r| r.failure.clone()))
                .unwrap_or_default();
            println!("  [{a} -> {b}] {name}");
            if !why.is_empty() {
                println!("      {why}");
            }
        }
        let reg = regressions(base, run);
        if !reg.is_empty() {
            ok = false;
            println!(
                "REGRESSIONS: passed on {base_name}, failed on {h}: {}",
                reg.len()
            );
            for name in &reg {
                println!("  {name}");
            }
        } else {
            println!("no spec passes on {base_name} and fails on {h}");
        }
    }
    let both: Vec<(&String, &SpecResult)> = base
        .iter()
        .filter(|(n, r)| {
            r.failed()
                && runs[1..]
                    .iter()
                    .all(|(_, run)| run.get(*n).is_some_and(SpecResult::failed))
        })
        .collect();
    if runs.len() > 1 {
        println!("specs failing on every handler: {}", both.len());
        for (name, r) in both {
            println!("  {name}");
            if let Some(f) = &r.failure {
                println!("      {f}");
            }
        }
    }
    ok
}

async fn run(args: Args) -> anyhow::Result<bool> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("nixenv-critest starts containerd, runc and CNI: run it as root");
    }
    let critest = resolve_program(&args.critest).with_context(|| {
        format!(
            "critest not found at {:?}: set CRITEST=/path/to/critest or --critest",
            args.critest
        )
    })?;
    let containerd_bin = containerd::containerd_binary();
    let config_version = containerd::config_version_for(containerd::version_of(&containerd_bin)?);
    let version = std::process::Command::new(&containerd_bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    eprintln!("==> {version} (config version {config_version})");

    let work = tempfile::Builder::new()
        .prefix("nixenv-critest-")
        .tempdir()?;
    let out = match &args.out {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            std::fs::canonicalize(d)?
        }
        None => work.path().join("out"),
    };
    std::fs::create_dir_all(&out)?;
    // An empty client config, so a host's /etc/crictl.yaml does not redirect critest.
    std::fs::write(out.join("crictl.yaml"), "")?;

    let node = TestNode::new();
    let shim = shim_bin();
    let network = Network::new(work.path())?;
    let cni_bin = cni_bin_dir()?;
    let handlers_needed = &args.handlers;
    let builder = Containerd::builder()
        .handler(RuntimeHandler::runc())
        .handler(RuntimeHandler::nixenv())
        .default_handler("runc")
        .path_dir(shim.parent().context("shim directory")?)
        .env("NIXENV_CONFIG", node.write_config())
        .cni(&cni_bin, &network.conf_dir)
        .log_level(if args.debug { "debug" } else { "info" })
        .cri_line("netns_mounts_under_state_dir = true");
    eprintln!("==> starting containerd with handlers runc and nixenv");
    let c = builder.start()?;
    let images = stand_in_images()?;
    let mut runs = Vec::new();
    let result: anyhow::Result<()> = async {
        for handler in handlers_needed {
            eprintln!("==> importing {} stand-in images", images.len());
            for image in &images {
                c.import(image)
                    .with_context(|| format!("import {}", image.name()))?;
            }
            let report = run_critest(&args, &critest, &c, handler, &out).await?;
            let specs = parse_report(&std::fs::read(&report)?)?;
            runs.push((handler.clone(), specs));
        }
        Ok(())
    }
    .await;
    std::fs::write(out.join("containerd.log"), c.log())?;
    if args.keep {
        eprintln!("==> results kept in {}", out.display());
        let _ = work.keep();
    } else if args.out.is_none() {
        eprintln!("==> (use --out DIR or --keep to keep the reports and logs)");
    }
    drop(c);
    drop(network);
    result?;
    Ok(print_summary(&runs, &version))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nixenv-critest: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("nixenv-critest: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"[{"SuiteDescription":"CRI validation","SpecReports":[
      {"ContainerHierarchyTexts":["[k8s.io] Container","runtime should support basic operations on container"],
       "LeafNodeType":"It","LeafNodeText":"runtime should support creating container [Conformance]","State":"passed"},
      {"ContainerHierarchyTexts":["[k8s.io] Image Manager"],"LeafNodeType":"It",
       "LeafNodeText":"public image with tag should be pulled and removed [Conformance]","State":"failed",
       "Failure":{"Message":"\nfailed to pull image: no route to registry\nmore"}},
      {"ContainerHierarchyTexts":["[k8s.io] Security Context"],"LeafNodeType":"It",
       "LeafNodeText":"should support apparmor","State":"skipped"},
      {"LeafNodeType":"SynchronizedBeforeSuite","State":"passed"}
    ]}]"#;

    #[test]
    fn parses_ginkgo_json_reports() {
        let specs = parse_report(REPORT.as_bytes()).unwrap();
        assert_eq!(specs.len(), 3);
        let name = "[k8s.io] Container runtime should support basic operations on container runtime should support creating container [Conformance]";
        assert!(specs[name].passed());
        let pull = &specs
            ["[k8s.io] Image Manager public image with tag should be pulled and removed [Conformance]"];
        assert!(pull.failed());
        assert_eq!(
            pull.failure.as_deref(),
            Some("failed to pull image: no route to registry more")
        );
        assert_eq!(
            counts(&specs),
            Counts {
                passed: 1,
                failed: 1,
                skipped: 1
            }
        );
        assert!(parse_report(b"{}").is_err());
    }

    #[test]
    fn a_spec_passing_only_on_the_base_is_a_regression() {
        let r = |s: &str| SpecResult {
            state: s.to_owned(),
            failure: None,
        };
        let base: BTreeMap<String, SpecResult> = [
            ("a".to_owned(), r("passed")),
            ("b".to_owned(), r("failed")),
            ("c".to_owned(), r("passed")),
            ("d".to_owned(), r("passed")),
        ]
        .into();
        let other: BTreeMap<String, SpecResult> = [
            ("a".to_owned(), r("passed")),
            ("b".to_owned(), r("passed")),
            ("c".to_owned(), r("timedout")),
        ]
        .into();
        assert_eq!(regressions(&base, &other), vec!["c", "d"]);
        let skipped: BTreeMap<String, SpecResult> = [("a".to_owned(), r("skipped"))].into();
        assert!(regressions(&base, &skipped).contains(&"c".to_owned()));
        assert!(!regressions(&base, &skipped).contains(&"a".to_owned()));
        assert_eq!(
            differences(&base, &other),
            vec![
                ("b".to_owned(), "failed".to_owned(), "passed".to_owned()),
                ("c".to_owned(), "passed".to_owned(), "timedout".to_owned()),
                ("d".to_owned(), "passed".to_owned(), "missing".to_owned()),
            ]
        );
    }

    #[test]
    fn arguments() {
        let a = parse_args(&[
            "--handlers".into(),
            "nixenv".into(),
            "--focus".into(),
            "Container".into(),
            "--".into(),
            "-ginkgo.v".into(),
        ])
        .unwrap();
        assert_eq!(a.handlers, vec!["nixenv"]);
        assert_eq!(a.focus.as_deref(), Some("Container"));
        assert_eq!(a.extra, vec!["-ginkgo.v"]);
        assert!(parse_args(&["--handlers".into(), "crun".into()]).is_err());
        assert!(parse_args(&["--bogus".into()]).is_err());
    }
}
