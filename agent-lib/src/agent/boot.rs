//! A slot's boot, reported once the engine's health check confirmed it.

use super::Agent;
use crate::protocol::{self, Status};
use crate::tasks;
use serde_json::json;

impl Agent {
    /// Reports a slot's boot as a `bootConfirmed` event once the engine's health
    /// check (`dualroot slot health-check`, which runs this agent's
    /// `check-services` through health.toml) has confirmed it; the agent never
    /// confirms a slot itself. An upgrade task waiting for its reboot reports by
    /// itself.
    pub fn confirm_boot(self: &std::sync::Arc<Self>) {
        self.report_migration_refused();
        let st = match self.engine.slot_status() {
            Ok(s) => s,
            Err(e) => {
                log::info!("slot status unavailable, no boot confirmation: {e:#}");
                return;
            }
        };
        if st.booted.is_none() {
            return;
        }
        let upgrade_pending = self
            .journal
            .kv_prefix("upgrade:")
            .unwrap_or_default()
            .iter()
            .filter_map(|(_, v)| serde_json::from_str::<tasks::UpgradeState>(v).ok())
            .any(|u| u.phase == tasks::Phase::Switched);
        if upgrade_pending {
            // the upgrade task reports this boot itself
            return;
        }
        if st.booted_good() {
            self.report_boot_confirmed(&st);
            return;
        }
        // The engine's health check (dualroot-confirm.service) decides; report
        // once it has confirmed the slot.
        let agent = self.clone();
        let timeout = self.cfg.upgrade.health_timeout_secs;
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            while start.elapsed().as_secs() < timeout {
                std::thread::sleep(std::time::Duration::from_secs(timeout.clamp(1, 5)));
                match agent.engine.slot_status() {
                    Ok(s) if s.booted_good() => {
                        agent.report_boot_confirmed(&s);
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => log::info!("slot status unavailable: {e:#}"),
                }
            }
            log::warn!(
                "slot {} was not confirmed by its health check within {timeout} s; not reported as confirmed",
                st.booted.map_or("?", |b| b.name())
            );
        });
    }

    /// Reports this boot's slot and version as a `bootConfirmed` event (once per
    /// boot: the result key carries the boot id).
    fn report_boot_confirmed(&self, st: &crate::engine::SlotStatus) {
        let key = format!("boot-confirmed-{}", tasks::boot_id(self));
        if self.journal.kv_get(&key).ok().flatten().is_some() {
            return; // reported already in this boot (the agent restarted)
        }
        log::info!(
            "slot {} confirmed good (version {})",
            st.booted.map_or("?", |b| b.name()),
            st.version.as_deref().unwrap_or("unknown")
        );
        let msg = protocol::result_message(
            &self.device_id,
            &key,
            None,
            "bootConfirmed",
            Status::Done,
            json!({"slot": st.booted, "version": st.version, "firmwareVersion": self.cfg.firmware_version_with(st.version.as_deref())}),
            None,
            0,
        );
        if let Err(e) = self.journal.enqueue(&key, &self.topics.results, &msg) {
            log::error!("queueing boot confirmation: {e:#}");
            return;
        }
        let _ = self.journal.kv_set(&key, "reported");
        self.wake_outbox();
    }

    /// A migration the engine refused, or undid (a step inside the window kept
    /// failing and the old disk was put back), leaves its reason on the old
    /// system, which then boots again: report it once (keyed by its time) as a
    /// failed `migrationRefused` or `migrationUndone` event with the step, so
    /// the backend learns why the device is still on its old OS and what it
    /// does next.
    fn report_migration_refused(&self) {
        let path = &self.cfg.upgrade.migration_result_file;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                log::warn!("reading {}: {e}", path.display());
                return;
            }
        };
        let r: dualroot_api::MigrationResult =
            match dualroot_api::decode(&path.display().to_string(), &text) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("{e}");
                    return;
                }
            };
        let (kind, event, verb) = match r.outcome {
            dualroot_api::MigrationOutcome::Refused => ("refused", "migrationRefused", "refused"),
            dualroot_api::MigrationOutcome::Undone => ("undone", "migrationUndone", "undone"),
            dualroot_api::MigrationOutcome::Done => return,
        };
        let key = format!("migration-{kind}-{}", r.time_unix as i64);
        if self.journal.kv_get(&key).ok().flatten().is_some() {
            return;
        }
        log::warn!("the migration was {verb}: {}; {}", r.reason, r.next);
        let msg = protocol::result_message(
            &self.device_id,
            &key,
            None,
            event,
            Status::Failed,
            json!({"reason": r.reason, "next": r.next, "step": r.step, "timeUnix": r.time_unix, "firmwareVersion": self.cfg.firmware_version()}),
            Some(&format!("migration {verb}: {}", r.reason)),
            0,
        );
        if let Err(e) = self.journal.enqueue(&key, &self.topics.results, &msg) {
            log::error!("queueing the migration {verb} report: {e:#}");
            return;
        }
        let _ = self.journal.kv_set(&key, "reported");
        self.wake_outbox();
    }
}
