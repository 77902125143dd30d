//! OCI image archives built in Rust, without a registry, and imported into a containerd.
//!
//! - [`empty_image`]: `docker.io/library/empty:latest`, a manifest with zero layers (the image
//!   nixenv pods name; their software comes from the closure).
//! - [`pause_image`]: [`PAUSE_IMAGE`], one layer holding `/pause`, compiled with `gcc -static`
//!   from `tests/fixtures/pause.c` (the CRI `sandbox_image`).
//! - [`busybox_image`]: [`BUSYBOX_IMAGE`], one layer with Debian's static busybox at
//!   `/bin/busybox` and its applets as symlinks in `/bin` (plain, non-nixenv containers).
//! - [`ImageBuilder`]: any other image from files.
//!
//! Archives are OCI image layouts in a tar (`oci-layout`, `index.json`, `blobs/sha256/…`) with
//! the `io.containerd.image.name` annotation, as `ctr images import` expects:
//!
//! ```no_run
//! use nixenv_testkit::images;
//! let dir = tempfile::tempdir().unwrap();
//! let tar = images::busybox_image().write_archive(dir.path()).unwrap();
//! // images::import(&containerd.ctr(), &tar) — see containerd::Containerd::import_image
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The name of the empty image, as CRI normalises `empty:latest`.
pub const EMPTY_IMAGE: &str = "docker.io/library/empty:latest";
/// The name of the test pause image (use as the CRI `sandbox_image`).
pub const PAUSE_IMAGE: &str = "docker.io/nixenv/pause:test";
/// The name of the busybox image.
pub const BUSYBOX_IMAGE: &str = "docker.io/nixenv/busybox:test";

/// Applets linked in the busybox image's `/bin`.
const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "sleep", "true", "false", "env", "id", "ps", "touch", "mkdir", "rm",
    "test", "printf", "tty", "stty", "wc", "grep", "head", "tail", "kill", "hostname", "uname",
    "date", "nc", "wget", "httpd", "seq", "dd", "mount", "stat", "readlink", "pwd",
];

/// One entry of a layer.
#[derive(Debug, Clone)]
enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
}

/// An image under construction: a name, an entrypoint/cmd, env, and zero or one layer.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    name: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    user: Option<String>,
    layer: Option<Vec<Entry>>,
}

impl ImageBuilder {
    /// A new image called `name` (a full reference like `docker.io/library/x:tag`) with no layers.
    pub fn new(name: &str) -> ImageBuilder {
        ImageBuilder {
            name: name.to_owned(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ],
            user: None,
            layer: None,
        }
    }

    /// The image's full name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets `Entrypoint`.
    pub fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Sets `Cmd`.
    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Sets `User` (e.g. `1000`, `www-data`, `1000:50000`).
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_owned());
        self
    }

    fn layer(&mut self) -> &mut Vec<Entry> {
        self.layer.get_or_insert_with(Vec::new)
    }

    /// Adds a directory (parents are not implied; add them first).
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.layer().push(Entry::Dir {
            path: path.trim_start_matches('/').to_owned(),
            mode,
        });
        self
    }

    /// Adds a regular file.
    pub fn file(mut self, path: &str, mode: u32, data: Vec<u8>) -> Self {
        self.layer().push(Entry::File {
            path: path.trim_start_matches('/').to_owned(),
            mode,
            data,
        });
        self
    }

    /// Adds a symlink.
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.layer().push(Entry::Symlink {
            path: path.trim_start_matches('/').to_owned(),
            target: target.to_owned(),
        });
        self
    }

    /// Adds a hard link to `target`, an earlier entry (a path in the layer, e.g. `bin/busybox`).
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        self.layer().push(Entry::Hardlink {
            path: path.trim_start_matches('/').to_owned(),
            target: target.trim_start_matches('/').to_owned(),
        });
        self
    }

    /// Writes the OCI archive into `dir` and returns its path.
    pub fn write_archive(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        if let Some(entries) = &self.layer {
            let tar = tar_bytes(entries.iter().map(TarItem::from))?;
            let digest = sha256(&tar);
            diff_ids.push(format!("sha256:{digest}"));
            layers.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{digest}"),
                "size": tar.len(),
            }));
            blobs.push((digest, tar));
        }
        let mut config = serde_json::json!({"Env": self.env});
        if !self.entrypoint.is_empty() {
            config["Entrypoint"] = serde_json::json!(self.entrypoint);
        }
        if !self.cmd.is_empty() {
            config["Cmd"] = serde_json::json!(self.cmd);
        }
        if let Some(user) = &self.user {
            config["User"] = serde_json::json!(user);
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": oci_arch(),
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))?;
        let config_digest = sha256(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{config_digest}"),
                "size": config.len(),
            },
            "layers": layers,
        }))?;
        blobs.push((config_digest, config));
        let manifest_digest = sha256(&manifest);
        let tag = self
            .name
            .rsplit_once(':')
            .map(|(_, t)| t)
            .unwrap_or("latest");
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_digest}"),
                "size": manifest.len(),
                "platform": {"architecture": oci_arch(), "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": self.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        }))?;
        blobs.push((manifest_digest, manifest));
        let mut items = vec![
            TarItem::file(
                "oci-layout",
                0o644,
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            TarItem::file("index.json", 0o644, index),
            TarItem::dir("blobs", 0o755),
            TarItem::dir("blobs/sha256", 0o755),
        ];
        for (digest, data) in blobs {
            items.push(TarItem::file(
                &format!("blobs/sha256/{digest}"),
                0o644,
                data,
            ));
        }
        let archive = tar_bytes(items.into_iter())?;
        let file_name = self.name.replace(['/', ':'], "_") + ".oci.tar";
        let path = dir.join(file_name);
        std::fs::write(&path, archive)?;
        Ok(path)
    }
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

