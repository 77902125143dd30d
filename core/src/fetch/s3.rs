//! The `s3://` backend of [`super::Fetcher`]: Nix's S3 binary cache URLs
//! (`s3://BUCKET?region=R&endpoint=HOST[:PORT]&scheme=http|https&profile=P`), each object GET
//! signed with AWS Signature Version 4 ([`super::sigv4`]) and sent through the HTTP backend
//! (same client, timeouts, redirect rules and limits).
//!
//! - Without `endpoint`, the bucket is AWS's, virtual-hosted
//!   (`https://BUCKET.s3.REGION.amazonaws.com/KEY`); with one, path-style
//!   (`SCHEME://ENDPOINT/BUCKET/KEY`, what MinIO, Ceph, R2 and moto serve). `region` defaults
//!   to `us-east-1`, `scheme` to `https`.
//! - Credentials, found once per fetcher: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`
//!   (with `AWS_SESSION_TOKEN`) from the environment, else the `[PROFILE]` section (`profile`
//!   of the URL, else `AWS_PROFILE`, else `default`) of the shared credentials file
//!   (`AWS_SHARED_CREDENTIALS_FILE`, else `$HOME/.aws/credentials`). Without any, requests go
//!   unsigned (a public bucket).
//! - Joining a cache URL with a file name drops its query, so the parameters of each
//!   configured `s3://` URL are kept here, by bucket.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use url::Url;

use super::http::HttpFetcher;
use super::sigv4::{self, Signer, UNSIGNED_PAYLOAD};
use super::{Body, FetchError};

/// Where a bucket is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    pub region: String,
    /// `host[:port]` of an S3-compatible service; `None` for AWS.
    pub endpoint: Option<String>,
    /// `http` or `https`.
    pub scheme: String,
    /// The credentials file's section to use.
    pub profile: Option<String>,
}

/// Why an `s3://` URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3UrlError {
    #[error("{url}: no bucket name")]
    NoBucket { url: String },
    #[error("{url}: scheme must be http or https, not {scheme:?}")]
    Scheme { url: String, scheme: String },
    #[error("{url}: invalid {parameter} {value:?}")]
    Parameter {
        url: String,
        parameter: &'static str,
        value: String,
    },
}

impl S3Location {
    /// The location an `s3://` URL names.
    pub fn from_url(url: &Url) -> Result<S3Location, S3UrlError> {
        let bucket = url
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| S3UrlError::NoBucket {
                url: url.to_string(),
            })?
            .to_owned();
        let mut loc = S3Location {
            bucket,
            region: "us-east-1".to_owned(),
            endpoint: None,
            scheme: "https".to_owned(),
            profile: None,
        };
        let bad = |parameter, value: &str| S3UrlError::Parameter {
            url: url.to_string(),
            parameter,
            value: value.to_owned(),
        };
        for (k, v) in url.query_pairs() {
            match &*k {
                "region"
                    if !v.is_empty()
                        && v.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') =>
                {
                    loc.region = v.into_owned()
                }
                "region" => return Err(bad("region", &v)),
                "endpoint" => {
                    let host = v.trim_end_matches('/');
                    if host.is_empty() || host.contains(['/', '?', '#', '@']) {
                        return Err(bad("endpoint", &v));
                    }
                    loc.endpoint = Some(host.to_owned());
                }
                "scheme" if v == "http" || v == "https" => loc.scheme = v.into_owned(),
                "scheme" => {
                    return Err(S3UrlError::Scheme {
                        url: url.to_string(),
                        scheme: v.into_owned(),
                    })
                }
                "profile" => loc.profile = Some(v.into_owned()).filter(|p| !p.is_empty()),
                // Nix's upload settings (compression, …) say nothing about reading.
                _ => {}
            }
        }
        Ok(loc)
    }

    /// The HTTP(S) URL of object `key`.
    pub fn object_url(&self, key: &str) -> Result<Url, url::ParseError> {
        let key = sigv4::encode_path(key.trim_start_matches('/'));
        match &self.endpoint {
            Some(endpoint) => Url::parse(&format!(
                "{}://{endpoint}/{}/{key}",
                self.scheme, self.bucket
            )),
            None => Url::parse(&format!(
                "https://{}.s3.{}.amazonaws.com/{key}",
                self.bucket, self.region
            )),
        }
    }
}

