//! Disk layout arithmetic (DESIGN.md, "Disk layout"): GPT with BIOS boot, /boot and
//! one LVM PV, plus an EFI System Partition on UEFI machines; all boundaries on 1 MiB.

#[cfg(test)]
use crate::plan::Firmware;
use crate::plan::{ByteSizes, MIB};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// A GUID in GPT's on-disk byte order (first three fields little-endian).
pub fn guid_bytes(text: &str) -> Result<[u8; 16]> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let raw = hex::decode(&hex).with_context(|| format!("{text} is not a GUID"))?;
    if raw.len() != 16 {
        bail!("{text} is not a GUID");
    }
    let mut b = [0u8; 16];
    b.copy_from_slice(&raw);
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Ok(b)
}

/// A random (version 4) GUID for the disk and each partition.
fn random_guid() -> Result<[u8; 16]> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    b[7] = (b[7] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b)
}

pub const BIOS_BOOT_GUID: &str = "21686148-6449-6E6F-744E-656564454649";
pub const LINUX_FS_GUID: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
pub const LINUX_LVM_GUID: &str = "E6D6D379-F507-44C2-A23C-238F2A3DF928";
pub const EFI_SYSTEM_GUID: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// The ESP's entry in the GPT: after BIOS boot (1), /boot (2) and the PV (3),
/// so those keep their numbers on both firmwares, while on the disk it lies
/// between BIOS boot and /boot (firmware finds it by type, not by number).
pub const ESP_PARTITION_NUMBER: u32 = 4;
/// LVM's default extent and metadata area.
pub const EXTENT: u64 = 4 * MIB;
pub const PV_METADATA: u64 = MIB;
/// Room left at the end for the backup GPT, rounded to the alignment.
pub const TAIL: u64 = MIB;

/// The slot reserve travels with the VG as a tag (`slot::room` reads it):
/// written by the migration's `vgcreate`, changed with `vgchange`.
pub const RESERVE_TAG: &str = "dualroot_reserve_mib_";

/// The VG tag for a reserve of `bytes`.
pub fn reserve_tag(bytes: u64) -> String {
    format!("{RESERVE_TAG}{}", bytes / MIB)
}

