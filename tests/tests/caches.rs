//! Caches people run: private caches behind netrc credentials (Basic with a login, a bearer
//! token without one, as attic and cachix issue), attic's redirects of NARs to object storage
//! (presigned URLs that must not get the cache's credentials), and narinfos without
//! `FileHash`. Real pulls from caches served over HTTP on 127.0.0.1.

use std::path::Path;
use std::process::{Output, Stdio};

use nixenv_testkit::cache_server::Fault;
use nixenv_testkit::{Cache, CacheServer, Fixtures, TestNode};

fn pull(node: &TestNode, paths: &[&str]) -> Output {
    let mut args = vec!["pull"];
    args.extend_from_slice(paths);
    node.nixenv(&args)
        .stdin(Stdio::null())
        .output()
        .expect("run nixenv pull")
}

fn assert_pulled(node: &TestNode, out: &Output) {
    let fx = Fixtures::get();
    assert!(
        out.status.success(),
        "pull failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(printed, fx.echoserver_closure());
    assert_eq!(node.store_entries(), fx.echoserver_store_listing());
}

/// A node of `cache` with `netrc` as its netrc file.
fn node_with_netrc(cache: &CacheServer, netrc: &str) -> TestNode {
    let fx = Fixtures::get();
    let node = TestNode::new()
        .substituter(&cache.url())
        .trusting(&fx.trusted_key.public);
    let file = node.dir().join("netrc");
    std::fs::write(&file, netrc).unwrap();
    node.with_config_line(&format!("netrc-file = \"{}\"", file.display()))
}

/// Every `Authorization` header `server` received.
fn authorizations(server: &CacheServer) -> Vec<Option<String>> {
    server
        .request_log()
        .into_iter()
        .map(|r| r.authorization)
        .collect()
}

#[test]
fn a_netrc_entry_without_login_is_sent_as_a_bearer_token() {
    let fx = Fixtures::get();
    let cache = CacheServer::serve(fx.cache(Cache::Xz));
    cache.require_authorization("Bearer eyJ0eXAi.attic-token");

    // Without credentials the cache refuses: one line naming the path and the 401.
    let anonymous = TestNode::new()
        .substituter(&cache.url())
        .trusting(&fx.trusted_key.public);
    let out = pull(&anonymous, &[&fx.echoserver]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("401"), "{err}");
    assert!(anonymous.store_entries().is_empty());

    let node = node_with_netrc(
        &cache,
        "machine 127.0.0.1\n  password eyJ0eXAi.attic-token\n",
    );
    assert_pulled(&node, &pull(&node, &[&fx.echoserver]));
    let sent = authorizations(&cache);
    assert!(sent.len() > 1);
    assert!(
        sent[1..]
            .iter()
            .all(|a| a.as_deref() == Some("Bearer eyJ0eXAi.attic-token")),
        "{sent:?}"
    );
}

#[test]
fn a_netrc_entry_with_login_is_sent_as_basic() {
    let fx = Fixtures::get();
    let cache = CacheServer::serve(fx.cache(Cache::Xz));
    // base64("alice:s3cret")
    cache.require_authorization("Basic YWxpY2U6czNjcmV0");
    let node = node_with_netrc(&cache, "machine 127.0.0.1 login alice password s3cret\n");
    assert_pulled(&node, &pull(&node, &[&fx.echoserver]));
    // Another host's entry is not sent.
    let other = CacheServer::serve(fx.cache(Cache::Xz));
    other.require_authorization("Basic YWxpY2U6czNjcmV0");
    let node = node_with_netrc(
        &other,
        "machine cache.example.org login alice password s3cret\n",
    );
    assert!(!pull(&node, &[&fx.echoserver]).status.success());
    assert!(authorizations(&other).iter().all(Option::is_none));
}

#[test]
fn nars_redirected_to_object_storage_get_no_credentials() {
    let fx = Fixtures::get();
    // attic: narinfos from the authenticated cache, NARs by a redirect to a presigned URL of
    // object storage, which refuses a second credential.
    let storage = CacheServer::serve(fx.cache(Cache::Xz));
    storage.refuse_authorization();
    let cache = CacheServer::serve(fx.cache(Cache::Xz));
    cache.require_authorization("Bearer attic-token");
    cache.inject(
        "/nar/*",
        Fault::Redirect {
            host: "127.0.0.1",
            port: storage.addr().port(),
            prefix: "",
        },
    );
    let node = node_with_netrc(&cache, "machine 127.0.0.1 password attic-token\n")
        .with_config_line(&format!(
            "allowed-redirect-hosts = {{ \"{}\" = [\"127.0.0.1\"] }}",
            cache.url()
        ));
    assert_pulled(&node, &pull(&node, &[&fx.echoserver]));
    let nars = storage.requests_matching("/nar/*");
    assert_eq!(nars, fx.echoserver_closure().len(), "each NAR from storage");
    assert!(authorizations(&storage).iter().all(Option::is_none));
    assert_eq!(
        cache.requests_matching("/nar/*"),
        nars,
        "each redirected once"
    );
}

/// Copies the xz cache to `dest`, each narinfo without its `FileHash` (and `FileSize`) line.
fn cache_without_file_hashes(dest: &Path) -> usize {
    let fx = Fixtures::get();
    let dir = fx.cache_copy(Cache::Xz, dest);
    assert_eq!(dir, dest);
    let mut stripped = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "narinfo") {
            let text = std::fs::read_to_string(&path).unwrap();
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("FileHash:") && !l.starts_with("FileSize:"))
                .collect();
            assert!(kept.len() < text.lines().count(), "{}", path.display());
            std::fs::write(&path, kept.join("\n") + "\n").unwrap();
            stripped += 1;
        }
    }
    stripped
}

