//! Entry points of `dualroot migrate`: the first boot (`rd.dualroot.migrate`) and a
//! resume (`rd.dualroot.resume`).

use super::journal::Journal;
use super::stage::carry_kernel_args;
use super::{drive, Ctx, Failpoints, Paths, EXIT_DONE, EXIT_GAVE_UP, EXIT_REFUSED};
use crate::cmd::{cmd, CommandExt};
use crate::mounts::Mount;
use crate::plan::Plan;
use anyhow::{Context, Result};
use fs_err as fs;
use log::{error, info, warn};
use std::path::{Path, PathBuf};

/// The new `/boot` (made with label `boot` by the partition step).
const BOOT_BY_LABEL: &str = "/dev/disk/by-label/boot";

pub fn cmdline() -> String {
    fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

/// `root=` spellings → a device path (udev's /dev/disk/by-* links).
pub use crate::mounts::device_of_spec as resolve_root;

fn ctx_base(plan: Plan, disk: PathBuf, journal: Journal) -> Ctx {
    let paths = Paths::from_env();
    let memory = Some(super::memory::Sampler::start(
        paths.ram(),
        journal.peak_memory.clone(),
    ));
    Ctx {
        plan,
        paths,
        disk,
        journal,
        failpoints: Failpoints::from_env_and_cmdline(&cmdline()),
        old_mount: None,
        old_boot_mount: None,
        old_extra_mounts: Vec::new(),
        old_root_dev: None,
        ram_mount: None,
        undo: None,
        data_mount: None,
        boot_mount: None,
        proc: "/proc".into(),
        sys: "/sys".into(),
        log_on_data: false,
        memory,
    }
}

/// Kernel arguments of the new slots: the plan's `kernel_args` when it sets them,
/// else the old system's own minus what names its root, initrd or a migration.
pub fn slot_kernel_args(plan: &Plan, cmdline: &str) -> String {
    match &plan.kernel_args {
        Some(a) => a.split_whitespace().collect::<Vec<_>>().join(" "),
        None => carry_kernel_args(cmdline),
    }
}

/// First boot: mount the old root, load the plan from it, run from preflight.
pub fn first(plan_rel: &Path, root_device: Option<&Path>) -> u8 {
    match first_inner(plan_rel, root_device) {
        Ok(code) => code,
        Err(e) => {
            warn!("migration could not start: {e:#}\nNothing was changed; rebooting into the old system.");
            EXIT_REFUSED
        }
    }
}

/// The old root's device: `--root-device`, else `root=` of the kernel command line.
fn old_root_device(root_device: Option<&Path>, cl: &str) -> Result<PathBuf> {
    Ok(match root_device {
        Some(d) => d.to_path_buf(),
        None => resolve_root(
            cl.split_whitespace()
                .find_map(|w| w.strip_prefix("root="))
                .context("no root= on the kernel command line")?,
        ),
    })
}

/// `dualroot migrate --disarm`, the first thing the dracut hook runs on the
/// migration boot: takes back the one-shot entry in the old grubenv. GRUB clears
/// `next_entry` itself only where it can write its environment (not on XFS or
/// LVM); there, a migration that cannot even start (or a dualroot that crashes)
/// would boot the migration entry again at every boot. Done in its own process
/// so nothing the migration run does can skip it. Returns 0, or 1 when it could
/// not (said on the console).
pub fn disarm(root_device: Option<&Path>) -> u8 {
    match disarm_inner(root_device) {
        Ok(true) => {
            info!("the one-shot migration entry is cleared in the old grubenv: whatever happens now, the next boot is the old system unless the migration passes its point of no return");
            0
        }
        Ok(false) => 0,
        Err(e) => {
            warn!("could not clear the one-shot migration entry in the old grubenv: {e:#}\nThe migration goes on; a refusal clears it later.");
            1
        }
    }
}

fn disarm_inner(root_device: Option<&Path>) -> Result<bool> {
    let dev = old_root_device(root_device, &cmdline())?;
    let paths = Paths::from_env();
    let (root, boot) = mount_old(&paths, &dev)?;
    let holder = boot.as_ref().unwrap_or(&root);
    holder.remount_rw()?;
    let cleared = super::steps::clear_one_shot(&paths.old());
    nix::unistd::sync();
    if let Some(b) = boot {
        b.unmount().context("unmounting the old /boot")?;
    }
    root.unmount().context("unmounting the old root")?;
    cleared
}

fn first_inner(plan_rel: &Path, root_device: Option<&Path>) -> Result<u8> {
    let cl = cmdline();
    let dev = old_root_device(root_device, &cl)?;
    let paths = Paths::from_env();
    crate::logging::set_file(Some(&paths.run.join("migration.log")));
    let (old_mount, old_boot_mount) = mount_old(&paths, &dev)?;
    let old = paths.old();
    // On UEFI: the firmware's boot entry (efivarfs) and the old ESP, read-only,
    // where the layout probe and the staging of the old boot chain look for it.
    crate::efi::ensure_efivarfs(Path::new("/sys"));
    let old_esp_mount = mount_old_esp(&paths)?;
    let plan_path = old.join(plan_rel.strip_prefix("/").unwrap_or(plan_rel));
    let plan = Plan::load(&plan_path)?;
    let old_s = old.display().to_string();
    let source = crate::source_layout::probe(
        Path::new("/sys"),
        Path::new("/proc"),
        &old_s,
        &format!("{old_s}/boot"),
    )?;
    let disk = if plan.disk == "auto" {
        PathBuf::from(&source.disk)
    } else {
        PathBuf::from(&plan.disk)
    };
    // The old VG's other LVs (`/home`): dracut activated only the root's and
    // swap's (rd.lvm.lv=), so activate the VG, then mount what the plan carries
    // from, read-only, where the carry paths look for it.
    if let Some(vg) = source.old_vg() {
        if let Err(e) = crate::blockdev::Lvm::default().run(&["vgchange", "-ay", vg]) {
            warn!("activating the old volume group {vg}: {e:#}");
        }
        let _ = cmd("udevadm", ["settle", "--timeout=10"]).run();
    }
    let extra = crate::old_fs::on_disk(
        &old,
        Path::new("/sys"),
        &disk.display().to_string(),
        &plan,
        &old,
    )
    .unwrap_or_else(|e| {
        // Preflight runs the same lookup and refuses with the reason.
        warn!("{e:#}");
        Vec::new()
    });
    let carried: Vec<crate::old_fs::OldFs> = extra
        .into_iter()
        .filter(|f| matches!(f.decision, Some(crate::old_fs::Decision::Carried(_))))
        .collect();
    let mut old_extra_mounts = crate::old_fs::mount_all(&old, &carried)?;
    old_extra_mounts.extend(old_esp_mount);
    for f in &carried {
        info!("mounted the old {} read-only for staging", f.describe());
    }
    info!(
        "migrating {} (old system: {}) with plan {}",
        disk.display(),
        source.describe(),
        plan_rel.display()
    );
    let mut journal = Journal::new(
        &disk.display().to_string(),
        &plan.vg,
        &slot_kernel_args(&plan, &cl),
    );
    journal.source = Some(source);
    let mut ctx = ctx_base(plan, disk, journal);
    ctx.old_mount = Some(old_mount);
    ctx.old_boot_mount = old_boot_mount;
    ctx.old_extra_mounts = old_extra_mounts;
    ctx.old_root_dev = Some(dev);
    Ok(finish(&mut ctx))
}

/// The spec (`UUID=...`, `/dev/...`) fstab mounts at `mountpoint`.
pub fn fstab_spec(fstab: &str, mountpoint: &str) -> Option<String> {
    crate::old_fs::parse_fstab(fstab)
        .into_iter()
        .find(|e| e.mountpoint == mountpoint)
        .map(|e| e.spec)
}

/// Mounts the old root read-only under `paths.old()`, and its `/boot` when the
/// old fstab puts it on its own filesystem (the recovery kernel and the
/// migration initramfs live there). ext4 or XFS: mount(8) detects the type.
pub fn mount_old(paths: &Paths, dev: &Path) -> Result<(Mount, Option<Mount>)> {
    let old = paths.old();
    fs::create_dir_all(&old).with_context(|| format!("creating {}", old.display()))?;
    cmd(
        "mount",
        [
            std::ffi::OsStr::new("-o"),
            "ro".as_ref(),
            dev.as_os_str(),
            old.as_os_str(),
        ],
    )
    .run()
    .with_context(|| format!("mounting the old root {}", dev.display()))?;
    let root = Mount::adopt(&old);
    let fstab = fs::read_to_string(old.join("etc/fstab")).unwrap_or_default();
    let Some(spec) = fstab_spec(&fstab, "/boot") else {
        return Ok((root, None));
    };
    let boot_dev = resolve_root(&spec);
    let _ = cmd("udevadm", ["settle", "--timeout=10"]).run();
    let target = old.join("boot");
    cmd(
        "mount",
        [
            std::ffi::OsStr::new("-o"),
            "ro".as_ref(),
            boot_dev.as_os_str(),
            target.as_os_str(),
        ],
    )
    .run()
    .with_context(|| {
        format!(
            "mounting the old /boot {} ({spec} in the old fstab)",
            boot_dev.display()
        )
    })?;
    Ok((root, Some(Mount::adopt(&target))))
}

/// The old ESP (`/boot/efi` or `/efi` in the old fstab), mounted read-only
/// under the old root on a machine that booted with UEFI; `None` on BIOS or
/// when the old fstab names none (the layout probe then says so).
fn mount_old_esp(paths: &Paths) -> Result<Option<Mount>> {
    if !crate::efi::booted_uefi(Path::new("/sys")) {
        return Ok(None);
    }
    let old = paths.old();
    let fstab = fs::read_to_string(old.join("etc/fstab")).unwrap_or_default();
    let Some((at, spec)) = ["/boot/efi", "/efi"]
        .iter()
        .find_map(|m| fstab_spec(&fstab, m).map(|s| (*m, s)))
    else {
        return Ok(None);
    };
    let dev = resolve_root(&spec);
    let target = old.join(at.trim_start_matches('/'));
    cmd(
        "mount",
        [
            std::ffi::OsStr::new("-t"),
            "vfat".as_ref(),
            "-o".as_ref(),
            "ro".as_ref(),
            dev.as_os_str(),
            target.as_os_str(),
        ],
    )
    .run()
    .with_context(|| {
        format!(
            "mounting the old ESP {} ({spec} at {at} in the old fstab)",
            dev.display()
        )
    })?;
    info!("mounted the old ESP {} read-only", dev.display());
    Ok(Some(Mount::adopt(&target)))
}

/// Resume after a power cut or a failed step: everything comes from the stash.
/// A resume that cannot even start (no journal, no plan, no `/boot`) would fail
/// the same way at every boot: it powers off with the reason, never reboots.
pub fn resume(vg: Option<&str>) -> u8 {
    match resume_inner(vg) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("cannot resume the migration: {e:#}");
            error!("{msg}\nThe recovery boot would fail the same way every time, so the machine powers off. Re-image this machine or boot it from rescue media; the journal is on /boot/dualroot/journal.json.");
            record_on_boot(&msg);
            EXIT_GAVE_UP
        }
    }
}

