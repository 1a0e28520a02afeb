//! UEFI appliances (issue 26), under OVMF on q35 with TCG. The old system is
//! `images/legacy-efi.sh`: a CentOS 7 EFI layout (GPT, ESP, XFS /boot, VG
//! centos) booting Debian's signed shim and GRUB. Scenarios:
//!
//! - `uefi_migration_then_ab_and_nvram_reset`: the migration with the reference
//!   checks plus the UEFI ones (new ESP, the new OS's chain in
//!   `\EFI\dualroot-a\` and at the removable path, the recovery chain gone, a
//!   firmware entry `dualroot-a` that booted it); then, on overlays of that
//!   disk: an A/B install that puts slot b's own chain and entry in place, boots
//!   b, confirms it and then boots through b's chain; a slot GRUB falls back
//!   from by itself (GRUB writes its environment on /boot across those boots);
//!   and fresh NVRAM (a reset hypervisor) still boots slot A through
//!   `\EFI\BOOT\BOOTX64.EFI`;
//! - `uefi_secure_boot_migration`: the same migration with Secure Boot
//!   enforcing (OVMF's Secure Boot build, Microsoft's keys), `mokutil` says so
//!   before and after;
//! - `uefi_refusal_boots_the_old_system`: a refusal before the point of no
//!   return leaves GPT, ESP and NVRAM as they were and the old system boots.
//!
//! Opt-in: `qemu-tests/run-scenarios.sh uefi`.

mod common;

use common::reference::*;
use common::*;
use qemu_tests::disk::overlay_on;
use qemu_tests::images;
use qemu_tests::qemu::{Firmware, Vm, VmConfig, OVMF_VARS};
use qemu_tests::scenario::{self, Scenario};
use qemu_tests::{Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DUALROOT: &str = "/usr/local/sbin/dualroot";
const UPGRADE: &str = "/mnt/payload/upgrade/os2.bundle";

/// The old system as the firmware booted it: UEFI, the ESP at /boot/efi, the
/// Secure Boot state `sb` ("enabled"/"disabled").
fn uefi_before(sc: &Scenario, vm: &Vm, sb: &str) -> Result<()> {
    let facts = vm.ssh_ok(
        "test -d /sys/firmware/efi && echo efi; findmnt -n -o SOURCE,FSTYPE /boot/efi; mokutil --sb-state 2>&1 | head -n1; efibootmgr | head -n2",
    )?;
    println!(
        "[{}] old firmware facts: {}",
        sc.name,
        facts.replace('\n', " | ")
    );
    sc.check(
        &format!("old: booted with UEFI, ESP vfat on vda1 at /boot/efi, Secure Boot {sb}"),
        facts.starts_with("efi\n")
            && facts.contains("/dev/vda1 vfat")
            && facts.contains(&format!("SecureBoot {sb}")),
        &facts.replace('\n', " | "),
    )?;
    let pre = vm.ssh_ok(&format!(
        "sh /mnt/payload/install.sh >/dev/null && {DUALROOT} preflight --plan {PLAN} --json"
    ))?;
    let p: Value = serde_json::from_str(&pre).context("parsing preflight --json")?;
    let check = |name: &str| {
        p["checks"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == name))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let (chain, uefi) = (check("boot chain"), check("uefi"));
    sc.check(
        "preflight: the old signed chain for the recovery entry, the new OS's signed chain, an ESP in the layout",
        chain["ok"] == true
            // The entry's shim, or the removable path (shim as BOOTX64.EFI) when
            // fresh NVRAM booted the disk.
            && ["shimx64.efi with grubx64.efi", "BOOTX64.EFI with grubx64.efi"]
                .iter()
                .any(|c| chain["detail"].as_str().unwrap_or("").contains(c))
            && uefi["ok"] == true
            && p["source"]["esp"] == "vda1"
            && p["sizes"]["esp"].as_u64().unwrap_or(0) >= 64 << 20,
        &format!("{} / {} / esp {}", chain["detail"], uefi["detail"], p["sizes"]["esp"]),
    )
}

/// The firmware's view from a running guest: BootCurrent's label and the label
/// of the first BootOrder entry (`efibootmgr`).
struct Nvram {
    current: String,
    first: String,
    labels: Vec<String>,
    text: String,
}

fn nvram(vm: &Vm) -> Result<Nvram> {
    let text = vm.ssh_ok("efibootmgr")?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let entries: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Boot")?;
            let n = rest.get(0..4)?;
            n.chars().all(|c| c.is_ascii_hexdigit()).then(|| {
                let label = rest[4..].trim_start_matches('*').trim_start();
                let label = label.split('\t').next().unwrap_or(label).trim_end();
                (n.to_string(), label.to_string())
            })
        })
        .collect();
    let label_of = |n: &str| {
        entries
            .iter()
            .find(|(e, _)| e == n)
            .map(|(_, l)| l.clone())
            .unwrap_or_default()
    };
    let order = field("BootOrder:");
    Ok(Nvram {
        current: label_of(&field("BootCurrent:")),
        first: label_of(order.split(',').next().unwrap_or("")),
        labels: entries.into_iter().map(|(_, l)| l).collect(),
        text,
    })
}

