//! A/B slots after a real migration, in QEMU (issue 5's scenarios). One migration
//! makes the base disk; each upgrade scenario boots a qcow2 overlay of it:
//! 1. growth of data/image after the first good boot (checked on the base);
//! 2. `slot install` of a second bundle -> `switch` -> the new slot boots, its
//!    health check confirms it;
//! 3. the same with a slot whose init exits -> GRUB falls back by itself;
//! 4. power cut during `slot install` -> the booted slot boots, the other is
//!    reported not installed (and a second install completes).
//!
//! `cargo test -p qemu-tests --test slots -- --ignored --test-threads=1 --nocapture`

mod common;

use common::*;
use qemu_tests::disk::overlay_on;
use qemu_tests::images;
use qemu_tests::qemu::{Vm, VmConfig};
use qemu_tests::scenario::{self, Scenario};
use qemu_tests::{Context, Result};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const DUALROOT: &str = "/usr/local/sbin/dualroot";
const UPGRADE: &str = "/mnt/payload/upgrade/os2.bundle";

/// The migrated disk (qcow2) and the payload disk holding the second bundle.
#[derive(Clone)]
struct Base {
    disk: PathBuf,
    payload: PathBuf,
}

static BASE: Mutex<Option<Base>> = Mutex::new(None);

