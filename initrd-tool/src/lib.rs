//! dualroot engine: bundles, unpack, migration and A/B slots.
//!
//! The `dualroot` binary and the agent are thin drivers over this library.

pub mod accounts;
pub mod bundle;
pub mod cmd;
pub mod grub;
pub mod keys;
pub mod layout;
pub mod migrate;
pub mod mounts;
pub mod nicpin;
pub mod plan;
pub mod progress;
pub mod slot;
pub mod sysinfo;
