//! The migration matrix (issue 21 item 6): real appliance configurations, each a
//! full migration (the old system's own `dualroot stage` -> the new OS confirmed
//! good) with the reference checks of `common::reference`, plus the checks of its
//! row. Rows -> scenarios (qemu-tests/README.md has the table):
//!
//! | row | scenario |
//! |---|---|
//! | root on a partition, host-only dracut, ext4 root, no separate /boot | `reference_migration_matrix_partition_hostonly` (tests/migration.rs) |
//! | root on an LV, generic dracut, ext4 /boot, fstab by UUID, swap LV, /home LV with files, new OS with a foreign LVM devices file | `matrix_lvm_generic_ext4_boot_uuid_home_lv_swap_devicesfile` |
//! | root on an LV, host-only dracut, XFS /boot, fstab by /dev/mapper names, swap LV, lvm.conf `global_filter` | `matrix_lvm_hostonly_xfs_boot_mapper_names_global_filter` |
//!
//! Opt-in (minutes under TCG each): `qemu-tests/run-scenarios.sh matrix`.

mod common;

use common::reference::*;
use common::*;
use qemu_tests::images;
use qemu_tests::parse;
use qemu_tests::qemu::Vm;
use qemu_tests::scenario::{self, Scenario};
use qemu_tests::Result;
use std::collections::BTreeMap;

/// Where the generic image keeps the sha256 list of its extra /home files
/// (on the root, outside /home, so the migration does not carry it).
const HOME_HASHES: &str = "/var/lib/matrix-home.sha256";
const HOME_FILES: &str = "/home/admin/matrix";

#[test]
#[ignore = "boots VMs (about 15 minutes under TCG, more when the image and state are built)"]
fn matrix_lvm_generic_ext4_boot_uuid_home_lv_swap_devicesfile() {
    scenario::run("matrix-lvm-generic-devicesfile", |sc| {
        let b = images::bundle_devicesfile()?;
        let foreign = parse::devices_file_pvids(&b.foreign_devices);
        sc.check(
            "the bundle ships a foreign devices file",
            !foreign.is_empty(),
            &foreign.join(" "),
        )?;
        let r = Reference {
            old: Old::MatrixGeneric,
            bundle: Some(&b.bundle.path),
            initramfs_tool: "update-initramfs",
            ..Reference::on(Old::MatrixGeneric)
        };
        migrate_with_reference_checks(sc, &r, generic_row_before, |sc, vm, hashes| {
            generic_row_after(sc, vm, &hashes, &foreign)
        })
    });
}

#[test]
#[ignore = "boots VMs (about 12 minutes under TCG, more when the image and state are built)"]
fn matrix_lvm_hostonly_xfs_boot_mapper_names_global_filter() {
    scenario::run("matrix-lvm-hostonly-global-filter", |sc| {
        migrate_with_reference_checks(
            sc,
            &Reference::on(Old::MatrixHostonly),
            hostonly_row_before,
            hostonly_row_after,
        )
    });
}

/// The generic row as the old system has it; returns the sha256 list of the
/// extra /home files (path -> hash).
fn generic_row_before(sc: &Scenario, vm: &Vm) -> Result<BTreeMap<String, String>> {
    let home = vm.ssh_ok("findmnt -n -o SOURCE,FSTYPE /home; findmnt -n -o FSTYPE /boot")?;
    let home = home.split_whitespace().collect::<Vec<_>>();
    sc.check(
        "old: /home is the XFS LV centos/home, /boot is ext4",
        home == ["/dev/mapper/centos-home", "xfs", "ext4"],
        &home.join(" "),
    )?;
    let fstab = vm.ssh_ok("awk '$1 !~ /^#/ && NF >= 2 {print $1, $2}' /etc/fstab")?;
    let by_uuid = |mnt: &str| {
        fstab
            .lines()
            .any(|l| l.starts_with("UUID=") && l.ends_with(&format!(" {mnt}")))
    };
    sc.check(
        "old: fstab names /, /boot, /home and the swap by UUID",
        ["/", "/boot", "/home", "swap"].iter().all(|m| by_uuid(m)),
        &fstab.replace('\n', ", "),
    )?;
    let swap = vm.ssh_ok(
        "readlink -f /dev/mapper/centos-swap; swapon --noheadings --show=NAME | xargs -r -n1 readlink -f",
    )?;
    let mut swap_lines = swap.lines();
    let lv = swap_lines.next().unwrap_or_default();
    sc.check(
        "old: the swap LV is in use",
        !lv.is_empty() && swap_lines.any(|l| l == lv),
        &swap.replace('\n', " "),
    )?;
    let dracut = vm.ssh_ok(
        "cat /etc/dracut.conf.d/*.conf; lsinitrd /boot/initrd.img-$(uname -r) | grep -c '/nvme\\.ko' || true",
    )?;
    sc.check(
        "old: dracut is generic (hostonly=\"no\", the boot initramfs carries drivers this VM lacks)",
        dracut.contains("hostonly=\"no\"")
            && !dracut.contains("hostonly=\"yes\"")
            && dracut.lines().last().unwrap_or("0") != "0",
        &dracut.replace('\n', " "),
    )?;
    let list = vm.ssh_ok(&format!("cat {HOME_HASHES}"))?;
    let hashes: BTreeMap<String, String> = parse::sha256_list(&list).into_iter().collect();
    let checked = vm.ssh(&format!("sha256sum --quiet -c {HOME_HASHES} 2>&1"))?;
    sc.check(
        "old: the extra /home files match their sha256 list",
        hashes.len() > 300 && hashes.keys().all(|p| p.starts_with(HOME_FILES)) && checked.success(),
        &format!(
            "{} files; {}",
            hashes.len(),
            checked.stdout.lines().next().unwrap_or("all match")
        ),
    )?;
    let migrate_initramfs = vm.ssh_ok(
        "lsinitrd -f etc/lvm/lvm.conf /boot/dualroot/initramfs-migrate.img 2>/dev/null | grep -E '^[[:space:]]*(locking_type|use_devicesfile|global_filter)' || true",
    )?;
    println!(
        "[{}] old: lvm.conf in the migration initramfs says: {}",
        sc.name,
        migrate_initramfs.trim().replace('\n', "; ")
    );
    Ok(hashes)
}

