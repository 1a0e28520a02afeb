//! Per-type worker threads: claim, run, journal the result; recovery of
//! tasks left running by a crash; graceful stop.

use super::Agent;
use crate::journal::TaskRow;
use crate::protocol::{self, Status};
use crate::tasks::{self, Outcome};
use anyhow::Result;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// A resumable task during which the agent stopped this many times without
/// a clean shutdown (crash, abort, kill, power cut) is ended as failed
/// instead of being resumed again: one task must not keep a device down.
pub const MAX_UNFINISHED_RUNS: u32 = 3;

const UNFINISHED_PREFIX: &str = "unfinished-runs:";

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

impl Agent {
    /// Counts a start of a resumable task before it runs (durably); returns
    /// the failure when it has been started too often without ending.
    fn count_start(&self, t: &TaskRow) -> Option<String> {
        let key = format!("{UNFINISHED_PREFIX}{}", t.task_id);
        let before: u32 = match self.journal.kv_get(&key) {
            Ok(v) => v.and_then(|v| v.parse().ok()).unwrap_or(0),
            Err(e) => {
                log::error!("task {}: reading its start count: {e:#}", t.task_id);
                0
            }
        };
        if before >= MAX_UNFINISHED_RUNS {
            return Some(format!(
                "the agent stopped {before} times while running this task (crash, abort or power \
                 cut, not a clean shutdown); the task is ended as failed and not resumed again, \
                 so the agent keeps working; send a new task to try again"
            ));
        }
        if let Err(e) = self.journal.kv_set(&key, &(before + 1).to_string()) {
            log::error!("task {}: saving its start count: {e:#}", t.task_id);
        }
        None
    }

    fn clear_start_count(&self, task_id: &str) {
        let _ = self
            .journal
            .kv_delete(&format!("{UNFINISHED_PREFIX}{task_id}"));
    }

    /// On a clean stop the running tasks were interrupted on purpose: their
    /// start counts are forgotten.
    fn clear_all_start_counts(&self) {
        for (k, _) in self
            .journal
            .kv_prefix(UNFINISHED_PREFIX)
            .unwrap_or_default()
        {
            let _ = self.journal.kv_delete(&k);
        }
    }

    /// Tasks left `running` by a crash: never run again (the side effect may
    /// have happened); they get a failed result. Upgrades resume instead:
    /// their phases are persisted and checked against the slot state.
    pub fn recover(&self) -> Result<()> {
        for t in self.journal.running()? {
            if tasks::resumable(&t.task_type) {
                log::info!(
                    "task {} ({}) will resume after restart",
                    t.task_id,
                    t.task_type
                );
                continue;
            }
            let reason = "interrupted: the agent stopped while this task was running; \
                          it is not run a second time";
            log::warn!("task {} ({}): {reason}", t.task_id, t.task_type);
            let msg = self.result_payload(&t, Status::Failed, Value::Null, Some(reason));
            self.journal.finish(
                &t.task_id,
                false,
                self.topics.result_topic(&t.task_type),
                &msg,
            )?;
        }
        Ok(())
    }

    fn result_payload(
        &self,
        t: &TaskRow,
        status: Status,
        result: Value,
        err: Option<&str>,
    ) -> String {
        protocol::result_message(
            &self.device_id,
            &t.task_id,
            Some(&t.task_id),
            &t.task_type,
            status,
            result,
            err,
            t.attempts,
        )
    }

