//! Task handlers, one per task type.

use crate::agent::Agent;
use crate::cmd;
use crate::download;
use crate::journal::TaskRow;
use crate::registration::now_secs;
use crate::services;
use anyhow::{bail, Context, Result};
use dualroot_api::Slot;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub enum Outcome {
    Done(Value),
    Failed(String, Value),
    /// The task continues after a restart (upgrade waiting for its reboot).
    Suspended,
}

/// Task types that resume after a restart instead of failing as interrupted.
pub fn resumable(task_type: &str) -> bool {
    task_type == "upgrade"
}

pub fn run(agent: &Agent, t: &TaskRow, resumed: bool) -> Outcome {
    let body: Value = serde_json::from_str(&t.body).unwrap_or(Value::Null);
    let r = match t.task_type.as_str() {
        "heartbeat" => Ok(Outcome::Done(heartbeat(agent))),
        crate::protocol::TEST_TASK => test_sleep(agent, t, &body),
        "register" => crate::registration::refresh(&agent.cfg).map(|tok| {
            Outcome::Done(json!({"deviceId": tok.device_id, "expiresAt": tok.expires_at}))
        }),
        "installService" => install_service(agent, &body).map(Outcome::Done),
        "uninstallService" => uninstall_service(agent, &body).map(Outcome::Done),
        "collectLogs" => collect_logs(agent, t, &body).map(Outcome::Done),
        "migrate" => migrate(agent, t, &body).map(Outcome::Done),
        "upgrade" => upgrade(agent, t, &body, resumed),
        other => Err(anyhow::anyhow!("no handler for task type {other:?}")),
    };
    match r {
        Ok(o) => o,
        Err(e) => Outcome::Failed(format!("{e:#}"), Value::Null),
    }
}

fn body_str<'a>(body: &'a Value, key: &str) -> Result<&'a str> {
    body.get(key)
        .and_then(Value::as_str)
        .with_context(|| format!("task body needs a string {key:?}"))
}

// ---------------------------------------------------------------- heartbeat

