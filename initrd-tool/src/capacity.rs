//! Room rules: what `data`, `root`/`back` and `/boot` must hold, checked before
//! anything irreversible happens (preflight, `stage`, `plan check`), and what an
//! `auto` size becomes. Pure arithmetic; every failure is one sentence with sizes.
//!
//! A slot holds the payload's bytes and its entries: every file, directory,
//! symlink and device node takes an inode, and ext4 makes its inodes once, at
//! mkfs. A payload of many small files fits the bytes and runs out of inodes
//! halfway through the unpack, after the point of no return. The rule here
//! counts inodes as `mkfs.ext4` makes them by default (see [`ext4_default_inodes`]):
//! explicit sizes too small for the entries are refused before anything is
//! written, and `auto` sizes grow until the default inode count holds them.
//!
//! Why refuse instead of `mkfs.ext4 -N`: the check must predict what mkfs makes,
//! and mkfs runs with its defaults in the migration (`blockdev::mkfs_ext4`) and in
//! `slot install`; asking for more inodes than the default moves room from data
//! to inode tables (256 bytes each) that the byte rule does not count. The price:
//! `root`/`back` keep their size after the migration, so a later bundle with many
//! more entries than the first is refused by `slot install` until the LV grows.

use crate::layout::EXTENT;
use crate::plan::{ByteSizes, Plan, MIB};
use anyhow::{bail, Context, Result};
use serde::Serialize;

/// ext4 on a small volume: journal, inode tables, reserved blocks (5% is
/// `mkfs.ext4`'s default reservation for root, which dualroot writes as).
pub fn ext4_overhead(size: u64) -> u64 {
    size / 20 + 40 * MIB
}

/// Journal, migration log and keyring room on `data` beyond the stash's files.
pub const DATA_SLACK: u64 = 32 * MIB;
/// GRUB's modules and config on `/boot` (grub-install writes ~ 3-10 MiB).
pub const GRUB_ROOM: u64 = 16 * MIB;
/// The default `image` size (container images grow into free space later).
pub const DEFAULT_IMAGE: u64 = 256 * MIB;

/// What the layout must hold, as far as it is known.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Needs {
    /// The bundle file (stashed on `data`).
    pub bundle: u64,
    /// Carried files and the keyring (stashed on `data` as a tar).
    pub carried: u64,
    /// The payload unpacked (manifest `uncompressed_size`).
    pub payload: Option<u64>,
    /// Entries of the payload (manifest `entries`): one inode each.
    pub payload_entries: Option<u64>,
    /// Kernel + initramfs of the new OS (one slot's `/boot/<slot>/`); `None` when
    /// the payload was not scanned.
    pub slot_boot_files: Option<u64>,
    /// Recovery kernel + migration initramfs (`/boot/recovery`).
    pub recovery_boot_files: u64,
}

impl Needs {
    /// Smallest `data` that holds the stash.
    pub fn data_min(&self) -> u64 {
        let files = self.bundle + self.carried + DATA_SLACK;
        files + ext4_overhead(files)
    }

    /// Smallest slot LV that holds the unpacked payload and the carried files:
    /// their bytes and, when the entries are known, the inodes.
    pub fn slot_min(&self) -> Option<u64> {
        let bytes = self.slot_bytes()?;
        Some(match self.payload_entries {
            Some(entries) => slot_bytes_for_inodes(bytes, entries),
            None => bytes,
        })
    }

    /// One kernel + initramfs of the new OS. With the payload unscanned, the
    /// recovery files' size stands in.
    fn slot_pair(&self) -> u64 {
        self.slot_boot_files.unwrap_or(self.recovery_boot_files)
    }

    /// Smallest `/boot` for today's OS: each slot holds two kernel pairs (a
    /// kernel update tries its pair next to the confirmed one, `slot
    /// update-boot`), plus the recovery entry and GRUB.
    pub fn boot_min(&self) -> u64 {
        let files = SLOTS_PAIRS * self.slot_pair() + self.recovery_boot_files + GRUB_ROOM;
        files + ext4_overhead(files)
    }

