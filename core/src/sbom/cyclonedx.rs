//! CycloneDX 1.6 JSON. The environment is `metadata.component` (an application whose version is
//! the lock's generation; the BOM's `version` is the generation too); every store path is a
//! `library` component (`bom-ref` its store path, its NarHash as a SHA-256 hash, `nix:*`
//! properties); `dependencies` holds the environment's top-level paths and every path's
//! references.

use serde_json::{json, Value};

use super::{name, Sbom, TOOL_VERSION};

/// The `bom-ref` of the environment: `nixenv:acme/echoserver@2`.
pub fn environment_ref(sbom: &Sbom) -> String {
    format!("nixenv:{}", sbom.title())
}

fn property(name: &str, value: impl ToString) -> Value {
    json!({"name": name, "value": value.to_string()})
}

/// The CycloneDX 1.6 BOM of `sbom`.
pub fn document(sbom: &Sbom) -> Value {
    let s = &sbom.subject;
    let env_ref = environment_ref(sbom);
    let mut properties = vec![property("nixenv:system", &s.system)];
    if let Some(c) = &s.container {
        properties.push(property("nixenv:container-id", &c.id));
        properties.push(property("nixenv:container-prepared", &c.prepared));
    }
    let mut environment = json!({
        "type": "application",
        "bom-ref": env_ref,
        "name": s.name,
        "properties": properties,
    });
    if let Some(g) = s.generation {
        environment["version"] = json!(g.to_string());
    }
    let mut components = Vec::new();
    let mut dependencies = vec![json!({
        "ref": env_ref,
        "dependsOn": s.roots.iter().map(|r| r.to_absolute_path()).collect::<Vec<_>>(),
    })];
    for p in &sbom.paths {
        let path = p.path.to_absolute_path();
        let split = name::split(p.path.name());
        let mut properties = vec![
            property("nix:store-path", &path),
            property("nix:nar-size", p.nar_size),
        ];
        if let Some(o) = split.output {
            properties.push(property("nix:output", o));
        }
        let mut component = json!({
            "type": "library",
            "bom-ref": path,
            "name": split.name,
            "hashes": [{"alg": "SHA-256", "content": p.nar_hash.to_hex()}],
            "properties": properties,
        });
        if let Some(v) = split.version {
            component["version"] = json!(v);
        }
        components.push(component);
        dependencies.push(json!({
            "ref": path,
            "dependsOn": Sbom::dependencies(p).map(|r| r.to_absolute_path()).collect::<Vec<_>>(),
        }));
    }
    json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": format!("urn:uuid:{}", sbom.uuid()),
        "version": s.generation.unwrap_or(1),
        "metadata": {
            "timestamp": sbom.created,
            "tools": {"components": [{"type": "application", "name": "nixenv", "version": TOOL_VERSION}]},
            "component": environment,
        },
        "components": components,
        "dependencies": dependencies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sbom::tests::{sample, A, B, C};

    #[test]
    fn components_hashes_and_dependencies() {
        let sbom = sample();
        let doc = document(&sbom);
        assert_eq!(doc["specVersion"], "1.6");
        assert_eq!(doc["version"], 2, "the generation");
        assert_eq!(doc["metadata"]["component"]["name"], "acme/echoserver");
        assert_eq!(doc["metadata"]["component"]["version"], "2");
        let components = doc["components"].as_array().unwrap();
        let refs: Vec<&str> = components
            .iter()
            .map(|c| c["bom-ref"].as_str().unwrap())
            .collect();
        assert_eq!(refs, vec![B, C, A]);
        assert_eq!(components[0]["hashes"][0]["content"], "02".repeat(32));
        assert_eq!(components[1]["name"], "gcc");
        assert_eq!(components[1]["properties"][2]["value"], "lib");
        let deps = doc["dependencies"].as_array().unwrap();
        assert_eq!(deps[0]["ref"], environment_ref(&sbom));
        assert_eq!(deps[0]["dependsOn"], json!([A]));
        assert_eq!(deps[1]["dependsOn"], json!([C]), "no self-dependency");
        assert_eq!(deps[3]["dependsOn"], json!([B, C]));
        let serial = doc["serialNumber"].as_str().unwrap();
        assert_eq!(serial, format!("urn:uuid:{}", sbom.uuid()));
    }
}