struct TarItem {
    path: String,
    mode: u32,
    kind: u8,
    data: Vec<u8>,
    link: String,
}

impl TarItem {
    fn file(path: &str, mode: u32, data: Vec<u8>) -> TarItem {
        TarItem {
            path: path.to_owned(),
            mode,
            kind: b'0',
            data,
            link: String::new(),
        }
    }
    fn dir(path: &str, mode: u32) -> TarItem {
        TarItem {
            path: format!("{}/", path.trim_end_matches('/')),
            mode,
            kind: b'5',
            data: Vec::new(),
            link: String::new(),
        }
    }
}

impl From<&Entry> for TarItem {
    fn from(e: &Entry) -> TarItem {
        match e {
            Entry::Dir { path, mode } => TarItem::dir(path, *mode),
            Entry::File { path, mode, data } => TarItem::file(path, *mode, data.clone()),
            Entry::Symlink { path, target } => TarItem {
                path: path.clone(),
                mode: 0o777,
                kind: b'2',
                data: Vec::new(),
                link: target.clone(),
            },
            Entry::Hardlink { path, target } => TarItem {
                path: path.clone(),
                mode: 0o755,
                kind: b'1',
                data: Vec::new(),
                link: target.clone(),
            },
        }
    }
}

fn octal(field: &mut [u8], value: u64) {
    let s = format!("{:0width$o}\0", value, width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

/// A ustar archive of `items` (names up to 100 bytes).
fn tar_bytes(items: impl Iterator<Item = TarItem>) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for item in items {
        if item.path.len() > 100 || item.link.len() > 100 {
            return Err(std::io::Error::other(format!(
                "tar name too long: {}",
                item.path
            )));
        }
        let mut h = [0u8; 512];
        h[..item.path.len()].copy_from_slice(item.path.as_bytes());
        octal(&mut h[100..108], item.mode as u64);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], item.data.len() as u64);
        octal(&mut h[136..148], 1_700_000_000);
        h[148..156].copy_from_slice(b"        ");
        h[156] = item.kind;
        h[157..157 + item.link.len()].copy_from_slice(item.link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&item.data);
        let pad = (512 - item.data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    Ok(out)
}

/// The empty image: zero layers.
pub fn empty_image() -> ImageBuilder {
    ImageBuilder::new(EMPTY_IMAGE)
}

/// The static pause binary, compiled once per machine and source (cached under the temp dir).
pub fn pause_binary() -> &'static Path {
    static PAUSE: OnceLock<PathBuf> = OnceLock::new();
    PAUSE.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pause.c");
        let text = std::fs::read(&src).expect("read tests/fixtures/pause.c");
        let out =
            std::env::temp_dir().join(format!("nixenv-testkit-pause-{}", &sha256(&text)[..16]));
        if out.is_file() {
            return out;
        }
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        let status = Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("run gcc");
        assert!(status.success(), "gcc -static pause.c failed");
        std::fs::rename(&tmp, &out).expect("install pause binary");
        out
    })
}

/// The pause image: `/pause` from [`pause_binary`].
pub fn pause_image() -> ImageBuilder {
    let bin = std::fs::read(pause_binary()).expect("read pause binary");
    ImageBuilder::new(PAUSE_IMAGE)
        .entrypoint(&["/pause"])
        .file("pause", 0o755, bin)
}

/// The busybox image: `/bin/busybox` (Debian's `busybox-static`) and applet symlinks,
/// `Cmd ["sh"]`, plus the usual empty directories.
pub fn busybox_image() -> ImageBuilder {
    let bin = std::fs::read("/bin/busybox").expect("read /bin/busybox (busybox-static)");
    let mut b = ImageBuilder::new(BUSYBOX_IMAGE)
        .cmd(&["sh"])
        .dir("bin", 0o755)
        .dir("tmp", 0o1777)
        .dir("etc", 0o755)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("dev", 0o755)
        .file("bin/busybox", 0o755, bin);
    for applet in BUSYBOX_APPLETS {
        b = b.symlink(&format!("bin/{applet}"), "busybox");
    }
    b
}

/// Imports an archive into `namespace` of the containerd at `address` with `ctr`.
pub fn import(address: &Path, namespace: &str, archive: &Path) -> std::io::Result<()> {
    let out = Command::new(crate::containerd::ctr_binary())
        .arg("--address")
        .arg(address)
        .args(["-n", namespace, "images", "import"])
        .arg(archive)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "ctr images import {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_headers_have_valid_checksums() {
        let tar =
            tar_bytes(vec![TarItem::file("a", 0o644, b"hello".to_vec())].into_iter()).unwrap();
        assert_eq!(tar.len(), 512 + 512 + 1024);
        let mut h = tar[..512].to_vec();
        let stored = std::str::from_utf8(&h[148..154]).unwrap().to_owned();
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        assert_eq!(u32::from_str_radix(&stored, 8).unwrap(), sum);
    }
}
