//! `nixenv-runc`, first stage: runc-compatible; execs the real runc at once, or
//! `nixenv-hook runc …` for `create`, `run` and `delete` (see the library for the rules).
//!
//! A pass-through subcommand pays for one extra `execve` of this binary and nothing else: it
//! is static, not position-independent, has its own `_start` and links no C library, so there
//! is no dynamic loader, relocation or runtime start-up (see `build.rs`). On other
//! architectures (`cfg(portable)`) it is an ordinary `std` program making the same decisions.
//! (`cargo clippy --all-targets` also checks it as a test target, which needs `std`.)
#![cfg_attr(not(any(portable, test)), no_std)]
#![cfg_attr(not(any(portable, test)), no_main)]

#[cfg(any(portable, test))]
mod portable;
#[cfg(any(portable, test))]
fn main() {
    portable::main()
}

#[cfg(not(any(portable, test)))]
mod bare;
