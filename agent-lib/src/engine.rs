//! The migration/slot engine (`dualroot` binary), reached as a subprocess
//! through a trait so tests can substitute it.
//!
//! Commands used (JSON on stdout where noted):
//! - `dualroot slot status --json`  → slot state (parsed leniently, see [`SlotStatus::parse`])
//! - `dualroot slot install <bundle> --json` → `{"slot": "B", ...}` (installs into the inactive slot)
//! - `dualroot slot switch <slot>`  → next boot tries `<slot>`
//! - `dualroot slot confirm`        → marks the running slot good
//! - `dualroot bundle verify <bundle>` → signature and manifest check
//! - `dualroot stage <bundle> [--plan <plan>]` → stages a migration

use crate::cmd;
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SlotStatus {
    /// Slot the system booted from ("A"/"B").
    pub booted: Option<String>,
    /// Slot GRUB is told to prefer.
    pub primary: Option<String>,
    /// The last boot fell back to the other slot.
    pub fallback: Option<bool>,
    /// The booted slot is marked good.
    pub booted_good: Option<bool>,
    /// Version of the booted slot, when the engine knows it.
    pub version: Option<String>,
}

fn str_at(v: &Value, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| {
        v.get(*k).and_then(|x| match x {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    })
}

fn bool_at(v: &Value, keys: &[&str]) -> Option<bool> {
    keys.iter().find_map(|k| v.get(*k).and_then(Value::as_bool))
}

impl SlotStatus {
    /// Parses `dualroot slot status --json`. The format belongs to the engine;
    /// the common spellings are accepted and unknown fields ignored.
    pub fn parse(text: &str) -> Result<SlotStatus> {
        let v: Value = serde_json::from_str(text).context("parsing slot status JSON")?;
        let booted = str_at(
            &v,
            &["booted", "booted_slot", "bootedSlot", "running", "current"],
        );
        let state_good = |x: &Value| x.as_str().map(|s| s.eq_ignore_ascii_case("good"));
        let mut booted_good = bool_at(&v, &["booted_good", "bootedGood"]);
        let mut version = str_at(&v, &["version", "booted_version", "bootedVersion"]);
        if let Some(b) = &booted {
            // per-slot objects: {"slots": {"A": {"good": true, "version": "1"}}} or a list,
            // or grubenv-like flat keys {"a_state": "good"}
            let slot = match v.get("slots") {
                Some(Value::Object(m)) => m
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(b))
                    .map(|(_, s)| s.clone()),
                Some(Value::Array(a)) => a
                    .iter()
                    .find(|s| {
                        str_at(s, &["name", "slot"]).is_some_and(|n| n.eq_ignore_ascii_case(b))
                    })
                    .cloned(),
                _ => None,
            };
            if let Some(s) = slot {
                booted_good = booted_good
                    .or_else(|| bool_at(&s, &["good", "confirmed"]))
                    .or_else(|| s.get("state").and_then(state_good));
                version = version.or_else(|| str_at(&s, &["version"]));
            }
            booted_good = booted_good.or_else(|| {
                v.get(format!("{}_state", b.to_ascii_lowercase()))
                    .and_then(state_good)
            });
        }
        let fallback = bool_at(
            &v,
            &["fallback", "fell_back", "fallback_boot", "fallbackBoot"],
        )
        .or_else(
            || match v.get("fallback_from").or_else(|| v.get("fallbackFrom")) {
                Some(Value::String(s)) => Some(!s.is_empty()),
                Some(Value::Null) => Some(false),
                _ => None,
            },
        );
        Ok(SlotStatus {
            booted,
            primary: str_at(&v, &["primary", "primary_slot", "primarySlot", "default"]),
            fallback,
            booted_good,
            version,
        })
    }
}

