//! `dualroot slot install BUNDLE`: a full image into the inactive slot while the
//! appliance runs, with the migration's engine (unpack, sync, boot files).
//!
//! Order of writes, so a power cut anywhere leaves the booted slot booting and the
//! target reported "not installed" until the very last write:
//! 1. every check (booted slot, state, signature, CPU, LV bytes and inodes, VG
//!    room to grow the slot, plan) — nothing written;
//! 2. grubenv: target `empty` (GRUB never picks an empty slot);
//! 3. the target LV grown when the bundle needs it (from the slot reserve),
//!    mkfs + unpack + sync into it, synced;
//! 4. kernel, initramfs, manifest to /boot/<slot>/, grub.cfg regenerated;
//! 5. grubenv: target `installed` (a `switch` makes it primary).

use super::{room, state};
use crate::blockdev::{device_bytes, lv_path, mkfs_ext4, Lvm};
use crate::bundle::manifest::Manifest;
use crate::bundle::{self, UnpackOptions};
use crate::capacity::{
    slot_bytes_for, slot_bytes_for_inodes, slot_inode_shortfall, slot_inodes_for,
};
use crate::fsutil::write_atomic;
use crate::grub::{self, BootConfig};
use crate::keys::Keyring;
use crate::mounts::Mount;
use crate::plan::{Plan, MIB};
use crate::sync::{carry_into, CarrySource};
use crate::sysinfo;
use anyhow::{Context, Result};
pub use dualroot_api::InstallReport;
use dualroot_api::{Slot, SlotState, API_VERSION};
use fs_err as fs;
use log::info;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The migration's plan, kept on the data LV: its carry list and account policy
/// apply to every later install.
pub const DEFAULT_PLAN: &str = "/data/dualroot/migration/plan.toml";
pub const DEFAULT_KEYRING: &str = "/etc/dualroot/keyring";

#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub bundle: PathBuf,
    pub keyring: PathBuf,
    pub plan: PathBuf,
    pub boot: PathBuf,
    /// The running system's root: where accounts, identity and the carry list come from.
    pub source_root: PathBuf,
    /// Install a version older than the running slot's.
    pub allow_downgrade: bool,
    /// Install while the booted slot is unconfirmed (labs).
    pub force: bool,
}

