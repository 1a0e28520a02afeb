//! Undo of the unrecoverable window: a step between the partition table and the
//! stashed bundle that still fails after its in-place retries puts the old disk
//! back from the undo record in RAM (`crate::undo`), checks the old system
//! mounts, leaves the outcome for it and reboots into it. An undo that fails
//! itself powers the machine off with the reason: never a reboot loop.

use super::journal::Step;
use super::steps::leave_outcome_on_old_root;
use super::{now, Ctx, EXIT_GAVE_UP, EXIT_UNDONE, LOG_FILE};
use crate::blockdev::{self, part_dev, Lvm};
use crate::cmd::{cmd, CommandExt};
use crate::mounts::Mount;
use crate::plan::MIB;
use anyhow::{bail, Context, Result};
use dualroot_api::MigrationOutcome;
use log::{error, info, warn};

/// Undoes the window after `step` failed with `msg`; returns the exit code.
pub fn undo_window(ctx: &mut Ctx, step: Step, msg: &str) -> u8 {
    let Some(rec) = ctx.undo.clone() else {
        return EXIT_GAVE_UP;
    };
    let started = now();
    ctx.journal.undo_started_unix = Some(started);
    error!(
        "step {} failed {} times inside the unrecoverable window: {msg}\nundoing: putting the old disk back from the undo record in RAM ({} MiB in {} regions)",
        step.name(),
        ctx.journal.record(step).attempts,
        rec.bytes() / MIB,
        rec.regions.len()
    );
    ctx.journal.outcome = Some(format!("undoing after step {} failed: {msg}", step.name()));
    // Where an undo that fails below can still be read: the new /boot and data.
    let _ = ctx.save_journal();
    match put_back(ctx, &rec, step, msg) {
        Ok(()) => {
            let secs = now() - started;
            ctx.journal.undo_seconds = Some(secs);
            info!(
                "undone: the old disk is back ({} MiB in {} regions written back and read back as recorded, old root and /boot mounted) in {secs:.1} s; rebooting into the old system",
                rec.bytes() / MIB,
                rec.regions.len()
            );
            EXIT_UNDONE
        }
        Err(e) => {
            error!(
                "undo failed: {e:#}\nThe disk may not boot. The machine powers off instead of rebooting; the journal is on /boot/dualroot/journal.json where the new /boot still mounts, and the console above has the cause."
            );
            ctx.journal.outcome = Some(format!(
                "undo failed after step {} failed ({msg}): {e:#}",
                step.name()
            ));
            save_journal_on_some_boot(ctx);
            EXIT_GAVE_UP
        }
    }
}

fn put_back(ctx: &mut Ctx, rec: &crate::undo::Record, step: Step, msg: &str) -> Result<()> {
    if ctx.failpoints.armed("undo") {
        bail!("failpoint undo armed (rd.dualroot.failpoint): the undo fails on purpose before it writes anything");
    }
    // Nothing of the new layout may hold the disk: the log leaves `data`, the
    // new filesystems are unmounted and the new VG deactivated.
    if ctx.log_on_data {
        crate::logging::set_file(Some(&ctx.paths.run.join(LOG_FILE)));
        ctx.log_on_data = false;
    }
    for m in [ctx.data_mount.take(), ctx.boot_mount.take()]
        .into_iter()
        .flatten()
    {
        let t = m.target.clone();
        m.unmount()
            .with_context(|| format!("unmounting the new {}", t.display()))?;
    }
    let lvm = Lvm {
        only: Some(part_dev(&ctx.disk, 3)),
    };
    if let Err(e) = lvm.run(&["vgchange", "-an", &ctx.plan.vg]) {
        // No VG yet (a failure in `partition` or `recovery`): nothing to stop.
        info!(
            "undo: the new volume group {} is not active: {e:#}",
            ctx.plan.vg
        );
    }
    crate::undo::restore(rec, &ctx.paths.ram().join("undo"))?;
    if crate::efi::booted_uefi(&ctx.sys) {
        // The recovery chain's entry names the new ESP, which is gone again.
        if let Err(e) = crate::efi::remove_entries(None, crate::efi::RECOVERY_LABEL) {
            warn!(
                "undo: the firmware entry {} stays: {e:#}",
                crate::efi::RECOVERY_LABEL
            );
        }
    }
    info!(
        "undo: {} MiB written back to {} and read back as recorded: {}",
        rec.bytes() / MIB,
        ctx.disk.display(),
        rec.describe()
    );
    blockdev::reread_partitions(&ctx.disk).with_context(|| {
        format!(
            "the kernel did not take the old partition table of {} back",
            ctx.disk.display()
        )
    })?;
    let dev = ctx
        .old_root_dev
        .clone()
        .context("the old root device is not known (not the first boot of the migration)")?;
    if let Some(vg) = ctx
        .journal
        .source
        .as_ref()
        .and_then(|s| s.old_vg())
        .map(str::to_string)
    {
        Lvm::default()
            .run(&["vgchange", "-ay", &vg])
            .with_context(|| format!("activating the old volume group {vg} again"))?;
    }
    let _ = cmd("udevadm", ["settle", "--timeout=10"]).run();
    blockdev::wait_for(std::slice::from_ref(&dev))?;
    let (root, boot) = super::entry::mount_old(&ctx.paths, &dev)
        .context("the old root or /boot does not mount after the undo")?;
    ctx.old_mount = Some(root);
    ctx.old_boot_mount = boot;
    crate::undo::check_boot_sector(rec, &ctx.paths.ram().join("undo"))?;
    leave_outcome_on_old_root(
        ctx,
        MigrationOutcome::Undone,
        Some(step),
        &format!(
            "step {} failed {} times inside the unrecoverable window: {msg}; the old disk was put back",
            step.name(),
            ctx.journal.record(step).attempts
        ),
        "the old system boots as it was before the migration; staging again retries it",
    )?;
    ctx.journal.outcome = Some(format!("undone after step {} failed: {msg}", step.name()));
    Ok(())
}

/// After a failed undo the journal goes where it can still be found: the new
/// `/boot` (mounted, or mounted again), else RAM only (the console has it).
fn save_journal_on_some_boot(ctx: &mut Ctx) {
    if ctx.boot_mount.is_none() {
        match Mount::ext4(&part_dev(&ctx.disk, 2), &ctx.paths.boot()) {
            Ok(m) => ctx.boot_mount = Some(m),
            Err(e) => warn!("the new /boot does not mount to record the failed undo: {e:#}"),
        }
    }
    if let Err(e) = ctx.save_journal() {
        warn!("cannot write the journal: {e:#}");
    }
    nix::unistd::sync();
}
