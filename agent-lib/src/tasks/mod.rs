//! Task handlers, one module per task type. Each handler decodes its body
//! into a typed struct first: a missing or malformed field fails the task
//! with an error naming the field, before anything is done.

pub mod cancel;
mod heartbeat;
mod logs;
mod migrate;
mod services;
mod test_task;
mod upgrade;

pub use heartbeat::{heartbeat, unhealthy_services};
pub use upgrade::{boot_id, draw_predownload, Phase, UpgradeState, Window};

use crate::agent::Agent;
use crate::download;
use crate::journal::TaskRow;
use anyhow::Result;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub enum Outcome {
    Done(Value),
    Failed(String, Value),
    /// The task continues after a restart (upgrade waiting for its reboot).
    Suspended,
    /// A `cancel` task took it back before its point of no return; the phase
    /// it was in.
    Canceled(&'static str),
}

/// Reports a long task's phase (protocol 2): a `progress` result, kept in
/// the outbox until the backend acks it (a backend that predates it acks
/// and ignores it).
pub fn progress(agent: &Agent, t: &TaskRow, p: crate::protocol::Progress) {
    let msg = crate::protocol::result_message(
        &agent.device_id,
        &p.ack_key(&t.task_id),
        Some(&t.task_id),
        &t.task_type,
        crate::protocol::Status::Progress,
        json!({"state": p}),
        None,
        t.attempts,
    );
    let topic = agent.topics.result_topic(&t.task_type);
    match agent.journal.enqueue(&p.ack_key(&t.task_id), topic, &msg) {
        Ok(()) => agent.wake_outbox(),
        Err(e) => log::error!("task {}: queuing its {} report: {e:#}", t.task_id, p.name()),
    }
}

/// Task types that resume after a restart instead of failing as interrupted.
pub fn resumable(task_type: &str) -> bool {
    task_type == "upgrade"
}

pub fn run(agent: &Agent, t: &TaskRow, resumed: bool) -> Outcome {
    let r = match t.task_type.as_str() {
        "heartbeat" => Ok(Outcome::Done(heartbeat(agent))),
        crate::protocol::TEST_TASK => body(t).and_then(|b| test_task::run(agent, t, &b)),
        "register" => crate::registration::refresh(&agent.cfg).map(|tok| {
            Outcome::Done(json!({"deviceId": tok.device_id, "expiresAt": tok.expires_at}))
        }),
        "installService" => body(t)
            .and_then(|b| services::install(agent, &b))
            .map(Outcome::Done),
        "uninstallService" => body(t)
            .and_then(|b| services::uninstall(agent, &b))
            .map(Outcome::Done),
        "collectLogs" => body(t)
            .and_then(|b| logs::collect(agent, t, &b))
            .map(Outcome::Done),
        "migrate" => body(t)
            .and_then(|b| migrate::run(agent, t, &b))
            .map(Outcome::Done),
        "upgrade" => body(t).and_then(|b| upgrade::run(agent, t, &b, resumed)),
        crate::protocol::CANCEL_TASK => body(t).and_then(|b| cancel::run(agent, &b)),
        other => Err(anyhow::anyhow!("no handler for task type {other:?}")),
    };
    match r {
        Ok(o) => o,
        Err(e) if e.downcast_ref::<cancel::Canceled>().is_some() => Outcome::Canceled(
            e.downcast_ref::<cancel::Canceled>()
                .map_or("running", |c| c.phase),
        ),
        // errors may quote URLs: never their query strings (pre-signed credentials)
        Err(e) => Outcome::Failed(
            crate::redact::in_text(&format!("{e:#}")).into_owned(),
            Value::Null,
        ),
    }
}

/// The task's body as its typed struct; the error names the field and says
/// that nothing was done.
fn body<T: DeserializeOwned>(t: &TaskRow) -> Result<T> {
    let text = if t.body.trim().is_empty() || t.body.trim() == "null" {
        "{}"
    } else {
        t.body.as_str()
    };
    serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "{} task {}: bad body: {e}; the task was not run",
            t.task_type,
            t.task_id
        )
    })
}

/// A file named by a task: where to get it and what it must hash to.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Source {
    pub url: String,
    pub sha256: String,
    /// Exact size in bytes, when the backend knows it: lowers the size cap.
    #[serde(default)]
    pub size: Option<u64>,
}

/// Downloads `src` to `dest` (resuming, hash checked, one at a time), with
/// the device token only for the backend's own origin.
fn fetch_to(agent: &Agent, src: &Source, dest: &Path) -> Result<PathBuf> {
    // the device token goes only to the backend itself, never to another
    // host named in a task (e.g. a pre-signed storage URL)
    let bearer = match &agent.cfg.backend.url {
        Some(base) if same_origin(base, &src.url) => {
            crate::registration::load_token(&agent.cfg.token_file())
                .ok()
                .flatten()
                .map(|t| t.token)
        }
        _ => None,
    };
    let d = &agent.cfg.downloads;
    download::check_url(&src.url, d)?;
    let max_bytes = src.size.map_or(d.max_bytes, |s| s.min(d.max_bytes));
    let _one = agent
        .download_lock
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    download::fetch(&download::Request {
        url: &src.url,
        sha256: &src.sha256,
        dest,
        bearer,
        attempts: 5,
        retry_delay: Duration::from_secs(2),
        ca_file: agent.cfg.backend.ca_file.as_deref(),
        max_bytes,
        stall_timeout: Some(Duration::from_secs(d.stall_timeout_secs)),
        attempt_timeout: (d.attempt_timeout_secs > 0)
            .then(|| Duration::from_secs(d.attempt_timeout_secs)),
    })
}

/// Scheme, host and port of two URLs are equal.
pub fn same_origin(a: &str, b: &str) -> bool {
    fn origin(u: &str) -> Option<(String, String)> {
        let (scheme, rest) = u.split_once("://")?;
        let host = rest.split(['/', '?', '#']).next()?;
        let host = host.rsplit('@').next()?;
        Some((scheme.to_ascii_lowercase(), host.to_ascii_lowercase()))
    }
    matches!((origin(a), origin(b)), (Some(x), Some(y)) if x == y)
}

fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_check() {
        assert!(same_origin(
            "https://b.example/api/v1",
            "https://B.example/files/x"
        ));
        assert!(!same_origin(
            "https://b.example/api",
            "https://s3.example/x"
        ));
        assert!(!same_origin("https://b.example/api", "http://b.example/x"));
        assert!(!same_origin(
            "https://b.example/api",
            "https://b.example:8443/x"
        ));
        assert!(!same_origin(
            "https://b.example/api",
            "https://b.example.evil/x"
        ));
        assert!(!same_origin(
            "https://b.example",
            "https://evil@x.example/b.example"
        ));
        assert!(!same_origin("https://b.example", "not a url"));
    }

    #[test]
    fn body_errors_name_the_field() {
        let t = TaskRow {
            task_id: "t1".into(),
            task_type: "upgrade".into(),
            body: r#"{"version": "13", "sha256": "00"}"#.into(),
            state: crate::journal::State::Running,
            attempts: 1,
            received_at_ms: 0,
        };
        let e = body::<upgrade::Body>(&t).unwrap_err();
        let m = format!("{e:#}");
        assert!(
            m.contains("missing field `url`") && m.contains("task t1"),
            "{m}"
        );
        let t = TaskRow {
            body: r#"{"version": 13, "url": "u", "sha256": "00"}"#.into(),
            ..t
        };
        let m = format!("{:#}", body::<upgrade::Body>(&t).unwrap_err());
        assert!(m.contains("invalid type"), "{m}");
    }
}
