//! What a request gets: the read-only endpoints of the OCI distribution API for the images of
//! one archive. `GET`/`HEAD` of `/v2/` (the version check), of
//! `/v2/<repository>/manifests/<tag or digest>` and of `/v2/<repository>/blobs/<digest>`;
//! everything else is an OCI error (404 for names the archive does not hold, so containerd and
//! containers-image try their next host or the registry itself; 405 for other methods).

use super::archive::Image;

/// The answer to one request. For `HEAD` the server sends the headers of the `GET` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    /// `Docker-Content-Digest` of a manifest or blob.
    pub digest: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    fn found(content_type: &str, digest: &str, body: &[u8]) -> Reply {
        Reply {
            status: 200,
            content_type: content_type.to_owned(),
            digest: Some(digest.to_owned()),
            body: body.to_vec(),
        }
    }

    /// An OCI distribution error body: `{"errors":[{"code":…,"message":…}]}`.
    pub fn error(status: u16, code: &str, message: &str) -> Reply {
        let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] });
        Reply {
            status,
            content_type: "application/json".to_owned(),
            digest: None,
            body: body.to_string().into_bytes(),
        }
    }
}

/// The reply of `image`'s registry to `method` on `target` (path and query).
pub fn route(image: &Image, method: &str, target: &str) -> Reply {
    if method != "GET" && method != "HEAD" {
        return Reply::error(405, "UNSUPPORTED", "this registry is read-only");
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path == "/v2/" || path == "/v2" {
        return Reply {
            status: 200,
            content_type: "application/json".to_owned(),
            digest: None,
            body: b"{}".to_vec(),
        };
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Reply::error(404, "NOT_FOUND", "not a registry API path");
    };
    if let Some((repository, reference)) = rest.rsplit_once("/manifests/") {
        if !image.has_repository(repository) {
            return Reply::error(404, "NAME_UNKNOWN", "repository name not known to registry");
        }
        return match image.manifest(repository, reference) {
            Some(m) => match image.blob(&m.digest) {
                Some(body) => Reply::found(&m.media_type, &m.digest, body),
                None => Reply::error(404, "MANIFEST_UNKNOWN", "manifest unknown"),
            },
            None => Reply::error(404, "MANIFEST_UNKNOWN", "manifest unknown"),
        };
    }
    if let Some((repository, digest)) = rest.rsplit_once("/blobs/") {
        if !image.has_repository(repository) {
            return Reply::error(404, "NAME_UNKNOWN", "repository name not known to registry");
        }
        return match image.blob(digest) {
            Some(body) => Reply::found("application/octet-stream", digest, body),
            None => Reply::error(404, "BLOB_UNKNOWN", "blob unknown to registry"),
        };
    }
    Reply::error(404, "NOT_FOUND", "not a registry API path")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::testing::empty_archive;
    use super::*;

    fn image() -> (Image, String, String) {
        let (bytes, manifest, config) = empty_archive();
        (
            Image::parse(Path::new("a.tar"), &bytes).unwrap(),
            manifest,
            config,
        )
    }

    fn code(reply: &Reply) -> String {
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        v["errors"][0]["code"].as_str().unwrap().to_owned()
    }

    #[test]
    fn serves_the_manifest_by_tag_and_digest_and_its_blobs() {
        let (image, manifest, config) = image();
        assert_eq!(route(&image, "GET", "/v2/").status, 200);
        let by_tag = route(
            &image,
            "GET",
            "/v2/library/empty/manifests/latest?ns=docker.io",
        );
        assert_eq!(by_tag.status, 200);
        assert_eq!(by_tag.digest.as_deref(), Some(manifest.as_str()));
        assert_eq!(
            by_tag.content_type,
            "application/vnd.oci.image.manifest.v1+json"
        );
        let by_digest = route(
            &image,
            "HEAD",
            &format!("/v2/library/empty/manifests/{manifest}"),
        );
        assert_eq!(by_digest.body, by_tag.body);
        let blob = route(&image, "GET", &format!("/v2/library/empty/blobs/{config}"));
        assert_eq!(blob.status, 200);
        assert_eq!(blob.digest.as_deref(), Some(config.as_str()));
    }

    #[test]
    fn everything_else_is_an_oci_error() {
        let (image, _, config) = image();
        let r = route(&image, "GET", "/v2/library/nginx/manifests/latest");
        assert_eq!((r.status, code(&r)), (404, "NAME_UNKNOWN".to_owned()));
        let r = route(
            &image,
            "GET",
            "/v2/library/nginx/blobs/".to_owned().as_str(),
        );
        assert_eq!(r.status, 404);
        let r = route(&image, "GET", &format!("/v2/library/nginx/blobs/{config}"));
        assert_eq!((r.status, code(&r)), (404, "NAME_UNKNOWN".to_owned()));
        let r = route(&image, "GET", "/v2/library/empty/manifests/1.0");
        assert_eq!((r.status, code(&r)), (404, "MANIFEST_UNKNOWN".to_owned()));
        let r = route(&image, "GET", "/v2/library/empty/blobs/sha256:00");
        assert_eq!((r.status, code(&r)), (404, "BLOB_UNKNOWN".to_owned()));
        let r = route(&image, "GET", "/v2/_catalog");
        assert_eq!(r.status, 404);
        let r = route(&image, "PUT", "/v2/library/empty/manifests/latest");
        assert_eq!((r.status, code(&r)), (405, "UNSUPPORTED".to_owned()));
        assert_eq!(route(&image, "GET", "/").status, 404);
    }
}
