//! The `http(s)://` backend of [`super::Fetcher`], with one shared `reqwest` client.
//!
//! - One client per fetcher, built on first use (a warm pull builds none): connection reuse,
//!   HTTP/2 where the server offers it through ALPN (adaptive flow-control window), a connect
//!   timeout and a stall timeout (no bytes for `stall-timeout`) from the configuration, and
//!   `User-Agent: nixenv/<version>`.
//! - Redirects only as [`super::redirect`] allows (same origin, `allowed-redirect-hosts`, at
//!   most [`super::redirect::MAX_REDIRECTS`]); a refused one is [`FetchError::Redirect`], and the
//!   final URL of a followed one is logged (`final_url`).
//! - 404 and 410 are [`FetchError::NotFound`], other non-2xx are [`FetchError::Status`].
//! - Authentication per host from `netrc-file`: Basic, or Bearer for an entry without a login
//!   ([`super::netrc::Auth`]); sent to the URL's host only (reqwest drops it when a redirect
//!   leaves the origin, so a presigned object-storage URL gets no second credential).
//! - No retries here: callers wrap whole operations in [`super::retry::RetryPolicy`], so a NAR
//!   whose stream breaks midway is restarted from its first byte.

use std::sync::OnceLock;
use std::time::Duration;

use futures::TryStreamExt;
use url::Url;

use super::counted::Counted;
use super::netrc::{Auth, Netrc};
use super::redirect::RedirectRefused;
use super::{Body, Fetch, FetchError};
use crate::config::{AllowedRedirectHosts, Config};

/// Settings of the HTTP client.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub connect_timeout: Duration,
    pub stall_timeout: Duration,
    /// Idle connections kept per host.
    pub max_idle_per_host: usize,
    /// Hosts redirects may lead to besides the requested origin.
    pub allowed_redirect_hosts: AllowedRedirectHosts,
}

impl HttpSettings {
    /// From `connect-timeout`, `stall-timeout` and `http-connections`.
    pub fn from_config(cfg: &Config) -> Self {
        HttpSettings {
            connect_timeout: cfg.connect_timeout,
            stall_timeout: cfg.stall_timeout,
            max_idle_per_host: cfg.http_connections,
            allowed_redirect_hosts: cfg.allowed_redirect_hosts.clone(),
        }
    }
}

/// GET over HTTP(S).
pub struct HttpFetcher {
    settings: HttpSettings,
    netrc: Option<Netrc>,
    client: OnceLock<Result<reqwest::Client, String>>,
}

impl HttpFetcher {
    /// A fetcher with explicit settings and credentials.
    pub fn with_settings(settings: HttpSettings, netrc: Option<Netrc>) -> Self {
        HttpFetcher {
            settings,
            netrc,
            client: OnceLock::new(),
        }
    }

    /// Whether the client has been built (it is, on the first HTTP request).
    #[cfg(test)]
    pub(super) fn client_built(&self) -> bool {
        self.client.get().is_some()
    }

    fn client(&self, url: &Url) -> Result<&reqwest::Client, FetchError> {
        self.client
            .get_or_init(|| {
                reqwest::Client::builder()
                    .user_agent(crate::USER_AGENT)
                    .connect_timeout(self.settings.connect_timeout)
                    .read_timeout(self.settings.stall_timeout)
                    .pool_max_idle_per_host(self.settings.max_idle_per_host)
                    .http2_adaptive_window(true)
                    .tcp_nodelay(true)
                    .redirect(super::redirect::policy(
                        self.settings.allowed_redirect_hosts.clone(),
                    ))
                    .build()
                    .map_err(|e| error_chain(&e))
            })
            .as_ref()
            .map_err(|message| FetchError::Transport {
                url: url.clone(),
                message: format!("cannot create HTTP client: {message}"),
                retryable: false,
            })
    }

    /// GETs `url` with netrc's credentials for its host.
    async fn get_http(&self, url: &Url) -> Result<Body, FetchError> {
        self.send(url, url, None).await
    }

