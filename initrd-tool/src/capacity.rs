//! Room rules: what `data`, `root`/`back` and `/boot` must hold, checked before
//! anything irreversible happens (preflight, `stage`, `plan check`), and what an
//! `auto` size becomes. Pure arithmetic; every failure is one sentence with sizes.

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

    /// Smallest slot LV that holds the unpacked payload.
    pub fn slot_min(&self) -> Option<u64> {
        self.payload.map(slot_bytes_for)
    }

    /// Smallest `/boot`: both slots' kernels, the recovery entry and GRUB. With
    /// the payload unscanned, the slot files count as the recovery files' size.
    pub fn boot_min(&self) -> u64 {
        let slot = self.slot_boot_files.unwrap_or(self.recovery_boot_files);
        let files = 2 * slot + self.recovery_boot_files + GRUB_ROOM;
        files + ext4_overhead(files)
    }
}

/// Room an unpacked tree needs on a fresh ext4: payload + metadata and slack.
pub fn slot_bytes_for(uncompressed: u64) -> u64 {
    uncompressed + uncompressed / 10 + 64 * MIB
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
            Some(needs.boot_min().max(crate::plan::MIN_BOOT)),
        )?,
        root: pick("root", &s.root, slot)?,
        back: pick("back", &s.back, slot)?,
        data: pick(
            "data",
            &s.data,
            Some(needs.data_min().max(crate::plan::MIN_DATA)),
        )?,
        image: pick("image", &s.image, Some(DEFAULT_IMAGE))?,
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
    if let (Some(slot), Some(payload)) = (needs.slot_min(), needs.payload) {
        for (name, have) in [("root", sizes.root), ("back", sizes.back)] {
            if have < slot {
                v.push(format!(
                    "sizes.{name} is {} MiB but the new OS needs {} MiB unpacked ({} MiB payload + 10% and 64 MiB for ext4); set sizes.{name} to at least {}M or \"auto\"",
                    mib_up(have),
                    mib_up(slot),
                    mib_up(payload),
                    mib_up(slot)
                ));
            }
        }
    }
    let boot = needs.boot_min();
    if sizes.boot < boot {
        v.push(format!(
            "sizes.boot is {} MiB but /boot needs {} MiB (kernel and initramfs of 2 slots at {} MiB each{}, recovery kernel and migration initramfs {} MiB, GRUB {} MiB, ext4 overhead); set sizes.boot to at least {}M or \"auto\"",
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
            b[0].starts_with("sizes.root is 512 MiB but the new OS needs 834 MiB"),
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
}
