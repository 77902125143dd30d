//! `nixenv-hook STAGE`: the OCI hook (`precreate`, `prestart`, `createRuntime`, `poststop`).

use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::bail;
use nixenv_hook::exec::RealProcess;
use nixenv_hook::{hook, node::Node, prestart, wrapper, EnvLocate};

fn stdin() -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(hook::HookError::Stdin)?;
    Ok(buf)
}

fn run(args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    let stage = args.first().and_then(|s| s.to_str()).unwrap_or("");
    match stage {
        "precreate" => {
            let out = hook::precreate(&mut Node::new(), stdin()?)?;
            std::io::stdout()
                .write_all(&out)
                .map_err(hook::HookError::Stdout)?;
        }
        "prestart" | "createRuntime" => {
            hook::prestart(&mut Node::new(), &mut hook::SelfHelper, &stdin()?)?;
        }
        "poststop" => hook::poststop(&mut Node::new(), &stdin()?)?,
        s if s == wrapper::FULL_STAGE => {
            // nixenv-runc's create/run/delete (argv unchanged after the stage name).
            let code = wrapper::run(&args[1..], &mut Node::new(), &RealProcess, &EnvLocate);
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