/// The generic row on the new OS: the /home files arrived, the foreign devices
/// file no longer hides VA.
fn generic_row_after(
    sc: &Scenario,
    vm: &Vm,
    hashes: &BTreeMap<String, String>,
    foreign: &[String],
) -> Result<()> {
    let now = vm.ssh_ok(&format!(
        "find {HOME_FILES} -type f -print0 | xargs -0 -r sha256sum"
    ))?;
    let now: BTreeMap<String, String> = parse::sha256_list(&now).into_iter().collect();
    let missing: Vec<&String> = hashes.keys().filter(|p| !now.contains_key(*p)).collect();
    let changed: Vec<&String> = hashes
        .iter()
        .filter(|(p, h)| now.get(*p).is_some_and(|n| n != *h))
        .map(|(p, _)| p)
        .collect();
    sc.check(
        "every file of the old /home LV's sha256 list is on the new OS with its hash",
        missing.is_empty() && changed.is_empty(),
        &format!(
            "{} of {} files; missing {:?}; changed {:?}",
            hashes.len() - missing.len() - changed.len(),
            hashes.len(),
            missing.iter().take(3).collect::<Vec<_>>(),
            changed.iter().take(3).collect::<Vec<_>>()
        ),
    )?;
    let owners = vm.ssh_ok(&format!(
        "find {HOME_FILES} ! -user admin | head -n 3; stat -c '%u' {HOME_FILES}"
    ))?;
    sc.check(
        "the /home files are owned by admin under the new UID 1001",
        owners.trim() == "1001",
        &owners.replace('\n', " "),
    )?;
    let devices = vm.ssh_ok(
        "lvmconfig devices/use_devicesfile 2>/dev/null || true; echo ==; cat /etc/lvm/devices/system.devices 2>/dev/null || echo '(no devices file)'",
    )?;
    println!(
        "[{}] new OS: {}",
        sc.name,
        devices.trim().replace('\n', " | ")
    );
    let named = parse::devices_file_pvids(&devices);
    sc.check(
        "the new OS's devices file does not name the foreign PV (rewritten or removed)",
        !foreign
            .iter()
            .any(|f| named.contains(f) || devices.contains(f.as_str())),
        &format!("names {named:?}; the bundle's named {foreign:?}"),
    )?;
    let vgs = vm.ssh_ok("vgs --noheadings -o vg_name; lvs --noheadings -o lv_name,lv_active VA")?;
    sc.check(
        "lvm on the new OS lists VG VA (with the new OS's own lvm.conf)",
        vgs.split_whitespace().next() == Some("VA"),
        &vgs.split_whitespace().collect::<Vec<_>>().join(" "),
    )?;
    let version = vm.ssh_ok("cat /etc/dualroot-test-version")?;
    sc.check(
        "slot a runs the devicesfile bundle",
        version.trim().ends_with("-devicesfile"),
        version.trim(),
    )
}

/// The host-only row as the old system has it: the global_filter that hides
/// every PV but the old one is in force.
fn hostonly_row_before(sc: &Scenario, vm: &Vm) -> Result<()> {
    let filter = vm.ssh_ok("lvmconfig devices/global_filter; pvs --noheadings -o pv_name")?;
    sc.check(
        "old: lvm.conf's global_filter accepts only /dev/vda2",
        filter.contains("a|^/dev/vda2$|") && filter.contains("r|.*|"),
        &filter.replace('\n', " "),
    )?;
    let layout = vm.ssh_ok(
        "findmnt -n -o FSTYPE /boot; awk '$1 ~ \"^/dev/mapper/centos-\" {print $2}' /etc/fstab; cat /etc/dracut.conf.d/*.conf",
    )?;
    sc.check(
        "old: XFS /boot, fstab by /dev/mapper names for / and the swap, host-only dracut",
        layout.lines().next() == Some("xfs")
            && layout.lines().any(|l| l == "/")
            && layout.lines().any(|l| l == "swap")
            && layout.contains("hostonly=\"yes\""),
        &layout.replace('\n', " "),
    )?;
    let migrate_initramfs = vm.ssh_ok(
        "lsinitrd -f etc/lvm/lvm.conf /boot/dualroot/initramfs-migrate.img 2>/dev/null | grep -E '^[[:space:]]*(locking_type|global_filter)' || true",
    )?;
    println!(
        "[{}] old: lvm.conf in the migration initramfs says: {}",
        sc.name,
        migrate_initramfs.trim().replace('\n', "; ")
    );
    Ok(())
}

/// The host-only row on the new OS: the migration's lvm saw the new PV despite
/// the old filter, and nothing of the filter hides it now.
fn hostonly_row_after(sc: &Scenario, vm: &Vm, (): ()) -> Result<()> {
    let pvs = vm.ssh_ok(
        "pvs --noheadings -o pv_name,vg_name; lvmconfig devices/global_filter 2>/dev/null || true",
    )?;
    sc.check(
        "despite the old global_filter, /dev/vda3 is the PV of VA on the new OS",
        pvs.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["/dev/vda3", "VA"]),
        &pvs.replace('\n', " "),
    )
}
