//! What devices send: result messages on `<prefix>/<id>/results` and
//! heartbeat answers on `<prefix>/<id>/heartbeat`, as the agent writes them
//! (agent-lib `protocol::result_message`). Each is applied once per ackKey and
//! acked through the outbox in the same transaction; a repeat is acked again
//! and changes nothing. `in_progress` answers are neither recorded nor acked
//! (the agent does not keep them).

use super::{apply, by_wire_id, get, kind, note, Event, Kind, Task, TaskState};
use crate::config::Config;
use crate::store::Tx;
use crate::{devices, outbox, params};
use anyhow::{Context, Result};
use dualroot_api::wire::{self, CancelReport, Heartbeat, Progress, ResultMsg, Status};
use serde_json::Value;

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
    let facts = msg.task_type == "heartbeat" && msg.status == Status::Done;
    if !facts {
        devices::seen(tx, cfg, now, &device)?;
    }
    if msg.status == Status::InProgress {
        return in_progress(tx, cfg, now, &msg);
    }
    let fresh = tx.exec(
        "INSERT INTO results_seen (ack_key, device_id, status, received_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (device_id, ack_key) DO NOTHING",
        params![&msg.ack_key, dev, msg.status.as_str(), now],
    )? == 1;
    outbox::enqueue(
        tx,
        now,
        &super::topic(cfg, dev, "acks"),
        &wire::ack_message(&msg.ack_key),
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
            if !facts {
                return Ok(Intake::Applied(None));
            }
            let Some(hb) = devices::heartbeat(tx, cfg, now, &device, &msg.result, msg.at)? else {
                return Ok(Intake::Ignored(format!(
                    "heartbeat {} is older than the newest one applied, or unreadable",
                    msg.ack_key
                )));
            };
            let mut last = None;
            for t in super::active_for_device(tx, dev)? {
                if let Some(s) = heartbeat_boot(tx, cfg, now, &t, &hb)? {
                    last = Some(s);
                }
            }
            if let Some(s) = crate::services::heartbeat(tx, cfg, now, dev, &hb)? {
                last = Some(s);
            }
            Ok(Intake::Applied(last))
        }
        wire::CANCEL_TASK => cancel_answer(tx, cfg, now, &msg),
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
            msg.ack_key,
            msg.status.as_str()
        )));
    };
    if t.state.terminal() {
        return Ok(Intake::Ignored(format!(
            "task {} has ended ({}); its late {} result is kept in the log only",
            t.id,
            t.state.name(),
            msg.status.as_str()
        )));
    }
    if msg.status != Status::Progress {
        store_result(tx, &t, msg)?;
    }
    let error = msg.error.clone().unwrap_or_default();
    let (ev, why) = match msg.status {
        Status::Done => (
            Event::DeviceDone {
                rebooted: t.task_type == "upgrade",
            },
            "the device reports done".to_string(),
        ),
        Status::Progress => {
            let p: Option<Progress> = msg
                .result
                .get("state")
                .and_then(|s| serde_json::from_value(s.clone()).ok());
            let phase = match p {
                Some(Progress::Staged) => TaskState::Staged,
                Some(Progress::Installing) => TaskState::Installing,
                None => {
                    return Ok(Intake::Ignored(format!(
                        "progress {} names no known phase: {}",
                        msg.ack_key, msg.result
                    )))
                }
            };
            let why = format!("the device reports {}", phase.name());
            return Ok(Intake::Applied(apply(
                tx,
                cfg,
                now,
                &t,
                &Event::Progress(phase),
                &why,
            )?));
        }
        Status::Canceled => (
            Event::DeviceCanceled {
                hold: t.cancel.as_deref() == Some(super::CancelMode::Hold.name()),
            },
            format!(
                "the device canceled it ({})",
                msg.error.as_deref().unwrap_or("no reason given")
            ),
        ),
        Status::Failed => (
            Event::DeviceFailed {
                retry: retryable(&error),
                rolled_back: msg.result.get("status").and_then(Value::as_str)
                    == Some("rolled back"),
            },
            error,
        ),
        Status::Rejected => (Event::DeviceRejected, error),
        Status::InProgress | Status::Unknown => {
            return Ok(Intake::Ignored(format!(
                "unknown status in result {}",
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

/// The device's answer to a `cancel` task (protocol 2; a version-1 agent
/// rejects it as an unknown task type). A cancel the device takes is followed
/// by the task's own `canceled` result; one it refuses leaves the task
/// running to its end, and that is recorded.
fn cancel_answer(tx: &mut Tx, cfg: &Config, now: i64, msg: &ResultMsg) -> Result<Intake> {
    let target = msg
        .task_id
        .as_deref()
        .and_then(|c| c.strip_prefix("cancel-"))
        .map(str::to_string);
    let Some(t) = target
        .as_deref()
        .map(|w| by_wire_id(tx, w))
        .transpose()?
        .flatten()
        .filter(|t| t.device_id == msg.device_id)
    else {
        return Ok(Intake::Ignored(format!(
            "cancel answer {} is for no current task",
            msg.ack_key
        )));
    };
    let report: Option<CancelReport> = serde_json::from_value(msg.result.clone()).ok();
    let why = match (msg.status, &report) {
        (Status::Done, Some(r)) if r.canceled => {
            note(
                tx,
                now,
                &t,
                &format!("the device takes the cancel (task {})", r.phase),
            )?;
            return Ok(Intake::Applied(None));
        }
        (Status::Done, Some(r)) => format!(
            "the device cannot cancel it ({}): {}",
            r.phase,
            r.reason.as_deref().unwrap_or("no reason given")
        ),
        (Status::Rejected, _) => format!(
            "the agent does not take cancel tasks (protocol 1: {}); the task runs to its end",
            msg.error.as_deref().unwrap_or("rejected")
        ),
        _ => format!(
            "the cancel failed on the device: {}",
            msg.error.as_deref().unwrap_or("no reason given")
        ),
    };
    tx.exec(
        "UPDATE tasks SET cancel = NULL WHERE id = $1",
        params![&t.id],
    )?;
    note(tx, now, &t, &why)?;
    // past its point of no return: the phase the device named
    let mut state = None;
    if report.as_ref().is_some_and(|r| r.phase == "installing") && !t.state.terminal() {
        let t = get(tx, &t.id)?.expect("the task exists");
        state = apply(
            tx,
            cfg,
            now,
            &t,
            &Event::Progress(TaskState::Installing),
            "the device is installing (its answer to the cancel)",
        )?;
    }
    Ok(Intake::Applied(state))
}

/// A heartbeat (protocol 2, with `bootId`) as proof of a reboot for a task
/// that reboots: a boot other than the one when the task was sent, on the
/// target version with the slot confirmed good, is success; on another
/// version, a rollback (the state machine takes it only once the device
/// armed the switch). A task sent before the device reported any boot id
/// waits for the `bootConfirmed` event as before.
fn heartbeat_boot(
    tx: &mut Tx,
    cfg: &Config,
    now: i64,
    t: &Task,
    hb: &Heartbeat,
) -> Result<Option<TaskState>> {
    if kind(&t.task_type) != Kind::Reboots || t.state.terminal() || t.published_at.is_none() {
        return Ok(None);
    }
    let (Some(boot), Some(start)) = (hb.boot_id.as_deref(), t.start_boot_id.as_deref()) else {
        return Ok(None);
    };
    if boot == start {
        return Ok(None);
    }
    let version = if hb.ab() {
        hb.slot.version.as_ref().or(hb.firmware_version.as_ref())
    } else {
        hb.firmware_version.as_ref()
    };
    let target = version.is_some() && version == t.target_version.as_ref();
    let committed =
        hb.ab() && hb.slot.booted_good == Some(true) && hb.slot.fallback.as_bool() != Some(true);
    if target && !committed {
        return Ok(None); // on the target, not confirmed yet: the next heartbeat tells
    }
    let why = format!(
        "heartbeat from boot {boot} (sent in boot {start}) on version {}{}",
        version.map_or("?", |v| v.as_str()),
        if committed {
            ", slot confirmed good"
        } else {
            ""
        }
    );
    apply(
        tx,
        cfg,
        now,
        t,
        &Event::BootConfirmed {
            new_boot: true,
            target,
        },
        &why,
    )
}
