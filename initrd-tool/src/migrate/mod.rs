//! `dualroot migrate`: DESIGN.md phases 1-7, one function per step, each recorded in
//! the journal before and after it runs. Runs inside the migration initramfs (dracut
//! pre-mount hook): first with `rd.dualroot.migrate=<plan>`, after a power cut from
//! the recovery entry with `rd.dualroot.resume=1`.

pub mod entry;
pub mod journal;
pub mod memory;
pub mod plan_check;
pub mod preflight;
pub mod stage;
pub mod steps;
pub mod undo;

use crate::plan::Plan;
use anyhow::{Context, Result};
pub use dualroot_api::exit::{
    DONE as EXIT_DONE, GAVE_UP as EXIT_GAVE_UP, REFUSED as EXIT_REFUSED, RETRY as EXIT_RETRY,
    UNDONE as EXIT_UNDONE,
};
use journal::{Journal, Step};
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where `stage` leaves everything for the migration boot, on the old root.
pub const STAGE_DIR: &str = "var/lib/dualroot/stage";
/// The NIC inventory taken on the running old system.
pub const STAGE_NICS: &str = "var/lib/dualroot/stage/nics.json";
/// [`StageInfo`]: what `stage` verified, for the initramfs to hold the RAM copy to.
pub const STAGE_INFO: &str = "var/lib/dualroot/stage/stage.toml";
/// The migration initramfs on the old /boot (and the recovery entry's copy).
pub const MIGRATION_INITRAMFS: &str = "boot/dualroot/initramfs-migrate.img";

/// The hand-off from `stage` (running old system) to the migration boot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageInfo {
    /// sha256 of the whole staged bundle file, as `stage` verified it.
    pub bundle_sha256: String,
    pub bundle_bytes: u64,
    /// Kernel + initramfs of the payload (for the `/boot` room check).
    pub slot_boot_bytes: Option<u64>,
}

impl StageInfo {
    pub fn load(path: &Path) -> Result<StageInfo> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn to_toml(&self) -> String {
        // A struct of strings and integers always serializes.
        toml::to_string(self).unwrap_or_default()
    }
}

/// Paths used while migrating; under `/run/dualroot` in the initramfs
/// (`DUALROOT_RUN` elsewhere, for tests).
#[derive(Debug, Clone)]
pub struct Paths {
    pub run: PathBuf,
}

impl Paths {
    pub fn from_env() -> Paths {
        Paths {
            run: std::env::var("DUALROOT_RUN")
                .map(PathBuf::from)
                .unwrap_or_else(|_| "/run/dualroot".into()),
        }
    }
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
        self.data().join(crate::sync::STASH_DIR)
    }
}

/// Where the outcome of a refused migration is left for the old system (and the
/// agent) to read, relative to the old root.
pub const OLD_RESULT_FILE: &str = "var/lib/dualroot/migration-result.json";
/// The migration's log, next to its journal in the stash (RAM before the stash exists).
pub const LOG_FILE: &str = "migration.log";

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Failpoints: `rd.dualroot.failpoint=<list>` on the kernel command line (or
/// `DUALROOT_FAILPOINT`), comma-separated: `<step>` makes that step fail before
/// it starts, `<step>:late` after it has done its disk writes (the window steps),
/// `undo` makes the undo fail, `no-undo` takes no undo record, `grub-install`
/// breaks the slot GRUB install. `rd.dualroot.powercut=<step>` (or
/// `DUALROOT_POWERCUT`) resets the machine in the middle of it, without syncing.
#[derive(Debug, Clone, Default)]
pub struct Failpoints {
    pub fail: Vec<String>,
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
                .or_else(|| arg("rd.dualroot.failpoint"))
                .map(|v| {
                    v.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            powercut: std::env::var("DUALROOT_POWERCUT")
                .ok()
                .or_else(|| arg("rd.dualroot.powercut")),
        }
    }

    pub fn armed(&self, name: &str) -> bool {
        self.fail.iter().any(|f| f == name)
    }

    pub fn check_fail(&self, step: Step) -> Result<()> {
        if self.armed(step.name()) {
            anyhow::bail!(
                "failpoint {} armed (rd.dualroot.failpoint): failing on purpose",
                step.name()
            );
        }
        Ok(())
    }

    /// At the end of a step, after its disk writes: `<step>:late`.
    pub fn check_fail_late(&self, step: Step) -> Result<()> {
        if self.armed(&format!("{}:late", step.name())) {
            anyhow::bail!(
                "failpoint {}:late armed (rd.dualroot.failpoint): failing on purpose after the step's writes",
                step.name()
            );
        }
        Ok(())
    }

    /// Simulates a power cut: immediate reset, nothing flushed.
    pub fn check_powercut(&self, step: Step) {
        if self.powercut.as_deref() == Some(step.name()) {
            warn!(
                "failpoint: power cut in step {} (rd.dualroot.powercut)",
                step.name()
            );
            log::logger().flush();
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
    /// Mounted old root and its separate /boot (first boot only, until
    /// stage-ram unmounts them); read-only unless a refusal writes its result.
    pub old_mount: Option<crate::mounts::Mount>,
    pub old_boot_mount: Option<crate::mounts::Mount>,
    /// The old system's other filesystems on the disk that the plan carries
    /// from (`/home` on its LV), read-only under the old root, in mount order.
    pub old_extra_mounts: Vec<crate::mounts::Mount>,
    /// The old root's device (first boot), to mount it again.
    pub old_root_dev: Option<PathBuf>,
    pub ram_mount: Option<crate::mounts::Mount>,
    /// The undo record in the staging tmpfs (first boot, until the window closes).
    pub undo: Option<crate::undo::Record>,
    pub data_mount: Option<crate::mounts::Mount>,
    pub boot_mount: Option<crate::mounts::Mount>,
    pub proc: PathBuf,
    pub sys: PathBuf,
    /// The log is appended to the stash on `data` (see [`Ctx::keep_log_on_data`]).
    pub log_on_data: bool,
    /// Samples dualroot's RSS and the staging tmpfs together (`memory`).
    pub memory: Option<memory::Sampler>,
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
        self.keep_log_on_data();
        let paths = self.journal_paths();
        for p in &paths {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
        }
        let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        self.journal.save(&refs)
    }

    /// Once `data` is mounted, the log moves from RAM to the stash (what was
    /// logged so far is copied over first), so it survives the reboot.
    fn keep_log_on_data(&mut self) {
        if self.data_mount.is_none() || self.log_on_data {
            return;
        }
        let st = self.paths.stash();
        let ram_log = self.paths.run.join(LOG_FILE);
        let on_data = st.join(LOG_FILE);
        if std::fs::create_dir_all(&st).is_ok() {
            let earlier = std::fs::read(&ram_log).unwrap_or_default();
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&on_data)
                .and_then(|mut f| std::io::Write::write_all(&mut f, &earlier));
            if appended.is_ok() {
                crate::logging::set_file(Some(&on_data));
                let _ = std::fs::remove_file(&ram_log);
                self.log_on_data = true;
            }
        }
    }

    /// A step finished: the recovery entry gets its full boot budget back
    /// (`grub::rearm_recovery`). Before the recovery entry exists there is nothing
    /// to refill; a failure here only means GRUB's budget runs lower.
    pub fn rearm_recovery(&self) {
        if self.boot_mount.is_none() {
            return;
        }
        let env = self.paths.boot().join(crate::grub::ENV_FILE);
        if !env.exists() {
            return;
        }
        if let Err(e) = crate::grub::rearm_recovery(&env) {
            warn!(
                "could not refill the recovery entry's boot tries in {}: {e:#}",
                env.display()
            );
        }
    }

    /// Peak RSS of this process and peak use of the staging tmpfs.
    pub fn sample_memory(&mut self) {
        if let Ok(u) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
            self.journal.peak_rss_bytes =
                self.journal.peak_rss_bytes.max(u.max_rss() as u64 * 1024);
        }
        if self.ram_mount.is_some() {
            if let Some(used) = crate::fsutil::used_bytes(&self.paths.ram()) {
                self.journal.peak_tmpfs_bytes = self.journal.peak_tmpfs_bytes.max(used);
            }
        }
        if let Some(s) = &self.memory {
            let p = s.peak(&self.paths.ram());
            self.journal.peak_memory.merge(&p);
        }
    }
}

