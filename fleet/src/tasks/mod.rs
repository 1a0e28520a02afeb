//! Tasks in the database: create (superseding the active one of the same
//! type), publish through the outbox, apply what devices report, deadlines
//! and retries. Decisions are [`state::step`]'s; this module stores them.

pub mod intake;
pub mod state;

pub use state::{Event, Kind, Step, TaskState};

use crate::config::Config;
use crate::store::{Row, Tx};
use crate::{devices, outbox, params};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    pub id: String,
    /// The taskId on the wire: one per attempt, so the agent (which runs a
    /// taskId once) runs a retry, and a late copy of an earlier attempt is
    /// never taken for the current one.
    pub wire_id: String,
    pub device_id: String,
    pub task_type: String,
    /// Per device and type; a newer generation supersedes the active one.
    pub generation: i64,
    pub attempt: i64,
    pub rollout_id: Option<String>,
    pub body: Value,
    pub target_version: Option<String>,
    pub from_version: Option<String>,
    /// The device's last confirmed boot id when the task was sent.
    pub start_boot_id: Option<String>,
    pub state: TaskState,
    pub published_at: Option<i64>,
    pub phase_since: i64,
    pub deadline: Option<i64>,
    pub not_before: Option<i64>,
    pub resends: i64,
    pub error: Option<String>,
    pub result: Value,
    pub created_at: i64,
    pub updated_at: i64,
    /// A cancel sent to the device and not answered yet: `abort` (the task
    /// ends canceled) or `hold` (a frozen rollout: back to pending).
    pub cancel: Option<String>,
    /// The re-install of the device's services after this upgrade
    /// (`services::Reinstall` as JSON), once its new boot was proven.
    pub services: Option<String>,
}

const COLUMNS: &str = "id, wire_id, device_id, task_type, generation, attempt, rollout_id, body, \
    target_version, from_version, start_boot_id, state, published_at, phase_since, deadline, \
    not_before, resends, error, result, created_at, updated_at, cancel, services";

fn from_row(r: &Row) -> Result<Task> {
    let state = r.str(11);
    let Some(state) = TaskState::parse(&state) else {
        bail!(
            "task {} has unknown state {state:?} in the database",
            r.str(0)
        );
    };
    Ok(Task {
        id: r.str(0),
        wire_id: r.str(1),
        device_id: r.str(2),
        task_type: r.str(3),
        generation: r.i64(4),
        attempt: r.i64(5),
        rollout_id: r.opt_str(6),
        body: serde_json::from_str(&r.str(7)).unwrap_or(Value::Null),
        target_version: r.opt_str(8),
        from_version: r.opt_str(9),
        start_boot_id: r.opt_str(10),
        state,
        published_at: r.opt_i64(12),
        phase_since: r.i64(13),
        deadline: r.opt_i64(14),
        not_before: r.opt_i64(15),
        resends: r.i64(16),
        error: r.opt_str(17),
        result: r
            .opt_str(18)
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null),
        created_at: r.i64(19),
        updated_at: r.i64(20),
        cancel: r.opt_str(21),
        services: r.opt_str(22),
    })
}

fn select(tx: &mut Tx, filter: &str, params: &[crate::store::Val]) -> Result<Vec<Task>> {
    tx.query(&format!("SELECT {COLUMNS} FROM tasks {filter}"), params)?
        .iter()
        .map(from_row)
        .collect()
}

pub fn get(tx: &mut Tx, id: &str) -> Result<Option<Task>> {
    Ok(select(tx, "WHERE id = $1", params![id])?.into_iter().next())
}

pub fn by_wire_id(tx: &mut Tx, wire_id: &str) -> Result<Option<Task>> {
    Ok(select(tx, "WHERE wire_id = $1", params![wire_id])?
        .into_iter()
        .next())
}

pub fn active(tx: &mut Tx, device: &str, task_type: &str) -> Result<Option<Task>> {
    Ok(select(
        tx,
        "WHERE device_id = $1 AND task_type = $2 AND active = 1",
        params![device, task_type],
    )?
    .into_iter()
    .next())
}

