//! The reference migration with its checks, run by migration.rs (the reference
//! appliance, the CentOS 7 layout, the dracut bundle) and matrix.rs (the other
//! rows of the matrix): the old system's own `dualroot stage`, the migration, the
//! new OS confirmed good, and what must hold on it afterwards. A row adds its own
//! checks through the `before` (old system) and `after` (new OS) hooks.

use super::*;
use qemu_tests::qemu::{Firmware, Vm, MAC_ETH0, MAC_ETH1, OVMF_VARS_MS};
use qemu_tests::scenario::Scenario;
use qemu_tests::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Facts that must survive the migration.
pub struct Identity {
    pub hostname: String,
    pub host_keys: String,
    pub machine_id: String,
}

pub fn identity(vm: &Vm) -> Result<Identity> {
    Ok(Identity {
        hostname: vm.ssh_ok("hostname")?.trim().into(),
        host_keys: vm.ssh_ok("for k in /etc/ssh/ssh_host_*_key; do ssh-keygen -lf $k.pub; stat -c '%n %a %U:%G' $k; done")?,
        machine_id: vm.ssh_ok("cat /etc/machine-id")?.trim().into(),
    })
}

pub fn password_login(vm: &Vm, user: &str, password: &str, command: &str) -> Result<String> {
    let out = Command::new("sshpass")
        .args(["-p", password, "ssh", "-p", &vm.ssh_port().to_string()])
        .args(qemu_tests::qemu::SSH_THROWAWAY_HOST)
        .args([
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
        ])
        .arg(format!("{user}@127.0.0.1"))
        .arg(command)
        .output()
        .context("running sshpass (package sshpass)")?;
    if !out.status.success() {
        qemu_tests::bail!(
            "password login as {user} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `/boot/dualroot/journal.json` of a migrated guest, checked to say `done`.
pub fn journal_done(sc: &Scenario, vm: &Vm) -> Result<serde_json::Value> {
    let journal = vm.ssh_ok("cat /boot/dualroot/journal.json")?;
    let j: serde_json::Value = serde_json::from_str(&journal).context("parsing the journal")?;
    sc.check(
        "journal says done",
        j["outcome"] == "done",
        &j["outcome"].to_string(),
    )?;
    Ok(j)
}

/// One run of the reference migration.
pub struct Reference<'a> {
    pub old: Old,
    /// Another bundle than the reference one (`images::bundle()`), staged by
    /// `stage` over the prepared state's.
    pub bundle: Option<&'a Path>,
    /// The tool the migration rebuilds the slot's initramfs with, as its log
    /// line says it (`update-initramfs`, `dracut`).
    pub initramfs_tool: &'a str,
    /// More files on the payload disk (source, path on the payload).
    pub extra: Vec<(PathBuf, &'a str)>,
    /// UEFI with Secure Boot enforcing: OVMF's Secure Boot build with
    /// Microsoft's keys enrolled, fresh NVRAM (no boot entries) ([`Old::Efi`]).
    pub secure_boot: bool,
}

impl Reference<'_> {
    /// The reference bundle on `old`.
    pub fn on(old: Old) -> Reference<'static> {
        Reference {
            old,
            bundle: None,
            initramfs_tool: "update-initramfs",
            extra: Vec::new(),
            secure_boot: false,
        }
    }
}

/// Boots the prepared old system `r.old`, runs `before` on it (the row's own
/// preconditions; its result goes to `after`), stages the migration with the
/// old system's own `dualroot stage`, reboots into it, and on the new OS runs
/// the reference checks (layout, OS, identity, accounts, NICs, journal, slot a
/// confirmed good; on an LVM layout also: old VG gone, swap not carried, /boot
/// the new ext4), then `after`, then powers off.
pub fn migrate_with_reference_checks<T>(
    sc: &Scenario,
    r: &Reference,
    before: impl FnOnce(&Scenario, &Vm) -> Result<T>,
    after: impl FnOnce(&Scenario, &Vm, T) -> Result<()>,
) -> Result<()> {
    let old = r.old;
    let mut cfg = appliance_with_on(sc, old, BundleKind::Good, 1024, &r.extra, r.bundle, None)?;
    if r.secure_boot {
        cfg.firmware = Firmware::uefi_from(
            std::path::Path::new(OVMF_VARS_MS),
            &sc.path("vars.fd"),
            true,
        )?;
    }
    let mut vm = sc.vm("appliance", cfg)?;
    boot_old(sc, &mut vm)?;
    let before_id = identity(&vm)?;
    let layout_before = vm.ssh_ok("lsblk -o NAME,SIZE,TYPE,FSTYPE,MOUNTPOINT /dev/vda")?;
    println!("[{}] layout before:\n{layout_before}", sc.name);
    let capture = vm.ssh_ok(CAPTURE_LAYOUT)?;
    println!(
        "[{}] layout capture (fixtures/tool-output):\n{capture}",
        sc.name
    );
    let row = before(sc, &vm)?;
    let preflight = vm.ssh_ok("sh /mnt/payload/install.sh >/dev/null && dualroot preflight --no-accounts --plan /var/lib/dualroot/stage/plan.toml --json")?;
    let p: serde_json::Value =
        serde_json::from_str(&preflight).context("parsing preflight --json")?;
    println!("[{}] preflight source layout: {}", sc.name, p["source"]);
    sc.check(
        "preflight detects the old layout",
        p["source"]["root"]["kind"] == old.root_kind()
            && p["source"]["disk"] == "/dev/vda"
            && (!old.on_lvm() || p["source"]["boot"] == old.boot_part()),
        &p["source"].to_string(),
    )?;
    let staged = vm.ssh_ok(&format!(
        "sh /mnt/payload/install.sh && dualroot stage --plan {PLAN} 2>&1"
    ))?;
    println!("[{}] stage:\n{staged}", sc.name);
    sc.check(
        "stage ran preflight and set the one-shot entry",
        staged.contains("ready to migrate") && staged.contains("staged plan"),
        "stage output",
    )?;

    vm.mark_console();
    let t0 = Instant::now();
    let _ = vm.ssh("systemctl reboot");
    vm.wait_for_console_any(
        &[DONE],
        &[REFUSED, RETRY, GAVE_UP, "Kernel panic"],
        Duration::from_secs(1800),
    )?;
    let migrate_secs = t0.elapsed().as_secs_f64();
    vm.wait_for_console(BOOTED, Duration::from_secs(600))?;
    vm.wait_for_ssh(Duration::from_secs(300))?;
    println!(
        "[{}] migrated and booted the new OS in {migrate_secs:.0} s (+ boot)",
        sc.name
    );

    let lsblk = vm.ssh_ok("lsblk -o NAME,SIZE,TYPE,FSTYPE,LABEL,MOUNTPOINT /dev/vda")?;
    println!("[{}] layout after:\n{lsblk}", sc.name);
    // lsblk (util-linux) is on every Debian; sfdisk (fdisk) is not in the new OS.
    let parts = vm
        .ssh_ok("lsblk -n -r -o NAME,PTTYPE,PARTTYPE /dev/vda")?
        .to_lowercase();
    sc.check(
        "GPT with BIOS boot, /boot and an LVM PV",
        parts.contains("vda1 gpt 21686148-6449-6e6f-744e-656564454649")
            && parts.contains("vda2 gpt 0fc63daf-8483-4772-8e79-3d69d8477de4")
            && parts.contains("vda3 gpt e6d6d379-f507-44c2-a23c-238f2a3df928"),
        &parts.replace('\n', ", "),
    )?;
    let pvs = vm.ssh_ok("pvs --noheadings -o pv_name,vg_name")?;
    sc.check(
        "PV vda3 in VG VA",
        pvs.contains("/dev/vda3") && pvs.contains("VA"),
        pvs.trim(),
    )?;
    let lvs = vm.ssh_ok("lvs --noheadings -o lv_name VA | tr -s ' \\n' ' '")?;
    sc.check(
        "LVs root, back, data, image",
        ["root", "back", "data", "image"]
            .iter()
            .all(|l| lvs.split_whitespace().any(|x| x == *l)),
        lvs.trim(),
    )?;
    let mounts = vm.ssh_ok("findmnt -n -o SOURCE /; findmnt -n -o SOURCE /boot")?;
    sc.check(
        "root on VA-root, /boot on vda2",
        mounts.contains("/dev/mapper/VA-root") && mounts.contains("/dev/vda2"),
        &mounts.replace('\n', " "),
    )?;
    let osr = vm.ssh_ok("grep VERSION_ID /etc/os-release")?;
    sc.check(
        "/etc/os-release is Debian 13",
        osr.contains("\"13\""),
        osr.trim(),
    )?;
    let rebuilt = vm
        .console_text()
        .lines()
        .rfind(|l| l.contains("rebuilt for this machine with"))
        .unwrap_or_default()
        .to_string();
    sc.check(
        "the slot's initramfs was rebuilt on the appliance with the new OS's own tool",
        rebuilt.contains(&format!("with {}", r.initramfs_tool)),
        rebuilt.trim(),
    )?;

    let after_id = identity(&vm)?;
    sc.check(
        "hostname unchanged",
        after_id.hostname == before_id.hostname,
        &after_id.hostname,
    )?;
    sc.check(
        "SSH host keys unchanged (fingerprints, modes, owners)",
        after_id.host_keys == before_id.host_keys,
        after_id.host_keys.lines().next().unwrap_or(""),
    )?;
    sc.check(
        "machine-id unchanged",
        after_id.machine_id == before_id.machine_id,
        &after_id.machine_id,
    )?;

    let id = password_login(
        &vm,
        "admin",
        "admin-pass-1",
        "id -u; stat -c '%u %U' /home/admin/notes/readme.txt /etc/appliance/appliance.conf",
    )?;
    let mut lines = id.lines();
    let uid = lines.next().unwrap_or_default().to_string();
    sc.check(
        "admin logs in with the old password and has the new OS's UID 1001",
        uid == "1001",
        &uid,
    )?;
    sc.check(
        "admin owns the carried files under the new UID",
        lines.all(|l| l == "1001 admin"),
        &id.replace('\n', " "),
    )?;

    let links =
        vm.ssh_ok("for n in eth0 eth1; do echo $n $(cat /sys/class/net/$n/address); done")?;
    sc.check(
        "eth0 and eth1 kept their MACs",
        links.contains(&format!("eth0 {MAC_ETH0}")) && links.contains(&format!("eth1 {MAC_ETH1}")),
        &links.replace('\n', ", "),
    )?;
    let eth1 = vm.ssh_ok("ip -br -4 addr show dev eth1")?;
    sc.check(
        "eth1 kept its static address (carried /etc/network/interfaces)",
        eth1.contains("10.0.3.15/24"),
        eth1.trim(),
    )?;

    let j = journal_done(sc, &vm)?;
    let status = vm.ssh_ok("/usr/local/sbin/dualroot slot status")?;
    println!("[{}] slot status:\n{status}", sc.name);
    sc.check(
        "booted slot A, confirmed good by the first-boot unit",
        status.contains("booted: a") && status.contains("slot a (root): good"),
        status.lines().nth(1).unwrap_or(""),
    )?;
    // Issue 25: the coincident peak (dualroot RSS + staging tmpfs at one
    // moment) stays within what must be in RAM (staged: bundle, carried files,
    // recovery files), the undo record, and 64 MiB; dualroot's own RSS (the
    // decoder) within 64 MiB.
    let p = &j["peak_memory"];
    let mib = |v: &serde_json::Value| v.as_u64().unwrap_or(u64::MAX) >> 20;
    let (peak, staged, undo) = (
        mib(&p["bytes"]),
        mib(&j["staged_bytes"]),
        mib(&j["undo_bytes"]),
    );
    let rss = mib(&j["peak_rss_bytes"]);
    sc.check(
        "peak memory <= staged + undo record + 64 MiB, dualroot's RSS <= 64 MiB (journal)",
        staged > 0 && peak <= staged + undo + 64 && rss <= 64,
        &format!(
            "peak {peak} MiB during {} (RSS {} + tmpfs {}); staged {staged} MiB (bundle {} MiB), undo record {undo} MiB; highest RSS {rss} MiB",
            p["step"].as_str().unwrap_or("?"),
            mib(&p["rss_bytes"]),
            mib(&p["tmpfs_bytes"]),
            mib(&j["bundle_bytes"])
        ),
    )?;
    // Issue 12: GPT write -> recovery GRUB installed (the unrecoverable
    // window, goal <= 5 s under TCG) and GPT write -> bundle stashed.
    let ponr = j["point_of_no_return_unix"].as_f64().unwrap_or(0.0);
    let window = j["recovery_ready_unix"].as_f64().unwrap_or(0.0) - ponr;
    let stashed = j["stash_done_unix"].as_f64().unwrap_or(0.0) - ponr;
    println!(
        "[{}] unrecoverable window (GPT written -> recovery GRUB installed): {window:.1} s; GPT written -> bundle stashed: {stashed:.1} s",
        sc.name
    );
    // The figures are reported, not asserted: seconds under TCG depend on the
    // load of the host (the goal of <= 5 s is checked in the table/notes).
    sc.check(
        "the journal reports both window figures (GPT -> recovery GRUB, GPT -> bundle stashed)",
        ponr > 0.0 && window > 0.0 && stashed >= window,
        &format!("{window:.1} s / {stashed:.1} s"),
    )?;
    sc.note("window_s", &format!("{window:.1}"));
    sc.note("stashed_s", &format!("{stashed:.1}"));
    for s in j["steps"].as_array().into_iter().flatten() {
        println!(
            "[{}] step {:<10} {:>7.1} s",
            sc.name,
            s["step"].as_str().unwrap_or("?"),
            s["seconds"].as_f64().unwrap_or(0.0)
        );
    }
    if old.on_lvm() {
        let vgs = vm.ssh_ok("vgs --noheadings -o vg_name; pvs --noheadings -o pv_name,vg_name")?;
        sc.check(
            "the old VG centos is gone (only VA is left)",
            !vgs.contains("centos") && vgs.contains("VA"),
            &vgs.split_whitespace().collect::<Vec<_>>().join(" "),
        )?;
        let swap = vm.ssh_ok("grep -c swap /etc/fstab || true; swapon --noheadings --show=NAME")?;
        sc.check(
            "the old swap LV is not carried as a mount",
            swap.trim() == "0",
            &swap.replace('\n', " "),
        )?;
        let boot = vm.ssh_ok("findmnt -n -o SOURCE,FSTYPE /boot")?;
        sc.check(
            "/boot is the new ext4 partition",
            boot.contains("/dev/vda2") && boot.contains("ext4"),
            boot.trim(),
        )?;
    }
    after(sc, &vm, row)?;
    let used = vm.sample_guest_memory()?;
    println!("[{}] guest memory in use: {} MiB", sc.name, used / 1024);
    vm.shutdown(Duration::from_secs(120))
}
