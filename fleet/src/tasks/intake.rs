//! What devices send: result messages on `<prefix>/<id>/results` and
//! heartbeat answers on `<prefix>/<id>/heartbeat`, as the agent writes them
//! (agent-lib `protocol::result_message`). Each is applied once per ackKey and
//! acked through the outbox in the same transaction; a repeat is acked again
//! and changes nothing. `in_progress` answers are neither recorded nor acked
//! (the agent does not keep them).

use super::{apply, by_wire_id, get, kind, Event, Kind, Task, TaskState};
use crate::config::Config;
use crate::store::Tx;
use crate::{devices, outbox, params};
use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultMsg {
    pub device_id: String,
    pub task_id: Option<String>,
    pub ack_key: String,
    pub task_type: String,
    pub status: String,
    #[serde(default)]
    pub result: Value,
    pub error: Option<String>,
    /// The agent's clock when it built the message (ms).
    #[serde(default)]
    pub at: Option<i64>,
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Intake {
    /// Applied; the task's new state when one changed.
    Applied(Option<TaskState>),
    /// Same ackKey as before: acked again, nothing else.
    Duplicate,
    /// Not applied, and why.
    Ignored(String),
}

/// The device a topic belongs to: `<prefix>/<id>/results|heartbeat`.
pub fn topic_device<'a>(cfg: &Config, topic: &'a str) -> Option<&'a str> {
    let rest = topic.strip_prefix(&cfg.topic_prefix)?.strip_prefix('/')?;
    let (dev, leaf) = rest.split_once('/')?;
    matches!(leaf, "results" | "heartbeat").then_some(dev)
}

/// Errors after which another attempt cannot help: refusals the agent makes
/// before doing anything (bad body, URL policy, window, hash, signature).
pub fn retryable(error: &str) -> bool {
    const PERMANENT: &[&str] = &[
        "refused",
        "bad body",
        "not allowed",
        "mismatch",
        "signature",
        "needs `plan`",
        "needs `planSignature`",
        "checking the task's plan",
        "health check",
    ];
    !PERMANENT.iter().any(|p| error.contains(p))
}

pub fn ingest(tx: &mut Tx, cfg: &Config, now: i64, topic: &str, payload: &[u8]) -> Result<Intake> {
    let Some(dev) = topic_device(cfg, topic) else {
        return Ok(Intake::Ignored(format!("not a device topic: {topic}")));
    };
    let msg: ResultMsg = match serde_json::from_slice(payload) {
        Ok(m) => m,
        Err(e) => {
            return Ok(Intake::Ignored(format!(
                "unreadable message on {topic}: {e}"
            )))
        }
    };
    // The topic is what the broker's ACL binds to the device's credentials.
    if msg.device_id != dev {
        return Ok(Intake::Ignored(format!(
            "message on {topic} names device {}; ignored",
            msg.device_id
        )));
    }
    let Some(device) = devices::get_locked(tx, cfg, now, dev)? else {
        return Ok(Intake::Ignored(format!("unknown device {dev}")));
    };
    // a heartbeat answer records the sign of life with its facts (one write)
    let facts = msg.task_type == "heartbeat" && msg.status == "done";
    if !facts {
        devices::seen(tx, cfg, now, &device)?;
    }
    if msg.status == "in_progress" {
        return in_progress(tx, cfg, now, &msg);
    }
    let fresh = tx.exec(
        "INSERT INTO results_seen (ack_key, device_id, status, received_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (device_id, ack_key) DO NOTHING",
        params![&msg.ack_key, dev, &msg.status, now],
    )? == 1;
    outbox::enqueue(
        tx,
        now,
        &super::topic(cfg, dev, "acks"),
        &json!({"taskId": msg.ack_key}).to_string(),
        None,
    )?;
    if !fresh {
        if facts {
            devices::seen(tx, cfg, now, &device)?;
        }
        return Ok(Intake::Duplicate);
    }
    match msg.task_type.as_str() {
        "heartbeat" => {
            if facts && devices::heartbeat(tx, cfg, now, &device, &msg.result, msg.at)?.is_none() {
                return Ok(Intake::Ignored(format!(
                    "heartbeat {} is older than the newest one applied, or unreadable",
                    msg.ack_key
                )));
            }
            Ok(Intake::Applied(None))
        }
        "bootConfirmed" => {
            let boot_id = msg
                .ack_key
                .strip_prefix("boot-confirmed-")
                .unwrap_or(&msg.ack_key);
            devices::boot_confirmed(tx, now, dev, boot_id, &msg.result)?;
            let mut last = None;
            for t in super::active_for_device(tx, dev)? {
                if let Some(s) = check_boot(tx, cfg, now, &t)? {
                    last = Some(s);
                }
            }
            Ok(Intake::Applied(last))
        }
        // the old system is back: refused before the point of no return, or
        // undone inside the window (the old disk put back)
        "migrationRefused" | "migrationUndone" => {
            let Some(t) = super::active(tx, dev, "migrate")? else {
                return Ok(Intake::Ignored(format!(
                    "{} on {dev} but no migrate task is active",
                    msg.task_type
                )));
            };
            let why = msg
                .error
                .clone()
                .unwrap_or_else(|| format!("{} without a reason", msg.task_type));
            store_result(tx, &t, &msg)?;
            let ev = Event::DeviceFailed {
                retry: false,
                rolled_back: false,
            };
            Ok(Intake::Applied(apply(tx, cfg, now, &t, &ev, &why)?))
        }
        _ => task_result(tx, cfg, now, &msg),
    }
}