pub fn active_for_device(tx: &mut Tx, device: &str) -> Result<Vec<Task>> {
    select(
        tx,
        "WHERE device_id = $1 AND active = 1 ORDER BY id",
        params![device],
    )
}

pub fn list(
    tx: &mut Tx,
    device: Option<&str>,
    rollout: Option<&str>,
    limit: i64,
) -> Result<Vec<Task>> {
    select(
        tx,
        "WHERE (CAST($1 AS TEXT) IS NULL OR device_id = $1) AND (CAST($2 AS TEXT) IS NULL OR rollout_id = $2) \
         ORDER BY updated_at DESC, id LIMIT $3",
        params![device, rollout, limit],
    )
}

/// State changes of a task, oldest first: (at, from, to, reason).
pub fn history(tx: &mut Tx, id: &str) -> Result<Vec<(i64, String, String, String)>> {
    Ok(tx
        .query(
            "SELECT at, from_state, to_state, reason FROM task_events WHERE task_id = $1 ORDER BY id",
            params![id],
        )?
        .iter()
        .map(|r| (r.i64(0), r.str(1), r.str(2), r.str(3)))
        .collect())
}

pub fn kind(task_type: &str) -> Kind {
    match task_type {
        "upgrade" | "migrate" => Kind::Reboots,
        _ => Kind::Plain,
    }
}

pub fn topic(cfg: &Config, device: &str, leaf: &str) -> String {
    format!("{}/{device}/{leaf}", cfg.topic_prefix)
}

#[derive(Debug, Clone)]
pub struct NewTask {
    pub device_id: String,
    pub task_type: String,
    pub body: Value,
    pub target_version: Option<String>,
    pub rollout_id: Option<String>,
}

/// Records a task (pending). An active task of the same type on the device
/// is superseded in the same transaction. With `publish` it goes to the
/// outbox at once.
pub fn create(tx: &mut Tx, cfg: &Config, now: i64, new: &NewTask, publish: bool) -> Result<Task> {
    tx.lock_device(&new.device_id)?;
    if devices::get(tx, cfg, now, &new.device_id)?.is_none() {
        bail!(
            "no device {}; no {} task was created",
            new.device_id,
            new.task_type
        );
    }
    let generation = tx
        .query_opt(
            "SELECT MAX(generation) FROM tasks WHERE device_id = $1 AND task_type = $2",
            params![&new.device_id, &new.task_type],
        )?
        .and_then(|r| r.opt_i64(0))
        .unwrap_or(0)
        + 1;
    if let Some(old) = active(tx, &new.device_id, &new.task_type)? {
        let why = format!("superseded by generation {generation}");
        if apply(tx, cfg, now, &old, &Event::Supersede, &why)?.is_none() {
            bail!(
                "task {} is {}, past the point of no return, and cannot be superseded; \
                 no new task was created (wait for it to end)",
                old.id,
                old.state.name()
            );
        }
    }
    let id = format!("{}.{}.{generation}", new.device_id, new.task_type);
    tx.exec(
        "INSERT INTO tasks (id, wire_id, device_id, task_type, generation, attempt, rollout_id, body, \
         target_version, state, active, acked, device_done, phase_since, resends, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8, 'pending', 1, 0, 0, $9, 0, $9, $9)",
        params![
            &id,
            format!("{id}.1"),
            &new.device_id,
            &new.task_type,
            generation,
            new.rollout_id.clone(),
            new.body.to_string(),
            new.target_version.clone(),
            now
        ],
    )?;
    event(tx, now, &id, "-", "pending", "created")?;
    let t = get(tx, &id)?.expect("the task was just inserted");
    if publish {
        self::publish(tx, cfg, now, &t)?;
        return Ok(get(tx, &id)?.expect("the task exists"));
    }
    Ok(t)
}

