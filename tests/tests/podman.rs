//! podman 4.3 + conmon + runc (Debian's), with private storage: nixenv-runc as `--runtime`, and
//! nixenv-hook's precreate and prestart hooks with the stock runc. Fixture closures are built by
//! real Nix and served over HTTP on 127.0.0.1. Needs root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixenv_testkit::fixtures::{echo, store_path_base, EchoReply};
use nixenv_testkit::node_registry::{
    archive_manifest_digest, shipped_config, shipped_empty_archive, NodeRegistry,
};
use nixenv_testkit::podman::Podman;
use nixenv_testkit::{env_var, free_port, Cache, Fixtures, ServedNode, TestNode};

const REAL_RUNC: &str = "/usr/sbin/runc";

/// A binary of the `nixenv-hook` package; `nixenv-runc` hands create/run/delete to
/// `nixenv-hook` beside it, so both are made current.
fn bin_path(name: &str) -> PathBuf {
    nixenv_testkit::bin_path("nixenv-hook");
    nixenv_testkit::bin_path(name)
}

fn script(path: &Path, body: &str) -> PathBuf {
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_owned()
}

/// podman hands the runtime a scrubbed environment: the runtime is a two-line script giving
/// the real nixenv-runc this node's config (as `/etc/nixenv/config.toml` would on a node).
fn nixenv_runc_runtime(dir: &Path, node: &TestNode, runc_env: &str) -> PathBuf {
    let config = node.write_config();
    script(
        &dir.join("nixenv-runc.sh"),
        &format!(
            "export NIXENV_CONFIG={config:?} {runc_env}\nexec {:?} \"$@\"\n",
            bin_path("nixenv-runc")
        ),
    )
}

/// A hooks dir holding `runtimeclass/hooks.d/<names>` with the hook path and the config adjusted.
fn hooks_dir(dir: &Path, node: &TestNode, names: &[&str]) -> PathBuf {
    let hooks = dir.join("hooks.d");
    std::fs::create_dir_all(&hooks).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let config = node.write_config();
    for name in names {
        let text = std::fs::read_to_string(repo.join("runtimeclass/hooks.d").join(name)).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["hook"]["path"] = bin_path("nixenv-hook").display().to_string().into();
        json["hook"]["env"] = serde_json::json!([format!("NIXENV_CONFIG={}", config.display())]);
        std::fs::write(hooks.join(name), json.to_string()).unwrap();
    }
    hooks
}

