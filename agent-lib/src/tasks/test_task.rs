//! `test.sleep` (only with `debug.test_tasks = true`): appends its taskId to
//! `marker`, sleeps `ms`; `panic: true` panics (tests of task isolation).

use super::Outcome;
use crate::agent::Agent;
use crate::journal::TaskRow;
use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::json;
use std::io::Write;
use std::time::Duration;

#[derive(Debug, Deserialize)]
pub(super) struct Body {
    #[serde(default)]
    marker: Option<String>,
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    panic: bool,
}

pub(super) fn run(agent: &Agent, t: &TaskRow, body: &Body) -> Result<Outcome> {
    if let Some(marker) = &body.marker {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(marker)
            .with_context(|| format!("opening marker {marker}"))?;
        writeln!(f, "{}", t.task_id).with_context(|| format!("writing marker {marker}"))?;
        f.sync_all()
            .with_context(|| format!("syncing marker {marker}"))?;
    }
    crate::failpoint::hit("in_task", &agent.cfg.data_dir);
    if body.panic {
        panic!("test.sleep {} asked to panic", t.task_id);
    }
    std::thread::sleep(Duration::from_millis(body.ms));
    Ok(Outcome::Done(json!({"slept": body.ms})))
}
