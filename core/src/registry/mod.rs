//! The node-local, read-only OCI distribution server of the empty image (`nixenv registry`).
//!
//! A pod written as the card says (`image: empty:latest`, so pull policy `Always`) makes the
//! kubelet pull `docker.io/library/empty:latest` at every container start. The package points
//! the first docker.io host of containerd (`certs.d/docker.io/hosts.toml`) and a mirror of
//! `docker.io/library/empty` for containers-image (CRI-O, podman) at this server, which serves
//! only that image, from the OCI archive the package ships, and answers 404 for everything
//! else so that the runtimes fall through to the registry itself.
//!
//! One concept per file:
//! - [`tar`] — the entries of a tar archive (the subset GNU tar writes for the archive);
//! - [`archive`] — the image in the shipped OCI image-layout archive: tags, manifests, blobs;
//! - [`route`] — what a request gets: the distribution API's few read-only endpoints;
//! - [`listen`] — the listening socket: systemd's (`LISTEN_FDS`) or a loopback address;
//! - [`serve`] — the HTTP/1.1 server: bounds on requests, connections and time, idle exit.

pub mod archive;
pub mod listen;
pub mod route;
pub mod serve;
pub mod tar;
#[cfg(test)]
mod testing;

/// Where the package installs the empty image's archive.
pub const DEFAULT_ARCHIVE: &str = "/usr/share/nixenv/empty-image.tar";

/// The loopback address the package's socket unit listens on and the hosts configurations name.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7475";
