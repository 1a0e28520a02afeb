//! `dualroot slot health-check`: run by `dualroot-confirm.service` on every boot of
//! a slot. Checks what `/etc/dualroot/health.toml` asks for (units that must be
//! active, a command that must succeed), then confirms the slot; after the very
//! first good boot following migration, and after the disk grew, it gives
//! `data` and `image` the VG's free space beyond the slot reserve (`room`). A failing check leaves the slot unconfirmed and, when the other slot
//! is good to fall back to, reboots so GRUB spends the next try.

use super::state;
use crate::cmd::{cmd, run_timeout, run_unchecked};
use crate::grub::{self, BootConfig};
use anyhow::{bail, Context, Result};
use log::info;
use serde::Deserialize;
use std::path::Path;
use std::time::{Duration, Instant};

pub const DEFAULT_CONFIG: &str = "/etc/dualroot/health.toml";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// systemd units that must be active (waited for up to `timeout_secs`).
    pub units: Vec<String>,
    /// A shell command that must exit 0 (run with `sh -c`).
    pub command: Option<String>,
    pub timeout_secs: u64,
    /// What to do when the check fails on an unconfirmed slot: `reboot` (GRUB
    /// spends a try, then falls back to the good slot) or `stay`.
    pub on_failure: String,
    /// Share of the VG's free space `data` gets when growing (the rest: `image`).
    pub grow_data_percent: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            units: Vec::new(),
            command: None,
            timeout_secs: 300,
            on_failure: "reboot".into(),
            grow_data_percent: 50,
        }
    }
}

impl HealthConfig {
    pub fn parse(text: &str) -> Result<HealthConfig> {
        let c: HealthConfig = toml::from_str(text)?;
        if c.on_failure != "reboot" && c.on_failure != "stay" {
            bail!(
                "on_failure = {:?}: use \"reboot\" or \"stay\"",
                c.on_failure
            );
        }
        if c.grow_data_percent > 100 {
            bail!("grow_data_percent = {} is over 100", c.grow_data_percent);
        }
        Ok(c)
    }