fn task_payload(t: &Task) -> String {
    json!({"taskId": t.wire_id, "taskType": t.task_type, "body": t.body}).to_string()
}

/// Writes a pending task to the outbox and moves it to `queued`. The boot id
/// and version of the device now are what a later boot is compared with: the
/// boot its last heartbeat reported (protocol 2), else its last confirmed one.
pub fn publish(tx: &mut Tx, cfg: &Config, now: i64, t: &Task) -> Result<()> {
    tx.lock_device(&t.device_id)?;
    let Some(dev) = devices::get(tx, cfg, now, &t.device_id)? else {
        bail!("device {} of task {} is gone", t.device_id, t.id);
    };
    outbox::enqueue(
        tx,
        now,
        &topic(cfg, &t.device_id, "tasks"),
        &task_payload(t),
        Some(&t.id),
    )?;
    tx.exec(
        "UPDATE tasks SET published_at = $1, start_boot_id = $2, from_version = $3 WHERE id = $4",
        params![now, dev.current_boot_id.or(dev.boot_id), dev.version, &t.id],
    )?;
    let t = get(tx, &t.id)?.expect("the task exists");
    apply(tx, cfg, now, &t, &Event::Published, "written to the outbox")?;
    Ok(())
}

/// Records something that happened to a task without a state change (a
/// cancel sent, a device that cannot cancel).
pub fn note(tx: &mut Tx, now: i64, t: &Task, reason: &str) -> Result<()> {
    log::info!("task {} ({}): {reason}", t.id, t.state.name());
    event(tx, now, &t.id, t.state.name(), t.state.name(), reason)
}

fn event(tx: &mut Tx, now: i64, id: &str, from: &str, to: &str, reason: &str) -> Result<()> {
    let seq = tx.next_id("event")?;
    tx.exec(
        "INSERT INTO task_events (id, task_id, at, from_state, to_state, reason) VALUES ($1, $2, $3, $4, $5, $6)",
        params![seq, id, now, from, to, reason],
    )?;
    Ok(())
}

/// Unix seconds → ms of a body field (`window.end`, `switchAt`).
fn body_ms(body: &Value, path: &[&str]) -> Option<i64> {
    let mut v = body;
    for p in path {
        v = v.get(*p)?;
    }
    v.as_i64().map(|s| s.saturating_mul(1000))
}

/// When a phase's deadline starts counting: a device waiting for its
/// download window (`window.end`) or its install time (`switchAt`) is not late.
fn deadline_base(t: &Task, s: TaskState, now: i64) -> i64 {
    let wait = match s {
        TaskState::Queued | TaskState::Acked | TaskState::Downloading => {
            body_ms(&t.body, &["window", "end"])
        }
        TaskState::Staged | TaskState::Installing => body_ms(&t.body, &["switchAt"]),
        _ => None,
    };
    wait.map_or(now, |w| w.max(now))
}

