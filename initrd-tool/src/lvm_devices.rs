//! The new root's LVM devices file, `/etc/lvm/devices/system.devices`.
//!
//! lvm2 2.03.12 and later (EL9's default, also Debian 13's lvm2 when the file
//! exists) use only the devices the file lists. A root tree taken from an
//! installed machine carries that machine's file, which names a PV this appliance
//! does not have, so the new OS would ignore the volume group its root is on.
//! Sync rewrites the file to list this machine's PVs of the plan's VG before the
//! slot's initramfs is rebuilt from it; when those PVs cannot be determined it
//! removes the file instead (lvm2 then uses every device).
//!
//! Format (lvm2 `lib/device/device_id.c`, `device_ids_read`/`device_ids_write`):
//! `#` comment lines, `VERSION=1.1.<counter>`, then one line per device,
//! `IDTYPE=<t> IDNAME=<id> DEVNAME=<dev> PVID=<uuid without dashes>`, followed by
//! ` PART=<n>` when the PV is partition `n` of the device the id names. lvm2 only
//! matches an entry on a device whose partition number equals `PART` (0 when
//! absent). Older lvm2 (2.03.12) ignores a file whose `SYSTEMID=` line differs
//! from the local system id, newer ones compare `HOSTNAME=`/`PRODUCT_UUID=` with
//! the machine and search for moved PVs when they differ: those lines name the
//! build machine and are dropped.

use crate::blockdev::Lvm;
use crate::fsutil::{in_root, write_atomic};
use anyhow::{bail, Context, Result};
use fs_err as fs;
use log::{info, warn};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The devices file, relative to a root.
pub const DEVICES_FILE: &str = "etc/lvm/devices/system.devices";

/// One PV of the running machine, as the devices file needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvRow {
    /// Device node as lvm reports it (`/dev/vda3`).
    pub name: String,
    /// PV uuid as lvm reports it (with dashes).
    pub uuid: String,
    pub vg: String,
    /// Partition number of the device (0: a whole disk or a dm device).
    pub part: u32,
}

/// `lvm pvs -o pv_name,pv_uuid,vg_name` rows (from `sysinfo::parse_lvm_report`),
/// each with its partition number from `part_of`.
pub fn pv_rows_from_report(
    rows: &[BTreeMap<String, String>],
    part_of: &dyn Fn(&Path) -> Result<u32>,
) -> Result<Vec<PvRow>> {
    rows.iter()
        .map(|r| {
            let field = |k: &str| {
                r.get(k)
                    .filter(|v| !v.is_empty())
                    .cloned()
                    .with_context(|| format!("lvm's pvs report has a row without {k}"))
            };
            let name = field("pv_name")?;
            Ok(PvRow {
                part: part_of(Path::new(&name))?,
                uuid: field("pv_uuid")?,
                vg: r.get("vg_name").cloned().unwrap_or_default(),
                name,
            })
        })
        .collect()
}

/// The partition number of a block device from sysfs (`sys` is `/sys`):
/// `class/block/<name>/partition`, 0 when the device is no partition.
pub fn partition_number(sys: &Path, dev: &Path) -> Result<u32> {
    let real = std::fs::canonicalize(dev).unwrap_or_else(|_| dev.to_path_buf());
    let name = real
        .file_name()
        .with_context(|| format!("{} names no device", dev.display()))?;
    let dir = sys.join("class/block").join(name);
    if !dir.exists() {
        bail!("{} has no sysfs entry {}", dev.display(), dir.display());
    }
    match fs::read_to_string(dir.join("partition")) {
        Ok(t) => t
            .trim()
            .parse()
            .with_context(|| format!("{}: {t:?} is no partition number", dir.display())),
        Err(_) => Ok(0),
    }
}

/// This machine's PVs: lvm's report and sysfs (`sys` is `/sys`).
pub fn pv_rows(lvm: &Lvm, sys: &Path) -> Result<Vec<PvRow>> {
    let rows = lvm.report(&["pvs", "-o", "pv_name,pv_uuid,vg_name"], "pv")?;
    pv_rows_from_report(&rows, &|dev| partition_number(sys, dev))
}

