//! `migrate`: download and verify a bundle, stage the migration with the
//! task's plan, optionally reboot into it.

use super::{cancel, fetch_to, progress, safe_name, Source};
use crate::agent::Agent;
use crate::journal::TaskRow;
use crate::protocol::Progress;
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
    /// base64 ed25519 signature of the plan's bytes by a vendor key
    /// (`dualroot plan sign`'s `<plan>.sig`).
    #[serde(default, rename = "planSignature")]
    plan_signature: Option<String>,
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
    // The plan decides what the new OS trusts and carries: only a vendor-signed
    // one is staged (and `stage --require-signed-plan` checks it again).
    let sig = body.plan_signature.as_deref().context(
        "a migrate task needs `planSignature` (the vendor's signature of the plan, `dualroot plan sign`); nothing was staged",
    )?;
    let ring = crate::keyring::Keyring::load(&agent.cfg.services.keyring)
        .context("loading the vendor keyring to check the plan; nothing was staged")?;
    let key = dualroot_keys::verify_plan(&ring, text.as_bytes(), sig)
        .context("checking the task's plan; nothing was staged")?;
    log::info!("migrate {}: plan signed by key {key}", t.task_id);
    let plan = agent
        .cfg
        .data_dir
        .join(format!("plan-{}.toml", safe_name(&t.task_id)));
    std::fs::write(&plan, text).with_context(|| format!("writing {}", plan.display()))?;
    let sig_path = dualroot_keys::plan_signature_path(&plan);
    std::fs::write(&sig_path, format!("{}\n", sig.trim()))
        .with_context(|| format!("writing {}", sig_path.display()))?;
    progress(agent, t, Progress::Staged);
    // the engine arms the migration from here on: a cancel is refused after this
    cancel::pass_point_of_no_return(agent, &t.task_id)?;
    progress(agent, t, Progress::Installing);
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
