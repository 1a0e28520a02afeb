//! Ten years on one disk (issue 25), in QEMU. One migration with every size
//! left to dualroot (`fixtures/plans/lifecycle.toml`: root/back `auto`, so they
//! hold the first payload and little more; the `auto` slot reserve) makes the
//! base disk; each scenario boots a qcow2 overlay of it:
//! (a) `slot install` of a payload 1.5x the first grows slot b out of the
//!     reserve, and slot b boots it;
//! (b) a payload that does not fit even with the reserve is refused with the
//!     sizes, and nothing changed (LVs, grubenv, /boot/b);
//! (c) the disk grown by 2 GiB between two boots: the next boot grows the
//!     partition and the PV, and data/image get the new space (the reserve is
//!     full already).
//!
//! `qemu-tests/run-scenarios.sh lifecycle`

mod common;

use common::*;
use qemu_tests::disk::overlay_on;
use qemu_tests::images;
use qemu_tests::qemu::{Vm, VmConfig};
use qemu_tests::scenario::{self, Scenario};
use qemu_tests::{Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const DUALROOT: &str = "/usr/local/sbin/dualroot";
const GROW: &str = "/mnt/payload/upgrade/grow.bundle";
const HUGE: &str = "/mnt/payload/upgrade/huge.bundle";

#[derive(Clone)]
struct Base {
    disk: PathBuf,
    payload: PathBuf,
    /// The VG after the first good boot.
    room: Room,
}

/// LV sizes in MiB, VG free, the reserve tag, PV size.
#[derive(Debug, Clone, PartialEq)]
struct Room {
    lvs: BTreeMap<String, f64>,
    free: f64,
    reserve: f64,
    pv: f64,
}

fn room(vm: &Vm) -> Result<Room> {
    let lvs = vm.ssh_ok("lvs --noheadings --units m --nosuffix -o lv_name,lv_size VA")?;
    let lvs = lvs
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect();
    let vg = vm.ssh_ok("vgs --noheadings --units m --nosuffix -o vg_free,vg_tags VA")?;
    let mut w = vg.split_whitespace();
    let free = w.next().and_then(|v| v.parse().ok()).unwrap_or(-1.0);
    let reserve = w
        .next()
        .unwrap_or("")
        .split(',')
        .find_map(|t| t.strip_prefix("dualroot_reserve_mib_"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1.0);
    let pv = vm
        .ssh_ok("pvs --noheadings --units m --nosuffix -o pv_size --select vg_name=VA")?
        .trim()
        .parse()
        .unwrap_or(-1.0);
    Ok(Room {
        lvs,
        free,
        reserve,
        pv,
    })
}

fn lv(r: &Room, name: &str) -> f64 {
    r.lvs.get(name).copied().unwrap_or(0.0)
}

/// Waits until `f` holds (the health check runs after multi-user).
fn wait_for<T: std::fmt::Debug>(
    what: &str,
    mut get: impl FnMut() -> Result<T>,
    f: impl Fn(&T) -> bool,
) -> Result<T> {
    let t0 = Instant::now();
    loop {
        let v = get()?;
        if f(&v) {
            return Ok(v);
        }
        if t0.elapsed() > Duration::from_secs(300) {
            qemu_tests::bail!("{what}: not reached within 300 s; last: {v:?}");
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn base() -> Result<Base> {
    static BASE: std::sync::Mutex<Option<Base>> = std::sync::Mutex::new(None);
    if let Some(b) = BASE.lock().unwrap_or_else(|e| e.into_inner()).clone() {
        return Ok(b);
    }
    let mut out = None;
    scenario::run("lifecycle-base-auto-sizes", |sc| {
        let grow = images::bundle_grow()?;
        let huge = images::bundle_huge()?;
        let plan = images::workspace_dir().join("fixtures/plans/lifecycle.toml");
        let cfg = appliance_with_plan(
            sc,
            &plan,
            1024,
            &[
                (grow.path.clone(), "upgrade/grow.bundle"),
                (huge.path.clone(), "upgrade/huge.bundle"),
            ],
        )?;
        let payload = cfg.disks[1].path.clone();
        let mut vm = sc.vm("appliance", cfg)?;
        boot_old(sc, &mut vm)?;
        migrate_now(&mut vm)?;
        boot_new(sc, &mut vm)?;
        wait_for(
            "slot a confirmed and data/image grown",
            || vm.ssh_ok("cat /boot/grub/grubenv | tr -d '#'"),
            |env| env.contains("a_state=good") && !env.contains("grow_pending"),
        )?;
        let r = room(&vm)?;
        println!("[{}] after the first good boot: {r:?}", sc.name);
        sc.check(
            "the VG keeps the auto slot reserve free; data and image got the rest",
            r.reserve >= 512.0 && (r.free - r.reserve).abs() < 8.0 && lv(&r, "data") > 300.0,
            &format!("{r:?}"),
        )?;
        let health = vm.ssh_ok(
            "journalctl -b -u dualroot-confirm.service --no-pager -o cat | grep -i 'reserve' || true",
        )?;
        println!("[{}] health check: {}", sc.name, health.trim());
        vm.shutdown(Duration::from_secs(120))?;
        out = Some(Base {
            disk: sc.path("disk.qcow2"),
            payload,
            room: r,
        });
        Ok(())
    });
    let b = out.context("the lifecycle base scenario recorded no disk")?;
    *BASE.lock().unwrap_or_else(|e| e.into_inner()) = Some(b.clone());
    Ok(b)
}

/// A VM on an overlay of the base; `grow_gib` enlarges the overlay first (as
/// a hypervisor grows a virtual disk while the VM is off).
fn vm_on_base(sc: &Scenario, base: &Base, grow_gib: u32) -> Result<(Vm, String)> {
    let (disk, fmt) = overlay_on(&base.disk, "qcow2", &sc.path("disk.qcow2"))?;
    if grow_gib > 0 {
        qemu_tests::cmd::run(
            Command::new("qemu-img")
                .args(["resize", "-q"])
                .arg(&disk)
                .arg(format!("+{grow_gib}G")),
        )
        .context("growing the overlay")?;
    }
    let cfg = VmConfig::default()
        .disk(&disk, fmt)
        .disk(&base.payload, "raw");
    let mut vm = sc.vm("appliance", cfg)?;
    let v = boot_new(sc, &mut vm)?;
    mount_payload(&vm)?;
    Ok((vm, v))
}

#[test]
#[ignore = "boots VMs (about 40 minutes under TCG)"]
fn lifecycle() {
    let base = base().unwrap_or_else(|e| panic!("base: {e}"));
    lifecycle_bigger_os_grows_the_slot(&base);
    lifecycle_too_big_even_with_the_reserve_is_refused(&base);
    lifecycle_disk_grown_between_boots(&base);
}

fn lifecycle_bigger_os_grows_the_slot(base: &Base) {
    scenario::run("lifecycle-bigger-os-grows-the-slot", |sc| {
        let (mut vm, v1) = vm_on_base(sc, base, 0)?;
        let before = room(&vm)?;
        let out = vm.ssh(&format!("{DUALROOT} slot install {GROW} --json"))?;
        let log = out.stderr.clone();
        println!("[{}] slot install log:\n{log}", sc.name);
        let r: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
        sc.check(
            "slot install of the 1.5x bundle succeeded into slot b",
            out.success() && r["slot"] == "b" && r["state"] == "installed",
            &format!("{} {}", out.stdout.trim(), log.lines().last().unwrap_or("")),
        )?;
        let after = room(&vm)?;
        let grew = lv(&after, "back") - lv(&before, "back");
        sc.check(
            "slot b's LV grew out of the reserve; root, data and image unchanged",
            grew >= 4.0
                && (before.free - after.free - grew).abs() < 1.0
                && lv(&after, "root") == lv(&before, "root")
                && lv(&after, "data") == lv(&before, "data")
                && lv(&after, "image") == lv(&before, "image"),
            &format!(
                "back {} -> {} MiB, VG free {} -> {} MiB (reserve {})",
                lv(&before, "back"),
                lv(&after, "back"),
                before.free,
                after.free,
                after.reserve
            ),
        )?;
        sc.check(
            "the log says the slot grew, with the sizes",
            log.contains("grew slot b's LV /dev/VA/back from"),
            log.lines()
                .find(|l| l.contains("grew slot"))
                .unwrap_or("(no line)"),
        )?;
        vm.ssh_ok(&format!("{DUALROOT} slot switch b"))?;
        vm.mark_console();
        let _ = vm.ssh("systemctl reboot");
        let v2 = boot_new(sc, &mut vm)?;
        sc.check(
            "slot b boots the bigger OS",
            v2 != v1 && v2.ends_with(".3"),
            &format!("{v1} -> {v2}"),
        )?;
        let st = wait_for(
            "slot b confirmed",
            || slot_status(&vm),
            |s| slot(s, "b")["state"] == "good",
        )?;
        let pad: f64 = vm
            .ssh_ok("du -sm /opt/pad | cut -f1")?
            .trim()
            .parse()
            .unwrap_or(0.0);
        sc.check(
            "slot b confirmed good, its root holds the padded payload",
            st["booted"] == "b" && slot(&st, "b")["state"] == "good" && pad > 150.0,
            &format!("{} ; /opt/pad {pad} MiB", st["slots"]),
        )?;
        // The next boot gives nothing to data/image: the reserve is short by
        // what the slot took, and the policy refills it first.
        let r = room(&vm)?;
        sc.check(
            "data and image did not take the reserve back",
            lv(&r, "data") == lv(&before, "data") && lv(&r, "image") == lv(&before, "image"),
            &format!("{r:?}"),
        )?;
        vm.shutdown(Duration::from_secs(120))
    });
}

fn lifecycle_too_big_even_with_the_reserve_is_refused(base: &Base) {
    scenario::run("lifecycle-too-big-for-the-reserve-is-refused", |sc| {
        let (mut vm, _) = vm_on_base(sc, base, 0)?;
        let before = room(&vm)?;
        let env_before = vm.ssh_ok("cat /boot/grub/grubenv")?;
        let boot_b_before = vm.ssh_ok("ls -la /boot/b 2>&1 || true")?;
        let t0 = Instant::now();
        let out = vm.ssh(&format!("{DUALROOT} slot install {HUGE}"))?;
        let secs = t0.elapsed().as_secs_f64();
        let msg = out.stderr.trim().to_string();
        println!("[{}] refused in {secs:.1} s: {msg}", sc.name);
        sc.check(
            "refused, naming the LV size, the need, the VG's free space and reserve, and how much the disk must grow",
            !out.success()
                && msg.contains("slot b's LV /dev/VA/back is")
                && msg.contains("the bundle needs")
                && msg.contains("slot reserve")
                && msg.contains("grow the disk by at least")
                && msg.contains("nothing was changed"),
            msg.lines().last().unwrap_or(""),
        )?;
        let after = room(&vm)?;
        let env_after = vm.ssh_ok("cat /boot/grub/grubenv")?;
        let boot_b_after = vm.ssh_ok("ls -la /boot/b 2>&1 || true")?;
        sc.check(
            "nothing changed: LVs, VG free, grubenv, /boot/b",
            after == before && env_after == env_before && boot_b_after == boot_b_before,
            &format!("{after:?}"),
        )?;
        let st = slot_status(&vm)?;
        sc.check(
            "slot a still booted and primary",
            st["booted"] == "a" && st["primary"] == "a",
            &st["slots"].to_string(),
        )?;
        vm.shutdown(Duration::from_secs(120))
    });
}

fn lifecycle_disk_grown_between_boots(base: &Base) {
    scenario::run("lifecycle-disk-grown-between-boots", |sc| {
        // What the base had (booting it unchanged would cost a boot).
        let (mut vm, _) = vm_on_base(sc, base, 2)?;
        let size = vm.ssh_ok("blockdev --getsize64 /dev/vda")?;
        println!("[{}] disk is {} bytes", sc.name, size.trim());
        let r = wait_for(
            "the PV grown and data/image given the new space",
            || room(&vm),
            |r| r.pv > 5000.0 && (r.free - r.reserve).abs() < 8.0,
        )?;
        let health = vm.ssh_ok(
            "journalctl -b -u dualroot-confirm.service --no-pager -o cat | grep -E 'grew|PV|partition' || true",
        )?;
        println!("[{}] health check: {}", sc.name, health.trim());
        sc.check(
            "the next boot grew partition 3 and the PV by 2 GiB",
            health.contains("partition 3") && health.contains("PV /dev/vda3 grown"),
            health.trim(),
        )?;
        let b = &base.room;
        sc.check(
            "the new space went to data and image (the reserve was full): VG free = reserve",
            r.pv >= b.pv + 2040.0
                && lv(&r, "data") >= lv(b, "data") + 1000.0
                && lv(&r, "image") >= lv(b, "image") + 1000.0
                && lv(&r, "root") == lv(b, "root")
                && lv(&r, "back") == lv(b, "back"),
            &format!("before {b:?}; after {r:?}"),
        )?;
        let verify = vm.ssh("sfdisk --verify /dev/vda; sfdisk -d /dev/vda | tail -n 2")?;
        sc.check(
            "the GPT is valid with its backup at the new end (sfdisk --verify)",
            verify.success() && !verify.stdout.contains("differs"),
            verify.stdout.trim(),
        )?;
        let df = vm.ssh_ok("df -m --output=size /data /image | tail -n 2")?;
        let sizes: Vec<f64> = df
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        sc.check(
            "their ext4 filesystems grew online to the LVs' size",
            sizes.len() == 2 && sizes[0] > 0.9 * lv(&r, "data") && sizes[1] > 0.9 * lv(&r, "image"),
            &format!(
                "df {sizes:?} MiB for LVs data {} image {}",
                lv(&r, "data"),
                lv(&r, "image")
            ),
        )?;
        vm.shutdown(Duration::from_secs(120))
    });
}
