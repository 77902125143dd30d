//! `nixenv-runc`: runc-compatible. Execs runc at once for every subcommand but `create`, `run`
//! and `delete`, which go to `nixenv-hook runc …` (same directory) with the same arguments.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let code = nixenv_hook::wrapper::dispatch(
        &args,
        &nixenv_hook::exec::RealProcess,
        &nixenv_hook::EnvLocate,
        nixenv_hook::wrapper::sibling_hook,
    );
    std::process::exit(code);
}
