//! Room over ten years of upgrades (issue 25): the VG keeps a *slot reserve*
//! free so a bigger OS image can grow its slot, `data` and `image` only ever
//! get what lies beyond it, and a disk the hypervisor enlarged is followed at
//! boot (partition, PV, then the same policy).
//!
//! The reserve is a number on the VG itself (tag `dualroot_reserve_mib_<N>`,
//! `layout::reserve_tag`, written by the migration's `vgcreate`), so it travels with the disk and an
//! operator changes it with `vgchange --deltag/--addtag`. A VG made before the
//! tag existed reserves root + back (each slot can double).
//!
//! Policy, one rule: the VG's free space up to the reserve stays free; only
//! the excess goes to `data` and `image`. A slot that grew took from the
//! reserve, so the next disk growth refills the reserve first.

use crate::blockdev::Lvm;
use crate::cmd::{cmd, CommandExt};
use crate::layout::{parse_reserve, reserve_tag, EXTENT, TAIL};
use crate::plan::MIB;
use anyhow::{bail, Context, Result};
use fs_err as fs;
use std::path::{Path, PathBuf};

/// Below this, free space is not worth an lvextend (and lvm may refuse it).
pub const MIN_GROWTH: u64 = 16 * MIB;

/// What of `free` bytes `data` and `image` may get: the excess over the
/// reserve, in whole extents, or nothing when it is too small to bother.
pub fn give_out(free: u64, reserve: u64) -> u64 {
    let v = free.saturating_sub(reserve) / EXTENT * EXTENT;
    if v < MIN_GROWTH {
        0
    } else {
        v
    }
}

/// `give` bytes split between `data` (`data_percent`) and `image`, whole extents.
pub fn split(give: u64, data_percent: u32) -> (u64, u64) {
    let data = give / EXTENT * u64::from(data_percent) / 100 * EXTENT;
    (data, give - data)
}

/// One VG's sizes as `room` needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VgRoom {
    pub free: u64,
    pub reserve: u64,
    /// Whether the reserve came from the tag (else: root + back).
    pub tagged: bool,
}

pub fn vg_room(lvm: &Lvm, vg: &str) -> Result<VgRoom> {
    let rows = lvm.report(&["vgs", "-o", "vg_name,vg_free,vg_tags", vg], "vg")?;
    let row = rows
        .iter()
        .find(|r| r.get("vg_name").map(String::as_str) == Some(vg))
        .with_context(|| format!("lvm reports no volume group {vg}"))?;
    let free = row
        .get("vg_free")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("lvm reports no vg_free for {vg}"))?;
    match row.get("vg_tags").and_then(|t| parse_reserve(t)) {
        Some(reserve) => Ok(VgRoom {
            free,
            reserve,
            tagged: true,
        }),
        None => {
            let lvs = lvm.report(&["lvs", "-o", "lv_name,lv_size", vg], "lv")?;
            let reserve = lvs
                .iter()
                .filter(|r| {
                    matches!(
                        r.get("lv_name").map(String::as_str),
                        Some("root") | Some("back")
                    )
                })
                .filter_map(|r| r.get("lv_size").and_then(|s| s.parse::<u64>().ok()))
                .sum();
            Ok(VgRoom {
                free,
                reserve,
                tagged: false,
            })
        }
    }
}

/// Grows `data` and `image` by what the policy gives out (LVs first, then
/// their ext4, online when mounted). Re-runnable: a cut after `lvextend`
/// only resizes. Returns what it did, for the log.
pub fn grow_data_image(vg: &str, data_percent: u32) -> Result<String> {
    let lvm = Lvm::default();
    let room = vg_room(&lvm, vg)?;
    let give = give_out(room.free, room.reserve);
    let mut done = Vec::new();
    if give > 0 {
        let (data, image) = split(give, data_percent);
        for (lv, by) in [("data", data), ("image", image)] {
            if by > 0 {
                lvm.run(&["lvextend", "-L", &format!("+{by}b"), &format!("{vg}/{lv}")])?;
            }
        }
        done.push(format!(
            "{} MiB of {} MiB free given out (data +{} MiB, image +{} MiB)",
            give / MIB,
            room.free / MIB,
            data / MIB,
            image / MIB
        ));
    }
    done.push(format!(
        "{} MiB kept free as the slot reserve ({})",
        room.free.saturating_sub(give) / MIB,
        if room.tagged {
            format!("VG tag {}", reserve_tag(room.reserve))
        } else {
            "no reserve tag on the VG: root + back".to_string()
        }
    ));
    for lv in ["data", "image"] {
        let dev = format!("/dev/{vg}/{lv}");
        let names = [dev.clone(), format!("/dev/mapper/{vg}-{lv}")];
        if crate::mounts::mount_point_of(&names).is_none() {
            cmd("e2fsck", ["-f", "-p", &dev]).run()?;
        }
        cmd("resize2fs", [&dev]).run()?;
    }
    done.push(lvm.lv_sizes(vg)?);
    Ok(done.join("; "))
}

