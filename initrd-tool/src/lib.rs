//! dualroot engine: bundles, unpack, migration and A/B slots.
//!
//! Two drivers, `migrate` (inside the migration initramfs) and `slot` (on the
//! running system), share the engine modules below them and never import each
//! other. The `dualroot` binary dispatches to them; the agent drives the binary
//! through the JSON contract in the `dualroot-api` crate.

// drivers
pub mod migrate;
pub mod slot;

// engine modules shared by both drivers
pub mod accounts;
pub mod blockdev;
pub mod bootfiles;
pub mod bundle;
pub mod capacity;
pub mod cmd;
pub mod compat;
pub mod distro_hooks;
pub mod efi;
pub mod fsutil;
pub mod grub;
pub mod keys;
pub mod layout;
pub mod logging;
pub mod lvm_devices;
pub mod mounts;
pub mod nicpin;
pub mod old_fs;
pub mod plan;
pub mod power;
pub mod progress;
pub mod sbat;
pub mod selinux;
pub mod source_layout;
pub mod sync;
pub mod sysinfo;
pub mod undo;

/// Captured tool output in `fixtures/tool-output/`, for the parsers' unit tests.
#[cfg(test)]
pub(crate) fn tool_output(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/tool-output")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
