//! The HTTP/1.1 server of the registry: read-only, bounded, and gone when idle.
//!
//! Bounds: a request head (request line and headers) of at most 8 KiB, read within
//! [`Limits::header_timeout`]; a connection lives at most [`Limits::connection_timeout`]; at
//! most [`Limits::max_connections`] at once (more are closed at once, a runtime retries or
//! falls through to its next host). Request bodies are never read. With
//! [`Limits::idle_exit`], the server returns once no connection was open for that long: under
//! socket activation systemd keeps the socket and starts the server again at the next
//! connection, so an idle node runs no registry process.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::archive::Image;
use super::route::{route, Reply};

/// The largest request head hyper buffers (its minimum).
const MAX_HEAD_BYTES: usize = 8192;

/// Bounds of the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub connection_timeout: Duration,
    /// Return after this long with no open connection (`None`: serve until killed).
    pub idle_exit: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 32,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
            idle_exit: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot accept connections: {source}")]
    Accept { source: std::io::Error },
}

/// Serves `image` on `listener` until idle for `limits.idle_exit` (or forever).
pub async fn serve(
    listener: TcpListener,
    image: Arc<Image>,
    limits: Limits,
) -> Result<(), ServeError> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let idle = async {
            match limits.idle_exit {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = accepted.map_err(|source| ServeError::Accept { source })?;
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, max = limits.max_connections, "too many connections: closed");
                    continue;
                };
                let image = image.clone();
                tokio::spawn(async move {
                    connection(stream, image, limits).await;
                    drop(slot);
                });
            }
            () = idle => {
                if slots.available_permits() == limits.max_connections {
                    tracing::info!(idle = ?limits.idle_exit, "no requests: exiting");
                    return Ok(());
                }
            }
        }
    }
}

async fn connection(stream: tokio::net::TcpStream, image: Arc<Image>, limits: Limits) {
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let target = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let reply = route(&image, req.method().as_str(), &target);
        tracing::debug!(method = %req.method(), %target, status = reply.status, "request");
        async move { Ok::<_, Infallible>(response(reply)) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.connection_timeout, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "connection ended"),
        Err(_) => {
            tracing::debug!(timeout = ?limits.connection_timeout, "connection closed: too long")
        }
    }
}

fn response(reply: Reply) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(reply.status)
        .header("Content-Type", reply.content_type)
        .header("Content-Length", reply.body.len())
        .header("Docker-Distribution-API-Version", "registry/2.0");
    if let Some(d) = reply.digest {
        b = b.header("Docker-Content-Digest", d);
    }
    b.body(Full::new(Bytes::from(reply.body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::path::Path;
    use std::time::Instant;

    use super::super::testing::empty_archive;
    use super::*;

    async fn start(limits: Limits) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let (bytes, _, _) = empty_archive();
        let image = Arc::new(Image::parse(Path::new("a.tar"), &bytes).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move { serve(listener, image, limits).await.unwrap() });
        (addr, task)
    }

    /// Sends `request` on a fresh connection; the whole answer.
    async fn exchange(addr: std::net::SocketAddr, request: Vec<u8>) -> String {
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&request).unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
        .await
        .unwrap()
    }

    fn get(method: &str, path: &str) -> Vec<u8> {
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes()
    }

    #[tokio::test]
    async fn head_answers_the_headers_of_get_without_a_body() {
        let (addr, task) = start(Limits::default()).await;
        let got = exchange(addr, get("GET", "/v2/library/empty/manifests/latest")).await;
        let (head, body) = got.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_lowercase()
                .contains("docker-content-digest: sha256:"),
            "{head}"
        );
        let head_only = exchange(addr, get("HEAD", "/v2/library/empty/manifests/latest")).await;
        let (h2, b2) = head_only.split_once("\r\n\r\n").unwrap();
        assert!(
            h2.to_lowercase()
                .contains(&format!("content-length: {}", body.len())),
            "{h2}"
        );
        assert_eq!(b2, "");
        let missing = exchange(addr, get("GET", "/v2/library/busybox/manifests/latest")).await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        assert!(missing.contains("NAME_UNKNOWN"), "{missing}");
        task.abort();
    }

    #[tokio::test]
    async fn oversized_and_slow_requests_are_cut_off() {
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, task) = start(limits).await;
        let mut big = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
        big.extend(vec![b'a'; 3 * MAX_HEAD_BYTES]);
        big.extend(b"\r\n\r\n");
        let got = exchange(addr, big).await;
        assert!(got.starts_with("HTTP/1.1 431"), "{got:?}");

        let slow = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET /v2/ HTTP/1.1\r\n").unwrap();
            let t = Instant::now();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            (t.elapsed(), String::from_utf8_lossy(&out).into_owned())
        })
        .await
        .unwrap();
        assert!(slow.0 < Duration::from_secs(5), "closed after {:?}", slow.0);
        assert!(!slow.1.contains("200"), "{}", slow.1);
        task.abort();
    }

    #[tokio::test]
    async fn returns_once_idle() {
        let limits = Limits {
            idle_exit: Some(Duration::from_millis(300)),
            ..Limits::default()
        };
        let (addr, task) = start(limits).await;
        let got = exchange(addr, get("GET", "/v2/")).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the server returns when idle")
            .unwrap();
    }
}
