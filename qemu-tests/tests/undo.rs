//! Undo of a failed migration window (issue 22): a step inside the
//! unrecoverable window (`partition`, `recovery`, `volumes`, `stash`) that fails
//! after its disk writes on every attempt makes the migration put the old disk
//! back from its in-RAM undo record and reboot into the old system, which must
//! then be what it was before `stage`: partition table, /boot filesystem UUID,
//! fstab, accounts, every file under /boot and /etc. One scenario per step and
//! layout (the single-partition appliance and the CentOS 7 LVM layout), plus one
//! where the undo itself fails and the machine must power off within one boot.
//! Opt-in (minutes under TCG each): `qemu-tests/run-scenarios.sh undo`.

mod common;

use common::*;
use qemu_tests::parse;
use qemu_tests::qemu::{scaled, Vm};
use qemu_tests::scenario::{self, Scenario};
use qemu_tests::{Context, Result};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Guest memory of the undo scenarios. The undo record is held in RAM next to
/// the staged bundle (~200 MiB): the regions the window overwrites, i.e. with the
/// reference plan about the new /boot (384 MiB) plus the `data` LV (512 MiB) plus
/// the first and last MiB and the old PV labels. With the recovery kernel and
/// initramfs, the margin and the reserve that is ~1.3 GiB; 2560 MiB leaves the
/// initramfs's own userland and page cache room, so preflight takes the record
/// (`auto`) instead of going without it (checked before stage, see `undo_record`).
const UNDO_MEMORY_MIB: u32 = 2560;

/// The LVM layout of these scenarios: the CentOS 7 default layout (XFS /boot on
/// vda1, XFS root and swap LVs of VG `centos` on vda2, fstab by /dev/mapper
/// names, host-only dracut) as the `hostonly` matrix image has it, whose
/// lvm.conf also carries a `global_filter` accepting only /dev/vda2 (that file
/// is in the checksum list too). It is the image the host caches; `Old::Lvm`
/// (`legacy-lvm.sh`) is the same layout without the filter.
const LVM_LAYOUT: Old = Old::MatrixHostonly;

/// What `stage` writes under /boot and /etc (the old system never does). A file
/// here may differ after the undo from before `stage`, and only when `stage`
/// did change it (checksum list after stage differs from the one before):
/// - `/boot/dualroot/`: the migration initramfs and its stamp (reused when
///   the inputs are the same, rebuilt otherwise); the undo restores the /boot
///   the migration boot found, so these must equal their state after `stage`.
/// - `/boot/grub/grubenv`: `grub-reboot` sets `next_entry`; GRUB (on ext4), the
///   hook's disarm and the undo clear it, each rewriting the block (dualroot
///   writes it with its own writer): its variables must equal those before
///   `stage`, an emptied `next_entry` aside.
/// - `/boot/grub/custom.cfg`: `stage` adds the migration entry in its own marked
///   block; the undo takes the block out again (the file goes when nothing else
///   is in it): the file must read exactly as before `stage`.
///
/// Nothing else is excluded: /var/lib/dualroot/ (the staged bundle, plan and
/// the result file) is outside /boot and /etc.
const STAGE_WRITES: &[&str] = &[
    "/boot/dualroot/",
    "/boot/grub/grubenv",
    "/boot/grub/custom.cfg",
];

/// Of [`STAGE_WRITES`], what the hook's disarm (and the undo) rewrite after
/// `stage`: checked by content, not against the list after stage.
const DISARMED: &[&str] = &["/boot/grub/grubenv", "/boot/grub/custom.cfg"];

/// Every regular file under /boot and /etc, on their own filesystems, with its sha256.
const CHECKSUMS: &str = "find /boot /etc -xdev -type f -print0 | sort -z | xargs -0 sha256sum";

const RESULT_FILE: &str = "/var/lib/dualroot/migration-result.json";

