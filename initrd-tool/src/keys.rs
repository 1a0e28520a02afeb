//! Ed25519 keys and keyrings: the `dualroot-keys` crate, shared with the agent.

pub use dualroot_keys::*;