    /// GETs `url` with `headers` (an S3 signature) instead of netrc's credentials; errors
    /// name `shown` (the `s3://` URL the user configured).
    pub(super) async fn get_with_headers(
        &self,
        url: &Url,
        shown: &Url,
        headers: Vec<(&'static str, String)>,
    ) -> Result<Body, FetchError> {
        self.send(url, shown, Some(headers)).await
    }

    async fn send(
        &self,
        url: &Url,
        shown: &Url,
        headers: Option<Vec<(&'static str, String)>>,
    ) -> Result<Body, FetchError> {
        let client = self.client(shown)?;
        let mut req = client.get(url.clone());
        if let Some(headers) = headers {
            for (name, value) in headers {
                req = req.header(name, value);
            }
        } else if let (Some(netrc), Some(host)) = (&self.netrc, url.host_str()) {
            if url.username().is_empty() {
                if let Some(c) = netrc.lookup(host) {
                    req = match c.auth() {
                        Auth::Basic { login, password } => req.basic_auth(login, Some(password)),
                        Auth::Bearer { token } => req.bearer_auth(token),
                    };
                }
            }
        }
        let resp = req.send().await.map_err(|e| match redirect_refused(&e) {
            Some(refused) => {
                tracing::warn!(url = %shown, %refused, "redirect refused");
                FetchError::Redirect {
                    url: shown.clone(),
                    refused: Box::new(refused),
                }
            }
            None => transport(shown, &e),
        })?;
        let status = resp.status().as_u16();
        let final_url = resp.url();
        if final_url != url {
            tracing::info!(%url, %final_url, "followed redirect");
        }
        tracing::debug!(%url, %final_url, status, content_length = resp.content_length(), version = ?resp.version(), "GET");
        match status {
            404 | 410 => return Err(FetchError::NotFound { url: shown.clone() }),
            200..=299 => {}
            _ => {
                return Err(FetchError::Status {
                    url: shown.clone(),
                    status,
                })
            }
        }
        let u = shown.clone();
        let stream = resp.bytes_stream().map_err(move |e| transport(&u, &e));
        Ok(Box::pin(Counted::new(stream, shown.clone())))
    }
}

impl Fetch for HttpFetcher {
    async fn get(&self, url: &Url) -> Result<Body, FetchError> {
        self.get_http(url).await
    }
}

/// The error and its causes, `: `-separated, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s.replace('\n', " ")
}

/// The redirect refusal in an error's chain, if the request failed on one.
fn redirect_refused(e: &reqwest::Error) -> Option<RedirectRefused> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<RedirectRefused>() {
            return Some(r.clone());
        }
        cur = c.source();
    }
    None
}

