//! Self-tests of the harness: the fixtures are what they claim (checked with Nix itself) and
//! the test server serves, counts and injects faults.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixenv_testkit::fixtures::{echo, http_get, nix_command, store_path_base};
use nixenv_testkit::{Cache, CacheServer, Fault, Fixtures};

/// Substitutes echoserver's closure with Nix 2.8 itself into a fresh chroot store.
fn nix_substitute(cache: Cache) -> std::process::Output {
    let fx = Fixtures::get();
    let store = tempfile::tempdir().unwrap();
    nix_command("nix-store")
        .arg("--store")
        .arg(store.path())
        .args(["--realise", &fx.echoserver])
        .args(["--option", "substituters", &fx.cache_file_url(cache)])
        .args(["--option", "trusted-public-keys", &fx.trusted_key.public])
        .output()
        .expect("run nix-store")
}

#[test]
fn nix_accepts_the_good_caches_and_refuses_the_spoiled_ones() {
    for cache in Cache::ALL {
        let fx = Fixtures::get();
        let out = nix_substitute(cache);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if fx.victim(cache).is_none() {
            assert!(
                out.status.success(),
                "{cache:?}: nix refused a good cache: {stderr}"
            );
        } else {
            assert!(
                !out.status.success(),
                "{cache:?}: nix accepted a spoiled cache"
            );
        }
    }
}

#[test]
fn fixture_closures_have_the_promised_graph() {
    let fx = Fixtures::get();
    let mut closure: Vec<&str> = fx.echoserver_closure().iter().map(String::as_str).collect();
    closure.sort();
    let mut expected = vec![&*fx.glibc, &*fx.busybox, &*fx.data, &*fx.echoserver];
    expected.sort();
    assert_eq!(closure, expected);
    let refs = |p: &str| {
        let out = nix_command("nix-store")
            .args(["-q", "--references", p])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let echo_refs = refs(&fx.echoserver);
    for p in [&fx.glibc, &fx.busybox, &fx.data] {
        assert!(
            echo_refs.contains(p.as_str()),
            "echoserver does not reference {p}"
        );
    }
    assert!(refs(&fx.data).contains(fx.busybox.as_str()));
    // ELF interpreter and RPATH point into glibc.
    let readelf = Command::new("readelf")
        .args(["-l", "-d"])
        .arg(format!("{}/bin/echoserver", fx.echoserver))
        .output()
        .unwrap();
    let readelf = String::from_utf8_lossy(&readelf.stdout);
    assert!(
        readelf.contains(&format!("{}/lib/ld-linux-x86-64.so.2", fx.glibc)),
        "{readelf}"
    );
    assert!(
        readelf.contains(&format!("[{}/lib]", fx.glibc)),
        "{readelf}"
    );
    // busybox applets are symlinks to busybox; data has the symlink chain and an executable.
    let sh = Path::new(&fx.busybox).join("bin/sh");
    assert_eq!(std::fs::read_link(&sh).unwrap(), Path::new("busybox"));
    let link1 = Path::new(&fx.data).join("share/echoserver/link1");
    assert_eq!(std::fs::read_to_string(&link1).unwrap(), "deep file\n");
    let hello = Path::new(&fx.data).join("bin/data-hello");
    assert_eq!(
        std::fs::metadata(&hello).unwrap().permissions().mode() & 0o111,
        0o111
    );
    let out = Command::new(&hello).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the data path\n"
    );
    // Negative caches spoil what they say.
    let good = fx.narinfo(Cache::Xz, &fx.echoserver);
    assert_eq!(good.sigs.len(), 1);
    assert!(good.sigs[0].starts_with("nixenv-test-1:"));
    let bad = fx.narinfo(Cache::BadSig, &fx.echoserver);
    assert_ne!(good.sigs, bad.sigs);
    let untrusted = fx.narinfo(Cache::Untrusted, &fx.echoserver);
    assert!(untrusted.sigs.iter().all(|s| s.starts_with("untrusted-1:")));
    assert_eq!(good.nar_hash, untrusted.nar_hash);
    let base = store_path_base(&fx.echoserver);
    assert!(good.references.iter().any(|r| r == base));
}

#[test]
fn echoserver_answers_json_and_exits_zero_on_sigterm() {
    let fx = Fixtures::get();
    let mut child = Command::new(format!("{}/bin/echoserver-sh", fx.echoserver))
        .args(["--port", "0", "extra-arg"])
        .env_clear()
        .env("ECHO_MESSAGE", "hi \"there\"\n")
        .env("PATH", "/nowhere")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let port = line
        .trim()
        .strip_prefix("echoserver listening on 0.0.0.0:")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let addr = format!("127.0.0.1:{port}");
    let reply = echo(&addr, Duration::from_secs(5)).unwrap();
    assert_eq!(reply.message.as_deref(), Some("hi \"there\"\n"));
    assert_eq!(reply.path.as_deref(), Some("/nowhere"));
    assert_eq!(reply.argv[1..], ["--port", "0", "extra-arg"]);
    assert_eq!(
        reply.env.get("ECHO_DATA").map(String::as_str),
        Some(format!("{}/share/echoserver", fx.data).as_str())
    );
    assert_eq!(reply.uid, 0);
    assert_eq!(reply.pid, child.id() as i32);
    assert!(reply
        .store
        .unwrap()
        .contains(&store_path_base(&fx.glibc).to_string()));
    // Concurrent clients.
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || http_get(&addr, &format!("/req/{i}")).unwrap())
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let (status, body) = t.join().unwrap();
        assert_eq!(status, 200);
        assert!(body.contains(&format!("\"target\":\"/req/{i}\"")), "{body}");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("echoserver: terminating"));
}

