//! Never brick (issue 12): every room rule is checked before anything is
//! written, a refused `stage` takes back an entry an earlier `stage` armed, and a
//! power cut while the bundle is copied after the recovery entry exists ends in a
//! recovery boot that says so and powers off. No recovery loop (issue 21): a step
//! that always fails ends powered off (or in the old system) after at most one
//! recovery boot. Opt-in (minutes under TCG):
//! `qemu-tests/run-scenarios.sh never_brick recovery_loop`.

mod common;

use common::*;
use qemu_tests::parse;
use qemu_tests::qemu::{scaled, Vm};
use qemu_tests::scenario::{self, Scenario};
use qemu_tests::{Context, Result};
use std::time::{Duration, Instant};

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

/// How a migration whose step can never succeed ended.
enum LoopEnd {
    /// `DUALROOT-MIGRATION-GAVE-UP` and QEMU exited (powered off).
    PoweredOff,
    /// The old system booted (the migration undid itself).
    OldSystem,
}

/// Watches one QEMU run from the mark on (guest reboots stay in it, each boot
/// printing its kernel command line) until the machine powers off after giving
/// up or the old system boots. Fails as soon as a second recovery boot starts,
/// when the migration claims success, on a kernel panic, or at the deadline.
fn watch_for_loop(sc: &Scenario, vm: &mut Vm, timeout: Duration) -> Result<(LoopEnd, usize)> {
    let deadline = Instant::now() + scaled(timeout);
    let mut gave_up_at: Option<Instant> = None;
    let mut seen_boots = 0;
    loop {
        let text = vm.console_since_mark();
        let boots = parse::recovery_boots(&text);
        if boots != seen_boots {
            println!("[{}] recovery boot {boots} started", sc.name);
            seen_boots = boots;
        }
        if boots > 1 {
            return Err(vm.fail(format!(
                "a second recovery boot started ({boots} kernel command lines with rd.dualroot.resume=1): the recovery entry loops"
            )));
        }
        for bad in [DONE, parse::KERNEL_PANIC] {
            if text.contains(bad) {
                return Err(vm.fail(format!("console showed {bad:?} with volumes failing")));
            }
        }
        if text.contains(BOOTED) {
            return Ok((LoopEnd::OldSystem, boots));
        }
        if !vm.is_running() {
            if text.contains(GAVE_UP) {
                return Ok((LoopEnd::PoweredOff, boots));
            }
            return Err(vm.fail(format!(
                "QEMU exited without {GAVE_UP} after {boots} recovery boot(s)"
            )));
        }
        if gave_up_at.is_none() && text.contains(GAVE_UP) {
            gave_up_at = Some(Instant::now());
        }
        if gave_up_at.is_some_and(|t| t.elapsed() > scaled(Duration::from_secs(300))) {
            return Err(vm.fail(format!(
                "{GAVE_UP} shown but the machine did not power off within 300 s"
            )));
        }
        if Instant::now() >= deadline {
            return Err(vm.fail(format!(
                "neither powered off nor the old system after {} s ({boots} recovery boot(s))",
                scaled(timeout).as_secs()
            )));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
#[ignore = "boots VMs (about 15 minutes under TCG)"]
fn recovery_loop_volumes_always_fails() {
    // Issue 21: a step that fails every time after the point of no return (here
    // `volumes`, by its failpoint) must end, never loop: powered off with the
    // reason in /boot/dualroot/journal.json, or the old system back, after at
    // most one recovery boot.
    scenario::run("recovery-loop-volumes", |sc| {
        let mut vm = sc.vm("appliance", appliance(sc, BundleKind::Good, 1024)?)?;
        boot_old(sc, &mut vm)?;
        let staged = install_and_stage(&vm, &["rd.dualroot.failpoint=volumes,no-undo"])?;
        sc.check(
            "stage armed the migration with the volumes failpoint",
            staged.contains("staged plan"),
            "stage output",
        )?;
        vm.mark_console();
        let _ = vm.ssh("systemctl reboot");
        let (end, boots) = watch_for_loop(sc, &mut vm, Duration::from_secs(2400))?;
        let console = vm.console_since_mark();
        sc.note("recovery_boots", &boots.to_string());
        sc.check(
            "the failpoint made volumes fail",
            console.contains("failpoint volumes armed"),
            console
                .lines()
                .find(|l| l.contains("failpoint volumes"))
                .unwrap_or("(not on the console)"),
        )?;
        sc.check("at most one recovery boot", boots <= 1, &format!("{boots}"))?;
        match end {
            LoopEnd::PoweredOff => {
                sc.check("it gave up and powered off", true, GAVE_UP)?;
                // The disk the VM used, read from the host now that QEMU is gone:
                // /boot is partition 2 of the new GPT.
                let disk = vm.config().disks[0].clone();
                let journal = qemu_tests::disk::read_partition_file(
                    &disk.path,
                    &disk.format,
                    2,
                    "/dualroot/journal.json",
                    &sc.path("inspect"),
                )?;
                let j: serde_json::Value = serde_json::from_slice(&journal)
                    .context("parsing /boot/dualroot/journal.json")?;
                let volumes = j["steps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s["step"] == "volumes")
                    .cloned()
                    .unwrap_or_default();
                let error = volumes["error"].as_str().unwrap_or_default();
                let outcome = j["outcome"].as_str().unwrap_or_default();
                println!(
                    "[{}] journal: outcome {outcome:?}; volumes {}",
                    sc.name, volumes
                );
                sc.check(
                    "/boot/dualroot/journal.json names the volumes step and the failpoint error",
                    volumes["state"] == "failed"
                        && error.contains("failpoint volumes")
                        && outcome.contains("volumes"),
                    &format!("outcome {outcome:?}, volumes error {error:?}"),
                )
            }
            LoopEnd::OldSystem => {
                vm.wait_for_ssh(Duration::from_secs(180))?;
                let osr = vm.ssh_ok("grep VERSION_ID /etc/os-release")?;
                sc.check(
                    "the old system (Debian 11) booted",
                    osr.contains("\"11\""),
                    osr.trim(),
                )?;
                let result = vm.ssh_ok("cat /var/lib/dualroot/migration-result.json")?;
                sc.check(
                    "the old system's migration result names the volumes step",
                    result.contains("volumes"),
                    result.trim(),
                )?;
                vm.shutdown(Duration::from_secs(120))
            }
        }
    });
}
