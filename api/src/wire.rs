//! The MQTT contract between the agent and its backend (the fleet controller,
//! or anyone else): topics, task messages, result messages, acks, the
//! heartbeat answer, progress and cancel. Both programs build and read these
//! types; nothing here does I/O.
//!
//! Versions ([`PROTOCOL_VERSION`], sent in the heartbeat as `protocol`):
//! - 1: tasks, results, acks, heartbeats, `bootConfirmed`, `migrationRefused`.
//! - 2: the heartbeat carries `bootId` and `protocol`; `progress` results
//!   (`result.state`: `staged`, `installing`) for long tasks; the `cancel`
//!   task and the `canceled` status.
//!
//! Every addition is optional on the wire: a version-1 backend acks a
//! `progress` or `canceled` result like any other and ignores its unknown
//! status; a version-1 agent rejects a `cancel` task as an unknown type
//! (which the backend records as "cannot cancel").

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub const PROTOCOL_VERSION: u32 = 2;

pub const TASK_TYPES: &[&str] = &[
    "upgrade",
    "migrate",
    "installService",
    "uninstallService",
    "heartbeat",
    "collectLogs",
    "register",
    CANCEL_TASK,
];

/// Task type accepted only with `debug.test_tasks = true`: sleeps `body.ms`
/// and appends its taskId to `body.marker` (tests and benchmark).
pub const TEST_TASK: &str = "test.sleep";

/// `{"taskType": "cancel", "body": {"taskId": <the task to cancel>}}`
/// (protocol 2). The target task ends with status `canceled` when it had not
/// reached its point of no return; the cancel task itself ends `done` with a
/// [`CancelReport`] either way (`canceled: false` and the reason when it was
/// too late).
pub const CANCEL_TASK: &str = "cancel";

/// The taskId the backend gives the cancel of `task_id` (one per target, so
/// a repeated cancel is a duplicate the agent answers from its journal).
pub fn cancel_task_id(task_id: &str) -> String {
    format!("cancel-{task_id}")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelBody {
    pub task_id: String,
}

/// The result of a `cancel` task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelReport {
    pub task_id: String,
    pub canceled: bool,
    /// Where the target task was: `queued`, `scheduled`, `downloading`,
    /// `staged`, `installing` and later, `finished`, `unknown`.
    pub phase: String,
    /// Why it could not be canceled (when `canceled` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Phases a long task reports with a `progress` result (protocol 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Progress {
    /// The download finished and was verified; nothing was written yet.
    Staged,
    /// The engine starts writing (slot install, migration stage): the point
    /// of no return for a cancel.
    Installing,
}

impl Progress {
    pub fn name(self) -> &'static str {
        match self {
            Progress::Staged => "staged",
            Progress::Installing => "installing",
        }
    }

    /// The ackKey of a task's progress report (one per phase).
    pub fn ack_key(self, task_id: &str) -> String {
        format!("{task_id}#{}", self.name())
    }
}

#[derive(Debug, Clone)]
pub struct Topics {
    pub tasks: String,
    pub results: String,
    pub heartbeat: String,
    pub acks: String,
}

impl Topics {
    pub fn new(prefix: &str, device_id: &str) -> Topics {
        let base = format!("{prefix}/{device_id}");
        Topics {
            tasks: format!("{base}/tasks"),
            results: format!("{base}/results"),
            heartbeat: format!("{base}/heartbeat"),
            acks: format!("{base}/acks"),
        }
    }

    /// Topic a task type's results are published on.
    pub fn result_topic(&self, task_type: &str) -> &str {
        if task_type == "heartbeat" {
            &self.heartbeat
        } else {
            &self.results
        }
    }
}

/// A task message on `<prefix>/<device>/tasks`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskMsg {
    #[serde(rename = "taskId")]
    pub task_id: String,
    #[serde(rename = "taskType")]
    pub task_type: String,
    #[serde(default)]
    pub body: Value,
}

impl TaskMsg {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a task message serializes")
    }
}

#[derive(Debug, PartialEq)]
pub enum Parsed {
    Task(TaskMsg),
    /// Refused before journaling as a runnable task. `key` is the taskId
    /// when one could be read, else a hash of the payload.
    Reject {
        key: String,
        task_id: Option<String>,
        task_type: String,
        reason: String,
    },
}