pub fn install(o: &InstallOptions) -> Result<InstallReport> {
    let t0 = Instant::now();
    // 1. Checks; nothing is written before they all pass.
    let booted = super::running_slot()?;
    let target = state::other(booted);
    let lv = state::lv_of(target);
    let env_path = o.boot.join(grub::ENV_FILE);
    let env = grub::read_env(&env_path)?;
    let begin = state::install_begin(&env, booted, target, o.force)?;
    let bc = BootConfig::load(&o.boot)?;
    let plan = Plan::load(&o.plan).with_context(|| {
        "the plan gives the carry list and account policy for the new slot (--plan; default: the migration's plan on the data LV); nothing was changed".to_string()
    })?;
    let refuse = |what: String| -> anyhow::Error {
        anyhow::anyhow!(
            "{what}; nothing was changed, slot {booted} keeps running and stays primary"
        )
    };
    let kr = Keyring::load(&o.keyring).map_err(|e| refuse(format!("{e:#}")))?;
    let mut b = bundle::open(&o.bundle, Some(&kr)).map_err(|e| refuse(format!("{e:#}")))?;
    let m = b.manifest.clone();
    let model = crate::compat::appliance_model(&o.source_root, plan.model.as_deref());
    crate::compat::check_model(&m.model, model.as_deref()).map_err(|e| refuse(format!("{e:#}")))?;
    let running_version = std::fs::read_to_string(o.boot.join(booted).join("manifest.toml"))
        .ok()
        .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
        .and_then(|t| {
            t.get("version")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        });
    crate::compat::check_not_older(&m.version, running_version.as_deref(), o.allow_downgrade)
        .map_err(|e| refuse(format!("{e:#}")))?;
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let missing = sysinfo::missing_cpu_flags(&sysinfo::cpu_flags(&cpuinfo), m.requires_cpu);
    if !missing.is_empty() {
        return Err(refuse(format!(
            "bundle {} {} needs CPU level {}; this CPU lacks {}",
            m.os_id,
            m.version,
            m.requires_cpu.name(),
            missing.join(", ")
        )));
    }
    let dev = lv_path(&bc.vg, lv);
    let lv_bytes = device_bytes(&dev).map_err(|e| refuse(format!("slot {target}'s LV: {e:#}")))?;
    // A bigger OS than the slot holds: the slot grows from the VG's free space
    // (the slot reserve, `room`), or the install is refused with the sizes.
    let need = slot_bytes_for_inodes(
        slot_bytes_for(m.payload.uncompressed_size),
        m.payload.entries,
    );
    let growth = room::slot_growth(lv_bytes, need);
    let lvm = Lvm::default();
    if growth > 0 {
        let r = room::vg_room(&lvm, &bc.vg).map_err(|e| {
            refuse(format!(
                "slot {target}'s LV {} is {} MiB, the bundle needs {} MiB, and the free space of VG {} is unknown: {e:#}",
                dev.display(),
                lv_bytes / MIB,
                need.div_ceil(MIB),
                bc.vg
            ))
        })?;
        if r.free < growth {
            return Err(refuse(room::slot_growth_refusal(
                target, &dev, lv_bytes, need, growth, &bc.vg, &r,
            )));
        }
    }
    if let Some(why) = slot_room(target, &dev, lv_bytes + growth, &m) {
        return Err(refuse(why));
    }
    let names = [
        dev.display().to_string(),
        format!("/dev/mapper/{}-{lv}", bc.vg),
    ];
    let mnt = PathBuf::from(format!("/run/dualroot/slot-{target}"));
    if let Some(at) = crate::mounts::mount_point_of(&names) {
        if at != mnt {
            return Err(refuse(format!(
                "slot {target}'s LV {} is mounted on {}; unmount it first",
                dev.display(),
                at.display()
            )));
        }
        // Left mounted by an install killed earlier in this boot.
        Mount::adopt(&mnt).unmount()?;
    }
    info!(
        "slot install: {} {} (signed by {}) into slot {target} (LV {}), running slot {booted} untouched",
        m.os_id,
        m.version,
        m.key_id,
        dev.display()
    );

    // The whole payload against the signed manifest before the target is touched.
    // (the same handle is unpacked: no gap between the check and the read)
    b.verify_payload(None)
        .map_err(|e| refuse(format!("bundle {}: {e:#}", o.bundle.display())))?;

    // 2. The target holds no complete OS from here until step 5.
    grub::write_env(&env_path, &begin)?;
    let slot_dir = o.boot.join(target);
    let _ = fs::remove_file(slot_dir.join("manifest.toml"));
    let fail = |e: anyhow::Error| -> anyhow::Error {
        e.context(format!(
            "installing into slot {target} failed; slot {target} is left empty (not bootable), slot {booted} keeps running and stays primary; run `dualroot slot install` again"
        ))
    };

    // 3. Root filesystem, on a slot grown first when the bundle needs it.
    if growth > 0 {
        lvm.run(&[
            "lvextend",
            "-L",
            &format!("+{growth}b"),
            &format!("{}/{lv}", bc.vg),
        ])
        .map_err(fail)?;
        info!(
            "slot install: grew slot {target}'s LV {} from {} to {} MiB out of VG {}'s free space (the slot reserve) for {} MiB unpacked",
            dev.display(),
            lv_bytes / MIB,
            (lv_bytes + growth) / MIB,
            bc.vg,
            m.payload.uncompressed_size / MIB
        );
    }
    mkfs_ext4(&dev, lv).map_err(fail)?;
    let mount = Mount::ext4_untrusted(&dev, &mnt).map_err(fail)?;
    let new = mount.target.clone();
    // What mkfs made, in case this system's mke2fs.conf is not the stock one.
    let inodes_free = nix::sys::statvfs::statvfs(&new)?.files_free() as u64;
    let need_inodes = slot_inodes_for(m.payload.entries);
    if inodes_free < need_inodes {
        return Err(fail(anyhow::anyhow!(
            "mkfs.ext4 gave slot {target}'s LV {} {inodes_free} free inodes; bundle {} {} has {} entries and needs {need_inodes}",
            dev.display(),
            m.os_id,
            m.version,
            m.payload.entries
        )));
    }
    let rep = bundle::unpack::unpack_open(
        b,
        &new,
        &UnpackOptions {
            threads: 0,
            progress: true,
            sync: true,
        },
    )
    .map_err(fail)?;
    info!(
        "slot install: unpacked {} entries, {} MiB in {:.1} s",
        rep.entries,
        rep.bytes_written / MIB,
        rep.seconds
    );
    sync_from_running(&o.source_root, &new, &plan, lv).map_err(fail)?;

    // 4. Boot files, then the manifest that names what the slot holds.
    let (kernel, initrd) = crate::bootfiles::rebuild_initramfs(&new).map_err(fail)?;
    let need_boot = fs::metadata(&kernel)?.len() + fs::metadata(&initrd)?.len();
    fs::create_dir_all(&slot_dir)?;
    let old_files: u64 = ["vmlinuz", "initrd.img"]
        .iter()
        .filter_map(|f| fs::metadata(slot_dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    let st = nix::sys::statvfs::statvfs(&o.boot)?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64 + old_files;
    if free < need_boot + 4 * MIB {
        return Err(fail(anyhow::anyhow!(
            "{} has {} MiB free for slot {target}'s kernel and initramfs, which need {} MiB",
            o.boot.display(),
            free / MIB,
            need_boot / MIB
        )));
    }
    crate::bootfiles::install_slot_kernel(&slot_dir, &kernel, &initrd).map_err(fail)?;
    crate::selinux::mark_slot(&new, &slot_dir).map_err(fail)?;
    if super::chain::uefi(&o.boot) {
        let note = super::chain::install(&new, &o.boot, target, booted).map_err(fail)?;
        info!("slot install: {note}");
    }
    write_atomic(&slot_dir.join("manifest.toml"), m.to_toml().as_bytes())?;
    write_atomic(
        &bc.flavor.cfg_path(&o.boot),
        grub::render_cfg(&bc).as_bytes(),
    )?;
    mount.unmount().map_err(fail)?;
    nix::unistd::sync();

    // 5. Complete.
    let env = grub::read_env(&env_path)?;
    grub::write_env(&env_path, &state::install_done(&env, target))?;
    info!(
        "slot install: slot {target} holds {} {}; `dualroot slot switch` boots it next",
        m.os_id, m.version
    );
    Ok(InstallReport {
        api_version: API_VERSION,
        slot: Slot::parse(target).unwrap_or(Slot::A),
        lv: lv.into(),
        state: SlotState::Installed,
        os_id: m.os_id.clone(),
        version: m.version.clone(),
        entries: rep.entries,
        unpack_seconds: rep.seconds,
        seconds: t0.elapsed().as_secs_f64(),
        next: format!(
            "run `dualroot slot switch` to boot slot {target} next (slot {booted} stays the fallback)"
        ),
    })
}

/// Why slot `target`'s LV (`dev`, `lv_bytes`) cannot hold bundle `m`: its bytes
/// with filesystem overhead, or its entries in the inodes mkfs.ext4 makes there
/// (the migration's room rules, `capacity`). `None` when it can.
fn slot_room(target: &str, dev: &Path, lv_bytes: u64, m: &Manifest) -> Option<String> {
    let need = slot_bytes_for(m.payload.uncompressed_size);
    if lv_bytes < need {
        return Some(format!(
            "slot {target}'s LV {} is {} MiB; bundle {} {} unpacks to {} MiB and needs {} MiB with filesystem overhead and room for the initramfs rebuild",
            dev.display(),
            lv_bytes / MIB,
            m.os_id,
            m.version,
            m.payload.uncompressed_size / MIB,
            need / MIB
        ));
    }
    let short = slot_inode_shortfall(lv_bytes, m.payload.entries)?;
    Some(format!(
        "slot {target}'s LV {} is {} MiB, whose ext4 gets {} inodes; bundle {} {} has {} entries and needs {} inodes (entries + 10% + 2000 for what sync and the initramfs rebuild add), which an LV of {} MiB would have",
        dev.display(),
        lv_bytes / MIB,
        short.inodes,
        m.os_id,
        m.version,
        short.entries,
        short.need,
        short.enough_at.div_ceil(MIB)
    ))
}

/// The scratch directory of the sync inside the new root, resolved in it (a
/// bundle whose `var/lib/dualroot` links to `/tmp` must not put the running
/// system's host keys into the running system's /tmp), empty and 0700: the
/// pristine account files land in it.
fn scratch_dir(new: &Path) -> Result<std::path::PathBuf> {
    let scratch = crate::fsutil::in_root(new, Path::new("var/lib/dualroot/install-scratch"))?;
    if fs::symlink_metadata(&scratch).is_ok() {
        fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    crate::fsutil::set_mode(&scratch, 0o700)?;
    Ok(scratch)
}

/// The migration's sync, with the running system as the old side.
fn sync_from_running(old: &Path, new: &Path, plan: &Plan, lv: &str) -> Result<()> {
    let scratch = scratch_dir(new)?;
    carry_into(
        new,
        &CarrySource {
            old,
            scratch: &scratch,
            plan,
            lv,
            nics: None,
            keyring: None,
            pvs: &|| {
                crate::lvm_devices::pv_rows(&crate::blockdev::Lvm::default(), Path::new("/sys"))
            },
        },
        &|| {},
    )?;
    fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 23 item 5: a bundle whose var/lib/dualroot is a link out of the
    /// new root keeps the scratch copy (shadow, host keys) inside the new root.
    #[test]
    fn the_sync_scratch_stays_inside_the_new_root() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let new = d.path().join("new");
        let outside = d.path().join("outside");
        fs::create_dir_all(new.join("var/lib")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, new.join("var/lib/dualroot")).unwrap();
        let s = scratch_dir(&new).unwrap();
        assert!(s.starts_with(&new), "{}", s.display());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert_eq!(
            fs::metadata(&s).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn lv_room_includes_overhead() {
        assert_eq!(
            slot_bytes_for(600 * MIB),
            600 * MIB + 60 * MIB + 64 * MIB + 384 * MIB
        );
    }

    fn manifest(uncompressed_size: u64, entries: u64) -> Manifest {
        Manifest {
            format: 1,
            os_id: "rocky".into(),
            version: "9.4".into(),
            model: "any".into(),
            requires_cpu: crate::bundle::manifest::CpuLevel::V2,
            created_unix: 1,
            key_id: "00112233".into(),
            payload: crate::bundle::manifest::Payload {
                name: crate::bundle::manifest::PAYLOAD_NAME.into(),
                compression: "xz".into(),
                sha256: "a".repeat(64),
                compressed_size: 10,
                uncompressed_size,
                entries,
            },
        }
    }

    #[test]
    fn many_small_files_are_refused_though_the_bytes_fit() {
        let dev = Path::new("/dev/VA/back");
        assert_eq!(
            slot_room("b", dev, 1280 * MIB, &manifest(700 * MIB, 30_000)),
            None
        );
        assert_eq!(
            slot_room("b", dev, 1280 * MIB, &manifest(700 * MIB, 200_000)).as_deref(),
            Some("slot b's LV /dev/VA/back is 1280 MiB, whose ext4 gets 81920 inodes; bundle rocky 9.4 has 200000 entries and needs 222000 inodes (entries + 10% + 2000 for what sync and the initramfs rebuild add), which an LV of 3468 MiB would have")
        );
        let e = slot_room("b", dev, 1024 * MIB, &manifest(700 * MIB, 10)).unwrap();
        assert!(e.contains("unpacks to 700 MiB and needs 1218 MiB"), "{e}");
    }
}
