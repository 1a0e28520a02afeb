//! The step functions. Each is idempotent: a resume re-runs the interrupted one.
//!
//! The unrecoverable window is `partition` + `recovery`: the partition table is
//! written, then at once `/boot` gets the recovery kernel, the migration initramfs,
//! GRUB and the journal. Only then is the bundle copied to `data` (`stash`), which
//! a power cut can interrupt: the recovery boot then finds the stash incomplete,
//! says so and powers off instead of looping.

use super::journal::Step;
use super::preflight::{self, Env};
use super::{now, Ctx, StageInfo, OLD_RESULT_FILE, STAGE_INFO, STAGE_NICS};
use crate::blockdev::{self, lv_path, part_dev, Lvm};
use crate::bootfiles::chroot_binds;
use crate::bundle::{self, UnpackOptions};
use crate::cmd::{cmd, find_tool, CommandExt};
use crate::fsutil::{copy_dir_files, copy_hashed, file_sha256, write_atomic};
use crate::grub::{self, BootConfig, Flavor};
use crate::keys::Keyring;
use crate::layout;
use crate::mounts::Mount;
use crate::plan::MIB;
use crate::sync::{self, CarrySource};
use anyhow::{bail, Context, Result};
use dualroot_api::{MigrationOutcome, MigrationResult, API_VERSION};
use fs_err as fs;
use log::{info, warn};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A failure no retry or reboot can fix (the stashed bundle is incomplete and the
/// RAM copy is gone): the migration stops and the machine powers off.
#[derive(Debug)]
pub struct GiveUp(pub String);

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GiveUp {}

pub fn run_step(ctx: &mut Ctx, step: Step) -> Result<()> {
    match step {
        Step::Preflight => preflight_step(ctx),
        Step::StageRam => stage_ram(ctx),
        Step::Partition => partition(ctx),
        Step::Recovery => recovery(ctx),
        Step::Volumes => volumes(ctx),
        Step::Stash => stash(ctx),
        Step::Unpack => unpack(ctx),
        Step::Sync => sync_step(ctx),
        Step::Boot => boot(ctx),
        Step::Done => done(ctx),
    }
}

fn old_env(ctx: &Ctx) -> Env {
    Env::initramfs(&ctx.paths.old(), &ctx.proc, &ctx.sys)
}

fn lvm(ctx: &Ctx) -> Lvm {
    Lvm {
        only: Some(part_dev(&ctx.disk, 3)),
    }
}

fn preflight_step(ctx: &mut Ctx) -> Result<()> {
    let rep = preflight::run(&ctx.plan, &old_env(ctx));
    info!("{}", rep.render());
    if !rep.ok() {
        bail!("{}", rep.blockers.join("; "));
    }
    ctx.journal.bundle_bytes = rep.memory.bundle;
    ctx.journal.sizes = rep.sizes;
    ctx.journal.undo_bytes = if ctx.failpoints.armed("no-undo") {
        info!("failpoint no-undo armed: no undo record is taken");
        0
    } else {
        rep.memory.undo
    };
    Ok(())
}

/// Takes back the one-shot entry `grub-reboot` armed in the old system's
/// grubenv. GRUB clears it itself only where it can write its environment (not on
/// XFS or LVM), so a refused migration would otherwise run again at every boot.
/// Returns whether there was one.
pub fn clear_one_shot(old_root: &Path) -> Result<bool> {
    let mut cleared = false;
    for dir in ["boot/grub", "boot/grub2"] {
        let p = old_root.join(dir).join("grubenv");
        if !p.is_file() {
            continue;
        }
        let mut env = grub::read_env(&p)?;
        if env.remove("next_entry").is_some() {
            grub::write_env(&p, &env)?;
            cleared = true;
        }
    }
    Ok(cleared)
}

/// Leaves the reason for a refusal on the old root so the old system (and its
/// agent) can read it after the reboot, and takes back the one-shot entry.
pub fn leave_result_on_old_root(ctx: &Ctx, reason: &str) {
    leave_outcome_on_old_root(
        ctx,
        MigrationOutcome::Refused,
        None,
        reason,
        "the old system boots unchanged",
    )
    .unwrap_or_else(|e| warn!("{e:#}"));
}

/// The outcome for the old system (and its agent) on the old root, with the
/// one-shot entry taken back. An error when the result file cannot be written.
pub fn leave_outcome_on_old_root(
    ctx: &Ctx,
    outcome: MigrationOutcome,
    step: Option<Step>,
    reason: &str,
    next: &str,
) -> Result<()> {
    let Some(root) = &ctx.old_mount else {
        bail!("the old root is not mounted; {OLD_RESULT_FILE} cannot be written")
    };
    // Mounted read-only while staging; the refusal's two writes need it writable.
    for m in std::iter::once(root).chain(ctx.old_boot_mount.as_ref()) {
        if let Err(e) = m.remount_rw() {
            warn!("{e:#}");
        }
    }
    match clear_one_shot(&ctx.paths.old()) {
        Ok(true) => info!("the one-shot migration entry is cleared in the old grubenv"),
        Ok(false) => {}
        Err(e) => warn!("could not clear the one-shot entry in the old grubenv: {e:#}"),
    }
    // The old system boots as it was: stage's menu entry goes from custom.cfg too.
    for dir in ["boot/grub", "boot/grub2"] {
        let custom = ctx.paths.old().join(dir).join("custom.cfg");
        match super::stage::remove_entry(&custom) {
            Ok(true) => info!("took the migration entry out of {}", custom.display()),
            Ok(false) => {}
            Err(e) => warn!(
                "could not take the migration entry out of {}: {e:#}",
                custom.display()
            ),
        }
    }
    let p = ctx.paths.old().join(OLD_RESULT_FILE);
    let body = MigrationResult {
        api_version: API_VERSION,
        outcome,
        step: step.map(|s| s.name().to_string()),
        reason: reason.to_string(),
        next: next.into(),
        time_unix: now(),
        journal: serde_json::to_value(&ctx.journal).unwrap_or_default(),
    };
    p.parent()
        .map(|d| fs::create_dir_all(d).with_context(|| format!("creating {}", d.display())))
        .transpose()
        .and_then(|_| write_atomic(&p, serde_json::to_string_pretty(&body)?.as_bytes()))
        .with_context(|| format!("could not write {OLD_RESULT_FILE} on the old root"))?;
    info!("reason written to {OLD_RESULT_FILE} on the old root");
    Ok(())
}

fn stage_ram(ctx: &mut Ctx) -> Result<()> {
    let env = old_env(ctx);
    let bundle_src = env.under_root(&ctx.plan.bundle.path);
    let bundle_size = fs::metadata(&bundle_src)
        .with_context(|| format!("bundle {}", bundle_src.display()))?
        .len();
    let carry = preflight::carry_bytes(&env, &ctx.plan);
    let (kernel, initrd) = preflight::recovery_files(&env);
    // On UEFI the old system's signed shim and GRUB boot the recovery entry.
    let chain = if uefi(ctx) {
        Some(preflight::uefi_old_chain(&env).context("finding the old boot chain")?)
    } else {
        None
    };
    let recovery = preflight::recovery_bytes(&env) + chain.as_ref().map_or(0, |c| c.bytes);
    // Cap: what we copy plus the margin; tar headers and the keyring fit in it.
    let cap = bundle_size + carry + recovery + ctx.plan.margin() + ctx.journal.undo_bytes;
    let ram = ctx.paths.ram();
    ctx.ram_mount = Some(
        Mount::tmpfs(&ram, cap).with_context(|| format!("mounting a {} MiB tmpfs", cap / MIB))?,
    );
    info!(
        "staging {} MiB into a {} MiB tmpfs",
        (bundle_size + carry + recovery) / MIB,
        cap / MIB
    );

    let sha = copy_hashed(&bundle_src, &ram.join("os.bundle"))?;
    let info_path = env.under_root(Path::new(STAGE_INFO));
    if info_path.exists() {
        let want = StageInfo::load(&info_path)?;
        if want.bundle_sha256 != sha {
            bail!(
                "the staged bundle changed since `dualroot stage` (sha256 {sha}, expected {}); re-run stage",
                want.bundle_sha256
            );
        }
    }
    copy_dir_files(
        &env.under_root(&ctx.plan.bundle.keyring),
        &ram.join("keyring"),
    )?;
    // The copy the migration unpacks from: signature, manifest and the whole
    // payload's hash, checked before the point of no return.
    let kr = Keyring::load(&ram.join("keyring"))?;
    let b = bundle::open(&ram.join("os.bundle"), Some(&kr))
        .context("checking the RAM copy of the bundle")?;
    bundle::reader::check_payload(b, None)
        .context("checking the payload of the RAM copy of the bundle against its manifest")?;
    ctx.journal.bundle_sha256 = sha;
    write_atomic(
        &ram.join("plan.toml"),
        toml::to_string(&ctx.plan)?.as_bytes(),
    )?;

    // Carried files: identity set + the plan's list, as they are on the old root.
    let mut items = Vec::new();
    for id in sync::identity_items(&env.root) {
        items.push((env.under_root(&id), id));
    }
    for c in &ctx.plan.carry {
        let p = env.under_root(&c.path);
        if fs::symlink_metadata(&p).is_ok() {
            items.push((p, c.path.clone()));
        } else {
            info!(
                "carry: {} does not exist on the old system; skipped",
                c.path.display()
            );
        }
    }
    let carry_tar = ram.join("carry.tar");
    let f = fs::File::create(&carry_tar)
        .with_context(|| format!("creating {}", carry_tar.display()))?;
    let (f, entries) = bundle::create::write_tar(std::io::BufWriter::new(f), &items)?;
    f.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", carry_tar.display()))?;
    info!("carry: {entries} entries from {} item(s)", items.len());

    // The inventory `stage` took on the running system; sysfs here only when the
    // plan was staged by hand (a host-only initramfs may lack the NIC drivers).
    let staged_nics = env.under_root(Path::new(STAGE_NICS));
    let nics: Vec<crate::sysinfo::Nic> = match fs::read(&staged_nics) {
        Ok(data) => serde_json::from_slice(&data)
            .with_context(|| format!("parsing {}", staged_nics.display()))?,
        Err(_) => crate::sysinfo::nics(&ctx.sys.join("class/net"))?,
    };
    info!("nics: {} interface(s) to pin by MAC", nics.len());
    write_atomic(&ram.join("nics.json"), &serde_json::to_vec_pretty(&nics)?)?;
    fs::create_dir_all(ram.join("recovery")).context("creating the RAM recovery directory")?;
    copy_hashed(&kernel, &ram.join("recovery/vmlinuz")).context("copying the recovery kernel")?;
    copy_hashed(&initrd, &ram.join("recovery/initrd.img"))
        .context("copying the migration initramfs for recovery")?;
    if let Some(c) = &chain {
        let esp = crate::efi::old_esp_dir(&env.root).context("the old ESP is not mounted")?;
        crate::efi::stage_chain(c, &esp, &ram.join(RECOVERY_CHAIN))
            .context("copying the old boot chain from the old ESP")?;
        info!(
            "staged the old boot chain {} for the recovery entry",
            c.describe()
        );
    }
    ctx.journal.bundle_bytes = bundle_size;
    // What the migration must hold in RAM (bundle, carried files, recovery
    // kernel and initramfs, plan, keyring): the peak memory's baseline.
    ctx.journal.staged_bytes = crate::fsutil::used_bytes(&ram).unwrap_or(0);
    take_undo_record(ctx)?;
    ctx.sample_memory();
    ctx.failpoints.check_powercut(Step::StageRam);
    retire_old_system(ctx)
}

/// The undo record (`crate::undo`): every region the window may write, read
/// into the staging tmpfs before the point of no return. Preflight budgeted its
/// size; the regions are computed again here from the same layout.
fn take_undo_record(ctx: &mut Ctx) -> Result<()> {
    if ctx.journal.undo_bytes == 0 {
        info!(
            "undo: no record is taken; a failure inside the window reboots into the recovery entry"
        );
        return Ok(());
    }
    let sizes = ctx
        .journal
        .sizes
        .context("the journal has no layout sizes (preflight did not run)")?;
    let bytes = preflight::disk_bytes(&ctx.sys, &ctx.disk)?;
    let l = layout::compute(bytes, &sizes)?;
    let old_pvs = ctx
        .journal
        .source
        .as_ref()
        .map(preflight::old_pv_starts)
        .unwrap_or_default();
    let regions = l.undo_regions(bytes, &old_pvs);
    if crate::undo::total(&regions) != ctx.journal.undo_bytes {
        bail!(
            "the undo record would be {} MiB, not the {} MiB preflight budgeted; nothing was changed",
            crate::undo::total(&regions) / MIB,
            ctx.journal.undo_bytes / MIB
        );
    }
    let t = now();
    let rec = crate::undo::take(&ctx.disk, &regions, &ctx.paths.ram().join("undo"))?;
    ctx.journal.undo_taken_seconds = Some(now() - t);
    info!(
        "undo: {} MiB of {} recorded in RAM in {:.1} s: {}",
        rec.bytes() / MIB,
        ctx.disk.display(),
        now() - t,
        rec.describe()
    );
    ctx.undo = Some(rec);
    Ok(())
}

/// The last act before the point of no return: the old filesystems are
/// unmounted and, for a root on LVM, the old VG is deactivated (the kernel
/// cannot re-read a partition table while its LVs hold the partitions). If the
/// VG will not go down, the old system is mounted again so the refusal can say
/// why on it.
fn retire_old_system(ctx: &mut Ctx) -> Result<()> {
    while let Some(m) = ctx.old_extra_mounts.pop() {
        let t = m.target.clone();
        m.unmount()
            .with_context(|| format!("unmounting the old {}", t.display()))?;
    }
    if let Some(m) = ctx.old_boot_mount.take() {
        m.unmount().context("unmounting the old /boot")?;
    }
    if let Some(m) = ctx.old_mount.take() {
        m.unmount().context("unmounting the old root")?;
    }
    let Some(vg) = ctx
        .journal
        .source
        .as_ref()
        .and_then(|s| s.old_vg())
        .map(str::to_string)
    else {
        return Ok(());
    };
    if let Err(e) = Lvm::default().run(&["vgchange", "-an", &vg]) {
        if let Some(dev) = ctx.old_root_dev.clone() {
            let _ = Lvm::default().run(&["vgchange", "-ay", &vg]);
            let (root, boot) = super::entry::mount_old(&ctx.paths, &dev)?;
            ctx.old_mount = Some(root);
            ctx.old_boot_mount = boot;
        }
        return Err(e.context(format!(
            "deactivating the old volume group {vg} before repartitioning"
        )));
    }
    info!("old volume group {vg} deactivated");
    Ok(())
}

fn partition(ctx: &mut Ctx) -> Result<()> {
    let sizes = ctx
        .journal
        .sizes
        .context("the journal has no layout sizes (preflight did not run)")?;
    let bytes = preflight::disk_bytes(&ctx.sys, &ctx.disk)?;
    let l = layout::compute(bytes, &sizes)?;
    if ctx.journal.point_of_no_return_unix.is_none() {
        ctx.journal.point_of_no_return_unix = Some(now());
        ctx.save_journal()?;
    }
    info!(
        "point of no return: writing a GPT to {}",
        ctx.disk.display()
    );
    // The old VG's PV signatures go first, while their offsets are known: the
    // old VG must never be found again next to the new one.
    if let Some(crate::source_layout::RootDevice::Lvm { vg, pvs, .. }) =
        ctx.journal.source.as_ref().map(|s| &s.root)
    {
        crate::source_layout::wipe_old_pvs(&ctx.disk, pvs)?;
        info!(
            "wiped the PV signature(s) of the old volume group {vg} ({})",
            pvs.iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    l.write_gpt(&ctx.disk)?;
    let ponr = ctx.journal.point_of_no_return_unix.unwrap_or_else(now);
    let lap = |what: &str| info!("partition: {what} ({:.1} s into the window)", now() - ponr);
    lap("GPT written");
    ctx.failpoints.check_powercut(Step::Partition);
    if let Err(e) = blockdev::reread_partitions(&ctx.disk) {
        // wait_for below names the partitions that did not appear.
        warn!("{e:#}");
    }
    let mut parts: Vec<PathBuf> = (1..=3).map(|n| part_dev(&ctx.disk, n)).collect();
    if l.esp.is_some() {
        parts.push(esp_dev(ctx));
    }
    blockdev::wait_for(&parts)?;
    // Only what the recovery entry needs is made inside the window.
    blockdev::mkfs_ext4(&parts[1], "boot")?;
    lap("/boot filesystem made");
    if l.esp.is_some() {
        mkfs_esp(&esp_dev(ctx))?;
        lap("ESP filesystem made");
    }
    ctx.failpoints.check_fail_late(Step::Partition)
}

/// After the recovery entry: PV, VG, the four LVs and the `data` filesystem,
/// then the small files a resume needs (plan, keyring, carried files, NICs).
fn volumes(ctx: &mut Ctx) -> Result<()> {
    require_ram_copy(ctx, Step::Volumes)?;
    let sizes = ctx
        .journal
        .sizes
        .context("the journal has no layout sizes (preflight did not run)")?;
    let l = layout::compute(preflight::disk_bytes(&ctx.sys, &ctx.disk)?, &sizes)?;
    let pv = part_dev(&ctx.disk, 3).display().to_string();
    let vg = ctx.plan.vg.clone();
    let lvm = lvm(ctx);
    // Re-runnable in place: a VG left by an earlier attempt is removed first
    // (its data LV unmounted, the log moved back to RAM).
    if ctx.journal.record(Step::Volumes).attempts > 1 {
        if let Some(m) = ctx.data_mount.take() {
            crate::logging::set_file(Some(&ctx.paths.run.join(super::LOG_FILE)));
            ctx.log_on_data = false;
            let _ = m.unmount();
        }
        let _ = lvm.run(&["vgremove", "-ff", "-y", &vg]);
    }
    lvm.run(&["pvcreate", "-ff", "-y", "--zero", "y", &pv])?;
    // The slot reserve travels with the VG (`layout::reserve_tag`).
    let tag = layout::reserve_tag(l.slot_reserve);
    lvm.run(&["vgcreate", "-y", "--addtag", &tag, &vg, &pv])?;
    // No zeroing or signature wiping: inside the window only `data` may be
    // written (the undo record covers it, not the slots or `image`); each LV
    // gets a fresh filesystem before it is used.
    for (name, size) in l.lvs {
        lvm.run(&[
            "lvcreate",
            "-y",
            "-Wn",
            "-Zn",
            "-L",
            &format!("{size}b"),
            "-n",
            name,
            &vg,
        ])?;
    }
    let lvs: Vec<PathBuf> = l.lvs.iter().map(|(n, _)| lv_path(&vg, n)).collect();
    blockdev::wait_for(&lvs)?;
    if ctx.undo.is_some() {
        // The undo record holds the old bytes where the layout puts `data`.
        let at = blockdev::lv_disk_offset(&lvm, &vg, "data", l.pv.start)?;
        if at != l.data_lv_offset() {
            bail!(
                "lvm put the data LV at byte {at} of {}, not at {} where the undo record expects it; nothing was written to it",
                ctx.disk.display(),
                l.data_lv_offset()
            );
        }
    }
    blockdev::mkfs_ext4(&lv_path(&vg, "data"), "data")?;
    mount_data_and_boot(ctx)?;
    let ram = ctx.paths.ram();
    let st = ctx.paths.stash();
    make_stash_dir(&st)?;
    copy_dir_files(&ram.join("keyring"), &st.join("keyring"))?;
    for f in STASH_FILES {
        copy_hashed(&ram.join(f), &st.join(f))?;
        // carry.tar holds the old shadow, SSH host keys and tokens.
        crate::fsutil::set_mode(&st.join(f), 0o600)?;
    }
    ctx.failpoints.check_fail_late(Step::Volumes)
}

/// The stash and its parent on `data` are root's alone (0700): the carried
/// files, extracted under it by `sync`, include secrets. `slot health` removes
/// them after the first confirmed boot (`sync::clear_stash`).
fn make_stash_dir(st: &Path) -> Result<()> {
    fs::create_dir_all(st).with_context(|| format!("creating {}", st.display()))?;
    crate::fsutil::set_mode(st, 0o700)?;
    if let Some(parent) = st.parent() {
        crate::fsutil::set_mode(parent, 0o700)?;
    }
    Ok(())
}

/// Steps up to the bundle on `data` work from the copy in RAM. After a power cut
/// the recovery boot has none: stop with a sentence instead of looping.
fn require_ram_copy(ctx: &Ctx, step: Step) -> Result<()> {
    if ctx.ram_mount.is_some() {
        return Ok(());
    }
    Err(GiveUp(format!(
        "the power was cut in step {} (or before it), while the bundle was only in RAM; the RAM copy is gone, so the migration cannot go on and the machine powers off. Re-image this machine or boot it from rescue media; the journal is on /boot/dualroot/journal.json",
        step.name()
    ))
    .into())
}

fn mount_data_and_boot(ctx: &mut Ctx) -> Result<()> {
    if ctx.data_mount.is_none() {
        ctx.data_mount = Some(Mount::ext4(
            &lv_path(&ctx.plan.vg, "data"),
            &ctx.paths.data(),
        )?);
    }
    if ctx.boot_mount.is_none() {
        ctx.boot_mount = Some(Mount::ext4(&part_dev(&ctx.disk, 2), &ctx.paths.boot())?);
    }
    Ok(())
}

fn boot_config(ctx: &Ctx, flavor: Flavor) -> BootConfig {
    let args = ctx.journal.kernel_args.clone();
    BootConfig {
        flavor,
        vg: ctx.plan.vg.clone(),
        recovery_args: format!("{args} {}", grub::SLOT_FAILURE_ARGS),
        kernel_args: args,
        panic_secs: 10,
    }
}

/// grub.cfg where the GRUB of `flavor` looks for it, the one environment block,
/// and boot.toml (what `slot install` regenerates grub.cfg from).
fn write_grub_files(ctx: &Ctx, flavor: Flavor, env_vars: &BTreeMap<String, String>) -> Result<()> {
    let boot = ctx.paths.boot();
    let bc = boot_config(ctx, flavor);
    for p in [
        boot.join(grub::BOOT_CONFIG_FILE),
        flavor.cfg_path(&boot),
        boot.join(grub::ENV_FILE),
    ] {
        let d = p.parent().unwrap_or(&boot);
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    write_atomic(&boot.join(grub::BOOT_CONFIG_FILE), bc.to_toml().as_bytes())?;
    write_atomic(&flavor.cfg_path(&boot), grub::render_cfg(&bc).as_bytes())?;
    grub::write_env(&boot.join(grub::ENV_FILE), env_vars)
}

/// The migration initramfs's own GRUB (the old OS's): the recovery entry.
fn recovery_grub_tool() -> Result<String> {
    find_tool(&["grub-install", "grub2-install"])
        .context("no grub-install in the migration initramfs")
}

fn migrating_env() -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    v.insert("migrating".into(), "1".into());
    v.insert("recovery_tries".into(), grub::recovery_tries_full());
    v
}

/// Installs the GRUB that came with the migration initramfs (the old OS's), booting
/// the recovery entry; on UEFI the old system's signed chain (see `crate::efi`).
fn install_recovery_grub(ctx: &Ctx) -> Result<()> {
    if uefi(ctx) {
        return install_recovery_chain(ctx);
    }
    let tool = recovery_grub_tool()?;
    write_grub_files(ctx, Flavor::of_tool(&tool), &migrating_env())?;
    cmd(&tool, ["--target=i386-pc", "--force"])
        .arg(format!("--boot-directory={}", ctx.paths.boot().display()))
        .arg(&ctx.disk)
        .run()
}

/// The machine booted with UEFI (the old layout had an ESP).
fn uefi(ctx: &Ctx) -> bool {
    ctx.journal.source.as_ref().is_some_and(|s| s.esp.is_some())
}

/// The old boot chain in RAM (stage-ram), and on `/boot` once the recovery
/// entry is in place (a resumed boot has no RAM copy, but may need to put the
/// chain back when the new OS's grub-install fails).
const RECOVERY_CHAIN: &str = "recovery/efi";

fn esp_dev(ctx: &Ctx) -> PathBuf {
    part_dev(&ctx.disk, layout::ESP_PARTITION_NUMBER)
}

/// FAT32, as the UEFI specification asks of an ESP on a fixed disk.
fn mkfs_esp(dev: &Path) -> Result<()> {
    let tool = find_tool(&preflight::VFAT_TOOLS)
        .context("no mkfs.vfat in the migration initramfs (dosfstools)")?;
    cmd(&tool, ["-F", "32", "-n", "ESP"]).arg(dev).run()
}

fn mount_esp(ctx: &Ctx) -> Result<Mount> {
    Mount::new(
        &esp_dev(ctx),
        &ctx.paths.run.join("esp"),
        Some("vfat"),
        nix::mount::MsFlags::empty(),
        None,
    )
}

/// GRUB's flavor on UEFI, where no `grub-install` runs for the recovery entry:
/// the old OS's tool still names the directory its GRUB reads (`grub2` on EL).
fn recovery_flavor() -> Flavor {
    recovery_grub_tool()
        .map(|t| Flavor::of_tool(&t))
        .unwrap_or(Flavor::Grub)
}

/// The recovery entry on UEFI: the old signed chain from `/boot` onto the new
/// ESP, at its old directory and the removable path, with the grub.cfg stubs.
fn install_recovery_chain(ctx: &Ctx) -> Result<()> {
    let flavor = recovery_flavor();
    write_grub_files(ctx, flavor, &migrating_env())?;
    let src = ctx.paths.boot().join(RECOVERY_CHAIN);
    let chain: crate::efi::Chain = serde_json::from_slice(&fs::read(src.join("chain.json"))?)
        .context("reading the staged boot chain")?;
    let esp = mount_esp(ctx)?;
    crate::efi::install_chain(
        &src,
        &chain.files,
        &chain.loader,
        &chain.dir,
        &esp.target,
        flavor.dir(),
    )
    .with_context(|| {
        format!(
            "putting the old boot chain on the new ESP {}",
            esp_dev(ctx).display()
        )
    })?;
    nix::unistd::sync();
    esp.unmount()?;
    // The old system's entry names a partition that is gone: the firmware would
    // skip it and might stop at its setup menu. The recovery chain gets its own
    // entry, first (the removable path boots it too when NVRAM is read-only).
    let path = format!("\\{}\\{}", chain.dir.replace('/', "\\"), chain.loader);
    match crate::efi::write_entry(
        None,
        &ctx.disk,
        layout::ESP_PARTITION_NUMBER,
        crate::efi::RECOVERY_LABEL,
        &path,
        true,
    ) {
        Ok(_) => info!(
            "firmware entry {} for {path} written, first in BootOrder",
            crate::efi::RECOVERY_LABEL
        ),
        Err(e) => warn!(
            "no firmware entry for the recovery chain ({e:#}); the firmware finds it at \\EFI\\BOOT\\BOOTX64.EFI"
        ),
    }
    Ok(())
}

/// After the new OS's chain has its entry: the recovery chain's entry and the
/// old system's (which named the old ESP) go. Best effort.
fn remove_old_entries(ctx: &Ctx, target: &Path) {
    let res = (|| -> Result<()> {
        crate::efi::remove_entries(Some(target), crate::efi::RECOVERY_LABEL)?;
        let staged = ctx.paths.boot().join(RECOVERY_CHAIN).join("chain.json");
        let chain: crate::efi::Chain = serde_json::from_slice(&fs::read(staged)?)?;
        if let Some(n) = &chain.old_entry {
            let file = format!("\\{}\\{}", chain.dir.replace('/', "\\"), chain.loader);
            if crate::efi::entry_names_file(&crate::efi::efibootmgr(Some(target), &[])?, n, &file) {
                crate::efi::efibootmgr(Some(target), &["-b", n, "-B"])?;
                info!("removed the old system's firmware entry Boot{n} ({file}): its ESP is gone");
            }
        }
        Ok(())
    })();
    if let Err(e) = res {
        warn!("removing the recovery and old firmware entries: {e:#}");
    }
}

/// The small files a resume needs (plan, keyring, carried files, NIC inventory),
/// from RAM to the stash on `data`.
const STASH_FILES: [&str; 3] = ["plan.toml", "carry.tar", "nics.json"];

/// Where a resume finds the plan before `data` exists.
pub const BOOT_PLAN: &str = "dualroot/plan.toml";

fn recovery(ctx: &mut Ctx) -> Result<()> {
    if ctx.boot_mount.is_none() {
        ctx.boot_mount = Some(Mount::ext4(&part_dev(&ctx.disk, 2), &ctx.paths.boot())?);
    }
    let ram = ctx.paths.ram();
    let plan_copy = ctx.paths.boot().join(BOOT_PLAN);
    fs::create_dir_all(plan_copy.parent().unwrap_or(&ram))
        .with_context(|| format!("creating the directory of {}", plan_copy.display()))?;
    copy_hashed(&ram.join("plan.toml"), &plan_copy)?;
    let rec = ctx.paths.boot().join("recovery");
    fs::create_dir_all(&rec).with_context(|| format!("creating {}", rec.display()))?;
    copy_hashed(&ram.join("recovery/vmlinuz"), &rec.join("vmlinuz"))?;
    copy_hashed(&ram.join("recovery/initrd.img"), &rec.join("initrd.img"))?;
    if uefi(ctx) {
        copy_dir_files(
            &ram.join(RECOVERY_CHAIN),
            &ctx.paths.boot().join(RECOVERY_CHAIN),
        )?;
    }
    install_recovery_grub(ctx)?;
    nix::unistd::sync();
    ctx.journal.recovery_ready_unix = Some(now());
    info!(
        "recovery entry installed: a power cut from here on boots the recovery entry (unrecoverable window {:.1} s)",
        ctx.journal.unrecoverable_window().unwrap_or(0.0)
    );
    ctx.failpoints.check_fail_late(Step::Recovery)
}

fn stash(ctx: &mut Ctx) -> Result<()> {
    if ctx.data_mount.is_none() && ctx.ram_mount.is_none() {
        require_ram_copy(ctx, Step::Stash)?;
    }
    mount_data_and_boot(ctx)?;
    let st = ctx.paths.stash();
    let stashed = st.join("os.bundle");
    let ram_copy = ctx.paths.ram().join("os.bundle");
    if ctx.ram_mount.is_some() && ram_copy.exists() {
        let partial = st.join("os.bundle.partial");
        copy_to_stash(&ram_copy, &partial, &ctx.journal.bundle_sha256, &|_| {})?;
        // The rename below is what makes the stash complete.
        ctx.failpoints.check_powercut(Step::Stash);
        fs::rename(&partial, &stashed)
            .with_context(|| format!("renaming {} to {}", partial.display(), stashed.display()))?;
        nix::unistd::sync();
    } else {
        // A resume: the RAM copy is gone, so the stash is all there is.
        let complete = stashed.exists()
            && file_sha256(&stashed).ok().as_deref() == Some(ctx.journal.bundle_sha256.as_str());
        if !complete {
            return Err(GiveUp(format!(
                "the bundle on the data LV ({}) is incomplete: the power was cut while it was being copied, and the RAM copy is gone. The migration cannot go on; the machine powers off. Re-image this machine or boot it from rescue media; the journal is on /boot/dualroot/journal.json",
                stashed.display()
            ))
            .into());
        }
        info!("stash: the bundle on the data LV is complete");
    }
    ctx.failpoints.check_fail_late(Step::Stash)?;
    // The window closes: from here a failure resumes from the stash, and the
    // undo record (which does not cover `image` or the slots) goes with the tmpfs.
    ctx.undo = None;
    ctx.journal.stash_done_unix = Some(now());
    info!(
        "bundle stashed on the data LV ({:.1} s after the partition table was written)",
        ctx.journal.stash_window().unwrap_or(0.0)
    );
    ctx.sample_memory();
    if let Some(m) = ctx.ram_mount.take() {
        m.unmount().context("unmounting the staging tmpfs")?;
    }
    Ok(())
}

/// Copies the RAM bundle to the stash and proves the copy on the disk before the
/// RAM copy is dropped: `copy_hashed` hashes what it read from RAM, so after the
/// fsync the copy's page cache is dropped (POSIX_FADV_DONTNEED; clean pages go)
/// and the file is hashed again as the device returns it. `after_write` lets tests
/// damage the copy in between.
fn copy_to_stash(src: &Path, dst: &Path, want: &str, after_write: &dyn Fn(&Path)) -> Result<()> {
    let sha = copy_hashed(src, dst)?;
    if sha != want {
        bail!(
            "the bundle read from RAM for {} hashes to {sha}, not {want} as staged; the copy is retried",
            dst.display()
        );
    }
    after_write(dst);
    {
        let f = fs::File::open(dst).with_context(|| format!("opening {}", dst.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", dst.display()))?;
        if let Err(e) = nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        ) {
            // Then the read-back may come from the cache; still worth doing.
            warn!("could not drop the page cache of {}: {e}", dst.display());
        }
    }
    let back = file_sha256(dst)?;
    if back != want {
        bail!(
            "the bundle read back from {} hashes to {back}, not {want}: the disk did not keep what was written; the copy is retried from RAM",
            dst.display()
        );
    }
    Ok(())
}

fn mount_new_root(ctx: &Ctx) -> Result<Mount> {
    Mount::ext4(&lv_path(&ctx.plan.vg, "root"), &ctx.paths.new_root())
}

fn unpack(ctx: &mut Ctx) -> Result<()> {
    mount_data_and_boot(ctx)?;
    // Made after the window: the undo record does not cover `image`.
    blockdev::mkfs_ext4(&lv_path(&ctx.plan.vg, "image"), "image")?;
    let root = lv_path(&ctx.plan.vg, "root");
    blockdev::mkfs_ext4(&root, "root")?;
    let m = mount_new_root(ctx)?;
    let st = ctx.paths.stash();
    let kr = Keyring::load(&st.join("keyring"))?;
    let b = bundle::open(&st.join("os.bundle"), Some(&kr))?;
    let manifest = b.manifest.clone();
    ctx.failpoints.check_powercut(Step::Unpack);
    let rep = bundle::unpack::unpack_open(
        b,
        &m.target,
        &UnpackOptions {
            threads: 0,
            progress: true,
            sync: true,
        },
    )?;
    info!(
        "unpacked {} {} into {}: {} entries, {} MiB in {:.1} s",
        manifest.os_id,
        manifest.version,
        root.display(),
        rep.entries,
        rep.bytes_written / MIB,
        rep.seconds
    );
    write_atomic(&st.join("manifest.toml"), manifest.to_toml().as_bytes())?;
    ctx.sample_memory();
    m.unmount()
}

fn sync_step(ctx: &mut Ctx) -> Result<()> {
    let vg = ctx.plan.vg.clone();
    let _ = lvm(ctx).run(&["vgchange", "-ay", &vg]);
    let m = mount_new_root(ctx)?;
    let st = ctx.paths.stash();
    let old = st.join("old");
    if old.exists() {
        fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    fs::create_dir_all(&old).with_context(|| format!("creating {}", old.display()))?;
    crate::fsutil::set_mode(&old, 0o700)?;
    let carry_tar = st.join("carry.tar");
    let n = bundle::unpack::extract_tar(
        fs::File::open(&carry_tar).with_context(|| format!("opening {}", carry_tar.display()))?,
        &old,
        None,
    )
    .context("extracting the carried files")?;
    info!(
        "sync: {n} carried entries available under {}",
        old.display()
    );
    let nics_path = st.join("nics.json");
    let nics: Vec<crate::sysinfo::Nic> = serde_json::from_slice(
        &fs::read(&nics_path).with_context(|| format!("reading {}", nics_path.display()))?,
    )
    .with_context(|| format!("parsing {}", nics_path.display()))?;
    let keyring = st.join("keyring");
    let failpoints = ctx.failpoints.clone();
    let notes = sync::carry_into(
        &m.target,
        &CarrySource {
            old: &old,
            scratch: &st,
            plan: &ctx.plan,
            lv: "root",
            nics: Some(&nics),
            keyring: Some(&keyring),
            pvs: &|| crate::lvm_devices::pv_rows(&lvm(ctx), Path::new("/sys")),
        },
        // Mid-step: the account files of the new root are already rewritten.
        &|| failpoints.check_powercut(Step::Sync),
    )?;
    ctx.journal.notes.extend(notes);
    if sync::carry_agent_state(&old, &ctx.paths.data(), &st)? {
        ctx.journal
            .notes
            .push("agent state carried to the data LV (dualroot-agent)".into());
    }
    m.unmount()
}

fn boot(ctx: &mut Ctx) -> Result<()> {
    mount_data_and_boot(ctx)?;
    let m = mount_new_root(ctx)?;
    // With the carried fstab and hooks in place: the slot boots an initramfs made
    // for this machine, not the build machine's.
    let (kernel, initrd) = crate::bootfiles::rebuild_initramfs(&m.target)?;
    let slot = ctx.paths.boot().join("a");
    fs::create_dir_all(&slot).with_context(|| format!("creating {}", slot.display()))?;
    crate::bootfiles::install_slot_kernel(&slot, &kernel, &initrd)?;
    crate::selinux::mark_slot(&m.target, &slot)?;
    let manifest = fs::read_to_string(ctx.paths.stash().join("manifest.toml")).unwrap_or_default();
    write_atomic(&slot.join("manifest.toml"), manifest.as_bytes())?;
    let recovery_flavor = if uefi(ctx) {
        recovery_flavor()
    } else {
        Flavor::of_tool(&recovery_grub_tool()?)
    };
    write_grub_files(ctx, recovery_flavor, &migrating_env())?;
    ctx.failpoints.check_powercut(Step::Boot);

    let res = if uefi(ctx) {
        install_new_chain(ctx, &m.target)
    } else {
        install_new_grub_bios(ctx, &m.target)
    };
    let new_flavor = match res {
        Ok(f) => f,
        Err(e) => {
            warn!("the new root's grub-install failed: {e:#}\nputting the recovery GRUB back");
            install_recovery_grub(ctx)
                .context("reinstalling the recovery GRUB after grub-install failed")?;
            nix::unistd::sync();
            return Err(e.context(
                "installing the new OS's GRUB (recovery entry restored; the next boot retries)",
            ));
        }
    };
    // The new root's GRUB reads its own directory (grub or grub2); our grub.cfg
    // goes there, the environment block stays in one place.
    write_grub_files(ctx, new_flavor, &migrating_env())?;
    m.unmount()
}

/// The new root's `grub-install` in a chroot, if it has one (Debian and EL names).
fn new_grub_install(target: &Path) -> Result<&'static str> {
    ["grub-install", "grub2-install"]
        .into_iter()
        .find(|t| {
            ["usr/sbin", "sbin", "usr/bin"]
                .iter()
                .any(|d| target.join(d).join(t).exists())
        })
        .context("the new root has no grub-install")
}

/// BIOS: the new root's GRUB into the BIOS boot partition.
fn install_new_grub_bios(ctx: &Ctx, target: &Path) -> Result<Flavor> {
    let binds = chroot_binds(target, Some(&ctx.paths.boot()))?;
    let disk = if ctx.failpoints.armed("grub-install") {
        warn!("failpoint grub-install armed: running the new root's grub-install against a missing disk");
        PathBuf::from("/dev/dualroot-failpoint-no-such-disk")
    } else {
        ctx.disk.clone()
    };
    let res = new_grub_install(target).and_then(|t| {
        cmd("chroot", [target.as_os_str()])
            .arg(t)
            .args(["--target=i386-pc"])
            .arg(&disk)
            .run()
            .map(|_| Flavor::of_tool(t))
    });
    drop(binds);
    res
}

/// UEFI: the new root's own `grub-install` puts its chain (its signed shim and
/// GRUB when it ships them) into slot a's `\EFI\dualroot-a\` on the new ESP
/// (`efi::grub_install_chain`); then the chain goes to the removable path too,
/// the recovery chain off the ESP, and a firmware entry "dualroot-a", first in
/// BootOrder, into NVRAM when the firmware lets us write it.
fn install_new_chain(ctx: &Ctx, target: &Path) -> Result<Flavor> {
    let esp = mount_esp(ctx)?;
    let efi_dir = ctx.failpoints.armed("grub-install").then(|| {
        warn!("failpoint grub-install armed: running the new root's grub-install against a missing ESP");
        "/dualroot-failpoint-no-such-esp"
    });
    let res = crate::efi::grub_install_chain(Some(target), &ctx.paths.boot(), &esp.target, "a", efi_dir)
        .and_then(|(flavor, files, loader)| {
            let dir = crate::efi::slot_dir("a");
            crate::efi::install_chain(
                &esp.target.join(&dir),
                &files,
                &loader,
                &dir,
                &esp.target,
                flavor.dir(),
            )?;
            let gone =
                crate::efi::remove_other_dirs(&esp.target, &[&dir, crate::efi::REMOVABLE_DIR])?;
            info!(
                "the new OS's boot chain is on the ESP: \\{}\\{loader} ({}), also at \\EFI\\BOOT\\BOOTX64.EFI; removed {}",
                dir.replace('/', "\\"),
                files.join(", "),
                if gone.is_empty() {
                    "nothing".to_string()
                } else {
                    gone.join(", ")
                }
            );
            match crate::efi::write_entry(
                Some(target),
                &ctx.disk,
                layout::ESP_PARTITION_NUMBER,
                &crate::efi::slot_label("a"),
                &crate::efi::slot_entry_path("a", &loader),
                true,
            ) {
                Ok(out) => {
                    remove_old_entries(ctx, target);
                    info!(
                        "firmware boot entry dualroot-a written: {}",
                        out.lines()
                            .find(|l| l.starts_with("BootOrder"))
                            .unwrap_or("")
                    )
                }
                Err(e) => warn!(
                    "no firmware boot entry was written ({e:#}); the firmware boots the new OS through \\EFI\\BOOT\\BOOTX64.EFI"
                ),
            }
            Ok(flavor)
        });
    nix::unistd::sync();
    esp.unmount()?;
    res
}

fn done(ctx: &mut Ctx) -> Result<()> {
    mount_data_and_boot(ctx)?;
    let mut v = BTreeMap::new();
    v.insert("primary".into(), "a".into());
    v.insert("a_state".into(), "trying".into());
    // A first boot that relabels SELinux and reboots gets one try more.
    let tries = crate::selinux::tries_for(&ctx.paths.boot().join("a"), ctx.plan.boot_tries);
    v.insert("a_tries".into(), "1".repeat(tries as usize));
    v.insert("b_state".into(), "empty".into());
    v.insert("migrated_unix".into(), format!("{}", now() as u64));
    // The first good boot grows data and image (`slot health-check`).
    v.insert("grow_pending".into(), "1".into());
    // Before the one write that ends the migration.
    ctx.failpoints.check_powercut(Step::Done);
    grub::write_env(&ctx.paths.boot().join(grub::ENV_FILE), &v)?;
    // Last write to /boot done: label it (an enforcing new OS must be able to
    // read and rewrite its GRUB environment).
    let m = mount_new_root(ctx)?;
    let note = crate::selinux::label_boot(&m.target, &ctx.paths.boot())?;
    info!("{note}");
    m.unmount()?;
    ctx.journal.outcome = Some("done".into());
    ctx.sample_memory();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stash is checked as the disk returns it, not as it was read from RAM.
    #[test]
    fn the_stashed_bundle_is_read_back_from_the_disk() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("os.bundle");
        fs::write(&src, vec![7u8; 3 << 20]).unwrap();
        let want = file_sha256(&src).unwrap();
        let dst = d.path().join("os.bundle.partial");
        copy_to_stash(&src, &dst, &want, &|_| {}).unwrap();
        // A copy the device garbled after the write: caught before RAM is dropped.
        let garble = |p: &Path| {
            let mut data = fs::read(p).unwrap();
            data[1 << 20] ^= 0x40;
            fs::write(p, data).unwrap();
        };
        let err = copy_to_stash(&src, &dst, &want, &garble).unwrap_err();
        assert!(format!("{err:#}").contains("read back"), "{err:#}");
        // A RAM copy that no longer matches what was staged.
        let err = copy_to_stash(&src, &dst, "00", &|_| {}).unwrap_err();
        assert!(format!("{err:#}").contains("read from RAM"), "{err:#}");
    }

    #[test]
    fn a_refusal_clears_the_one_shot_entry() {
        let d = tempfile::tempdir().unwrap();
        let env = d.path().join("boot/grub2/grubenv");
        fs::create_dir_all(env.parent().unwrap()).unwrap();
        let mut v = BTreeMap::new();
        v.insert("next_entry".to_string(), "dualroot-migrate".to_string());
        v.insert("saved_entry".to_string(), "0".to_string());
        grub::write_env(&env, &v).unwrap();
        assert!(clear_one_shot(d.path()).unwrap());
        let after = grub::read_env(&env).unwrap();
        assert!(!after.contains_key("next_entry"));
        assert_eq!(after["saved_entry"], "0");
        assert!(!clear_one_shot(d.path()).unwrap(), "nothing left to clear");
    }
}