#[derive(Deserialize)]
struct Loose {
    #[serde(rename = "taskId")]
    task_id: Option<Value>,
    #[serde(rename = "taskType")]
    task_type: Option<Value>,
}

fn payload_key(payload: &[u8]) -> String {
    let h = Sha256::digest(payload);
    format!("invalid-{}", hex::encode(&h[..8]))
}

/// Validates an incoming task message.
pub fn parse_task(payload: &[u8], max_payload: usize, test_tasks: bool) -> Parsed {
    let loose: Option<Loose> = serde_json::from_slice(payload).ok();
    let task_id = loose
        .as_ref()
        .and_then(|l| l.task_id.as_ref())
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty() && s.len() <= 200)
        .map(str::to_string);
    let task_type = loose
        .as_ref()
        .and_then(|l| l.task_type.as_ref())
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .chars()
        .take(64)
        .collect::<String>();
    let reject = |reason: String| Parsed::Reject {
        key: task_id.clone().unwrap_or_else(|| payload_key(payload)),
        task_id: task_id.clone(),
        task_type: task_type.clone(),
        reason,
    };
    if payload.len() > max_payload {
        return reject(format!(
            "payload too large: {} bytes > limit {} bytes",
            payload.len(),
            max_payload
        ));
    }
    let msg: TaskMsg = match serde_json::from_slice(payload) {
        Ok(m) => m,
        Err(e) => return reject(format!("malformed task message: {e}")),
    };
    if msg.task_id.is_empty() || msg.task_id.len() > 200 {
        return reject("taskId must be 1..200 characters".into());
    }
    let known =
        TASK_TYPES.contains(&msg.task_type.as_str()) || (test_tasks && msg.task_type == TEST_TASK);
    if !known {
        return reject(format!("unknown task type {:?}", msg.task_type));
    }
    Parsed::Task(msg)
}

/// Status of a result message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Done,
    Failed,
    Rejected,
    /// A duplicate of a task the agent has (`result.state`: `queued`,
    /// `running`); not kept, not acked.
    InProgress,
    /// A long task reached a phase (`result.state`: a [`Progress`]); kept
    /// and republished until acked (protocol 2).
    Progress,
    /// The task was canceled by a `cancel` task before its point of no
    /// return (protocol 2).
    Canceled,
    /// A status from a newer agent (read only).
    #[serde(other)]
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Rejected => "rejected",
            Status::InProgress => "in_progress",
            Status::Progress => "progress",
            Status::Canceled => "canceled",
            Status::Unknown => "unknown",
        }
    }
}

/// A result message on `<prefix>/<device>/results` (or `/heartbeat` for
/// heartbeat answers). `ackKey` is what the backend sends back on the acks
/// topic (`{"taskId": ackKey}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultMsg {
    pub device_id: String,
    pub task_id: Option<String>,
    pub ack_key: String,
    pub task_type: String,
    pub status: Status,
    #[serde(default)]
    pub result: Value,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub attempt: u32,
    /// Random per message build: tells a republished copy from a second run.
    #[serde(default)]
    pub run: String,
    /// The agent's clock when it built the message (unix ms).
    #[serde(default)]
    pub at: Option<i64>,
}

impl ResultMsg {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a result message serializes")
    }
}

/// Builds a result message at `at_ms` (the sender's clock) with a fresh `run`.
#[allow(clippy::too_many_arguments)]
pub fn result_message(
    device_id: &str,
    ack_key: &str,
    task_id: Option<&str>,
    task_type: &str,
    status: Status,
    result: Value,
    error: Option<&str>,
    attempt: u32,
    at_ms: i64,
) -> String {
    ResultMsg {
        device_id: device_id.into(),
        task_id: task_id.map(str::to_string),
        ack_key: ack_key.into(),
        task_type: task_type.into(),
        status,
        result,
        error: error.map(str::to_string),
        attempt,
        run: format!("{:016x}", fastrand::u64(..)),
        at: Some(at_ms),
    }
    .to_json()
}

/// The backend's ack of a result: `{"taskId": ackKey}`.
pub fn ack_message(ack_key: &str) -> String {
    serde_json::json!({ "taskId": ack_key }).to_string()
}

