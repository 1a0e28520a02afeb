//! Disk layout arithmetic (DESIGN.md, "Disk layout"): GPT with BIOS boot, /boot and
//! one LVM PV; all boundaries on 1 MiB.

use crate::plan::{ByteSizes, MIB};
use anyhow::{bail, Result};
use serde::Serialize;

pub const BIOS_BOOT_GUID: &str = "21686148-6449-6E6F-744E-656564454649";
pub const LINUX_FS_GUID: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
pub const LINUX_LVM_GUID: &str = "E6D6D379-F507-44C2-A23C-238F2A3DF928";
/// LVM's default extent and metadata area.
pub const EXTENT: u64 = 4 * MIB;
pub const PV_METADATA: u64 = MIB;
/// Room left at the end for the backup GPT, rounded to the alignment.
pub const TAIL: u64 = MIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Part {
    pub start: u64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub bios: Part,
    pub boot: Part,
    pub pv: Part,
    /// LV sizes rounded up to whole extents: root, back, data, image.
    pub lvs: [(&'static str, u64); 4],
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Smallest disk that holds the layout.
pub fn min_disk(s: &ByteSizes) -> u64 {
    let lvs: u64 = [s.root, s.back, s.data, s.image]
        .iter()
        .map(|v| round_up(*v, EXTENT))
        .sum();
    2 * MIB + round_up(s.boot, MIB) + PV_METADATA + lvs + TAIL
}

pub fn compute(disk_bytes: u64, s: &ByteSizes) -> Result<Layout> {
    let need = min_disk(s);
    if disk_bytes < need {
        bail!(
            "the disk holds {} MiB but the layout needs at least {} MiB (/boot {} MiB, LVs root {} + back {} + data {} + image {} MiB, plus 4 MiB for GPT, BIOS boot and LVM metadata)",
            disk_bytes / MIB,
            need / MIB,
            s.boot / MIB,
            s.root / MIB,
            s.back / MIB,
            s.data / MIB,
            s.image / MIB
        );
    }
    let bios = Part {
        start: MIB,
        size: MIB,
    };
    let boot = Part {
        start: 2 * MIB,
        size: round_up(s.boot, MIB),
    };
    let pv_start = boot.start + boot.size;
    let pv_end = (disk_bytes - TAIL) / MIB * MIB;
    Ok(Layout {
        bios,
        boot,
        pv: Part {
            start: pv_start,
            size: pv_end - pv_start,
        },
        lvs: [
            ("root", round_up(s.root, EXTENT)),
            ("back", round_up(s.back, EXTENT)),
            ("data", round_up(s.data, EXTENT)),
            ("image", round_up(s.image, EXTENT)),
        ],
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
        }
    }

    /// Input for `sfdisk` (sectors of 512 bytes).
    pub fn sfdisk_script(&self) -> String {
        let sec = |b: u64| b / 512;
        format!(
            "label: gpt\nfirst-lba: 34\nstart={}, size={}, type={BIOS_BOOT_GUID}, name=bios\nstart={}, size={}, type={LINUX_FS_GUID}, name=boot\nstart={}, size={}, type={LINUX_LVM_GUID}, name=lvm\n",
            sec(self.bios.start),
            sec(self.bios.size),
            sec(self.boot.start),
            sec(self.boot.size),
            sec(self.pv.start),
            sec(self.pv.size)
        )
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

    fn sizes() -> ByteSizes {
        ByteSizes {
            boot: 512 * MIB,
            root: 2048 * MIB,
            back: 2048 * MIB,
            data: 766 * MIB,
            image: 128 * MIB,
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
    fn sfdisk_script_matches_captured_table() {
        // The captured table came from feeding sfdisk a script of this shape
        // (8 GiB image, 512 MiB /boot).
        let l = compute(
            8 * 1024 * MIB,
            &ByteSizes {
                boot: 512 * MIB,
                ..sizes()
            },
        )
        .unwrap();
        let s = l.sfdisk_script();
        assert!(s.starts_with("label: gpt\n"));
        assert!(s.contains(&format!("start=2048, size=2048, type={BIOS_BOOT_GUID}")));
        let captured = parse_sfdisk(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../fixtures/tool-output/sfdisk-gpt-after.json"
            ))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(captured.partitions[1].start * 512, l.boot.start);
        assert_eq!(captured.partitions[2].start * 512, l.pv.start);
    }
}
