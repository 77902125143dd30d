//! The node store at `{state-dir}/store` (owned by the substituter/store helper).

pub mod unpack;
