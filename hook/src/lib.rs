//! nixenv for CRI-O and podman: `nixenv-runc`, a runc wrapper that prepares the bundle on
//! `create`/`run` and execs the real runc, and `nixenv-hook`, the OCI hook (`precreate`,
//! `prestart`/`createRuntime`, `poststop`).
//!
//! - [`args`]: runc's command line;
//! - [`runc_log`]: errors in runc's log format;
//! - [`exec`]: finding and starting the real runc (the process edge);
//! - [`wrapper`]: the nixenv-runc flow;
//! - [`exec_env`]: the environment changes an exec into a prepared container gets (the
//!   per-container record, the rewritten process file);
//! - [`hook`]: the hook stages;
//! - [`shim`]: the containerd shim's preparing process (`shim-prepare`, `shim-release`, `shim-config`;
//!   the `nixenv-shim-protocol` crate, failures sent with their kind);
//! - [`prestart`]: mounting a closure into a container's mount namespace (the syscall edge);
//! - [`node`]: the core library on this node, behind one trait ([`node::Node`]), used by the
//!   wrapper, the hook stages and the shim stages.

pub mod args;
pub mod exec;
pub mod exec_env;
pub mod hook;
pub mod node;
pub mod prestart;
pub mod runc_log;
pub mod shim;
pub mod wrapper;

/// [`wrapper::Locate`] through `$NIXENV_RUNC` and PATH.
#[derive(Debug, Default, Clone, Copy)]
pub struct EnvLocate;

impl wrapper::Locate for EnvLocate {
    fn locate(&self) -> Result<std::path::PathBuf, exec::ExecError> {
        exec::locate_runc_from_env()
    }
}
