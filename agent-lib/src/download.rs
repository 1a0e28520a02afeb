//! Resumable HTTP(S) downloads (ureq 3, no gzip so byte ranges stay byte
//! ranges): `Range` + `If-Range` with the stored ETag, restart from zero when
//! the server answers 200 (changed file) or a range that does not start at
//! the local length, sha256 checked before the file is handed out. One
//! download at a time.
//!
//! Limits: a size cap (`max_bytes`: a bigger announced or received size is
//! refused, nothing kept), a stall timeout (no byte for `stall_timeout`: the
//! attempt fails and the next one resumes) and an overall limit per attempt.
//! URLs appear in logs and errors without their query string (pre-signed
//! credentials). A partial file is resumed only for the same URL *and* the
//! same expected sha256.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub url: &'a str,
    /// Expected sha256 (hex). Required for anything that will be used.
    pub sha256: &'a str,
    pub dest: &'a Path,
    pub bearer: Option<String>,
    pub attempts: u32,
    pub retry_delay: Duration,
    /// Private CA bundle for HTTPS (else the built-in Mozilla roots).
    pub ca_file: Option<&'a Path>,
    /// Largest accepted size in bytes.
    pub max_bytes: u64,
    /// An attempt fails when no data arrives for this long.
    pub stall_timeout: Option<Duration>,
    /// Limit for one attempt (request and whole body).
    pub attempt_timeout: Option<Duration>,
}

impl Request<'_> {
    /// The URL as it may be logged: without query string and credentials.
    pub fn shown_url(&self) -> String {
        crate::redact::url(self.url)
    }
}

/// What a partial file belongs to: it is resumed only when both match.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct PartState {
    url: String,
    #[serde(default)]
    sha256: String,
    validator: Option<String>,
}

/// A refusal that no retry can fix (size over the cap, hash mismatch, 4xx).
fn too_big(req: &Request<'_>, what: &str, n: u64) -> anyhow::Error {
    anyhow::anyhow!(
        "download {}: {what} {n} bytes, more than the limit of {} bytes (the task's `size` \
         or downloads.max_bytes); refused, partial data deleted",
        req.shown_url(),
        req.max_bytes
    )
}

/// Parses `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`).
pub fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((a.parse().ok()?, b.parse().ok()?, total))
}

fn part_paths(dest: &Path) -> (PathBuf, PathBuf) {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = dest.parent().unwrap_or(Path::new("."));
    (
        dir.join(format!("{name}.part")),
        dir.join(format!("{name}.part.json")),
    )
}

pub fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

enum Step {
    Complete,
    Retry(anyhow::Error),
}

