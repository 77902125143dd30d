//! SPDX 2.3 JSON. The document DESCRIBES one package, the environment (its version the lock's
//! generation), which DEPENDS_ON the lock's top-level paths; every store path is a package
//! (`SPDXRef-StorePath-<hash>`, its store path as `packageFileName`, its NarHash as a SHA256
//! checksum, `filesAnalyzed` false) that DEPENDS_ON its references.

use serde_json::{json, Value};

use super::{name, Sbom, TOOL_VERSION};
use crate::nix::StorePath;

/// The SPDX id of the environment's package.
pub const ENVIRONMENT_ID: &str = "SPDXRef-Environment";

/// The SPDX id of a store path's package (`[A-Za-z0-9.-]` only: the hash part is nixbase32).
pub fn package_id(path: &StorePath) -> String {
    format!("SPDXRef-StorePath-{}", path.hash_str())
}

/// `name` with everything but `[A-Za-z0-9.-]` made `-`, for the document namespace.
fn uri_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn relationship(from: &str, kind: &str, to: &str) -> Value {
    json!({"spdxElementId": from, "relationshipType": kind, "relatedSpdxElement": to})
}

/// The SPDX 2.3 document of `sbom`.
pub fn document(sbom: &Sbom) -> Value {
    let s = &sbom.subject;
    let mut comment = format!("nixenv environment {}, system {}", sbom.title(), s.system);
    if let Some(c) = &s.container {
        comment.push_str(&format!(
            ", as run by container {} (prepared {})",
            c.id, c.prepared
        ));
    }
    let mut environment = json!({
        "SPDXID": ENVIRONMENT_ID,
        "name": s.name,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "APPLICATION",
        "comment": comment,
    });
    if let Some(g) = s.generation {
        environment["versionInfo"] = json!(g.to_string());
    }
    let mut packages = vec![environment];
    let mut relationships = vec![relationship(
        "SPDXRef-DOCUMENT",
        "DESCRIBES",
        ENVIRONMENT_ID,
    )];
    for root in &s.roots {
        relationships.push(relationship(
            ENVIRONMENT_ID,
            "DEPENDS_ON",
            &package_id(root),
        ));
    }
    for p in &sbom.paths {
        let split = name::split(p.path.name());
        let mut package = json!({
            "SPDXID": package_id(&p.path),
            "name": split.name,
            "packageFileName": p.path.to_absolute_path(),
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "checksums": [{"algorithm": "SHA256", "checksumValue": p.nar_hash.to_hex()}],
            "comment": format!(
                "Nix store path; checksum: NarHash (SHA-256 of its NAR, {} bytes){}",
                p.nar_size,
                split.output.map(|o| format!("; output {o}")).unwrap_or_default()
            ),
        });
        if let Some(v) = split.version {
            package["versionInfo"] = json!(v);
        }
        packages.push(package);
        for r in Sbom::dependencies(p) {
            relationships.push(relationship(
                &package_id(&p.path),
                "DEPENDS_ON",
                &package_id(r),
            ));
        }
    }
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{} ({})", sbom.title(), s.system),
        "documentNamespace": format!(
            "https://spdx.org/spdxdocs/nixenv-{}-{}",
            uri_safe(&sbom.title()),
            sbom.uuid()
        ),
        "creationInfo": {
            "created": sbom.created,
            "creators": [format!("Tool: nixenv-{TOOL_VERSION}")],
        },
        "packages": packages,
        "relationships": relationships,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sbom::tests::{sample, A, B, C};

    fn id(path: &str) -> String {
        package_id(&path.parse().unwrap())
    }

    #[test]
    fn packages_checksums_and_relationships() {
        let doc = document(&sample());
        assert_eq!(doc["spdxVersion"], "SPDX-2.3");
        assert_eq!(doc["name"], "acme/echoserver@2 (x86_64-linux)");
        let ns = doc["documentNamespace"].as_str().unwrap();
        assert!(
            ns.starts_with("https://spdx.org/spdxdocs/nixenv-acme-echoserver-2-"),
            "{ns}"
        );
        let packages = doc["packages"].as_array().unwrap();
        assert_eq!(packages.len(), 4, "the environment and three paths");
        assert_eq!(packages[0]["versionInfo"], "2");
        let busybox = &packages[1];
        assert_eq!(busybox["SPDXID"], id(B));
        assert_eq!(busybox["name"], "busybox");
        assert_eq!(busybox["versionInfo"], "1.36.1");
        assert_eq!(busybox["packageFileName"], B);
        assert_eq!(busybox["checksums"][0]["algorithm"], "SHA256");
        assert_eq!(busybox["checksums"][0]["checksumValue"], "02".repeat(32));
        let gcc = &packages[2];
        assert_eq!(
            (gcc["name"].as_str(), gcc["versionInfo"].as_str()),
            (Some("gcc"), Some("13.2.0"))
        );
        let rels: Vec<(String, String, String)> = doc["relationships"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let f = |k: &str| r[k].as_str().unwrap().to_owned();
                (
                    f("spdxElementId"),
                    f("relationshipType"),
                    f("relatedSpdxElement"),
                )
            })
            .collect();
        let rel = |a: &str, k: &str, b: &str| (a.to_owned(), k.to_owned(), b.to_owned());
        assert_eq!(
            rels,
            vec![
                rel("SPDXRef-DOCUMENT", "DESCRIBES", ENVIRONMENT_ID),
                rel(ENVIRONMENT_ID, "DEPENDS_ON", &id(A)),
                rel(&id(B), "DEPENDS_ON", &id(C)),
                rel(&id(A), "DEPENDS_ON", &id(B)),
                rel(&id(A), "DEPENDS_ON", &id(C)),
            ],
            "no self-dependency of B"
        );
    }
}
