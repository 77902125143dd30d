//! The production [`Fetch`], and the one place it is built from a configuration
//! ([`Fetcher::for_config`]): each URL goes to the backend of its [`Scheme`], one file each
//! ([`super::http`], [`super::file`], [`super::s3`], which signs and sends through the HTTP
//! backend). A new backend is a file, a [`Scheme`] variant and an arm
//! in [`Fetcher`]'s `get`.
//!
//! Build one per operation and share it (`&Fetcher`, or `Arc<Fetcher>` where a
//! [`crate::substituter::Substituter`] owns it): the HTTP backend builds its client on the first
//! HTTP request, so one fetcher means at most one client, and none for a warm store or a
//! `file://` cache.

use url::Url;

use super::file::FileFetcher;
use super::http::{HttpFetcher, HttpSettings};
use super::netrc::{Netrc, NetrcError};
use super::s3::S3Fetcher;
use super::scheme::Scheme;
use super::{Body, Fetch, FetchError};
use crate::config::Config;

/// GET over every [`Scheme`] nixenv knows.
pub struct Fetcher {
    http: HttpFetcher,
    file: FileFetcher,
    s3: S3Fetcher,
}

impl Fetcher {
    /// The fetcher for `cfg` (timeouts, connections, redirects, `netrc-file`, which is read
    /// here). Every binary and the runtime build their fetcher through this call.
    pub fn for_config(cfg: &Config) -> Result<Self, NetrcError> {
        let netrc = cfg.netrc_file.as_deref().map(Netrc::load).transpose()?;
        let mut fetcher = Self::with_http(HttpFetcher::with_settings(
            HttpSettings::from_config(cfg),
            netrc,
        ));
        fetcher.s3 = S3Fetcher::new(cfg.substituters.iter().chain(cfg.catalog.as_ref()));
        Ok(fetcher)
    }

    /// A fetcher over an explicitly configured HTTP backend.
    pub fn with_http(http: HttpFetcher) -> Self {
        Fetcher {
            http,
            file: FileFetcher,
            s3: S3Fetcher::new([]),
        }
    }
}

impl Fetch for Fetcher {
    async fn get(&self, url: &Url) -> Result<Body, FetchError> {
        match Scheme::of(url) {
            Some(Scheme::Http) => self.http.get(url).await,
            Some(Scheme::File) => self.file.get(url).await,
            Some(Scheme::S3) => self.s3.get(&self.http, url).await,
            None => Err(FetchError::Transport {
                url: url.clone(),
                message: format!("unsupported URL scheme {:?}", url.scheme()),
                retryable: false,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetcher() -> Fetcher {
        Fetcher::for_config(&Config::default()).unwrap()
    }

    #[tokio::test]
    async fn file_urls() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("x.nar"), &data).unwrap();
        let f = fetcher();
        let url = Url::from_file_path(dir.path().join("x.nar")).unwrap();
        assert_eq!(f.get_bytes(&url, 1 << 30).await.unwrap(), data);
        assert!(matches!(
            f.get_bytes(&url, 1000).await,
            Err(FetchError::TooLarge { limit: 1000, .. })
        ));
        let missing = Url::from_file_path(dir.path().join("nope.narinfo")).unwrap();
        assert!(matches!(
            f.get(&missing).await,
            Err(FetchError::NotFound { .. })
        ));
        // No client is built for file:// URLs.
        assert!(!f.http.client_built());
    }

    #[tokio::test]
    async fn unknown_schemes_are_refused() {
        let url = Url::parse("gopher://bucket/nix-cache-info").unwrap();
        let e = fetcher().get(&url).await.err().unwrap();
        assert!(!e.is_retryable());
        assert_eq!(
            e.to_string(),
            "gopher://bucket/nix-cache-info: unsupported URL scheme \"gopher\""
        );
    }

    #[test]
    fn for_config_reads_netrc_file() {
        let cfg = Config {
            netrc_file: Some("/nonexistent/netrc".into()),
            ..Config::default()
        };
        assert!(Fetcher::for_config(&cfg).is_err());
    }
}