#[test]
fn narinfos_without_file_hash_pull_and_verify_the_nar() {
    let fx = Fixtures::get();
    let tmp = tempfile::tempdir().unwrap();
    assert!(cache_without_file_hashes(tmp.path()) >= fx.echoserver_closure().len());
    let cache = CacheServer::serve(tmp.path());
    let node = TestNode::new()
        .substituter(&cache.url())
        .trusting(&fx.trusted_key.public);
    assert_pulled(&node, &pull(&node, &[&fx.echoserver]));

    // Without FileHash, NarSize and NarHash are what catch a wrong NAR: busybox's NAR replaced
    // by glibc's (a valid xz stream of another path) fails, and installs nothing of busybox.
    let url = |p: &str| tmp.path().join(fx.narinfo(Cache::Xz, p).url);
    std::fs::copy(url(&fx.glibc), url(&fx.busybox)).unwrap();
    let node = TestNode::new()
        .substituter(&cache.url())
        .trusting(&fx.trusted_key.public);
    let out = pull(&node, &[&fx.busybox]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("nixenv: ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains(&fx.busybox), "{err}");
    assert!(
        !node
            .store_entries()
            .iter()
            .any(|e| fx.busybox.ends_with(e.as_str())),
        "{:?}",
        node.store_entries()
    );
}

/// moto, an S3-compatible server (PyPI), pinned so a release cannot change what the test
/// accepts. With `INITIAL_NO_AUTH_ACTION_COUNT` it checks every request's SigV4 signature
/// against its IAM users once the first few requests (the setup's IAM calls) are done.
const MOTO: &str = "moto[server]==5.1.4";

/// `setup.py ENDPOINT CACHE_DIR`: an IAM user allowed `s3:*`, its access key, bucket
/// `nixcache` in eu-central-1 holding the cache; prints the key as JSON.
const MOTO_SETUP: &str = r#"
import json, os, sys, boto3
endpoint, cache = sys.argv[1], sys.argv[2]
kw = dict(endpoint_url=endpoint, region_name="eu-central-1")
iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **kw)
iam.create_user(UserName="nixenv")
key = iam.create_access_key(UserName="nixenv")["AccessKey"]
iam.put_user_policy(UserName="nixenv", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17",
     "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
s3 = boto3.client("s3", aws_access_key_id=key["AccessKeyId"],
                  aws_secret_access_key=key["SecretAccessKey"], **kw)
s3.create_bucket(Bucket="nixcache",
                 CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
for root, _, files in os.walk(cache):
    for f in files:
        full = os.path.join(root, f)
        s3.upload_file(full, "nixcache", os.path.relpath(full, cache))
print(json.dumps({"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}))
"#;

/// A moto server on 127.0.0.1, killed on drop.
struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    fn start(python: &Path) -> Moto {
        let port = nixenv_testkit::free_port();
        let child = std::process::Command::new(python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        let moto = Moto { child, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "moto did not listen");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        moto
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// `nixenv pull` with exactly `env` as the AWS environment.
fn pull_with_env(node: &TestNode, path: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = node.nixenv(&["pull", path]);
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("HOME", node.dir()).envs(env.iter().copied());
    cmd.stdin(Stdio::null()).output().expect("run nixenv pull")
}

#[test]
fn s3_substituters_sign_with_sigv4_from_the_environment_or_the_credentials_file() {
    let fx = Fixtures::get();
    let python = nixenv_testkit::python::venv_with(Path::new(env!("CARGO_TARGET_TMPDIR")), MOTO);
    let moto = Moto::start(&python);
    let out = std::process::Command::new(&python)
        .args(["-c", MOTO_SETUP, &format!("http://{}", moto.endpoint())])
        .arg(fx.cache(Cache::Xz))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, secret) = (key["id"].as_str().unwrap(), key["secret"].as_str().unwrap());
    let s3_node = |query: &str| {
        TestNode::new()
            .substituter(&format!(
                "s3://nixcache?endpoint={}&scheme=http&region=eu-central-1{query}",
                moto.endpoint()
            ))
            .trusting(&fx.trusted_key.public)
    };

    // Static credentials from the usual environment variables.
    let node = s3_node("");
    let out = pull_with_env(
        &node,
        &fx.echoserver,
        &[("AWS_ACCESS_KEY_ID", id), ("AWS_SECRET_ACCESS_KEY", secret)],
    );
    assert_pulled(&node, &out);

    // From the shared credentials file, the profile named in the URL.
    let node = s3_node("&profile=ci");
    let file = node.dir().join("credentials");
    std::fs::write(
        &file,
        format!("[default]\naws_access_key_id = nope\naws_secret_access_key = nope\n\n[ci]\naws_access_key_id = {id}\naws_secret_access_key = {secret}\n"),
    )
    .unwrap();
    let out = pull_with_env(
        &node,
        &fx.echoserver,
        &[("AWS_SHARED_CREDENTIALS_FILE", file.to_str().unwrap())],
    );
    assert_pulled(&node, &out);

    // A wrong secret (moto checks the signature) and no credentials at all: one line naming
    // the cache and the 403, nothing installed.
    for env in [
        vec![
            ("AWS_ACCESS_KEY_ID", id),
            ("AWS_SECRET_ACCESS_KEY", "wrong"),
        ],
        vec![],
    ] {
        let node = s3_node("");
        let out = pull_with_env(&node, &fx.echoserver, &env);
        assert!(!out.status.success(), "{env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("nixenv: ")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        assert!(
            errors[0].contains("s3://nixcache/") && errors[0].ends_with("HTTP 403"),
            "{err}"
        );
        assert!(node.store_entries().is_empty());
    }
}