/// The new OS as UEFI boots it: the ESP is GPT entry 4 (vfat), the new OS's
/// chain is in `\EFI\dualroot-a\` and at the removable path with the stubs,
/// the recovery chain is gone; the "dualroot-a" firmware entry is first and
/// booted this boot.
fn uefi_after(sc: &Scenario, vm: &Vm, sb: &str) -> Result<()> {
    let part = vm.ssh_ok("lsblk -n -r -o NAME,PARTTYPE,FSTYPE,LABEL /dev/vda4")?;
    sc.check(
        "vda4 is the new ESP (EFI System type, vfat)",
        part.to_lowercase()
            .contains("vda4 c12a7328-f81f-11d2-ba4b-00a0c93ec93b vfat"),
        part.trim(),
    )?;
    let files = vm.ssh_ok(
        "mkdir -p /mnt/esp && mount -o ro /dev/vda4 /mnt/esp && (cd /mnt/esp && find . -type f | sort) && cmp /mnt/esp/EFI/BOOT/BOOTX64.EFI /usr/lib/shim/shimx64.efi.signed && cmp /mnt/esp/EFI/dualroot-a/grubx64.efi /usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed && echo SAME-AS-NEW-OS; cat /mnt/esp/EFI/BOOT/grub.cfg; umount /mnt/esp",
    )?;
    println!("[{}] new ESP:\n{files}", sc.name);
    let has = |f: &str| files.lines().any(|l| l.eq_ignore_ascii_case(f));
    sc.check(
        "the ESP holds the new OS's signed shim and GRUB in EFI/dualroot-a and at EFI/BOOT/BOOTX64.EFI, with grub.cfg stubs; the recovery chain is gone",
        [
            "./EFI/dualroot-a/shimx64.efi",
            "./EFI/dualroot-a/grubx64.efi",
            "./EFI/dualroot-a/grub.cfg",
            "./EFI/BOOT/BOOTX64.EFI",
            "./EFI/BOOT/grubx64.efi",
            "./EFI/BOOT/grub.cfg",
        ]
        .iter()
        .all(|f| has(f))
            && !files.to_lowercase().contains("./efi/debian/")
            && files.contains("SAME-AS-NEW-OS")
            && files.contains("search --no-floppy --label boot"),
        &files.lines().filter(|l| l.starts_with("./")).collect::<Vec<_>>().join(" "),
    )?;
    let fw =
        vm.ssh_ok("test -d /sys/firmware/efi && echo efi; mokutil --sb-state 2>&1 | head -n1")?;
    let nv = nvram(vm)?;
    println!(
        "[{}] new OS firmware facts: {}\n{}",
        sc.name,
        fw.trim(),
        nv.text
    );
    sc.check(
        &format!("the new OS booted with UEFI, Secure Boot {sb}, through the firmware entry dualroot-a, first in BootOrder; the recovery chain's and the old system's entries are gone"),
        fw.starts_with("efi\n")
            && fw.contains(&format!("SecureBoot {sb}"))
            && nv.current == "dualroot-a"
            && nv.first == "dualroot-a"
            && !nv.labels.iter().any(|l| l == "dualroot-recovery" || l == "debian"),
        &format!(
            "{}; BootCurrent {}, first {}, entries {:?}",
            fw.trim().replace('\n', " "),
            nv.current,
            nv.first,
            nv.labels
        ),
    )
}

