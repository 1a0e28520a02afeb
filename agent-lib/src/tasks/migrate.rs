//! `migrate`: download and verify a bundle, stage the migration with the
//! task's plan, optionally reboot into it.

use super::{fetch_to, safe_name, Source};
use crate::agent::Agent;
use crate::journal::TaskRow;
use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
pub(super) struct Body {
    #[serde(flatten)]
    source: Source,
    /// The migration plan as TOML text.
    #[serde(default)]
    plan: Option<String>,
    #[serde(default)]
    reboot: bool,
}

pub(super) fn run(agent: &Agent, t: &TaskRow, body: &Body) -> Result<Value> {
    let dest = agent.cfg.data_dir.join("downloads").join("migrate.bundle");
    let bundle = fetch_to(agent, &body.source, &dest)?;
    agent
        .engine
        .bundle_verify(&bundle)
        .context("verifying bundle")?;
    let text = body.plan.as_deref().context(
        "a migrate task needs `plan` (the migration plan as TOML text): `dualroot stage` cannot run without one; nothing was staged",
    )?;
    let plan = agent
        .cfg
        .data_dir
        .join(format!("plan-{}.toml", safe_name(&t.task_id)));
    std::fs::write(&plan, text).with_context(|| format!("writing {}", plan.display()))?;
    let out = agent
        .engine
        .stage(&bundle, &plan)
        .context("staging migration")?;
    if body.reboot {
        agent
            .engine
            .reboot()
            .context("rebooting into the migration")?;
    }
    Ok(json!({"staged": true, "output": out}))
}
