//! Where a NAR may be fetched from: inside the cache that served its narinfo.
//!
//! A narinfo's `URL:` is not covered by its signature, so a hostile cache (or anyone on an
//! `http://` path) chooses it. The joined URL must keep the cache's scheme, host and port,
//! its path must lie below the cache's directory, and no segment below it may hide a
//! separator, a control character or a dot segment behind percent-encoding (`%2F`, `%2f`,
//! `%5C`, `%00`, `%2e%2e`): a server, or `file://` (which decodes the path before opening
//! it), would read those as a way out of the cache. Pure; no I/O.

use url::Url;

/// Why a NAR URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarUrlError {
    /// Another scheme, host or port, or a path not below the cache's directory.
    #[error("points outside the cache")]
    Outside,
    /// A percent-encoded `/` or `\`.
    #[error("contains the percent-encoded separator {encoded}")]
    EncodedSeparator { encoded: String },
    /// A percent-encoded control character (NUL included).
    #[error("contains the percent-encoded control character {encoded}")]
    EncodedControl { encoded: String },
    /// A segment that decodes to `.` or `..`.
    #[error("contains the percent-encoded dot segment {segment:?}")]
    EncodedDots { segment: String },
}

/// Checks that `url` (a NAR URL already joined onto `cache`) stays inside `cache`.
pub fn check(cache: &Url, url: &Url) -> Result<(), NarUrlError> {
    let base = cache.path();
    let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
    let same_origin = url.scheme() == cache.scheme()
        && url.host_str() == cache.host_str()
        && url.port_or_known_default() == cache.port_or_known_default();
    let Some(below) = url.path().strip_prefix(dir).filter(|_| same_origin) else {
        return Err(NarUrlError::Outside);
    };
    below.split('/').try_for_each(check_segment)
}

/// Checks one path segment (between `/`s) below the cache's directory.
fn check_segment(segment: &str) -> Result<(), NarUrlError> {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        let Some(b) = escaped else {
            decoded.push(bytes[i]);
            i += 1;
            continue;
        };
        let encoded = segment[i..i + 3].to_owned();
        match b {
            b'/' | b'\\' => return Err(NarUrlError::EncodedSeparator { encoded }),
            0..=0x1f | 0x7f => return Err(NarUrlError::EncodedControl { encoded }),
            _ => decoded.push(b),
        }
        i += 3;
    }
    if decoded == b"." || decoded == b".." {
        return Err(NarUrlError::EncodedDots {
            segment: segment.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{check, NarUrlError};
    use url::Url;

    fn joined(cache: &str, rel: &str) -> Result<(), NarUrlError> {
        let cache = Url::parse(cache).unwrap();
        check(&cache, &cache.join(rel).unwrap())
    }

    #[test]
    fn nar_urls_must_stay_in_their_cache() {
        let http = "http://127.0.0.1:8080/cache/";
        assert_eq!(joined(http, "nar/abc.nar.xz"), Ok(()));
        assert_eq!(joined(http, "nar/a%20b.nar"), Ok(()));
        for outside in [
            "../etc/passwd",
            "/nar/abc.nar",
            "file:///dev/zero",
            "http://169.254.169.254/latest",
            "http://127.0.0.1:9999/cache/nar/x",
        ] {
            assert_eq!(
                joined(http, outside),
                Err(NarUrlError::Outside),
                "{outside}"
            );
        }
        let file = "file:///srv/cache/";
        assert_eq!(joined(file, "nar/x.nar"), Ok(()));
        assert_eq!(joined(file, "../../etc/shadow"), Err(NarUrlError::Outside));
    }

    #[test]
    fn percent_encoded_separators_are_refused_over_http_and_file() {
        for cache in ["http://127.0.0.1:8080/cache/", "file:///srv/cache/"] {
            for (rel, encoded) in [
                ("nar/..%2F..%2F..%2Fetc%2Fshadow", "%2F"),
                ("nar/..%2f..%2fetc%2fpasswd", "%2f"),
                ("nar/..%5C..%5Cetc%5Cpasswd", "%5C"),
                ("%2e%2e%2F%2e%2e%2Fetc/passwd", "%2F"),
                ("nar/x.nar%00.xz", "%00"),
            ] {
                let want = if encoded == "%00" {
                    NarUrlError::EncodedControl {
                        encoded: encoded.into(),
                    }
                } else {
                    NarUrlError::EncodedSeparator {
                        encoded: encoded.into(),
                    }
                };
                assert_eq!(joined(cache, rel), Err(want), "{cache} {rel}");
            }
        }
    }

    #[test]
    fn percent_encoded_dot_segments_are_refused() {
        // Joining already resolves `%2e%2e` segments; the check does not rely on that.
        assert_eq!(
            super::check_segment("%2E%2e"),
            Err(NarUrlError::EncodedDots {
                segment: "%2E%2e".into()
            })
        );
        assert_eq!(
            super::check_segment("%2e"),
            Err(NarUrlError::EncodedDots {
                segment: "%2e".into()
            })
        );
        assert_eq!(super::check_segment(".%2e."), Ok(()));
    }
}
