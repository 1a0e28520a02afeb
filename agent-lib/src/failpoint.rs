//! Failpoints armed from the environment so tests can stop the agent at an
//! exact journal state: `DUALROOT_AGENT_FAILPOINTS="after_journal=pause;in_task=abort"`.
//! Actions: `pause` (writes `<data_dir>/failpoint-<name>` and sleeps forever,
//! for a test to `kill -9`), `abort` (process abort), `sleep(ms)`, and
//! `fail(N)` for the points that ask [`fails`] (the first N calls fail).

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

pub const ENV: &str = "DUALROOT_AGENT_FAILPOINTS";

fn table() -> &'static Vec<(String, String)> {
    static T: OnceLock<Vec<(String, String)>> = OnceLock::new();
    T.get_or_init(|| parse(&std::env::var(ENV).unwrap_or_default()))
}

fn parse(s: &str) -> Vec<(String, String)> {
    s.split(';')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Whether failpoint `name`, armed as `fail(N)`, makes this call fail: true for
/// the first N calls, then false (a write that fails for a while, then works).
pub fn fails(name: &str) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let Some(n) = table().iter().find(|(k, _)| k == name).and_then(|(_, a)| {
        a.strip_prefix("fail(")?
            .strip_suffix(')')?
            .parse::<u64>()
            .ok()
    }) else {
        return false;
    };
    let call = CALLS.fetch_add(1, Ordering::SeqCst);
    if call < n {
        log::warn!("failpoint {name} hit: failing call {} of {n}", call + 1);
        true
    } else {
        false
    }
}

/// Evaluates failpoint `name`; `data_dir` receives the marker file.
pub fn hit(name: &str, data_dir: &Path) {
    let Some((_, action)) = table().iter().find(|(k, _)| k == name) else {
        return;
    };
    log::warn!("failpoint {name} hit: {action}");
    let _ = std::fs::write(data_dir.join(format!("failpoint-{name}")), action);
    if action == "abort" {
        std::process::abort();
    } else if action == "pause" {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    } else if let Some(ms) = action
        .strip_prefix("sleep(")
        .and_then(|r| r.strip_suffix(')'))
        .and_then(|n| n.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_list() {
        let t = super::parse("a=pause; b=sleep(5)");
        assert_eq!(
            t,
            vec![
                ("a".into(), "pause".into()),
                ("b".into(), "sleep(5)".into())
            ]
        );
    }
}