/// The zstd fixture cache and the catalog over HTTP, and a node using them.
fn env() -> ServedNode {
    ServedNode::new(Cache::Zstd)
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Files under `state-dir` (outside the store, and outside `history`, where the records of
/// gone containers stay) whose name or content mentions `key`: the pins.
fn pins_mentioning(node: &TestNode, key: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, skip: &[PathBuf], key: &str, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if skip.contains(&p) {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(&p, skip, key, out);
            }
            let named = e.file_name().to_string_lossy().contains(key);
            let content = ft.is_file()
                && std::fs::read(&p)
                    .is_ok_and(|b| b.windows(key.len()).any(|w| w == key.as_bytes()));
            if named || content {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    let skip = [node.store_dir(), node.state_dir().join("history")];
    walk(&node.state_dir(), &skip, key, &mut out);
    out
}

/// The precreate hook's pin key: `rootfs-` and the first 16 bytes of SHA-256(root path), in hex.
fn rootfs_key(root: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(root.as_bytes());
    format!(
        "rootfs-{}",
        d[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn container_id(podman: &Podman, name: &str) -> String {
    podman
        .ok(&["inspect", "--format", "{{.Id}}", name])
        .unwrap()
        .trim()
        .to_owned()
}

fn assert_echoserver_env(reply: &EchoReply, fx: &Fixtures) {
    assert_eq!(
        reply.message.as_deref(),
        Some("hello from nix"),
        "{reply:?}"
    );
    assert_eq!(
        reply.env.get("NIXENV_ENVIRONMENT").map(String::as_str),
        Some("acme/echoserver")
    );
    assert_eq!(
        reply.env.get("NIXENV_GENERATION").map(String::as_str),
        Some("2")
    );
    let path = reply.path.as_deref().unwrap_or_default();
    assert!(
        path.starts_with(&format!("{}/bin:", fx.echoserver)),
        "PATH {path}"
    );
    let want: Vec<String> = fx
        .echoserver_closure()
        .iter()
        .map(|p| store_path_base(p).to_owned())
        .collect();
    assert_eq!(
        reply.store.as_ref(),
        Some(&want),
        "only the closure under /nix/store"
    );
}

/// `podman run -d` of `echoserver` (by name) in `acme/echoserver` with `extra` options; its
/// reply once it serves, and the container's name.
fn run_echoserver(podman: &Podman, prefix: &str, extra: &[&str]) -> (String, EchoReply) {
    let (name, port) = (unique(prefix), free_port());
    let port_env = format!("PORT={port}");
    let mut args = vec![
        "-d",
        "--name",
        &name,
        "--annotation",
        "nix.dev/environment=acme/echoserver",
        "-e",
        &port_env,
    ];
    args.extend_from_slice(extra);
    let out = podman.run(&args, &["echoserver"]);
    assert!(out.status.success(), "podman run: {}", stderr(&out));
    let reply = echo(&format!("127.0.0.1:{port}"), Duration::from_secs(30))
        .unwrap_or_else(|err| panic!("{err:#}\nlogs: {}", podman.logs(&name)));
    (name, reply)
}

#[test]
fn nixenv_runc_serves_the_environment_and_rm_unpins() {
    let e = env();
    let podman = Podman::new();
    let runtime = nixenv_runc_runtime(podman.dir(), &e.node, "");
    let podman = podman.runtime(runtime);
    podman.import_empty_image().unwrap();
    let (name, reply) = run_echoserver(&podman, "echo", &[]);
    assert_echoserver_env(&reply, Fixtures::get());

    let id = container_id(&podman, &name);
    assert!(
        !pins_mentioning(&e.node, &id).is_empty(),
        "a running container pins its closure"
    );
    podman.ok(&["rm", "--force", "--time", "0", &name]).unwrap();
    assert_eq!(
        pins_mentioning(&e.node, &id),
        Vec::<PathBuf>::new(),
        "podman rm unpins"
    );
    // What ran is still on record (`nixenv sbom --container`), rooting nothing.
    assert_eq!(
        e.node.sbom_of_container(&id).as_deref(),
        Ok(Fixtures::get().echoserver_closure())
    );
    // The store keeps the paths for the next container.
    for p in Fixtures::get().echoserver_closure() {
        assert!(e.node.store_dir().join(store_path_base(p)).exists(), "{p}");
    }
}

/// Every `nixenv@<id>` exec record under `dirs` (runc's roots: podman's is under its runroot
/// or /run/runc).
fn exec_records(dirs: &[&Path], id: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let ft = e.file_type().unwrap();
            if e.file_name().to_string_lossy() == name {
                out.push(e.path());
            } else if ft.is_dir() && !ft.is_symlink() {
                walk(&e.path(), name, out);
            }
        }
    }
    let mut out = Vec::new();
    for d in dirs {
        walk(d, &format!("nixenv@{id}"), &mut out);
    }
    out
}

/// `podman exec` builds the exec's process from podman's own copy of the spec and hands it to
/// `nixenv-runc exec --process FILE`: the exec still gets the closure's PATH (a command found
/// by name) and the lock's env, keeps a variable it sets itself, and a plain container's exec
/// through the same runtime gets nothing of nixenv's. The exec record goes with `podman rm`.
#[test]
fn podman_exec_sees_the_closure_path_and_env() {
    let e = env();
    let fx = Fixtures::get();
    let podman = Podman::new();
    let runtime = nixenv_runc_runtime(podman.dir(), &e.node, "");
    let podman = podman.runtime(runtime);
    podman.import_empty_image().unwrap();
    let (name, _) = run_echoserver(&podman, "exec", &[]);
    let id = container_id(&podman, &name);
    let roots = [podman.dir(), Path::new("/run/runc")];
    assert_eq!(
        exec_records(&roots, &id).len(),
        1,
        "create records the env changes"
    );

    // `env` by bare name: busybox's applet, found on the closure's PATH.
    let out = podman.output(&["exec", &name, "env"]);
    assert!(out.status.success(), "podman exec env: {}", stderr(&out));
    let vars = String::from_utf8_lossy(&out.stdout).into_owned();
    let path = env_var(&vars, "PATH").unwrap_or_default();
    assert!(
        path.starts_with(&format!("{}/bin:{}/bin:", fx.echoserver, fx.busybox)),
        "the closure's bins first: {path}"
    );
    assert_eq!(
        env_var(&vars, "ECHO_MESSAGE").as_deref(),
        Some("hello from nix")
    );
    assert_eq!(
        env_var(&vars, "NIXENV_ENVIRONMENT").as_deref(),
        Some("acme/echoserver")
    );
    let out = podman.output(&["exec", &name, "sh", "-c", "command -v echoserver"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}/bin/echoserver", fx.echoserver),
        "{}",
        stderr(&out)
    );
    // A variable the exec sets itself keeps its value.
    let out = podman.output(&["exec", "-e", "ECHO_MESSAGE=mine", &name, "env"]);
    let vars = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        env_var(&vars, "ECHO_MESSAGE").as_deref(),
        Some("mine"),
        "{}",
        stderr(&out)
    );

    // A plain container through the same nixenv-runc: its exec is podman's, untouched.
    let plain = unique("plain");
    let out = podman.run(
        &["-d", "--name", &plain, "-v", "/bin/busybox:/bin/busybox:ro"],
        &["/bin/busybox", "sleep", "600"],
    );
    assert!(out.status.success(), "podman run: {}", stderr(&out));
    let plain_id = container_id(&podman, &plain);
    assert!(exec_records(&roots, &plain_id).is_empty());
    let out = podman.output(&["exec", &plain, "/bin/busybox", "env"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let vars = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(env_var(&vars, "PATH").is_some(), "{vars}");
    assert!(
        !vars.contains("/nix/store") && !vars.contains("NIXENV_") && !vars.contains("ECHO_MESSAGE"),
        "nothing of nixenv's: {vars}"
    );

    podman.ok(&["rm", "--force", "--time", "0", &name]).unwrap();
    podman
        .ok(&["rm", "--force", "--time", "0", &plain])
        .unwrap();
    assert_eq!(
        exec_records(&roots, &id),
        Vec::<PathBuf>::new(),
        "podman rm removes the exec record"
    );
}

/// CRI-O's default PATH, the first `PATH` entry of every spec it writes.
const CRIO_DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// CRI-O's spec shape, replayed through podman: the runtime script puts CRI-O's default PATH
/// and a default `ECHO_MESSAGE` (a variable the lock sets) before the container's own entries
/// at create, as CRI-O does with its defaults before the image's and the pod's env. runc uses
/// the last entry of a key: the closure's PATH must be built from (and replace) the last one,
/// or `echoserver` by bare name is not found.
#[test]
fn a_spec_shaped_like_crio_s_with_two_paths_runs_echoserver_by_name() {
    let e = env();
    let podman = Podman::new();
    let dir = podman.dir().to_owned();
    let jq = Path::new("/usr/bin/jq");
    assert!(jq.is_file(), "jq (tests/install-deps installs it)");
    let config = e.node.write_config();
    let runtime = script(
        &dir.join("crio-shaped.sh"),
        &format!(
            "export NIXENV_CONFIG={config:?}\n\
             prev=\n\
             for a in \"$@\"; do\n\
               if [ \"$prev\" = --bundle ]; then\n\
                 {jq:?} '.process.env = [\"PATH={CRIO_DEFAULT_PATH}\", \"ECHO_MESSAGE=crio default\"] + .process.env' \"$a/config.json\" > \"$a/config.json.crio\"\n\
                 mv \"$a/config.json.crio\" \"$a/config.json\"\n\
                 cp \"$a/config.json\" {dir:?}/before.json\n\
               fi\n\
               prev=$a\n\
             done\n\
             exec {:?} \"$@\"\n",
            bin_path("nixenv-runc")
        ),
    );
    let podman = podman.runtime(runtime);
    podman.import_empty_image().unwrap();
    let (name, reply) = run_echoserver(
        &podman,
        "crio",
        &[
            "-e",
            "PATH=/image/bin:/usr/bin",
            "-e",
            "ECHO_MESSAGE=from the pod",
        ],
    );
    let before: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("before.json")).unwrap()).unwrap();
    let paths = before["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v.as_str().unwrap().starts_with("PATH="))
        .count();
    assert_eq!(paths, 2, "the spec had two PATH entries: {before}");
    let fx = Fixtures::get();
    assert_eq!(
        reply.path.as_deref(),
        Some(
            format!(
                "{}/bin:{}/bin:/image/bin:/usr/bin",
                fx.echoserver, fx.busybox
            )
            .as_str()
        ),
        "the closure's bins before the PATH that was effective"
    );
    assert_eq!(
        reply.message.as_deref(),
        Some("from the pod"),
        "the container's last ECHO_MESSAGE wins over the lock's"
    );
    assert_eq!(
        reply.env.get("NIXENV_ENVIRONMENT").map(String::as_str),
        Some("acme/echoserver")
    );
    let id = container_id(&podman, &name);
    podman.ok(&["rm", "--force", "--time", "0", &name]).unwrap();
    assert_eq!(
        pins_mentioning(&e.node, &id),
        Vec::<PathBuf>::new(),
        "podman rm unpins"
    );
}

#[test]
fn precreate_hook_with_stock_runc_gives_the_same_result() {
    let e = env();
    let podman = Podman::new();
    let hooks = hooks_dir(
        podman.dir(),
        &e.node,
        &["nixenv-precreate.json", "nixenv-poststop.json"],
    );
    let podman = podman.runtime(REAL_RUNC).hooks_dir(hooks);
    podman.import_empty_image().unwrap();
    let (name, reply) = run_echoserver(&podman, "pre", &[]);
    assert_echoserver_env(&reply, Fixtures::get());

    let root = podman
        .ok(&[
            "inspect",
            "--format",
            "{{.GraphDriver.Data.MergedDir}}",
            &name,
        ])
        .unwrap();
    let key = rootfs_key(root.trim());
    assert!(
        !pins_mentioning(&e.node, &key).is_empty(),
        "precreate pins by rootfs key"
    );
    podman.ok(&["rm", "--force", "--time", "0", &name]).unwrap();
    assert_eq!(
        pins_mentioning(&e.node, &key),
        Vec::<PathBuf>::new(),
        "poststop unpins"
    );
}

#[test]
fn prestart_hook_mounts_the_closure_read_only() {
    let e = env();
    let podman = Podman::new();
    let hooks = hooks_dir(
        podman.dir(),
        &e.node,
        &["nixenv-prestart.json", "nixenv-poststop.json"],
    );
    let podman = podman.runtime(REAL_RUNC).hooks_dir(hooks);
    podman.import_empty_image().unwrap();
    let (name, port) = (unique("prestart"), free_port());
    // Minimal mode: no env, no PATH from nixenv; the command is an absolute store path.
    let server = format!("{}/bin/echoserver", Fixtures::get().echoserver);
    let out = podman.run(
        &[
            "-d",
            "--name",
            &name,
            "--annotation",
            "nix.dev/environment=acme/echoserver",
            "-e",
            &format!("PORT={port}"),
        ],
        &[&server],
    );
    assert!(out.status.success(), "podman run: {}", stderr(&out));
    let reply = echo(&format!("127.0.0.1:{port}"), Duration::from_secs(30))
        .unwrap_or_else(|err| panic!("{err:#}\nlogs: {}", podman.logs(&name)));
    let want: Vec<String> = Fixtures::get()
        .echoserver_closure()
        .iter()
        .map(|p| store_path_base(p).to_owned())
        .collect();
    assert_eq!(
        reply.store.as_ref(),
        Some(&want),
        "only the closure under /nix/store"
    );
    assert_eq!(reply.message, None, "a hook cannot set env");

    // Read-only: even root in the container cannot write into the store.
    let touch = format!("{}/bin/touch", Fixtures::get().busybox);
    for target in [
        format!("{}/new", Fixtures::get().echoserver),
        "/nix/store/new".to_owned(),
    ] {
        let out = podman.output(&["exec", &name, &touch, &target]);
        assert!(!out.status.success(), "wrote {target}");
        assert!(
            stderr(&out).contains("Read-only file system"),
            "{}",
            stderr(&out)
        );
    }
    let id = container_id(&podman, &name);
    assert!(
        !pins_mentioning(&e.node, &id).is_empty(),
        "prestart pins by container id"
    );
    podman.ok(&["rm", "--force", "--time", "0", &name]).unwrap();
    assert_eq!(
        pins_mentioning(&e.node, &id),
        Vec::<PathBuf>::new(),
        "poststop unpins"
    );
}

#[test]
fn a_container_without_the_annotation_keeps_a_byte_identical_config() {
    let node = TestNode::new();
    let podman = Podman::new();
    let dir = podman.dir().to_owned();
    // The fake runc records config.json as nixenv-runc leaves it, and the argv, then runs runc.
    let fake = script(
        &dir.join("fake-runc.sh"),
        &format!(
            "printf '%s\\n' \"$*\" >> {dir:?}/argv\n\
             for a in \"$@\"; do [ \"$prev\" = --bundle ] && cp \"$a/config.json\" {dir:?}/after.json; prev=$a; done\n\
             exec {REAL_RUNC} \"$@\"\n"
        ),
    );
    let config = node.write_config();
    let runtime = script(
        &dir.join("runtime.sh"),
        &format!(
            "printf '%s\\n' \"$*\" >> {dir:?}/argv.in\n\
             for a in \"$@\"; do [ \"$prev\" = --bundle ] && cp \"$a/config.json\" {dir:?}/before.json; prev=$a; done\n\
             NIXENV_CONFIG={config:?} NIXENV_RUNC={fake:?} exec {:?} \"$@\"\n",
            bin_path("nixenv-runc")
        ),
    );
    let podman = podman.runtime(runtime);
    podman.import_empty_image().unwrap();
    let out = podman.run(
        &["--rm", "-v", "/bin/busybox:/bin/busybox:ro"],
        &["/bin/busybox", "echo", "plain"],
    );
    assert!(out.status.success(), "podman run: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "plain");
    let before = std::fs::read(dir.join("before.json")).unwrap();
    let after = std::fs::read(dir.join("after.json")).unwrap();
    assert!(before.len() > 100);
    assert!(before == after, "config.json changed");
    let argv_in = std::fs::read_to_string(dir.join("argv.in")).unwrap();
    let argv_out = std::fs::read_to_string(dir.join("argv")).unwrap();
    assert_eq!(
        argv_in, argv_out,
        "runc got the same arguments for every subcommand"
    );
    assert!(
        argv_in.lines().any(|l| l.starts_with("create ")),
        "{argv_in}"
    );
    assert!(
        argv_in.lines().any(|l| l.starts_with("delete ")),
        "{argv_in}"
    );
}

#[test]
fn a_bad_reference_fails_podman_run_with_the_one_line_error() {
    let e = env();
    let podman = Podman::new();
    let runtime = nixenv_runc_runtime(podman.dir(), &e.node, "");
    let podman = podman.runtime(runtime);
    podman.import_empty_image().unwrap();
    for (reference, cause) in [
        ("acme/echoserver@9", "generation 9"),
        ("Acme/Bad!", "Acme/Bad!"),
        ("acme/nothing-here", "not found"),
    ] {
        let name = unique("bad");
        let out = podman.run(
            &[
                "--name",
                &name,
                "--annotation",
                &format!("nix.dev/environment={reference}"),
            ],
            &["echoserver"],
        );
        assert!(!out.status.success(), "{reference}: podman run succeeded");
        let err = stderr(&out);
        let line = err
            .lines()
            .find(|l| l.contains("nixenv: "))
            .unwrap_or_else(|| panic!("{reference}: no nixenv error in: {err}"));
        assert!(
            line.contains(reference) && line.contains(cause),
            "{reference}: {line}"
        );
        // Nothing left pinned for the failed container.
        let id = container_id(&podman, &name);
        assert_eq!(
            pins_mentioning(&e.node, &id),
            Vec::<PathBuf>::new(),
            "{reference}"
        );
    }
}

/// The package's `registries.conf.d` drop-in: podman (and CRI-O, through the same
/// containers-image) resolves the short name `empty` by its alias and pulls it from the node
/// registry, its mirror: no network, no unqualified-search registries.
#[test]
fn podman_pulls_empty_by_short_name_from_the_node_registry() {
    let registry = NodeRegistry::start().expect("start nixenv registry");
    let manifest = archive_manifest_digest(&shipped_empty_archive()).unwrap();
    let podman = Podman::new();
    let conf = podman.dir().join("registries.conf");
    std::fs::write(
        &conf,
        shipped_config("containers/50-nixenv-empty.conf", registry.addr()),
    )
    .unwrap();
    let out = podman
        .command()
        .env("CONTAINERS_REGISTRIES_CONF", &conf)
        .args(["pull", "empty:latest"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "podman pull empty:latest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = podman
        .ok(&[
            "image",
            "inspect",
            "--format",
            "{{.Digest}}",
            "docker.io/library/empty:latest",
        ])
        .unwrap();
    assert_eq!(digest.trim(), manifest);
}
