//! The services a device should run, and their re-install after an upgrade.
//!
//! An `installService` task that succeeds records its body under the
//! namespace the agent reports (`device_services`); an `uninstallService`
//! that succeeds removes it. When a task that reboots (upgrade, migration)
//! proves its new boot on the target, a device with recorded services is not
//! done yet: its task stays `verifying` while the services are sent again,
//! one `installService` at a time (one active task per type), and succeeds
//! only when a heartbeat after the last of them reports every recorded
//! service healthy at its version. A re-install that fails fails the task;
//! the `verifying` deadline bounds the whole.
//!
//! The task's `services` column holds the progress: `{"todo": [codes],
//! "installing": code | null}`.

use crate::config::Config;
use crate::params;
use crate::store::Tx;
use crate::tasks::{self, Event, NewTask, Task, TaskState};
use anyhow::Result;
use dualroot_api::wire::{Heartbeat, ServiceReport};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reinstall {
    /// Namespaces still to send.
    pub todo: Vec<String>,
    /// The namespace whose installService task runs now.
    pub installing: Option<String>,
    /// Every service re-installed and reported healthy: the task succeeds.
    #[serde(default)]
    pub healthy: bool,
}

/// The namespace the agent installs a service into (agent-lib
/// `services::namespace_for`: the lowercased service code).
pub fn namespace(code: &str) -> String {
    code.to_ascii_lowercase()
}

/// (namespace, version, task body) of a device's recorded services.
pub fn recorded(tx: &mut Tx, device: &str) -> Result<Vec<(String, String, Value)>> {
    Ok(tx
        .query(
            "SELECT code, version, body FROM device_services WHERE device_id = $1 ORDER BY code",
            params![device],
        )?
        .iter()
        .map(|r| {
            (
                r.str(0),
                r.str(1),
                serde_json::from_str(&r.str(2)).unwrap_or(Value::Null),
            )
        })
        .collect())
}

fn progress(t: &Task) -> Option<Reinstall> {
    t.services
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
}

fn save(tx: &mut Tx, t: &Task, r: &Reinstall) -> Result<()> {
    tx.exec(
        "UPDATE tasks SET services = $1 WHERE id = $2",
        params![serde_json::to_string(r)?, &t.id],
    )?;
    Ok(())
}

/// Called instead of moving a task that reboots to `succeeded`: with
/// recorded services, it stays (or goes) `verifying` and the re-install
/// starts; `None` when there is nothing to re-install (it succeeds).
pub fn begin(
    tx: &mut Tx,
    cfg: &Config,
    now: i64,
    t: &Task,
    reason: &str,
) -> Result<Option<TaskState>> {
    if let Some(r) = progress(t) {
        // healthy: this is the end; else another proof of the boot while
        // the services are still on their way changes nothing
        return Ok((!r.healthy).then_some(t.state));
    }
    let recorded = recorded(tx, &t.device_id)?;
    if recorded.is_empty() {
        return Ok(None);
    }
    let codes: Vec<String> = recorded.iter().map(|(c, _, _)| c.clone()).collect();
    let mut r = Reinstall {
        todo: codes.clone(),
        ..Default::default()
    };
    save(tx, t, &r)?;
    let state = if t.state == TaskState::Verifying {
        tasks::note(
            tx,
            now,
            t,
            &format!("{reason}; re-installing services {}", codes.join(", ")),
        )?;
        None
    } else {
        tasks::set_phase(
            tx,
            cfg,
            now,
            t,
            TaskState::Verifying,
            &format!("{reason}; re-installing services {}", codes.join(", ")),
        )?;
        Some(TaskState::Verifying)
    };
    send_next(tx, cfg, now, t, &mut r)?;
    Ok(state.or(Some(TaskState::Verifying)))
}

fn send_next(tx: &mut Tx, cfg: &Config, now: i64, t: &Task, r: &mut Reinstall) -> Result<()> {
    r.installing = None;
    while let Some(code) = (!r.todo.is_empty()).then(|| r.todo.remove(0)) {
        let body = recorded(tx, &t.device_id)?
            .into_iter()
            .find(|(c, _, _)| *c == code)
            .map(|(_, _, b)| b);
        let Some(body) = body else { continue }; // uninstalled meanwhile
        tasks::create(
            tx,
            cfg,
            now,
            &NewTask {
                device_id: t.device_id.clone(),
                task_type: "installService".into(),
                body,
                target_version: None,
                rollout_id: None,
            },
            true,
        )?;
        r.installing = Some(code);
        break;
    }
    save(tx, t, r)
}

