//! On x86_64 Linux, links `nixenv-runc` as a static, non-PIE executable with its own entry
//! point and no C library: the kernel maps it and jumps to `_start`, with nothing to load or
//! relocate. Elsewhere, or with the `portable` feature, it is an ordinary `std` program
//! (`cfg(portable)`): the same decisions, plus the dynamic loader's start-up cost.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(portable)");
    println!("cargo:rerun-if-changed=build.rs");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let portable = std::env::var_os("CARGO_FEATURE_PORTABLE").is_some();
    if portable || arch != "x86_64" || os != "linux" {
        println!("cargo:rustc-cfg=portable");
        return;
    }
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie"] {
        println!("cargo:rustc-link-arg-bin=nixenv-runc={arg}");
    }
}
