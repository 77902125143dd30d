//! Which URL schemes nixenv fetches, decided in one place: the configuration accepts a
//! catalog or cache URL only if [`Scheme::of`] knows it, and [`super::Fetcher`] picks the
//! backend by it. A new backend is a variant here and an arm in [`super::Fetcher`]'s `get`.

use url::Url;

/// A URL scheme nixenv can fetch from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `http://` and `https://` ([`super::http::HttpFetcher`]).
    Http,
    /// `file://` ([`super::file::FileFetcher`]).
    File,
    /// `s3://` ([`super::s3::S3Fetcher`]), read-only, signed with SigV4.
    S3,
}

impl Scheme {
    /// The schemes a configuration may name, for error messages.
    pub const SUPPORTED: &'static str = "https://, http://, s3:// or file://";

    /// The scheme of `url`, if nixenv fetches it.
    pub fn of(url: &Url) -> Option<Scheme> {
        match url.scheme() {
            "http" | "https" => Some(Scheme::Http),
            "file" => Some(Scheme::File),
            "s3" => Some(Scheme::S3),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        let of = |u: &str| Scheme::of(&Url::parse(u).unwrap());
        assert_eq!(of("https://cache.example/"), Some(Scheme::Http));
        assert_eq!(of("http://127.0.0.1:8080/c"), Some(Scheme::Http));
        assert_eq!(of("file:///srv/cache"), Some(Scheme::File));
        assert_eq!(of("s3://bucket?region=eu-west-1"), Some(Scheme::S3));
        assert_eq!(of("ftp://example/"), None);
    }
}
