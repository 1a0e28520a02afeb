//! `dualroot-fleet`: parses arguments and dispatches (src/cli.rs).

use clap::Parser;
use std::io::Write;

struct Logger(log::LevelFilter);

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        // other crates (rumqttc, postgres) are capped at info
        m.level() <= self.0
            && (m.target().starts_with("dualroot_fleet") || m.level() <= log::Level::Info)
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let _ = writeln!(std::io::stderr().lock(), "{:<5} {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() {
    let level = match std::env::var("DUALROOT_FLEET_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("warn") => log::LevelFilter::Warn,
        Ok("debug") => log::LevelFilter::Debug,
        _ => log::LevelFilter::Info,
    };
    if log::set_boxed_logger(Box::new(Logger(level))).is_ok() {
        log::set_max_level(level);
    }
    if let Err(e) = dualroot_fleet::cli::run(dualroot_fleet::cli::Cli::parse()) {
        eprintln!("dualroot-fleet: {e:#}");
        std::process::exit(1);
    }
}
