//! Resumable HTTP(S) downloads (ureq 3, no gzip so byte ranges stay byte
//! ranges): `Range` + `If-Range` with the stored ETag, restart from zero when
//! the server answers 200 (changed file) or a range that does not start at
//! the local length, sha256 checked before the file is handed out. One
//! download at a time.

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
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct PartState {
    url: String,
    validator: Option<String>,
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
fn attempt(req: &Request<'_>, part: &Path, state_path: &Path) -> Result<Step> {
    let mut state: PartState = std::fs::read_to_string(state_path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if state.url != req.url {
        // another file was being fetched here: start over
        have = 0;
        state = PartState {
            url: req.url.to_string(),
            validator: None,
        };
    }
    let mut r = crate::tls::http_agent(req.ca_file, None)?.get(req.url);
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
        Err(e) => return Ok(Step::Retry(anyhow::anyhow!("GET {}: {e}", req.url))),
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
                    "download {}: server sent the whole file (changed or no ranges): restarting",
                    req.url
                );
            }
            (0, header("content-length").and_then(|l| l.parse().ok()))
        }
        206 => match header("content-range")
            .as_deref()
            .and_then(parse_content_range)
        {
            Some((start, _, total)) if start == have => {
                log::info!("download {}: resuming at byte {have}", req.url);
                (have, total)
            }
            other => {
                // a range we did not ask for: start over
                let _ = std::fs::remove_file(part);
                return Ok(Step::Retry(anyhow::anyhow!(
                    "GET {}: 206 with Content-Range {other:?}, expected start {have}; restarting",
                    req.url
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
            return Ok(Step::Retry(anyhow::anyhow!(
                "GET {}: 416, restarting",
                req.url
            )));
        }
        s => {
            let err = anyhow::anyhow!("GET {}: HTTP {s}", req.url);
            if (400..500).contains(&s) && s != 408 && s != 429 {
                return Err(err);
            }
            return Ok(Step::Retry(err));
        }
    };
    state.validator = validator;
    std::fs::write(state_path, serde_json::to_string(&state)?)?;
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
                return Ok(Step::Retry(anyhow::anyhow!(
                    "GET {}: connection broke after {written} of {} bytes: {e}",
                    req.url,
                    total.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
                )));
            }
        };
        f.write_all(&buf[..n])
            .with_context(|| format!("writing {}", part.display()))?;
        written += n as u64;
        if last_log.elapsed() > Duration::from_secs(10) {
            last_log = Instant::now();
            log::info!("download {}: {written} of {:?} bytes", req.url, total);
        }
    }
    f.sync_all()?;
    if let Some(t) = total {
        if written < t {
            return Ok(Step::Retry(anyhow::anyhow!(
                "GET {}: body ended after {written} of {t} bytes",
                req.url
            )));
        }
    }
    Ok(Step::Complete)
}

/// Downloads (or resumes) `req.url` to `req.dest`, checking its sha256.
/// A hash mismatch deletes the partial data and fails (never retried: the
/// source is wrong or tampered with).
pub fn fetch(req: &Request<'_>) -> Result<PathBuf> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let want = req.sha256.to_ascii_lowercase();
    if want.len() != 64 || !want.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!(
            "download {}: sha256 {:?} is not 64 hex digits",
            req.url,
            req.sha256
        );
    }
    if let Some(dir) = req.dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if req.dest.exists() && sha256_file(req.dest)? == want {
        log::info!(
            "download {}: already present at {}",
            req.url,
            req.dest.display()
        );
        return Ok(req.dest.to_path_buf());
    }
    let (part, state_path) = part_paths(req.dest);
    let mut last_err = None;
    for n in 1..=req.attempts.max(1) {
        match attempt(req, &part, &state_path)? {
            Step::Complete => {
                let got = sha256_file(&part)?;
                if got != want {
                    let _ = std::fs::remove_file(&part);
                    let _ = std::fs::remove_file(&state_path);
                    bail!(
                        "download {}: sha256 mismatch (expected {want}, got {got}): refused",
                        req.url
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
            "download {} failed after {} attempts",
            req.url, req.attempts
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
        };
        assert!(fetch(&r).is_err());
    }
}