    /// What `boot = "auto"` makes: [`Needs::boot_min`] with room for a newer OS
    /// whose kernel + initramfs are [`BOOT_GROWTH`] times today's. `/boot` is a
    /// partition in front of the PV and cannot grow later, so its room for the
    /// next ten years is decided here. (EL7 -> EL9: 6 -> 12 MiB kernels,
    /// 20 -> 35-100 MiB initramfs depending on hostonly.)
    pub fn boot_auto(&self) -> u64 {
        let files =
            SLOTS_PAIRS * BOOT_GROWTH * self.slot_pair() + self.recovery_boot_files + GRUB_ROOM;
        files + ext4_overhead(files)
    }
}

/// Two slots with two kernel pairs each.
pub const SLOTS_PAIRS: u64 = 4;
/// How much bigger a later OS's kernel + initramfs may be than the first's.
pub const BOOT_GROWTH: u64 = 2;

impl Needs {
    /// The byte rule of a slot in the migration: the payload's rule plus the
    /// carried files (`/home` and the rest land in the new root).
    pub fn slot_bytes(&self) -> Option<u64> {
        Some(slot_bytes_for(self.payload?) + self.carried)
    }
}

/// What the initramfs rebuild in a slot writes next to the payload: the
/// tool's temporary tree (`mkinitramfs` and `dracut` build in `/var/tmp`: the
/// modules and firmware they pick, 100-250 MiB for a generic initramfs) and
/// the new image beside the old one in `/boot` (40-100 MiB each). Without it
/// a slot sized to the payload ran out of space in the migration's `boot`
/// step, after the point of no return (found by the lifecycle scenario).
pub const INITRAMFS_ROOM: u64 = 384 * MIB;

/// Room an unpacked tree needs on a fresh ext4: payload + ext4 metadata and
/// slack + the initramfs rebuild.
pub fn slot_bytes_for(uncompressed: u64) -> u64 {
    uncompressed + uncompressed / 10 + 64 * MIB + INITRAMFS_ROOM
}

/// mke2fs's size types (e2fsprogs `misc/mke2fs.c`: floppy below 3 MiB, small
/// below 512 MiB, default below 4 TiB, big below 16 TiB, huge) with the block
/// size and bytes per inode the stock `mke2fs.conf` gives them (`[defaults]
/// blocksize = 4096, inode_ratio = 16384`; `small`: 1024 and 4096; `floppy`: 1024
/// and 8192; `big`: 32768; `huge`: 65536; the same in e2fsprogs' own file, on
/// Debian and on EL, and built into mke2fs for an initramfs without the file):
/// (smallest size, block size, bytes per inode).
const EXT4_SIZE_TYPES: [(u64, u64, u64); 5] = [
    (0, 1024, 8192),
    (3 * MIB, 1024, 4096),
    (512 * MIB, 4096, 16384),
    (4 << 40, 4096, 32768),
    (16 << 40, 4096, 65536),
];
/// `[defaults] inode_size`.
const EXT4_INODE_SIZE: u64 = 256;

/// The inode count `mkfs.ext4` with its defaults gives a filesystem of `bytes`.
/// As e2fsprogs' `ext2fs_initialize`: size / bytes-per-inode, spread over the
/// block groups and rounded up so each group's inode table fills whole blocks.
/// (mke2fs may drop a last group too small for its metadata; the count then
/// differs by less than one group's rounding.)
pub fn ext4_default_inodes(bytes: u64) -> u64 {
    let (_, bs, ratio) = EXT4_SIZE_TYPES
        .iter()
        .rev()
        .find(|(from, _, _)| bytes >= *from)
        .copied()
        .unwrap_or(EXT4_SIZE_TYPES[0]);
    let blocks = bytes / bs;
    let first_data_block = u64::from(bs == 1024);
    let groups = blocks
        .saturating_sub(first_data_block)
        .div_ceil(8 * bs)
        .max(1);
    let wanted = blocks * bs / ratio;
    let per_group = (wanted
        .div_ceil(groups)
        .next_multiple_of(bs / EXT4_INODE_SIZE)
        & !7)
        .max(8);
    (per_group * groups).min(u64::from(u32::MAX))
}

