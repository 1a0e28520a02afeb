//! Progress for long copies: `\r`-updated on a TTY, plain periodic lines elsewhere
//! (serial console, journal), so logs stay readable.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    what: String,
    total: u64,
    start: Instant,
    last: Instant,
    tty: bool,
    every: Duration,
}

impl Progress {
    pub fn new(what: &str, total: u64) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let now = Instant::now();
        Progress {
            what: what.to_string(),
            total,
            start: now,
            last: now,
            tty,
            every: if tty {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(5)
            },
        }
    }

    fn line(&self, done: u64) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let pct = if self.total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / self.total as f64
        };
        format!(
            "{}: {:5.1}% ({:.1} of {:.1} MB, {:.1} MB/s)",
            self.what,
            pct.min(100.0),
            done as f64 / 1e6,
            self.total as f64 / 1e6,
            done as f64 / 1e6 / secs
        )
    }

    pub fn update(&mut self, done: u64) {
        if self.last.elapsed() < self.every {
            return;
        }
        self.last = Instant::now();
        let mut e = std::io::stderr().lock();
        if self.tty {
            let _ = write!(e, "\r{}", self.line(done));
        } else {
            let _ = writeln!(e, "{}", self.line(done));
        }
    }

    pub fn finish(&mut self, done: u64) {
        let mut e = std::io::stderr().lock();
        let end = if self.tty { "\r" } else { "" };
        let _ = writeln!(
            e,
            "{end}{} done in {:.1} s",
            self.line(done),
            self.start.elapsed().as_secs_f64()
        );
    }
}