    /// Runs one claimed (or resumed) task and journals its result.
    pub fn execute(&self, t: &TaskRow, resumed: bool) {
        log::info!(
            "task {} ({}) {} (attempt {})",
            t.task_id,
            t.task_type,
            if resumed { "resumed" } else { "started" },
            t.attempts
        );
        let resumable = tasks::resumable(&t.task_type);
        let crash_loop = if resumable { self.count_start(t) } else { None };
        let outcome = match crash_loop {
            Some(reason) => Outcome::Failed(reason, Value::Null),
            // canceled before it started (the cancel came first, or while the
            // agent was down)
            None if tasks::cancel::requested(self, &t.task_id) => Outcome::Canceled("queued"),
            None => {
                self.failpoint("after_claim");
                // Task input must not stop the agent: handlers are written not
                // to panic, and where panics unwind (dev and test builds) a
                // panic still ends only this task. Release builds abort on
                // panic (workspace profile); there the start count above ends
                // a task that keeps killing the agent.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    tasks::run(self, t, resumed)
                }));
                r.unwrap_or_else(|p| {
                    Outcome::Failed(
                        format!(
                            "the {} handler failed unexpectedly ({}); the task is ended as \
                             failed, the agent keeps running",
                            t.task_type,
                            panic_message(p.as_ref())
                        ),
                        Value::Null,
                    )
                })
            }
        };
        if resumable {
            self.clear_start_count(&t.task_id);
        }
        let (ok, msg) = match outcome {
            Outcome::Done(v) => {
                log::info!("task {} ({}) done", t.task_id, t.task_type);
                (true, self.result_payload(t, Status::Done, v, None))
            }
            Outcome::Failed(e, v) => {
                log::warn!("task {} ({}) failed: {e}", t.task_id, t.task_type);
                (false, self.result_payload(t, Status::Failed, v, Some(&e)))
            }
            Outcome::Canceled(phase) => {
                log::info!(
                    "task {} ({}) canceled while {phase}",
                    t.task_id,
                    t.task_type
                );
                (false, tasks::cancel::canceled_payload(self, t, phase))
            }
            Outcome::Suspended => {
                log::info!(
                    "task {} ({}) suspended; resumes after restart",
                    t.task_id,
                    t.task_type
                );
                return;
            }
        };
        if let Err(e) =
            self.journal
                .finish(&t.task_id, ok, self.topics.result_topic(&t.task_type), &msg)
        {
            log::error!("task {}: journaling result failed: {e:#}", t.task_id);
            return;
        }
        tasks::cancel::forget(self, &t.task_id);
        self.failpoint("after_finish");
        self.wake_outbox();
    }

    pub(super) fn worker(self: Arc<Self>, task_type: &'static str, rx: mpsc::Receiver<()>) {
        if tasks::resumable(task_type) {
            self.busy.fetch_add(1, Ordering::SeqCst);
            match self.journal.running() {
                Ok(rows) => {
                    for t in rows.iter().filter(|t| t.task_type == task_type) {
                        self.execute(t, true);
                    }
                }
                Err(e) => log::error!("reading running tasks: {e:#}"),
            }
            self.busy.fetch_sub(1, Ordering::SeqCst);
        }
        loop {
            while !self.stopping.load(Ordering::SeqCst) {
                self.busy.fetch_add(1, Ordering::SeqCst);
                let claimed = self.journal.claim_next(task_type);
                if let Ok(Some(t)) = &claimed {
                    self.execute(t, false);
                }
                self.busy.fetch_sub(1, Ordering::SeqCst);
                match claimed {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        log::error!("claiming {task_type} task: {e:#}");
                        break;
                    }
                }
            }
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// On SIGTERM/SIGINT: take no new task, give running ones up to 15 s
    /// (systemd's TimeoutStopSec is 20 s), publish what is ready, exit. A
    /// task still running then is reported "interrupted" after the restart;
    /// an upgrade resumes.
    pub(super) fn stop_watch(&self) {
        while !self.stopping.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        log::info!("stopping: no new tasks; waiting up to 15 s for running ones");
        let start = Instant::now();
        while self.busy.load(Ordering::SeqCst) > 0 && start.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wake_outbox();
        std::thread::sleep(Duration::from_millis(300));
        if let Some(c) = self.client() {
            let _ = c.try_disconnect();
        }
        log::info!(
            "stopped ({} task(s) still running)",
            self.busy.load(Ordering::SeqCst)
        );
        self.clear_all_start_counts();
        let _ = self.journal.save_clock();
        std::process::exit(0);
    }
}
