//! `nixenv`: the operator CLI. Thin glue over `nixenv_core`.
fn main() {}