/// Forgets ackKeys received before `before`.
pub fn prune(tx: &mut Tx, before: i64) -> Result<u64> {
    tx.exec(
        "DELETE FROM results_seen WHERE received_at < $1",
        params![before],
    )
}

fn in_progress(tx: &mut Tx, cfg: &Config, now: i64, msg: &ResultMsg) -> Result<Intake> {
    let Some(t) = current_task(tx, msg)? else {
        return Ok(Intake::Ignored(format!(
            "in_progress for {} (not a current task)",
            msg.ack_key
        )));
    };
    let running = msg.result.get("state").and_then(Value::as_str) == Some("running");
    let phase = match (running, kind(&t.task_type)) {
        (true, Kind::Reboots) => TaskState::Downloading,
        _ => TaskState::Acked,
    };
    let why = format!(
        "the device has it ({})",
        if running { "running" } else { "queued" }
    );
    Ok(Intake::Applied(apply(
        tx,
        cfg,
        now,
        &t,
        &Event::Progress(phase),
        &why,
    )?))
}

/// The task a result is for, when it is the current attempt of its task.
fn current_task(tx: &mut Tx, msg: &ResultMsg) -> Result<Option<Task>> {
    let Some(wire) = msg.task_id.as_deref() else {
        return Ok(None);
    };
    Ok(by_wire_id(tx, wire)?.filter(|t| t.device_id == msg.device_id))
}

fn store_result(tx: &mut Tx, t: &Task, msg: &ResultMsg) -> Result<()> {
    tx.exec(
        "UPDATE tasks SET result = $1, error = COALESCE($2, error) WHERE id = $3",
        params![msg.result.to_string(), msg.error.clone(), &t.id],
    )?;
    Ok(())
}

fn task_result(tx: &mut Tx, cfg: &Config, now: i64, msg: &ResultMsg) -> Result<Intake> {
    let Some(t) = current_task(tx, msg)? else {
        return Ok(Intake::Ignored(format!(
            "result {} {} is for no current task (an earlier attempt, or not ours)",
            msg.ack_key, msg.status
        )));
    };
    if t.state.terminal() {
        return Ok(Intake::Ignored(format!(
            "task {} has ended ({}); its late {} result is kept in the log only",
            t.id,
            t.state.name(),
            msg.status
        )));
    }
    store_result(tx, &t, msg)?;
    let error = msg.error.clone().unwrap_or_default();
    let (ev, why) = match msg.status.as_str() {
        "done" => (
            Event::DeviceDone {
                rebooted: t.task_type == "upgrade",
            },
            "the device reports done".to_string(),
        ),
        "failed" => (
            Event::DeviceFailed {
                retry: retryable(&error),
                rolled_back: msg.result.get("status").and_then(Value::as_str)
                    == Some("rolled back"),
            },
            error,
        ),
        "rejected" => (Event::DeviceRejected, error),
        other => {
            return Ok(Intake::Ignored(format!(
                "unknown status {other:?} in result {}",
                msg.ack_key
            )))
        }
    };
    let mut state = apply(tx, cfg, now, &t, &ev, &why)?;
    // The boot confirmation may have come first (messages are reordered).
    if let Some(t) = get(tx, &t.id)? {
        if let Some(s) = check_boot(tx, cfg, now, &t)? {
            state = Some(s);
        }
    }
    Ok(Intake::Applied(state))
}

/// A task that reboots ends on the boot confirmed after it was sent: the
/// target version on a new boot is success, another version a rollback.
fn check_boot(tx: &mut Tx, cfg: &Config, now: i64, t: &Task) -> Result<Option<TaskState>> {
    if kind(&t.task_type) != Kind::Reboots || t.state.terminal() {
        return Ok(None);
    }
    let dev = devices::get(tx, cfg, now, &t.device_id)?
        .with_context(|| format!("device {} of task {}", t.device_id, t.id))?;
    let (Some(boot_at), Some(sent)) = (dev.boot_at, t.published_at) else {
        return Ok(None);
    };
    if boot_at < sent {
        return Ok(None);
    }
    let new_boot = dev.boot_id.is_some() && dev.boot_id != t.start_boot_id;
    let target = dev.boot_version.is_some() && dev.boot_version == t.target_version;
    let why = format!(
        "boot {} confirmed good on version {}",
        dev.boot_id.as_deref().unwrap_or("?"),
        dev.boot_version.as_deref().unwrap_or("?")
    );
    apply(
        tx,
        cfg,
        now,
        t,
        &Event::BootConfirmed { new_boot, target },
        &why,
    )
}
