//! dualroot engine: bundles, unpack, migration and A/B slots.
//!
//! The `dualroot` binary and the agent are thin drivers over this library.

pub mod bundle;
pub mod keys;
pub mod progress;
pub mod accounts;
pub mod cmd;
pub mod plan;
pub mod sysinfo;
pub mod grub;
pub mod layout;
