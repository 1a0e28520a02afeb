//! Registration (register token → device id + device token) and token refresh.
//!
//! Backend contract (JSON):
//! - `POST <url>/register`, `Authorization: Bearer <register JWT>`, body
//!   `{"hardware": {...}}` → `{"deviceId", "deviceToken", "expiresIn"?, "expiresAt"?}`
//! - `POST <url>/token/refresh`, `Authorization: Bearer <device token>` → same answer;
//!   `401` means the device token is no longer accepted: register again.
//!
//! Expiry comes from the server: `expiresIn` (seconds) is used as is; an
//! absolute `expiresAt` (unix seconds) is corrected by the server's `Date`
//! header so a wrong local clock does not shift it.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Token {
    #[serde(rename = "deviceId")]
    pub device_id: String,
    pub token: String,
    /// Local unix seconds when it was obtained.
    #[serde(rename = "obtainedAt")]
    pub obtained_at: i64,
    /// Local unix seconds when it expires (server lifetime applied to the local clock).
    #[serde(rename = "expiresAt")]
    pub expires_at: Option<i64>,
}

impl Token {
    /// When to refresh: `fraction` of the lifetime before expiry.
    pub fn refresh_at(&self, fraction: f64) -> Option<i64> {
        let exp = self.expires_at?;
        let life = (exp - self.obtained_at).max(0) as f64;
        Some(exp - (life * fraction).ceil() as i64)
    }
}

pub fn now_secs() -> i64 {
    crate::journal::now_ms() / 1000
}

pub fn device_id(cfg: &Config) -> Result<String> {
    if let Some(id) = &cfg.device_id {
        return Ok(id.clone());
    }
    match load_token(&cfg.token_file())? {
        Some(t) => Ok(t.device_id),
        None => bail!(
            "no device id: set device_id in the config or run `dualroot-agent register --token JWT`"
        ),
    }
}

pub fn load_token(path: &Path) -> Result<Option<Token>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(
            serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes a secret file atomically with mode 0600.
pub fn write_secret(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A temp name of its own per write: the refresh loop and a refresh after the
    // broker refused the token can write at once, and with one shared name the
    // second writer removed the first one's file and its rename failed (ENOENT).
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

pub fn save_token(path: &Path, t: &Token) -> Result<()> {
    write_secret(path, serde_json::to_string_pretty(t)?.as_bytes())
}

pub fn register_token_path(cfg: &Config) -> PathBuf {
    cfg.backend
        .register_token_file
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("register-token"))
}

/// At start: not registered yet, but a backend URL and a register token
/// (shipped with the appliance image) are there → register now.
pub fn ensure_registered(cfg: &Config) -> Result<()> {
    if device_id(cfg).is_ok() || cfg.backend.url.is_none() {
        return Ok(());
    }
    let p = register_token_path(cfg);
    let Ok(jwt) = std::fs::read_to_string(&p) else {
        return Ok(());
    };
    log::info!("not registered yet: registering with {}", p.display());
    register(cfg, jwt.trim()).map(|_| ())
}

/// Hardware facts posted at registration.
pub fn hardware_facts(cfg: &Config) -> Value {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let mem_kib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let mut nics = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/class/net") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "lo" {
                continue;
            }
            let mac = read(&format!("/sys/class/net/{name}/address"));
            nics.push(json!({"name": name, "mac": mac}));
        }
    }
    json!({
        "hostname": read("/proc/sys/kernel/hostname"),
        "machineId": read("/etc/machine-id"),
        "cpu": cpu,
        "memKiB": mem_kib,
        "nics": nics,
        "firmwareVersion": cfg.firmware_version(),
        "productSerial": read("/sys/class/dmi/id/product_serial"),
    })
}

fn http(cfg: &Config) -> std::result::Result<ureq::Agent, HttpError> {
    crate::tls::http_agent(
        cfg.backend.ca_file.as_deref(),
        Some(Duration::from_secs(30)),
    )
    .map_err(HttpError::Other)
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) into unix seconds.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: i64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as i64
        + 1;
    let year: i64 = parts[3].parse().ok()?;
    let hms: Vec<i64> = parts[4].split(':').filter_map(|x| x.parse().ok()).collect();
    if hms.len() != 3 {
        return None;
    }
    // days from civil (Howard Hinnant)
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2])
}