/// Writes a gave-up outcome into `/boot/dualroot/journal.json` (the journal that
/// is there, or a new one naming the failure), best effort.
fn record_on_boot(msg: &str) {
    let paths = Paths::from_env();
    let mounted = if paths.boot().join("dualroot").is_dir() {
        None
    } else {
        match Mount::ext4(Path::new(BOOT_BY_LABEL), &paths.boot()) {
            Ok(m) => Some(m),
            Err(e) => {
                warn!("cannot mount /boot (label boot) to record the failure: {e:#}");
                return;
            }
        }
    };
    let p = paths.boot().join("dualroot/journal.json");
    let mut j = Journal::load(&p).unwrap_or_else(|_| Journal::new("", "", ""));
    j.outcome = Some(format!("gave up: {msg}"));
    let res = fs::create_dir_all(paths.boot().join("dualroot"))
        .map_err(anyhow::Error::from)
        .and_then(|_| j.save(&[p.as_path()]));
    if let Err(e) = res {
        warn!("cannot write {}: {e:#}", p.display());
    }
    nix::unistd::sync();
    if let Some(m) = mounted {
        let _ = m.unmount();
    }
}

fn resume_inner(vg: Option<&str>) -> Result<u8> {
    let cl = cmdline();
    // rd.dualroot.vg= on today's recovery entry; rd.lvm.vg= on one written
    // before the entry stopped waiting for the VG.
    let vg = vg
        .map(str::to_string)
        .or_else(|| {
            cl.split_whitespace().find_map(|w| {
                w.strip_prefix("rd.dualroot.vg=")
                    .or_else(|| w.strip_prefix("rd.lvm.vg="))
                    .map(str::to_string)
            })
        })
        .unwrap_or_else(|| "VA".into());
    let _ = crate::blockdev::Lvm::default().run(&["vgchange", "-ay", &vg]);
    let _ = cmd("udevadm", ["settle", "--timeout=10"]).run();
    let paths = Paths::from_env();
    let data = Mount::ext4(&crate::blockdev::lv_path(&vg, "data"), &paths.data());
    let stash = paths.stash();
    let on_data = data.as_ref().ok().and_then(|_| {
        let j = Journal::load(&stash.join("journal.json")).ok()?;
        let p = Plan::load(&stash.join("plan.toml")).ok()?;
        Some((j, p))
    });
    let (data, boot, journal, plan) = match (data, on_data) {
        (Ok(data), Some((journal, plan))) => {
            crate::logging::set_file(Some(&stash.join(super::LOG_FILE)));
            (Some(data), None, journal, plan)
        }
        // The power was cut before `data` held the journal: it and the plan are
        // on /boot, next to the recovery entry that booted this.
        (data, _) => {
            info!("no journal on the data LV; reading the one on /boot");
            drop(data);
            let boot = Mount::ext4(Path::new(BOOT_BY_LABEL), &paths.boot())
                .context("mounting /boot (label boot) to read the journal")?;
            let journal = Journal::load(&paths.boot().join("dualroot/journal.json"))?;
            let plan = Plan::load(&paths.boot().join(super::steps::BOOT_PLAN))?;
            (None, Some(boot), journal, plan)
        }
    };
    let disk = PathBuf::from(&journal.disk);
    info!(
        "resuming the migration of {} at step {}",
        disk.display(),
        journal
            .next_step()
            .map(|s| s.name())
            .unwrap_or("(none: done)")
    );
    let mut ctx = ctx_base(plan, disk, journal);
    ctx.log_on_data = data.is_some();
    ctx.data_mount = data;
    ctx.boot_mount = boot;
    Ok(finish(&mut ctx))
}

