//! A loopback-only pod network for CRI tests whose pods cannot use the node's network (a user
//! namespace needs the pod's own network namespace: containerd creates it inside the pod's
//! user namespace): one small shell-script CNI plugin, installed as `loopback` (the plugin
//! containerd runs for every pod's `lo`) and as `nixenv-lo` (the pod network, from a conflist in
//! the config dir). Both bring the pod's `lo` up (`nsenter` and busybox `ip`) and report the
//! interface they were asked for with an address (containerd requires one on `eth0`; nothing
//! routes to it: tests reach a pod's servers from inside it, over 127.0.0.1).
//!
//! ```no_run
//! let dirs = nixenv_testkit::cni::LoopbackNetwork::new().unwrap();
//! let builder = nixenv_testkit::containerd::Containerd::builder().cni(&dirs.bin_dir(), &dirs.conf_dir());
//! ```

use std::path::{Path, PathBuf};

/// The plugin: answers VERSION, brings `lo` up on ADD and reports `$CNI_IFNAME` in the
/// `cniVersion` of its config; everything else (DEL, CHECK, GC, STATUS) succeeds silently.
const PLUGIN: &str = r#"#!/bin/sh
config=$(cat)
version=$(printf '%s' "$config" | sed -n 's/.*"cniVersion" *: *"\([^"]*\)".*/\1/p')
[ -n "$version" ] || version=1.0.0
case "$CNI_COMMAND" in
VERSION)
  echo '{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}' ;;
ADD)
  nsenter --net="$CNI_NETNS" busybox ip link set lo up || exit 1
  if [ "$CNI_IFNAME" = lo ]; then address=127.0.0.1/8; else address=10.88.0.2/24; fi
  case "$version" in 0.*) v4='"version":"4",' ;; *) v4= ;; esac
  printf '{"cniVersion":"%s","interfaces":[{"name":"%s","sandbox":"%s"}],"ips":[{%s"address":"%s","interface":0}],"dns":{}}\n' \
    "$version" "$CNI_IFNAME" "$CNI_NETNS" "$v4" "$address" ;;
esac
exit 0
"#;

/// The network config of the pod network.
const CONFLIST: &str =
    r#"{"cniVersion":"1.0.0","name":"nixenv-lo","plugins":[{"type":"nixenv-lo"}]}"#;

/// A CNI bin and config dir with the loopback-only network, removed on drop.
pub struct LoopbackNetwork {
    dir: tempfile::TempDir,
}

impl LoopbackNetwork {
    /// Writes the plugin and its config into a fresh temp dir.
    pub fn new() -> std::io::Result<LoopbackNetwork> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let net = LoopbackNetwork { dir };
        std::fs::create_dir_all(net.bin_dir())?;
        std::fs::create_dir_all(net.conf_dir())?;
        for name in ["loopback", "nixenv-lo"] {
            let path = net.bin_dir().join(name);
            std::fs::write(&path, PLUGIN)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::write(net.conf_dir().join("10-nixenv-lo.conflist"), CONFLIST)?;
        Ok(net)
    }

    /// Where the plugins are (containerd's CNI `bin_dirs`).
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    /// Where the network config is (containerd's CNI `conf_dir`).
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    /// The temp dir holding both.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}
