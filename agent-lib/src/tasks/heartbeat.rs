//! `heartbeat`: firmware version, slot state and service health.

use crate::agent::Agent;
use crate::cmd;
use crate::protocol::{Heartbeat, HeartbeatSlot, ServiceReport, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The `slot` part of a heartbeat, from the one `dualroot slot status` the
/// heartbeat also takes its firmware version from: "unknown" (with the
/// reason) when the engine is missing or its answer cannot be read.
fn slot_report(agent: &Agent, status: &anyhow::Result<crate::engine::SlotStatus>) -> HeartbeatSlot {
    match status {
        Ok(s) => HeartbeatSlot {
            booted: Some(s.booted.map_or("unknown", |b| b.name()).into()),
            primary: Some(s.primary),
            fallback: Value::Bool(s.last_boot_was_fallback),
            booted_good: Some(s.booted_good()),
            version: s.version.clone(),
            reason: None,
        },
        Err(e) => {
            let reason = if cmd::is_not_found(e) {
                format!("{} not installed", agent.cfg.dualroot_bin)
            } else {
                format!("{e:#}").chars().take(300).collect()
            };
            HeartbeatSlot {
                booted: Some("unknown".into()),
                fallback: json!("unknown"),
                reason: Some(reason),
                ..Default::default()
            }
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

/// The heartbeat answer (`dualroot_api::wire::Heartbeat`, what the backend decodes).
pub fn heartbeat(agent: &Agent) -> Value {
    let services = installed_services(agent)
        .into_iter()
        .map(|(code, s)| ServiceReport {
            health: agent.services.health(&code),
            code,
            version: s.version,
        })
        .collect();
    let status = agent.engine.slot_status();
    let slot_version = status.as_ref().ok().and_then(|s| s.version.as_deref());
    let boot_id = super::boot_id(agent);
    let hb = Heartbeat {
        device_id: agent.device_id.clone(),
        firmware_version: Some(agent.cfg.firmware_version_with(slot_version)),
        agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        slot: slot_report(agent, &status),
        services,
        outbox_pending: agent.journal.outbox_len().unwrap_or(0) as u64,
        // Backend time minus local time at the last HTTPS answer (null: never measured).
        clock_offset_seconds: crate::clock::last(&agent.cfg).map(|o| o.offset_secs),
        // a new value after the backend sent a task proves the reboot
        boot_id: (!boot_id.is_empty()).then_some(boot_id),
        protocol: Some(PROTOCOL_VERSION),
    };
    serde_json::to_value(hb).expect("a heartbeat serializes")
}