/// The active task of `device` that is re-installing its services.
fn reinstalling(tx: &mut Tx, device: &str) -> Result<Option<(Task, Reinstall)>> {
    for t in tasks::active_for_device(tx, device)? {
        if let Some(r) = progress(&t) {
            return Ok(Some((t, r)));
        }
    }
    Ok(None)
}

/// A service task ended: record or forget the service, and move a
/// re-install along (the next service, or the task's failure).
pub fn service_task_ended(tx: &mut Tx, cfg: &Config, now: i64, st: &Task) -> Result<()> {
    let code = st
        .body
        .get("serviceCode")
        .and_then(Value::as_str)
        .map(namespace);
    let Some(code) = code else { return Ok(()) };
    if st.state == TaskState::Succeeded {
        match st.task_type.as_str() {
            "installService" => {
                let version = st
                    .result
                    .get("version")
                    .or_else(|| st.body.get("version"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                tx.exec(
                    "DELETE FROM device_services WHERE device_id = $1 AND code = $2",
                    params![&st.device_id, &code],
                )?;
                tx.exec(
                    "INSERT INTO device_services (device_id, code, version, body, recorded_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                    params![&st.device_id, &code, version, st.body.to_string(), now],
                )?;
            }
            "uninstallService" => {
                tx.exec(
                    "DELETE FROM device_services WHERE device_id = $1 AND code = $2",
                    params![&st.device_id, &code],
                )?;
            }
            _ => {}
        }
    }
    if st.task_type != "installService" || !st.state.terminal() {
        return Ok(());
    }
    let Some((t, mut r)) = reinstalling(tx, &st.device_id)? else {
        return Ok(());
    };
    if r.installing.as_deref() != Some(code.as_str()) {
        return Ok(());
    }
    if st.state != TaskState::Succeeded {
        let why = format!(
            "re-installing service {code} after the upgrade ended {}: {}",
            st.state.name(),
            st.error.as_deref().unwrap_or("no reason given")
        );
        tasks::set_phase(tx, cfg, now, &t, TaskState::Failed, &why)?;
        return Ok(());
    }
    tasks::note(tx, now, &t, &format!("service {code} re-installed"))?;
    send_next(tx, cfg, now, &t, &mut r)
}

/// Every recorded service reported healthy at its version.
fn all_healthy(recorded: &[(String, String, Value)], reported: &[ServiceReport]) -> Vec<String> {
    recorded
        .iter()
        .filter(|(code, version, _)| {
            !reported
                .iter()
                .any(|s| s.code == *code && s.version == *version && s.health == "healthy")
        })
        .map(|(code, version, _)| {
            let now = reported.iter().find(|s| s.code == *code);
            format!(
                "{code} {version}: {}",
                now.map_or("not reported".to_string(), |s| format!(
                    "{} {}",
                    s.version, s.health
                ))
            )
        })
        .collect()
}

/// A heartbeat arrived: a task whose services were all re-installed
/// succeeds when this heartbeat reports them healthy.
pub fn heartbeat(
    tx: &mut Tx,
    cfg: &Config,
    now: i64,
    device: &str,
    hb: &Heartbeat,
) -> Result<Option<TaskState>> {
    let Some((t, mut r)) = reinstalling(tx, device)? else {
        return Ok(None);
    };
    if r.installing.is_some() || !r.todo.is_empty() || r.healthy {
        return Ok(None);
    }
    let missing = all_healthy(&recorded(tx, device)?, &hb.services);
    if !missing.is_empty() {
        log::debug!(
            "task {}: services not healthy yet: {}",
            t.id,
            missing.join("; ")
        );
        return Ok(None);
    }
    r.healthy = true;
    save(tx, &t, &r)?;
    let Some(t) = tasks::get(tx, &t.id)? else {
        return Ok(None);
    };
    let ev = Event::BootConfirmed {
        new_boot: true,
        target: true,
    };
    tasks::apply(
        tx,
        cfg,
        now,
        &t,
        &ev,
        "services re-installed and reported healthy",
    )
}