/// A device id the agent can use as MQTT client id and topic level: 1-128
/// characters, none of MQTT's `/`, `+`, `#`, no control characters.
pub fn check_device_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 128
        || id.contains(['/', '+', '#'])
        || id.chars().any(char::is_control)
    {
        anyhow::bail!(
            "device id {id:?} cannot be used in MQTT topics and as client id (1-128 characters, no '/', '+', '#' or control characters)"
        );
    }
    Ok(())
}

/// Turns a server answer into a token, expiry from the server's figures. A
/// device id the agent could not run with is refused here, before anything is
/// saved: stored, it would stop every later start of the agent (a crash loop).
pub fn token_from_answer(v: &Value, server_date: Option<i64>, local_now: i64) -> Result<Token> {
    let device_id = v
        .get("deviceId")
        .and_then(Value::as_str)
        .context("answer has no deviceId")?;
    check_device_id(device_id).context("the backend's registration answer was refused; nothing was saved and registration is tried again later")?;
    let token = v
        .get("deviceToken")
        .or_else(|| v.get("token"))
        .and_then(Value::as_str)
        .context("answer has no deviceToken")?;
    let expires_at = if let Some(secs) = v.get("expiresIn").and_then(Value::as_i64) {
        Some(local_now + secs)
    } else if let Some(at) = v.get("expiresAt").and_then(Value::as_i64) {
        let server_now = server_date.unwrap_or(local_now);
        Some(local_now + (at - server_now))
    } else {
        None
    };
    Ok(Token {
        device_id: device_id.to_string(),
        token: token.to_string(),
        obtained_at: local_now,
        expires_at,
    })
}

#[derive(Debug)]
pub enum HttpError {
    Unauthorized,
    Other(anyhow::Error),
}