fn finish(ctx: &mut Ctx) -> u8 {
    let code = drive(ctx);
    // The log file on `data` would keep it busy: close it before unmounting.
    crate::logging::set_file(None);
    while let Some(m) = ctx.old_extra_mounts.pop() {
        let t = m.target.clone();
        if let Err(e) = m.unmount() {
            warn!("unmounting {}: {e:#}", t.display());
        }
    }
    for m in [
        ctx.boot_mount.take(),
        ctx.data_mount.take(),
        ctx.ram_mount.take(),
        ctx.old_boot_mount.take(),
        ctx.old_mount.take(),
    ]
    .into_iter()
    .flatten()
    {
        let t = m.target.clone();
        if let Err(e) = m.unmount() {
            warn!("unmounting {}: {e:#}", t.display());
        }
    }
    nix::unistd::sync();
    if code == EXIT_DONE {
        info!("rebooting into the new system");
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_boot_is_found_in_the_old_fstab() {
        let centos = "#\n# /etc/fstab\n/dev/mapper/centos-root /                       xfs     defaults        0 0\nUUID=6b1c-77 /boot                   xfs     defaults        0 0\n/dev/mapper/centos-swap swap                    swap    defaults        0 0\n";
        assert_eq!(fstab_spec(centos, "/boot").as_deref(), Some("UUID=6b1c-77"));
        assert_eq!(
            resolve_root(&fstab_spec(centos, "/boot").unwrap()),
            Path::new("/dev/disk/by-uuid/6b1c-77")
        );
        assert_eq!(
            fstab_spec("UUID=x / ext4 defaults 0 1\n# UUID=y /boot ext4\n", "/boot"),
            None
        );
    }

    #[test]
    fn plan_kernel_args_win_over_the_old_command_line() {
        let cl =
            "BOOT_IMAGE=/vmlinuz root=UUID=x ro console=ttyS0 net.ifnames=0 rd.dualroot.migrate=/p";
        let mut plan = Plan::parse("[bundle]\npath = \"/b\"\nkeyring = \"/k\"\n").unwrap();
        assert_eq!(slot_kernel_args(&plan, cl), "console=ttyS0 net.ifnames=0");
        plan.kernel_args = Some(" console=ttyS1,115200   quiet ".into());
        assert_eq!(slot_kernel_args(&plan, cl), "console=ttyS1,115200 quiet");
    }
}
