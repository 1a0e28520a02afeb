//! One helper for running external programs: the whole command line and the
//! tail of stderr go into the error, stderr is shown only when it failed.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Output of a successful command.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s.trim();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].trim()
}

/// Runs `cmd`, capturing output; fails with the command line and stderr tail
/// when it cannot start, exits non-zero, or runs longer than an hour.
pub fn run(cmd: &mut Command) -> Result<Output> {
    run_timeout(cmd, Duration::from_secs(3600))
}

/// Like [`run`], killing the command after `timeout`.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let line = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    let mut so = child.stdout.take().context("no stdout pipe")?;
    let mut se = child.stderr.take().context("no stderr pipe")?;
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .with_context(|| format!("waiting for `{line}`"))?
        {
            break Some(st);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    let Some(status) = status else {
        bail!(
            "`{line}` timed out after {} s and was killed: {}",
            timeout.as_secs(),
            tail(&stderr, 2000)
        );
    };
    if !status.success() {
        bail!("`{line}` failed ({status}): {}", tail(&stderr, 2000));
    }
    Ok(Output { stdout, stderr })
}

/// Builds a command from a program and arguments.
pub fn command<I, S>(program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Runs a command and parses its stdout as JSON.
pub fn run_json<T: serde::de::DeserializeOwned>(cmd: &mut Command) -> Result<T> {
    run_json_timeout(cmd, Duration::from_secs(3600))
}

/// [`run_json`] with a timeout.
pub fn run_json_timeout<T: serde::de::DeserializeOwned>(
    cmd: &mut Command,
    timeout: Duration,
) -> Result<T> {
    let line = describe(cmd);
    let out = run_timeout(cmd, timeout)?;
    serde_json::from_str(&out.stdout).with_context(|| format!("parsing JSON from `{line}`"))
}

/// True when the error chain says the program could not be found.
pub fn is_not_found(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_command_reports_line_and_stderr() {
        let err = run(&mut command("sh", ["-c", "echo boom >&2; exit 3"])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn timeout_kills() {
        let t = Instant::now();
        let err =
            run_timeout(&mut command("sleep", ["5"]), Duration::from_millis(200)).unwrap_err();
        assert!(format!("{err:#}").contains("timed out"));
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn captures_stdout() {
        let o = run(&mut command("sh", ["-c", "echo hi; echo warn >&2"])).unwrap();
        assert_eq!(o.stdout, "hi\n");
        assert_eq!(o.stderr, "warn\n");
    }

    #[test]
    fn missing_program_is_not_found() {
        let err = run(&mut command("/nonexistent/prog", ["x"])).unwrap_err();
        assert!(is_not_found(&err));
    }
}
