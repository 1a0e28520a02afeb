//! The local clock against the backend's (issue 23 item 11; the field story:
//! an RTC a month fast made every TLS certificate look not yet valid, and the
//! agent failed without saying why). Every HTTPS answer's `Date` header gives
//! the backend's time; the difference is kept in `<data_dir>/clock-offset.json`,
//! logged when it is large, sent in the heartbeat as `clockOffsetSeconds`, and
//! named in the log when TLS fails with a certificate-time error.

use crate::config::Config;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Beyond this the clock is called wrong in the log.
pub const LARGE_OFFSET_SECS: i64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Offset {
    /// Backend time minus local time, seconds (positive: the local clock is behind).
    pub offset_secs: i64,
    /// Local unix seconds when it was measured.
    pub measured_at: i64,
}

fn path(cfg: &Config) -> PathBuf {
    cfg.data_dir.join("clock-offset.json")
}

/// Records the backend's `Date` (unix seconds) against the local clock.
pub fn record(cfg: &Config, server_date: i64, local_now: i64) -> Offset {
    let o = Offset {
        offset_secs: server_date - local_now,
        measured_at: local_now,
    };
    if o.offset_secs.abs() > LARGE_OFFSET_SECS {
        log::warn!("{}", describe(o.offset_secs));
    }
    if let Ok(text) = serde_json::to_vec(&o) {
        if let Err(e) =
            std::fs::create_dir_all(&cfg.data_dir).and_then(|_| std::fs::write(path(cfg), text))
        {
            log::warn!("saving the clock offset: {e}");
        }
    }
    o
}

pub fn last(cfg: &Config) -> Option<Offset> {
    let text = std::fs::read(path(cfg)).ok()?;
    serde_json::from_slice(&text).ok()
}

pub fn describe(offset_secs: i64) -> String {
    let dir = if offset_secs > 0 {
        "behind"
    } else {
        "ahead of"
    };
    format!(
        "the local clock is {} s {dir} the backend's (its Date header); certificates may look not yet valid or expired until the clock is set (NTP)",
        offset_secs.abs()
    )
}

/// For a TLS or connection error: when it is a certificate-time error, one
/// sentence naming the clock (and the measured offset, when there is one).
pub fn hint(error_text: &str, offset: Option<Offset>) -> Option<String> {
    let t = error_text.to_ascii_lowercase();
    let kind = if t.contains("notvalidyet") || t.contains("not yet valid") {
        "not yet valid"
    } else if t.contains("expired") {
        "expired"
    } else {
        return None;
    };
    let local = crate::journal::now_ms() / 1000;
    Some(match offset {
        Some(o) if o.offset_secs.abs() > LARGE_OFFSET_SECS => format!(
            "the certificate looks {kind} at local time {local}: {}",
            describe(o.offset_secs)
        ),
        _ => format!(
            "the certificate looks {kind} at local time {local}: check this machine's clock (no backend time measured that says it is off)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_time_errors_name_the_clock() {
        let fast = Some(Offset {
            offset_secs: -30 * 86400,
            measured_at: 0,
        });
        let h = hint("TLS: invalid peer certificate: NotValidYet", fast).unwrap();
        assert!(
            h.contains("not yet valid") && h.contains("2592000 s ahead of"),
            "{h}"
        );
        let h = hint("invalid peer certificate: Expired", None).unwrap();
        assert!(
            h.contains("expired") && h.contains("check this machine's clock"),
            "{h}"
        );
        assert_eq!(hint("connection refused", fast), None);
    }

    #[test]
    fn offsets_are_kept_for_the_heartbeat() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = Config::parse("").unwrap();
        cfg.data_dir = d.path().to_path_buf();
        assert_eq!(last(&cfg), None);
        let o = record(&cfg, 1_000_000, 1_000_000 + 40 * 86400);
        assert_eq!(o.offset_secs, -40 * 86400);
        assert_eq!(last(&cfg), Some(o));
    }
}