fn served_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("nar")).unwrap();
    std::fs::write(dir.path().join("a.narinfo"), "StorePath: x\n").unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("nar/big.nar"), &big).unwrap();
    dir
}

/// Raw HTTP/1.1 GET returning (status, content-length, body bytes received).
fn raw_get(addr: &str, path: &str) -> (u16, usize, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf); // a cut connection may end in a reset
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head")
        + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let status = head[9..12].parse().unwrap();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    (status, len, buf[end..].to_vec())
}

/// A request held by a delay counts as arrived at once and as answered only after its delay.
#[test]
fn a_delayed_request_counts_as_arrived_before_it_is_answered() {
    let dir = served_dir();
    let server = CacheServer::serve(dir.path());
    let addr = server.addr().to_string();
    server.inject("/nar/*", Fault::Delay(Duration::from_millis(1500)));
    let t = Instant::now();
    let get = std::thread::spawn(move || raw_get(&addr, "/nar/big.nar").0);
    while server.requests_arrived("/nar/*") == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "the request arrives");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "counted on arrival, not after the delay ({:?})",
        t.elapsed()
    );
    assert_eq!(server.requests_matching("/nar/*"), 0, "not answered yet");
    assert_eq!(get.join().unwrap(), 200);
    assert!(t.elapsed() >= Duration::from_millis(1500));
    assert_eq!(server.requests_matching("/nar/*"), 1);
    assert_eq!(server.requests_arrived("/nar/*"), 1);
    server.reset_counts();
    assert_eq!(server.requests_arrived("/nar/*"), 0);
}

#[test]
fn server_serves_counts_and_injects_faults() {
    let dir = served_dir();
    let server = CacheServer::serve(dir.path());
    let addr = server.addr().to_string();
    let (status, len, body) = raw_get(&addr, "/nar/big.nar");
    assert_eq!((status, len, body.len()), (200, 300_000, 300_000));
    assert_eq!(raw_get(&addr, "/missing.narinfo").0, 404);
    assert_eq!(raw_get(&addr, "/../etc/passwd").0, 404);

    server.inject_n("*.narinfo", Fault::Status(500), 2);
    assert_eq!(raw_get(&addr, "/a.narinfo").0, 500);
    assert_eq!(raw_get(&addr, "/a.narinfo").0, 500);
    assert_eq!(raw_get(&addr, "/a.narinfo").0, 200);
    assert_eq!(server.requests("/a.narinfo"), 3);

    server.inject("/nar/*", Fault::DropAfter(1000));
    let (status, len, body) = raw_get(&addr, "/nar/big.nar");
    assert_eq!((status, len), (200, 300_000));
    assert_eq!(body.len(), 1000, "the body is cut after 1000 bytes");
    server.clear_faults();

    server.inject("/a.narinfo", Fault::Status(404));
    assert_eq!(raw_get(&addr, "/a.narinfo").0, 404);
    server.clear_faults();

    server.inject_n("/a.narinfo", Fault::Delay(Duration::from_millis(300)), 1);
    let t = Instant::now();
    assert_eq!(raw_get(&addr, "/a.narinfo").0, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));

    assert_eq!(server.requests_matching("/nar/*"), 2);
    assert_eq!(server.total_requests(), 9);
    // Bytes sent: the whole NAR, then the 1000 bytes before the cut; narinfos of 13 bytes
    // twice (the 500s and the 404 send no file).
    let nar_bytes: Vec<u64> = server
        .request_log()
        .iter()
        .filter(|r| r.path == "/nar/big.nar")
        .map(|r| r.bytes)
        .collect();
    assert_eq!(nar_bytes, [300_000, 1000]);
    assert_eq!(server.bytes_matching("*.narinfo"), 2 * 13);
    assert_eq!(server.bytes_matching("*"), 301_000 + 26);
    server.reset_counts();
    assert_eq!(server.total_requests(), 0);
}

#[test]
fn server_speaks_h2c_and_mounts() {
    let dir = served_dir();
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("current.json"), "{}").unwrap();
    let server = CacheServer::serve_mounts([("/cache", dir.path()), ("/catalog", other.path())]);
    assert!(server.url_of("/catalog").ends_with("/catalog"));
    let addr = server.addr().to_string();
    assert_eq!(raw_get(&addr, "/cache/a.narinfo").0, 200);
    assert_eq!(raw_get(&addr, "/catalog/current.json").0, 200);
    assert_eq!(raw_get(&addr, "/a.narinfo").0, 404);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use http_body_util::BodyExt;
        let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(format!("http://{addr}/cache/nar/big.nar"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 300_000);
    });
    let log = server.request_log();
    assert_eq!(log.last().unwrap().version, "HTTP/2.0");
}

#[test]
fn test_server_binary_writes_its_request_log_on_sigusr1() {
    let dir = served_dir();
    let out = tempfile::tempdir().unwrap();
    let log = out.path().join("served.log");
    let mut child = Command::new(nixenv_testkit::bin_path("nixenv-test-server"))
        .arg("--log")
        .arg(&log)
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut url = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    let addr = url.trim().trim_start_matches("http://").to_owned();
    assert_eq!(raw_get(&addr, "/nar/big.nar").0, 200);
    assert_eq!(raw_get(&addr, "/missing.narinfo").0, 404);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        text,
        "GET /nar/big.nar 200 300000\nGET /missing.narinfo 404 0\n"
    );
}