/// A devices file rendered for this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    /// `DEVNAME (PVID)` of every entry written.
    pub listed: Vec<String>,
    /// `IDTYPE IDNAME` of every entry of the old file (another machine's devices).
    pub dropped: Vec<String>,
}

/// The value of `KEY=` in a devices file line (values end at a space).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The devices file listing `pvs`' PVs of `vg`, in place of everything the old
/// file (`old`) listed. Errors when no PV of `vg` is known or a uuid is not one.
///
/// Entries are `IDTYPE=devname`: it needs no disk serial or WWID (a virtio disk
/// may have neither) and lvm2 looks for the PVID on other devices when the name
/// changed. The version counter continues the old file's (lvm2 numbers its
/// backups by it). No `# HASH=` line: lvm2 2.03.24+ takes the file for edited by
/// hand and writes it again with its hash the next time it may write.
pub fn render(old: &str, pvs: &[PvRow], vg: &str) -> Result<Rendered> {
    let mine: Vec<&PvRow> = pvs.iter().filter(|p| p.vg == vg).collect();
    if mine.is_empty() {
        let seen: Vec<String> = pvs
            .iter()
            .map(|p| format!("{} in {:?}", p.name, p.vg))
            .collect();
        bail!(
            "lvm reports no PV of volume group {vg} (it reports {})",
            if seen.is_empty() {
                "none".to_string()
            } else {
                seen.join(", ")
            }
        );
    }
    let counter = old
        .lines()
        .find_map(|l| l.trim().strip_prefix("VERSION="))
        .and_then(|v| v.trim().rsplit('.').next()?.parse::<u32>().ok())
        .unwrap_or(0);
    let pvids: Vec<String> = mine
        .iter()
        .map(|p| p.uuid.chars().filter(|c| *c != '-').collect())
        .collect();
    // Entries of our own PVs (a re-run of sync) are not another machine's.
    let dropped = old
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| field(l, "PVID").is_none_or(|id| !pvids.iter().any(|p| p == id)))
        .filter_map(|l| Some(format!("{} {}", field(l, "IDTYPE")?, field(l, "IDNAME")?)))
        .collect();
    let mut text = format!(
        "# LVM uses devices listed in this file.\n# Written by dualroot: this machine's PVs of volume group {vg}.\nVERSION=1.1.{}\n",
        counter.saturating_add(1)
    );
    let mut listed = Vec::new();
    for (p, pvid) in mine.iter().zip(pvids) {
        if pvid.len() != 32 || !pvid.chars().all(|c| c.is_ascii_alphanumeric()) {
            bail!(
                "lvm reports PV uuid {:?} for {}, which is not one",
                p.uuid,
                p.name
            );
        }
        if p.name.is_empty() || !p.name.starts_with('/') || p.name.contains(char::is_whitespace) {
            bail!("lvm reports PV name {:?}, which is no device path", p.name);
        }
        text.push_str(&format!(
            "IDTYPE=devname IDNAME={0} DEVNAME={0} PVID={pvid}",
            p.name
        ));
        if p.part != 0 {
            text.push_str(&format!(" PART={}", p.part));
        }
        text.push('\n');
        listed.push(format!("{} ({pvid})", p.name));
    }
    Ok(Rendered {
        text,
        listed,
        dropped,
    })
}

