//! The one way the harness runs host tools: the whole command line and the
//! tail of its stderr go into the error; stderr is shown only on failure.

use crate::error::{Error, Result};
use std::process::{Command, Output, Stdio};

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Run to completion, capturing stdout and stderr; non-zero exit is an error.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let what = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::msg(format!("running {what}: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::msg(format!(
            "{what} failed ({}): {}",
            out.status,
            tail_lines(&stderr, 20)
        )));
    }
    Ok(out)
}

/// Run with stderr passed through (for long builds that log progress) and
/// return stdout as a string.
pub fn run_stdout_passthrough(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| Error::msg(format!("running {what}: {e}")))?;
    if !out.status.success() {
        return Err(Error::msg(format!(
            "{what} failed ({}), see its log above",
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
