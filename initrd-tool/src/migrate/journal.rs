//! The migration journal: one JSON file, a record per step written before and after
//! the step runs. Before the point of no return it lives in RAM (and a copy of the
//! outcome goes to the old root); after it, on the `data` LV, mirrored to `/boot`.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The steps of DESIGN.md's phases 1-7, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Preflight,
    StageRam,
    Partition,
    Recovery,
    Volumes,
    Stash,
    Unpack,
    Sync,
    Boot,
    Done,
}

pub const STEPS: [Step; 10] = [
    Step::Preflight,
    Step::StageRam,
    Step::Partition,
    Step::Recovery,
    Step::Volumes,
    Step::Stash,
    Step::Unpack,
    Step::Sync,
    Step::Boot,
    Step::Done,
];

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Preflight => "preflight",
            Step::StageRam => "stage-ram",
            Step::Partition => "partition",
            Step::Recovery => "recovery",
            Step::Volumes => "volumes",
            Step::Stash => "stash",
            Step::Unpack => "unpack",
            Step::Sync => "sync",
            Step::Boot => "boot",
            Step::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        STEPS.into_iter().find(|st| st.name() == s)
    }

    /// Steps before this one leave the old system untouched.
    pub fn destructive(self) -> bool {
        self >= Step::Partition
    }

    /// From this step on a power cut resumes (the recovery entry exists).
    pub fn resumable(self) -> bool {
        self > Step::Recovery
    }

    /// Inside the unrecoverable window (partition table written, recovery entry
    /// not yet in place).
    pub fn in_window(self) -> bool {
        self.destructive() && !self.resumable()
    }

    /// After the point of no return, up to the bundle on `data`, a step works from
    /// the copy in RAM: a reboot would lose it, so a failure is retried in place.
    pub fn retry_in_place(self) -> bool {
        self.destructive() && self <= Step::Stash
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Pending,
    Running,
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: Step,
    pub state: State,
    pub attempts: u32,
    pub started_unix: Option<f64>,
    pub finished_unix: Option<f64>,
    pub seconds: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    pub format: u32,
    pub steps: Vec<StepRecord>,
    /// Kernel arguments for the new slots, fixed at the first boot of the migration.
    pub kernel_args: String,
    pub disk: String,
    pub vg: String,
    /// When the partition table was written, and when the recovery entry was in place.
    pub point_of_no_return_unix: Option<f64>,
    pub recovery_ready_unix: Option<f64>,
    /// When the bundle was complete on `data` (the second window figure).
    #[serde(default)]
    pub stash_done_unix: Option<f64>,
    /// High-water marks of each alone (they happen at different times).
    pub peak_rss_bytes: u64,
    pub peak_tmpfs_bytes: u64,
    /// The largest RSS + tmpfs seen at one moment, and in which step.
    #[serde(default)]
    pub peak_memory: super::memory::Peak,
    pub bundle_bytes: u64,
    /// The staging tmpfs once everything was staged, before the undo record:
    /// bundle, carried files, recovery kernel and initramfs, plan, keyring.
    #[serde(default)]
    pub staged_bytes: u64,
    /// sha256 of the bundle as staged in RAM: the stash must hash the same.
    #[serde(default)]
    pub bundle_sha256: String,
    /// The layout's sizes, fixed by preflight (`auto` resolved) for every later step.
    #[serde(default)]
    pub sizes: Option<crate::plan::ByteSizes>,
    pub outcome: Option<String>,
    /// The old system's layout, as detected at the first boot (old VG, PVs to wipe).
    #[serde(default)]
    pub source: Option<crate::source_layout::SourceLayout>,
    /// Decisions worth reading later (account merge notes, NIC pins).
    pub notes: Vec<String>,
    /// Size of the undo record preflight budgeted (0: none is taken), and how
    /// much was taken, in how many seconds.
    #[serde(default)]
    pub undo_bytes: u64,
    #[serde(default)]
    pub undo_taken_seconds: Option<f64>,
    /// An undo: when it started, and how long it took to the old disk verified.
    #[serde(default)]
    pub undo_started_unix: Option<f64>,
    #[serde(default)]
    pub undo_seconds: Option<f64>,
}