/// One HTTP request continuing the part file. Returns Complete when the
/// whole body has been written.
fn attempt(req: &Request<'_>, want: &str, part: &Path, state_path: &Path) -> Result<Step> {
    let shown = req.shown_url();
    let mut state: PartState = std::fs::read_to_string(state_path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if state.url != req.url || state.sha256 != want {
        // another file (or another expected content) was being fetched
        // here: start over
        if have > 0 {
            log::info!(
                "download {shown}: the partial file belongs to another URL or sha256; starting over"
            );
        }
        have = 0;
        state = PartState {
            url: req.url.to_string(),
            sha256: want.to_string(),
            validator: None,
        };
    }
    if have > req.max_bytes {
        let _ = std::fs::remove_file(part);
        return Err(too_big(req, "the partial file already holds", have));
    }
    let mut r = crate::tls::http_agent_with(req.ca_file, req.attempt_timeout, req.stall_timeout)?
        .get(req.url);
    if let Some(b) = &req.bearer {
        r = r.header("Authorization", &format!("Bearer {b}"));
    }
    if have > 0 {
        r = r.header("Range", &format!("bytes={have}-"));
        if let Some(v) = &state.validator {
            r = r.header("If-Range", v);
        }
    }
    let mut resp = match r.call() {
        Ok(r) => r,
        Err(e) => return Ok(Step::Retry(anyhow::anyhow!("GET {shown}: {e}"))),
    };
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let validator = header("etag").or_else(|| header("last-modified"));
    let (offset, total) = match status {
        200 => {
            if have > 0 {
                log::info!(
                    "download {shown}: server sent the whole file (changed or no ranges): restarting"
                );
            }
            (0, header("content-length").and_then(|l| l.parse().ok()))
        }
        206 => match header("content-range")
            .as_deref()
            .and_then(parse_content_range)
        {
            Some((start, _, total)) if start == have => {
                log::info!("download {shown}: resuming at byte {have}");
                (have, total)
            }
            other => {
                // a range we did not ask for: start over
                let _ = std::fs::remove_file(part);
                return Ok(Step::Retry(anyhow::anyhow!(
                    "GET {shown}: 206 with Content-Range {other:?}, expected start {have}; restarting"
                )));
            }
        },
        416 => {
            let total = header("content-range")
                .as_deref()
                .and_then(|v| v.rsplit('/').next()?.parse::<u64>().ok());
            if total == Some(have) {
                return Ok(Step::Complete);
            }
            let _ = std::fs::remove_file(part);
            return Ok(Step::Retry(anyhow::anyhow!("GET {shown}: 416, restarting")));
        }
        s => {
            let err = anyhow::anyhow!("GET {shown}: HTTP {s}");
            if (400..500).contains(&s) && s != 408 && s != 429 {
                return Err(err);
            }
            return Ok(Step::Retry(err));
        }
    };
    if let Some(t) = total.filter(|t| *t > req.max_bytes) {
        let _ = std::fs::remove_file(part);
        let _ = std::fs::remove_file(state_path);
        return Err(too_big(req, "the server announces", t));
    }
    state.validator = validator;
    std::fs::write(state_path, serde_json::to_string(&state)?)
        .with_context(|| format!("writing {}", state_path.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(offset == 0)
        .append(offset > 0)
        .open(part)
        .with_context(|| format!("opening {}", part.display()))?;
    let mut reader = resp.body_mut().as_reader();
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = offset;
    let mut last_log = Instant::now();
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                f.sync_all().ok();
                let stalled = e.kind() == std::io::ErrorKind::TimedOut
                    || e.to_string().to_ascii_lowercase().contains("timeout");
                let why = if stalled {
                    format!(
                        "no data for {:?} (stalled) or the attempt took too long",
                        req.stall_timeout.unwrap_or_default()
                    )
                } else {
                    "connection broke".to_string()
                };
                return Ok(Step::Retry(anyhow::anyhow!(
                    "GET {shown}: {why} after {written} of {} bytes: {}; the next attempt resumes",
                    total.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
                    crate::redact::in_text(&e.to_string())
                )));
            }
        };
        if written + n as u64 > req.max_bytes {
            drop(f);
            let _ = std::fs::remove_file(part);
            let _ = std::fs::remove_file(state_path);
            return Err(too_big(req, "the server sent more than", req.max_bytes));
        }
        f.write_all(&buf[..n])
            .with_context(|| format!("writing {}", part.display()))?;
        written += n as u64;
        if last_log.elapsed() > Duration::from_secs(10) {
            last_log = Instant::now();
            log::info!("download {shown}: {written} of {total:?} bytes");
        }
    }
    f.sync_all()?;
    if let Some(t) = total {
        if written < t {
            return Ok(Step::Retry(anyhow::anyhow!(
                "GET {shown}: body ended after {written} of {t} bytes"
            )));
        }
    }
    Ok(Step::Complete)
}

