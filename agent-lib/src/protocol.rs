//! Wire format: topics, task messages, result messages. Pure functions.

use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const TASK_TYPES: &[&str] = &[
    "upgrade",
    "migrate",
    "installService",
    "uninstallService",
    "heartbeat",
    "collectLogs",
    "register",
];

/// Task type accepted only with `debug.test_tasks = true`: sleeps `body.ms`
/// and appends its taskId to `body.marker` (tests and benchmark).
pub const TEST_TASK: &str = "test.sleep";

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

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TaskMsg {
    #[serde(rename = "taskId")]
    pub task_id: String,
    #[serde(rename = "taskType")]
    pub task_type: String,
    #[serde(default)]
    pub body: Value,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Done,
    Failed,
    Rejected,
    InProgress,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Rejected => "rejected",
            Status::InProgress => "in_progress",
        }
    }
}

/// Builds a result message. `ackKey` is what the backend sends back on the
/// acks topic (`{"taskId": ackKey}`).
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
) -> String {
    json!({
        "deviceId": device_id,
        "taskId": task_id,
        "ackKey": ack_key,
        "taskType": task_type,
        "status": status.as_str(),
        "result": result,
        "error": error,
        "attempt": attempt,
        "run": format!("{:016x}", fastrand::u64(..)),
        "at": crate::journal::now_ms(),
    })
    .to_string()
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
        assert_eq!(
            parse_ack(br#"[{"ackKey":"b"},{"taskId":"c"}]"#),
            vec!["b", "c"]
        );
        assert!(parse_ack(b"zzz").is_empty());
    }
}