/// Applies an event; returns the new state, or `None` when nothing changed.
pub fn apply(
    tx: &mut Tx,
    cfg: &Config,
    now: i64,
    t: &Task,
    ev: &Event,
    reason: &str,
) -> Result<Option<TaskState>> {
    let step = state::step(t.state, kind(&t.task_type), ev);
    let from_device = matches!(
        ev,
        Event::Progress(_)
            | Event::BootConfirmed { .. }
            | Event::DeviceDone { .. }
            | Event::DeviceFailed { .. }
            | Event::DeviceRejected
            | Event::DeviceCanceled { .. }
    );
    if from_device && !matches!(step, Step::Ignore(_)) {
        // the device has the task: it counts in the failure budget's base
        tx.exec("UPDATE tasks SET acked = 1 WHERE id = $1", params![&t.id])?;
    }
    match step {
        Step::Ignore(why) => {
            log::debug!("task {} ({}): {ev:?} ignored: {why}", t.id, t.state.name());
            Ok(None)
        }
        Step::To(n) => {
            // proven on the target: a device with services re-installs them
            // first, and is done when they report healthy
            if n == TaskState::Succeeded && kind(&t.task_type) == Kind::Reboots {
                if let Some(s) = crate::services::begin(tx, cfg, now, t, reason)? {
                    return Ok(Some(s));
                }
            }
            set_state(tx, cfg, now, t, n, reason)?;
            Ok(Some(n))
        }
        Step::Retry if t.attempt >= cfg.max_attempts => {
            let why = format!("{reason}; {} attempts used, no retry", t.attempt);
            set_state(tx, cfg, now, t, TaskState::Failed, &why)?;
            Ok(Some(TaskState::Failed))
        }
        Step::Retry => {
            devices::count_failure(tx, &t.device_id, true)?;
            let failures = devices::get(tx, cfg, now, &t.device_id)?.map_or(0, |d| d.failures);
            let mut backoff = cfg.retry_backoff_ms << (t.attempt - 1).clamp(0, 20);
            if failures >= cfg.penalty_after {
                backoff += cfg.penalty_ms;
            }
            let attempt = t.attempt + 1;
            tx.exec(
                "UPDATE tasks SET state = 'pending', attempt = $1, wire_id = $2, not_before = $3, \
                 deadline = NULL, phase_since = $4, resends = 0, published_at = NULL, error = $5, \
                 updated_at = $4, cancel = NULL WHERE id = $6",
                params![
                    attempt,
                    format!("{}.{attempt}", t.id),
                    now + backoff,
                    now,
                    reason,
                    &t.id
                ],
            )?;
            let why = format!("{reason}; attempt {attempt} in {} s", backoff / 1000);
            event(tx, now, &t.id, t.state.name(), "pending", &why)?;
            Ok(Some(TaskState::Pending))
        }
        Step::Requeue => {
            // not a failure: a new attempt (the agent runs a taskId once),
            // sent when its rollout runs again
            let attempt = t.attempt + 1;
            tx.exec(
                "UPDATE tasks SET state = 'pending', attempt = $1, wire_id = $2, not_before = $3, \
                 deadline = NULL, phase_since = $3, resends = 0, published_at = NULL, \
                 updated_at = $3, cancel = NULL WHERE id = $4",
                params![attempt, format!("{}.{attempt}", t.id), now, &t.id],
            )?;
            let why = format!("{reason}; held, attempt {attempt} is sent when the rollout runs");
            event(tx, now, &t.id, t.state.name(), "pending", &why)?;
            Ok(Some(TaskState::Pending))
        }
    }
}

/// Moves a task to `n` outside the state machine's events (the services
/// re-install decides it).
pub(crate) fn set_phase(
    tx: &mut Tx,
    cfg: &Config,
    now: i64,
    t: &Task,
    n: TaskState,
    reason: &str,
) -> Result<()> {
    set_state(tx, cfg, now, t, n, reason)
}

fn set_state(
    tx: &mut Tx,
    cfg: &Config,
    now: i64,
    t: &Task,
    n: TaskState,
    reason: &str,
) -> Result<()> {
    let deadline = cfg
        .phase_timeout_ms(n)
        .map(|ms| deadline_base(t, n, now) + ms);
    let failed = matches!(
        n,
        TaskState::Failed | TaskState::Rejected | TaskState::TimedOut | TaskState::RolledBack
    );
    tx.exec(
        "UPDATE tasks SET state = $1, active = $2, phase_since = $3, deadline = $4, updated_at = $3, \
         error = COALESCE($5, error) WHERE id = $6",
        params![
            n.name(),
            !n.terminal(),
            now,
            deadline,
            failed.then_some(reason),
            &t.id
        ],
    )?;
    event(tx, now, &t.id, t.state.name(), n.name(), reason)?;
    if failed {
        devices::count_failure(tx, &t.device_id, true)?;
    } else if n == TaskState::Succeeded {
        devices::count_failure(tx, &t.device_id, false)?;
    }
    if n.terminal() && matches!(t.task_type.as_str(), "installService" | "uninstallService") {
        if let Some(t) = get(tx, &t.id)? {
            crate::services::service_task_ended(tx, cfg, now, &t)?;
        }
    }
    if t.task_type == "migrate" {
        if n == TaskState::Rebooting {
            devices::set_layout(tx, now, &t.device_id, devices::Layout::Migrating)?;
        } else if n.terminal() && n != TaskState::Succeeded && t.state.past_point_of_no_return() {
            // the old system is back (or silent): it is legacy until a
            // heartbeat from the new one says otherwise
            devices::set_layout(tx, now, &t.device_id, devices::Layout::Legacy)?;
        }
    }
    Ok(())
}