fn post(
    cfg: &Config,
    url: &str,
    bearer: &str,
    body: &Value,
) -> std::result::Result<Value, HttpError> {
    let mut resp = http(cfg)?
        .post(url)
        .header("Authorization", &format!("Bearer {bearer}"))
        .content_type("application/json")
        .send(body.to_string())
        .map_err(|e| HttpError::Other(anyhow::anyhow!("POST {url}: {e}")))?;
    let status = resp.status().as_u16();
    if status == 401 {
        return Err(HttpError::Unauthorized);
    }
    let date = resp
        .headers()
        .get("date")
        .and_then(|d| d.to_str().ok())
        .and_then(parse_http_date);
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| HttpError::Other(anyhow::anyhow!("reading answer of {url}: {e}")))?;
    if !(200..300).contains(&status) {
        return Err(HttpError::Other(anyhow::anyhow!(
            "POST {url}: HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        )));
    }
    let mut v: Value = serde_json::from_str(&text)
        .map_err(|e| HttpError::Other(anyhow::anyhow!("answer of {url} is not JSON: {e}")))?;
    if let Some(d) = date {
        crate::clock::record(cfg, d, now_secs());
        v["_serverDate"] = json!(d);
    }
    Ok(v)
}

fn base_url(cfg: &Config) -> Result<String> {
    Ok(cfg
        .backend
        .url
        .clone()
        .context("backend.url is not configured")?
        .trim_end_matches('/')
        .to_string())
}

/// Registers with a register token; stores the device token (0600) and the
/// register token (for re-registering on 401).
pub fn register(cfg: &Config, register_token: &str) -> Result<Token> {
    let url = format!("{}/register", base_url(cfg)?);
    let v = post(
        cfg,
        &url,
        register_token,
        &json!({"hardware": hardware_facts(cfg)}),
    )
    .map_err(|e| match e {
        HttpError::Unauthorized => anyhow::anyhow!("POST {url}: register token refused (401)"),
        HttpError::Other(e) => e,
    })?;
    let t = token_from_answer(&v, v.get("_serverDate").and_then(Value::as_i64), now_secs())?;
    save_token(&cfg.token_file(), &t)?;
    write_secret(&register_token_path(cfg), register_token.as_bytes())?;
    log::info!(
        "registered as device {} (token expires at {:?})",
        t.device_id,
        t.expires_at
    );
    Ok(t)
}

/// Refreshes the device token; on 401 registers again with the stored register token.
pub fn refresh(cfg: &Config) -> Result<Token> {
    let cur = load_token(&cfg.token_file())?.context("not registered: no token file")?;
    let url = format!("{}/token/refresh", base_url(cfg)?);
    match post(cfg, &url, &cur.token, &json!({"deviceId": cur.device_id})) {
        Ok(v) => {
            let t =
                token_from_answer(&v, v.get("_serverDate").and_then(Value::as_i64), now_secs())?;
            save_token(&cfg.token_file(), &t)?;
            log::info!("device token refreshed (expires at {:?})", t.expires_at);
            Ok(t)
        }
        Err(HttpError::Unauthorized) => {
            log::warn!("device token refused (401): registering again");
            let p = register_token_path(cfg);
            let jwt = std::fs::read_to_string(&p)
                .with_context(|| format!("reading register token {}", p.display()))?;
            register(cfg, jwt.trim())
        }
        Err(HttpError::Other(e)) => Err(e),
    }
}

/// Keeps the token fresh: refreshes when `refresh_fraction` of its lifetime is left.
pub fn refresh_loop(cfg: &Config) {
    let mut backoff = crate::backoff::Backoff::new(5_000, 300_000);
    loop {
        let wait = match load_token(&cfg.token_file()) {
            Ok(Some(t)) => match t.refresh_at(cfg.backend.refresh_fraction) {
                Some(at) if at <= now_secs() => match refresh(cfg) {
                    Ok(_) => {
                        backoff.reset();
                        Duration::from_secs(1)
                    }
                    Err(e) => {
                        log::error!("token refresh: {e:#}");
                        backoff.next_delay()
                    }
                },
                Some(at) => Duration::from_secs((at - now_secs()).clamp(1, 3600) as u64),
                None => Duration::from_secs(3600),
            },
            Ok(None) => Duration::from_secs(60),
            Err(e) => {
                log::error!("token file: {e:#}");
                Duration::from_secs(60)
            }
        };
        std::thread::sleep(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_date() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784111777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_date("garbage"), None);
    }

    #[test]
    fn expiry_from_server_not_local_clock() {
        // server clock is 1000 s ahead of ours; token valid 600 s by the server
        let v = json!({"deviceId":"d","deviceToken":"t","expiresAt": 11_600});
        let t = token_from_answer(&v, Some(11_000), 10_000).unwrap();
        assert_eq!(t.expires_at, Some(10_600));
        let v = json!({"deviceId":"d","deviceToken":"t","expiresIn": 100});
        let t = token_from_answer(&v, None, 50).unwrap();
        assert_eq!(t.expires_at, Some(150));
        assert_eq!(t.refresh_at(0.25), Some(125));
    }

    /// Issue 23 item 12: a deviceId with `/` from the backend is refused before
    /// it is stored (stored, every start of the agent failed: a crash loop).
    #[test]
    fn unusable_device_id_from_the_backend_is_refused() {
        for bad in ["a/b", "dev+1", "#", "", "x\ny"] {
            let v = json!({"deviceId": bad, "deviceToken": "t"});
            let e = format!("{:#}", token_from_answer(&v, None, 0).unwrap_err());
            assert!(e.contains("nothing was saved"), "{bad:?}: {e}");
        }
        let long = "d".repeat(129);
        assert!(
            token_from_answer(&json!({"deviceId": long, "deviceToken": "t"}), None, 0).is_err()
        );
        assert!(token_from_answer(
            &json!({"deviceId": "va-7.000123", "deviceToken": "t"}),
            None,
            0
        )
        .is_ok());
    }

    /// Two writers at once (the refresh loop and a refresh after the broker
    /// refused the token) both succeed; the file is one of the two, whole.
    #[test]
    fn concurrent_secret_writes_do_not_fail() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token.json");
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for k in 0..200 {
                        write_secret(&p, format!("{i}-{k}").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.ends_with("-199"), "{text}");
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temp files left");
    }

    #[test]
    fn secret_file_is_0600() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/token.json");
        let t = Token {
            device_id: "d".into(),
            token: "x".into(),
            obtained_at: 1,
            expires_at: None,
        };
        save_token(&p, &t).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_token(&p).unwrap(), Some(t));
    }
}
