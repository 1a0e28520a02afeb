//! The old system's disk layout: where its root and `/boot` live. "One OS" is
//! not "one partition": root on a partition or on an LV of a VG whose PVs are
//! all on the same disk, `/boot` in the root or on its own partition of that
//! disk. Anything else (a VG spanning disks, LUKS, md RAID, root and /boot on
//! different disks, a UEFI machine whose ESP is not a partition of that disk) is
//! refused with one sentence naming what was found.
//!
//! Read from sysfs, the mount table and `lvm pvs` plain output, so it works the
//! same on the running old system and in the migration initramfs, on any kernel
//! and tool version (EL7's lsblk 2.23 has no JSON output, lvm2 before 2.02.158
//! no JSON report).

use anyhow::{bail, Context, Result};
use fs_err as fs;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RootDevice {
    /// A partition of the disk (`vda1`).
    Partition { name: String },
    /// An LV; `pvs` are the VG's PVs (partitions of the disk) with their byte
    /// offset on it, so their signatures can be wiped once the VG is retired.
    Lvm {
        vg: String,
        lv: String,
        pvs: Vec<OldPv>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OldPv {
    pub name: String,
    pub start_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceLayout {
    /// The disk the migration rewrites, e.g. `/dev/vda`.
    pub disk: String,
    pub root: RootDevice,
    /// `/boot` on its own partition of `disk` (e.g. `vda1`), or `None` when
    /// `/boot` is a directory of the root filesystem.
    pub boot: Option<String>,
    /// The EFI System Partition mounted at `/boot/efi` (or `/efi`) on a
    /// machine that booted with UEFI, a partition of `disk`; `None` on BIOS.
    #[serde(default)]
    pub esp: Option<String>,
}

impl SourceLayout {
    /// The old VG, when the root is on LVM.
    pub fn old_vg(&self) -> Option<&str> {
        match &self.root {
            RootDevice::Lvm { vg, .. } => Some(vg),
            RootDevice::Partition { .. } => None,
        }
    }

    /// For people: `root on LV centos/root (PV vda2), /boot on vda1 of /dev/vda`.
    pub fn describe(&self) -> String {
        let root = match &self.root {
            RootDevice::Partition { name } => format!("root on partition {name}"),
            RootDevice::Lvm { vg, lv, pvs } => format!(
                "root on LV {vg}/{lv} (PV {})",
                pvs.iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let boot = match &self.boot {
            Some(b) => format!("/boot on partition {b}"),
            None => "/boot in the root filesystem".into(),
        };
        let esp = match &self.esp {
            Some(e) => format!(", UEFI with the ESP on {e}"),
            None => String::new(),
        };
        format!("{root}, {boot}{esp}, disk {}", self.disk)
    }
}

/// One block device as sysfs shows it.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Disk,
    Partition {
        disk: String,
        start_bytes: u64,
    },
    Dm {
        dm_name: String,
        uuid: String,
        slaves: Vec<String>,
    },
    Md,
}

fn read_trim(p: &Path) -> String {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `(name, node)` of the device whose sysfs directory `link` points at.
fn node_at(link: &Path) -> Result<(String, Node)> {
    let dir = fs::canonicalize(link)?;
    let name = dir
        .file_name()
        .context("sysfs block directory without a name")?
        .to_string_lossy()
        .into_owned();
    let node = if dir.join("partition").exists() {
        let disk = dir
            .parent()
            .and_then(|p| p.file_name())
            .context("partition without a parent disk")?
            .to_string_lossy()
            .into_owned();
        let start: u64 = read_trim(&dir.join("start")).parse().unwrap_or(0);
        Node::Partition {
            disk,
            start_bytes: start * 512,
        }
    } else if dir.join("dm").is_dir() {
        let mut slaves: Vec<String> = fs::read_dir(dir.join("slaves"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        slaves.sort();
        Node::Dm {
            dm_name: read_trim(&dir.join("dm/name")),
            uuid: read_trim(&dir.join("dm/uuid")),
            slaves,
        }
    } else if dir.join("md").is_dir() || name.starts_with("md") {
        Node::Md
    } else {
        Node::Disk
    };
    Ok((name, node))
}

fn node_by_name(sys: &Path, name: &str) -> Result<Node> {
    let link = sys.join("class/block").join(name);
    node_at(&link)
        .map(|(_, n)| n)
        .with_context(|| format!("reading {}", link.display()))
}

/// The disks a block device (sysfs name: `vda1`, `dm-3`) lives on: a partition's
/// disk, a device-mapper device's through its slaves.
pub fn disks_of(sys: &Path, name: &str) -> Result<std::collections::BTreeSet<String>> {
    let mut out = std::collections::BTreeSet::new();
    match node_by_name(sys, name)? {
        Node::Partition { disk, .. } => {
            out.insert(disk);
        }
        Node::Dm { slaves, .. } => {
            for s in slaves {
                out.extend(disks_of(sys, &s)?);
            }
        }
        Node::Disk | Node::Md => {
            out.insert(name.to_string());
        }
    }
    Ok(out)
}

/// `vg-lv` as device-mapper names an LV (a `-` inside a name is doubled).
pub fn split_dm_lv_name(dm_name: &str) -> Option<(String, String)> {
    let b = dm_name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'-' {
            if b.get(i + 1) == Some(&b'-') {
                i += 2;
                continue;
            }
            let un = |s: &str| s.replace("--", "-");
            return Some((un(&dm_name[..i]), un(&dm_name[i + 1..])));
        }
        i += 1;
    }
    None
}

/// `lvm pvs --noheadings -o pv_name,vg_name --separator '|'` → `(device, vg)`.
pub fn parse_pvs(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (pv, vg) = l.trim().split_once('|')?;
            Some((pv.trim().to_string(), vg.trim().to_string()))
        })
        .collect()
}

/// What [`detect`] looks at.
pub struct Probe<'a> {
    pub sys: &'a Path,
    pub mountinfo: &'a str,
    /// Where the old root and its /boot are mounted (`/` and `/boot` on the
    /// running system, under /run/dualroot/old in the initramfs).
    pub root_mount: &'a str,
    pub boot_mount: &'a str,
    /// Every PV with its VG, device names as in /dev (`vda2`, `dm-3`).
    pub pvs: &'a [(String, String)],
}

/// The sysfs name of a PV device path from `lvm pvs` (`/dev/vda2` → `vda2`,
/// `/dev/mapper/x` → `dm-N` through the link).
pub fn pv_device_name(dev: &str) -> String {
    let p = Path::new(dev);
    std::fs::canonicalize(p)
        .ok()
        .as_deref()
        .unwrap_or(p)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dev.to_string())
}

/// A PV must be a plain partition: names what it is otherwise.
fn pv_partition(sys: &Path, name: &str, vg: &str) -> Result<(String, u64)> {
    match node_by_name(sys, name)? {
        Node::Partition { disk, start_bytes } => Ok((disk, start_bytes)),
        Node::Dm { uuid, .. } if uuid.starts_with("CRYPT-") => bail!(
            "the PV {name} of VG {vg} is a LUKS (dm-crypt) device; encrypted disks are not supported, nothing was changed"
        ),
        Node::Dm { dm_name, .. } => bail!(
            "the PV {name} of VG {vg} is the device-mapper device {dm_name} (multipath?); only PVs on partitions of one disk are supported, nothing was changed"
        ),
        Node::Md => bail!(
            "the PV {name} of VG {vg} is an md RAID device; software RAID is not supported, nothing was changed"
        ),
        Node::Disk => bail!(
            "the PV {name} of VG {vg} is a whole disk without a partition table; only PVs on partitions are supported, nothing was changed"
        ),
    }
}

/// Where an ESP is mounted, relative to the root (`/boot/efi` is what
/// EL7/EL9 and Debian installers use; `/efi` is systemd's).
const ESP_MOUNTS: [&str; 2] = ["/boot/efi", "/efi"];

/// The ESP of a UEFI machine: the vfat filesystem mounted at `/boot/efi` or
/// `/efi` under `root_mount`, a partition of `disk`. Names what is wrong
/// otherwise (not mounted, not vfat, not a partition, another disk).
pub fn find_esp(p: &Probe, disk: &str) -> Result<String> {
    let under = |m: &str| {
        if p.root_mount == "/" {
            m.to_string()
        } else {
            format!("{}{m}", p.root_mount.trim_end_matches('/'))
        }
    };
    let Some((mount, (maj, min))) = ESP_MOUNTS.iter().find_map(|m| {
        let at = under(m);
        crate::sysinfo::mount_device(p.mountinfo, &at).map(|d| (at, d))
    }) else {
        bail!(
            "this machine booted with UEFI but no EFI System Partition is mounted at {}; mount it (as its fstab says) and try again, nothing was changed",
            ESP_MOUNTS.map(under).join(" or ")
        );
    };
    let fstype = crate::sysinfo::mount_fstype(p.mountinfo, &mount).unwrap_or_default();
    if fstype != "vfat" {
        bail!("{mount} is a {fstype} filesystem, not the vfat EFI System Partition UEFI boots from; nothing was changed");
    }
    let (name, node) = node_at(&p.sys.join(format!("dev/block/{maj}:{min}")))
        .with_context(|| format!("reading sysfs for the ESP {maj}:{min} at {mount}"))?;
    match node {
        Node::Partition { disk: d, .. } if d == disk => Ok(name),
        Node::Partition { disk: d, .. } => bail!(
            "the ESP at {mount} is {name} on disk {d}, but the root filesystem is on disk {disk}; dualroot rewrites one disk, so the migration is refused and nothing was changed"
        ),
        _ => bail!("the ESP at {mount} is {name}, which is not a partition; nothing was changed"),
    }
}

pub fn detect(p: &Probe) -> Result<SourceLayout> {
    let (maj, min) = crate::sysinfo::mount_device(p.mountinfo, p.root_mount)
        .with_context(|| format!("no filesystem is mounted at {}", p.root_mount))?;
    let (name, node) = node_at(&p.sys.join(format!("dev/block/{maj}:{min}")))
        .with_context(|| format!("reading sysfs for the root device {maj}:{min}"))?;
    let (disk, root) = match node {
        Node::Partition { disk, .. } => (disk, RootDevice::Partition { name }),
        Node::Dm { uuid, .. } if uuid.starts_with("CRYPT-") => bail!(
            "the root filesystem is on LUKS (dm-crypt device {name}); encrypted roots are not supported, nothing was changed"
        ),
        Node::Dm {
            dm_name,
            uuid,
            slaves,
        } => {
            if !uuid.starts_with("LVM-") {
                bail!("the root filesystem is on the device-mapper device {dm_name} ({name}), which is not an LVM logical volume; not supported, nothing was changed");
            }
            let (vg, lv) = split_dm_lv_name(&dm_name)
                .with_context(|| format!("cannot read VG and LV from the dm name {dm_name}"))?;
            // Every PV of the VG (lvm's view; the LV's own segments when lvm
            // reports none).
            let mut pv_names: Vec<String> = p
                .pvs
                .iter()
                .filter(|(_, g)| *g == vg)
                .map(|(d, _)| d.clone())
                .collect();
            if pv_names.is_empty() {
                pv_names = slaves;
            }
            let mut pvs = Vec::new();
            let mut disks = std::collections::BTreeSet::new();
            for pv in &pv_names {
                let (d, start_bytes) = pv_partition(p.sys, pv, &vg)?;
                disks.insert(d);
                pvs.push(OldPv {
                    name: pv.clone(),
                    start_bytes,
                });
            }
            if disks.len() != 1 {
                bail!(
                    "the volume group {vg} spans several disks ({}); dualroot rewrites one disk and would leave {vg} incomplete, so the migration is refused and nothing was changed",
                    disks.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
            let disk = disks.into_iter().next().unwrap_or_default();
            (disk, RootDevice::Lvm { vg, lv, pvs })
        }
        Node::Md => bail!(
            "the root filesystem is on md RAID ({name}); software RAID is not supported, nothing was changed"
        ),
        Node::Disk => bail!(
            "the root filesystem fills the whole disk {name} without a partition table; not a supported layout, nothing was changed"
        ),
    };
    let boot = match crate::sysinfo::mount_device(p.mountinfo, p.boot_mount) {
        Some(dev) if dev != (maj, min) => {
            let (bname, bnode) = node_at(&p.sys.join(format!("dev/block/{}:{}", dev.0, dev.1)))
                .with_context(|| {
                    format!("reading sysfs for the /boot device {}:{}", dev.0, dev.1)
                })?;
            match bnode {
                Node::Partition { disk: bdisk, .. } if bdisk == disk => Some(bname),
                Node::Partition { disk: bdisk, .. } => bail!(
                    "the root filesystem is on disk {disk} but /boot on disk {bdisk}; dualroot rewrites one disk, so the migration is refused and nothing was changed"
                ),
                _ => bail!(
                    "/boot is on {bname}, which is not a partition; dualroot needs /boot on a partition (or in the root filesystem), nothing was changed"
                ),
            }
        }
        _ => None,
    };
    // Booted with UEFI (as `efi::booted_uefi` reads it, here under the probe's sysfs).
    let esp = if p.sys.join("firmware/efi").exists() {
        Some(find_esp(p, &disk)?)
    } else {
        None
    };
    Ok(SourceLayout {
        disk: format!("/dev/{disk}"),
        root,
        boot,
        esp,
    })
}

/// [`detect`] on a live sysfs and mount table (`proc`), asking lvm for the PVs.
pub fn probe(sys: &Path, proc: &Path, root_mount: &str, boot_mount: &str) -> Result<SourceLayout> {
    let mountinfo =
        fs::read_to_string(proc.join("self/mountinfo")).context("reading the mount table")?;
    let pvs_text = crate::blockdev::Lvm::default()
        .run(&[
            "pvs",
            "--noheadings",
            "-o",
            "pv_name,vg_name",
            "--separator",
            "|",
        ])
        .unwrap_or_default();
    let pvs: Vec<(String, String)> = parse_pvs(&pvs_text)
        .into_iter()
        .map(|(d, g)| (pv_device_name(&d), g))
        .collect();
    detect(&Probe {
        sys,
        mountinfo: &mountinfo,
        root_mount,
        boot_mount,
        pvs: &pvs,
    })
}

/// Zeroes the first MiB of each old PV (its label and metadata area) through
/// the disk, so the old VG never shows up again next to the new one. The
/// partitions are addressed by their recorded offsets: after the new table is
/// written, their device nodes are gone.
pub fn wipe_old_pvs(disk: &Path, pvs: &[OldPv]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .with_context(|| format!("opening {} to wipe the old PV signatures", disk.display()))?;
    let zeros = vec![0u8; 1 << 20];
    for pv in pvs {
        f.file()
            .write_all_at(&zeros, pv.start_bytes)
            .with_context(|| {
                format!(
                    "wiping the old PV {} at byte {} of {}",
                    pv.name,
                    pv.start_bytes,
                    disk.display()
                )
            })?;
    }
    f.sync_all()
        .with_context(|| format!("syncing {}", disk.display()))?;
    Ok(())
}

/// Test support: a sysfs tree (`class/block`, `dev/block`) from a listing as
/// captured on a guest by `qemu-tests` (see fixtures/tool-output/sysfs-*.txt):
/// `name maj:min disk` / `name maj:min part DISK START` /
/// `name maj:min dm DMNAME UUID SLAVE,...`.
#[cfg(test)]
pub fn fake_sysfs(listing: &str, sys: &Path) -> Result<()> {
    let devs = sys.join("devices");
    let mut dirs: std::collections::BTreeMap<String, std::path::PathBuf> = Default::default();
    for l in listing.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (name, dev, kind) = (f[0], f[1], f[2]);
        let dir = match kind {
            "part" => dirs[f[3]].join(name),
            _ => devs.join(name),
        };
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("dev"), dev)?;
        match kind {
            "part" => {
                fs::write(dir.join("partition"), "1")?;
                fs::write(dir.join("start"), f[4])?;
            }
            "dm" => {
                fs::create_dir_all(dir.join("dm"))?;
                fs::create_dir_all(dir.join("slaves"))?;
                fs::write(dir.join("dm/name"), f[3])?;
                fs::write(dir.join("dm/uuid"), f[4])?;
                for s in f.get(5).map(|s| s.split(',')).into_iter().flatten() {
                    if !s.is_empty() {
                        fs::write(dir.join("slaves").join(s), "")?;
                    }
                }
            }
            "md" => fs::create_dir_all(dir.join("md"))?,
            _ => {}
        }
        for link in [
            sys.join("class/block").join(name),
            sys.join("dev/block").join(dev),
        ] {
            fs::create_dir_all(link.parent().unwrap_or(sys))?;
            std::os::unix::fs::symlink(&dir, &link)?;
        }
        dirs.insert(name.to_string(), dir);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect_on(listing: &str, mountinfo: &str, pvs: &str) -> Result<SourceLayout> {
        let d = tempfile::tempdir().unwrap();
        fake_sysfs(listing, d.path()).unwrap();
        let pvs: Vec<(String, String)> = parse_pvs(pvs)
            .into_iter()
            .map(|(d, g)| (d.trim_start_matches("/dev/").to_string(), g))
            .collect();
        detect(&Probe {
            sys: d.path(),
            mountinfo,
            root_mount: "/",
            boot_mount: "/boot",
            pvs: &pvs,
        })
    }

    /// A CentOS 7 installed on EFI firmware: ESP vda1 (vfat) at /boot/efi,
    /// XFS /boot on vda2, VG centos on vda3.
    const EFI_SYSFS: &str = "vda 252:0 disk\nvda1 252:1 part vda 2048\nvda2 252:2 part vda 411648\nvda3 252:3 part vda 2508800\nvdb 252:16 disk\nvdb1 252:17 part vdb 2048\ndm-0 253:0 dm centos-root LVM-abc vda3\n";
    const EFI_PVS: &str = "  /dev/vda3|centos\n";

    fn efi_mounts(esp_line: &str) -> String {
        format!(
            "22 1 253:0 / / rw,relatime shared:1 - xfs /dev/mapper/centos-root rw\n\
             40 22 252:2 / /boot rw,relatime shared:26 - xfs /dev/vda2 rw\n{esp_line}"
        )
    }

    fn probe_efi(mountinfo: &str, root_mount: &str) -> Result<String> {
        let d = tempfile::tempdir().unwrap();
        fake_sysfs(EFI_SYSFS, d.path()).unwrap();
        fs::create_dir_all(d.path().join("firmware/efi")).unwrap();
        let pvs: Vec<(String, String)> = parse_pvs(EFI_PVS)
            .into_iter()
            .map(|(d, g)| (d.trim_start_matches("/dev/").to_string(), g))
            .collect();
        let p = Probe {
            sys: d.path(),
            mountinfo,
            root_mount,
            boot_mount: "/boot",
            pvs: &pvs,
        };
        let esp = find_esp(&p, "vda");
        // detect takes the ESP it found into the layout, or refuses with why
        if root_mount == "/" {
            match (&esp, detect(&p)) {
                (Ok(name), Ok(l)) => {
                    assert_eq!(l.esp.as_deref(), Some(name.as_str()));
                    assert!(l
                        .describe()
                        .contains(&format!("UEFI with the ESP on {name}")));
                }
                (Err(why), Err(e)) => assert_eq!(format!("{e:#}"), format!("{why:#}")),
                (a, b) => panic!("find_esp {a:?} but detect {b:?}"),
            }
        }
        esp
    }

    #[test]
    fn the_esp_is_found_at_boot_efi_or_efi_and_checked() {
        let vfat = |at: &str, dev: &str| {
            format!("41 40 {dev} / {at} rw,relatime shared:27 - vfat /dev/x rw,fmask=0077\n")
        };
        assert_eq!(
            probe_efi(&efi_mounts(&vfat("/boot/efi", "252:1")), "/").unwrap(),
            "vda1"
        );
        assert_eq!(
            probe_efi(&efi_mounts(&vfat("/efi", "252:1")), "/").unwrap(),
            "vda1"
        );
        // the old root mounted elsewhere (the initramfs) with its ESP under it
        assert_eq!(
            probe_efi(
                &vfat("/run/dualroot/old/boot/efi", "252:1"),
                "/run/dualroot/old"
            )
            .unwrap(),
            "vda1"
        );
        let e = |mi: String| format!("{:#}", probe_efi(&mi, "/").unwrap_err());
        let none = e(efi_mounts(""));
        assert!(
            none.contains("no EFI System Partition is mounted at /boot/efi or /efi"),
            "{none}"
        );
        let xfs = e(efi_mounts(
            "41 40 252:1 / /boot/efi rw - xfs /dev/vda1 rw\n",
        ));
        assert!(
            xfs.contains("/boot/efi is a xfs filesystem, not the vfat"),
            "{xfs}"
        );
        let other = e(efi_mounts(&vfat("/boot/efi", "252:17")));
        assert!(
            other.contains("the ESP at /boot/efi is vdb1 on disk vdb"),
            "{other}"
        );
        let whole = e(efi_mounts(&vfat("/boot/efi", "252:16")));
        assert!(whole.contains("vdb, which is not a partition"), "{whole}");
    }

    #[test]
    fn dm_names_split_at_the_single_dash() {
        assert_eq!(
            split_dm_lv_name("centos-root"),
            Some(("centos".into(), "root".into()))
        );
        assert_eq!(
            split_dm_lv_name("my--vg-lv--a"),
            Some(("my-vg".into(), "lv-a".into()))
        );
        assert_eq!(split_dm_lv_name("nodash"), None);
    }

    #[test]
    fn centos7_default_layout_from_the_lvm_guest() {
        let l = detect_on(
            &crate::tool_output("sysfs-legacy-lvm.txt"),
            &crate::tool_output("mountinfo-legacy-lvm.txt"),
            &crate::tool_output("pvs-legacy-lvm.txt"),
        )
        .unwrap();
        assert_eq!(l.disk, "/dev/vda");
        assert_eq!(l.boot.as_deref(), Some("vda1"));
        match &l.root {
            RootDevice::Lvm { vg, lv, pvs } => {
                assert_eq!((vg.as_str(), lv.as_str()), ("centos", "root"));
                assert_eq!(pvs.len(), 1);
                assert_eq!(pvs[0].name, "vda2");
                assert_eq!(pvs[0].start_bytes, 1_050_624 * 512);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.old_vg(), Some("centos"));
        assert!(l.describe().contains("LV centos/root"), "{}", l.describe());
    }

    #[test]
    fn single_partition_layout_from_the_reference_guest() {
        let l = detect_on(
            &crate::tool_output("sysfs-legacy.txt"),
            &crate::tool_output("mountinfo-legacy.txt"),
            "",
        )
        .unwrap();
        assert_eq!(l.disk, "/dev/vda");
        assert_eq!(l.boot, None);
        assert_eq!(
            l.root,
            RootDevice::Partition {
                name: "vda1".into()
            }
        );
        assert_eq!(l.old_vg(), None);
    }

    #[test]
    fn unsupported_layouts_are_named() {
        let mi_root = |dev: &str| format!("22 1 {dev} / / rw - xfs /dev/x rw\n");
        // A VG spanning two disks.
        let spanning = "vda 252:0 disk\nvda1 252:1 part vda 2048\nvda2 252:2 part vda 1050624\nvdb 252:16 disk\nvdb1 252:17 part vdb 2048\ndm-0 253:0 dm centos-root LVM-abc vda2,vdb1\n";
        let e = detect_on(
            spanning,
            &mi_root("253:0"),
            "  /dev/vda2|centos\n  /dev/vdb1|centos\n",
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("spans several disks (vda, vdb)"),
            "{e:#}"
        );
        // The VG's other PV is on another disk even if root's segments are not.
        let e = detect_on(
            spanning,
            &mi_root("253:0"),
            "  /dev/vda2|centos\n  /dev/vdb1|centos\n  /dev/vdc1|other\n",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("spans"), "{e:#}");
        // LUKS root.
        let luks =
            "vda 252:0 disk\nvda2 252:2 part vda 2048\ndm-0 253:0 dm luks-1 CRYPT-LUKS2-xyz vda2\n";
        let e = detect_on(luks, &mi_root("253:0"), "").unwrap_err();
        assert!(format!("{e:#}").contains("LUKS"), "{e:#}");
        // LVM on LUKS.
        let lvm_on_luks = "vda 252:0 disk\nvda2 252:2 part vda 2048\ndm-0 253:0 dm luks-1 CRYPT-LUKS2-xyz vda2\ndm-1 253:1 dm vg-root LVM-abc dm-0\n";
        let e = detect_on(lvm_on_luks, &mi_root("253:1"), "  /dev/dm-0|vg\n").unwrap_err();
        assert!(format!("{e:#}").contains("LUKS"), "{e:#}");
        // md RAID.
        let md = "vda 252:0 disk\nmd0 9:0 md\n";
        let e = detect_on(md, &mi_root("9:0"), "").unwrap_err();
        assert!(format!("{e:#}").contains("md RAID"), "{e:#}");
        // /boot on another disk.
        let two = "vda 252:0 disk\nvda1 252:1 part vda 2048\nvdb 252:16 disk\nvdb1 252:17 part vdb 2048\n";
        let mi =
            "22 1 252:1 / / rw - ext4 /dev/vda1 rw\n30 22 252:17 / /boot rw - ext4 /dev/vdb1 rw\n";
        let e = detect_on(two, mi, "").unwrap_err();
        assert!(
            format!("{e:#}").contains("on disk vda but /boot on disk vdb"),
            "{e:#}"
        );
        // UEFI without an ESP mounted.
        let d = tempfile::tempdir().unwrap();
        fake_sysfs(two, d.path()).unwrap();
        std::fs::create_dir_all(d.path().join("firmware/efi")).unwrap();
        let e = detect(&Probe {
            sys: d.path(),
            mountinfo: "22 1 252:1 / / rw - ext4 /dev/vda1 rw\n",
            root_mount: "/",
            boot_mount: "/boot",
            pvs: &[],
        })
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("booted with UEFI but no EFI System Partition is mounted"),
            "{e:#}"
        );
    }

    #[test]
    fn wiping_zeroes_the_first_mib_of_each_old_pv_only() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        std::fs::write(&img, vec![0xAAu8; 4 << 20]).unwrap();
        wipe_old_pvs(
            &img,
            &[OldPv {
                name: "vda2".into(),
                start_bytes: 2 << 20,
            }],
        )
        .unwrap();
        let data = std::fs::read(&img).unwrap();
        assert!(data[..2 << 20].iter().all(|&b| b == 0xAA));
        assert!(data[2 << 20..3 << 20].iter().all(|&b| b == 0));
        assert!(data[3 << 20..].iter().all(|&b| b == 0xAA));
    }
}
