//! The new OS lives in its slot (issue 15), in QEMU, from the cached "migrated"
//! state (reference migration done, slot a good):
//! - (b) the slot's own package manager installs another kernel and runs the
//!   distribution's update-grub: dualroot's menu stays, the new kernel boots
//!   from /boot/a/, `slot status` shows it, and a following install + switch +
//!   fallback still works;
//! - (c) a slot whose initramfs cannot find its root (it has no LVM) reboots
//!   (`rd.emergency=reboot` / `panic=`) until its tries are spent, and GRUB falls
//!   back to the good slot.
//!
//! (a), the migration to a dracut bundle, is in migration.rs (it is a migration).
//!
//! `qemu-tests/run-scenarios.sh slot_native`

mod common;

use common::*;
use qemu_tests::disk::{overlay_on, standard_payload};
use qemu_tests::images;
use qemu_tests::qemu::{Vm, VmConfig};
use qemu_tests::scenario::{self, Scenario};
use qemu_tests::{Context, Result};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

const DUALROOT: &str = "/usr/local/sbin/dualroot";

/// A VM on an overlay of the migrated state with `files` on the payload disk
/// (mounted at /mnt/payload), booted into slot a.
fn migrated_vm(sc: &Scenario, files: &[(PathBuf, String)]) -> Result<Vm> {
    let st = migrated(sc)?;
    sc.uses_state(&st);
    let (disk, fmt) = overlay_on(&st.disk, "qcow2", &sc.path("disk.qcow2"))?;
    let payload = standard_payload(&sc.path("payload"), files)?.build(&sc.path("payload.img"))?;
    let mut vm = sc.vm(
        "appliance",
        VmConfig::default().disk(&disk, fmt).disk(&payload, "raw"),
    )?;
    vm.wait_for_console_any(&[BOOTED], &[GAVE_UP], Duration::from_secs(900))?;
    vm.wait_for_ssh(Duration::from_secs(300))?;
    mount_payload(&vm)?;
    Ok(vm)
}

/// Installs the v2 bundle into slot b, breaks what `breaker` breaks in it, switches
/// with `tries` and checks GRUB spends them all, then boots slot a by itself.
fn fallback(sc: &Scenario, vm: &mut Vm, breaker: &str, marker: &str, tries: u32) -> Result<()> {
    let r = vm.ssh_ok(&format!(
        "{DUALROOT} slot install /mnt/payload/stage/v2.bundle --json 2>/root/install.log"
    ))?;
    let r: Value = serde_json::from_str(&r).context("parsing slot install --json")?;
    sc.check(
        "slot install put v2 into slot b",
        r["slot"] == "b" && r["state"] == "installed",
        &r.to_string(),
    )?;
    vm.ssh_ok(breaker)?;
    vm.ssh_ok(&format!("{DUALROOT} slot switch --tries {tries}"))?;
    vm.mark_console();
    let _ = vm.ssh("systemctl reboot");
    vm.wait_for_console_any(&[BOOTED], &[GAVE_UP], Duration::from_secs(2400))?;
    vm.wait_for_ssh(Duration::from_secs(300))?;
    let seen = vm.console_text().matches(marker).count();
    let st = slot_status(vm)?;
    sc.check(
        &format!("slot b failed {tries} boots, then GRUB booted slot a by itself"),
        st["booted"] == "a"
            && st["fallback_from"] == "b"
            && st["fallback_tries_used"] == tries
            && slot(&st, "b")["state"] == "bad"
            && seen >= tries as usize,
        &format!("{seen} x {marker:?} on the console; status {st}"),
    )
}