/// Makes the devices file of the root at `new`, if it has one, list this
/// machine's PVs of `vg` (from `pvs`), or removes it when they cannot be
/// determined. Returns the journal note, `None` when there is no file.
pub fn fix_in_root(
    new: &Path,
    vg: &str,
    pvs: &dyn Fn() -> Result<Vec<PvRow>>,
) -> Result<Option<String>> {
    // Looked up first without `in_root`, which would create missing directories.
    if fs::symlink_metadata(new.join(DEVICES_FILE)).is_err() {
        return Ok(None);
    }
    let path: PathBuf = in_root(new, Path::new(DEVICES_FILE))?;
    let Ok(meta) = fs::symlink_metadata(&path) else {
        return Ok(None);
    };
    let old = String::from_utf8_lossy(&fs::read(&path)?).into_owned();
    let shown = format!("/{DEVICES_FILE}");
    match pvs().and_then(|rows| render(&old, &rows, vg)) {
        Ok(r) => {
            write_atomic(&path, r.text.as_bytes())?;
            fs::set_permissions(
                &path,
                std::fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
            )?;
            let note = format!(
                "lvm devices: {shown} now lists {} of volume group {vg}; dropped {} entr{} of the machine the OS image was made on{}",
                r.listed.join(", "),
                r.dropped.len(),
                if r.dropped.len() == 1 { "y" } else { "ies" },
                if r.dropped.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.dropped.join(", "))
                }
            );
            info!("{note}");
            Ok(Some(note))
        }
        Err(e) => {
            fs::remove_file(&path)?;
            let note = format!(
                "lvm devices: removed {shown} (it names the disks of the machine the OS image was made on, and this machine's PV of volume group {vg} could not be determined: {e:#}); lvm2 uses every device when the file is absent"
            );
            warn!("{note}");
            Ok(Some(note))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an installed EL9 machine carries: written by lvm2 2.03.2x during its
    /// installation, its root PV on a SAN disk known by WWID, plus a second disk.
    const EL9_DEVICES: &str = "# LVM uses devices listed in this file.\n# Created by LVM command vgimportdevices pid 1287 at Tue Mar  5 10:12:01 2024\n# HASH=2978402733\nPRODUCT_UUID=4c4c4544-0042-3510-8052-b4c04f4e3332\nVERSION=1.1.7\nIDTYPE=sys_wwid IDNAME=naa.6000c2912f1c3b5a9d2e8f7a6b5c4d3e DEVNAME=/dev/sda3 PVID=Zq3xYb8mN2pL5kR7tV9wC1dF4gH6jK0s PART=3\nIDTYPE=sys_serial IDNAME=S4EVNF0M812345 DEVNAME=/dev/sdb PVID=Hk2mYb8mN2pL5kR7tV9wC1dF4gH6jK9a\n";

    fn captured_rows() -> Vec<PvRow> {
        // `lvm pvs -o pv_name,pv_uuid,vg_name --reportformat json` of lvm2 2.03.16
        // (captured on a loop device; names made the appliance's, a second VG added).
        let rows = crate::sysinfo::parse_lvm_report(&crate::tool_output("lvm-pvs-uuid.json"), "pv")
            .unwrap();
        pv_rows_from_report(&rows, &|d| {
            Ok(if d == Path::new("/dev/vda3") { 3 } else { 0 })
        })
        .unwrap()
    }

    #[test]
    fn el9_file_lists_this_machines_pv_instead() {
        let rows = captured_rows();
        assert_eq!(rows[0].name, "/dev/vda3");
        assert_eq!(rows[0].uuid, "wMvXrT-NZ9Z-rl2s-1Siv-jLOt-ODNg-3ysws6");
        let r = render(EL9_DEVICES, &rows, "VA").unwrap();
        assert_eq!(
            r.text,
            "# LVM uses devices listed in this file.\n# Written by dualroot: this machine's PVs of volume group VA.\nVERSION=1.1.8\nIDTYPE=devname IDNAME=/dev/vda3 DEVNAME=/dev/vda3 PVID=wMvXrTNZ9Zrl2s1SivjLOtODNg3ysws6 PART=3\n"
        );
        assert_eq!(
            r.dropped,
            [
                "sys_wwid naa.6000c2912f1c3b5a9d2e8f7a6b5c4d3e",
                "sys_serial S4EVNF0M812345"
            ]
        );
        assert_eq!(r.listed, ["/dev/vda3 (wMvXrTNZ9Zrl2s1SivjLOtODNg3ysws6)"]);
        // The build machine's identity lines are gone; what lvm2 parses is ours.
        assert!(!r.text.contains("PRODUCT_UUID") && !r.text.contains("HASH"));
        // The other VG's PV (a data disk of another VG) is not listed.
        assert!(!r.text.contains("/dev/vdb"));
        // A re-run of sync renders the same entry and drops nothing.
        let again = render(&r.text, &rows, "VA").unwrap();
        assert!(again.dropped.is_empty(), "{:?}", again.dropped);
        assert_eq!(again.text, r.text.replace("VERSION=1.1.8", "VERSION=1.1.9"));
    }

    #[test]
    fn whole_disk_pv_has_no_part_and_old_file_may_be_anything() {
        let rows = [PvRow {
            name: "/dev/mapper/mpatha".into(),
            uuid: "wMvXrT-NZ9Z-rl2s-1Siv-jLOt-ODNg-3ysws6".into(),
            vg: "VA".into(),
            part: 0,
        }];
        for old in ["", "garbage\n", "SYSTEMID=build7\nVERSION=x\n"] {
            let r = render(old, &rows, "VA").unwrap();
            assert!(
                r.text.ends_with(
                    "VERSION=1.1.1\nIDTYPE=devname IDNAME=/dev/mapper/mpatha DEVNAME=/dev/mapper/mpatha PVID=wMvXrTNZ9Zrl2s1SivjLOtODNg3ysws6\n"
                ),
                "{}",
                r.text
            );
            assert!(!r.text.contains("SYSTEMID"));
        }
    }

    #[test]
    fn no_pv_of_the_vg_or_a_bad_uuid_is_an_error() {
        let rows = captured_rows();
        let e = format!("{:#}", render(EL9_DEVICES, &rows, "VB").unwrap_err());
        assert!(e.contains("no PV of volume group VB"), "{e}");
        assert!(e.contains("/dev/vda3 in \"VA\""), "{e}");
        let bad = [PvRow {
            uuid: "short".into(),
            ..rows[0].clone()
        }];
        assert!(render("", &bad, "VA").is_err());
    }

    #[test]
    fn partition_number_from_sysfs() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path();
        for (name, part) in [("vda", None), ("vda3", Some("3\n")), ("dm-0", None)] {
            let dir = sys.join("class/block").join(name);
            fs::create_dir_all(&dir).unwrap();
            if let Some(p) = part {
                fs::write(dir.join("partition"), p).unwrap();
            }
        }
        assert_eq!(partition_number(sys, Path::new("/dev/vda3")).unwrap(), 3);
        assert_eq!(partition_number(sys, Path::new("/dev/vda")).unwrap(), 0);
        assert!(partition_number(sys, Path::new("/dev/nope9")).is_err());
    }

    #[test]
    fn file_in_root_is_rewritten_removed_or_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let new = d.path();
        // No file: nothing done, no directory made.
        let rows = captured_rows();
        assert_eq!(fix_in_root(new, "VA", &|| Ok(rows.clone())).unwrap(), None);
        assert!(!new.join("etc/lvm").exists());

        let p = new.join(DEVICES_FILE);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, EL9_DEVICES).unwrap();
        fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let note = fix_in_root(new, "VA", &|| Ok(rows.clone()))
            .unwrap()
            .unwrap();
        assert!(note.contains("now lists /dev/vda3"), "{note}");
        assert!(note.contains("dropped 2 entries"), "{note}");
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.contains("PVID=wMvXrTNZ9Zrl2s1SivjLOtODNg3ysws6 PART=3\n"));
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // The PV cannot be determined: the file goes, and the note says why.
        fs::write(&p, EL9_DEVICES).unwrap();
        let note = fix_in_root(new, "VA", &|| bail!("lvm: command not found"))
            .unwrap()
            .unwrap();
        assert!(!p.exists());
        assert!(
            note.contains("removed /etc/lvm/devices/system.devices"),
            "{note}"
        );
        assert!(note.contains("lvm: command not found"), "{note}");
    }
}