/// Failed attempts of one step after which the migration stops retrying.
pub const MAX_ATTEMPTS: u32 = 3;

impl Journal {
    pub fn new(disk: &str, vg: &str, kernel_args: &str) -> Journal {
        Journal {
            format: 1,
            steps: STEPS
                .iter()
                .map(|&step| StepRecord {
                    step,
                    state: State::Pending,
                    attempts: 0,
                    started_unix: None,
                    finished_unix: None,
                    seconds: None,
                    error: None,
                })
                .collect(),
            kernel_args: kernel_args.into(),
            disk: disk.into(),
            vg: vg.into(),
            point_of_no_return_unix: None,
            recovery_ready_unix: None,
            stash_done_unix: None,
            peak_rss_bytes: 0,
            peak_tmpfs_bytes: 0,
            peak_memory: Default::default(),
            staged_bytes: 0,
            bundle_bytes: 0,
            bundle_sha256: String::new(),
            sizes: None,
            outcome: None,
            source: None,
            notes: Vec::new(),
            undo_bytes: 0,
            undo_taken_seconds: None,
            undo_started_unix: None,
            undo_seconds: None,
        }
    }

    pub fn record(&self, step: Step) -> &StepRecord {
        self.steps
            .iter()
            .find(|r| r.step == step)
            .expect("every step has a record")
    }

    fn record_mut(&mut self, step: Step) -> &mut StepRecord {
        self.steps
            .iter_mut()
            .find(|r| r.step == step)
            .expect("every step has a record")
    }

    /// The step to run next: the first one not done. A step found `running` was
    /// cut off (power loss) and runs again; every step is idempotent.
    pub fn next_step(&self) -> Option<Step> {
        self.steps
            .iter()
            .find(|r| r.state != State::Done)
            .map(|r| r.step)
    }

    pub fn begin(&mut self, step: Step, now: f64) {
        let r = self.record_mut(step);
        r.state = State::Running;
        r.attempts += 1;
        r.started_unix = Some(now);
        r.finished_unix = None;
        r.error = None;
    }

    pub fn finish(&mut self, step: Step, now: f64) {
        let r = self.record_mut(step);
        r.state = State::Done;
        r.finished_unix = Some(now);
        r.seconds = r.started_unix.map(|s| now - s);
    }

    pub fn fail(&mut self, step: Step, now: f64, error: &str) {
        let r = self.record_mut(step);
        r.state = State::Failed;
        r.finished_unix = Some(now);
        r.seconds = r.started_unix.map(|s| now - s);
        r.error = Some(error.into());
    }

    /// Whether a step has failed too often to try again by itself.
    pub fn exhausted(&self, step: Step) -> bool {
        let r = self.record(step);
        r.state == State::Failed && r.attempts >= MAX_ATTEMPTS
    }

    /// Seconds from writing the partition table to a bootable recovery entry.
    pub fn unrecoverable_window(&self) -> Option<f64> {
        Some(self.recovery_ready_unix? - self.point_of_no_return_unix?)
    }

    /// Seconds from writing the partition table to the bundle complete on `data`.
    pub fn stash_window(&self) -> Option<f64> {
        Some(self.stash_done_unix? - self.point_of_no_return_unix?)
    }

    pub fn load(path: &Path) -> Result<Journal> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading journal {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing journal {}", path.display()))
    }

    /// Writes the journal crash-safely to every path given (data LV, /boot mirror).
    pub fn save(&self, paths: &[&Path]) -> Result<()> {
        let text = serde_json::to_vec_pretty(self)?;
        for p in paths {
            crate::fsutil::write_atomic(p, &text)
                .with_context(|| format!("writing journal {}", p.display()))?;
        }
        Ok(())
    }