/// Reads the key out of an ack message: `{"taskId": "..."}` or `{"ackKey": "..."}`
/// or a list of either.
pub fn parse_ack(payload: &[u8]) -> Vec<String> {
    fn one(v: &Value) -> Option<String> {
        v.get("ackKey")
            .or_else(|| v.get("taskId"))
            .and_then(|k| k.as_str())
            .map(str::to_string)
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Array(items)) => items.iter().filter_map(one).collect(),
        Ok(v) => one(&v).into_iter().collect(),
        Err(_) => Vec::new(),
    }
}

/// The `slot` part of a heartbeat answer: the booted slot (`a`/`b`) and its
/// state, or `booted: "unknown"` with the reason (no A/B layout, no engine).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatSlot {
    #[serde(default)]
    pub booted: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<crate::Slot>,
    /// The last boot was a fallback (`true`/`false`), or `"unknown"`.
    #[serde(default)]
    pub fallback: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_good: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An installed service in a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceReport {
    pub code: String,
    pub version: String,
    /// `healthy`, or what is wrong.
    pub health: String,
}

/// The `result` of a heartbeat answer. Every field is optional when read, so
/// answers of older agents decode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    #[serde(default)]
    pub device_id: String,
    #[serde(default)]
    pub firmware_version: Option<String>,
    #[serde(default)]
    pub agent_version: Option<String>,
    #[serde(default)]
    pub slot: HeartbeatSlot,
    #[serde(default)]
    pub services: Vec<ServiceReport>,
    #[serde(default)]
    pub outbox_pending: u64,
    /// Backend time minus local time at the last HTTPS answer (null: never measured).
    #[serde(default)]
    pub clock_offset_seconds: Option<i64>,
    /// `/proc/sys/kernel/random/boot_id` (protocol 2): a new value is a new boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The sender's [`PROTOCOL_VERSION`] (absent: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
}

