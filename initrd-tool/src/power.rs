//! Reboots and power-offs the engine asks for.

use crate::cmd::{cmd, CommandExt};
use anyhow::{Context, Result};

/// A clean reboot of a running system (services stop in order).
pub fn reboot_via_systemd() -> Result<()> {
    cmd("systemctl", ["reboot"]).run()
}

/// Sync, then reboot or power off at once (the initramfs hook's last word).
pub fn now(power_off: bool) -> Result<()> {
    nix::unistd::sync();
    let mode = if power_off {
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    } else {
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    };
    nix::sys::reboot::reboot(mode).context("reboot(2)")?;
    Ok(())
}
