//! Never brick (issue 12): every room rule is checked before anything is
//! written, a refused `stage` takes back an entry an earlier `stage` armed, and a
//! power cut while the bundle is copied after the recovery entry exists ends in a
//! recovery boot that says so and powers off. Opt-in (minutes under TCG):
//! `qemu-tests/run-scenarios.sh never_brick`.

mod common;

use common::*;
use qemu_tests::qemu::Vm;
use qemu_tests::scenario::{self, Scenario};
use qemu_tests::Result;
use std::time::Duration;

/// Reboots the old system and waits until it is up again (never the migration).
fn reboot_into_old(sc: &Scenario, vm: &mut Vm, nth: u32) -> Result<()> {
    vm.mark_console();
    let _ = vm.ssh("systemctl reboot");
    vm.wait_for_console_any(
        &[BOOTED],
        &[DONE, REFUSED, RETRY, GAVE_UP, "dualroot migration"],
        Duration::from_secs(600),
    )?;
    vm.wait_for_ssh(Duration::from_secs(180))?;
    let osr = vm.ssh_ok("grep VERSION_ID /etc/os-release")?;
    sc.check(
        &format!("reboot {nth}: the old system (Debian 11) booted, no migration ran"),
        osr.contains("\"11\""),
        osr.trim(),
    )
}

/// `dualroot stage` with the reference plan changed by `sed`: must fail, name
/// `expect`, and leave nothing armed.
fn refused_stage(sc: &Scenario, vm: &Vm, sed: &str, expect: &str) -> Result<()> {
    let out = vm.ssh(&format!(
        "sed '{sed}' {PLAN} > /root/changed-plan.toml && dualroot stage --plan /root/changed-plan.toml 2>&1"
    ))?;
    let text = format!("{}{}", out.stdout, out.stderr);
    println!("[{}] stage with `{sed}`:\n{text}", sc.name);
    sc.check(
        &format!("stage refused ({sed}) naming the sizes"),
        out.code != Some(0) && text.contains(expect),
        text.lines()
            .find(|l| l.contains(expect))
            .unwrap_or("(not named)"),
    )?;
    sc.check(
        "the refusal says the next boot is the old system",
        text.contains("the next boot is the old system"),
        "stage output",
    )?;
    let armed = vm.ssh_ok(
        "grub-editenv /boot/grub/grubenv list; grep -l dualroot-migrate /boot/grub/custom.cfg 2>/dev/null; true",
    )?;
    sc.check(
        "no one-shot migration entry is armed (next_entry unset, custom.cfg without it)",
        !armed.contains("next_entry=") && !armed.contains("custom.cfg"),
        armed.trim(),
    )
}

#[test]
#[ignore = "boots VMs (about 10 minutes under TCG)"]
fn never_brick_stage_refuses_small_data_and_root() {
    scenario::run("never-brick-stage-refusals", |sc| {
        let mut vm = sc.vm("appliance", appliance(sc, BundleKind::Good, 1024)?)?;
        boot_old(sc, &mut vm)?;
        let table = vm.ssh_ok("sfdisk -J /dev/vda")?;
        // A good stage first: its one-shot entry is what a later refusal must take back.
        let staged = install_and_stage(&vm, &[])?;
        sc.check(
            "a first stage armed the migration",
            staged.contains("staged plan"),
            "stage output",
        )?;
        // (a) data smaller than the bundle
        refused_stage(
            sc,
            &vm,
            r#"s/^data = .*/data = "64M"/"#,
            "sizes.data is 64 MiB but the stash needs",
        )?;
        // (b) root smaller than the unpacked payload (~380 MiB + ext4 room)
        refused_stage(
            sc,
            &vm,
            r#"s/^root = .*/root = "300M"/"#,
            "sizes.root is 300 MiB but the new OS needs",
        )?;
        reboot_into_old(sc, &mut vm, 1)?;
        reboot_into_old(sc, &mut vm, 2)?;
        let after = vm.ssh_ok("sfdisk -J /dev/vda")?;
        sc.check(
            "partition table unchanged",
            after == table,
            "sfdisk -J identical",
        )?;
        vm.shutdown(Duration::from_secs(120))
    });
}

#[test]
#[ignore = "boots VMs (about 10 minutes under TCG)"]
fn never_brick_power_cut_while_stashing_reports_and_powers_off() {
    scenario::run("never-brick-cut-in-stash", |sc| {
        let mut vm = sc.vm("appliance", appliance(sc, BundleKind::Good, 1024)?)?;
        boot_old(sc, &mut vm)?;
        install_and_stage(&vm, &["rd.dualroot.powercut=stash"])?;
        vm.mark_console();
        let _ = vm.ssh("systemctl reboot");
        vm.wait_for_console_any(
            &["recovery entry installed"],
            &[DONE, REFUSED, GAVE_UP],
            Duration::from_secs(1200),
        )?;
        vm.wait_for_console_any(
            &["failpoint: power cut in step stash"],
            &[DONE, REFUSED, GAVE_UP],
            Duration::from_secs(600),
        )?;
        println!(
            "[{}] the guest reset itself while stashing the bundle",
            sc.name
        );
        // The reset boots the recovery entry (the disk shows something), which
        // finds the stash incomplete, says so and powers off instead of looping.
        vm.wait_for_console_any(
            &[GAVE_UP],
            &[DONE, "Kernel panic"],
            Duration::from_secs(900),
        )?;
        let console = vm.console_text();
        sc.check(
            "the recovery boot ran and resumed from the journal",
            console.contains("resuming the migration"),
            "console",
        )?;
        sc.check(
            "it names the incomplete stash and what happens next",
            console.contains("is incomplete") && console.contains("powers off"),
            console
                .lines()
                .find(|l| l.contains("is incomplete"))
                .unwrap_or("(not found)"),
        )?;
        let status = vm.wait_exit(Duration::from_secs(300))?;
        sc.check(
            "the machine powered off (no reboot loop)",
            true,
            &format!("{status:?}"),
        )
    });
}
