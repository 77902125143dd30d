//! Which HTTP redirects are followed: a cache may not send the node (root) anywhere it likes.
//!
//! A redirect is followed only
//! - within [`MAX_REDIRECTS`] hops, to `http://` or `https://`, never from `https://` down to
//!   `http://`;
//! - to the origin (scheme, host, port) of the URL first requested, or to a host that
//!   `allowed-redirect-hosts` allows for that origin (or for every origin);
//! - never to a loopback or link-local address (`127.0.0.0/8`, `::1`, `localhost`,
//!   `169.254.0.0/16` such as cloud metadata, `fe80::/10`) unless the URL first requested was
//!   already such an address or the operator listed that host.
//!
//! [`check`] is the pure decision; [`policy`] wraps it in a `reqwest` redirect policy whose
//! refusal surfaces as a [`RedirectRefused`] in the request's error chain. The address check
//! looks at the URL's host as written: a host name that resolves to a local address is only
//! caught by the origin rule.

use std::net::{Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

use super::scheme::Scheme;
use crate::config::AllowedRedirectHosts;

/// Redirects followed for one request at most.
pub const MAX_REDIRECTS: usize = 5;

/// Why a redirect was not followed; every variant names the target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectRefused {
    #[error("redirect to {target} refused: more than {max} redirects")]
    TooMany { target: Url, max: usize },
    #[error("redirect to {target} refused: scheme {scheme:?} is not http or https")]
    Scheme { target: Url, scheme: String },
    #[error("redirect to {target} refused: https downgraded to http")]
    Downgrade { target: Url },
    #[error("redirect to {target} refused: {host} is a loopback or link-local address")]
    LocalAddress { target: Url, host: String },
    #[error(
        "redirect to {target} refused: not the origin {origin} and not in allowed-redirect-hosts"
    )]
    OtherOrigin { target: Url, origin: String },
}

/// Decides whether the `hops`-th redirect (1 for the first) of a request for `original` may go
/// to `target`.
pub fn check(
    original: &Url,
    target: &Url,
    hops: usize,
    allowed: &AllowedRedirectHosts,
) -> Result<(), RedirectRefused> {
    if hops > MAX_REDIRECTS {
        return Err(RedirectRefused::TooMany {
            target: target.clone(),
            max: MAX_REDIRECTS,
        });
    }
    if Scheme::of(target) != Some(Scheme::Http) {
        return Err(RedirectRefused::Scheme {
            target: target.clone(),
            scheme: target.scheme().to_owned(),
        });
    }
    if original.scheme() == "https" && target.scheme() == "http" {
        return Err(RedirectRefused::Downgrade {
            target: target.clone(),
        });
    }
    if original.origin() == target.origin() {
        return Ok(());
    }
    let host = target.host().map(|h| h.to_string()).unwrap_or_default();
    if allowed.for_origin(original).any(|h| h == host) {
        return Ok(());
    }
    if is_local(target) && !is_local(original) {
        return Err(RedirectRefused::LocalAddress {
            target: target.clone(),
            host,
        });
    }
    Err(RedirectRefused::OtherOrigin {
        target: target.clone(),
        origin: original.origin().ascii_serialization(),
    })
}

/// Whether a URL's host is a loopback or link-local address (or `localhost`).
pub fn is_local(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(a)) => local_v4(a),
        Some(Host::Ipv6(a)) => local_v6(a),
        Some(Host::Domain(d)) => {
            let d = d.trim_end_matches('.');
            d == "localhost" || d.ends_with(".localhost")
        }
        None => false,
    }
}

fn local_v4(a: Ipv4Addr) -> bool {
    a.is_loopback() || a.is_link_local() || a.is_unspecified()
}

fn local_v6(a: Ipv6Addr) -> bool {
    if let Some(v4) = a.to_ipv4_mapped() {
        return local_v4(v4);
    }
    a.is_loopback() || a.is_unspecified() || (a.segments()[0] & 0xffc0) == 0xfe80
}

