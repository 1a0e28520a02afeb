//! The engine's `log` backend. Every record goes to stderr as `dualroot: <msg>`;
//! unless `DUALROOT_NO_KMSG` is set it also goes to `/dev/kmsg` (in the initramfs
//! that is the console and, after the boot, the journal); and once a log file is
//! set (the migration's, next to its journal on the data LV) it is appended there
//! too, so the log survives the reboot.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

struct Logger {
    kmsg: bool,
    file: Mutex<Option<File>>,
}

static LOGGER: std::sync::OnceLock<Logger> = std::sync::OnceLock::new();

/// The text of one record, as printed everywhere.
fn line(level: Level, msg: &str) -> String {
    match level {
        Level::Warn => format!("warning: {msg}"),
        Level::Error => format!("error: {msg}"),
        _ => msg.to_string(),
    }
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= Level::Info
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let text = line(r.level(), &r.args().to_string());
        eprintln!("dualroot: {text}");
        if self.kmsg {
            if let Ok(mut k) = OpenOptions::new().write(true).open("/dev/kmsg") {
                let prio = if r.level() <= Level::Warn { 4 } else { 5 };
                for l in text.lines() {
                    let _ = k.write_all(format!("<{prio}>dualroot: {l}\n").as_bytes());
                }
            }
        }
        if let Ok(mut f) = self.file.lock() {
            if let Some(f) = f.as_mut() {
                let _ = writeln!(f, "[{:.3}] {text}", crate::migrate::now());
            }
        }
    }

    fn flush(&self) {
        if let Ok(mut f) = self.file.lock() {
            if let Some(f) = f.as_mut() {
                let _ = f.sync_data();
            }
        }
    }
}

/// Installs the logger (once; later calls do nothing).
pub fn init() {
    let l = LOGGER.get_or_init(|| Logger {
        kmsg: std::env::var_os("DUALROOT_NO_KMSG").is_none(),
        file: Mutex::new(None),
    });
    if log::set_logger(l).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}

/// Appends every later record to `path` as well (`None` stops that). The previous
/// file is synced first.
pub fn set_file(path: Option<&Path>) {
    let Some(l) = LOGGER.get() else { return };
    let file = path.and_then(|p| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| eprintln!("dualroot: warning: cannot log to {}: {e}", p.display()))
            .ok()
    });
    if let Ok(mut f) = l.file.lock() {
        if let Some(old) = f.as_mut() {
            let _ = old.sync_data();
        }
        *f = file;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_reach_the_file() {
        std::env::set_var("DUALROOT_NO_KMSG", "1");
        init();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("migration.log");
        set_file(Some(&p));
        log::info!("step partition: starting");
        log::warn!("cannot write the journal");
        log::logger().flush();
        set_file(None);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("] step partition: starting"), "{text}");
        assert!(
            text.contains("] warning: cannot write the journal"),
            "{text}"
        );
    }
}
