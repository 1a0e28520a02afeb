//! The one way dualroot runs system tools: never through a shell, the whole command
//! line and the tail of stderr in the error, JSON parsing for tools that speak it.

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

/// Runs `c` with `input` on its stdin; same error reporting as [`CommandExt::run`].
pub fn run_with_input(c: &mut Command, input: &[u8]) -> Result<String> {
    use std::io::Write;
    let desc = describe(c);
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{desc}`"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input)
        .with_context(|| format!("writing to `{desc}`"))?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{desc}`"))?;
    if !out.status.success() {
        bail!(
            "`{desc}` failed ({}):\n{}",
            out.status,
            tail(&out.stderr, 15)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first of `names` found on PATH (EL and Debian name some tools differently).
pub fn find_tool(names: &[&str]) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    names
        .iter()
        .find(|n| std::env::split_paths(&path).any(|d| d.join(n).is_file()))
        .map(|n| n.to_string())
}

pub trait CommandExt {
    /// Runs to completion; fails with the command line, exit status and stderr tail.
    fn run(&mut self) -> Result<()>;
    /// Runs and returns stdout as text.
    fn run_stdout(&mut self) -> Result<String>;
    /// Runs and parses stdout as JSON.
    fn run_json<T: serde::de::DeserializeOwned>(&mut self) -> Result<T>;
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn tail(text: &[u8], lines: usize) -> String {
    let t = String::from_utf8_lossy(text);
    let v: Vec<&str> = t.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

impl CommandExt for Command {
    fn run(&mut self) -> Result<()> {
        self.run_stdout().map(|_| ())
    }

    fn run_stdout(&mut self) -> Result<String> {
        let desc = describe(self);
        let out = self
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("starting `{desc}`"))?;
        if !out.status.success() {
            let err = tail(&out.stderr, 15);
            let outp = tail(&out.stdout, 5);
            bail!(
                "`{desc}` failed ({}){}{}",
                out.status,
                if err.is_empty() {
                    String::new()
                } else {
                    format!(":\n{err}")
                },
                if outp.is_empty() {
                    String::new()
                } else {
                    format!("\nstdout: {outp}")
                }
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run_json<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        let desc = describe(self);
        let text = self.run_stdout()?;
        serde_json::from_str(&text).with_context(|| format!("parsing JSON output of `{desc}`"))
    }
}

/// `Command::new` with the arguments given.
pub fn cmd<I, S>(program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_command_and_stderr() {
        let e = cmd("sh", ["-c", "echo boom >&2; exit 3"])
            .run()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`sh -c echo boom >&2; exit 3` failed"), "{e}");
        assert!(e.contains("boom"), "{e}");
        let e = cmd("/nonexistent/tool", ["x"]).run().unwrap_err();
        assert!(format!("{e:#}").contains("starting `/nonexistent/tool x`"));
    }

    #[test]
    fn json_output_parses() {
        let v: serde_json::Value = cmd("echo", [r#"{"a": 1}"#]).run_json().unwrap();
        assert_eq!(v["a"], 1);
    }
}
