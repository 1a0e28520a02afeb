//! `cancel` (protocol 2): the backend takes a task back before its point of
//! no return. A task still queued in the journal ends at once with status
//! `canceled`; a running upgrade or migration is marked and ends `canceled`
//! at its next checkpoint (waiting for its window, after its download), which
//! always comes before the engine starts writing. Once the engine writes
//! (`installing`), the cancel is answered `canceled: false` and the task runs
//! to its end. The mark is durable (kv `cancel:<taskId>`), so a restart or a
//! cancel that arrives before its task changes nothing.
//!
//! One lock orders the cancel against the point of no return: a task passes
//! it ([`pass_point_of_no_return`]) only when no cancel was recorded, and a
//! cancel is recorded only when the task has not passed it.

use super::Outcome;
use crate::agent::Agent;
use crate::journal::{State, TaskRow};
use crate::protocol::{self, CancelBody, CancelReport, Status};
use anyhow::Result;
use serde_json::{json, Value};

const CANCEL_PREFIX: &str = "cancel:";
const PONR_PREFIX: &str = "ponr:";

/// Task types whose running handler checks for a cancel.
fn cancelable_while_running(task_type: &str) -> bool {
    matches!(task_type, "upgrade" | "migrate")
}

/// The error a handler returns when it finds its task canceled; `tasks::run`
/// turns it into [`Outcome::Canceled`].
#[derive(Debug)]
pub struct Canceled {
    pub phase: &'static str,
}

impl std::fmt::Display for Canceled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "canceled by the backend while {}; nothing was installed",
            self.phase
        )
    }
}

impl std::error::Error for Canceled {}

/// A cancel was recorded for this task.
pub fn requested(agent: &Agent, task_id: &str) -> bool {
    agent
        .journal
        .kv_get(&format!("{CANCEL_PREFIX}{task_id}"))
        .ok()
        .flatten()
        .is_some()
}

/// A checkpoint before the point of no return: `Err(Canceled)` when a cancel
/// was recorded.
pub fn check(agent: &Agent, task_id: &str, phase: &'static str) -> Result<()> {
    if requested(agent, task_id) {
        return Err(Canceled { phase }.into());
    }
    Ok(())
}

/// The engine is about to write: from here on the task cannot be canceled.
/// `Err(Canceled)` when a cancel came first.
pub fn pass_point_of_no_return(agent: &Agent, task_id: &str) -> Result<()> {
    let _one = agent.cancel_lock.lock().unwrap_or_else(|e| e.into_inner());
    check(agent, task_id, "staged")?;
    agent
        .journal
        .kv_set(&format!("{PONR_PREFIX}{task_id}"), "installing")?;
    Ok(())
}

/// The result message of a canceled task.
pub fn canceled_payload(agent: &Agent, t: &TaskRow, phase: &str) -> String {
    protocol::result_message(
        &agent.device_id,
        &t.task_id,
        Some(&t.task_id),
        &t.task_type,
        Status::Canceled,
        json!({"status": "canceled", "phase": phase}),
        Some(&format!(
            "canceled by the backend while {phase}; nothing was installed"
        )),
        t.attempts,
    )
}

/// Forgets the marks of a finished task.
pub fn forget(agent: &Agent, task_id: &str) {
    let _ = agent
        .journal
        .kv_delete(&format!("{CANCEL_PREFIX}{task_id}"));
    let _ = agent.journal.kv_delete(&format!("{PONR_PREFIX}{task_id}"));
}

fn report(task_id: &str, canceled: bool, phase: &str, reason: Option<String>) -> Value {
    serde_json::to_value(CancelReport {
        task_id: task_id.into(),
        canceled,
        phase: phase.into(),
        reason,
    })
    .expect("a cancel report serializes")
}

pub(super) fn run(agent: &Agent, body: &CancelBody) -> Result<Outcome> {
    let target = body.task_id.as_str();
    let _one = agent.cancel_lock.lock().unwrap_or_else(|e| e.into_inner());
    let Some((row, _)) = agent.journal.get(target)? else {
        // not here (yet): if it arrives later it ends canceled when claimed
        agent
            .journal
            .kv_set(&format!("{CANCEL_PREFIX}{target}"), "requested")?;
        return Ok(Outcome::Done(report(
            target,
            true,
            "unknown",
            Some("no such task here yet; it will not run if it arrives".into()),
        )));
    };
    match row.state {
        State::Received => {
            let topic = agent.topics.result_topic(&row.task_type).to_string();
            let msg = canceled_payload(agent, &row, "queued");
            if agent.journal.finish_received(target, &topic, &msg)? {
                log::info!("task {target} ({}) canceled while queued", row.task_type);
                agent.wake_outbox();
                return Ok(Outcome::Done(report(target, true, "queued", None)));
            }
            // a worker claimed it meanwhile: it is running now
            running(agent, &row)
        }
        State::Running => running(agent, &row),
        State::Done | State::Failed => Ok(Outcome::Done(report(
            target,
            false,
            "finished",
            Some("the task has finished".into()),
        ))),
    }
}

fn running(agent: &Agent, row: &TaskRow) -> Result<Outcome> {
    let target = row.task_id.as_str();
    if !cancelable_while_running(&row.task_type) {
        return Ok(Outcome::Done(report(
            target,
            false,
            "running",
            Some(format!(
                "a running {} task is not canceled; it runs to its end",
                row.task_type
            )),
        )));
    }
    // an upgrade past its download (also one an earlier agent started,
    // without the mark) has installed or is installing
    let upgrade_past = agent
        .journal
        .kv_get(&format!("upgrade:{target}"))?
        .and_then(|v| serde_json::from_str::<super::UpgradeState>(&v).ok())
        .is_some_and(|u| !matches!(u.phase, super::Phase::Scheduled | super::Phase::Downloaded));
    if upgrade_past
        || agent
            .journal
            .kv_get(&format!("{PONR_PREFIX}{target}"))?
            .is_some()
    {
        return Ok(Outcome::Done(report(
            target,
            false,
            "installing",
            Some(
                "past the point of no return: the engine is writing or has written; \
                 the task runs to its end and reports its result"
                    .into(),
            ),
        )));
    }
    agent
        .journal
        .kv_set(&format!("{CANCEL_PREFIX}{target}"), "requested")?;
    log::info!(
        "task {target} ({}): cancel recorded; it ends at its next checkpoint",
        row.task_type
    );
    Ok(Outcome::Done(report(target, true, "running", None)))
}
