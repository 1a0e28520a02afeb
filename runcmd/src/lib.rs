//! The one way dualroot's engine, agent and QEMU harness run external programs:
//! never through a shell unless the caller asks for `sh -c`, the whole command
//! line and the tail of stderr in the error, stderr shown only when it failed,
//! a timeout that kills, and JSON parsing for tools that speak it.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a program printed, when it succeeded.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// How long [`run`] lets a program take before killing it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// The command line, for errors and logs.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `Command::new(program)` with the arguments given.
pub fn command<I, S>(program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn failure(
    line: &str,
    status: impl std::fmt::Display,
    stdout: &str,
    stderr: &str,
) -> anyhow::Error {
    let err = tail_lines(stderr, 15);
    let out = tail_lines(stdout, 5);
    anyhow::anyhow!(
        "`{line}` failed ({status}){}{}",
        if err.is_empty() {
            String::new()
        } else {
            format!(":\n{err}")
        },
        if out.is_empty() {
            String::new()
        } else {
            format!("\nstdout: {out}")
        }
    )
}

/// Runs `cmd` with `input` on stdin (none when `None`), capturing its output;
/// kills it after `timeout`. Fails with the command line and the stderr tail when
/// it cannot start, exits non-zero or times out.
pub fn run_full(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    let line = describe(cmd);
    let (status, out) = run_unchecked(cmd, input, timeout)?;
    if !status.success() {
        return Err(failure(&line, status, &out.stdout, &out.stderr));
    }
    Ok(out)
}

/// Like [`run_full`], but a non-zero exit is not an error: for tools whose exit
/// status is an answer (`systemctl is-active`).
pub fn run_unchecked(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, Output)> {
    let line = describe(cmd);
    // Its own process group, so a timeout kills what it started too (`sh -c`
    // children would otherwise keep the pipes open).
    std::os::unix::process::CommandExt::process_group(cmd, 0);
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
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
    if let Some(data) = input {
        let mut stdin = child.stdin.take().context("no stdin pipe")?;
        stdin
            .write_all(data)
            .with_context(|| format!("writing to `{line}`"))?;
    }
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .with_context(|| format!("waiting for `{line}`"))?
        {
            break Some(st);
        }
        if start.elapsed() > timeout {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    let Some(status) = status else {
        bail!(
            "`{line}` timed out after {} s and was killed: {}",
            timeout.as_secs(),
            tail_lines(&stderr, 15)
        );
    };
    Ok((status, Output { stdout, stderr }))
}

/// [`run_full`] without input, within [`DEFAULT_TIMEOUT`].
pub fn run(cmd: &mut Command) -> Result<Output> {
    run_full(cmd, None, DEFAULT_TIMEOUT)
}

/// [`run_full`] without input.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    run_full(cmd, None, timeout)
}

/// Runs with `input` on stdin; returns stdout.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Result<String> {
    Ok(run_full(cmd, Some(input), DEFAULT_TIMEOUT)?.stdout)
}

/// Runs and parses stdout as JSON.
pub fn run_json<T: serde::de::DeserializeOwned>(cmd: &mut Command) -> Result<T> {
    run_json_timeout(cmd, DEFAULT_TIMEOUT)
}

/// [`run_json`] with a timeout.
pub fn run_json_timeout<T: serde::de::DeserializeOwned>(
    cmd: &mut Command,
    timeout: Duration,
) -> Result<T> {
    let line = describe(cmd);
    let out = run_timeout(cmd, timeout)?;
    serde_json::from_str(&out.stdout).with_context(|| format!("parsing JSON output of `{line}`"))
}

/// True when the error chain says the program could not be found.
pub fn is_not_found(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

/// The first of `names` found on PATH (EL and Debian name some tools differently).
pub fn find_tool(names: &[&str]) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    names
        .iter()
        .find(|n| std::env::split_paths(&path).any(|d| d.join(n).is_file()))
        .map(|n| n.to_string())
}

/// Method-style calls on a `Command` (the engine's style).
pub trait CommandExt {
    /// Runs to completion; fails with the command line, exit status and stderr tail.
    fn run(&mut self) -> Result<()>;
    /// Runs and returns stdout as text.
    fn run_stdout(&mut self) -> Result<String>;
    /// Runs and parses stdout as JSON.
    fn run_json<T: serde::de::DeserializeOwned>(&mut self) -> Result<T>;
}

impl CommandExt for Command {
    fn run(&mut self) -> Result<()> {
        run(self).map(|_| ())
    }

    fn run_stdout(&mut self) -> Result<String> {
        run(self).map(|o| o.stdout)
    }

    fn run_json<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        run_json(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_command_and_stderr() {
        let e = format!(
            "{:#}",
            command("sh", ["-c", "echo boom >&2; exit 3"])
                .run()
                .unwrap_err()
        );
        assert!(e.contains("`sh -c echo boom >&2; exit 3` failed"), "{e}");
        assert!(e.contains("boom"), "{e}");
        let e = command("/nonexistent/tool", ["x"]).run().unwrap_err();
        assert!(format!("{e:#}").contains("starting `/nonexistent/tool x`"));
        assert!(is_not_found(&e));
    }

    #[test]
    fn timeout_kills() {
        let t = Instant::now();
        let e = run_timeout(&mut command("sleep", ["5"]), Duration::from_millis(200)).unwrap_err();
        assert!(format!("{e:#}").contains("timed out"));
        assert!(t.elapsed() < Duration::from_secs(3));
        // What the program started dies with it (its pipes would hold us).
        let t = Instant::now();
        let e = run_timeout(
            &mut command("sh", ["-c", "sleep 5; true"]),
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("timed out"));
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn output_input_and_json() {
        let o = run(&mut command("sh", ["-c", "echo hi; echo warn >&2"])).unwrap();
        assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("hi\n", "warn\n"));
        assert_eq!(
            run_with_input(&mut command("cat", [""; 0]), b"abc").unwrap(),
            "abc"
        );
        let v: serde_json::Value = command("echo", [r#"{"a": 1}"#]).run_json().unwrap();
        assert_eq!(v["a"], 1);
        assert_eq!(tail_lines("a\nb\nc", 2), "b\nc");
    }
}
