//! `heartbeat`: firmware version, slot state and service health.

use crate::agent::Agent;
use crate::cmd;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The `slot` part of a heartbeat, from the one `dualroot slot status` the
/// heartbeat also takes its firmware version from: "unknown" (with the
/// reason) when the engine is missing or its answer cannot be read.
fn slot_report(agent: &Agent, status: &anyhow::Result<crate::engine::SlotStatus>) -> Value {
    match status {
        Ok(s) => json!({
            "booted": s.booted.map_or("unknown", |b| b.name()),
            "primary": s.primary,
            "fallback": s.last_boot_was_fallback,
            "bootedGood": s.booted_good(),
            "version": s.version,
        }),
        Err(e) => {
            let reason = if cmd::is_not_found(e) {
                format!("{} not installed", agent.cfg.dualroot_bin)
            } else {
                format!("{e:#}").chars().take(300).collect()
            };
            json!({"booted": "unknown", "fallback": "unknown", "reason": reason})
        }
    }
}

/// What the journal's kv `service:<namespace>` holds for an installed service.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct InstalledService {
    pub version: String,
    #[serde(rename = "installedAt")]
    pub installed_at: i64,
}

pub(super) fn installed_services(agent: &Agent) -> Vec<(String, InstalledService)> {
    agent
        .journal
        .kv_prefix("service:")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| {
            Some((
                k.strip_prefix("service:")?.to_string(),
                serde_json::from_str(&v).ok()?,
            ))
        })
        .collect()
}

/// Installed services whose health is not "healthy", as "code: health".
pub fn unhealthy_services(agent: &Agent) -> Vec<String> {
    installed_services(agent)
        .into_iter()
        .map(|(code, _)| (agent.services.health(&code), code))
        .filter(|(h, _)| h != "healthy")
        .map(|(h, code)| format!("{code}: {h}"))
        .collect()
}

pub fn heartbeat(agent: &Agent) -> Value {
    let services: Vec<Value> = installed_services(agent)
        .into_iter()
        .map(|(code, s)| json!({"code": code, "version": s.version, "health": agent.services.health(&code)}))
        .collect();
    let status = agent.engine.slot_status();
    let slot_version = status.as_ref().ok().and_then(|s| s.version.as_deref());
    json!({
        "deviceId": agent.device_id,
        "firmwareVersion": agent.cfg.firmware_version_with(slot_version),
        "agentVersion": env!("CARGO_PKG_VERSION"),
        "slot": slot_report(agent, &status),
        "services": services,
        "outboxPending": agent.journal.outbox_len().unwrap_or(0),
        // Backend time minus local time at the last HTTPS answer (null: never measured).
        "clockOffsetSeconds": crate::clock::last(&agent.cfg).map(|o| o.offset_secs),
    })
}