/// Deadlines and retries. A queued task nobody answered is sent again (same
/// taskId) `max_resends` times before it times out; any other phase past
/// its deadline times out. A retry whose backoff ran out is sent again,
/// unless its rollout holds it (frozen, halted, aborted).
pub fn tick(tx: &mut Tx, cfg: &Config, now: i64) -> Result<()> {
    let late = select(
        tx,
        "WHERE active = 1 AND deadline IS NOT NULL AND deadline <= $1 ORDER BY id",
        params![now],
    )?;
    for t in late {
        // another controller may have moved it since the SELECT: lock the
        // device, then read the task again
        tx.lock_device(&t.device_id)?;
        let Some(t) = get(tx, &t.id)? else { continue };
        if t.state.terminal() || t.deadline.is_none_or(|d| d > now) {
            continue;
        }
        if let Some(mode) = t.cancel.as_deref() {
            if !t.state.past_point_of_no_return() {
                // a cancel is queued behind the task in the device's session:
                // whenever the device gets the task, it gets the cancel next
                let why = format!(
                    "no answer to the cancel ({mode}) within the {} deadline; counted as canceled",
                    t.state.name()
                );
                // an abort ends it here (the device said nothing: it does not
                // join the budget's base); a hold sends it again later
                let ev = if mode == CancelMode::Hold.name() {
                    Event::DeviceCanceled { hold: true }
                } else {
                    Event::Cancel
                };
                apply(tx, cfg, now, &t, &ev, &why)?;
                continue;
            }
        }
        if t.state == TaskState::Queued && t.resends < cfg.max_resends {
            outbox::enqueue(
                tx,
                now,
                &topic(cfg, &t.device_id, "tasks"),
                &task_payload(&t),
                Some(&t.id),
            )?;
            tx.exec(
                "UPDATE tasks SET resends = resends + 1, deadline = $1, updated_at = $2 WHERE id = $3",
                params![now + cfg.resend_interval_ms, now, &t.id],
            )?;
            continue;
        }
        let why = format!(
            "no report from the device in phase {} within {} s",
            t.state.name(),
            (now - t.phase_since) / 1000
        );
        apply(tx, cfg, now, &t, &Event::Deadline, &why)?;
    }
    let due = select(
        tx,
        "WHERE active = 1 AND state = 'pending' AND not_before IS NOT NULL AND not_before <= $1 \
         AND (rollout_id IS NULL OR rollout_id IN (SELECT id FROM rollouts WHERE state = 'running')) \
         ORDER BY id",
        params![now],
    )?;
    for t in due {
        tx.lock_device(&t.device_id)?;
        match get(tx, &t.id)? {
            Some(t) if t.state == TaskState::Pending => publish(tx, cfg, now, &t)?,
            _ => {}
        }
    }
    Ok(())
}