#[test]
#[ignore = "boots VMs (about 12 minutes under TCG)"]
fn slot_native_kernel_update_keeps_the_ab_menu() {
    scenario::run("slot-native-kernel-update", |sc| {
        let deb = images::kernel_deb()?;
        let v2 = images::bundle_v2()?;
        let files = vec![
            (deb.clone(), "kernel/cloud.deb".to_string()),
            (v2.path.clone(), "v2.bundle".to_string()),
        ];
        let mut vm = migrated_vm(sc, &files)?;
        let before = vm.ssh_ok("uname -r; sha256sum /boot/grub/grub.cfg")?;
        println!("[{}] before: {}", sc.name, before.replace('\n', " | "));
        // The distribution's own way: dpkg runs its kernel hooks (initramfs-tools,
        // zz-update-grub -> the diverted update-grub, zzz-dualroot), then the
        // admin runs update-grub once more by hand.
        let out = vm.ssh_ok("dpkg -i /mnt/payload/stage/kernel/cloud.deb 2>&1 | tail -n 15; update-grub 2>&1 | tail -n 3")?;
        println!("[{}] dpkg -i + update-grub:\n{out}", sc.name);
        let kver = deb
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("linux-image-"))
            .and_then(|n| n.split('_').next())
            .unwrap_or_default()
            .to_string();
        let cfg = vm.ssh_ok("cat /boot/grub/grub.cfg")?;
        sc.check(
            "grub.cfg is still dualroot's (slot entries, no distribution menu)",
            cfg.contains("--id slot_a")
                && cfg.contains("--id slot_b")
                && !cfg.contains("### BEGIN /etc/grub.d/10_linux"),
            cfg.lines().find(|l| l.contains("menuentry")).unwrap_or(""),
        )?;
        let files = vm.ssh_ok("cat /boot/a/kernel-version; ls /boot/ | tr '\\n' ' '")?;
        sc.check(
            "the new kernel went to /boot/a/ (not left for the distribution's menu)",
            files.lines().next().unwrap_or("").trim() == kver,
            &files.replace('\n', " | "),
        )?;
        vm.mark_console();
        let _ = vm.ssh("systemctl reboot");
        vm.wait_for_console_any(&[BOOTED], &[GAVE_UP], Duration::from_secs(900))?;
        vm.wait_for_ssh(Duration::from_secs(300))?;
        let uname = vm.ssh_ok("uname -r")?;
        sc.check(
            "after a reboot slot a runs the new kernel from /boot/a/",
            uname.trim() == kver,
            uname.trim(),
        )?;
        let st = slot_status(&vm)?;
        sc.check(
            "slot status shows slot a's new kernel",
            st["booted"] == "a" && slot(&st, "a")["kernel"] == kver.as_str(),
            &slot(&st, "a").to_string(),
        )?;
        mount_payload(&vm)?;
        fallback(
            sc,
            &mut vm,
            "mkdir -p /mnt/b && mount /dev/VA/back /mnt/b && rm -f /mnt/b/usr/sbin/init && printf '#!/bin/sh\\necho DUALROOT-TEST-INIT-EXITS\\nexit 1\\n' >/mnt/b/usr/sbin/init && chmod 755 /mnt/b/usr/sbin/init && umount /mnt/b",
            "DUALROOT-TEST-INIT-EXITS",
            2,
        )?;
        let uname = vm.ssh_ok("uname -r")?;
        sc.check(
            "after the fallback slot a still boots its updated kernel",
            uname.trim() == kver,
            uname.trim(),
        )?;
        vm.shutdown(Duration::from_secs(120))
    });
}

#[test]
#[ignore = "boots VMs (about 15 minutes under TCG)"]
fn slot_native_initramfs_without_root_falls_back() {
    scenario::run("slot-native-initramfs-no-root", |sc| {
        // The dracut tree's shipped initramfs: host-only for its build machine,
        // no LVM, so it never finds /dev/mapper/VA-back.
        let dracut = images::newos_dracut()?;
        let kver = std::fs::read_to_string(dracut.dir.join("build-info"))?
            .lines()
            .find_map(|l| l.strip_prefix("kernel=").map(str::to_string))
            .unwrap_or_default();
        let bad = dracut.root.join(format!("boot/initrd.img-{kver}"));
        let v2 = images::bundle_v2()?;
        let files = vec![
            (bad, "no-lvm-initrd.img".to_string()),
            (v2.path.clone(), "v2.bundle".to_string()),
        ];
        let mut vm = migrated_vm(sc, &files)?;
        let same = vm.ssh_ok(&format!(
            "uname -r; test -e /mnt/payload/stage/no-lvm-initrd.img && echo {kver}"
        ))?;
        sc.check(
            "the broken initramfs is for the kernel slot b boots",
            same.lines().next() == same.lines().nth(1),
            &same.replace('\n', " "),
        )?;
        // Each boot of slot b shows its command line on the console.
        fallback(
            sc,
            &mut vm,
            "cp /mnt/payload/stage/no-lvm-initrd.img /boot/b/initrd.img && sync",
            "dualroot.slot=b",
            2,
        )?;
        vm.shutdown(Duration::from_secs(120))
    });
}