/// Slot part of the heartbeat: "unknown" (with the reason) when the engine
/// is missing or its answer cannot be read.
pub fn slot_report(agent: &Agent) -> Value {
    match agent.engine.slot_status() {
        Ok(s) => json!({
            "booted": s.booted.map_or("unknown", |b| b.name()),
            "primary": s.primary,
            "fallback": s.last_boot_was_fallback,
            "bootedGood": s.booted_good(),
            "version": s.version,
        }),
        Err(e) => {
            let reason = if cmd::is_not_found(&e) {
                format!("{} not installed", agent.cfg.dualroot_bin)
            } else {
                format!("{e:#}").chars().take(300).collect()
            };
            json!({"booted": "unknown", "fallback": "unknown", "reason": reason})
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct InstalledService {
    version: String,
    #[serde(rename = "installedAt")]
    installed_at: i64,
}

fn installed_services(agent: &Agent) -> Vec<(String, InstalledService)> {
    agent
        .journal
        .kv_prefix("service:")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| {
            Some((
                k.strip_prefix("service:")?.to_string(),
                serde_json::from_str(&v).ok()?,
            ))
        })
        .collect()
}

/// Installed services whose health is not "healthy", as "code: health".
pub fn unhealthy_services(agent: &Agent) -> Vec<String> {
    installed_services(agent)
        .into_iter()
        .map(|(code, _)| (agent.services.health(&code), code))
        .filter(|(h, _)| h != "healthy")
        .map(|(h, code)| format!("{code}: {h}"))
        .collect()
}

pub fn heartbeat(agent: &Agent) -> Value {
    let services: Vec<Value> = installed_services(agent)
        .into_iter()
        .map(|(code, s)| json!({"code": code, "version": s.version, "health": agent.services.health(&code)}))
        .collect();
    json!({
        "deviceId": agent.device_id,
        "firmwareVersion": agent.cfg.firmware_version(),
        "agentVersion": env!("CARGO_PKG_VERSION"),
        "slot": slot_report(agent),
        "services": services,
        "outboxPending": agent.journal.outbox_len().unwrap_or(0),
    })
}

// ---------------------------------------------------------------- test task

fn test_sleep(agent: &Agent, t: &TaskRow, body: &Value) -> Result<Outcome> {
    if let Some(marker) = body.get("marker").and_then(Value::as_str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(marker)
            .with_context(|| format!("opening marker {marker}"))?;
        writeln!(f, "{}", t.task_id)?;
        f.sync_all()?;
    }
    crate::failpoint::hit("in_task", &agent.cfg.data_dir);
    let ms = body.get("ms").and_then(Value::as_u64).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(ms));
    Ok(Outcome::Done(json!({"slept": ms})))
}

// ---------------------------------------------------------------- services

fn fetch_to(agent: &Agent, body: &Value, dest: &Path) -> Result<PathBuf> {
    let url = body_str(body, "url")?;
    let sha = body_str(body, "sha256")?;
    // the device token goes only to the backend itself, never to another
    // host named in a task (e.g. a pre-signed storage URL)
    let bearer = match &agent.cfg.backend.url {
        Some(base) if same_origin(base, url) => {
            crate::registration::load_token(&agent.cfg.token_file())
                .ok()
                .flatten()
                .map(|t| t.token)
        }
        _ => None,
    };
    let _one = agent
        .download_lock
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    download::fetch(&download::Request {
        url,
        sha256: sha,
        dest,
        bearer,
        attempts: 5,
        retry_delay: Duration::from_secs(2),
        ca_file: agent.cfg.backend.ca_file.as_deref(),
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

fn install_service(agent: &Agent, body: &Value) -> Result<Value> {
    let code = body_str(body, "serviceCode")?;
    let version = body_str(body, "version")?;
    let ns = services::namespace_for(code)?;
    let key = format!("service:{ns}");
    if let Some(cur) = agent.journal.kv_get(&key)? {
        if let Ok(cur) = serde_json::from_str::<InstalledService>(&cur) {
            if cur.version == version {
                log::info!("service {ns} {version} already installed: nothing to do");
                return Ok(json!({"namespace": ns, "version": version, "changed": false}));
            }
        }
    }
    let dl = agent
        .cfg
        .data_dir
        .join("downloads")
        .join(format!("service-{ns}-{}.tar.gz", safe_name(version)));
    let archive = fetch_to(agent, body, &dl)?;
    let dir = agent
        .cfg
        .data_dir
        .join("services")
        .join(&ns)
        .join(safe_name(version));
    let pkg = services::unpack_package(&archive, &dir)?;
    agent
        .services
        .ensure_namespace(&ns)
        .context("creating namespace")?;
    for img in &pkg.images {
        agent
            .services
            .import_image(img)
            .with_context(|| format!("importing image {}", img.display()))?;
    }
    for m in &pkg.manifests {
        agent
            .services
            .apply(&ns, m)
            .with_context(|| format!("applying {}", m.display()))?;
    }
    let rec = InstalledService {
        version: version.to_string(),
        installed_at: now_secs(),
    };
    agent.journal.kv_set(&key, &serde_json::to_string(&rec)?)?;
    let _ = std::fs::remove_file(&archive);
    Ok(json!({
        "namespace": ns,
        "version": version,
        "changed": true,
        "images": pkg.images.len(),
        "manifests": pkg.manifests.len(),
    }))
}

fn uninstall_service(agent: &Agent, body: &Value) -> Result<Value> {
    let code = body_str(body, "serviceCode")?;
    let ns = services::namespace_for(code)?;
    let key = format!("service:{ns}");
    let was = agent.journal.kv_get(&key)?.is_some();
    agent
        .services
        .delete_namespace(&ns)
        .context("deleting namespace")?;
    agent.journal.kv_delete(&key)?;
    let dir = agent.cfg.data_dir.join("services").join(&ns);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(json!({"namespace": ns, "changed": was}))
}

// ---------------------------------------------------------------- logs

fn append_text<W: Write>(b: &mut tar::Builder<W>, name: &str, text: &str) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(text.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(now_secs().max(0) as u64);
    h.set_cksum();
    b.append_data(&mut h, name, text.as_bytes())
        .with_context(|| format!("adding {name}"))
}

fn collect_logs(agent: &Agent, t: &TaskRow, body: &Value) -> Result<Value> {
    let url = body_str(body, "uploadUrl")?;
    let out = agent
        .cfg
        .data_dir
        .join(format!("logs-{}.tar.gz", safe_name(&t.task_id)));
    let mut files = Vec::new();
    {
        let f =
            std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            f,
            flate2::Compression::default(),
        ));
        b.follow_symlinks(false);
        for p in &agent.cfg.logs.paths {
            let name = p.to_string_lossy().trim_start_matches('/').to_string();
            if p.is_dir() {
                b.append_dir_all(&name, p)
                    .with_context(|| format!("adding {}", p.display()))?;
                files.push(name);
            } else if p.is_file() {
                b.append_path_with_name(p, &name)
                    .with_context(|| format!("adding {}", p.display()))?;
                files.push(name);
            }
        }
        if agent.cfg.logs.journalctl_lines > 0 {
            let n = agent.cfg.logs.journalctl_lines.to_string();
            for (file, extra) in [
                ("journal-agent.txt", vec!["-u", "dualroot-agent"]),
                ("journal-boot.txt", vec!["-b"]),
                ("journal-previous-boot.txt", vec!["-b", "-1"]),
            ] {
                let mut args = vec!["--no-pager", "-o", "short-iso", "-n", n.as_str()];
                args.extend(extra);
                let text = match cmd::run_timeout(
                    &mut cmd::command("journalctl", &args),
                    Duration::from_secs(120),
                ) {
                    Ok(o) => o.stdout,
                    Err(e) => format!("journalctl unavailable: {e:#}\n"),
                };
                append_text(&mut b, file, &text)?;
                files.push(file.to_string());
            }
        }
        let summary = crate::tasks::heartbeat(agent).to_string();
        append_text(&mut b, "agent-status.json", &summary)?;
        files.push("agent-status.json".into());
        let recent = serde_json::to_string_pretty(&agent.journal.recent(1000)?)?;
        append_text(&mut b, "agent-tasks.json", &recent)?;
        files.push("agent-tasks.json".into());
        b.into_inner()?.finish()?.sync_all()?;
    }
    let data = std::fs::read(&out)?;
    let sha = download::sha256_file(&out)?;
    let http = crate::tls::http_agent(
        agent.cfg.backend.ca_file.as_deref(),
        Some(Duration::from_secs(600)),
    )?;
    let resp = http
        .put(url)
        .header("Content-Type", "application/gzip")
        .header("X-Content-Sha256", &sha)
        .send(&data[..])
        .map_err(|e| anyhow::anyhow!("PUT {url}: {e}"))?;
    let status = resp.status().as_u16();
    let _ = std::fs::remove_file(&out);
    if !(200..300).contains(&status) {
        bail!("PUT {url}: HTTP {status}");
    }
    Ok(json!({"bytes": data.len(), "sha256": sha, "files": files}))
}

// ---------------------------------------------------------------- migrate

fn migrate(agent: &Agent, t: &TaskRow, body: &Value) -> Result<Value> {
    let dest = agent.cfg.data_dir.join("downloads").join("migrate.bundle");
    let bundle = fetch_to(agent, body, &dest)?;
    agent
        .engine
        .bundle_verify(&bundle)
        .context("verifying bundle")?;
    let text = body.get("plan").and_then(Value::as_str).context(
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
    if body.get("reboot").and_then(Value::as_bool).unwrap_or(false) {
        agent
            .engine
            .reboot()
            .context("rebooting into the migration")?;
    }
    Ok(json!({"staged": true, "output": out}))
}

// ---------------------------------------------------------------- upgrade

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpgradeState {
    pub phase: String,
    #[serde(rename = "predownloadAt")]
    pub predownload_at: i64,
    #[serde(rename = "targetSlot")]
    pub target_slot: Option<String>,
    #[serde(rename = "fromSlot")]
    pub from_slot: Option<String>,
    #[serde(rename = "fromVersion")]
    pub from_version: Option<String>,
    #[serde(rename = "bootId")]
    pub boot_id: Option<String>,
}

/// Draws the pre-download time inside the window `[start, end]` (unix secs);
/// no window means now.
pub fn draw_predownload(window: Option<(i64, i64)>, now: i64) -> i64 {
    match window {
        Some((start, end)) if end > start => start + fastrand::i64(0..=(end - start)),
        Some((start, _)) => start,
        None => now,
    }
}

pub fn boot_id(agent: &Agent) -> String {
    std::fs::read_to_string(&agent.cfg.upgrade.boot_id_file)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn sleep_until(at: i64) {
    loop {
        let now = now_secs();
        if now >= at {
            return;
        }
        std::thread::sleep(Duration::from_secs((at - now).min(60) as u64));
    }
}

/// The switch is armed: the next boot tries the new slot whatever happens
/// now, so a failed reboot command does not fail the task; it finishes after
/// the next boot, whoever triggers it.
fn reboot_or_wait(agent: &Agent, task_id: &str) {
    if let Err(e) = agent.engine.reboot() {
        log::error!(
            "upgrade {task_id}: reboot failed ({e:#}); the new slot is armed and will be \
             checked after the next boot"
        );
    }
}

fn upgrade(agent: &Agent, t: &TaskRow, body: &Value, _resumed: bool) -> Result<Outcome> {
    let key = format!("upgrade:{}", t.task_id);
    let save =
        |s: &UpgradeState| -> Result<()> { agent.journal.kv_set(&key, &serde_json::to_string(s)?) };
    let version = body_str(body, "version")?.to_string();
    for (k, v) in agent.journal.kv_prefix("upgrade:")? {
        let other: Option<UpgradeState> = serde_json::from_str(&v).ok();
        if k != key && other.is_some_and(|o| o.phase == "installed" || o.phase == "switched") {
            bail!(
                "another upgrade ({}) has armed a slot switch and waits for its reboot",
                k.trim_start_matches("upgrade:")
            );
        }
    }
    let mut st: UpgradeState = match agent.journal.kv_get(&key)? {
        Some(s) => serde_json::from_str(&s).context("reading persisted upgrade state")?,
        None => {
            let window = body
                .get("window")
                .and_then(|w| Some((w.get("start")?.as_i64()?, w.get("end")?.as_i64()?)));
            let s = UpgradeState {
                phase: "scheduled".into(),
                predownload_at: draw_predownload(window, now_secs()),
                target_slot: None,
                from_slot: None,
                from_version: None,
                boot_id: None,
            };
            save(&s)?;
            log::info!(
                "upgrade {}: pre-download at {} (unix)",
                t.task_id,
                s.predownload_at
            );
            s
        }
    };
    let bundle_path = agent
        .cfg
        .data_dir
        .join("downloads")
        .join(format!("upgrade-{}.bundle", safe_name(&version)));

    if st.phase == "scheduled" {
        sleep_until(st.predownload_at);
        let bundle = fetch_to(agent, body, &bundle_path)?;
        agent
            .engine
            .bundle_verify(&bundle)
            .context("verifying bundle signature")?;
        st.phase = "downloaded".into();
        save(&st)?;
    }
    if st.phase == "downloaded" {
        let before = agent.engine.slot_status().context("reading slot status")?;
        st.from_slot = before.booted.map(|b| b.name().to_string());
        st.from_version = before.version.clone();
        let report = agent
            .engine
            .slot_install(&bundle_path)
            .context("installing into the inactive slot")?;
        st.target_slot = Some(report.slot.name().to_string());
        st.phase = "installed".into();
        save(&st)?;
    }
    if st.phase == "installed" {
        if let Some(at) = body.get("switchAt").and_then(Value::as_i64) {
            sleep_until(at);
        }
        let target = st.target_slot.clone().context("no target slot recorded")?;
        let slot = Slot::parse(&target)
            .with_context(|| format!("recorded target slot {target:?} is not a or b"))?;
        agent.engine.slot_switch(slot).context("switching slots")?;
        st.phase = "switched".into();
        st.boot_id = Some(boot_id(agent));
        save(&st)?;
        let _ = std::fs::remove_file(&bundle_path);
        log::info!(
            "upgrade {}: switched to slot {target}, rebooting",
            t.task_id
        );
        reboot_or_wait(agent, &t.task_id);
        return Ok(Outcome::Suspended);
    }
    if st.phase == "switched" {
        if st.boot_id.as_deref() == Some(boot_id(agent).as_str()) {
            log::info!(
                "upgrade {}: still the same boot; rebooting again",
                t.task_id
            );
            reboot_or_wait(agent, &t.task_id);
            return Ok(Outcome::Suspended);
        }
        let now = agent
            .engine
            .slot_status()
            .context("reading slot status after reboot")?;
        let target = st.target_slot.clone().unwrap_or_default();
        let on_target = now.booted.is_some()
            && now.booted == Slot::parse(&target)
            && !now.last_boot_was_fallback;
        if !on_target {
            st.phase = "rolled back".into();
            save(&st)?;
            return Ok(Outcome::Failed(
                format!(
                    "rolled back: running slot {} version {} instead of slot {target} version {version}",
                    now.booted.map_or("unknown", |b| b.name()),
                    now.version.as_deref().unwrap_or("unknown")
                ),
                json!({"status": "rolled back", "runningSlot": now.booted, "runningVersion": now.version, "wantedVersion": version}),
            ));
        }
        // services need a while to come up after a reboot
        let deadline = now_secs() + agent.cfg.upgrade.health_timeout_secs as i64;
        let unhealthy = loop {
            let u = unhealthy_services(agent);
            if u.is_empty() || now_secs() >= deadline {
                break u;
            }
            std::thread::sleep(Duration::from_secs(5));
        };
        if !unhealthy.is_empty() {
            st.phase = "unhealthy".into();
            save(&st)?;
            return Ok(Outcome::Failed(
                format!(
                    "new slot {target} is up but not healthy ({}); not confirmed, \
                     GRUB falls back when its tries are used up",
                    unhealthy.join(", ")
                ),
                json!({"status": "unhealthy", "runningSlot": now.booted, "runningVersion": now.version}),
            ));
        }
        if let Err(e) = agent.engine.slot_confirm() {
            st.phase = "unconfirmed".into();
            save(&st)?;
            return Err(e.context("confirming the new slot"));
        }
        st.phase = "confirmed".into();
        save(&st)?;
        return Ok(Outcome::Done(json!({
            "status": "upgraded",
            "slot": target,
            "version": now.version.unwrap_or(version),
            "previousVersion": st.from_version,
        })));
    }
    bail!("upgrade in unexpected phase {:?}", st.phase)
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
    fn predownload_in_window() {
        for _ in 0..100 {
            let t = draw_predownload(Some((1000, 2000)), 5);
            assert!((1000..=2000).contains(&t));
        }
        assert_eq!(draw_predownload(None, 5), 5);
        assert_eq!(draw_predownload(Some((7, 7)), 5), 7);
    }
}
