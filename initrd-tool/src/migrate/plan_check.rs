//! `dualroot plan check`: the offline check an operator runs while writing a plan.
//! Schema, layout and every room rule, with no live system: the bundle (when
//! given) supplies the payload's sizes and kernel; the disk size is given.

use crate::bundle;
use crate::capacity::{self, Needs};
use crate::keys::Keyring;
use crate::layout;
use crate::plan::{ByteSizes, Plan, MIB};
use serde::Serialize;
use std::path::Path;

/// Room assumed for the recovery kernel and migration initramfs when no old
/// system is at hand (an EL7 kernel is ~7 MiB, a dracut initramfs 30-50 MiB).
pub const RECOVERY_ESTIMATE: u64 = 64 * MIB;

#[derive(Debug, Clone, Serialize)]
pub struct PlanCheck {
    pub plan: String,
    pub ok: bool,
    /// One sentence per thing that would stop the migration.
    pub blockers: Vec<String>,
    /// What was assumed or could not be checked offline.
    pub notes: Vec<String>,
    pub sizes: Option<ByteSizes>,
    pub needs: Needs,
    pub disk_bytes: Option<u64>,
    pub min_disk_bytes: Option<u64>,
}

impl PlanCheck {
    pub fn render(&self) -> String {
        let mut s = format!("dualroot plan check {}\n", self.plan);
        if let Some(z) = &self.sizes {
            s.push_str(&format!(
                "  sizes: boot {} MiB, root {} MiB, back {} MiB, data {} MiB, image {} MiB\n",
                z.boot / MIB,
                z.root / MIB,
                z.back / MIB,
                z.data / MIB,
                z.image / MIB
            ));
        }
        if let (Some(d), Some(m)) = (self.disk_bytes, self.min_disk_bytes) {
            s.push_str(&format!(
                "  disk: {} MiB, layout needs {} MiB\n",
                d / MIB,
                m.div_ceil(MIB)
            ));
        }
        for n in &self.notes {
            s.push_str(&format!("  note: {n}\n"));
        }
        if self.ok {
            s.push_str("result: the plan would pass\n");
        } else {
            s.push_str(&format!("result: {} blocker(s):\n", self.blockers.len()));
            for b in &self.blockers {
                s.push_str(&format!("  - {b}\n"));
            }
        }
        s
    }
}

pub fn check(
    plan_path: &Path,
    bundle_path: Option<&Path>,
    keyring: Option<&Path>,
    disk_bytes: Option<u64>,
) -> PlanCheck {
    let mut c = PlanCheck {
        plan: plan_path.display().to_string(),
        ok: false,
        blockers: Vec::new(),
        notes: Vec::new(),
        sizes: None,
        needs: Needs {
            recovery_boot_files: RECOVERY_ESTIMATE,
            ..Needs::default()
        },
        disk_bytes,
        min_disk_bytes: None,
    };
    let plan = match Plan::load(plan_path) {
        Ok(p) => p,
        Err(e) => {
            c.blockers.push(format!("{e:#}"));
            return c;
        }
    };
    c.notes.push(format!(
        "recovery kernel and migration initramfs counted as {} MiB (they are measured on the appliance by preflight)",
        RECOVERY_ESTIMATE / MIB
    ));
    c.notes.push(
        "carried files are not counted (they are measured on the appliance by preflight)".into(),
    );
    match bundle_path {
        Some(b) => read_bundle(&mut c, &plan, b, keyring),
        None => c.notes.push(
            "no --bundle: the payload's size and kernel are not known, so root/back and /boot are checked only where sizes are explicit".into(),
        ),
    }
    match capacity::resolve(&plan, &c.needs) {
        Ok(sizes) => {
            c.sizes = Some(sizes);
            c.blockers.extend(capacity::blockers(&sizes, &c.needs));
            c.min_disk_bytes = Some(layout::min_disk(&sizes));
            match disk_bytes {
                Some(d) => {
                    if let Err(e) = layout::compute(d, &sizes) {
                        c.blockers.push(format!("{e:#}"));
                    }
                }
                None => c
                    .notes
                    .push("no --disk-size: the layout was not checked against a disk".into()),
            }
        }
        Err(e) => c.blockers.push(format!("{e:#}")),
    }
    c.ok = c.blockers.is_empty();
    c
}

fn read_bundle(c: &mut PlanCheck, plan: &Plan, path: &Path, keyring: Option<&Path>) {
    c.needs.bundle = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) => {
            c.blockers.push(format!("bundle {}: {e}", path.display()));
            return;
        }
    };
    let keyring = keyring.unwrap_or(&plan.bundle.keyring);
    let kr = match Keyring::load(keyring) {
        Ok(k) => Some(k),
        Err(e) => {
            c.notes.push(format!(
                "signature not checked and payload not scanned ({e:#}); give --keyring to check the kernel too"
            ));
            None
        }
    };
    let opened = match &kr {
        Some(k) => bundle::open(path, Some(k)),
        None => bundle::open(path, None),
    };
    let b = match opened {
        Ok(b) => b,
        Err(e) => {
            c.blockers.push(format!("bundle {}: {e:#}", path.display()));
            return;
        }
    };
    c.needs.payload = Some(b.manifest.payload.uncompressed_size);
    c.needs.payload_entries = Some(b.manifest.payload.entries);
    match (&plan.model, b.manifest.model.as_str()) {
        (_, "any") => {}
        (Some(m), _) => {
            if let Err(e) = crate::compat::check_model(&b.manifest.model, Some(m)) {
                c.blockers.push(format!("{e:#}"));
            }
        }
        (None, bm) => c.notes.push(format!(
            "the bundle is for model {bm}: the appliance's /etc/dualroot/model must say so (or set `model` in the plan)"
        )),
    }
    if kr.is_none() {
        return;
    }
    let scan = match bundle::scan::scan(b, &[]) {
        Ok(s) => s,
        Err(e) => return c.blockers.push(format!("bundle {}: {e:#}", path.display())),
    };
    match scan.require_kernel() {
        Ok((_, bytes)) => c.needs.slot_boot_files = Some(bytes),
        Err(e) => c.blockers.push(format!("bundle {}: {e:#}", path.display())),
    }
    if let Err(e) = scan.require_initramfs_tool() {
        c.blockers.push(format!("bundle {}: {e:#}", path.display()));
    }
}