/// Inodes a slot needs for a payload of `entries`: the entries, and room for
/// what sync adds (carried files, units, hooks) and the initramfs rebuild writes.
pub fn slot_inodes_for(entries: u64) -> u64 {
    entries + entries / 10 + 2000
}

/// The smallest slot size (whole LVM extents) of at least `min_bytes` whose
/// default ext4 has the inodes `entries` need. Not monotonic in the size: below
/// 512 MiB mke2fs makes four times as many inodes per byte.
pub fn slot_bytes_for_inodes(min_bytes: u64, entries: u64) -> u64 {
    let need = slot_inodes_for(entries);
    let start = min_bytes.next_multiple_of(EXTENT);
    for (i, (from, _, ratio)) in EXT4_SIZE_TYPES.iter().enumerate() {
        let until = EXT4_SIZE_TYPES.get(i + 1).map_or(u64::MAX, |t| t.0);
        // `need` inodes take `need * ratio` bytes; the rounding per block group
        // adds less than 0.2%, so a slightly smaller size may already do.
        let exact = need.saturating_mul(*ratio);
        let mut size = start
            .max(*from)
            .max((exact - exact / 256) / EXTENT * EXTENT);
        while size < until && size <= exact.saturating_add(EXTENT) {
            if ext4_default_inodes(size) >= need {
                return size;
            }
            size += EXTENT;
        }
    }
    start
}

/// A slot of `lv_bytes` whose default ext4 has too few inodes for `entries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InodeShortfall {
    pub entries: u64,
    /// What mkfs.ext4 makes on the slot.
    pub inodes: u64,
    /// What the entries need ([`slot_inodes_for`]).
    pub need: u64,
    /// The smallest size of at least `lv_bytes` that has them.
    pub enough_at: u64,
}

/// `None` when a slot of `lv_bytes` has the inodes a payload of `entries` needs.
pub fn slot_inode_shortfall(lv_bytes: u64, entries: u64) -> Option<InodeShortfall> {
    let inodes = ext4_default_inodes(lv_bytes);
    let need = slot_inodes_for(entries);
    (inodes < need).then(|| InodeShortfall {
        entries,
        inodes,
        need,
        enough_at: slot_bytes_for_inodes(lv_bytes, entries),
    })
}

fn mib_up(v: u64) -> u64 {
    v.div_ceil(MIB)
}

/// The plan's sizes in bytes, `auto` resolved from what must fit.
pub fn resolve(plan: &Plan, needs: &Needs) -> Result<ByteSizes> {
    let s = &plan.sizes;
    let pick = |name: &str, text: &str, auto: Option<u64>| -> Result<u64> {
        if text.trim() == "auto" {
            auto.with_context(|| {
                format!("sizes.{name} is \"auto\", which needs the bundle's payload size to compute (give the bundle)")
            })
        } else {
            crate::plan::parse_size(text).with_context(|| format!("sizes.{name}"))
        }
    };
    let slot = needs.slot_min().map(|v| v.max(crate::plan::MIN_SLOT));
    Ok(ByteSizes {
        boot: pick(
            "boot",
            &s.boot,
            Some(needs.boot_auto().max(crate::plan::MIN_BOOT)),
        )?,
        root: pick("root", &s.root, slot)?,
        back: pick("back", &s.back, slot)?,
        data: pick(
            "data",
            &s.data,
            Some(needs.data_min().max(crate::plan::MIN_DATA)),
        )?,
        image: pick("image", &s.image, Some(DEFAULT_IMAGE))?,
        slot_reserve: if s.slot_reserve.trim() == "auto" {
            None
        } else {
            Some(crate::plan::parse_size(&s.slot_reserve).context("sizes.slot_reserve")?)
        },
        // the firmware decides (`ByteSizes::for_firmware`)
        esp: 0,
    })
}