impl Heartbeat {
    /// Booted from an A/B slot (not a legacy system, not unknown).
    pub fn ab(&self) -> bool {
        matches!(self.slot.booted.as_deref(), Some("a" | "b"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_from_prefix() {
        let t = Topics::new("dr", "dev1");
        assert_eq!(t.tasks, "dr/dev1/tasks");
        assert_eq!(t.result_topic("heartbeat"), "dr/dev1/heartbeat");
        assert_eq!(t.result_topic("upgrade"), "dr/dev1/results");
        assert_eq!(t.acks, "dr/dev1/acks");
    }

    #[test]
    fn valid_task() {
        let p = parse_task(
            br#"{"taskId":"t1","taskType":"heartbeat","body":{"a":1}}"#,
            1000,
            false,
        );
        let Parsed::Task(m) = p else { panic!("{p:?}") };
        assert_eq!(m.task_id, "t1");
        assert_eq!(m.body["a"], 1);
        let c = TaskMsg {
            task_id: cancel_task_id("t1"),
            task_type: CANCEL_TASK.into(),
            body: serde_json::to_value(CancelBody {
                task_id: "t1".into(),
            })
            .unwrap(),
        };
        let Parsed::Task(back) = parse_task(c.to_json().as_bytes(), 1000, false) else {
            panic!()
        };
        assert_eq!(back, c);
        assert_eq!(back.body["taskId"], "t1");
    }

    #[test]
    fn malformed_json_rejected_with_hash_key() {
        let Parsed::Reject {
            key,
            task_id,
            reason,
            ..
        } = parse_task(b"{not json", 1000, false)
        else {
            panic!()
        };
        assert!(key.starts_with("invalid-"));
        assert!(task_id.is_none());
        assert!(reason.contains("malformed"), "{reason}");
    }

    #[test]
    fn unknown_type_rejected_with_task_id() {
        let p = parse_task(br#"{"taskId":"t9","taskType":"format-disk"}"#, 1000, false);
        let Parsed::Reject { key, reason, .. } = p else {
            panic!()
        };
        assert_eq!(key, "t9");
        assert!(reason.contains("unknown task type"));
        // test task only when enabled
        assert!(matches!(
            parse_task(br#"{"taskId":"t","taskType":"test.sleep"}"#, 1000, false),
            Parsed::Reject { .. }
        ));
        assert!(matches!(
            parse_task(br#"{"taskId":"t","taskType":"test.sleep"}"#, 1000, true),
            Parsed::Task(_)
        ));
    }

    #[test]
    fn oversized_rejected_and_keeps_task_id() {
        let big = format!(
            r#"{{"taskId":"big","taskType":"heartbeat","body":"{}"}}"#,
            "x".repeat(500)
        );
        let Parsed::Reject { key, reason, .. } = parse_task(big.as_bytes(), 100, false) else {
            panic!()
        };
        assert_eq!(key, "big");
        assert!(reason.contains("too large"), "{reason}");
    }

    #[test]
    fn missing_fields_rejected() {
        assert!(matches!(
            parse_task(br#"{"taskType":"heartbeat"}"#, 1000, false),
            Parsed::Reject { .. }
        ));
        assert!(matches!(
            parse_task(br#"{"taskId":"","taskType":"heartbeat"}"#, 1000, false),
            Parsed::Reject { .. }
        ));
    }

    #[test]
    fn acks_parse() {
        assert_eq!(parse_ack(br#"{"taskId":"a"}"#), vec!["a"]);
        assert_eq!(parse_ack(ack_message("k").as_bytes()), vec!["k"]);
        assert_eq!(
            parse_ack(br#"[{"ackKey":"b"},{"taskId":"c"}]"#),
            vec!["b", "c"]
        );
        assert!(parse_ack(b"zzz").is_empty());
    }

    #[test]
    fn result_messages_round_trip_and_unknown_statuses_decode() {
        let m = result_message(
            "d",
            &Progress::Staged.ack_key("t"),
            Some("t"),
            "upgrade",
            Status::Progress,
            serde_json::json!({"state": Progress::Staged}),
            None,
            1,
            5,
        );
        let back: ResultMsg = serde_json::from_str(&m).unwrap();
        assert_eq!(back.status, Status::Progress);
        assert_eq!(back.ack_key, "t#staged");
        assert_eq!(back.result["state"], "staged");
        assert_eq!(back.at, Some(5));
        assert!(m.contains(r#""status":"progress""#), "{m}");
        assert!(m.contains(r#""status":"progress""#));
        let m = m.replace(r#""status":"progress""#, r#""status":"teleported""#);
        let back: ResultMsg = serde_json::from_str(&m).unwrap();
        assert_eq!(back.status, Status::Unknown);
        // what a version-1 agent sent (no run/at/attempt needed to read it)
        let old: ResultMsg = serde_json::from_str(
            r#"{"deviceId":"d","taskId":null,"ackKey":"k","taskType":"bootConfirmed","status":"done"}"#,
        )
        .unwrap();
        assert_eq!(old.status, Status::Done);
        assert_eq!(Status::InProgress.as_str(), "in_progress");
        assert_eq!(
            serde_json::to_value(Status::InProgress).unwrap(),
            "in_progress"
        );
    }

    #[test]
    fn heartbeats_of_old_agents_decode() {
        let old = serde_json::json!({"deviceId": "d", "firmwareVersion": "1", "agentVersion": "0.1.0",
            "slot": {"booted": "unknown", "fallback": "unknown", "reason": "no engine"},
            "services": [], "outboxPending": 0, "clockOffsetSeconds": null});
        let h: Heartbeat = serde_json::from_value(old).unwrap();
        assert!(!h.ab());
        assert_eq!(h.boot_id, None);
        assert_eq!(h.protocol, None);
        let new = Heartbeat {
            device_id: "d".into(),
            slot: HeartbeatSlot {
                booted: Some("b".into()),
                primary: Some(crate::Slot::B),
                fallback: Value::Bool(false),
                booted_good: Some(true),
                version: Some("13".into()),
                reason: None,
            },
            boot_id: Some("b-1".into()),
            protocol: Some(PROTOCOL_VERSION),
            ..Default::default()
        };
        let v = serde_json::to_value(&new).unwrap();
        assert_eq!(v["bootId"], "b-1");
        assert_eq!(v["slot"]["primary"], "b");
        assert_eq!(v["slot"]["bootedGood"], true);
        let back: Heartbeat = serde_json::from_value(v).unwrap();
        assert_eq!(back, new);
        assert!(back.ab());
    }
}