/// A `reqwest` policy applying [`check`] with these allowances.
pub fn policy(allowed: AllowedRedirectHosts) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        // `previous` holds the URL first requested and every hop so far.
        let Some(original) = attempt.previous().first().cloned() else {
            return attempt.follow();
        };
        let hops = attempt.previous().len();
        match check(&original, attempt.url(), hops, &allowed) {
            Ok(()) => attempt.follow(),
            Err(refused) => attempt.error(refused),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn allow(everywhere: &[&str], per: &[(&str, &[&str])]) -> AllowedRedirectHosts {
        AllowedRedirectHosts {
            everywhere: everywhere.iter().map(|s| s.to_string()).collect(),
            per_origin: per
                .iter()
                .map(|(o, hs)| (u(o).origin(), hs.iter().map(|s| s.to_string()).collect()))
                .collect(),
        }
    }

    #[test]
    fn same_origin_is_followed() {
        let none = AllowedRedirectHosts::default();
        let cache = u("https://cache.example.com/nix/x.narinfo");
        check(
            &cache,
            &u("https://cache.example.com/other/nar/a.nar"),
            1,
            &none,
        )
        .unwrap();
        check(&cache, &u("https://CACHE.example.com:443/a"), 5, &none).unwrap();
        // Tests run caches on 127.0.0.1: same origin there is fine too.
        let local = u("http://127.0.0.1:8080/nar/a.nar");
        check(
            &local,
            &u("http://127.0.0.1:8080/mirror/nar/a.nar"),
            1,
            &none,
        )
        .unwrap();
    }

    #[test]
    fn other_origins_are_refused() {
        let none = AllowedRedirectHosts::default();
        let cache = u("https://cache.example.com/x.narinfo");
        for target in [
            "https://evil.example.net/x",
            "https://cache.example.com:8443/x",
            "https://bucket.s3.example.com/nar/a",
        ] {
            let e = check(&cache, &u(target), 1, &none).unwrap_err();
            assert!(matches!(e, RedirectRefused::OtherOrigin { .. }), "{e}");
            assert_eq!(
                e.to_string(),
                format!(
                    "redirect to {} refused: not the origin https://cache.example.com and not in allowed-redirect-hosts",
                    u(target)
                )
            );
        }
        // Another port or host name on the loopback interface is another origin.
        let local = u("http://127.0.0.1:8080/nar/a.nar");
        for target in [
            "http://127.0.0.1:8081/nar/a.nar",
            "http://localhost:8080/nar/a.nar",
        ] {
            assert!(matches!(
                check(&local, &u(target), 1, &none),
                Err(RedirectRefused::OtherOrigin { .. })
            ));
        }
    }

    #[test]
    fn loopback_and_link_local_are_refused_from_remote_caches() {
        let none = AllowedRedirectHosts::default();
        let cache = u("http://cache.example.com/x.narinfo");
        for (target, host) in [
            (
                "http://169.254.169.254/latest/meta-data/",
                "169.254.169.254",
            ),
            ("http://127.0.0.1:2379/v2/keys", "127.0.0.1"),
            ("http://127.8.9.10/", "127.8.9.10"),
            ("http://localhost:10250/pods", "localhost"),
            ("http://[::1]/", "[::1]"),
            ("http://[fe80::1]/", "[fe80::1]"),
            ("http://[::ffff:169.254.169.254]/", "[::ffff:a9fe:a9fe]"),
            ("http://0.0.0.0/", "0.0.0.0"),
        ] {
            let e = check(&cache, &u(target), 1, &none).unwrap_err();
            assert_eq!(
                e,
                RedirectRefused::LocalAddress {
                    target: u(target),
                    host: host.into()
                },
                "{target}"
            );
            assert!(e.to_string().contains("loopback or link-local"), "{e}");
        }
        // Even a host allowed for another cache does not open metadata to this one.
        let other = allow(&[], &[("http://other.example.com", &["169.254.169.254"])]);
        assert!(matches!(
            check(&cache, &u("http://169.254.169.254/"), 1, &other),
            Err(RedirectRefused::LocalAddress { .. })
        ));
    }

    #[test]
    fn allowed_hosts_per_origin_and_everywhere() {
        let cache = u("https://cache.example.com/x.narinfo");
        let target = u("https://bucket.s3.example.com/nar/a.nar?sig=1");
        let everywhere = allow(&["bucket.s3.example.com"], &[]);
        check(&cache, &target, 1, &everywhere).unwrap();
        let per = allow(
            &[],
            &[("https://cache.example.com/nix", &["bucket.s3.example.com"])],
        );
        check(&cache, &target, 1, &per).unwrap();
        // Any port on an allowed host.
        check(&cache, &u("https://bucket.s3.example.com:9000/a"), 1, &per).unwrap();
        // Another cache does not get this cache's allowance.
        let e = check(&u("https://other.example.com/x"), &target, 1, &per).unwrap_err();
        assert!(matches!(e, RedirectRefused::OtherOrigin { .. }), "{e}");
        // An operator may allow a local address explicitly.
        let meta = allow(&[], &[("https://cache.example.com", &["127.0.0.1"])]);
        check(&cache, &u("https://127.0.0.1:9000/a"), 1, &meta).unwrap();
    }

    #[test]
    fn count_scheme_and_downgrade() {
        let none = AllowedRedirectHosts::default();
        let cache = u("https://cache.example.com/x");
        let same = u("https://cache.example.com/y");
        check(&cache, &same, MAX_REDIRECTS, &none).unwrap();
        assert_eq!(
            check(&cache, &same, MAX_REDIRECTS + 1, &none)
                .unwrap_err()
                .to_string(),
            "redirect to https://cache.example.com/y refused: more than 5 redirects"
        );
        assert!(matches!(
            check(&cache, &u("file:///etc/shadow"), 1, &none),
            Err(RedirectRefused::Scheme { .. })
        ));
        let all = allow(&["cache.example.com"], &[]);
        assert!(matches!(
            check(&cache, &u("http://cache.example.com/y"), 1, &all),
            Err(RedirectRefused::Downgrade { .. })
        ));
        // http to https on the same host is another origin: allowed only when listed.
        let plain = u("http://cache.example.com/x");
        assert!(check(&plain, &u("https://cache.example.com/x"), 1, &none).is_err());
        check(&plain, &u("https://cache.example.com/x"), 1, &all).unwrap();
    }

    #[test]
    fn local_hosts() {
        assert!(is_local(&u("http://169.254.169.254/")));
        assert!(is_local(&u("http://[::1]:80/")));
        assert!(is_local(&u("http://a.localhost/")));
        assert!(!is_local(&u("http://10.0.0.1/")));
        assert!(!is_local(&u("http://localhost.example.com/")));
    }
}