/// Every room rule the sizes break, one sentence each.
pub fn blockers(sizes: &ByteSizes, needs: &Needs) -> Vec<String> {
    let mut v = Vec::new();
    let data = needs.data_min();
    if sizes.data < data {
        v.push(format!(
            "sizes.data is {} MiB but the stash needs {} MiB (bundle {} MiB + carried files and keyring {} MiB + journal and log {} MiB + ext4 overhead {} MiB); set sizes.data to at least {}M or \"auto\"",
            mib_up(sizes.data),
            mib_up(data),
            mib_up(needs.bundle),
            mib_up(needs.carried),
            DATA_SLACK / MIB,
            mib_up(ext4_overhead(needs.bundle + needs.carried + DATA_SLACK)),
            mib_up(data)
        ));
    }
    if let (Some(payload), Some(slot)) = (needs.payload, needs.slot_bytes()) {
        for (name, have) in [("root", sizes.root), ("back", sizes.back)] {
            if have < slot {
                v.push(format!(
                    "sizes.{name} is {} MiB but the new OS needs {} MiB ({} MiB payload + 10% and 64 MiB for ext4 + {} MiB for the initramfs rebuild + {} MiB of carried files); set sizes.{name} to at least {}M or \"auto\"",
                    mib_up(have),
                    mib_up(slot),
                    mib_up(payload),
                    INITRAMFS_ROOM / MIB,
                    mib_up(needs.carried),
                    mib_up(slot)
                ));
            } else if let Some(short) = needs
                .payload_entries
                .and_then(|e| slot_inode_shortfall(have, e))
            {
                v.push(format!(
                    "sizes.{name} is {} MiB, whose ext4 gets {} inodes, but the new OS has {} entries and needs {} inodes (entries + 10% + 2000 for what sync and the initramfs rebuild add); set sizes.{name} to at least {}M or \"auto\"",
                    mib_up(have),
                    short.inodes,
                    short.entries,
                    short.need,
                    mib_up(short.enough_at)
                ));
            }
        }
    }
    let boot = needs.boot_min();
    if sizes.boot < boot {
        v.push(format!(
            "sizes.boot is {} MiB but /boot needs {} MiB (2 kernels and initramfs in each of 2 slots at {} MiB each{}, recovery kernel and migration initramfs {} MiB, GRUB {} MiB, ext4 overhead); set sizes.boot to at least {}M or \"auto\"",
            mib_up(sizes.boot),
            mib_up(boot),
            mib_up(needs.slot_boot_files.unwrap_or(needs.recovery_boot_files)),
            if needs.slot_boot_files.is_none() { " (estimated: payload not scanned)" } else { "" },
            mib_up(needs.recovery_boot_files),
            GRUB_ROOM / MIB,
            mib_up(boot)
        ));
    }
    v
}

