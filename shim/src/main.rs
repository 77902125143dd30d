//! `containerd-shim-nixenv-v2`: the containerd shim v2 of nixenv (runtime type
//! `io.containerd.nixenv.v2`). Containers whose pod names a Nix environment get its closure
//! mounted before `runc create` (by `nixenv-hook shim-prepare`, a process of its own, so the
//! shim that lives as long as the pod stays small: see [`helper`]); everything else runs as on
//! containerd's runc shim.
//!
//! The task logic is [`task`] (plain async code, generic over the helper and the waiter for
//! child exits, unit-tested with scripts as helper and runc); [`service`] is the ttrpc `Task`
//! adapter over it, and [`error`] the only place that chooses a ttrpc code.
//!
//! [`bootstrap`] runs the actions containerd invokes: `start` speaks both containerd 2.3+'s
//! bootstrap protocol (`BootstrapParams` on stdin, a `BootstrapResult` answer:
//! [`bootstrap_params`]) and the legacy one of 1.6–2.2 (flags, `TTRPC_ADDRESS`, plain address);
//! `-info` reports the features of the runc in use ([`info`]).

mod bootstrap;
mod bootstrap_params;
mod cgroup_path;
mod cgroups;
mod container;
mod error;
mod events;
mod helper;
mod idmap;
mod info;
mod io;
mod logging;
mod mount;
mod oom;
mod process;
mod process_spec;
mod reaper;
mod runc;
mod service;
mod stats;
mod task;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let result = (|| -> anyhow::Result<()> {
        let flags = containerd_shim::parse(&args[1..])?;
        // One thread for the ttrpc server, IO copies, the reaper and events: a shim lives as
        // long as its pod, so its threads and their malloc arenas are per-pod memory.
        // Blocking work (file copies) still gets tokio's blocking pool, whose threads exit
        // after 10 s idle.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(bootstrap::run(flags))?;
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-nixenv-v2: {e:#}");
            ExitCode::FAILURE
        }
    }
}