/// Scenario 4 + the base for the others: migrate, let the first good boot grow
/// data and image, keep the disk.
fn base() -> Result<Base> {
    if let Some(b) = BASE.lock().unwrap_or_else(|e| e.into_inner()).clone() {
        return Ok(b);
    }
    // Developer shortcut when only the scenarios' own checks changed: reuse the
    // base disk the last run left behind (it holds that run's dualroot binary).
    if std::env::var_os("DUALROOT_REUSE_AB_BASE").is_some() {
        let dir = images::cache_dir().join("runs/ab-grow-after-first-good-boot");
        let b = Base {
            disk: dir.join("disk.qcow2"),
            payload: dir.join("payload.img"),
        };
        if b.disk.is_file() && b.payload.is_file() {
            println!(
                "reusing the migrated base disk {} (DUALROOT_REUSE_AB_BASE)",
                b.disk.display()
            );
            *BASE.lock().unwrap_or_else(|e| e.into_inner()) = Some(b.clone());
            return Ok(b);
        }
    }
    let mut out = None;
    scenario::run("ab-grow-after-first-good-boot", |sc| {
        let v2 = images::bundle_v2()?;
        let cfg = appliance_with(
            sc,
            BundleKind::Good,
            1024,
            &[(v2.path.clone(), "upgrade/os2.bundle")],
        )?;
        let payload = cfg.disks[1].path.clone();
        let mut vm = sc.vm("appliance", cfg)?;
        boot_old(sc, &mut vm)?;
        migrate_now(&mut vm)?;
        boot_new(sc, &mut vm)?;
        let before =
            vm.ssh_ok("lvs --noheadings --units m -o lv_name,lv_size VA | tr -s ' \\n' ' '")?;
        println!("[{}] right after boot: {before}", sc.name);
        let st = wait_status(&vm, "slot a confirmed", |s| slot(s, "a")["state"] == "good")?;
        sc.check(
            "the health check confirmed slot a",
            true,
            &slot(&st, "a").to_string(),
        )?;
        let t0 = Instant::now();
        loop {
            let env = vm.ssh_ok("cat /boot/grub/grubenv | tr -d '#'")?;
            if !env.contains("grow_pending") {
                break;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                qemu_tests::bail!("grow_pending still set after 120 s: {env}");
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        let lvs = vm.ssh_ok("lvs --noheadings --units m --nosuffix -o lv_name,lv_size VA")?;
        let size = |n: &str| -> f64 {
            lvs.lines()
                .find_map(|l| {
                    let mut w = l.split_whitespace();
                    (w.next() == Some(n)).then(|| w.next().and_then(|x| x.parse().ok()))?
                })
                .unwrap_or(0.0)
        };
        let free: f64 = vm
            .ssh_ok("vgs --noheadings --units m --nosuffix -o vg_free VA")?
            .trim()
            .parse()
            .unwrap_or(-1.0);
        let df =
            vm.ssh_ok("df -m --output=target,size /data /image | tail -n 2 | tr -s ' \\n' ' '")?;
        println!(
            "[{}] lvs after growth:\n{lvs}  VG free {free} MiB; df {df}",
            sc.name
        );
        // The slot reserve (issue 25) stays free: the VG's tag says how much.
        let tags = vm.ssh_ok("vgs --noheadings -o vg_tags VA")?;
        let reserve: f64 = tags
            .trim()
            .split(',')
            .find_map(|t| t.strip_prefix("dualroot_reserve_mib_"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1.0);
        sc.check(
            "data and image grew into the VG's free space beyond the slot reserve (lvs, vg_tags)",
            size("data") > 512.0 && size("image") > 64.0 && reserve > 0.0 && (free - reserve).abs() < 8.0,
            &format!(
                "data {} MiB (plan 512), image {} MiB (plan 64), VG free {free} MiB, reserve tag {reserve} MiB ({})",
                size("data"),
                size("image"),
                tags.trim()
            ),
        )?;
        let df_sizes: Vec<f64> = df
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        sc.check(
            "their ext4 filesystems were resized online",
            df_sizes.len() == 2 && df_sizes[0] > 480.0 && df_sizes[1] > 64.0,
            &df,
        )?;
        vm.shutdown(Duration::from_secs(120))?;
        out = Some(Base {
            disk: sc.path("disk.qcow2"),
            payload,
        });
        Ok(())
    });
    let b = out.context("the base scenario recorded no disk")?;
    *BASE.lock().unwrap_or_else(|e| e.into_inner()) = Some(b.clone());
    Ok(b)
}

/// A VM on an overlay of the migrated base disk, booted and reachable.
fn migrated_vm(sc: &Scenario, base: &Base) -> Result<(Vm, String)> {
    let (disk, fmt) = overlay_on(&base.disk, "qcow2", &sc.path("disk.qcow2"))?;
    let cfg = VmConfig::default()
        .disk(&disk, fmt)
        .disk(&base.payload, "raw");
    let mut vm = sc.vm("appliance", cfg)?;
    let v = boot_new(sc, &mut vm)?;
    mount_payload(&vm)?;
    Ok((vm, v))
}

fn install_upgrade(sc: &Scenario, vm: &Vm) -> Result<Value> {
    let out = vm.ssh_ok(&format!(
        "{DUALROOT} slot install {UPGRADE} --json 2>/root/install.log"
    ))?;
    dualroot_api::decode::<dualroot_api::InstallReport>("slot install --json", &out)
        .map_err(qemu_tests::Error::msg)?;
    let r: Value = serde_json::from_str(&out).context("parsing slot install --json")?;
    println!("[{}] slot install: {r}", sc.name);
    sc.check(
        "slot install put the bundle into slot b",
        r["slot"] == "b"
            && r["state"] == "installed"
            && r["version"].as_str().is_some_and(|v| v.ends_with(".2")),
        &format!(
            "slot {} {} in {:.0} s",
            r["slot"],
            r["version"],
            r["seconds"].as_f64().unwrap_or(0.0)
        ),
    )?;
    let st = slot_status(vm)?;
    sc.check(
        "status: slot b installed, slot a booted and primary",
        slot(&st, "b")["state"] == "installed" && st["booted"] == "a" && st["primary"] == "a",
        &st["slots"].to_string(),
    )?;
    Ok(r)
}

#[test]
#[ignore = "boots VMs (about 30 minutes under TCG)"]
fn ab_slots() {
    let base = base().unwrap_or_else(|e| panic!("base: {e}"));
    install_switch_confirm(&base);
    fallback_when_init_fails(&base);
    power_cut_during_install(&base);
}

fn install_switch_confirm(base: &Base) {
    scenario::run("ab-install-switch-confirm", |sc| {
        let (mut vm, v1) = migrated_vm(sc, base)?;
        // The health check the new slot must pass: carried with /etc/dualroot.
        vm.ssh_ok("printf 'units = [\"ssh.service\"]\\ncommand = \"test -s /etc/dualroot-test-version\"\\n' >/etc/dualroot/health.toml")?;
        let refused = vm.ssh(&format!("{DUALROOT} slot switch"))?;
        sc.check(
            "switch to an empty slot is refused",
            !refused.success() && refused.stderr.contains("slot b is empty"),
            refused.stderr.trim(),
        )?;
        install_upgrade(sc, &vm)?;
        let sw = vm.ssh_ok(&format!("{DUALROOT} slot switch b"))?;
        println!("[{}] {}", sc.name, sw.trim());
        vm.mark_console();
        let _ = vm.ssh("systemctl reboot");
        let v2 = boot_new(sc, &mut vm)?;
        sc.check(
            "slot b (the new version) booted",
            v2 != v1 && v2.ends_with(".2"),
            &format!("{v1} -> {v2}"),
        )?;
        let st = wait_status(&vm, "slot b confirmed", |s| slot(s, "b")["state"] == "good")?;
        sc.check(
            "status: booted b, primary b, b good, a good",
            st["booted"] == "b"
                && st["primary"] == "b"
                && slot(&st, "a")["state"] == "good"
                && st["last_boot_was_fallback"] == false,
            &st.to_string(),
        )?;
        let health = vm.ssh_ok(
            "journalctl -b -u dualroot-confirm.service --no-pager -o cat | grep 'health check'",
        )?;
        sc.check(
            "the health check ran the configured unit and command",
            health.contains("unit ssh.service active")
                && health.contains("test -s /etc/dualroot-test-version"),
            health.trim(),
        )?;
        let root = vm.ssh_ok(
            "findmnt -n -o SOURCE /; hostname; stat -c '%U' /home/admin/notes/readme.txt",
        )?;
        sc.check(
            "root on VA-back, identity and carried files kept",
            root.contains("/dev/mapper/VA-back") && root.lines().nth(2) == Some("admin"),
            &root.replace('\n', " "),
        )?;
        let text = vm.ssh_ok(&format!("{DUALROOT} slot status"))?;
        println!("[{}] slot status:\n{text}", sc.name);
        vm.shutdown(Duration::from_secs(120))
    });
}

fn fallback_when_init_fails(base: &Base) {
    scenario::run("ab-fallback-when-init-fails", |sc| {
        let (mut vm, v1) = migrated_vm(sc, base)?;
        install_upgrade(sc, &vm)?;
        // Break the new slot's init (the kernel panics when PID 1 exits; panic=10
        // reboots). Done from the running system after install, at the process
        // boundary a bad image would cross.
        vm.ssh_ok("mkdir -p /mnt/b && mount /dev/VA/back /mnt/b && rm -f /mnt/b/usr/sbin/init && printf '#!/bin/sh\\necho DUALROOT-TEST-INIT-EXITS\\nexit 1\\n' >/mnt/b/usr/sbin/init && chmod 755 /mnt/b/usr/sbin/init && umount /mnt/b")?;
        vm.ssh_ok(&format!("{DUALROOT} slot switch --tries 3"))?;
        vm.mark_console();
        let t0 = Instant::now();
        let _ = vm.ssh("systemctl reboot");
        let v = boot_new(sc, &mut vm)?;
        let console = vm.console_text();
        let tries = console.matches("DUALROOT-TEST-INIT-EXITS").count();
        println!(
            "[{}] back up after {:.0} s",
            sc.name,
            t0.elapsed().as_secs_f64()
        );
        sc.check(
            "slot b's init failed on 3 boots, then GRUB booted slot a by itself",
            v == v1 && tries == 3,
            &format!("{tries} failed boots of b, then version {v}"),
        )?;
        let st = slot_status(&vm)?;
        sc.check(
            "status reports the fallback from b after 3 tries",
            st["booted"] == "a"
                && st["primary"] == "a"
                && st["fallback_from"] == "b"
                && st["fallback_tries_used"] == 3
                && st["last_boot_was_fallback"] == true
                && slot(&st, "b")["state"] == "bad",
            &st.to_string(),
        )?;
        let text = vm.ssh_ok(&format!("{DUALROOT} slot status"))?;
        println!("[{}] slot status:\n{text}", sc.name);
        vm.shutdown(Duration::from_secs(120))
    });
}

fn power_cut_during_install(base: &Base) {
    scenario::run("ab-power-cut-during-install", |sc| {
        let (mut vm, v1) = migrated_vm(sc, base)?;
        vm.mark_console();
        vm.ssh_ok(&format!(
            "nohup {DUALROOT} slot install {UPGRADE} >/root/install.log 2>&1 </dev/null &"
        ))?;
        vm.wait_for_console("into slot b (LV", Duration::from_secs(300))?;
        std::thread::sleep(Duration::from_secs(8));
        let log = vm.ssh_ok("tail -c 300 /root/install.log")?;
        vm.power_cut()?;
        println!(
            "[{}] power cut 8 s into the install; log tail: {}",
            sc.name,
            log.replace('\n', " | ")
        );
        sc.check(
            "the install was still running at the cut",
            !log.contains("installed:"),
            "install.log",
        )?;
        vm.restart()?;
        let v = boot_new(sc, &mut vm)?;
        let st = slot_status(&vm)?;
        sc.check(
            "slot a booted; slot b is reported not installed",
            v == v1
                && st["booted"] == "a"
                && slot(&st, "b")["state"] == "empty"
                && slot(&st, "b")["version"].is_null(),
            &st["slots"].to_string(),
        )?;
        mount_payload(&vm)?;
        install_upgrade(sc, &vm)?;
        vm.shutdown(Duration::from_secs(120))
    });
}

/// Issue 23 item 9 (`trust` scenario b): a kernel update inside the good slot
/// whose new kernel cannot boot (here the slot's own kernel with an initramfs of
/// random bytes: no root device, kernel panic, `panic=` reboots). GRUB tries
/// the new pair `grub::KERNEL_TRIES` (3) times, then boots the slot's previous
/// kernel by itself, and `slot status` says so. Before kernel pairs, the broken
/// kernel replaced the only one and the good slot looped forever.
#[test]
#[ignore = "boots VMs (about 15 minutes under TCG, plus the migrated base)"]
fn trust_kernel_update_that_panics_falls_back_to_the_previous_kernel() {
    let base = base().unwrap_or_else(|e| panic!("base: {e}"));
    scenario::run("trust-kernel-update-fallback", |sc| {
        let (mut vm, v1) = migrated_vm(sc, &base)?;
        wait_status(&vm, "slot a confirmed", |s| slot(s, "a")["state"] == "good")?;
        let old_kernel = vm.ssh_ok("cat /boot/a/kernel-version")?.trim().to_string();
        vm.ssh_ok(
            "cp /boot/a/vmlinuz /boot/vmlinuz-9.9.9-broken && head -c 65536 /dev/urandom >/boot/initrd.img-9.9.9-broken && sync",
        )?;
        let out = vm.ssh_ok(&format!(
            "{DUALROOT} slot update-boot --kernel 9.9.9-broken"
        ))?;
        sc.check(
            "update-boot puts the new kernel in the slot's other pair, on trial",
            out.contains("tries kernel 9.9.9-broken (pair 1"),
            out.trim(),
        )?;
        vm.mark_console();
        let t0 = Instant::now();
        let _ = vm.ssh("systemctl reboot");
        let v = boot_new(sc, &mut vm)?;
        // The whole console, as ab-fallback counts its failed boots (the text
        // since the mark did not hold the earlier boots' panics); the first
        // boot of this VM had none.
        let console = vm.console_text();
        let panics = console.matches("Kernel panic - not syncing").count();
        sc.note("kernel_panics", &panics.to_string());
        sc.note(
            "back_after_s",
            &format!("{:.0}", t0.elapsed().as_secs_f64()),
        );
        let cmdline = vm.ssh_ok("cat /proc/cmdline")?;
        sc.check(
            "the new kernel failed 3 boots, then GRUB booted the slot's previous kernel",
            panics == 3
                && v == v1
                && cmdline.contains("dualroot.slot=a")
                && cmdline.contains("dualroot.kpair=0"),
            &format!("{panics} kernel panics; version {v}; {}", cmdline.trim()),
        )?;
        let st = wait_status(&vm, "slot a confirmed again", |s| {
            slot(s, "a")["state"] == "good"
        })?;
        sc.check(
            "status: slot a good on its previous kernel, the kernel update reported as fallen back",
            st["booted"] == "a"
                && slot(&st, "a")["kernel_fell_back"] == true
                && slot(&st, "a")["kernel"] == old_kernel.as_str(),
            &slot(&st, "a").to_string(),
        )?;
        let text = vm.ssh_ok(&format!("{DUALROOT} slot status"))?;
        sc.check(
            "slot status says it in words",
            text.contains("did not come up"),
            text.trim(),
        )?;
        // The next boot goes straight to the previous kernel: no loop.
        let _ = vm.ssh("systemctl reboot");
        boot_new(sc, &mut vm)?;
        let again = vm
            .console_text()
            .matches("Kernel panic - not syncing")
            .count();
        sc.check(
            "one more reboot boots the previous kernel without a failed try",
            again == panics,
            &format!("{again} kernel panics in all, {panics} before this reboot"),
        )?;
        vm.shutdown(Duration::from_secs(120))
    });
}

/// Issue 23 item 5 (`trust` scenario c): after the migration's first confirmed
/// boot the stash is gone (only the journal, log, manifest and plan stay, in a
/// 0700 directory), and no file under /data that others can read holds a
/// password hash, a private key or a token.
#[test]
#[ignore = "boots VMs (about 5 minutes under TCG, plus the migrated base)"]
fn trust_stash_is_gone_and_data_holds_no_readable_secret() {
    let base = base().unwrap_or_else(|e| panic!("base: {e}"));
    scenario::run("trust-stash-cleared", |sc| {
        let (mut vm, _) = migrated_vm(sc, &base)?;
        wait_status(&vm, "slot a confirmed", |s| slot(s, "a")["state"] == "good")?;
        // One line of names, then one mode per line (the `echo` ends the names'
        // line: without it the first mode was read as a file name).
        let stash = vm.ssh_ok("ls -A /data/dualroot/migration | sort | tr '\\n' ' '; echo; stat -c '%a' /data/dualroot/migration /data/dualroot")?;
        let names: Vec<&str> = stash
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        sc.check(
            "the stash keeps only journal, log, manifest and plan, root's alone",
            names.iter().all(|n| {
                [
                    "journal.json",
                    "migration.log",
                    "manifest.toml",
                    "plan.toml",
                ]
                .contains(n)
            }) && !names.contains(&"carry.tar")
                && !names.contains(&"os.bundle")
                && stash.lines().skip(1).all(|m| m.trim() == "700"),
            &stash.replace('\n', " "),
        )?;
        let readable = vm.ssh_ok(
            "find /data -xdev -type f -perm -004 -exec grep -lE '\\$(1|5|6|y)\\$|PRIVATE KEY|\"token\"' {} + 2>/dev/null; true",
        )?;
        sc.check(
            "no file under /data readable by others holds a secret",
            readable.trim().is_empty(),
            if readable.trim().is_empty() {
                "none"
            } else {
                readable.trim()
            },
        )?;
        vm.shutdown(Duration::from_secs(120))
    });
}

/// Issue 23 item 8 (`trust` scenario a): while the booted slot is `trying`
/// (its health check has not passed yet), `slot install` is refused with the
/// reason and nothing changes: GRUB falls back only to a good slot.
#[test]
#[ignore = "boots VMs (about 12 minutes under TCG, plus the migrated base)"]
fn trust_slot_install_is_refused_while_the_booted_slot_is_trying() {
    let base = base().unwrap_or_else(|e| panic!("base: {e}"));
    scenario::run("trust-install-refused-while-trying", |sc| {
        let (mut vm, _) = migrated_vm(sc, &base)?;
        // Slot b's health check takes minutes, so b stays `trying` meanwhile.
        vm.ssh_ok(
            "printf 'command = \"sleep 240\"\\ntimeout_secs = 600\\n' >/etc/dualroot/health.toml",
        )?;
        install_upgrade(sc, &vm)?;
        vm.ssh_ok(&format!("{DUALROOT} slot switch b"))?;
        vm.mark_console();
        let _ = vm.ssh("systemctl reboot");
        boot_new(sc, &mut vm)?;
        mount_payload(&vm)?;
        let st = slot_status(&vm)?;
        sc.check(
            "slot b booted and is still trying",
            st["booted"] == "b" && slot(&st, "b")["state"] == "trying",
            &st.to_string(),
        )?;
        let env_before = vm.ssh_ok("cat /boot/grub/grubenv")?;
        let r = vm.ssh(&format!("{DUALROOT} slot install {UPGRADE}"))?;
        sc.check(
            "slot install is refused while the booted slot is trying, naming why",
            !r.success()
                && r.stderr.contains("not confirmed good")
                && r.stderr.contains("Nothing was changed"),
            r.stderr.trim(),
        )?;
        let env_after = vm.ssh_ok("cat /boot/grub/grubenv")?;
        let st2 = slot_status(&vm)?;
        sc.check(
            "nothing changed: the environment block and slot a",
            env_before == env_after && slot(&st2, "a")["state"] == "good",
            &slot(&st2, "a").to_string(),
        )?;
        vm.shutdown(Duration::from_secs(120))
    });
}