/// Sizes that hold everything, or one error listing each broken rule.
pub fn check(sizes: &ByteSizes, needs: &Needs) -> Result<()> {
    let b = blockers(sizes, needs);
    if !b.is_empty() {
        bail!("{}", b.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(data: &str, root: &str) -> Plan {
        Plan::parse(&format!(
            "[bundle]\npath = \"/b\"\nkeyring = \"/k\"\n[sizes]\nboot = \"512M\"\nroot = \"{root}\"\nback = \"3G\"\ndata = \"{data}\"\nimage = \"256M\"\n"
        ))
        .unwrap()
    }

    fn needs() -> Needs {
        Needs {
            bundle: 200 * MIB,
            carried: MIB,
            payload: Some(700 * MIB),
            payload_entries: Some(30_000),
            slot_boot_files: Some(60 * MIB),
            recovery_boot_files: 40 * MIB,
        }
    }

    #[test]
    fn small_data_is_refused_with_sizes() {
        let p = plan("64M", "3G");
        let s = resolve(&p, &needs()).unwrap();
        let b = blockers(&s, &needs());
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].starts_with("sizes.data is 64 MiB but the stash needs"),
            "{}",
            b[0]
        );
        assert!(b[0].contains("bundle 200 MiB"), "{}", b[0]);
    }

    #[test]
    fn small_root_is_refused() {
        let p = plan("auto", "512M");
        let s = resolve(&p, &needs()).unwrap();
        let b = blockers(&s, &needs());
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].starts_with("sizes.root is 512 MiB but the new OS needs 1219 MiB (700 MiB payload + 10% and 64 MiB for ext4 + 384 MiB for the initramfs rebuild + 1 MiB of carried files)"),
            "{}",
            b[0]
        );
    }

    #[test]
    fn auto_fits_by_construction() {
        let mut p = plan("auto", "auto");
        p.sizes.boot = "auto".into();
        p.sizes.back = "auto".into();
        let n = needs();
        let s = resolve(&p, &n).unwrap();
        assert!(blockers(&s, &n).is_empty());
        assert!(s.data >= n.bundle + n.carried);
        assert!(s.root >= 700 * MIB);
        // A 1.7 GB bundle (seen in the field) gets a data LV that holds it.
        let big = Needs {
            bundle: 1700 * MIB,
            ..needs()
        };
        assert!(resolve(&p, &big).unwrap().data > 1700 * MIB);
        let unknown = Needs {
            payload: None,
            ..needs()
        };
        let e = format!("{:#}", resolve(&p, &unknown).unwrap_err());
        assert!(e.contains("sizes.root is \"auto\""), "{e}");
    }

    #[test]
    fn small_boot_is_refused() {
        let mut p = plan("auto", "3G");
        p.sizes.boot = "128M".into();
        let n = Needs {
            slot_boot_files: Some(80 * MIB),
            ..needs()
        };
        let b = blockers(&resolve(&p, &n).unwrap(), &n);
        assert!(
            b.iter().any(|s| s.starts_with("sizes.boot is 128 MiB")),
            "{b:?}"
        );
    }

    #[test]
    fn auto_boot_keeps_room_for_kernel_updates_and_a_bigger_os() {
        let mut p = plan("auto", "3G");
        p.sizes.boot = "auto".into();
        let n = needs(); // 60 MiB per kernel pair, recovery 40 MiB
        let s = resolve(&p, &n).unwrap();
        // Today: 2 slots x 2 pairs x 60 + 40 + 16 GRUB = 296 MiB of files.
        let today = 296 * MIB;
        assert_eq!(n.boot_min(), today + ext4_overhead(today));
        // auto: the pairs at twice today's size: 8 x 60 + 56 = 536 MiB of files.
        let auto = 536 * MIB;
        assert_eq!(s.boot, auto + ext4_overhead(auto));
        assert!(blockers(&s, &n).is_empty());
        // An explicit /boot between the two is accepted (preflight says it is
        // short of the recommendation), below today's need refused.
        p.sizes.boot = format!("{}M", (n.boot_min() + MIB) / MIB);
        assert!(blockers(&resolve(&p, &n).unwrap(), &n).is_empty());
    }

    #[test]
    fn slot_reserve_is_auto_or_a_size() {
        let mut p = plan("auto", "3G");
        assert_eq!(resolve(&p, &needs()).unwrap().slot_reserve, None);
        p.sizes.slot_reserve = "6G".into();
        assert_eq!(
            resolve(&p, &needs()).unwrap().slot_reserve,
            Some(6 * 1024 * MIB)
        );
        p.sizes.slot_reserve = "0".into();
        assert_eq!(resolve(&p, &needs()).unwrap().slot_reserve, Some(0));
        let e = Plan::parse(
            "[bundle]\npath = \"/b\"\nkeyring = \"/k\"\n[sizes]\nboot = \"512M\"\nroot = \"3G\"\nback = \"3G\"\ndata = \"auto\"\nimage = \"256M\"\nslot_reserve = \"lots\"\n",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("sizes.slot_reserve"), "{e:#}");
    }

    #[test]
    fn many_small_files_are_refused_by_inodes_though_the_bytes_fit() {
        let mut p = plan("auto", "1280M");
        p.sizes.back = "1280M".into();
        let n = Needs {
            payload: Some(700 * MIB),
            payload_entries: Some(200_000),
            ..needs()
        };
        let s = resolve(&p, &n).unwrap();
        // The bytes fit: 700 MiB + 10% + 64 MiB + 384 MiB + 1 MiB carried < 1280 MiB.
        assert!(n.slot_bytes().unwrap() < s.root);
        let b = blockers(&s, &n);
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(
            b[0],
            "sizes.root is 1280 MiB, whose ext4 gets 81920 inodes, but the new OS has 200000 entries and needs 222000 inodes (entries + 10% + 2000 for what sync and the initramfs rebuild add); set sizes.root to at least 3468M or \"auto\""
        );
        assert!(
            b[1].starts_with("sizes.back is 1280 MiB, whose ext4"),
            "{}",
            b[1]
        );
        // The size the sentence names passes, and so does "auto".
        p.sizes.root = "3468M".into();
        p.sizes.back = "auto".into();
        let s = resolve(&p, &n).unwrap();
        assert!(blockers(&s, &n).is_empty(), "{:?}", blockers(&s, &n));
        assert_eq!(s.back, 3468 * MIB);
        // Without the entries (an older manifest reader) only bytes count.
        let bytes_only = Needs {
            payload_entries: None,
            ..n
        };
        assert_eq!(bytes_only.slot_min(), Some(slot_bytes_for(700 * MIB) + MIB));
    }

    #[test]
    fn below_512_mib_mkfs_makes_more_inodes_per_byte() {
        // mke2fs's "small" type: 1 KiB blocks, one inode per 4 KiB.
        assert_eq!(ext4_default_inodes(508 * MIB), 130_048);
        assert_eq!(ext4_default_inodes(512 * MIB), 32_768);
        // 100 000 entries fit a 440 MiB slot but no slot from 512 MiB to 1.7 GiB.
        assert_eq!(slot_bytes_for_inodes(284 * MIB, 100_000), 440 * MIB);
        // 112 000 inodes at 16 KiB each: 1750 MiB; the rounding per group gives
        // them to 1748 MiB already.
        assert_eq!(slot_bytes_for_inodes(512 * MIB, 100_000), 1748 * MIB);
        assert!(slot_inode_shortfall(440 * MIB, 100_000).is_none());
        let short = slot_inode_shortfall(512 * MIB, 100_000).unwrap();
        assert_eq!((short.inodes, short.need), (32_768, 112_000));
        assert!(ext4_default_inodes(short.enough_at) >= 112_000);
        assert!(ext4_default_inodes(short.enough_at - EXTENT) < 112_000);
    }

    /// `Inode count:` of `dumpe2fs -h`.
    fn dumpe2fs_inode_count(text: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix("Inode count:"))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn default_inode_count_is_what_mkfs_ext4_makes() {
        use std::process::Command;
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("slot.img");
        for mib in [64, 256, 300, 440, 508, 512, 1280, 1748, 3468, 20 * 1024] {
            let _ = std::fs::remove_file(&img);
            std::fs::File::create(&img)
                .unwrap()
                .set_len(mib * MIB)
                .unwrap();
            // As blockdev::mkfs_ext4 runs it (the label changes nothing here).
            let out = Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "root"])
                .arg(&img)
                .output()
                .expect("this test needs mkfs.ext4 (e2fsprogs)");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = Command::new("dumpe2fs")
                .arg("-h")
                .arg(&img)
                .output()
                .unwrap();
            let real = dumpe2fs_inode_count(&String::from_utf8_lossy(&out.stdout))
                .unwrap_or_else(|| panic!("{mib} MiB: no inode count from dumpe2fs"));
            let ours = ext4_default_inodes(mib * MIB);
            assert!(
                ours.abs_diff(real) * 100 <= real * 2,
                "{mib} MiB: mkfs.ext4 made {real} inodes, ext4_default_inodes says {ours}"
            );
        }
    }
}