    /// One line per step for the console and the closing report.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for r in &self.steps {
            s.push_str(&format!(
                "  {:<10} {:<8} attempts {}{}{}\n",
                r.step.name(),
                format!("{:?}", r.state).to_lowercase(),
                r.attempts,
                r.seconds.map(|x| format!(", {x:.1} s")).unwrap_or_default(),
                r.error
                    .as_ref()
                    .map(|e| format!(", error: {e}"))
                    .unwrap_or_default()
            ));
        }
        if let Some(w) = self.unrecoverable_window() {
            s.push_str(&format!(
                "  unrecoverable window: {w:.1} s (GPT written -> recovery GRUB installed)\n"
            ));
        }
        if let Some(w) = self.stash_window() {
            s.push_str(&format!("  GPT written -> bundle stashed: {w:.1} s\n"));
        }
        let p = &self.peak_memory;
        s.push_str(&format!(
            "  peak memory: {} MiB at once during {} (dualroot RSS {} MiB + staging tmpfs {} MiB); highest RSS alone {} MiB, tmpfs alone {} MiB (staged {} MiB of which bundle {} MiB, undo record {} MiB)\n",
            p.bytes >> 20,
            if p.step.is_empty() { "-" } else { p.step.as_str() },
            p.rss_bytes >> 20,
            p.tmpfs_bytes >> 20,
            self.peak_rss_bytes >> 20,
            self.peak_tmpfs_bytes >> 20,
            self.staged_bytes >> 20,
            self.bundle_bytes >> 20,
            self.undo_bytes >> 20
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_journal_starts_at_preflight() {
        let j = Journal::new("/dev/vda", "VA", "console=ttyS0");
        assert_eq!(j.next_step(), Some(Step::Preflight));
    }

    #[test]
    fn resume_reruns_the_interrupted_step_only() {
        let mut j = Journal::new("/dev/vda", "VA", "");
        for (i, s) in STEPS.iter().take(6).enumerate() {
            j.begin(*s, i as f64);
            j.finish(*s, i as f64 + 0.5);
        }
        j.begin(Step::Unpack, 10.0); // power cut here
        let j2: Journal = serde_json::from_str(&serde_json::to_string(&j).unwrap()).unwrap();
        assert_eq!(j2.next_step(), Some(Step::Unpack));
        assert_eq!(j2.record(Step::Unpack).attempts, 1);
        assert_eq!(j2.record(Step::Stash).state, State::Done);
    }

    #[test]
    fn failures_count_and_exhaust() {
        let mut j = Journal::new("/dev/vda", "VA", "");
        for k in 0..MAX_ATTEMPTS {
            assert!(!j.exhausted(Step::Boot));
            j.begin(Step::Boot, k as f64);
            j.fail(Step::Boot, k as f64 + 1.0, "grub-install failed");
        }
        assert!(j.exhausted(Step::Boot));
        assert_eq!(
            j.record(Step::Boot).error.as_deref(),
            Some("grub-install failed")
        );
    }

    #[test]
    fn all_done_means_nothing_next_and_window_measured() {
        let mut j = Journal::new("/dev/vda", "VA", "");
        for s in STEPS {
            j.begin(s, 1.0);
            j.finish(s, 2.0);
        }
        j.point_of_no_return_unix = Some(100.0);
        j.recovery_ready_unix = Some(104.5);
        j.stash_done_unix = Some(110.0);
        assert_eq!(j.next_step(), None);
        assert_eq!(j.unrecoverable_window(), Some(4.5));
        assert!(j.summary().contains("unrecoverable window: 4.5 s"));
        assert!(j.summary().contains("bundle stashed: 10.0 s"));
    }

    #[test]
    fn step_properties() {
        assert!(!Step::StageRam.destructive());
        assert!(Step::Partition.destructive());
        assert!(!Step::Recovery.resumable());
        assert!(Step::Partition.in_window() && Step::Recovery.in_window());
        assert!(Step::Stash.resumable() && !Step::Stash.in_window());
        assert!(Step::Volumes.retry_in_place() && Step::Stash.retry_in_place());
        assert!(!Step::Unpack.retry_in_place() && !Step::StageRam.retry_in_place());
        assert!(Step::Unpack.resumable());
        assert_eq!(Step::parse("stage-ram"), Some(Step::StageRam));
        assert_eq!(Step::parse("nope"), None);
    }

    #[test]
    fn save_and_load_to_two_places() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.json");
        let b = d.path().join("b.json");
        let j = Journal::new("/dev/vda", "VA", "x");
        j.save(&[&a, &b]).unwrap();
        assert_eq!(Journal::load(&a).unwrap(), j);
        assert_eq!(Journal::load(&b).unwrap(), j);
    }
}
