//! `dualroot migrate`: DESIGN.md phases 1-7, one function per step, each recorded in
//! the journal before and after it runs. Runs inside the migration initramfs (dracut
//! pre-mount hook): first with `rd.dualroot.migrate=<plan>`, after a power cut from
//! the recovery entry with `rd.dualroot.resume=1`.

pub mod entry;
pub mod journal;
pub mod preflight;
pub mod stage;
pub mod steps;
pub mod sync;

use crate::plan::Plan;
use anyhow::{Context, Result};
use journal::{Journal, Step};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Always carried: identity and accounts (the plan's carry list comes on top).
pub const IDENTITY_FILES: &[&str] = &[
    "etc/hostname",
    "etc/hosts",
    "etc/machine-id",
    "etc/passwd",
    "etc/shadow",
    "etc/group",
    "etc/gshadow",
    "etc/ssh",
    // dualroot's own settings (health check, NIC pins, trusted keys).
    "etc/dualroot",
];

/// Exit codes the dracut hook acts on.
pub const EXIT_DONE: u8 = 0;
/// Refused or failed before the point of no return: the old system boots untouched.
pub const EXIT_REFUSED: u8 = 2;
/// Failed after the point of no return: reboot; the recovery entry resumes.
pub const EXIT_RETRY: u8 = 3;
/// A step failed too often: stop and say so (the hook powers off).
pub const EXIT_GAVE_UP: u8 = 4;

/// Paths used while migrating; under `/run/dualroot` in the initramfs.
#[derive(Debug, Clone)]
pub struct Paths {
    pub run: PathBuf,
}

impl Paths {
    pub fn old(&self) -> PathBuf {
        self.run.join("old")
    }
    pub fn ram(&self) -> PathBuf {
        self.run.join("ram")
    }
    pub fn data(&self) -> PathBuf {
        self.run.join("data")
    }
    pub fn boot(&self) -> PathBuf {
        self.run.join("boot")
    }
    pub fn new_root(&self) -> PathBuf {
        self.run.join("new")
    }
    /// The stash on the data LV.
    pub fn stash(&self) -> PathBuf {
        self.data().join("dualroot/migration")
    }
}

/// Where the outcome of a refused migration is left for the old system (and the
/// agent) to read, relative to the old root.
pub const OLD_RESULT_FILE: &str = "var/lib/dualroot/migration-result.json";

pub fn log(msg: &str) {
    eprintln!("dualroot: {msg}");
    if std::env::var_os("DUALROOT_NO_KMSG").is_none() {
        if let Ok(mut k) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
            for line in msg.lines() {
                let _ = k.write_all(format!("<5>dualroot: {line}\n").as_bytes());
            }
        }
    }
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Failpoints: `rd.dualroot.failpoint=<step>` on the kernel command line (or
/// `DUALROOT_FAILPOINT`) makes that step fail; `rd.dualroot.powercut=<step>` (or
/// `DUALROOT_POWERCUT`) resets the machine in the middle of it, without syncing.
#[derive(Debug, Clone, Default)]
pub struct Failpoints {
    pub fail: Option<String>,
    pub powercut: Option<String>,
}

impl Failpoints {
    pub fn from_env_and_cmdline(cmdline: &str) -> Failpoints {
        let arg = |k: &str| {
            cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
        };
        Failpoints {
            fail: std::env::var("DUALROOT_FAILPOINT")
                .ok()
                .or_else(|| arg("rd.dualroot.failpoint")),
            powercut: std::env::var("DUALROOT_POWERCUT")
                .ok()
                .or_else(|| arg("rd.dualroot.powercut")),
        }
    }

    pub fn check_fail(&self, step: Step) -> Result<()> {
        if self.fail.as_deref() == Some(step.name()) {
            anyhow::bail!(
                "failpoint {} armed (rd.dualroot.failpoint): failing on purpose",
                step.name()
            );
        }
        Ok(())
    }

    /// Simulates a power cut: immediate reset, nothing flushed.
    pub fn check_powercut(&self, step: Step) {
        if self.powercut.as_deref() == Some(step.name()) {
            log(&format!(
                "failpoint: power cut in step {} (rd.dualroot.powercut)",
                step.name()
            ));
            let _ = std::fs::write("/proc/sysrq-trigger", b"b");
            std::thread::sleep(std::time::Duration::from_secs(30));
        }
    }
}

pub struct Ctx {
    pub plan: Plan,
    pub paths: Paths,
    pub disk: PathBuf,
    pub journal: Journal,
    pub failpoints: Failpoints,
    /// Mounted old root (first boot only, until stage-ram unmounts it).
    pub old_mount: Option<crate::mounts::Mount>,
    pub ram_mount: Option<crate::mounts::Mount>,
    pub data_mount: Option<crate::mounts::Mount>,
    pub boot_mount: Option<crate::mounts::Mount>,
    pub proc: PathBuf,
    pub sys: PathBuf,
}

impl Ctx {
    pub fn journal_paths(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        if self.data_mount.is_some() {
            v.push(self.paths.stash().join("journal.json"));
        }
        if self.boot_mount.is_some() {
            v.push(self.paths.boot().join("dualroot/journal.json"));
        }
        if v.is_empty() {
            v.push(self.paths.run.join("journal.json"));
        }
        v
    }

    pub fn save_journal(&mut self) -> Result<()> {
        self.sample_memory();
        let paths = self.journal_paths();
        for p in &paths {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
        }
        let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        self.journal.save(&refs)
    }

    /// Peak RSS of this process and peak use of the staging tmpfs.
    pub fn sample_memory(&mut self) {
        if let Ok(u) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
            self.journal.peak_rss_bytes =
                self.journal.peak_rss_bytes.max(u.max_rss() as u64 * 1024);
        }
        if self.ram_mount.is_some() {
            if let Ok(s) = nix::sys::statvfs::statvfs(&self.paths.ram()) {
                let used = (s.blocks() - s.blocks_free()) * s.fragment_size();
                self.journal.peak_tmpfs_bytes = self.journal.peak_tmpfs_bytes.max(used);
            }
        }
    }
}

/// Runs the steps from the journal's next one to the end. Returns the exit code
/// the hook acts on; every outcome is logged with what the machine does next.
pub fn drive(ctx: &mut Ctx) -> u8 {
    while let Some(step) = ctx.journal.next_step() {
        if ctx.journal.exhausted(step) {
            let err = ctx.journal.record(step).error.clone().unwrap_or_default();
            log(&format!(
                "step {} failed {} times (last error: {err}); not retrying. The machine stays on the recovery entry; the journal is on /boot/dualroot/journal.json.",
                step.name(),
                journal::MAX_ATTEMPTS
            ));
            ctx.journal.outcome = Some(format!("gave up in step {}: {err}", step.name()));
            let _ = ctx.save_journal();
            return EXIT_GAVE_UP;
        }
        log(&format!("step {}: starting", step.name()));
        ctx.journal.begin(step, now());
        if let Err(e) = ctx.save_journal() {
            log(&format!(
                "cannot write the journal before step {}: {e:#}",
                step.name()
            ));
        }
        let result = ctx
            .failpoints
            .check_fail(step)
            .and_then(|_| steps::run_step(ctx, step));
        match result {
            Ok(()) => {
                ctx.journal.finish(step, now());
                let secs = ctx.journal.record(step).seconds.unwrap_or(0.0);
                if let Err(e) = ctx.save_journal() {
                    log(&format!(
                        "cannot write the journal after step {}: {e:#}",
                        step.name()
                    ));
                    return if step.resumable() {
                        EXIT_RETRY
                    } else {
                        EXIT_REFUSED
                    };
                }
                log(&format!("step {}: done in {secs:.1} s", step.name()));
            }
            Err(e) => {
                let msg = format!("{e:#}");
                ctx.journal.fail(step, now(), &msg);
                let _ = ctx.save_journal();
                if !step.destructive() {
                    log(&format!(
                        "step {} refused the migration: {msg}\nNothing on the disk was changed; rebooting into the old system.",
                        step.name()
                    ));
                    steps::leave_result_on_old_root(
                        ctx,
                        &format!("refused in step {}: {msg}", step.name()),
                    );
                    return EXIT_REFUSED;
                }
                let next = if step.resumable() {
                    format!(
                        "Rebooting; the recovery entry resumes the migration (attempt {} of {}).",
                        ctx.journal.record(step).attempts,
                        journal::MAX_ATTEMPTS
                    )
                } else {
                    // Inside the unrecoverable window (partition table written,
                    // recovery entry not yet installed): say so plainly.
                    "The recovery entry is not in place yet, so the disk may not boot; rebooting anyway. The console above has the cause.".to_string()
                };
                log(&format!(
                    "step {} failed after the point of no return: {msg}\n{next}",
                    step.name()
                ));
                return EXIT_RETRY;
            }
        }
    }
    log(&format!("migration done:\n{}", ctx.journal.summary()));
    EXIT_DONE
}
