//! The vendor keyring that service packages are checked against: the same key
//! files and keyrings as OS bundles (`dualroot-keys`, shared with the engine).

pub use dualroot_keys::{package_message, Keyring};
