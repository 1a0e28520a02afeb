//! `upgrade`: scheduled download, install into the inactive slot, switch,
//! reboot, and after the reboot confirm (or report the rollback). Each phase
//! is persisted in the journal's kv `upgrade:<taskId>` before the next starts.

use super::heartbeat::unhealthy_services;
use super::{cancel, fetch_to, progress, safe_name, Outcome, Source};
use crate::agent::Agent;
use crate::journal::TaskRow;
use crate::protocol::Progress;
use crate::registration::now_secs;
use anyhow::{bail, Context, Result};
use dualroot_api::Slot;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;

/// A window of unix seconds for the pre-download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Window {
    pub start: i64,
    pub end: i64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Body {
    version: String,
    #[serde(flatten)]
    source: Source,
    #[serde(default)]
    window: Option<Window>,
    /// Unix seconds before which the switch is not armed.
    #[serde(default)]
    switch_at: Option<i64>,
}

/// Upgrade phases, persisted with the same strings as before they were an
/// enum, so journals on disk keep working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Scheduled,
    Downloaded,
    Installed,
    Switched,
    Confirmed,
    #[serde(rename = "rolled back")]
    RolledBack,
    Unhealthy,
    Unconfirmed,
}

impl Phase {
    /// A slot switch is armed (or about to be): no second upgrade may start.
    pub fn arms_switch(self) -> bool {
        matches!(self, Phase::Installed | Phase::Switched)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpgradeState {
    pub phase: Phase,
    #[serde(rename = "predownloadAt")]
    pub predownload_at: i64,
    #[serde(rename = "targetSlot")]
    pub target_slot: Option<String>,
    #[serde(rename = "fromSlot")]
    pub from_slot: Option<String>,
    #[serde(rename = "fromVersion")]
    pub from_version: Option<String>,
    #[serde(rename = "bootId")]
    pub boot_id: Option<String>,
}

/// Longest time ahead a window may end (an upgrade that would wait longer is
/// refused rather than kept waiting for years).
const MAX_WINDOW_AHEAD_SECS: i64 = 366 * 86400;

/// Draws the pre-download time inside `window` (unix secs); no window means
/// now. A window whose width does not fit in 64 bits or that ends more than
/// a year after `now` is refused (it used to wrap and panic).
pub fn draw_predownload(window: Option<Window>, now: i64) -> Result<i64> {
    let Some(w) = window else { return Ok(now) };
    if w.start.max(w.end) > now.saturating_add(MAX_WINDOW_AHEAD_SECS) {
        bail!(
            "upgrade window {}..{} lies more than a year after now ({now}); refused, nothing was downloaded",
            w.start,
            w.end
        );
    }
    if w.end <= w.start {
        return Ok(w.start);
    }
    let width = w.end.checked_sub(w.start).with_context(|| {
        format!(
            "upgrade window {}..{} is wider than the clock can count; refused, nothing was downloaded",
            w.start, w.end
        )
    })?;
    // start + [0, width] stays within [start, end]: no overflow
    Ok(w.start + fastrand::i64(0..=width))
}

/// Longest time ahead a `switchAt` may lie: the installed slot waits for it
/// with its switch armed, and while it waits no other upgrade can start, so a
/// far-future (or mistyped) time would block every later upgrade.
const MAX_SWITCH_AHEAD_SECS: i64 = 31 * 86400;

/// Refuses a `switchAt` more than [`MAX_SWITCH_AHEAD_SECS`] after now (before
/// anything is downloaded or saved). One in the past switches at once.
pub fn check_switch_at(switch_at: Option<i64>, now: i64) -> Result<()> {
    if let Some(at) = switch_at {
        if at > now.saturating_add(MAX_SWITCH_AHEAD_SECS) {
            bail!(
                "switchAt {at} lies more than {} days after now ({now}): the installed slot would wait for it and block every later upgrade; refused, nothing was downloaded",
                MAX_SWITCH_AHEAD_SECS / 86400
            );
        }
    }
    Ok(())
}

pub fn boot_id(agent: &Agent) -> String {
    std::fs::read_to_string(&agent.cfg.upgrade.boot_id_file)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn sleep_until(at: i64) {
    loop {
        let now = now_secs();
        if now >= at {
            return;
        }
        std::thread::sleep(Duration::from_secs(at.saturating_sub(now).min(60) as u64));
    }
}

/// [`sleep_until`] that ends early, with [`cancel::Canceled`], when the
/// backend cancels the task (checked every second).
fn wait_until(agent: &Agent, task_id: &str, at: i64) -> Result<()> {
    loop {
        cancel::check(agent, task_id, "scheduled")?;
        let now = now_secs();
        if now >= at {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The switch is armed: the next boot tries the new slot whatever happens
/// now, so a failed reboot command does not fail the task; it finishes after
/// the next boot, whoever triggers it.
fn reboot_or_wait(agent: &Agent, task_id: &str) {
    if let Err(e) = agent.engine.reboot() {
        log::error!(
            "upgrade {task_id}: reboot failed ({e:#}); the new slot is armed and will be \
             checked after the next boot"
        );
    }
}

pub(super) fn run(agent: &Agent, t: &TaskRow, body: &Body, _resumed: bool) -> Result<Outcome> {
    let key = format!("upgrade:{}", t.task_id);
    let save = |s: &UpgradeState| -> Result<()> {
        agent
            .journal
            .kv_set(&key, &serde_json::to_string(s)?)
            .with_context(|| format!("saving the state of upgrade {}", t.task_id))
    };
    let version = body.version.clone();
    for (k, v) in agent.journal.kv_prefix("upgrade:")? {
        let other: Option<UpgradeState> = serde_json::from_str(&v).ok();
        if k != key && other.is_some_and(|o| o.phase.arms_switch()) {
            bail!(
                "another upgrade ({}) has armed a slot switch and waits for its reboot",
                k.trim_start_matches("upgrade:")
            );
        }
    }
    let mut st: UpgradeState = match agent.journal.kv_get(&key)? {
        Some(s) => serde_json::from_str(&s).with_context(|| {
            format!("reading the persisted state of upgrade {} ({s})", t.task_id)
        })?,
        None => {
            // everything that can refuse the task runs before the first save
            check_switch_at(body.switch_at, now_secs())?;
            let s = UpgradeState {
                phase: Phase::Scheduled,
                predownload_at: draw_predownload(body.window, now_secs())?,
                target_slot: None,
                from_slot: None,
                from_version: None,
                boot_id: None,
            };
            save(&s)?;
            log::info!(
                "upgrade {}: pre-download at {} (unix)",
                t.task_id,
                s.predownload_at
            );
            s
        }
    };
    let bundle_path = agent
        .cfg
        .data_dir
        .join("downloads")
        .join(format!("upgrade-{}.bundle", safe_name(&version)));

    if st.phase == Phase::Scheduled {
        wait_until(agent, &t.task_id, st.predownload_at)?;
        let bundle = fetch_to(agent, &body.source, &bundle_path)?;
        agent
            .engine
            .bundle_verify(&bundle)
            .context("verifying bundle signature")?;
        st.phase = Phase::Downloaded;
        save(&st)?;
        progress(agent, t, Progress::Staged);
    }
    if st.phase == Phase::Downloaded {
        // the engine writes from here on: a cancel is refused after this
        cancel::pass_point_of_no_return(agent, &t.task_id)?;
        progress(agent, t, Progress::Installing);
        let before = agent.engine.slot_status().context("reading slot status")?;
        st.from_slot = before.booted.map(|b| b.name().to_string());
        st.from_version = before.version.clone();
        let report = agent
            .engine
            .slot_install(&bundle_path)
            .context("installing into the inactive slot")?;
        st.target_slot = Some(report.slot.name().to_string());
        st.phase = Phase::Installed;
        save(&st)?;
    }
    if st.phase == Phase::Installed {
        if let Some(at) = body.switch_at {
            sleep_until(at);
        }
        let target = st.target_slot.clone().context("no target slot recorded")?;
        let slot = Slot::parse(&target)
            .with_context(|| format!("recorded target slot {target:?} is not a or b"))?;
        agent.engine.slot_switch(slot).context("switching slots")?;
        st.phase = Phase::Switched;
        st.boot_id = Some(boot_id(agent));
        save(&st)?;
        let _ = std::fs::remove_file(&bundle_path);
        log::info!(
            "upgrade {}: switched to slot {target}, rebooting",
            t.task_id
        );
        reboot_or_wait(agent, &t.task_id);
        return Ok(Outcome::Suspended);
    }
    if st.phase == Phase::Switched {
        if st.boot_id.as_deref() == Some(boot_id(agent).as_str()) {
            log::info!(
                "upgrade {}: still the same boot; rebooting again",
                t.task_id
            );
            reboot_or_wait(agent, &t.task_id);
            return Ok(Outcome::Suspended);
        }
        let now = agent
            .engine
            .slot_status()
            .context("reading slot status after reboot")?;
        let target = st.target_slot.clone().unwrap_or_default();
        let on_target = now.booted.is_some()
            && now.booted == Slot::parse(&target)
            && !now.last_boot_was_fallback;
        if !on_target {
            st.phase = Phase::RolledBack;
            save(&st)?;
            return Ok(Outcome::Failed(
                format!(
                    "rolled back: running slot {} version {} instead of slot {target} version {version}",
                    now.booted.map_or("unknown", |b| b.name()),
                    now.version.as_deref().unwrap_or("unknown")
                ),
                json!({
                    "status": "rolled back",
                    "runningSlot": now.booted,
                    "runningVersion": now.version,
                    "wantedVersion": version,
                    "wantedSlot": target,
                    // what GRUB did: the slot it gave up on and the tries it spent
                    "fallbackFrom": now.fallback_from,
                    "fallbackTriesUsed": now.fallback_tries_used,
                }),
            ));
        }
        // The engine owns the health decision: `dualroot slot health-check`
        // (dualroot-confirm.service) runs health.toml's checks, this agent's
        // `check-services` among them, and confirms the slot. Wait for that.
        // Monotonic: a clock step (NTP after boot) must not cut or stretch it.
        let started = std::time::Instant::now();
        let limit = Duration::from_secs(agent.cfg.upgrade.health_timeout_secs);
        let confirmed = loop {
            let s = agent.engine.slot_status().context("reading slot status")?;
            if s.booted_good() {
                break true;
            }
            if started.elapsed() >= limit {
                break false;
            }
            std::thread::sleep(Duration::from_secs(
                agent.cfg.upgrade.health_timeout_secs.clamp(1, 5),
            ));
        };
        if !confirmed {
            let unhealthy = unhealthy_services(agent);
            st.phase = Phase::Unhealthy;
            save(&st)?;
            return Ok(Outcome::Failed(
                format!(
                    "new slot {target} is up but its health check did not confirm it within {} s{}; \
                     GRUB falls back when its tries are used up",
                    agent.cfg.upgrade.health_timeout_secs,
                    if unhealthy.is_empty() {
                        String::new()
                    } else {
                        format!(" (services not healthy: {})", unhealthy.join(", "))
                    }
                ),
                json!({"status": "unconfirmed", "runningSlot": now.booted, "runningVersion": now.version, "unhealthyServices": unhealthy}),
            ));
        }
        st.phase = Phase::Confirmed;
        save(&st)?;
        return Ok(Outcome::Done(json!({
            "status": "upgraded",
            "slot": target,
            "version": now.version.unwrap_or(version),
            "previousVersion": st.from_version,
        })));
    }
    bail!(
        "upgrade {} is already finished (phase {:?}); nothing to do",
        t.task_id,
        st.phase
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predownload_in_window() {
        for _ in 0..100 {
            let t = draw_predownload(
                Some(Window {
                    start: 1000,
                    end: 2000,
                }),
                5,
            )
            .unwrap();
            assert!((1000..=2000).contains(&t));
        }
        assert_eq!(draw_predownload(None, 5).unwrap(), 5);
        assert_eq!(
            draw_predownload(Some(Window { start: 7, end: 7 }), 5).unwrap(),
            7
        );
    }

    #[test]
    fn far_switch_at_is_refused_before_anything_is_saved() {
        // Issue 23 item 12: an unbounded switchAt held the switch armed and
        // blocked every later upgrade.
        let now = 1_800_000_000;
        let e = check_switch_at(Some(i64::MAX), now)
            .unwrap_err()
            .to_string();
        assert!(e.contains("block every later upgrade"), "{e}");
        assert!(check_switch_at(Some(now + 40 * 86400), now).is_err());
        check_switch_at(Some(now + 7 * 86400), now).unwrap();
        check_switch_at(Some(0), now).unwrap();
        check_switch_at(None, now).unwrap();
    }

    #[test]
    fn absurd_windows_are_refused_not_panicking() {
        let now = 1_767_225_600;
        let e = draw_predownload(
            Some(Window {
                start: -9_000_000_000_000_000_000,
                end: 9_000_000_000_000_000_000,
            }),
            now,
        )
        .unwrap_err();
        assert!(format!("{e}").contains("refused"), "{e}");
        let e = draw_predownload(
            Some(Window {
                start: i64::MIN,
                end: now,
            }),
            now,
        )
        .unwrap_err();
        assert!(format!("{e}").contains("wider"), "{e}");
        assert!(draw_predownload(
            Some(Window {
                start: now,
                end: now + 400 * 86400
            }),
            now
        )
        .is_err());
        assert!(draw_predownload(
            Some(Window {
                start: i64::MAX,
                end: i64::MIN
            }),
            now
        )
        .is_err());
        assert_eq!(
            draw_predownload(
                Some(Window {
                    start: i64::MIN,
                    end: i64::MIN
                }),
                now
            )
            .unwrap(),
            i64::MIN
        );
    }

    #[test]
    fn phases_keep_their_journal_strings() {
        for (p, s) in [
            (Phase::Scheduled, "scheduled"),
            (Phase::Downloaded, "downloaded"),
            (Phase::Installed, "installed"),
            (Phase::Switched, "switched"),
            (Phase::Confirmed, "confirmed"),
            (Phase::RolledBack, "rolled back"),
            (Phase::Unhealthy, "unhealthy"),
            (Phase::Unconfirmed, "unconfirmed"),
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), serde_json::json!(s));
        }
        // a state written by the agent before the enum
        let old = r#"{"phase":"switched","predownloadAt":5,"targetSlot":"b","fromSlot":"a","fromVersion":"11","bootId":"x"}"#;
        let st: UpgradeState = serde_json::from_str(old).unwrap();
        assert_eq!(st.phase, Phase::Switched);
    }
}
