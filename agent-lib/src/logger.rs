//! Plain line logger to stderr (systemd puts it into the journal).

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
        let ms = crate::journal::now_ms();
        let line = format!(
            "{}.{:03} {:<5} {}\n",
            ms / 1000,
            ms % 1000,
            r.level(),
            r.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
    fn flush(&self) {}
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
