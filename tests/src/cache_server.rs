//! A real HTTP server on 127.0.0.1 serving directories (a binary cache, a catalog) for tests,
//! with request counting and per-path fault injection.
//!
//! hyper 1 with `hyper-util`'s auto connection builder: HTTP/1.1 (keep-alive) and HTTP/2 with
//! prior knowledge (h2c) on the same port. The server runs on its own thread and tokio runtime,
//! so it works from plain `#[test]`s and from `#[tokio::test]`s alike, and it stops when the
//! [`CacheServer`] is dropped (open connections are cut).
//!
//! ```no_run
//! use nixenv_testkit::cache_server::{CacheServer, Fault};
//! use nixenv_testkit::fixtures::{Cache, Fixtures};
//!
//! let fx = Fixtures::get();
//! let server = CacheServer::serve(fx.cache(Cache::Xz));
//! // answer the first two NAR requests with 500, then serve normally
//! server.inject_n("/nar/*", Fault::Status(500), 2);
//! let url = server.url(); // "http://127.0.0.1:PORT", no trailing slash
//! // … run `nixenv pull` against `url` …
//! assert_eq!(server.requests_matching("/nar/*"), 4 + 2);
//! let nar_bytes: u64 = server.request_log().iter().map(|r| r.bytes).sum();
//! // send every narinfo request to another server
//! let other = CacheServer::serve(fx.cache(Cache::Xz));
//! server.inject("*.narinfo", Fault::Redirect { host: "127.0.0.1", port: other.addr().port(), prefix: "" });
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::AsyncReadExt;

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// What the server does instead of (or before) serving a request that matches a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status code (e.g. 500, 503, 404) and a short text body.
    Status(u16),
    /// Send the status line, headers (with the file's full `Content-Length`) and the first
    /// `n` bytes of the body (at most all but the last byte), then cut the connection
    /// (an HTTP/2 stream is reset instead).
    DropAfter(u64),
    /// Answer `302 Found` with `Location: http://{host}:{port}{prefix}{path}`, where `path` is
    /// the requested path: e.g. to another server, another host name for this one, or another
    /// mount of this one (`prefix = "/mirror"`).
    Redirect {
        host: &'static str,
        port: u16,
        prefix: &'static str,
    },
    /// Send the headers (with the file's full `Content-Length`), then the body one byte at a
    /// time with this pause before each byte after the first: a trickling server.
    Trickle(Duration),
    /// Wait this long before answering. Delays add up and do not stop later rules: the request
    /// is then answered normally or by the next matching non-delay rule.
    Delay(Duration),
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `HEAD`, …
    pub method: String,
    /// The URL path, e.g. `/nar/0abc….nar.xz` (no query).
    pub path: String,
    /// The status sent (for [`Fault::DropAfter`], the status of the cut response: 200).
    pub status: u16,
    /// The non-delay fault applied, if any.
    pub fault: Option<Fault>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The `User-Agent` header, if any.
    pub user_agent: Option<String>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// Bytes of the served file handed to the connection so far (all of them once the body
    /// has been sent; 0 for HEAD and for error and redirect answers).
    pub bytes: u64,
}

/// A request in the log: its record and the counter its body stream adds to.
#[derive(Debug)]
struct Logged {
    record: RequestRecord,
    sent: Arc<AtomicU64>,
}

impl Logged {
    fn snapshot(&self) -> RequestRecord {
        RequestRecord {
            bytes: self.sent.load(Ordering::Relaxed),
            ..self.record.clone()
        }
    }
}

#[derive(Debug)]
struct Rule {
    pattern: String,
    fault: Fault,
    remaining: Option<usize>,
}

/// Which `Authorization` header the server accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum AuthRule {
    /// Any or none (the default).
    #[default]
    Any,
    /// Exactly this value; anything else is `401 Unauthorized`.
    Require(String),
    /// None: a request with one is `400 Bad Request`, as object storage answers a presigned
    /// URL that also carries credentials.
    Refuse,
}

#[derive(Debug, Default)]
struct Shared {
    auth: Mutex<AuthRule>,
    mounts: Vec<(String, PathBuf)>,
    rules: Mutex<Vec<Rule>>,
    log: Mutex<Vec<Logged>>,
    /// The path of every request as it arrived, before any [`Fault::Delay`]: the log above
    /// records a request only once it is answered.
    arrivals: Mutex<Vec<String>>,
}

/// A running test HTTP server; stops on drop.
pub struct CacheServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for CacheServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheServer")
            .field("url", &self.url())
            .field("mounts", &self.shared.mounts)
            .finish()
    }
}