/// An access key.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// The environment variables credentials are read from (a trait-free seam: tests pass a map).
pub fn credentials_from(
    env: impl Fn(&str) -> Option<String>,
    profile: Option<&str>,
) -> Option<Credentials> {
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    if let (Some(id), Some(secret)) = (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) {
        return Some(Credentials {
            access_key_id: id,
            secret_access_key: secret,
            session_token: get("AWS_SESSION_TOKEN"),
        });
    }
    let file = get("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| get("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")))?;
    let text = std::fs::read_to_string(&file).ok()?;
    let profile = profile
        .map(str::to_owned)
        .or_else(|| get("AWS_PROFILE"))
        .unwrap_or_else(|| "default".to_owned());
    parse_credentials_file(&text, &profile)
}

/// The `[profile]` section of an AWS shared credentials file.
pub fn parse_credentials_file(text: &str, profile: &str) -> Option<Credentials> {
    let mut section = String::new();
    let mut keys = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
            continue;
        }
        if section == profile {
            if let Some((k, v)) = line.split_once('=') {
                keys.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
    }
    Some(Credentials {
        access_key_id: keys.remove("aws_access_key_id")?,
        secret_access_key: keys.remove("aws_secret_access_key")?,
        session_token: keys.remove("aws_session_token"),
    })
}

/// GET over `s3://`.
pub struct S3Fetcher {
    /// Each configured `s3://` URL's location, by bucket.
    locations: BTreeMap<String, S3Location>,
    /// Per profile (`None`: the default chain), found on first use.
    credentials: OnceLock<BTreeMap<Option<String>, Option<Credentials>>>,
}

impl S3Fetcher {
    /// A fetcher knowing the `s3://` URLs among `urls` (the substituters and the catalog;
    /// the configuration has checked them: one that does not parse fails its requests).
    pub fn new<'a>(urls: impl IntoIterator<Item = &'a Url>) -> Self {
        let mut locations = BTreeMap::new();
        for url in urls.into_iter().filter(|u| u.scheme() == "s3") {
            if let Ok(loc) = S3Location::from_url(url) {
                locations.entry(loc.bucket.clone()).or_insert(loc);
            }
        }
        S3Fetcher {
            locations,
            credentials: OnceLock::new(),
        }
    }

    fn credentials(&self, profile: Option<&String>) -> Option<Credentials> {
        let all = self.credentials.get_or_init(|| {
            // Each profile once, however many buckets name it.
            let profiles: std::collections::BTreeSet<Option<String>> =
                self.locations.values().map(|l| l.profile.clone()).collect();
            profiles
                .into_iter()
                .map(|p| {
                    let c = credentials_from(|k| std::env::var(k).ok(), p.as_deref());
                    (p, c)
                })
                .collect()
        });
        all.get(&profile.cloned()).cloned().flatten()
    }

    /// GETs `url` (`s3://BUCKET/KEY`) through `http`.
    pub async fn get(&self, http: &HttpFetcher, url: &Url) -> Result<Body, FetchError> {
        let transport = |message: String| FetchError::Transport {
            url: url.clone(),
            message,
            retryable: false,
        };
        let bucket = url.host_str().unwrap_or_default();
        let loc = match self.locations.get(bucket) {
            Some(l) => l.clone(),
            None => S3Location::from_url(url).map_err(|e| transport(e.to_string()))?,
        };
        let object = loc
            .object_url(url.path())
            .map_err(|e| transport(format!("cannot make the object URL: {e}")))?;
        let host = match (object.host_str(), object.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(transport("object URL without host".to_owned())),
        };
        let mut headers: Vec<(&'static str, String)> = Vec::new();
        match self.credentials(loc.profile.as_ref()) {
            Some(c) => {
                let amz_date = sigv4::amz_date(std::time::SystemTime::now());
                let mut signed = vec![
                    ("host", host.as_str()),
                    ("x-amz-content-sha256", UNSIGNED_PAYLOAD),
                    ("x-amz-date", amz_date.as_str()),
                ];
                if let Some(t) = &c.session_token {
                    signed.push(("x-amz-security-token", t.as_str()));
                }
                let signer = Signer {
                    access_key_id: &c.access_key_id,
                    secret_access_key: &c.secret_access_key,
                    region: &loc.region,
                    service: "s3",
                    amz_date: &amz_date,
                };
                let authorization =
                    signer.authorization("GET", object.path(), &signed, UNSIGNED_PAYLOAD);
                headers.push(("x-amz-content-sha256", UNSIGNED_PAYLOAD.to_owned()));
                headers.push(("x-amz-date", amz_date.clone()));
                if let Some(t) = &c.session_token {
                    headers.push(("x-amz-security-token", t.clone()));
                }
                headers.push(("authorization", authorization));
            }
            None => tracing::debug!(%url, "no AWS credentials: unsigned request"),
        }
        tracing::debug!(%url, object = %object, region = %loc.region, "S3 GET");
        http.get_with_headers(&object, url, headers).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(u: &str) -> Result<S3Location, S3UrlError> {
        S3Location::from_url(&Url::parse(u).unwrap())
    }

    #[test]
    fn urls_as_nix_writes_them() {
        let l = loc("s3://nix-cache?region=eu-west-1").unwrap();
        assert_eq!(
            (l.bucket.as_str(), l.region.as_str()),
            ("nix-cache", "eu-west-1")
        );
        assert_eq!(
            l.object_url("/nar/abc.nar.xz").unwrap().as_str(),
            "https://nix-cache.s3.eu-west-1.amazonaws.com/nar/abc.nar.xz"
        );
        let l =
            loc("s3://c?endpoint=127.0.0.1:9000&scheme=http&profile=ci&compression=zstd").unwrap();
        assert_eq!(l.profile.as_deref(), Some("ci"));
        assert_eq!(
            l.object_url("x.narinfo").unwrap().as_str(),
            "http://127.0.0.1:9000/c/x.narinfo"
        );
        assert_eq!(
            loc("s3://c?scheme=ftp").unwrap_err().to_string(),
            "s3://c?scheme=ftp: scheme must be http or https, not \"ftp\""
        );
        assert_eq!(
            loc("s3://c?endpoint=a/b").unwrap_err().to_string(),
            "s3://c?endpoint=a/b: invalid endpoint \"a/b\""
        );
        assert!(loc("s3://c?region=a%20b").is_err());
    }

    #[test]
    fn credentials_from_the_environment_then_the_shared_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credentials");
        std::fs::write(
            &file,
            "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = s1\n\n\
             [ci]\n# comment\naws_access_key_id=AKCI\naws_secret_access_key=s2\naws_session_token=t2\n",
        )
        .unwrap();
        let env = |vars: &'static [(&'static str, &'static str)], file: PathBuf| {
            move |k: &str| {
                if k == "AWS_SHARED_CREDENTIALS_FILE" {
                    return Some(file.display().to_string());
                }
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = credentials_from(
            env(
                &[
                    ("AWS_ACCESS_KEY_ID", "AKENV"),
                    ("AWS_SECRET_ACCESS_KEY", "s0"),
                ],
                file.clone(),
            ),
            Some("ci"),
        )
        .unwrap();
        assert_eq!((c.access_key_id.as_str(), c.session_token), ("AKENV", None));
        let c = credentials_from(env(&[], file.clone()), None).unwrap();
        assert_eq!(c.access_key_id, "AKDEFAULT");
        let c = credentials_from(env(&[], file.clone()), Some("ci")).unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.session_token.as_deref()),
            ("AKCI", Some("t2"))
        );
        let c = credentials_from(env(&[("AWS_PROFILE", "ci")], file.clone()), None).unwrap();
        assert_eq!(c.access_key_id, "AKCI");
        assert!(credentials_from(env(&[], file), Some("none")).is_none());
        assert!(!format!("{c:?}").contains("s2"), "secrets stay out of logs");
    }
}
