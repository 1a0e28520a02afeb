//! Plain line logger to stderr (systemd puts it into the journal). URLs lose
//! their query strings here too, whatever the caller formatted: pre-signed
//! credentials never reach the journal (or a `collectLogs` upload).

use std::io::Write;

struct Logger {
    level: log::LevelFilter,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        // other crates (rumqttc, rustls) are capped at info
        let ours = m.target().starts_with("agent_lib") || m.target().starts_with("dualroot_agent");
        m.level() <= self.level && (ours || m.level() <= log::Level::Info)
    }
    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = line(crate::journal::now_ms(), r.level(), &r.args().to_string());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
    fn flush(&self) {}
}

/// One log line: `<unix s>.<ms> <LEVEL> <message>`, URLs redacted.
fn line(ms: i64, level: log::Level, msg: &str) -> String {
    format!(
        "{}.{:03} {:<5} {}\n",
        ms / 1000,
        ms % 1000,
        level,
        crate::redact::in_text(msg)
    )
}

/// Level from `DUALROOT_AGENT_LOG` (error, warn, info, debug), default info.
pub fn init() {
    let level = std::env::var("DUALROOT_AGENT_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    if log::set_boxed_logger(Box::new(Logger { level })).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_lines_carry_no_query_strings() {
        let l = super::line(
            1_700_000_000_123,
            log::Level::Warn,
            "download https://s3.example/os.bundle?X-Amz-Signature=SECRET: stalled",
        );
        assert_eq!(
            l,
            "1700000000.123 WARN  download https://s3.example/os.bundle?…: stalled\n"
        );
    }
}
