//! Test archives: tar files and OCI image layouts built in memory.

use super::archive::sha256_hex;

const BLOCK: usize = 512;

fn header(name: &str, size: usize, kind: u8) -> Vec<u8> {
    let mut h = vec![0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

/// One tar member (header and padded data) of type `kind`.
pub fn member(name: &str, data: &[u8], kind: u8) -> Vec<u8> {
    let mut out = header(name, data.len(), kind);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    out
}

/// A tar of regular files, with its end-of-archive blocks.
pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out: Vec<u8> = files.iter().flat_map(|(n, d)| member(n, d, b'0')).collect();
    out.extend(vec![0u8; 2 * BLOCK]);
    out
}

/// An OCI layout archive of one manifest named `docker.io/library/empty:latest`:
/// `(archive, manifest digest, config digest)`.
pub fn empty_archive() -> (Vec<u8>, String, String) {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_hex = sha256_hex(config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_hex}","size":{}}},"layers":[]}}"#,
        config.len()
    );
    let manifest_hex = sha256_hex(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_hex}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"docker.io/library/empty:latest"}}}}]}}"#,
        manifest.len()
    );
    let archive = tar_of(&[
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json", index.as_bytes()),
        (&format!("blobs/sha256/{config_hex}"), config),
        (&format!("blobs/sha256/{manifest_hex}"), manifest.as_bytes()),
    ]);
    (
        archive,
        format!("sha256:{manifest_hex}"),
        format!("sha256:{config_hex}"),
    )
}
