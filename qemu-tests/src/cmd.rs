//! The one way the harness runs host tools: the whole command line and the
//! tail of its stderr go into the error; stderr is shown only on failure. The
//! command line and tails come from `runcmd`, shared with the engine and agent;
//! these wrappers keep raw bytes (disk images) and the harness's error type.

use crate::error::{Error, Result};
use std::process::{Command, Output, Stdio};

pub use runcmd::{describe, tail_lines};

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
