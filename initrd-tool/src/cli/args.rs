//! The subcommands' clap types (the top level is in main.rs).

use clap::Subcommand;
use dualroot::slot;
use std::path::PathBuf;

/// Trusted bundle keys on an installed system.
pub const KEYRING: &str = "/etc/dualroot/keyring";

#[derive(Subcommand)]
pub enum PlanCmd {
    /// Schema, layout and every room rule of a plan, with no live system; exit 1 on blockers.
    Check {
        #[arg(long)]
        plan: PathBuf,
        /// The bundle to migrate to (its payload size and kernel).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Keyring to check the bundle with (default: the plan's).
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Size of the appliance's disk, e.g. 8G.
        #[arg(long)]
        disk_size: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Sign a plan with a vendor secret key: writes `<plan>.sig`.
    Sign {
        plan: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Check a plan's signature (`<plan>.sig`) against a keyring.
    Verify {
        plan: PathBuf,
        #[arg(long, default_value = KEYRING)]
        keyring: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum SlotCmd {
    /// Booted slot, primary, each slot's OS/version/state/tries, fallback.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Confirm the booted slot (after its health check passed).
    #[command(alias = "confirm")]
    MarkGood,
    /// Verify a bundle and install it into the inactive slot (never the booted one).
    Install {
        bundle: PathBuf,
        #[arg(long, default_value = KEYRING)]
        keyring: PathBuf,
        /// Carry list and account policy (default: the migration's plan on the data LV).
        #[arg(long, default_value = slot::install::DEFAULT_PLAN)]
        plan: PathBuf,
        #[arg(long)]
        json: bool,
        /// Install even when the bundle's version is older than the running slot's.
        #[arg(long)]
        allow_downgrade: bool,
        /// Install even while the booted slot is not confirmed good (labs only:
        /// GRUB would have no good slot to fall back to).
        #[arg(long)]
        force: bool,
    },
    /// Boot the other slot next, unconfirmed, with N tries before GRUB falls back.
    Switch {
        /// The slot to switch to (must be the inactive one; default: it).
        slot: Option<String>,
        #[arg(long, default_value_t = 3)]
        tries: u32,
        /// Switch even while the booted slot is not confirmed good (labs only).
        #[arg(long)]
        force: bool,
    },
    /// Make the other, good slot primary (or cancel a pending switch).
    Rollback,
    /// Run by the slot's kernel, initramfs and update-grub hooks: the slot's
    /// kernel to /boot/<slot>/, dualroot's grub.cfg written again.
    UpdateBoot {
        /// Kernel version (default: the newest in /boot).
        #[arg(long)]
        kernel: Option<String>,
        /// Only bring the booted slot's UEFI boot chain on the ESP up to its
        /// OS's shim and GRUB (the apt hook after every dpkg run).
        #[arg(long)]
        chain: bool,
    },
    /// Run the health check, then confirm the booted slot (and grow data/image once after migration).
    HealthCheck {
        #[arg(long, default_value = slot::health::DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Generate an ed25519 key pair: OUT (secret, mode 0600) and OUT.pub.
    Generate {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "dualroot")]
        comment: String,
    },
}
