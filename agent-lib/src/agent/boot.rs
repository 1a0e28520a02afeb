//! First boot of a slot that is not marked good yet: confirm and report.

use super::Agent;
use crate::protocol::{self, Status};
use crate::tasks;
use serde_json::json;

impl Agent {
    /// First boot of a slot that is not marked good yet (after a migration,
    /// or an upgrade whose task is gone): check service health, confirm the
    /// slot, and report the running version as a `bootConfirmed` event. An
    /// upgrade task waiting for its reboot confirms by itself.
    pub fn confirm_boot(&self) {
        let st = match self.engine.slot_status() {
            Ok(s) => s,
            Err(e) => {
                log::info!("slot status unavailable, no boot confirmation: {e:#}");
                return;
            }
        };
        // Only a slot booted from a dualroot entry and not yet confirmed.
        if st.booted.is_none() || st.booted_good() {
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
            return;
        }
        let unhealthy = tasks::unhealthy_services(self);
        if !unhealthy.is_empty() {
            log::warn!(
                "slot {} not confirmed: services not healthy ({})",
                st.booted.map_or("?", |b| b.name()),
                unhealthy.join(", ")
            );
            return;
        }
        if let Err(e) = self.engine.slot_confirm() {
            log::error!("confirming the booted slot: {e:#}");
            return;
        }
        log::info!(
            "slot {} confirmed good (version {})",
            st.booted.map_or("?", |b| b.name()),
            st.version.as_deref().unwrap_or("unknown")
        );
        let key = format!("boot-confirmed-{}", tasks::boot_id(self));
        let msg = protocol::result_message(
            &self.device_id,
            &key,
            None,
            "bootConfirmed",
            Status::Done,
            json!({"slot": st.booted, "version": st.version, "firmwareVersion": self.cfg.firmware_version()}),
            None,
            0,
        );
        if let Err(e) = self.journal.enqueue(&key, &self.topics.results, &msg) {
            log::error!("queueing boot confirmation: {e:#}");
        }
        self.wake_outbox();
    }
}