impl CacheServer {
    /// Serves `dir` at the root of a new server on 127.0.0.1 with an OS-assigned port.
    ///
    /// Panics if the server cannot start (tests have nothing better to do).
    pub fn serve(dir: impl AsRef<Path>) -> CacheServer {
        Self::serve_mounts([("/", dir.as_ref())])
    }

    /// Serves several directories under URL prefixes on one server, e.g.
    /// `[("/cache", cache_dir), ("/catalog", catalog_dir)]`; the longest matching prefix wins.
    pub fn serve_mounts<'a>(mounts: impl IntoIterator<Item = (&'a str, &'a Path)>) -> CacheServer {
        Self::serve_mounts_on(mounts, 0)
    }

    /// Serves `dir` on a given port of 127.0.0.1 (0: OS-assigned), e.g. to bring a server
    /// back on the port a configuration already names.
    pub fn serve_on(dir: impl AsRef<Path>, port: u16) -> CacheServer {
        Self::serve_mounts_on([("/", dir.as_ref())], port)
    }

    /// [`CacheServer::serve_mounts`] on a given port (0: OS-assigned).
    pub fn serve_mounts_on<'a>(
        mounts: impl IntoIterator<Item = (&'a str, &'a Path)>,
        port: u16,
    ) -> CacheServer {
        let mut mounts: Vec<(String, PathBuf)> = mounts
            .into_iter()
            .map(|(prefix, dir)| {
                let prefix = format!("/{}", prefix.trim_matches('/'));
                (prefix, dir.to_path_buf())
            })
            .collect();
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Self::start(
            Shared {
                mounts,
                ..Shared::default()
            },
            port,
        )
    }

    fn start(shared: Shared, port: u16) -> CacheServer {
        let shared = Arc::new(shared);
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("bind 127.0.0.1:{port} for the test server: {e}"));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("listener address");
        let (tx, rx) = tokio::sync::watch::channel(false);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("cache-server-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime for the test server");
                rt.block_on(accept_loop(listener, thread_shared, rx));
                rt.shutdown_background();
            })
            .expect("spawn test server thread");
        CacheServer {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT{prefix}` for a mount made with [`CacheServer::serve_mounts`].
    pub fn url_of(&self, prefix: &str) -> String {
        format!("http://{}/{}", self.addr, prefix.trim_matches('/'))
            .trim_end_matches('/')
            .to_string()
    }

    /// The socket address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds a rule applied to every request whose path matches `pattern`, forever.
    ///
    /// Patterns are globs over the URL path where `*` matches any run of characters
    /// (including `/`): `/nar/*`, `*.narinfo`, `/abc*`, `*`.
    pub fn inject(&self, pattern: &str, fault: Fault) {
        self.push_rule(pattern, fault, None);
    }

    /// Adds a rule that applies to the next `times` matching requests only
    /// (e.g. `Fault::Status(500)` twice, then the file is served).
    pub fn inject_n(&self, pattern: &str, fault: Fault, times: usize) {
        self.push_rule(pattern, fault, Some(times));
    }

    fn push_rule(&self, pattern: &str, fault: Fault, remaining: Option<usize>) {
        self.shared.rules.lock().unwrap().push(Rule {
            pattern: pattern.to_string(),
            fault,
            remaining,
        });
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    /// Every request so far, in arrival order.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.shared
            .log
            .lock()
            .unwrap()
            .iter()
            .map(Logged::snapshot)
            .collect()
    }

    /// Body bytes sent so far for requests whose path matches the glob `pattern` (see
    /// [`CacheServer::inject`]): what a client downloaded, headers aside.
    pub fn bytes_matching(&self, pattern: &str) -> u64 {
        self.with_matching(pattern, |logged| {
            logged.map(|l| l.sent.load(Ordering::Relaxed)).sum()
        })
    }

    /// The paths of the requests matching the glob `pattern`, sorted, repeats kept: e.g.
    /// `paths_matching("/nar/*")`, the NARs fetched.
    pub fn paths_matching(&self, pattern: &str) -> Vec<String> {
        let mut paths: Vec<String> = self.with_matching(pattern, |logged| {
            logged.map(|l| l.record.path.clone()).collect()
        });
        paths.sort();
        paths
    }

    /// `f` of the logged requests whose path matches the glob `pattern`.
    fn with_matching<R>(
        &self,
        pattern: &str,
        f: impl FnOnce(&mut dyn Iterator<Item = &Logged>) -> R,
    ) -> R {
        let log = self.shared.log.lock().unwrap();
        f(&mut log.iter().filter(|l| glob_match(pattern, &l.record.path)))
    }

    /// Answers `401 Unauthorized` to every request without exactly this `Authorization` value
    /// (`Bearer tok`, `Basic …`), as a private cache does.
    pub fn require_authorization(&self, value: &str) {
        *self.shared.auth.lock().unwrap() = AuthRule::Require(value.to_owned());
    }

    /// Answers `400 Bad Request` to every request with an `Authorization` header, as object
    /// storage does to a presigned URL that carries credentials as well.
    pub fn refuse_authorization(&self) {
        *self.shared.auth.lock().unwrap() = AuthRule::Refuse;
    }

    /// How many requests with a path matching the glob `pattern` have arrived, answered or
    /// not: unlike [`CacheServer::requests_matching`], a request held by a [`Fault::Delay`]
    /// counts from its arrival, so a test can act while the client waits for it.
    pub fn requests_arrived(&self, pattern: &str) -> usize {
        let arrivals = self.shared.arrivals.lock().unwrap();
        arrivals.iter().filter(|p| glob_match(pattern, p)).count()
    }

    /// Forgets the request log (counts start again from zero).
    pub fn reset_counts(&self) {
        self.shared.log.lock().unwrap().clear();
        self.shared.arrivals.lock().unwrap().clear();
    }

    /// How many requests (any method, any outcome) had exactly this path.
    pub fn requests(&self, path: &str) -> usize {
        self.shared
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.record.path == path)
            .count()
    }

    /// How many requests had a path matching the glob `pattern` (see [`CacheServer::inject`]).
    pub fn requests_matching(&self, pattern: &str) -> usize {
        self.with_matching(pattern, |logged| logged.count())
    }

    /// All requests so far.
    pub fn total_requests(&self) -> usize {
        self.shared.log.lock().unwrap().len()
    }

    /// Requests per path.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for l in self.shared.log.lock().unwrap().iter() {
            *counts.entry(l.record.path.clone()).or_insert(0) += 1;
        }
        counts
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

/// The faults that apply to one request: the summed delay and the first terminal fault.
fn take_faults(shared: &Shared, path: &str) -> (Duration, Option<Fault>) {
    let mut rules = shared.rules.lock().unwrap();
    let mut delay = Duration::ZERO;
    let mut terminal = None;
    for rule in rules.iter_mut() {
        if rule.remaining == Some(0) || !glob_match(&rule.pattern, path) {
            continue;
        }
        match rule.fault {
            Fault::Delay(d) => delay += d,
            _ if terminal.is_some() => continue,
            f => terminal = Some(f),
        }
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
        }
    }
    (delay, terminal)
}

async fn handle(shared: &Shared, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    shared.arrivals.lock().unwrap().push(path.clone());
    let (delay, fault) = take_faults(shared, &path);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let sent = Arc::new(AtomicU64::new(0));
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let rule = shared.auth.lock().unwrap().clone();
    let response = match (rule, &authorization) {
        (AuthRule::Require(want), got) if got.as_deref() != Some(want.as_str()) => {
            let mut r = text(StatusCode::UNAUTHORIZED, "unauthorized");
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
            r
        }
        (AuthRule::Refuse, Some(_)) => {
            text(StatusCode::BAD_REQUEST, "only one auth mechanism allowed")
        }
        _ => respond(shared, req.method(), &path, fault, sent.clone()).await,
    };
    let record = RequestRecord {
        method: req.method().to_string(),
        path,
        status: response.status().as_u16(),
        fault,
        version: format!("{:?}", req.version()),
        user_agent: req
            .headers()
            .get(hyper::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        authorization,
        bytes: 0,
    };
    shared.log.lock().unwrap().push(Logged { record, sent });
    response
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{body}\n")))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The file a URL path names, if it is inside a mount and free of `..` tricks.
fn resolve(shared: &Shared, path: &str) -> Option<PathBuf> {
    if path.split('/').any(|s| s == ".." || s == ".") || path.contains('\\') || path.contains('%') {
        return None;
    }
    for (prefix, dir) in &shared.mounts {
        let rest = if prefix == "/" {
            Some(path)
        } else if path == prefix {
            Some("")
        } else {
            path.strip_prefix(prefix.as_str())
                .filter(|r| r.starts_with('/'))
        };
        if let Some(rest) = rest {
            return Some(dir.join(rest.trim_start_matches('/')));
        }
    }
    None
}

/// Files up to this size are read into memory at once when no fault is injected for them.
const WHOLE_FILE_MAX: u64 = 64 << 20;
/// The frames such a file is handed to the connection in (slices of it, not copies).
const WHOLE_FILE_CHUNK: usize = 1 << 20;

async fn respond(
    shared: &Shared,
    method: &Method,
    path: &str,
    fault: Option<Fault>,
    counter: Arc<AtomicU64>,
) -> Response<Body> {
    if let Some(Fault::Status(code)) = fault {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return text(status, &format!("injected {code}"));
    }
    if let Some(Fault::Redirect { host, port, prefix }) = fault {
        let mut r = text(StatusCode::FOUND, "redirected");
        let location = format!("http://{host}:{port}{prefix}{path}");
        r.headers_mut().insert(
            hyper::header::LOCATION,
            HeaderValue::from_str(&location).expect("a valid Location"),
        );
        return r;
    }
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    let Some(file) = resolve(shared, path) else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    let Ok(f) = tokio::fs::File::open(&file).await else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    let len = match f.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        _ => return text(StatusCode::NOT_FOUND, "not found"),
    };
    let content_type = if path.ends_with(".narinfo") {
        "text/x-nix-narinfo"
    } else if path.ends_with(".json") {
        "application/json"
    } else if path.ends_with("nix-cache-info") {
        "text/x-nix-cache-info"
    } else {
        "application/octet-stream"
    };
    let body: Body = if method == Method::HEAD {
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync()
    } else if fault.is_none() && len <= WHOLE_FILE_MAX {
        // The common case, read at once: one blocking read instead of one per 64 KiB (each a
        // hop to tokio's blocking pool), so that the server's CPU time stays small beside the
        // client's in benchmarks that share the machine's cores with it.
        // Read through the handle opened above: the bytes sent are those of the file whose
        // length was announced.
        let f = f.into_std().await;
        let read = tokio::task::spawn_blocking(move || {
            let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            io::Read::read_to_end(&mut io::Read::take(f, len), &mut data).map(|_| data)
        });
        let Ok(Ok(data)) = read.await else {
            return text(StatusCode::NOT_FOUND, "not found");
        };
        let data = Bytes::from(data);
        let chunks = (0..data.len())
            .step_by(WHOLE_FILE_CHUNK)
            .map(move |at| data.slice(at..data.len().min(at + WHOLE_FILE_CHUNK)));
        let stream = futures::stream::iter(chunks).map(move |chunk| {
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            Ok::<_, io::Error>(Frame::data(chunk))
        });
        BodyExt::boxed_unsync(StreamBody::new(stream.boxed()))
    } else {
        let limit = match fault {
            Some(Fault::DropAfter(n)) => Some(n.min(len.saturating_sub(1))),
            _ => None,
        };
        let trickle = match fault {
            Some(Fault::Trickle(pause)) => Some(pause),
            _ => None,
        };
        let stream = futures::stream::unfold((f, 0u64, false), move |(mut f, sent, done)| {
            let counter = counter.clone();
            async move {
                if done {
                    return None;
                }
                if let Some(limit) = limit {
                    if sent >= limit {
                        // Give hyper time to flush what was sent, so the client really
                        // receives a partial body before the connection goes.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let err = io::Error::new(io::ErrorKind::ConnectionAborted, "injected drop");
                        return Some((Err(err), (f, sent, true)));
                    }
                }
                let want = match (trickle, limit) {
                    (Some(pause), _) => {
                        if sent > 0 {
                            tokio::time::sleep(pause).await;
                        }
                        1
                    }
                    (None, Some(limit)) => (limit - sent).min(64 * 1024) as usize,
                    (None, None) => 64 * 1024,
                };
                let mut buf = vec![0u8; want];
                match f.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        Some((
                            Ok(Frame::data(Bytes::from(buf))),
                            (f, sent + n as u64, false),
                        ))
                    }
                    Err(e) => Some((Err(e), (f, sent, true))),
                }
            }
        });
        BodyExt::boxed_unsync(StreamBody::new(stream.boxed()))
    };
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Glob match where `*` matches any (possibly empty) run of characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "/a/b"));
        assert!(glob_match("/nar/*", "/nar/abc.nar.xz"));
        assert!(!glob_match("/nar/*", "/abc.narinfo"));
        assert!(glob_match("*.narinfo", "/abc.narinfo"));
        assert!(glob_match("*/nar/*", "/cache/nar/x"));
        assert!(glob_match("*/nar/*", "/nar/x"));
        assert!(!glob_match("/a", "/ab"));
        assert!(glob_match("/a*c", "/abbbc"));
    }

    #[test]
    fn fault_rules_count_down() {
        let shared = Shared::default();
        shared.rules.lock().unwrap().push(Rule {
            pattern: "/nar/*".into(),
            fault: Fault::Status(500),
            remaining: Some(1),
        });
        shared.rules.lock().unwrap().push(Rule {
            pattern: "*".into(),
            fault: Fault::Delay(Duration::from_millis(5)),
            remaining: None,
        });
        assert_eq!(
            take_faults(&shared, "/nar/x"),
            (Duration::from_millis(5), Some(Fault::Status(500)))
        );
        assert_eq!(
            take_faults(&shared, "/nar/x"),
            (Duration::from_millis(5), None)
        );
    }
}
