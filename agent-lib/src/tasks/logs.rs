//! `collectLogs`: a tar.gz of the configured log paths, journalctl output and
//! the agent's own status, uploaded with HTTP PUT. URLs in what the agent
//! writes itself (journalctl text, status) lose their query strings.

use super::safe_name;
use crate::agent::Agent;
use crate::cmd;
use crate::download;
use crate::journal::TaskRow;
use crate::redact;
use crate::registration::now_secs;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::Write;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Body {
    upload_url: String,
}

fn append_text<W: Write>(b: &mut tar::Builder<W>, name: &str, text: &str) -> Result<()> {
    let text = redact::in_text(text);
    let mut h = tar::Header::new_gnu();
    h.set_size(text.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(now_secs().max(0) as u64);
    h.set_cksum();
    b.append_data(&mut h, name, text.as_bytes())
        .with_context(|| format!("adding {name}"))
}

pub(super) fn collect(agent: &Agent, t: &TaskRow, body: &Body) -> Result<Value> {
    let url = body.upload_url.as_str();
    let shown = redact::url(url);
    crate::download::check_url(url, &agent.cfg.downloads)?;
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
        let summary = super::heartbeat(agent).to_string();
        append_text(&mut b, "agent-status.json", &summary)?;
        files.push("agent-status.json".into());
        let recent = serde_json::to_string_pretty(&agent.journal.recent(1000)?)?;
        append_text(&mut b, "agent-tasks.json", &recent)?;
        files.push("agent-tasks.json".into());
        b.into_inner()
            .and_then(|gz| gz.finish())
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", out.display()))?;
    }
    let data = std::fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
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
        .map_err(|e| anyhow::anyhow!("PUT {shown}: {}", redact::in_text(&e.to_string())));
    let _ = std::fs::remove_file(&out);
    let status = resp?.status().as_u16();
    if !(200..300).contains(&status) {
        bail!("PUT {shown}: HTTP {status}; the logs were not uploaded");
    }
    Ok(json!({"bytes": data.len(), "sha256": sha, "files": files}))
}