fn transport(url: &Url, e: &reqwest::Error) -> FetchError {
    let chain = error_chain(e);
    let lower = chain.to_ascii_lowercase();
    let (message, retryable) = if e.is_timeout() {
        ("timed out".to_owned(), true)
    } else if e.is_connect() {
        (format!("cannot connect: {chain}"), true)
    } else if e.is_body() || e.is_decode() {
        let closed = [
            "incomplete",
            "end of file",
            "eof",
            "reset",
            "closed",
            "broken pipe",
        ]
        .iter()
        .any(|w| lower.contains(w));
        if closed {
            ("connection closed".to_owned(), true)
        } else {
            (format!("transfer failed: {chain}"), true)
        }
    } else if e.is_request() {
        let closed = ["reset", "closed", "broken pipe", "incomplete"]
            .iter()
            .any(|w| lower.contains(w));
        if closed {
            ("connection closed".to_owned(), true)
        } else {
            (chain, true)
        }
    } else {
        (chain, false)
    };
    FetchError::Transport {
        url: url.clone(),
        message,
        retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetcher() -> HttpFetcher {
        HttpFetcher::with_settings(HttpSettings::from_config(&Config::default()), None)
    }

    /// A one-connection-per-response HTTP server on 127.0.0.1: answers the i-th connection
    /// with `responses[i]` (raw bytes), keeps it open for the given time, then closes it.
    /// Returns the port and a handle yielding the request heads.
    fn serve(responses: Vec<(Vec<u8>, Duration)>) -> (u16, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let mut heads = Vec::new();
            for (resp, hold) in responses {
                let (mut c, _) = l.accept().unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap() == 1 {
                    head.push(b[0]);
                }
                heads.push(String::from_utf8_lossy(&head).into_owned());
                let _ = c.write_all(&resp);
                std::thread::sleep(hold);
            }
            heads
        });
        (port, h)
    }

    fn response(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!("HTTP/1.1 {status}\r\nConnection: close\r\n{headers}\r\n").into_bytes();
        r.extend_from_slice(body);
        r
    }

    #[tokio::test]
    async fn http_statuses_auth_and_broken_bodies() {
        let body = vec![b'x'; 100_000];
        let ok = response(
            "200 OK",
            &format!("Content-Length: {}\r\n", body.len()),
            &body,
        );
        let short = response("200 OK", "Content-Length: 5000\r\n", &[b'y'; 100]);
        let stall = response("200 OK", "Content-Length: 5000\r\n", &[b'z'; 10]);
        let z = Duration::ZERO;
        let (port, server) = serve(vec![
            (ok, z),
            (response("404 Not Found", "Content-Length: 0\r\n", b""), z),
            (response("410 Gone", "Content-Length: 0\r\n", b""), z),
            (
                response("500 Internal Server Error", "Content-Length: 0\r\n", b""),
                z,
            ),
            (response("403 Forbidden", "Content-Length: 0\r\n", b""), z),
            (short, z),
            (stall, Duration::from_millis(1500)),
        ]);
        let netrc = Netrc::parse(
            "machine 127.0.0.1 login alice password s3cret\n",
            std::path::Path::new("netrc"),
        )
        .unwrap();
        let f = HttpFetcher::with_settings(
            HttpSettings {
                connect_timeout: Duration::from_secs(5),
                stall_timeout: Duration::from_millis(300),
                max_idle_per_host: 4,
                allowed_redirect_hosts: AllowedRedirectHosts::default(),
            },
            Some(netrc),
        );
        let url = |p: &str| Url::parse(&format!("http://127.0.0.1:{port}/{p}")).unwrap();

        assert_eq!(f.get_bytes(&url("a.narinfo"), 1 << 20).await.unwrap(), body);
        assert!(matches!(
            f.get(&url("b.narinfo")).await,
            Err(FetchError::NotFound { .. })
        ));
        assert!(matches!(
            f.get(&url("c.narinfo")).await,
            Err(FetchError::NotFound { .. })
        ));
        let e = f.get(&url("d.narinfo")).await.err().unwrap();
        assert!(matches!(e, FetchError::Status { status: 500, .. }) && e.is_retryable());
        let e = f.get(&url("e.narinfo")).await.err().unwrap();
        assert!(matches!(e, FetchError::Status { status: 403, .. }) && !e.is_retryable());

        let e = f
            .get_bytes(&url("nar/short.nar"), 1 << 20)
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert_eq!(
            e.to_string(),
            format!("{}: connection closed", url("nar/short.nar"))
        );

        let t = std::time::Instant::now();
        let e = f
            .get_bytes(&url("nar/stall.nar"), 1 << 20)
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert_eq!(
            e.to_string(),
            format!("{}: timed out", url("nar/stall.nar"))
        );
        assert!(
            t.elapsed() < Duration::from_millis(1400),
            "{:?}",
            t.elapsed()
        );

        let heads = server.join().unwrap();
        assert!(
            heads[0].starts_with("GET /a.narinfo HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        let lower = heads[0].to_ascii_lowercase();
        assert!(
            lower.contains(&format!("user-agent: {}\r\n", crate::USER_AGENT)),
            "{}",
            heads[0]
        );
        // base64("alice:s3cret")
        assert!(
            lower.contains("authorization: basic ywxpy2u6cznjcmv0\r\n"),
            "{}",
            heads[0]
        );
    }

    #[tokio::test]
    async fn redirects_stay_on_the_origin() {
        // Another server on 127.0.0.1 that must never be reached.
        let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = elsewhere.local_addr().unwrap().port();
        let body = b"StorePath: x\n";
        let z = Duration::ZERO;
        let (port, server) = serve(vec![
            // Same origin, another path: followed (two connections: Connection: close).
            (
                response(
                    "302 Found",
                    "Location: /mirror/a.narinfo\r\nContent-Length: 0\r\n",
                    b"",
                ),
                z,
            ),
            (
                response(
                    "200 OK",
                    &format!("Content-Length: {}\r\n", body.len()),
                    body,
                ),
                z,
            ),
            // Another port on the same address.
            (
                response(
                    "302 Found",
                    &format!(
                        "Location: http://127.0.0.1:{other}/b.narinfo\r\nContent-Length: 0\r\n"
                    ),
                    b"",
                ),
                z,
            ),
            // Cloud metadata.
            (
                response(
                    "301 Moved Permanently",
                    "Location: http://169.254.169.254/latest/meta-data/\r\nContent-Length: 0\r\n",
                    b"",
                ),
                z,
            ),
        ]);
        // Short timeouts: a policy that followed the redirects would fail fast, not hang.
        let f = HttpFetcher::with_settings(
            HttpSettings {
                connect_timeout: Duration::from_secs(2),
                stall_timeout: Duration::from_secs(2),
                max_idle_per_host: 4,
                allowed_redirect_hosts: AllowedRedirectHosts::default(),
            },
            None,
        );
        let url = |p: &str| Url::parse(&format!("http://127.0.0.1:{port}/{p}")).unwrap();
        assert_eq!(f.get_bytes(&url("a.narinfo"), 1 << 20).await.unwrap(), body);
        let e = f.get(&url("b.narinfo")).await.err().unwrap();
        assert!(!e.is_retryable());
        assert_eq!(
            e.to_string(),
            format!(
                "{}: redirect to http://127.0.0.1:{other}/b.narinfo refused: not the origin http://127.0.0.1:{port} and not in allowed-redirect-hosts",
                url("b.narinfo")
            )
        );
        let e = f.get(&url("c.narinfo")).await.err().unwrap();
        assert!(matches!(e, FetchError::Redirect { .. }), "{e}");
        // From a cache on 127.0.0.1 the origin rule refuses it (from a remote cache, the
        // link-local rule would: see `redirect::tests`).
        assert!(
            e.to_string().contains(
                "redirect to http://169.254.169.254/latest/meta-data/ refused: not the origin"
            ),
            "{e}"
        );
        let heads = server.join().unwrap();
        assert!(
            heads[1].starts_with("GET /mirror/a.narinfo "),
            "{}",
            heads[1]
        );
        elsewhere.set_nonblocking(true).unwrap();
        assert!(elsewhere.accept().is_err(), "the other port was contacted");
    }

    #[tokio::test]
    async fn refused_connection_is_retryable() {
        // Bind then drop a listener: the port is (very likely) closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = Url::parse(&format!("http://127.0.0.1:{port}/nix-cache-info")).unwrap();
        let e = fetcher().get(&url).await.err().unwrap();
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("cannot connect"), "{e}");
    }
}
