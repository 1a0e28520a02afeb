//! One helper for running external programs: the whole command line and the
//! tail of stderr go into the error, stderr is shown only when it failed.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::process::{Command, Stdio};

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
/// when it cannot start or exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let line = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{line}`"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("`{line}` failed ({}): {}", out.status, tail(&stderr, 2000));
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
    let line = describe(cmd);
    let out = run(cmd)?;
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
    fn missing_program_is_not_found() {
        let err = run(&mut command("/nonexistent/prog", ["x"])).unwrap_err();
        assert!(is_not_found(&err));
    }
}