/// What a slot LV of `lv_bytes` must grow by to hold `need` bytes, in whole
/// extents (0 when it already does).
pub fn slot_growth(lv_bytes: u64, need: u64) -> u64 {
    need.saturating_sub(lv_bytes).div_ceil(EXTENT) * EXTENT
}

/// The refusal when a slot cannot grow by `growth`: the sizes, and what would
/// make room.
pub fn slot_growth_refusal(
    target: &str,
    dev: &Path,
    lv_bytes: u64,
    need: u64,
    growth: u64,
    vg: &str,
    room: &VgRoom,
) -> String {
    let short = growth.saturating_sub(room.free);
    format!(
        "slot {target}'s LV {} is {} MiB and the bundle needs {} MiB; growing it by {} MiB needs that much free space in VG {vg}, which has {} MiB (slot reserve {} MiB); {} MiB short: grow the disk by at least {} MiB (the next boot gives new space to the slot reserve first) or shrink data or image",
        dev.display(),
        lv_bytes / MIB,
        need.div_ceil(MIB),
        growth / MIB,
        room.free / MIB,
        room.reserve / MIB,
        short.div_ceil(MIB),
        short.div_ceil(MIB),
    )
}

/// Where the PV of a VG lies: the partition, its disk and number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvPlace {
    pub pv: PathBuf,
    pub disk: PathBuf,
    pub partno: u32,
    /// Partition start and size, bytes (sysfs).
    pub start: u64,
    pub size: u64,
    pub disk_bytes: u64,
}

fn sys_u64(p: &Path) -> Result<u64> {
    fs::read_to_string(p)?
        .trim()
        .parse()
        .with_context(|| format!("{} is not a number", p.display()))
}

/// The partition `pv` (a device path) from sysfs under `sys_block`
/// (`/sys/class/block`): its disk, number, start and size.
pub fn pv_place(sys_block: &Path, pv: &Path) -> Result<PvPlace> {
    let real = fs::canonicalize(pv)?;
    let name = real
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no device name", real.display()))?
        .to_string();
    let dir = sys_block.join(&name);
    let partno = sys_u64(&dir.join("partition")).with_context(|| {
        format!(
            "{name} is not a partition (the PV must be a disk partition to follow the disk's size)"
        )
    })? as u32;
    // /sys/class/block/vda3 -> .../block/vda/vda3: the parent is the disk.
    let disk_name = fs::canonicalize(&dir)?
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .with_context(|| format!("no disk above {name} in sysfs"))?
        .to_string();
    Ok(PvPlace {
        pv: real,
        disk: PathBuf::from("/dev").join(&disk_name),
        partno,
        start: sys_u64(&dir.join("start"))? * 512,
        size: sys_u64(&dir.join("size"))? * 512,
        disk_bytes: sys_u64(&sys_block.join(&disk_name).join("size"))? * 512,
    })
}

/// Where the last partition may end on a disk of `disk_bytes` (the layout's
/// rule: 1 MiB aligned, the tail left for the backup GPT).
pub fn last_partition_end(disk_bytes: u64) -> u64 {
    (disk_bytes - TAIL) / MIB * MIB
}