/// The migrated UEFI disk, its NVRAM and the payload with the second bundle.
struct Base {
    disk: PathBuf,
    vars: PathBuf,
    payload: PathBuf,
}

fn uefi_vm(sc: &Scenario, base: &Base, vars_from: &Path) -> Result<Vm> {
    let (disk, fmt) = overlay_on(&base.disk, "qcow2", &sc.path("disk.qcow2"))?;
    let mut cfg = VmConfig::default()
        .disk(&disk, fmt)
        .disk(&base.payload, "raw");
    cfg.firmware = Firmware::uefi_from(vars_from, &sc.path("vars.fd"), false)?;
    sc.vm("appliance", cfg)
}

#[test]
#[ignore = "boots VMs (about 40 minutes under TCG, more when the images are built)"]
fn uefi_migration_then_ab_and_nvram_reset() {
    let mut base = None;
    // Developer shortcut when only the A/B or NVRAM checks changed: the migrated
    // disk, NVRAM and payload the last run's uefi-migration left behind (they
    // hold that run's dualroot).
    let last = images::cache_dir().join("runs/uefi-migration");
    if std::env::var_os("DUALROOT_REUSE_UEFI_BASE").is_some()
        && ["disk.qcow2", "vars.fd", "payload.img"]
            .iter()
            .all(|f| last.join(f).is_file())
    {
        println!(
            "reusing the migrated UEFI disk in {} (DUALROOT_REUSE_UEFI_BASE)",
            last.display()
        );
        base = Some(Base {
            disk: last.join("disk.qcow2"),
            vars: last.join("vars.fd"),
            payload: last.join("payload.img"),
        });
    }
    // (scenario::run empties its directory: not run when the base is reused)
    let reuse = base.is_some();
    let migrate = |sc: &Scenario| -> Result<Base> {
        let v2 = images::bundle_v2()?;
        let r = Reference {
            extra: vec![(v2.path.clone(), "upgrade/os2.bundle")],
            ..Reference::on(Old::Efi)
        };
        migrate_with_reference_checks(
            sc,
            &r,
            |sc, vm| uefi_before(sc, vm, "disabled"),
            |sc, vm, ()| uefi_after(sc, vm, "disabled"),
        )?;
        Ok(Base {
            disk: sc.path("disk.qcow2"),
            vars: sc.path("vars.fd"),
            payload: sc.path("payload.img"),
        })
    };
    if !reuse {
        scenario::run("uefi-migration", |sc| {
            base = Some(migrate(sc)?);
            Ok(())
        });
    }
    let base = base.expect("the uefi-migration scenario recorded its disk");

    scenario::run("uefi-ab-install-switch-fallback", |sc| {
        let mut vm = uefi_vm(sc, &base, &base.vars)?;
        let v1 = boot_new(sc, &mut vm)?;
        mount_payload(&vm)?;
        wait_status(&vm, "slot a confirmed", |s| slot(s, "a")["state"] == "good")?;
        let out = vm.ssh_ok(&format!(
            "{DUALROOT} slot install {UPGRADE} --json 2>/root/install.log"
        ))?;
        let r: Value = serde_json::from_str(&out).context("parsing slot install --json")?;
        sc.check(
            "slot install put the v2 bundle into slot b",
            r["slot"] == "b" && r["state"] == "installed",
            &r.to_string(),
        )?;
        let esp_b = vm.ssh_ok("mkdir -p /mnt/esp && mount -o ro /dev/vda4 /mnt/esp && ls /mnt/esp/EFI/dualroot-b; umount /mnt/esp")?;
        let nv = nvram(&vm)?;
        sc.check(
            "slot b's own chain is in EFI/dualroot-b with a firmware entry dualroot-b, not first yet (b is not confirmed)",
            esp_b.contains("shimx64.efi")
                && esp_b.contains("grubx64.efi")
                && nv.labels.iter().any(|l| l == "dualroot-b")
                && nv.first == "dualroot-a",
            &format!("{}; entries {:?}, first {}", esp_b.replace('\n', " "), nv.labels, nv.first),
        )?;
        vm.ssh_ok(&format!("{DUALROOT} slot switch b"))?;
        vm.mark_console();
        let _ = vm.ssh("systemctl reboot");
        let v2 = boot_new(sc, &mut vm)?;
        let st = wait_status(&vm, "slot b confirmed", |s| slot(s, "b")["state"] == "good")?;
        sc.check(
            "slot b (v2) booted under UEFI and was confirmed good",
            v2 != v1 && v2.ends_with(".2") && st["booted"] == "b" && st["primary"] == "b",
            &format!("{v1} -> {v2}; {st}"),
        )?;
        // Confirmed: b's chain is promoted; the next boot starts it.
        let nv = nvram(&vm)?;
        sc.check(
            "b's first confirmed boot put dualroot-b first in BootOrder",
            nv.first == "dualroot-b",
            &format!("BootCurrent {}, first {}", nv.current, nv.first),
        )?;
        vm.mark_console();
        let _ = vm.ssh("systemctl reboot");
        let again = boot_new(sc, &mut vm)?;
        let nv = nvram(&vm)?;
        let st = slot_status(&vm)?;
        sc.check(
            "the next boot went through slot b's own chain (BootCurrent dualroot-b) into slot b",
            nv.current == "dualroot-b" && again == v2 && st["booted"] == "b",
            &format!(
                "BootCurrent {}, version {again}, booted {}",
                nv.current, st["booted"]
            ),
        )?;
        // An update of the slot's own GRUB package: the apt hook dualroot put
        // into the slot brings the chain on the ESP up to the slot's files. The
        // ESP copy is made stale first; the hook runs as apt runs it after dpkg.
        let hook = vm.ssh_ok(
            "mkdir -p /mnt/esp && mount /dev/vda4 /mnt/esp && cp /mnt/esp/EFI/dualroot-b/mmx64.efi /mnt/esp/EFI/dualroot-b/grubx64.efi && umount /mnt/esp && sh -c \"$(apt-config dump --no-empty --format '%v%n' DPkg::Post-Invoke)\" && mount -o ro /dev/vda4 /mnt/esp && cmp /mnt/esp/EFI/dualroot-b/grubx64.efi /usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed && cmp /mnt/esp/EFI/BOOT/grubx64.efi /usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed && echo CHAIN-CURRENT; umount /mnt/esp",
        )?;
        sc.check(
            "the slot's apt hook brought its stale GRUB on the ESP (its own dir and the removable path) up to its package's",
            hook.contains("CHAIN-CURRENT"),
            hook.trim(),
        )?;
        // Now the other way round: slot a gets v2 with an init that exits, and
        // GRUB must count its tries and fall back to b by itself; those boots
        // go through b's refreshed chain.
        mount_payload(&vm)?;
        let out = vm.ssh_ok(&format!(
            "{DUALROOT} slot install {UPGRADE} --json 2>/root/install.log"
        ))?;
        let r: Value = serde_json::from_str(&out).context("parsing slot install --json")?;
        sc.check(
            "slot install put v2 into slot a",
            r["slot"] == "a",
            &r.to_string(),
        )?;
        vm.ssh_ok("mkdir -p /mnt/a && mount /dev/VA/root /mnt/a && rm -f /mnt/a/usr/sbin/init && printf '#!/bin/sh\\necho DUALROOT-TEST-INIT-EXITS\\nexit 1\\n' >/mnt/a/usr/sbin/init && chmod 755 /mnt/a/usr/sbin/init && umount /mnt/a")?;
        vm.ssh_ok(&format!("{DUALROOT} slot switch a --tries 2"))?;
        vm.mark_console();
        let _ = vm.ssh("systemctl reboot");
        let v = boot_new(sc, &mut vm)?;
        // The whole console: only this phase's slot prints the marker.
        let tries = vm
            .console_text()
            .matches("DUALROOT-TEST-INIT-EXITS")
            .count();
        let st = slot_status(&vm)?;
        let nv = nvram(&vm)?;
        sc.check(
            "slot a's init failed twice, then the signed GRUB fell back to slot b by itself (it wrote its environment on /boot), through b's refreshed chain",
            tries == 2
                && v.ends_with(".2")
                && st["booted"] == "b"
                && st["fallback_from"] == "a"
                && slot(&st, "a")["state"] == "bad"
                && nv.current == "dualroot-b",
            &format!("{tries} failed boots; BootCurrent {}; {st}", nv.current),
        )?;
        vm.shutdown(Duration::from_secs(120))
    });

    scenario::run("uefi-nvram-reset-boots-slot-a", |sc| {
        // A hypervisor that resets NVRAM: OVMF's variables as shipped, no boot
        // entry at all. The firmware finds \EFI\BOOT\BOOTX64.EFI by itself.
        let mut vm = uefi_vm(sc, &base, Path::new(OVMF_VARS))?;
        let v = boot_new(sc, &mut vm)?;
        let st = wait_status(&vm, "slot a good", |s| slot(s, "a")["state"] == "good")?;
        let nv = vm.ssh_ok("efibootmgr")?;
        println!("[{}] NVRAM after the reset:\n{nv}", sc.name);
        let current = nv
            .lines()
            .find_map(|l| l.strip_prefix("BootCurrent: "))
            .unwrap_or("?")
            .trim()
            .to_string();
        let current_line = nv
            .lines()
            .find(|l| l.starts_with(&format!("Boot{current}")))
            .unwrap_or("")
            .to_string();
        sc.check(
            "with fresh NVRAM the firmware booted the removable path, and slot A came up",
            st["booted"] == "a" && !v.is_empty() && !current_line.contains("dualroot"),
            &format!("version {v}; booted via {current_line:?}"),
        )?;
        vm.shutdown(Duration::from_secs(120))
    });
}

