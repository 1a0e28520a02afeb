//! Controller settings: topic prefix, heartbeat interval, per-phase
//! deadlines, retry policy, register tokens.

use crate::tasks::state::TaskState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// MQTT topic prefix, the agent's `mqtt.topic_prefix`.
    pub topic_prefix: String,
    /// A heartbeat task goes to every device this often; a device that
    /// answered none of the last 3 is offline.
    pub heartbeat_interval_ms: i64,
    /// An offline device gets a heartbeat task only every this many intervals.
    pub offline_probe_intervals: i64,
    /// A queued task nobody answered is sent again this often ...
    pub resend_interval_ms: i64,
    /// ... this many times, then it times out.
    pub max_resends: i64,
    /// Deadlines of the phases the device reports, from when the phase began
    /// (or when the task's window opens, whichever is later).
    pub acked_timeout_ms: i64,
    pub download_timeout_ms: i64,
    pub install_timeout_ms: i64,
    pub reboot_timeout_ms: i64,
    pub verify_timeout_ms: i64,
    /// Attempts of one task (a retryable failure starts the next one).
    pub max_attempts: i64,
    /// Backoff before attempt n+1: `retry_backoff_ms * 2^(n-1)`.
    pub retry_backoff_ms: i64,
    /// After this many failures in a row a device waits `penalty_ms` more
    /// before each retry.
    pub penalty_after: i64,
    pub penalty_ms: i64,
    /// Register token → labels given to the devices that register with it.
    pub register_tokens: BTreeMap<String, BTreeMap<String, String>>,
    /// Lifetime of a device token.
    pub token_lifetime_s: i64,
    /// ackKeys of results are remembered this long (a copy the agent sends
    /// again within it is acked and not applied twice); sent outbox rows are
    /// kept a day.
    pub dedup_keep_ms: i64,
    /// The ticker lease's lifetime: another controller takes over this long
    /// after the holder stopped renewing it (it renews on every tick).
    pub lease_ttl_ms: i64,
    /// Bearer token the operator API (`/api/v1`) requires, when set.
    pub operator_token: Option<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            topic_prefix: "dualroot".into(),
            heartbeat_interval_ms: 5 * MIN,
            offline_probe_intervals: 12,
            resend_interval_ms: 5 * MIN,
            max_resends: 3,
            acked_timeout_ms: 2 * HOUR,
            download_timeout_ms: 6 * HOUR,
            install_timeout_ms: HOUR,
            reboot_timeout_ms: 30 * MIN,
            verify_timeout_ms: 30 * MIN,
            max_attempts: 3,
            retry_backoff_ms: 5 * MIN,
            penalty_after: 3,
            penalty_ms: HOUR,
            register_tokens: BTreeMap::new(),
            token_lifetime_s: 7 * 86_400,
            dedup_keep_ms: 7 * 24 * HOUR,
            lease_ttl_ms: 15_000,
            operator_token: None,
        }
    }
}

impl Config {
    /// Deadline of a phase, from its start; `None`: no deadline (waiting to be
    /// sent, or ended).
    pub fn phase_timeout_ms(&self, s: TaskState) -> Option<i64> {
        use TaskState as S;
        match s {
            S::Queued => Some(self.resend_interval_ms),
            S::Acked => Some(self.acked_timeout_ms),
            S::Downloading | S::Staged => Some(self.download_timeout_ms),
            S::Installing => Some(self.install_timeout_ms),
            S::Rebooting => Some(self.reboot_timeout_ms),
            S::Verifying => Some(self.verify_timeout_ms),
            _ => None,
        }
    }

    pub fn offline_after_ms(&self) -> i64 {
        3 * self.heartbeat_interval_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_file_sets_what_it_names_and_refuses_typos() {
        let c: Config = toml::from_str(
            "topic_prefix = \"va\"\nheartbeat_interval_ms = 60000\n\
             [register_tokens.factory-2026]\nsite = \"berlin\"\n",
        )
        .unwrap();
        assert_eq!(c.topic_prefix, "va");
        assert_eq!(c.offline_after_ms(), 180_000);
        assert_eq!(c.register_tokens["factory-2026"]["site"], "berlin");
        assert_eq!(c.max_attempts, Config::default().max_attempts);
        let e = toml::from_str::<Config>("heartbeat_interval = 1").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