/// Sends a heartbeat task to every online device whose last one is an
/// interval old, and to an offline one every `offline_probe_intervals`
/// intervals (its persistent session at the broker queues what it misses:
/// a device back after a day would find a day of heartbeat tasks).
/// Heartbeats are not tasks in the table: nothing is retried, a lost one is
/// simply followed by the next.
pub fn send_heartbeats(tx: &mut Tx, cfg: &Config, now: i64) -> Result<usize> {
    let iv = cfg.heartbeat_interval_ms;
    let due = tx.query(
        "SELECT id FROM devices WHERE hb_sent_at IS NULL \
         OR (hb_sent_at <= $1 AND last_seen IS NOT NULL AND last_seen >= $2) \
         OR hb_sent_at <= $3 ORDER BY id",
        params![
            now - iv,
            now - cfg.offline_after_ms(),
            now - iv * cfg.offline_probe_intervals.max(1)
        ],
    )?;
    for r in &due {
        let id = r.str(0);
        let n = tx.next_id("heartbeat")?;
        let payload = json!({"taskId": format!("hb-{n}"), "taskType": "heartbeat", "body": {}});
        outbox::enqueue(
            tx,
            now,
            &topic(cfg, &id, "tasks"),
            &payload.to_string(),
            None,
        )?;
        tx.exec(
            "UPDATE devices SET hb_sent_at = $1 WHERE id = $2",
            params![now, &id],
        )?;
    }
    Ok(due.len())
}

/// Why a task is canceled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelMode {
    /// Operator or abort: the task ends `canceled`.
    Abort,
    /// Freeze: the device drops it before its point of no return, and it is
    /// sent again (a new attempt) when the rollout runs.
    Hold,
}

impl CancelMode {
    pub fn name(self) -> &'static str {
        match self {
            CancelMode::Abort => "abort",
            CancelMode::Hold => "hold",
        }
    }
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canceling {
    /// Ended here at once (the device never got it).
    Canceled,
    /// A cancel went to the device; its answer decides (`canceled`, or
    /// "cannot cancel" past its point of no return).
    Asked,
    /// The device is past the point of no return: the task runs to its end.
    TooLate,
    /// Nothing to do (ended; or held and not sent yet).
    Nothing,
}

/// Cancels a task: one never sent ends at once (abort) or simply stays
/// pending (hold); one the device may have gets a `cancel` task (protocol 2)
/// in the same transaction, and stays in its phase until the device answers.
pub fn cancel(
    tx: &mut Tx,
    cfg: &Config,
    now: i64,
    id: &str,
    why: &str,
    mode: CancelMode,
) -> Result<Canceling> {
    let Some(t) = get(tx, id)? else {
        bail!("no task {id}; nothing was canceled");
    };
    tx.lock_device(&t.device_id)?;
    let t = get(tx, id)?.expect("the task was just read");
    if t.state.terminal() {
        return Ok(Canceling::Nothing);
    }
    if t.state == TaskState::Pending {
        if mode == CancelMode::Hold {
            return Ok(Canceling::Nothing);
        }
        return Ok(match apply(tx, cfg, now, &t, &Event::Cancel, why)? {
            Some(_) => Canceling::Canceled,
            None => Canceling::Nothing,
        });
    }
    if t.state.past_point_of_no_return() {
        return Ok(Canceling::TooLate);
    }
    if t.cancel.as_deref() == Some(mode.name()) || t.cancel.as_deref() == Some("abort") {
        return Ok(Canceling::Asked); // asked already (an abort outranks a hold)
    }
    if t.cancel.is_none() {
        let msg = dualroot_api::wire::TaskMsg {
            task_id: dualroot_api::wire::cancel_task_id(&t.wire_id),
            task_type: dualroot_api::wire::CANCEL_TASK.into(),
            body: serde_json::to_value(dualroot_api::wire::CancelBody {
                task_id: t.wire_id.clone(),
            })?,
        };
        outbox::enqueue(
            tx,
            now,
            &topic(cfg, &t.device_id, "tasks"),
            &msg.to_json(),
            None,
        )?;
    }
    tx.exec(
        "UPDATE tasks SET cancel = $1, updated_at = $2 WHERE id = $3",
        params![mode.name(), now, &t.id],
    )?;
    note(
        tx,
        now,
        &t,
        &format!("cancel ({}) sent to the device: {why}", mode.name()),
    )?;
    Ok(Canceling::Asked)
}
