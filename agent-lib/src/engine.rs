//! The migration/slot engine (`dualroot` binary), reached as a subprocess
//! through a trait so tests can substitute it.
//!
//! Commands used (JSON on stdout where noted, typed by the `dualroot-api` crate):
//! - `dualroot slot status --json`  → [`SlotStatus`]
//! - `dualroot slot install <bundle> --json` → [`InstallReport`] (installs into the inactive slot)
//! - `dualroot slot switch <slot>`  → next boot tries `<slot>`
//! - `dualroot bundle verify <bundle>` → signature and manifest check
//! - `dualroot stage <bundle> --plan <plan>` → stages a migration

use crate::cmd;
use anyhow::{bail, Context, Result};
pub use dualroot_api::{InstallReport, Slot, SlotState, SlotStatus};
use std::path::Path;

/// Decodes one document of the engine's JSON contract (strict: another
/// `api_version` or an unknown field is an error that says so).
pub fn decode<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    dualroot_api::decode(what, text).map_err(anyhow::Error::msg)
}

pub trait Engine: Send + Sync {
    fn slot_status(&self) -> Result<SlotStatus>;
    /// Installs a bundle into the inactive slot.
    fn slot_install(&self, bundle: &Path) -> Result<InstallReport>;
    fn slot_switch(&self, slot: Slot) -> Result<()>;
    fn bundle_verify(&self, bundle: &Path) -> Result<()>;
    fn stage(&self, bundle: &Path, plan: &Path) -> Result<String>;
    fn reboot(&self) -> Result<()>;
}

/// The real engine: runs the `dualroot` binary.
pub struct DualrootCli {
    pub bin: String,
    pub reboot_command: Vec<String>,
}

impl Engine for DualrootCli {
    fn slot_status(&self) -> Result<SlotStatus> {
        let out = cmd::run_timeout(
            &mut cmd::command(&self.bin, ["slot", "status", "--json"]),
            std::time::Duration::from_secs(60),
        )?;
        decode("`dualroot slot status --json`", &out.stdout)
    }

    fn slot_install(&self, bundle: &Path) -> Result<InstallReport> {
        let mut c = cmd::command(&self.bin, ["slot", "install"]);
        c.arg(bundle).arg("--json");
        decode("`dualroot slot install --json`", &cmd::run(&mut c)?.stdout)
    }

    fn slot_switch(&self, slot: Slot) -> Result<()> {
        cmd::run(&mut cmd::command(
            &self.bin,
            ["slot", "switch", slot.name()],
        ))
        .map(|_| ())
    }

    fn bundle_verify(&self, bundle: &Path) -> Result<()> {
        let mut c = cmd::command(&self.bin, ["bundle", "verify"]);
        c.arg(bundle);
        cmd::run(&mut c).map(|_| ())
    }

    fn stage(&self, bundle: &Path, plan: &Path) -> Result<String> {
        if plan.as_os_str().is_empty() {
            bail!("dualroot stage needs a plan; nothing was staged");
        }
        let mut c = cmd::command(&self.bin, ["stage"]);
        // A plan from the backend: the engine checks its signature again.
        c.arg(bundle)
            .arg("--plan")
            .arg(plan)
            .arg("--require-signed-plan");
        Ok(cmd::run(&mut c)?.stdout.trim().to_string())
    }

    fn reboot(&self) -> Result<()> {
        let (prog, args) = self
            .reboot_command
            .split_first()
            .context("upgrade.reboot_command is empty")?;
        cmd::run(&mut cmd::command(prog, args)).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output of the real `dualroot slot status --json`, regenerated and checked
    /// by initrd-tool's `tests/contract.rs`.
    fn fixture(name: &str) -> String {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/contract")
            .join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn decodes_what_the_real_engine_prints() {
        let s: SlotStatus = decode("slot status", &fixture("slot-status-trying-b.json")).unwrap();
        assert_eq!(s.booted, Some(Slot::B));
        assert!(!s.booted_good());
        assert_eq!(s.version.as_deref(), Some("13.2"));
        let s: SlotStatus = decode("slot status", &fixture("slot-status-fallback.json")).unwrap();
        assert_eq!(s.booted, Some(Slot::A));
        assert!(s.last_boot_was_fallback);
        assert_eq!(s.fallback_from, Some(Slot::B));
        assert!(s.booted_good());
    }

    #[test]
    fn guessed_shapes_are_refused() {
        let e = decode::<SlotStatus>(
            "slot status",
            r#"{"booted":"B","slots":{"B":{"good":true}}}"#,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("api_version"), "{e:#}");
        assert!(decode::<SlotStatus>("slot status", "Slot A (booted)").is_err());
    }

    #[test]
    fn missing_binary_is_reported_as_not_found() {
        let e = DualrootCli {
            bin: "/nonexistent/dualroot".into(),
            reboot_command: vec![],
        };
        let err = e.slot_status().unwrap_err();
        assert!(cmd::is_not_found(&err));
    }
}