    /// The file if it exists, the defaults (no extra checks) if it does not.
    pub fn load(path: &Path) -> Result<HealthConfig> {
        match std::fs::read_to_string(path) {
            Ok(t) => HealthConfig::parse(&t).with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HealthConfig::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// Runs the checks; the first failure is the error.
pub fn check(c: &HealthConfig) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(c.timeout_secs);
    let mut passed = Vec::new();
    for u in &c.units {
        loop {
            // `is-active` exits non-zero for every state but active: its word is the answer.
            let (_, out) = run_unchecked(
                &mut cmd("systemctl", ["is-active", u]),
                None,
                Duration::from_secs(60),
            )?;
            let st = out.stdout.trim().to_string();
            if st == "active" {
                passed.push(format!("unit {u} active"));
                break;
            }
            if st == "failed" || Instant::now() >= deadline {
                bail!("unit {u} is {st} (must be active)");
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    if let Some(command) = &c.command {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(10));
        // The agent's service check plugs in here (health.toml `command`): the
        // engine alone decides whether a slot is healthy.
        run_timeout(&mut cmd("sh", ["-c", command]), left)
            .with_context(|| format!("health command {command:?}"))?;
        passed.push(format!("command {command:?} succeeded"));
    }
    Ok(passed)
}

/// `dualroot slot health-check`: runs the check and acts on the outcome (reboots
/// when a failed, unconfirmed slot has a good one to fall back to). Returns
/// whether the check passed.
pub fn run_and_act(boot: &Path, config: &Path) -> Result<bool> {
    match run(boot, config)? {
        Outcome::Confirmed(notes) => {
            info!("health check passed: {notes}");
            Ok(true)
        }
        Outcome::Failed { reason, reboot } => {
            log::error!("health check failed: {reason}");
            if reboot {
                crate::power::reboot_via_systemd()?;
            }
            Ok(false)
        }
    }
}

/// After a failed check: reboot only an unconfirmed slot, and only when the other
/// slot is good — GRUB spends the tries and falls back. Rebooting with nothing to
/// fall back to would loop forever on a machine nobody is watching.
pub fn reboot_on_failure(env: &state::Env, booted: &str, on_failure: &str) -> bool {
    on_failure == "reboot"
        && state::state(env, booted) == "trying"
        && state::state(env, state::other(booted)) == "good"
}

/// What `health-check` did.
#[derive(Debug)]
pub enum Outcome {
    Confirmed(String),
    /// The check failed; the machine reboots (`true`) or stays up.
    Failed {
        reason: String,
        reboot: bool,
    },
}

/// Where the data LV is mounted on a slot (the fstab `sync` writes).
const DATA_MOUNT: &str = "/data";

pub fn run(boot: &Path, config: &Path) -> Result<Outcome> {
    let booted = super::running_slot()?;
    let c = HealthConfig::load(config)?;
    let env = grub::read_env(&boot.join(grub::ENV_FILE))?;
    let mut notes = Vec::new();
    match check(&c) {
        Ok(p) => notes.extend(p),
        Err(e) => {
            let reason = format!("{e:#}");
            let trying = state::state(&env, booted) == "trying";
            let fallback_ok = state::state(&env, state::other(booted)) == "good";
            let reboot = reboot_on_failure(&env, booted, &c.on_failure);
            info!(
                "health check of slot {booted} failed: {reason}; the slot stays unconfirmed{}",
                if reboot {
                    format!(
                        "; rebooting so GRUB spends a try ({} left) and then falls back to slot {}",
                        env.get(&format!("{booted}_tries"))
                            .map(|t| t.len())
                            .unwrap_or(0),
                        state::other(booted)
                    )
                } else if trying && !fallback_ok {
                    format!(
                        "; not rebooting: slot {} is not good, there is nothing to fall back to",
                        state::other(booted)
                    )
                } else {
                    String::new()
                }
            );
            return Ok(Outcome::Failed { reason, reboot });
        }
    }
    let was = state::state(&env, booted).to_string();
    let env = super::update(boot, |e| super::confirm_booted(e, booted))?;
    notes.push(format!("slot {booted} confirmed good (was {was})"));
    // UEFI: the firmware starts a slot's own chain only once the slot proved good.
    if was != "good" && super::chain::uefi(boot) {
        match super::chain::promote(boot, booted) {
            Ok(n) => notes.push(n),
            Err(e) => notes.push(format!(
                "slot {booted}'s boot chain was not promoted (the firmware keeps the chain it has): {e:#}"
            )),
        }
    }
    let vg = BootConfig::load(boot)?.vg;
    // A disk the hypervisor enlarged since the last boot: partition and PV
    // follow, then the growth policy below hands out what exceeds the reserve.
    let disk_grew = match super::room::follow_disk(&vg) {
        Ok(Some(what)) => {
            notes.push(what);
            true
        }
        Ok(None) => false,
        Err(e) => {
            notes.push(format!(
                "following the disk's size failed (the layout is unchanged; the next boot tries again): {e:#}"
            ));
            false
        }
    };
    if disk_grew || env.get("grow_pending").map(String::as_str) == Some("1") {
        let grown = super::room::grow_data_image(&vg, c.grow_data_percent).with_context(|| {
            format!("slot {booted} is confirmed good, but growing data and image in VG {vg} failed; the next boot's health check tries again")
        })?;
        super::update(boot, |e| Ok(state::grow_done(e)))?;
        notes.push(format!("grew data and image: {grown}"));
    }
    // The first confirmed boot after the migration: nothing resumes it any more,
    // so the stash's copies of the old system's secrets go (issue 23 item 5).
    match crate::sync::clear_stash(Path::new(DATA_MOUNT)) {
        Ok(removed) if !removed.is_empty() => notes.push(format!(
            "removed the migration stash's {} from {DATA_MOUNT}/{}",
            removed.join(", "),
            crate::sync::STASH_DIR
        )),
        Ok(_) => {}
        Err(e) => notes.push(format!(
            "could not remove the migration stash (it holds copies of the old system's secrets, readable by root only): {e:#}"
        )),
    }
    Ok(Outcome::Confirmed(notes.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_refusals() {
        assert_eq!(HealthConfig::parse("").unwrap(), HealthConfig::default());
        let c = HealthConfig::parse(
            "units = [\"ssh.service\"]\ncommand = \"true\"\non_failure = \"stay\"\n",
        )
        .unwrap();
        assert_eq!(c.units, ["ssh.service"]);
        assert_eq!(c.timeout_secs, 300);
        assert!(HealthConfig::parse("on_failure = \"panic\"")
            .unwrap_err()
            .to_string()
            .contains("reboot"));
        assert!(
            HealthConfig::parse("unit = []").is_err(),
            "unknown keys are errors"
        );
        assert!(HealthConfig::parse("grow_data_percent = 101").is_err());
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            HealthConfig::load(&d.path().join("none.toml")).unwrap(),
            HealthConfig::default()
        );
    }

    #[test]
    fn reboots_only_when_there_is_a_good_slot_to_fall_back_to() {
        let env = |pairs: &[(&str, &str)]| -> state::Env {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let after_switch = env(&[
            ("a_state", "good"),
            ("b_state", "trying"),
            ("b_tries", "11"),
        ]);
        assert!(reboot_on_failure(&after_switch, "b", "reboot"));
        assert!(!reboot_on_failure(&after_switch, "b", "stay"));
        // Right after migration: slot b is empty, nothing to fall back to.
        let migrated = env(&[
            ("a_state", "trying"),
            ("a_tries", "11"),
            ("b_state", "empty"),
        ]);
        assert!(!reboot_on_failure(&migrated, "a", "reboot"));
        // A confirmed slot that later fails its check is not rebooted.
        let both_good = env(&[("a_state", "good"), ("b_state", "good")]);
        assert!(!reboot_on_failure(&both_good, "a", "reboot"));
    }

    #[test]
    fn command_must_succeed_in_time() {
        let mut c = HealthConfig {
            command: Some("exit 0".into()),
            ..Default::default()
        };
        assert_eq!(check(&c).unwrap(), ["command \"exit 0\" succeeded"]);
        c.command = Some("echo checking >&2; exit 3".into());
        let e = format!("{:#}", check(&c).unwrap_err());
        assert!(e.contains("failed") && e.contains("exit status: 3"), "{e}");
        assert!(
            e.contains("checking"),
            "the command's stderr is in the error: {e}"
        );
        c.command = Some("sleep 30".into());
        c.timeout_secs = 0;
        let t = Instant::now();
        let e = format!("{:#}", check(&c).unwrap_err());
        assert!(e.contains("timed out after 10 s"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(20));
    }
}