/// Moves the backup GPT to the end of a disk (or image file) that grew and
/// extends partition `partno`, the last one, to the layout's end. The boot
/// code in the MBR stays; the protective MBR entry is rewritten for the new
/// size. Returns the partition's old and new size in bytes, or `None` when
/// the disk has not grown by at least [`MIN_GROWTH`].
pub fn grow_gpt_partition(dev: &Path, partno: u32) -> Result<Option<(u64, u64)>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .with_context(|| format!("opening {} to grow partition {partno}", dev.display()))?;
    let disk_bytes = f.seek(SeekFrom::End(0))?;
    let mut gpt = gptman::GPT::find_from(&mut f)
        .with_context(|| format!("reading the GPT of {}", dev.display()))?;
    let ss = gpt.sector_size;
    let p = gpt[partno].clone();
    if !p.is_used() {
        bail!("{} has no partition {partno}", dev.display());
    }
    if gpt
        .iter()
        .any(|(i, q)| i != partno && q.is_used() && q.starting_lba > p.starting_lba)
    {
        bail!(
            "partition {partno} of {} is not the last one; it cannot follow the disk's size",
            dev.display()
        );
    }
    let old_size = (p.ending_lba + 1 - p.starting_lba) * ss;
    let new_end = last_partition_end(disk_bytes);
    let new_size = new_end - p.starting_lba * ss;
    if new_size < old_size + MIN_GROWTH {
        return Ok(None);
    }
    // The MBR's boot flag as grub-install or the migration left it.
    let mut mbr = [0u8; 512];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut mbr)?;
    let bootable = mbr[446] == 0x80;
    gpt.header
        .update_from(&mut f, ss)
        .with_context(|| format!("moving the backup GPT of {} to its end", dev.display()))?;
    gpt[partno].ending_lba = new_end / ss - 1;
    if gpt[partno].ending_lba > gpt.header.last_usable_lba {
        bail!(
            "the new end of partition {partno} of {} lies past the GPT's last usable sector",
            dev.display()
        );
    }
    gpt.write_into(&mut f)
        .with_context(|| format!("writing the grown GPT of {}", dev.display()))?;
    if bootable {
        gptman::GPT::write_bootable_protective_mbr_into(&mut f, ss)
    } else {
        gptman::GPT::write_protective_mbr_into(&mut f, ss)
    }
    .with_context(|| format!("writing the protective MBR of {}", dev.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", dev.display()))?;
    Ok(Some((old_size, new_size)))
}

/// At boot: when the disk under VG `vg` grew (the hypervisor enlarged the
/// virtual disk), grow the PV's partition, tell the kernel, and `pvresize`.
/// Each part is re-runnable: a cut after the GPT write leaves a partition
/// larger than its PV, which the next boot's `pvresize` takes. Returns what it
/// did, `None` when there was nothing to do.
pub fn follow_disk(vg: &str) -> Result<Option<String>> {
    let lvm = Lvm::default();
    let pvs = lvm.report(&["pvs", "-o", "pv_name,vg_name,pv_size,dev_size"], "pv")?;
    let mine: Vec<_> = pvs
        .iter()
        .filter(|r| r.get("vg_name").map(String::as_str) == Some(vg))
        .collect();
    let [row] = mine.as_slice() else {
        // dualroot's layout has one PV; anything else is an operator's own.
        return Ok(None);
    };
    let pv = PathBuf::from(row.get("pv_name").cloned().unwrap_or_default());
    let place = pv_place(Path::new("/sys/class/block"), &pv)?;
    let mut notes = Vec::new();
    if last_partition_end(place.disk_bytes) >= place.start + place.size + MIN_GROWTH {
        if let Some((old, new)) = grow_gpt_partition(&place.disk, place.partno)? {
            notes.push(format!(
                "disk {} grew to {} MiB: partition {} from {} to {} MiB",
                place.disk.display(),
                place.disk_bytes / MIB,
                place.partno,
                old / MIB,
                new / MIB
            ));
            // BLKPG resize of a partition in use (what growpart does).
            cmd(
                "partx",
                [
                    "-u",
                    "--nr",
                    &place.partno.to_string(),
                    &place.disk.display().to_string(),
                ],
            )
            .run()
            .with_context(|| {
                format!(
                    "telling the kernel that partition {} of {} grew; the next boot reads it",
                    place.partno,
                    place.disk.display()
                )
            })?;
        }
    }
    let place = pv_place(Path::new("/sys/class/block"), &pv)?;
    let pv_size: u64 = row.get("pv_size").and_then(|v| v.parse().ok()).unwrap_or(0);
    if place.size >= pv_size + MIN_GROWTH {
        lvm.run(&["pvresize", &pv.display().to_string()])?;
        notes.push(format!(
            "PV {} grown from {} to {} MiB",
            pv.display(),
            pv_size / MIB,
            place.size / MIB
        ));
    }
    Ok((!notes.is_empty()).then(|| notes.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout;
    use crate::plan::ByteSizes;

    #[test]
    fn reserve_tag_round_trip_and_policy() {
        assert_eq!(reserve_tag(2048 * MIB), "dualroot_reserve_mib_2048");
        assert_eq!(
            parse_reserve("other,dualroot_reserve_mib_2048"),
            Some(2048 * MIB)
        );
        assert_eq!(parse_reserve(""), None);
        assert_eq!(parse_reserve("dualroot_reserve_mib_x"), None);
        // Free space up to the reserve stays; the excess goes out in extents.
        assert_eq!(give_out(3000 * MIB, 2048 * MIB), 952 * MIB);
        assert_eq!(give_out(2050 * MIB, 2048 * MIB), 0, "below 16 MiB");
        assert_eq!(
            give_out(1000 * MIB, 2048 * MIB),
            0,
            "a slot grew: refill first"
        );
        assert_eq!(split(952 * MIB, 50), (476 * MIB, 476 * MIB));
        assert_eq!(split(100 * MIB, 50), (48 * MIB, 52 * MIB), "extents");
        assert_eq!(slot_growth(1280 * MIB, 1281 * MIB), 4 * MIB);
        assert_eq!(slot_growth(1280 * MIB, 1000 * MIB), 0);
    }

    #[test]
    fn refusal_names_sizes_and_the_way_out() {
        let room = VgRoom {
            free: 500 * MIB,
            reserve: 2560 * MIB,
            tagged: true,
        };
        let m = slot_growth_refusal(
            "b",
            Path::new("/dev/VA/back"),
            1280 * MIB,
            2100 * MIB,
            820 * MIB,
            "VA",
            &room,
        );
        assert_eq!(m, "slot b's LV /dev/VA/back is 1280 MiB and the bundle needs 2100 MiB; growing it by 820 MiB needs that much free space in VG VA, which has 500 MiB (slot reserve 2560 MiB); 320 MiB short: grow the disk by at least 320 MiB (the next boot gives new space to the slot reserve first) or shrink data or image");
    }

    fn sizes() -> ByteSizes {
        ByteSizes {
            boot: 256 * MIB,
            root: 1024 * MIB,
            back: 1024 * MIB,
            data: 512 * MIB,
            image: 64 * MIB,
            slot_reserve: None,
            esp: 0,
        }
    }

    /// The layout's GPT on an image file, the file grown by 2 GiB as a
    /// hypervisor grows a disk: partition 3 follows, the backup GPT moves to
    /// the new end, the other partitions and the MBR's boot code stay.
    #[test]
    fn grown_disk_image_extends_the_last_partition() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let disk = 6 * 1024 * MIB;
        std::fs::File::create(&img).unwrap().set_len(disk).unwrap();
        let l = layout::compute(disk, &sizes()).unwrap();
        l.write_gpt(&img).unwrap();
        // GRUB's boot.img in the first 440 bytes.
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.seek(SeekFrom::Start(0)).unwrap();
            f.write_all(&[0xeb; 440]).unwrap();
        }
        assert_eq!(
            grow_gpt_partition(&img, 3).unwrap(),
            None,
            "not grown: nothing to do"
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(disk + 2048 * MIB)
            .unwrap();
        let (old, new) = grow_gpt_partition(&img, 3).unwrap().unwrap();
        assert_eq!(old, l.pv.size);
        assert_eq!(new, l.pv.size + 2048 * MIB);
        let mut f = std::fs::File::open(&img).unwrap();
        let gpt = gptman::GPT::find_from(&mut f).unwrap();
        assert_eq!(gpt.header.backup_lba, (disk + 2048 * MIB) / 512 - 1);
        assert_eq!((gpt[3].ending_lba + 1) * 512, l.pv.start + new);
        assert_eq!(gpt[2].starting_lba * 512, l.boot.start);
        assert_eq!((gpt[2].ending_lba + 1) * 512, l.boot.start + l.boot.size);
        // The backup header at the new end is valid on its own.
        use std::io::{Read, Seek, SeekFrom};
        f.seek(SeekFrom::Start(gpt.header.backup_lba * 512))
            .unwrap();
        let backup = gptman::GPTHeader::read_from(&mut f).unwrap();
        assert_eq!(backup.primary_lba, gpt.header.backup_lba);
        let mut mbr = [0u8; 512];
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut mbr).unwrap();
        assert!(mbr[..440].iter().all(|b| *b == 0xeb), "boot code kept");
        assert_eq!(mbr[450], 0xee, "protective MBR entry");
        let size_lba = u32::from_le_bytes(mbr[458..462].try_into().unwrap());
        assert_eq!(u64::from(size_lba), (disk + 2048 * MIB) / 512 - 1);
        // sfdisk, the standard tool, reads the result without complaint.
        let out = std::process::Command::new("sfdisk")
            .args(["--verify", &img.display().to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn partition_place_from_sysfs() {
        let d = tempfile::tempdir().unwrap();
        let devices = d.path().join("devices/pci0/virtio2/block/vda");
        std::fs::create_dir_all(devices.join("vda3")).unwrap();
        let w = |p: PathBuf, v: &str| std::fs::write(p, v).unwrap();
        w(devices.join("size"), "16777216\n");
        w(devices.join("vda3/partition"), "3\n");
        w(devices.join("vda3/start"), "792576\n");
        w(devices.join("vda3/size"), "11786240\n");
        let class = d.path().join("class/block");
        std::fs::create_dir_all(&class).unwrap();
        std::os::unix::fs::symlink(&devices, class.join("vda")).unwrap();
        std::os::unix::fs::symlink(devices.join("vda3"), class.join("vda3")).unwrap();
        // The PV path as lvm names it: a device node stand-in named vda3.
        let dev = d.path().join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("vda3"), "").unwrap();
        let p = pv_place(&class, &dev.join("vda3")).unwrap();
        assert_eq!(p.disk, PathBuf::from("/dev/vda"));
        assert_eq!(p.partno, 3);
        assert_eq!(p.start, 792576 * 512);
        assert_eq!(p.size, 11786240 * 512);
        assert_eq!(p.disk_bytes, 8 * 1024 * MIB);
    }
}
