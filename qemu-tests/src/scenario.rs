//! A scenario: one run directory, its VMs, what it checked, and one result
//! line (scenario, result, wall time, peak memory) for the summary table.

use crate::error::{Context, Result};
use crate::images;
use crate::parse;
use crate::qemu::{Stats, Vm, VmConfig};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// VMs are heavy under TCG on a 2-core host: scenarios in one test binary
/// run one at a time.
static VM_SLOT: Mutex<()> = Mutex::new(());

pub struct Scenario {
    pub name: String,
    /// `$DUALROOT_CACHE/runs/<name>/`, emptied at the start of the run and
    /// kept afterwards (console logs, overlays) for inspection.
    pub dir: PathBuf,
    pub stats: Arc<Mutex<Stats>>,
    started: Instant,
    /// Cached states this scenario started from (for the table).
    states: Mutex<Vec<crate::states::State>>,
    /// Figures the scenario measured, for the table (`name=value`).
    notes: Mutex<Vec<(String, String)>>,
}

impl Scenario {
    fn new(name: &str) -> Result<Scenario> {
        let dir = std::env::var_os("DUALROOT_RUN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| images::cache_dir().join("runs"))
            .join(name);
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scenario {
            name: name.into(),
            dir,
            stats: Arc::new(Mutex::new(Stats::default())),
            started: Instant::now(),
            states: Mutex::new(Vec::new()),
            notes: Mutex::new(Vec::new()),
        })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Start a VM whose files go into the scenario directory.
    pub fn vm(&self, name: &str, config: VmConfig) -> Result<Vm> {
        Vm::start(name, config, &self.dir, self.stats.clone())
    }

    /// Print one check and whether it held; an unmet check is an error.
    pub fn check(&self, what: &str, ok: bool, detail: &str) -> Result<()> {
        println!(
            "[{}] check: {what}: {} ({detail})",
            self.name,
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            crate::bail!("check failed: {what} ({detail})");
        }
        Ok(())
    }

    /// Removes this run's disk images and payload staging (logs stay), for a
    /// scenario whose disks are too big to keep after it passed (`scale`
    /// left 13 GB, and a full disk pauses every running guest on ENOSPC).
    /// `DUALROOT_KEEP_DISKS=1` keeps them.
    pub fn discard_disks(&self) {
        if std::env::var_os("DUALROOT_KEEP_DISKS").is_some() {
            return;
        }
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut freed = 0u64;
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let disk = [".qcow2", ".img", ".raw"].iter().any(|x| name.ends_with(x));
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            let gone = if disk {
                fs::remove_file(&p).is_ok()
            } else if p.is_dir() && name.starts_with("payload") {
                fs::remove_dir_all(&p).is_ok()
            } else {
                false
            };
            if gone && disk {
                freed += len;
            }
        }
        println!(
            "[{}] removed the run's disks ({} MiB of images; DUALROOT_KEEP_DISKS=1 keeps them)",
            self.name,
            freed >> 20
        );
    }

    /// A figure for the result table (e.g. the unrecoverable window).
    pub fn note(&self, name: &str, value: &str) {
        println!("[{}] {name} = {value}", self.name);
        self.notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.into(), value.into()));
    }

    /// Notes a cached state this scenario starts from.
    pub fn uses_state(&self, st: &crate::states::State) {
        println!("[{}] starts from state {}", self.name, st.describe());
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(st.clone());
    }

    pub fn stats(&self) -> Stats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, result: &str, error: Option<&str>) {
        let s = self.stats();
        let mib = |k: Option<u64>| {
            k.map(|k| format!("{}", k / 1024))
                .unwrap_or_else(|| "-".into())
        };
        let mut fields = vec![
            ("scenario", self.name.clone()),
            ("result", result.to_string()),
            (
                "wall_s",
                format!("{:.0}", self.started.elapsed().as_secs_f64()),
            ),
            ("guest_peak_used_mib", mib(s.peak_guest_used_kib)),
            ("qemu_peak_rss_mib", mib(s.peak_qemu_rss_kib)),
            (
                "boot_to_ssh_s",
                if s.boot_to_ssh_s.is_empty() {
                    "-".into()
                } else {
                    s.boot_to_ssh_s
                        .iter()
                        .map(|t| format!("{t:.0}"))
                        .collect::<Vec<_>>()
                        .join("/")
                },
            ),
        ];
        let states = self
            .states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        fields.push((
            "state",
            if states.is_empty() {
                "-".into()
            } else {
                states
                    .iter()
                    .map(|s| format!("{}:{}", s.name, &s.key[..8]))
                    .collect::<Vec<_>>()
                    .join("+")
            },
        ));
        fields.push((
            "state_build_s",
            format!(
                "{:.0}",
                // fold from +0.0: an empty f64 sum is -0.0, printed "-0"
                states
                    .iter()
                    .filter_map(|s| s.built_secs)
                    .fold(0.0, |a, b| a + b)
            ),
        ));
        let notes = self.notes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        fields.push((
            "notes",
            notes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        ));
        if let Some(e) = error {
            fields.push(("error", e.lines().next().unwrap_or_default().to_string()));
        }
        let line = parse::format_result_line(&fields);
        println!("[{}] result: {line}", self.name);
        if let Some(path) = std::env::var_os("DUALROOT_RESULTS") {
            let _ = append_line(Path::new(&path), &line);
        }
    }
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")
}

fn vm_slot() -> MutexGuard<'static, ()> {
    VM_SLOT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run one scenario: times it, records its result line, and panics with the
/// full error (console tail included) when it fails.
pub fn run(name: &str, body: impl FnOnce(&Scenario) -> Result<()>) {
    let _slot = vm_slot();
    let sc = match Scenario::new(name) {
        Ok(s) => s,
        Err(e) => panic!("{name}: setting up: {e}"),
    };
    println!("[{name}] run directory {}", sc.dir.display());
    match body(&sc) {
        Ok(()) => sc.record("pass", None),
        Err(e) => {
            sc.record("FAIL", Some(&e.to_string()));
            panic!("{name} failed: {e}");
        }
    }
}
