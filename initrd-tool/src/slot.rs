//! A/B slot state on the running system: `dualroot slot status|mark-good`.
//! The state lives in /boot/grub/grubenv (see `grub.rs` for the variables); the
//! booted slot comes from `dualroot.slot=` on the kernel command line, which only
//! the generated grub.cfg sets.

use crate::grub;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SlotInfo {
    pub slot: String,
    pub lv: String,
    pub state: String,
    pub tries_left: Option<usize>,
    pub os_id: Option<String>,
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub booted: Option<String>,
    pub primary: String,
    /// The slot GRUB gave up on, when the last boots fell back.
    pub fallback_from: Option<String>,
    pub last_boot_was_fallback: bool,
    pub migrating: bool,
    pub slots: Vec<SlotInfo>,
}

pub fn booted_slot(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dualroot.slot="))
        .map(str::to_string)
}

/// Pure: the status from the environment block, the command line and the
/// manifests of the slots' bundles (`/boot/<slot>/manifest.toml`).
pub fn status_from(
    env: &BTreeMap<String, String>,
    cmdline: &str,
    manifests: &BTreeMap<String, String>,
) -> Status {
    let booted = booted_slot(cmdline);
    let primary = env.get("primary").cloned().unwrap_or_else(|| "a".into());
    let fallback_from = env.get("fallback_from").filter(|s| !s.is_empty()).cloned();
    let slots = [("a", "root"), ("b", "back")]
        .iter()
        .map(|(s, lv)| {
            let state = env
                .get(&format!("{s}_state"))
                .cloned()
                .unwrap_or_else(|| "empty".into());
            let m: Option<toml::Table> = manifests.get(*s).and_then(|t| toml::from_str(t).ok());
            let field = |k: &str| {
                m.as_ref()
                    .and_then(|m| m.get(k))
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            };
            SlotInfo {
                slot: s.to_string(),
                lv: lv.to_string(),
                tries_left: (state == "trying")
                    .then(|| env.get(&format!("{s}_tries")).map(|t| t.len()).unwrap_or(0)),
                state,
                os_id: field("os_id"),
                version: field("version"),
            }
        })
        .collect();
    Status {
        last_boot_was_fallback: fallback_from.is_some()
            && booted.is_some()
            && booted != fallback_from,
        booted,
        primary,
        fallback_from,
        migrating: env.get("migrating").map(|v| v == "1").unwrap_or(false),
        slots,
    }
}

pub fn status(boot: &Path) -> Result<Status> {
    let env = grub::read_env(&boot.join("grub/grubenv"))?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut manifests = BTreeMap::new();
    for s in ["a", "b"] {
        if let Ok(t) = std::fs::read_to_string(boot.join(s).join("manifest.toml")) {
            manifests.insert(s.to_string(), t);
        }
    }
    Ok(status_from(&env, &cmdline, &manifests))
}

/// Pure: the environment after the booted slot passed its health check.
pub fn mark_good_env(
    env: &BTreeMap<String, String>,
    booted: &str,
) -> Result<BTreeMap<String, String>> {
    if booted != "a" && booted != "b" {
        bail!("booted slot {booted:?} is not a or b");
    }
    let mut e = env.clone();
    e.insert(format!("{booted}_state"), "good".into());
    e.remove(&format!("{booted}_tries"));
    Ok(e)
}

pub fn mark_good(boot: &Path) -> Result<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let booted = booted_slot(&cmdline).context("the kernel command line has no dualroot.slot=: this boot did not come from a dualroot slot entry")?;
    let p = boot.join("grub/grubenv");
    let env = grub::read_env(&p)?;
    grub::write_env(&p, &mark_good_env(&env, &booted)?)?;
    Ok(booted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn status_after_migration() {
        let e = env(&[
            ("primary", "a"),
            ("a_state", "trying"),
            ("a_tries", "11"),
            ("b_state", "empty"),
        ]);
        let mut m = BTreeMap::new();
        m.insert(
            "a".to_string(),
            "os_id = \"debian\"\nversion = \"13\"\n".to_string(),
        );
        let s = status_from(
            &e,
            "BOOT_IMAGE=/a/vmlinuz root=/dev/mapper/VA-root dualroot.slot=a",
            &m,
        );
        assert_eq!(s.booted.as_deref(), Some("a"));
        assert_eq!(s.slots[0].tries_left, Some(2));
        assert_eq!(s.slots[0].version.as_deref(), Some("13"));
        assert_eq!(s.slots[1].state, "empty");
        assert!(!s.last_boot_was_fallback);
    }

    #[test]
    fn fallback_is_reported() {
        let e = env(&[
            ("primary", "a"),
            ("a_state", "good"),
            ("b_state", "bad"),
            ("b_tries", ""),
            ("fallback_from", "b"),
        ]);
        let s = status_from(&e, "dualroot.slot=a", &BTreeMap::new());
        assert!(s.last_boot_was_fallback);
        assert_eq!(s.fallback_from.as_deref(), Some("b"));
    }

    #[test]
    fn mark_good_confirms_only_the_booted_slot() {
        let e = env(&[
            ("primary", "a"),
            ("a_state", "trying"),
            ("a_tries", "1"),
            ("b_state", "empty"),
        ]);
        let g = mark_good_env(&e, "a").unwrap();
        assert_eq!(g["a_state"], "good");
        assert!(!g.contains_key("a_tries"));
        assert_eq!(g["b_state"], "empty");
        assert!(mark_good_env(&e, "c").is_err());
    }
}