/// The reserve a VG's tags (`vg_tags`, comma-separated) record.
pub fn parse_reserve(tags: &str) -> Option<u64> {
    tags.split(',')
        .find_map(|t| t.trim().strip_prefix(RESERVE_TAG))
        .and_then(|n| n.parse::<u64>().ok())
        .map(|mib| mib * MIB)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Part {
    pub start: u64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub bios: Part,
    /// The EFI System Partition (UEFI machines only), right after BIOS boot.
    pub esp: Option<Part>,
    pub boot: Part,
    pub pv: Part,
    /// LV sizes rounded up to whole extents: root, back, data, image.
    pub lvs: [(&'static str, u64); 4],
    /// VG space left free for the slots to grow into (whole extents); kept on
    /// the VG as a tag (`slot::room`).
    pub slot_reserve: u64,
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Smallest disk that holds the layout (with an explicit slot reserve; `auto`
/// takes what the disk has beyond this).
pub fn min_disk(s: &ByteSizes) -> u64 {
    let lvs: u64 = [s.root, s.back, s.data, s.image]
        .iter()
        .map(|v| round_up(*v, EXTENT))
        .sum();
    2 * MIB
        + round_up(s.esp, MIB)
        + round_up(s.boot, MIB)
        + PV_METADATA
        + lvs
        + round_up(s.slot_reserve.unwrap_or(0), EXTENT)
        + TAIL
}

/// The `auto` slot reserve: enough for both slots to double (root + back), but
/// at most half of the VG space the fixed LVs leave (`spare`), so `data` and
/// `image` get at least the other half. Whole extents.
pub fn auto_slot_reserve(root: u64, back: u64, spare: u64) -> u64 {
    (root + back).min(spare / 2) / EXTENT * EXTENT
}

pub fn compute(disk_bytes: u64, s: &ByteSizes) -> Result<Layout> {
    let need = min_disk(s);
    if disk_bytes < need {
        bail!(
            "the disk holds {} MiB but the layout needs at least {} MiB ({}/boot {} MiB, LVs root {} + back {} + data {} + image {} MiB{}, plus 4 MiB for GPT, BIOS boot and LVM metadata)",
            disk_bytes / MIB,
            need / MIB,
            if s.esp > 0 {
                format!("ESP {} MiB, ", s.esp.div_ceil(MIB))
            } else {
                String::new()
            },
            s.boot / MIB,
            s.root / MIB,
            s.back / MIB,
            s.data / MIB,
            s.image / MIB,
            match s.slot_reserve {
                Some(r) => format!(", slot reserve {} MiB", r / MIB),
                None => String::new(),
            }
        );
    }
    let bios = Part {
        start: MIB,
        size: MIB,
    };
    let esp = (s.esp > 0).then(|| Part {
        start: 2 * MIB,
        size: round_up(s.esp, MIB),
    });
    let boot = Part {
        start: esp.map_or(2 * MIB, |e| e.start + e.size),
        size: round_up(s.boot, MIB),
    };
    let pv_start = boot.start + boot.size;
    let pv_end = (disk_bytes - TAIL) / MIB * MIB;
    let lvs = [
        ("root", round_up(s.root, EXTENT)),
        ("back", round_up(s.back, EXTENT)),
        ("data", round_up(s.data, EXTENT)),
        ("image", round_up(s.image, EXTENT)),
    ];
    // What lvm can hand out: whole extents after the metadata area.
    let extents = (pv_end - pv_start - PV_METADATA) / EXTENT * EXTENT;
    let spare = extents - lvs.iter().map(|(_, v)| v).sum::<u64>();
    let slot_reserve = match s.slot_reserve {
        Some(r) => round_up(r, EXTENT).min(spare),
        None => auto_slot_reserve(lvs[0].1, lvs[1].1, spare),
    };
    Ok(Layout {
        bios,
        esp,
        boot,
        pv: Part {
            start: pv_start,
            size: pv_end - pv_start,
        },
        lvs,
        slot_reserve,
    })
}

impl Layout {
    /// The sizes the layout was computed for (LVs rounded to extents).
    pub fn sizes(&self) -> ByteSizes {
        let lv = |n: &str| {
            self.lvs
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| *v)
                .unwrap_or(0)
        };
        ByteSizes {
            boot: self.boot.size,
            root: lv("root"),
            back: lv("back"),
            data: lv("data"),
            image: lv("image"),
            slot_reserve: Some(self.slot_reserve),
            esp: self.esp.map_or(0, |e| e.size),
        }
    }

    /// Writes this layout's partition table to `dev` (a disk, or an image file
    /// in tests) in-process, so no partitioning tool of the old OS is needed (EL7's
    /// sfdisk cannot write GPT): protective MBR, primary and backup GPT with the
    /// BIOS boot, `/boot` and LVM partitions (names `bios`, `boot`, `lvm`) and
    /// on UEFI the ESP (`esp`, entry [`ESP_PARTITION_NUMBER`]), then the first
    /// MiB of each partition zeroed, so no old filesystem, LVM or RAID
    /// signature is found in them. Synced before it returns.
    pub fn write_gpt(&self, dev: &Path) -> Result<()> {
        const SECTOR: u64 = 512;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .with_context(|| format!("opening {} to write its partition table", dev.display()))?;
        let mut gpt = gptman::GPT::new_from(&mut f, SECTOR, random_guid()?)
            .with_context(|| format!("preparing a GPT for {}", dev.display()))?;
        let mut entries = vec![
            (1, self.bios, BIOS_BOOT_GUID, "bios"),
            (2, self.boot, LINUX_FS_GUID, "boot"),
            (3, self.pv, LINUX_LVM_GUID, "lvm"),
        ];
        if let Some(esp) = self.esp {
            entries.push((ESP_PARTITION_NUMBER, esp, EFI_SYSTEM_GUID, "esp"));
        }
        for (n, part, kind, name) in &entries {
            let (part, name) = (*part, *name);
            gpt[*n] = gptman::GPTPartitionEntry {
                partition_type_guid: guid_bytes(kind)?,
                unique_partition_guid: random_guid()?,
                starting_lba: part.start / SECTOR,
                ending_lba: (part.start + part.size) / SECTOR - 1,
                attribute_bits: 0,
                partition_name: name.into(),
            };
        }
        gpt.write_into(&mut f)
            .with_context(|| format!("writing the GPT to {}", dev.display()))?;
        gptman::GPT::write_protective_mbr_into(&mut f, SECTOR)
            .with_context(|| format!("writing the protective MBR to {}", dev.display()))?;
        let zeros = vec![0u8; MIB as usize];
        for (_, part, _, _) in entries {
            f.seek(SeekFrom::Start(part.start))?;
            f.write_all(&zeros[..part.size.min(MIB) as usize])
                .with_context(|| format!("wiping old signatures on {}", dev.display()))?;
        }
        f.sync_all()
            .with_context(|| format!("syncing {}", dev.display()))
    }

    /// Where the `data` LV lies on the disk when the LVs are made in order on an
    /// empty PV whose data starts `PV_METADATA` in (what `volumes` does and checks).
    pub fn data_lv_offset(&self) -> u64 {
        self.pv.start + PV_METADATA + self.lvs[0].1 + self.lvs[1].1
    }

    /// Every region the unrecoverable window may write, as `undo` saves them:
    /// MBR, GPT, boot gap and BIOS boot, the new `/boot`, the new PV's label and
    /// metadata (4 MiB: whatever `pe_start` lvm picks within it), the `data` LV
    /// (mkfs, stash), the backup-GPT tail, and the first MiB of each old PV
    /// (wiped first). The slots and `image` are not written before the window closes.
    pub fn undo_regions(&self, disk_bytes: u64, old_pvs: &[u64]) -> Vec<crate::undo::Region> {
        let r = |offset: u64, len: u64, what: &str| crate::undo::Region {
            offset,
            len: len.min(disk_bytes.saturating_sub(offset)),
            what: what.to_string(),
        };
        let mut v = vec![
            r(
                0,
                self.boot.start + self.boot.size,
                "partition tables, boot gap and /boot",
            ),
            r(self.pv.start, 4 * MIB, "PV label and metadata"),
            r(self.data_lv_offset(), self.lvs[2].1, "data LV"),
            r(
                self.pv.start + self.pv.size,
                disk_bytes - (self.pv.start + self.pv.size),
                "backup GPT",
            ),
        ];
        for pv in old_pvs {
            v.push(r(*pv, MIB, "old PV label"));
        }
        crate::undo::merge(v)
    }

    /// Byte ranges the migration writes, for the readability check.
    pub fn written_regions(&self, disk_bytes: u64) -> Vec<(u64, u64)> {
        vec![
            (0, self.boot.start + MIB), // MBR, GPT, BIOS boot, start of /boot
            (self.pv.start, 4 * MIB),   // PV label and metadata
            (disk_bytes - TAIL, TAIL),  // backup GPT
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysinfo::parse_sfdisk;

    /// The partition table `sfdisk -J` reads from an image file.
    fn sfdisk_table(img: &Path) -> crate::sysinfo::SfdiskTable {
        let out = std::process::Command::new("sfdisk")
            .arg("-J")
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_sfdisk(&String::from_utf8_lossy(&out.stdout)).unwrap()
    }

    fn sizes() -> ByteSizes {
        ByteSizes {
            boot: 512 * MIB,
            root: 2048 * MIB,
            back: 2048 * MIB,
            data: 766 * MIB,
            image: 128 * MIB,
            slot_reserve: None,
            esp: 0,
        }
    }

    #[test]
    fn minimum_disk() {
        // 766 MiB rounds up to 768 MiB (whole 4 MiB extents).
        assert_eq!(
            min_disk(&sizes()),
            (2 + 512 + 1 + 2048 + 2048 + 768 + 128 + 1) * MIB
        );
        assert!(compute(min_disk(&sizes()), &sizes()).is_ok());
        let e = compute(min_disk(&sizes()) - 1, &sizes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs at least 5508 MiB"), "{e}");
    }

    #[test]
    fn slot_reserve_auto_doubles_the_slots_within_half_the_spare_room() {
        // 8 GiB: the fixed LVs leave 2677 MiB; half of it (whole extents).
        let l = compute(8 * 1024 * MIB, &sizes()).unwrap();
        let spare = l.pv.size - PV_METADATA - l.lvs.iter().map(|(_, v)| v).sum::<u64>();
        assert_eq!(l.slot_reserve, spare / 2 / EXTENT * EXTENT);
        // 40 GiB: root + back, so each slot can double.
        let l = compute(40 * 1024 * MIB, &sizes()).unwrap();
        assert_eq!(l.slot_reserve, 4096 * MIB);
        assert_eq!(l.sizes().slot_reserve, Some(4096 * MIB));
        // At the minimum disk there is nothing to reserve, and that is allowed.
        assert_eq!(
            compute(min_disk(&sizes()), &sizes()).unwrap().slot_reserve,
            0
        );
    }

    #[test]
    fn explicit_slot_reserve_is_part_of_the_minimum_disk() {
        let s = ByteSizes {
            slot_reserve: Some(3000 * MIB),
            ..sizes()
        };
        assert_eq!(min_disk(&s), min_disk(&sizes()) + 3000 * MIB);
        assert_eq!(compute(min_disk(&s), &s).unwrap().slot_reserve, 3000 * MIB);
        let e = compute(min_disk(&s) - MIB, &s).unwrap_err().to_string();
        assert!(e.contains("slot reserve 3000 MiB"), "{e}");
    }

    #[test]
    fn undo_regions_cover_the_window_and_not_the_slots() {
        let disk = 8 * 1024 * MIB;
        let l = compute(disk, &sizes()).unwrap();
        let old_pv = 600 * MIB;
        let r = l.undo_regions(disk, &[old_pv]);
        // Head (tables, BIOS boot, /boot) touches the PV head: one region.
        assert_eq!((r[0].offset, r[0].len), (0, (2 + 512 + 4) * MIB));
        assert_eq!((r[1].offset, r[1].len), (old_pv, MIB));
        let data = l.pv.start + MIB + 2 * 2048 * MIB;
        assert_eq!((r[2].offset, r[2].len), (data, 768 * MIB));
        assert_eq!(r[3].offset + r[3].len, disk, "up to the last byte");
        assert_eq!(r.len(), 4);
        // Not the slots: nothing between the PV head and data is saved.
        assert!(r.iter().all(|x| x.offset + x.len <= l.pv.start + 4 * MIB
            || x.offset >= data
            || x.offset == old_pv));
    }

    #[test]
    fn aligned_and_disjoint() {
        let disk = 8 * 1024 * MIB + 12345;
        let l = compute(disk, &sizes()).unwrap();
        for p in [l.bios, l.boot, l.pv] {
            assert_eq!(p.start % MIB, 0);
            assert_eq!(p.size % MIB, 0);
        }
        assert_eq!(l.bios.start + l.bios.size, l.boot.start);
        assert_eq!(l.boot.start + l.boot.size, l.pv.start);
        assert!(l.pv.start + l.pv.size <= disk - 33 * 512);
        assert_eq!(l.lvs[2], ("data", 768 * MIB));
    }

    #[test]
    fn gpt_written_in_process_reads_back_with_sfdisk() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let disk = 8 * 1024 * MIB;
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(disk).unwrap();
        // An old ext4 superblock magic where the old root began (1 MiB + 1080).
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(MIB + 1080)).unwrap();
        f.write_all(&[0x53, 0xef]).unwrap();
        drop(f);
        let l = compute(
            disk,
            &ByteSizes {
                boot: 512 * MIB,
                ..sizes()
            },
        )
        .unwrap();
        l.write_gpt(&img).unwrap();
        let t = sfdisk_table(&img);
        assert_eq!(t.label, "gpt");
        let want = [
            (l.bios, BIOS_BOOT_GUID, "bios"),
            (l.boot, LINUX_FS_GUID, "boot"),
            (l.pv, LINUX_LVM_GUID, "lvm"),
        ];
        assert_eq!(t.partitions.len(), 3);
        for (p, (part, kind, name)) in t.partitions.iter().zip(want) {
            assert_eq!(p.start * 512, part.start, "{name}");
            assert_eq!(p.size * 512, part.size, "{name}");
            assert_eq!(p.kind.to_uppercase(), kind, "{name}");
            assert_eq!(p.name.as_deref(), Some(name));
        }
        // The same table sfdisk made from our script (captured in a guest).
        let captured = parse_sfdisk(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../fixtures/tool-output/sfdisk-gpt-after.json"
            ))
            .unwrap(),
        )
        .unwrap();
        for (a, b) in t.partitions.iter().zip(&captured.partitions) {
            assert_eq!(
                (a.start, a.kind.to_uppercase()),
                (b.start, b.kind.to_uppercase())
            );
        }
        let mut f = std::fs::File::open(&img).unwrap();
        let mut magic = [0u8; 2];
        f.seek(SeekFrom::Start(MIB + 1080)).unwrap();
        f.read_exact(&mut magic).unwrap();
        assert_eq!(magic, [0, 0], "the old superblock is wiped");
        assert_eq!(
            guid_bytes(BIOS_BOOT_GUID).unwrap()[..4],
            [0x48, 0x61, 0x68, 0x21]
        );
    }

    /// UEFI: the ESP lies between BIOS boot and /boot on the disk and is GPT
    /// entry 4, so BIOS boot, /boot and the PV keep numbers 1-3; everything
    /// after it moves by its size; the undo record's head region covers it.
    #[test]
    fn efi_layout_puts_the_esp_after_bios_boot_as_entry_4() {
        let efi = ByteSizes {
            esp: 256 * MIB,
            ..sizes()
        };
        assert_eq!(min_disk(&efi), min_disk(&sizes()) + 256 * MIB);
        let e = compute(min_disk(&efi) - MIB, &efi).unwrap_err().to_string();
        assert!(e.contains("ESP 256 MiB, /boot 512 MiB"), "{e}");
        let disk = 8 * 1024 * MIB;
        let (b, l) = (
            compute(disk, &sizes()).unwrap(),
            compute(disk, &efi).unwrap(),
        );
        assert_eq!(b.esp, None);
        let esp = l.esp.unwrap();
        assert_eq!((esp.start, esp.size), (2 * MIB, 256 * MIB));
        assert_eq!(l.boot.start, 258 * MIB);
        assert_eq!(l.pv.start, b.pv.start + 256 * MIB);
        assert_eq!(l.pv.start + l.pv.size, b.pv.start + b.pv.size);
        assert_eq!(l.sizes().esp, 256 * MIB);
        assert_eq!(b.sizes().esp, 0);
        let head = &l.undo_regions(disk, &[])[0];
        assert!(head.offset == 0 && head.len >= l.boot.start + l.boot.size);

        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(disk).unwrap();
        l.write_gpt(&img).unwrap();
        let t = sfdisk_table(&img);
        let want = [
            ("1", l.bios, BIOS_BOOT_GUID, "bios"),
            ("2", l.boot, LINUX_FS_GUID, "boot"),
            ("3", l.pv, LINUX_LVM_GUID, "lvm"),
            ("4", esp, EFI_SYSTEM_GUID, "esp"),
        ];
        assert_eq!(t.partitions.len(), 4, "{t:?}");
        for (n, part, kind, name) in want {
            let p = t
                .partitions
                .iter()
                .find(|p| p.node.ends_with(n))
                .unwrap_or_else(|| panic!("no partition {n}: {t:?}"));
            assert_eq!(
                (p.start * 512, p.size * 512),
                (part.start, part.size),
                "{name}"
            );
            assert_eq!(p.kind.to_uppercase(), kind, "{name}");
            assert_eq!(p.name.as_deref(), Some(name));
        }
        let verify = std::process::Command::new("sfdisk")
            .arg("--verify")
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
    }

    #[test]
    fn the_firmware_decides_the_esp_and_the_plan_its_size() {
        let plan = |esp: &str| {
            crate::plan::Plan::parse(&format!(
                "[bundle]\npath = \"/b\"\nkeyring = \"/k\"\n[sizes]\nboot = \"512M\"\nroot = \"3G\"\nback = \"3G\"\ndata = \"1G\"\nimage = \"256M\"\nesp = \"{esp}\"\n"
            ))
        };
        let auto = plan("auto").unwrap();
        let s = sizes();
        assert_eq!(s.for_firmware(Firmware::Bios, &auto).unwrap().esp, 0);
        assert_eq!(
            s.for_firmware(Firmware::Uefi, &auto).unwrap().esp,
            crate::plan::DEFAULT_ESP
        );
        let big = plan("600M").unwrap();
        assert_eq!(s.for_firmware(Firmware::Uefi, &big).unwrap().esp, 600 * MIB);
        let e = format!("{:#}", plan("32M").unwrap_err());
        assert!(e.contains("sizes.esp is 32 MiB; at least 64 MiB"), "{e}");
    }
}