/// Runs the steps from the journal's next one to the end. Returns the exit code
/// the hook acts on; every outcome is logged with what the machine does next.
pub fn drive(ctx: &mut Ctx) -> u8 {
    while let Some(step) = ctx.journal.next_step() {
        if ctx.journal.exhausted(step) {
            let err = ctx.journal.record(step).error.clone().unwrap_or_default();
            error!(
                "step {} failed {} times (last error: {err}); not retrying. The machine powers off; the journal is on /boot/dualroot/journal.json.",
                step.name(),
                journal::MAX_ATTEMPTS
            );
            ctx.journal.outcome = Some(format!("gave up in step {}: {err}", step.name()));
            let _ = ctx.save_journal();
            return EXIT_GAVE_UP;
        }
        info!("step {}: starting", step.name());
        if let Some(s) = &ctx.memory {
            s.set_step(step.name());
        }
        ctx.journal.begin(step, now());
        if let Err(e) = ctx.save_journal() {
            info!(
                "cannot write the journal before step {}: {e:#}",
                step.name()
            );
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
                    info!("cannot write the journal after step {}: {e:#}", step.name());
                    return if step.resumable() {
                        EXIT_RETRY
                    } else {
                        EXIT_REFUSED
                    };
                }
                info!("step {}: done in {secs:.1} s", step.name());
                ctx.rearm_recovery();
            }
            Err(e) => {
                let msg = format!("{e:#}");
                ctx.journal.fail(step, now(), &msg);
                if e.downcast_ref::<steps::GiveUp>().is_some() {
                    error!("step {}: {msg}", step.name());
                    ctx.journal.outcome = Some(format!("gave up in step {}: {msg}", step.name()));
                    let _ = ctx.save_journal();
                    return EXIT_GAVE_UP;
                }
                let _ = ctx.save_journal();
                if step.retry_in_place() && ctx.journal.exhausted(step) && ctx.undo.is_some() {
                    return undo::undo_window(ctx, step, &msg);
                }
                if step.retry_in_place() && !ctx.journal.exhausted(step) {
                    // No reboot: inside the window the disk has no boot entry yet,
                    // and until the bundle is on `data` a reboot would lose it.
                    warn!(
                        "step {} failed before the bundle was safe on disk: {msg}\nRetrying it in place in 2 s (attempt {} of {}).",
                        step.name(),
                        ctx.journal.record(step).attempts,
                        journal::MAX_ATTEMPTS
                    );
                    std::thread::sleep(std::time::Duration::from_secs(2));
                    continue;
                }
                if !step.destructive() {
                    warn!(
                        "step {} refused the migration: {msg}\nNothing on the disk was changed; rebooting into the old system.",
                        step.name()
                    );
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
                error!(
                    "step {} failed after the point of no return: {msg}\n{next}",
                    step.name()
                );
                return EXIT_RETRY;
            }
        }
    }
    info!("migration done:\n{}", ctx.journal.summary());
    EXIT_DONE
}
