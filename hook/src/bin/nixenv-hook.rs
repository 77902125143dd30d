//! `nixenv-hook STAGE`: the OCI hook (`precreate`, `prestart`, `createRuntime`, `poststop`),
//! nixenv-runc's second stage (`runc`) and the containerd shim's helper (`shim-prepare`,
//! `shim-release`, `shim-config`).

use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::bail;
use nixenv_hook::exec::RealProcess;
use nixenv_hook::{hook, node::RealNode, prestart, shim, wrapper, EnvLocate};

fn stdin() -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(hook::HookError::Stdin)?;
    Ok(buf)
}

/// The shim stages log to stderr, which the shim points at its log, in the shim's format;
/// `RUST_LOG` sets the level (default info).
fn shim_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .with_writer(std::io::stderr)
        // The shim's log FIFO goes away with the shim (and is non-blocking): a failed write
        // loses that line, it must not end the process (the default reports it with
        // `eprintln!`, which panics when stderr is broken).
        .log_internal_errors(false)
        .try_init();
}

fn run(args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    let stage = args.first().and_then(|s| s.to_str()).unwrap_or("");
    match stage {
        "precreate" => {
            let out = hook::precreate(&mut RealNode::new(), stdin()?)?;
            std::io::stdout()
                .write_all(&out)
                .map_err(hook::HookError::Stdout)?;
        }
        "prestart" | "createRuntime" => {
            hook::prestart(&mut RealNode::new(), &mut hook::SelfHelper, &stdin()?)?;
        }
        "poststop" => hook::poststop(&mut RealNode::new(), &stdin()?)?,
        s if s == wrapper::FULL_STAGE => {
            // nixenv-runc's create/run/delete (argv unchanged after the stage name).
            let code = wrapper::run(&args[1..], &mut RealNode::new(), &RealProcess, &EnvLocate);
            std::process::exit(code);
        }
        s if [shim::PREPARE_STAGE, shim::RELEASE_STAGE, shim::CONFIG_STAGE].contains(&s) => {
            shim_logging();
            let code = shim::main(
                s,
                &args[1..],
                &mut RealNode::new().abandon_on_signal(),
                &mut std::io::stdout().lock(),
            );
            std::process::exit(code);
        }
        s if s == prestart::MOUNT_SUBCOMMAND => prestart::mount_main(
            &mut prestart::RealNamespaces,
            &mut prestart::RealMounter,
            &args[1..],
        )?,
        other => bail!(
            "unknown stage {other:?} (expected precreate, prestart, createRuntime or poststop)"
        ),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each error's Display already includes its cause: one line.
            eprintln!("nixenv: {e}");
            ExitCode::FAILURE
        }
    }
}