/// Whether a task's URL may be fetched or posted to under the configured policy
/// (issue 23 item 4: the backend and broker are not trusted to pick hosts):
/// `https` (and `http` only when allowed), no loopback, link-local or
/// unspecified address unless allowed, and only the allowed hosts when a list
/// is configured. The refusal names the URL (without secrets) and the setting.
pub fn check_url(url: &str, policy: &crate::config::DownloadsConfig) -> Result<()> {
    let shown = crate::redact::url(url);
    let uri: ureq::http::Uri = url
        .parse()
        .with_context(|| format!("{shown} is not a URL; refused, nothing was fetched or sent"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if policy.allow_http => {}
        Some("http") => bail!(
            "{shown}: plain http is refused (set downloads.allow_http = true for labs); nothing was fetched or sent"
        ),
        other => bail!(
            "{shown}: scheme {:?} is refused, only https (and http when allowed); nothing was fetched or sent",
            other.unwrap_or("")
        ),
    }
    let host = uri
        .host()
        .with_context(|| format!("{shown} names no host; refused"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if !policy.allow_local && is_local_host(&host) {
        bail!(
            "{shown}: {host} is a loopback, link-local or unspecified address; refused (set downloads.allow_local = true for labs), nothing was fetched or sent"
        );
    }
    if !policy.allow_hosts.is_empty()
        && !policy.allow_hosts.iter().any(|h| {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .eq_ignore_ascii_case(&host)
        })
    {
        bail!(
            "{shown}: host {host} is not in downloads.allow_hosts; refused, nothing was fetched or sent"
        );
    }
    Ok(())
}

fn is_local_host(host: &str) -> bool {
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => a.is_loopback() || a.is_link_local() || a.is_unspecified(),
        Ok(std::net::IpAddr::V6(a)) => {
            a.is_loopback()
                || a.is_unspecified()
                || (a.segments()[0] & 0xffc0) == 0xfe80
                || a.to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_link_local() || v4.is_unspecified())
        }
        Err(_) => false,
    }
}

/// Downloads (or resumes) `req.url` to `req.dest`, checking its sha256.
/// A hash mismatch deletes the partial data and fails (never retried: the
/// source is wrong or tampered with).
pub fn fetch(req: &Request<'_>) -> Result<PathBuf> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let shown = req.shown_url();
    let want = req.sha256.to_ascii_lowercase();
    if want.len() != 64 || !want.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!(
            "download {shown}: sha256 {:?} is not 64 hex digits; nothing was downloaded",
            req.sha256
        );
    }
    if let Some(dir) = req.dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if req.dest.exists() && sha256_file(req.dest)? == want {
        log::info!(
            "download {shown}: already present at {}",
            req.dest.display()
        );
        return Ok(req.dest.to_path_buf());
    }
    let (part, state_path) = part_paths(req.dest);
    let mut last_err = None;
    for n in 1..=req.attempts.max(1) {
        match attempt(req, &want, &part, &state_path)? {
            Step::Complete => {
                let got = sha256_file(&part)?;
                if got != want {
                    let _ = std::fs::remove_file(&part);
                    let _ = std::fs::remove_file(&state_path);
                    bail!(
                        "download {shown}: sha256 mismatch (expected {want}, got {got}): refused, data deleted"
                    );
                }
                std::fs::rename(&part, req.dest)
                    .with_context(|| format!("renaming to {}", req.dest.display()))?;
                let _ = std::fs::remove_file(&state_path);
                return Ok(req.dest.to_path_buf());
            }
            Step::Retry(e) => {
                log::warn!("download attempt {n}/{}: {e:#}", req.attempts);
                last_err = Some(e);
                if n < req.attempts {
                    std::thread::sleep(req.retry_delay);
                }
            }
        }
    }
    Err(last_err
        .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
        .context(format!(
            "download {shown} failed after {} attempts",
            req.attempts
        )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, 199, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 0-9/*"), Some((0, 9, None)));
        assert_eq!(parse_content_range("items 0-9/10"), None);
    }

    #[test]
    fn bad_hash_argument() {
        let d = tempfile::tempdir().unwrap();
        let r = Request {
            url: "http://127.0.0.1:1/x",
            sha256: "abc",
            dest: &d.path().join("x"),
            bearer: None,
            attempts: 1,
            retry_delay: Duration::ZERO,
            ca_file: None,
            max_bytes: u64::MAX,
            stall_timeout: None,
            attempt_timeout: None,
        };
        assert!(fetch(&r).is_err());
    }

    #[test]
    fn task_urls_follow_the_policy() {
        use crate::config::DownloadsConfig;
        let strict = DownloadsConfig::default();
        check_url("https://updates.example.com/os.bundle?sig=x", &strict).unwrap();
        for (url, why) in [
            ("http://updates.example.com/os.bundle", "plain http"),
            ("ftp://updates.example.com/os.bundle", "scheme"),
            ("file:///etc/shadow", "scheme"),
            ("https://127.0.0.1:8443/x", "loopback"),
            ("https://localhost/x", "loopback"),
            ("https://169.254.169.254/latest/meta-data/", "link-local"),
            ("https://[::1]/x", "loopback"),
            ("https://[fe80::1]/x", "link-local"),
            ("https://0.0.0.0/x", "unspecified"),
            ("not a url", "not a URL"),
        ] {
            let e = check_url(url, &strict).unwrap_err().to_string();
            assert!(e.contains(why) || e.contains("refused"), "{url}: {e}");
            assert!(
                e.contains("nothing was fetched") || e.contains("refused"),
                "{url}: {e}"
            );
        }
        let lab = DownloadsConfig {
            allow_http: true,
            allow_local: true,
            ..DownloadsConfig::default()
        };
        check_url("http://127.0.0.1:8080/os.bundle", &lab).unwrap();
        let pinned = DownloadsConfig {
            allow_hosts: vec!["updates.example.com".into()],
            ..DownloadsConfig::default()
        };
        check_url("https://UPDATES.example.com/a", &pinned).unwrap();
        let e = check_url("https://evil.example.net/a", &pinned)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in downloads.allow_hosts"), "{e}");
    }
}