pub trait Engine: Send + Sync {
    fn slot_status(&self) -> Result<SlotStatus>;
    /// Installs a bundle into the inactive slot; returns that slot's name.
    fn slot_install(&self, bundle: &Path) -> Result<String>;
    fn slot_switch(&self, slot: &str) -> Result<()>;
    fn slot_confirm(&self) -> Result<()>;
    fn bundle_verify(&self, bundle: &Path) -> Result<()>;
    fn stage(&self, bundle: &Path, plan: Option<&Path>) -> Result<String>;
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
        SlotStatus::parse(&out.stdout)
    }

    fn slot_install(&self, bundle: &Path) -> Result<String> {
        let mut c = cmd::command(&self.bin, ["slot", "install"]);
        c.arg(bundle).arg("--json");
        let v: Value = cmd::run_json(&mut c)?;
        str_at(&v, &["slot", "target", "installed"])
            .context("`dualroot slot install` did not name the slot it installed")
    }

    fn slot_switch(&self, slot: &str) -> Result<()> {
        cmd::run(&mut cmd::command(&self.bin, ["slot", "switch", slot])).map(|_| ())
    }

    fn slot_confirm(&self) -> Result<()> {
        cmd::run(&mut cmd::command(&self.bin, ["slot", "confirm"])).map(|_| ())
    }

    fn bundle_verify(&self, bundle: &Path) -> Result<()> {
        let mut c = cmd::command(&self.bin, ["bundle", "verify"]);
        c.arg(bundle);
        cmd::run(&mut c).map(|_| ())
    }

    fn stage(&self, bundle: &Path, plan: Option<&Path>) -> Result<String> {
        let mut c = cmd::command(&self.bin, ["stage"]);
        c.arg(bundle);
        if let Some(p) = plan {
            c.arg("--plan").arg(p);
        }
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

    #[test]
    fn parses_flat_status() {
        let s = SlotStatus::parse(
            r#"{"booted":"B","primary":"B","fallback":false,"booted_good":true,"version":"13.1"}"#,
        )
        .unwrap();
        assert_eq!(s.booted.as_deref(), Some("B"));
        assert_eq!(s.fallback, Some(false));
        assert_eq!(s.booted_good, Some(true));
        assert_eq!(s.version.as_deref(), Some("13.1"));
    }

    #[test]
    fn parses_nested_slots() {
        let s = SlotStatus::parse(
            r#"{"bootedSlot":"A","primarySlot":"B","fallbackBoot":true,
                "slots":{"A":{"good":true,"version":"11"},"B":{"good":false,"version":"13"}}}"#,
        )
        .unwrap();
        assert_eq!(s.booted.as_deref(), Some("A"));
        assert_eq!(s.primary.as_deref(), Some("B"));
        assert_eq!(s.fallback, Some(true));
        assert_eq!(s.booted_good, Some(true));
        assert_eq!(s.version.as_deref(), Some("11"));
    }

    #[test]
    fn parses_slot_list() {
        let s = SlotStatus::parse(
            r#"{"booted":"B","slots":[{"name":"A"},{"name":"B","version":"2","good":false}]}"#,
        )
        .unwrap();
        assert_eq!(s.version.as_deref(), Some("2"));
        assert_eq!(s.booted_good, Some(false));
    }

    #[test]
    fn parses_grubenv_like_status() {
        let s = SlotStatus::parse(
            r#"{"booted":"a","primary":"b","a_state":"good","b_state":"bad","fallback_from":"b"}"#,
        )
        .unwrap();
        assert_eq!(s.booted.as_deref(), Some("a"));
        assert_eq!(s.booted_good, Some(true));
        assert_eq!(s.fallback, Some(true));
        let s = SlotStatus::parse(
            r#"{"booted":"b","slots":{"a":{"state":"good"},"b":{"state":"trying","version":"13"}},"fallback_from":""}"#,
        )
        .unwrap();
        assert_eq!(s.booted_good, Some(false));
        assert_eq!(s.fallback, Some(false));
        assert_eq!(s.version.as_deref(), Some("13"));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(SlotStatus::parse("Slot A (booted)").is_err());
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