/// What the old system must have again after the undo, taken before `stage`.
#[derive(Debug, Clone, PartialEq)]
struct OldState {
    /// `sfdisk -d /dev/vda`: label, identifier, every partition.
    table: String,
    /// sha256 of the disk's first MiB (the first partition starts at 1 MiB on
    /// both images): MBR boot code, partition table and GRUB's core.img in the
    /// gap after it.
    head: String,
    /// Device, UUID, type and label of the filesystem holding /boot (the root's
    /// when /boot is not separate).
    boot_fs: String,
    fstab: String,
    passwd: String,
    group: String,
    /// sha256 of /etc/shadow and /etc/gshadow.
    shadow: String,
    /// PVs, VGs and LVs with their UUIDs and sizes (empty without LVM).
    lvm: String,
    /// `grub-editenv list`.
    grubenv: String,
    /// `/boot/grub/custom.cfg`, empty when there is none.
    custom_cfg: String,
    /// path -> sha256 of every regular file under /boot and /etc.
    sums: BTreeMap<String, String>,
    /// On UEFI: sha256 of every file on the ESP, and the firmware's entries and
    /// BootOrder (`efibootmgr` without BootCurrent); empty on BIOS.
    efi: String,
}

fn old_state(vm: &Vm) -> Result<OldState> {
    Ok(OldState {
        table: vm.ssh_ok("sfdisk -d /dev/vda")?,
        head: vm.ssh_ok("dd if=/dev/vda bs=512 count=2048 status=none | sha256sum")?,
        boot_fs: vm.ssh_ok("findmnt -n -o SOURCE,UUID,FSTYPE,LABEL -T /boot")?,
        fstab: vm.ssh_ok("cat /etc/fstab")?,
        passwd: vm.ssh_ok("getent passwd")?,
        group: vm.ssh_ok("getent group")?,
        shadow: vm.ssh_ok("sha256sum /etc/shadow /etc/gshadow")?,
        lvm: vm.ssh_ok(
            "pvs --noheadings -o pv_name,pv_uuid,vg_name,vg_uuid 2>/dev/null; lvs --noheadings -o vg_name,lv_name,lv_uuid,lv_size 2>/dev/null; true",
        )?,
        grubenv: vm.ssh_ok("grub-editenv /boot/grub/grubenv list")?,
        custom_cfg: vm.ssh_ok("cat /boot/grub/custom.cfg 2>/dev/null || true")?,
        sums: checksums(vm)?,
        efi: vm.ssh_ok(EFI_STATE)?,
    })
}

/// [`OldState::efi`].
const EFI_STATE: &str = "if [ -d /sys/firmware/efi ]; then (cd /boot/efi && find . -type f -print0 | sort -z | xargs -0 sha256sum); efibootmgr | grep -v -e '^BootCurrent' -e '^BootNext'; fi";

fn checksums(vm: &Vm) -> Result<BTreeMap<String, String>> {
    Ok(parse::sha256_list(&vm.ssh_ok(CHECKSUMS)?)
        .into_iter()
        .collect())
}

/// The first line where `a` and `b` differ, for a check's detail.
fn first_difference(a: &str, b: &str) -> String {
    let (mut la, mut lb) = (a.lines(), b.lines());
    for n in 1.. {
        match (la.next(), lb.next()) {
            (None, None) => return "identical".into(),
            (x, y) if x != y => {
                return format!(
                    "line {n}: before {:?}, after {:?}",
                    x.unwrap_or("(end)"),
                    y.unwrap_or("(end)")
                )
            }
            _ => {}
        }
    }
    unreachable!()
}

/// `path` is `entry` or, when `entry` ends in `/`, under it.
fn listed(path: &str, entries: &[&str]) -> bool {
    entries.iter().any(|e| {
        if e.ends_with('/') {
            path.starts_with(e)
        } else {
            path == *e
        }
    })
}

/// Differences of a checksum list after the undo from the one before `stage`
/// that [`STAGE_WRITES`] does not explain.
#[derive(Debug, Default, PartialEq)]
struct Unexplained {
    changed: Vec<String>,
    missing: Vec<String>,
    added: Vec<String>,
}

impl Unexplained {
    fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.missing.is_empty() && self.added.is_empty()
    }
}

/// `stage` wrote `path`: it is one of `may_write` and differs (or exists only
/// on one side) between the lists before and after `stage`.
fn stage_wrote(
    path: &str,
    before: &BTreeMap<String, String>,
    staged: &BTreeMap<String, String>,
    may_write: &[&str],
) -> bool {
    listed(path, may_write) && before.get(path) != staged.get(path)
}