#[test]
#[ignore = "boots VMs (about 15 minutes under TCG)"]
fn uefi_secure_boot_migration() {
    scenario::run("uefi-secure-boot-migration", |sc| {
        let r = Reference {
            secure_boot: true,
            ..Reference::on(Old::Efi)
        };
        migrate_with_reference_checks(
            sc,
            &r,
            |sc, vm| uefi_before(sc, vm, "enabled"),
            |sc, vm, ()| uefi_after(sc, vm, "enabled"),
        )
    });
}

#[test]
#[ignore = "boots VMs (about 8 minutes under TCG)"]
fn uefi_refusal_boots_the_old_system() {
    scenario::run("uefi-refusal-boots-old-system", |sc| {
        let cfg = appliance_on(sc, Old::Efi, BundleKind::Good, 1024)?;
        let mut vm = sc.vm("appliance", cfg)?;
        boot_old(sc, &mut vm)?;
        const FACTS: &str = "sfdisk -J /dev/vda; (cd /boot/efi && find . -type f | sort | xargs sha256sum); efibootmgr | grep -v '^BootCurrent'";
        let before = vm.ssh_ok(FACTS)?;
        install_and_stage(&vm, &[])?;
        vm.shutdown(Duration::from_secs(120))?;
        // The machine comes back with less RAM than staging needs: refused in
        // the initramfs, before anything is written.
        vm.config_mut().memory_mib = 320;
        vm.restart()?;
        vm.wait_for_console_any(
            &[REFUSED],
            &[DONE, RETRY, GAVE_UP],
            Duration::from_secs(900),
        )?;
        boot_old(sc, &mut vm)?;
        let after = vm.ssh_ok(FACTS)?;
        sc.check(
            "the old system booted with GPT, the ESP's files and NVRAM's entries as before",
            after == before,
            &format!("{} lines compared", before.lines().count()),
        )?;
        let result = vm.ssh_ok("cat /var/lib/dualroot/migration-result.json")?;
        let r: Value = serde_json::from_str(&result).context("parsing migration-result.json")?;
        sc.check(
            "the refusal's reason is on the old system",
            r["outcome"] == "refused"
                && r["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("of RAM are needed"),
            r["reason"].as_str().unwrap_or(""),
        )?;
        vm.mark_console();
        let _ = vm.ssh("systemctl reboot");
        vm.wait_for_console_any(
            &[BOOTED],
            &["migration requested", REFUSED, DONE],
            Duration::from_secs(600),
        )?;
        vm.wait_for_ssh(Duration::from_secs(180))?;
        let osr = vm.ssh_ok("grep VERSION_ID /etc/os-release")?;
        sc.check(
            "one more reboot boots the old system again, no migration (one-shot cleared on XFS /boot)",
            osr.contains("\"11\""),
            osr.trim(),
        )?;
        vm.shutdown(Duration::from_secs(120))
    });
}