/// Every file of `before` identical in `after` and nothing added, except what
/// `stage` wrote under `may_write` (see [`stage_wrote`]).
fn unexplained(
    before: &BTreeMap<String, String>,
    staged: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
    may_write: &[&str],
) -> Unexplained {
    let excused = |p: &str| stage_wrote(p, before, staged, may_write);
    let mut u = Unexplained::default();
    for (p, h) in before {
        match after.get(p) {
            Some(a) if a == h => {}
            _ if excused(p) => {}
            Some(_) => u.changed.push(p.clone()),
            None => u.missing.push(p.clone()),
        }
    }
    u.added = after
        .keys()
        .filter(|p| !before.contains_key(*p) && !excused(p))
        .cloned()
        .collect();
    u
}

/// `grub-editenv list` without an emptied `next_entry` (GRUB's own one-shot
/// clearing on ext4 leaves `next_entry=`).
fn grubenv_vars(list: &str) -> Vec<&str> {
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "next_entry=")
        .collect()
}

/// `custom.cfg` without the block `dualroot stage` marks as its own (from its
/// `### BEGIN dualroot-migrate` line to its `### END dualroot-migrate ###` line).
fn without_stage_block(text: &str) -> String {
    let mut inside = false;
    text.lines()
        .filter(|l| {
            if l.starts_with("### BEGIN dualroot-migrate") {
                inside = true;
            }
            let keep = !inside;
            if l.starts_with("### END dualroot-migrate") {
                inside = false;
            }
            keep
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The console line of the engine's `undone:` report, from `undone:` on.
fn undone_line(console: &str) -> Option<String> {
    console
        .lines()
        .find_map(|l| l.find("undone:").map(|i| l[i..].trim().to_string()))
}

/// The restored size (MiB) and seconds of an `undone:` line: the first number
/// followed by `MiB`, the last one followed by `s` (the engine says e.g.
/// "undone: the old disk is back (901 MiB in 5 regions ...) in 22.7 s; ...").
fn undone_figures(line: &str) -> Option<(u64, f64)> {
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    let mib = words
        .windows(2)
        .find(|w| w[1] == "MiB")
        .and_then(|w| w[0].parse().ok())?;
    let secs = words
        .windows(2)
        .filter(|w| w[1].trim_end_matches([';', ',', '.']) == "s")
        .filter_map(|w| w[0].parse().ok())
        .next_back()?;
    Some((mib, secs))
}

/// Reboots the old system and waits until it is up again: the old OS, no
/// migration initramfs (no hook line), no outcome marker.
fn reboot_into_old(sc: &Scenario, vm: &mut Vm) -> Result<()> {
    vm.mark_console();
    let _ = vm.ssh("systemctl reboot");
    vm.wait_for_console_any(
        &[BOOTED],
        &[
            DONE,
            REFUSED,
            RETRY,
            GAVE_UP,
            UNDONE,
            "dualroot-hook:",
            parse::KERNEL_PANIC,
        ],
        Duration::from_secs(600),
    )?;
    vm.wait_for_ssh(Duration::from_secs(180))?;
    let osr = vm.ssh_ok("grep VERSION_ID /etc/os-release")?;
    sc.check(
        "one more reboot: the old system (Debian 11) booted, no migration ran",
        osr.contains("\"11\""),
        osr.trim(),
    )
}

/// Boots the prepared old system `old`, checks preflight will take the undo
/// record, and stages the migration with `failpoints`; returns the old state
/// before `stage` and the checksum list after it.
fn prepare_and_stage(
    sc: &Scenario,
    vm: &mut Vm,
    failpoints: &str,
) -> Result<(OldState, BTreeMap<String, String>)> {
    boot_old(sc, vm)?;
    // stage's own run of install.sh puts back the same files: taken after it.
    vm.ssh_ok(&format!(
        "sh /mnt/payload/install.sh >/dev/null && rm -f {RESULT_FILE}"
    ))?;
    let before = old_state(vm)?;
    println!(
        "[{}] before stage: {} files under /boot and /etc; /boot on {}; table:\n{}",
        sc.name,
        before.sums.len(),
        before.boot_fs.trim(),
        before.table
    );
    undo_record(sc, vm)?;
    let arg = format!("rd.dualroot.failpoint={failpoints}");
    let staged = install_and_stage(vm, &[&arg])?;
    for l in staged.lines().filter(|l| l.contains("MiB needed")) {
        println!("[{}] stage: {}", sc.name, l.trim());
    }
    sc.check(
        &format!("stage armed the migration with {arg}"),
        staged.contains("staged plan"),
        "stage output",
    )?;
    let staged_sums = checksums(vm)?;
    let wrote: Vec<&String> = before
        .sums
        .keys()
        .chain(staged_sums.keys())
        .filter(|p| before.sums.get(*p) != staged_sums.get(*p))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    println!("[{}] stage wrote under /boot and /etc: {wrote:?}", sc.name);
    Ok((before, staged_sums))
}

/// Preflight on the old system must take the undo record (its memory term is
/// not zero), else the migration would go to the recovery entry instead.
fn undo_record(sc: &Scenario, vm: &Vm) -> Result<()> {
    let out = vm.ssh_ok(&format!(
        "dualroot preflight --no-accounts --plan {PLAN} --json"
    ))?;
    let p: serde_json::Value = serde_json::from_str(&out).context("parsing preflight --json")?;
    let m = &p["memory"];
    let undo = m["undo"].as_u64().unwrap_or(0);
    println!("[{}] preflight memory: {m}", sc.name);
    sc.check(
        &format!("preflight takes the undo record with {UNDO_MEMORY_MIB} MiB of guest memory"),
        undo > 0,
        &format!(
            "undo record {} MiB, needed {} MiB, MemAvailable {} MiB",
            undo >> 20,
            m["needed"].as_u64().unwrap_or(0) >> 20,
            m["mem_available"].as_u64().unwrap_or(0) >> 20
        ),
    )?;
    sc.note("undo_record_mib", &(undo >> 20).to_string());
    Ok(())
}

/// One undo scenario: `step` fails after its writes on every attempt; the old
/// disk must come back as it was before `stage` and boot, twice.
fn undo_scenario(name: &str, old: Old, step: &str) {
    scenario::run(name, |sc| {
        let mut vm = sc.vm(
            "appliance",
            appliance_on(sc, old, BundleKind::Good, UNDO_MEMORY_MIB)?,
        )?;
        let (before, staged) = prepare_and_stage(sc, &mut vm, &format!("{step}:late"))?;

        vm.mark_console();
        let _ = vm.ssh("systemctl reboot");
        let outcomes = [DONE, RETRY, GAVE_UP, REFUSED, parse::KERNEL_PANIC];
        let undo_failed = "undo failed:";
        vm.wait_for_console_any(
            &["undoing"],
            &[&outcomes[..], &[UNDONE, undo_failed]].concat(),
            Duration::from_secs(1800),
        )?;
        let t_undo = Instant::now();
        println!("[{}] the migration started undoing", sc.name);
        vm.wait_for_console_any(
            &[UNDONE],
            &[&outcomes[..], &[undo_failed]].concat(),
            Duration::from_secs(900),
        )?;
        let undo_secs = t_undo.elapsed().as_secs_f64();
        vm.wait_for_console_any(
            &[BOOTED],
            &[
                &outcomes[..],
                &[
                    "dualroot-hook: migration requested",
                    "dualroot-hook: resuming the migration",
                ],
            ]
            .concat(),
            Duration::from_secs(600),
        )?;
        vm.wait_for_ssh(Duration::from_secs(180))?;
        let to_ssh = t_undo.elapsed().as_secs_f64();
        println!(
            "[{}] undoing -> {UNDONE}: {undo_secs:.0} s; undoing -> old system's SSH: {to_ssh:.0} s",
            sc.name
        );
        sc.note("undo_to_ssh_s", &format!("{to_ssh:.0}"));

        let console = vm.console_text();
        let undone = undone_line(&console);
        sc.check(
            "the engine reported the undo (`undone:` with size and seconds)",
            undone.is_some(),
            undone.as_deref().unwrap_or("(no undone: line)"),
        )?;
        let undone = undone.unwrap_or_default();
        println!("[{}] engine: {undone}", sc.name);
        match undone_figures(&undone) {
            Some((mib, secs)) => {
                sc.note("undone_mib", &mib.to_string());
                sc.note("undone_s", &format!("{secs:.1}"));
            }
            // Notes are comma-separated in the table.
            None => sc.note("undone", &undone.replace(',', ";")),
        }

        let after = old_state(&vm)?;
        check_same(sc, &before, &staged, &after)?;
        let reason = check_result(sc, &vm, step)?;

        reboot_into_old(sc, &mut vm)?;
        let table = vm.ssh_ok("sfdisk -d /dev/vda")?;
        sc.check(
            "after that reboot the partition table is still the one before stage",
            table == before.table,
            &first_difference(&before.table, &table),
        )?;
        vm.shutdown(Duration::from_secs(120))?;

        // Last, so that a step failing for another reason (a real error) still
        // shows whether the undo itself held: the failure was the failpoint's,
        // after the step's writes, and the result file carries that error.
        let late = format!("failpoint {step}:late");
        let failed = console
            .lines()
            .filter(|l| l.contains(&format!("step {step} failed")))
            .map(str::trim)
            .collect::<Vec<_>>();
        sc.check(
            &format!("the {step} step failed by its late failpoint"),
            console.contains(&late),
            failed
                .first()
                .copied()
                .unwrap_or("(no failure of the step on the console)"),
        )?;
        sc.check(
            "the result file's reason carries the failpoint error",
            reason.contains(&late),
            &reason,
        )
    });
}

/// The old system after the undo against the one before `stage`.
fn check_same(
    sc: &Scenario,
    before: &OldState,
    staged: &BTreeMap<String, String>,
    after: &OldState,
) -> Result<()> {
    let same = |what: &str, b: &str, a: &str| sc.check(what, a == b, &first_difference(b, a));
    same(
        "partition table (sfdisk -d) as before stage",
        &before.table,
        &after.table,
    )?;
    same(
        "first MiB (boot code, table, GRUB core.img) as before stage",
        &before.head,
        &after.head,
    )?;
    same(
        "/boot's filesystem (device, UUID, type, label) as before stage",
        &before.boot_fs,
        &after.boot_fs,
    )?;
    same("/etc/fstab as before stage", &before.fstab, &after.fstab)?;
    same(
        "getent passwd as before stage",
        &before.passwd,
        &after.passwd,
    )?;
    same("getent group as before stage", &before.group, &after.group)?;
    same(
        "/etc/shadow and /etc/gshadow as before stage (sha256)",
        &before.shadow,
        &after.shadow,
    )?;
    same(
        "PVs, VGs and LVs (names, UUIDs, sizes) as before stage",
        &before.lvm,
        &after.lvm,
    )?;
    same(
        "UEFI: the old ESP's files and the firmware's entries and BootOrder as before stage (empty on BIOS)",
        &before.efi,
        &after.efi,
    )?;
    let u = unexplained(&before.sums, staged, &after.sums, STAGE_WRITES);
    if !u.is_empty() {
        println!("[{}] differences after the undo: {u:?}", sc.name);
    }
    let few = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>().join(" ");
    sc.check(
        "every file under /boot and /etc is as before stage (only what stage wrote may differ)",
        u.is_empty(),
        &format!(
            "{} files; changed [{}] missing [{}] added [{}]",
            before.sums.len(),
            few(&u.changed),
            few(&u.missing),
            few(&u.added)
        ),
    )?;
    // What stage wrote (other than what disarm rewrites) is back as stage left it.
    let not_back: Vec<&String> = staged
        .keys()
        .filter(|p| stage_wrote(p, &before.sums, staged, STAGE_WRITES) && !listed(p, DISARMED))
        .filter(|p| after.sums.get(*p) != staged.get(*p))
        .collect();
    sc.check(
        "the files stage wrote under /boot/dualroot are as stage left them",
        not_back.is_empty(),
        &format!("differing: {not_back:?}"),
    )?;
    sc.check(
        "grubenv holds the variables it held before stage (no one-shot entry)",
        grubenv_vars(&after.grubenv) == grubenv_vars(&before.grubenv),
        &format!(
            "before {:?}, after {:?}",
            grubenv_vars(&before.grubenv),
            grubenv_vars(&after.grubenv)
        ),
    )?;
    if after.custom_cfg != before.custom_cfg {
        println!(
            "[{}] custom.cfg after the undo:\n{}",
            sc.name, after.custom_cfg
        );
    }
    same(
        "custom.cfg exactly as before stage (the undo took stage's entry out)",
        &before.custom_cfg,
        &after.custom_cfg,
    )
}

/// The result file the undo leaves on the old root for the old system (no agent
/// runs on these appliances): outcome undone and the step; returns its reason.
fn check_result(sc: &Scenario, vm: &Vm, step: &str) -> Result<String> {
    let text = vm.ssh_ok(&format!("cat {RESULT_FILE}"))?;
    let decoded = dualroot_api::decode::<dualroot_api::MigrationResult>(RESULT_FILE, &text);
    sc.check(
        "the result file decodes as the contract's MigrationResult",
        decoded.is_ok(),
        decoded.as_ref().err().map(String::as_str).unwrap_or("ok"),
    )?;
    let r: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {RESULT_FILE}"))?;
    let reason = r["reason"].as_str().unwrap_or_default().to_string();
    sc.check(
        &format!("{RESULT_FILE}: outcome undone, step {step}, a reason"),
        r["outcome"] == "undone" && r["step"] == step && !reason.is_empty(),
        &format!(
            "outcome {}, step {}, reason {reason:?}",
            r["outcome"], r["step"]
        ),
    )?;
    Ok(reason)
}

#[test]
#[ignore = "boots VMs (about 8 minutes under TCG)"]
fn undo_partition_single_partition() {
    undo_scenario(
        "undo-partition-single-partition",
        Old::Partition,
        "partition",
    );
}

#[test]
#[ignore = "boots VMs (about 8 minutes under TCG)"]
fn undo_recovery_single_partition() {
    undo_scenario("undo-recovery-single-partition", Old::Partition, "recovery");
}

#[test]
#[ignore = "boots VMs (about 8 minutes under TCG)"]
fn undo_volumes_single_partition() {
    undo_scenario("undo-volumes-single-partition", Old::Partition, "volumes");
}

#[test]
#[ignore = "boots VMs (about 10 minutes under TCG)"]
fn undo_stash_single_partition() {
    undo_scenario("undo-stash-single-partition", Old::Partition, "stash");
}

#[test]
#[ignore = "boots VMs (about 8 minutes under TCG, more when the state is built)"]
fn undo_partition_lvm() {
    undo_scenario("undo-partition-lvm", LVM_LAYOUT, "partition");
}

#[test]
#[ignore = "boots VMs (about 8 minutes under TCG, more when the state is built)"]
fn undo_recovery_lvm() {
    undo_scenario("undo-recovery-lvm", LVM_LAYOUT, "recovery");
}

#[test]
#[ignore = "boots VMs (about 8 minutes under TCG, more when the state is built)"]
fn undo_volumes_lvm() {
    undo_scenario("undo-volumes-lvm", LVM_LAYOUT, "volumes");
}

#[test]
#[ignore = "boots VMs (about 10 minutes under TCG, more when the state is built)"]
fn undo_stash_lvm() {
    undo_scenario("undo-stash-lvm", LVM_LAYOUT, "stash");
}

/// UEFI (issue 26): the recovery step has put the old chain on the new ESP and
/// a firmware entry for it when it fails; the undo must bring back the old ESP
/// and leave NVRAM as it was.
#[test]
#[ignore = "boots VMs (about 12 minutes under TCG, more when the state is built)"]
fn undo_recovery_uefi() {
    undo_scenario("undo-recovery-uefi", Old::Efi, "recovery");
}

/// Watches the one QEMU run from the mark on until it exits. Fails as soon as a
/// second boot starts (a second kernel command line, or a second hook start),
/// on any other outcome, the old system booting or a kernel panic, when QEMU
/// exits without `GAVE_UP`, or at the deadline.
fn watch_for_power_off(sc: &Scenario, vm: &mut Vm, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + scaled(timeout);
    let mut gave_up_at: Option<Instant> = None;
    loop {
        let text = vm.console_since_mark();
        let kernels = text
            .lines()
            .filter(|l| l.contains("Kernel command line:"))
            .count();
        // The hook's /dev/console copy (the /dev/kmsg copy carries a timestamp).
        let hooks = text
            .lines()
            .filter(|l| {
                let l = l.trim_start();
                l.starts_with("dualroot-hook: migration requested")
                    || l.starts_with("dualroot-hook: resuming the migration")
            })
            .count();
        let boots = kernels.max(hooks);
        if boots > 1 {
            return Err(vm.fail(format!(
                "a second boot started ({kernels} kernel command lines, {hooks} hook starts): the failed undo must power off within one boot"
            )));
        }
        for bad in [DONE, UNDONE, RETRY, REFUSED, BOOTED, parse::KERNEL_PANIC] {
            if text.contains(bad) {
                return Err(vm.fail(format!("console showed {bad:?} with the undo made to fail")));
            }
        }
        if !vm.is_running() {
            if text.contains(GAVE_UP) {
                return Ok(());
            }
            return Err(vm.fail(format!("QEMU exited without {GAVE_UP}")));
        }
        if gave_up_at.is_none() && text.contains(GAVE_UP) {
            println!("[{}] {GAVE_UP} on the console", sc.name);
            gave_up_at = Some(Instant::now());
        }
        if gave_up_at.is_some_and(|t| t.elapsed() > scaled(Duration::from_secs(300))) {
            return Err(vm.fail(format!(
                "{GAVE_UP} shown but the machine did not power off within 300 s"
            )));
        }
        if Instant::now() >= deadline {
            return Err(vm.fail(format!(
                "not powered off after {} s",
                scaled(timeout).as_secs()
            )));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
#[ignore = "boots VMs (about 8 minutes under TCG)"]
fn undo_fails_powers_off() {
    // `volumes` fails after its writes on every attempt and the undo is made to
    // fail too: the machine must say so and power off within the one migration
    // boot, the reason in /boot/dualroot/journal.json on the new GPT's /boot.
    scenario::run("undo-fails-powers-off", |sc| {
        let mut vm = sc.vm(
            "appliance",
            appliance_on(sc, Old::Partition, BundleKind::Good, UNDO_MEMORY_MIB)?,
        )?;
        prepare_and_stage(sc, &mut vm, "volumes:late,undo")?;
        vm.mark_console();
        let _ = vm.ssh("systemctl reboot");
        watch_for_power_off(sc, &mut vm, Duration::from_secs(2400))?;
        let console = vm.console_since_mark();
        sc.check(
            "the migration started undoing",
            console.contains("undoing"),
            console
                .lines()
                .find(|l| l.contains("undoing"))
                .unwrap_or("(not on the console)")
                .trim(),
        )?;
        let failed = console
            .lines()
            .find(|l| l.contains("undo failed:"))
            .unwrap_or_default()
            .trim()
            .to_string();
        sc.check(
            "the console says the undo failed",
            !failed.is_empty(),
            if failed.is_empty() {
                "(no `undo failed:` line)"
            } else {
                &failed
            },
        )?;
        sc.check("it gave up and powered off, within one boot", true, GAVE_UP)?;
        // The disk the VM used, read from the host now that QEMU is gone: /boot
        // is partition 2 of the new GPT.
        let disk = vm.config().disks[0].clone();
        let journal = qemu_tests::disk::read_partition_file(
            &disk.path,
            &disk.format,
            2,
            "/dualroot/journal.json",
            &sc.path("inspect"),
        )?;
        let j: serde_json::Value =
            serde_json::from_slice(&journal).context("parsing /boot/dualroot/journal.json")?;
        let outcome = j["outcome"].as_str().unwrap_or_default();
        println!("[{}] journal outcome: {outcome:?}", sc.name);
        sc.check(
            "/boot/dualroot/journal.json says the undo failed",
            outcome.contains("undo failed"),
            &format!("outcome {outcome:?}"),
        )
    });
}

#[cfg(test)]
mod unit {
    use super::*;

    fn list(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(p, h)| (p.to_string(), h.to_string()))
            .collect()
    }

    #[test]
    fn only_what_stage_wrote_may_differ() {
        let before = list(&[
            ("/etc/fstab", "1"),
            ("/boot/grub/grubenv", "2"),
            ("/boot/dualroot/initramfs-migrate.img", "3"),
            ("/etc/hostname", "4"),
        ]);
        // stage: grubenv rewritten, custom.cfg added, the initramfs reused
        let staged = list(&[
            ("/etc/fstab", "1"),
            ("/boot/grub/grubenv", "2b"),
            ("/boot/grub/custom.cfg", "5"),
            ("/boot/dualroot/initramfs-migrate.img", "3"),
            ("/etc/hostname", "4"),
        ]);
        let after = list(&[
            ("/etc/fstab", "1"),
            ("/boot/grub/grubenv", "2c"),
            ("/boot/grub/custom.cfg", "5"),
            ("/boot/dualroot/initramfs-migrate.img", "3"),
            ("/etc/hostname", "4"),
        ]);
        assert!(unexplained(&before, &staged, &after, STAGE_WRITES).is_empty());

        // A listed file stage did not change must not change either; an
        // unlisted one never; nothing may go missing or appear.
        let mut worse = after.clone();
        worse.insert("/boot/dualroot/initramfs-migrate.img".into(), "3x".into());
        worse.insert("/etc/fstab".into(), "1x".into());
        worse.remove("/etc/hostname");
        worse.insert("/boot/dualroot/journal.json".into(), "6".into());
        worse.insert("/etc/new".into(), "7".into());
        let u = unexplained(&before, &staged, &worse, STAGE_WRITES);
        assert_eq!(
            u,
            Unexplained {
                changed: vec![
                    "/boot/dualroot/initramfs-migrate.img".into(),
                    "/etc/fstab".into()
                ],
                missing: vec!["/etc/hostname".into()],
                added: vec!["/boot/dualroot/journal.json".into(), "/etc/new".into()],
            }
        );
    }

    #[test]
    fn listed_matches_files_and_directories() {
        assert!(listed("/boot/dualroot/x", STAGE_WRITES));
        assert!(listed("/boot/grub/grubenv", STAGE_WRITES));
        assert!(!listed("/boot/grub/grubenv.bak", STAGE_WRITES));
        assert!(!listed("/boot/dualroots", STAGE_WRITES));
        assert!(!listed("/etc/fstab", STAGE_WRITES));
    }

    #[test]
    fn grubenv_ignores_an_emptied_next_entry_only() {
        assert_eq!(
            grubenv_vars("saved_entry=0\nnext_entry=\n"),
            grubenv_vars("saved_entry=0\n")
        );
        assert_ne!(
            grubenv_vars("next_entry=dualroot-migrate\n"),
            grubenv_vars("")
        );
    }

    #[test]
    fn custom_cfg_without_the_stage_block() {
        let block = "### BEGIN dualroot-migrate (written by `dualroot stage`; removed by it) ###\n# Written by `dualroot stage`\nmenuentry 'dualroot migration' --id dualroot-migrate {\n}\n### END dualroot-migrate ###\n";
        assert_eq!(without_stage_block(block), "");
        assert_eq!(
            without_stage_block(&format!("menuentry 'ops' {{\n}}\n{block}")),
            "menuentry 'ops' {\n}\n"
        );
        assert_eq!(without_stage_block(""), "");
        assert_eq!(without_stage_block("set timeout=3\n"), "set timeout=3\n");
    }

    #[test]
    fn undone_line_and_first_difference() {
        let c = "[  41.2] dualroot: undoing: putting the old disk back\n[  63.9] undone: 901 MiB restored in 22.7 s\n";
        assert_eq!(
            undone_line(c).as_deref(),
            Some("undone: 901 MiB restored in 22.7 s")
        );
        assert_eq!(undone_line("nothing"), None);
        let engine = "undone: the old disk is back (901 MiB in 5 regions written back and read back as recorded, old root and /boot mounted) in 22.7 s; rebooting into the old system";
        assert_eq!(undone_figures(engine), Some((901, 22.7)));
        assert_eq!(
            undone_figures("undone: 901 MiB restored in 22.7 s"),
            Some((901, 22.7))
        );
        assert_eq!(undone_figures("undone: back"), None);
        assert_eq!(first_difference("a\nb\n", "a\nb\n"), "identical");
        assert_eq!(
            first_difference("a\nb\n", "a\nc\n"),
            "line 2: before \"b\", after \"c\""
        );
        assert_eq!(
            first_difference("a\n", "a\nc\n"),
            "line 2: before \"(end)\", after \"c\""
        );
    }
}
