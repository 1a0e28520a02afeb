//! UEFI: each slot boots through the shim and GRUB of its own OS, kept in
//! `\EFI\dualroot-<slot>\` on the ESP with a firmware entry `dualroot-<slot>`.
//! `slot install` puts the new slot's chain there (its OS's own
//! `grub-install`), after checking that the new shim's SBAT revocation level
//! spares the booted slot's chain; the first confirmed boot of a slot puts its
//! chain first in BootOrder and at the removable path. So a shim or GRUB update
//! arrives with the slot that brings it, and the chain a fallback boots is one
//! the newer shim does not revoke.
//!
//! A slot's chain boots GRUB, which reads the one `grub.cfg` and environment
//! block on `/boot`: which slot and kernel boot is decided there, by the try
//! counters, whichever chain the firmware started.

use crate::blockdev::part_dev;
use crate::efi;
use crate::layout::ESP_PARTITION_NUMBER;
use crate::mounts::Mount;
use crate::sbat;
use anyhow::{Context, Result};
use fs_err as fs;
use log::{info, warn};
use std::path::{Path, PathBuf};

/// Slots boot with UEFI here: the firmware says so and the disk holding `/boot`
/// has the ESP the migration made.
pub fn uefi(boot: &Path) -> bool {
    efi::booted_uefi(Path::new("/sys")) && esp_device(boot).is_ok()
}

/// The ESP: partition 4 of the disk holding `boot` (`layout`'s numbering).
pub fn esp_device(boot: &Path) -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let (maj, min) = crate::sysinfo::mount_device(&mountinfo, &boot.display().to_string())
        .with_context(|| format!("no filesystem is mounted at {}", boot.display()))?;
    let part = fs::canonicalize(format!("/sys/dev/block/{maj}:{min}"))?;
    let disk = part
        .parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .context("the /boot device has no parent disk in sysfs")?;
    let esp = part_dev(Path::new(&format!("/dev/{disk}")), ESP_PARTITION_NUMBER);
    if !esp.exists() {
        anyhow::bail!("{} (the ESP) does not exist", esp.display());
    }
    Ok(esp)
}

fn disk_of(esp: &Path) -> PathBuf {
    // `/dev/vda4` -> `/dev/vda`, `/dev/nvme0n1p4` -> `/dev/nvme0n1`.
    let s = esp.display().to_string();
    let t = s.trim_end_matches(|c: char| c.is_ascii_digit());
    let t = if t.ends_with('p') && t[..t.len() - 1].ends_with(|c: char| c.is_ascii_digit()) {
        &t[..t.len() - 1]
    } else {
        t
    };
    PathBuf::from(t)
}

fn mount_esp(boot: &Path, name: &str) -> Result<(Mount, PathBuf)> {
    let dev = esp_device(boot)?;
    let m = Mount::new(
        &dev,
        &PathBuf::from(format!("/run/dualroot/esp-{name}")),
        Some("vfat"),
        nix::mount::MsFlags::empty(),
        None,
    )?;
    Ok((m, dev))
}

/// The chain a fallback to `slot` boots: its own directory, or the removable
/// path where an older dualroot kept the only chain.
fn chain_dir_of(esp: &Path, slot: &str) -> PathBuf {
    let own = esp.join(efi::slot_dir(slot));
    if own.is_dir() {
        own
    } else {
        esp.join(efi::REMOVABLE_DIR)
    }
}

/// SBAT: the shim `new_shim` brings for slot `target` must not revoke the chain
/// in `other_dir` that slot `other` falls back through. Refused (with the
/// components and generations) otherwise: after the new shim's first boot the
/// firmware would reject the other chain and a fallback could not boot.
pub fn check_sbat(new_shim: &[u8], target: &str, other: &str, other_dir: &Path) -> Result<String> {
    let Some(sec) = sbat::pe_section(new_shim, ".sbatlevel")? else {
        return Ok(format!(
            "slot {target}'s shim carries no SBAT level (.sbatlevel): it revokes nothing"
        ));
    };
    let levels = sbat::parse_sbatlevel(sec)?;
    let mut binaries = Vec::new();
    for e in fs::read_dir(other_dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.to_ascii_lowercase().ends_with(".efi") {
            continue;
        }
        let data = fs::read(e.path())?;
        if let Some(s) = sbat::pe_section(&data, ".sbat")? {
            binaries.push((name, sbat::parse_sbat(s)?));
        }
    }
    binaries.sort_by(|a, b| a.0.cmp(&b.0));
    let chain: Vec<sbat::BootBinary> = binaries
        .iter()
        .map(|(n, e)| sbat::BootBinary { what: n, sbat: e })
        .collect();
    sbat::check_install(
        &levels,
        &format!("slot {target}'s shim"),
        other,
        &chain,
        false,
    )?;
    Ok(format!(
        "SBAT: slot {target}'s shim (level {}) spares slot {other}'s chain ({})",
        levels.previous.datestamp,
        binaries
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// `slot install` on UEFI, once the new root `new` is unpacked and its kernel
/// is on `/boot`: the SBAT check against the booted slot's chain, then the new
/// OS's own `grub-install` into `\EFI\dualroot-<target>\`, and its firmware
/// entry (not in BootOrder yet: the slot is not confirmed). Nothing of the
/// booted slot's chain changes.
pub fn install(new: &Path, boot: &Path, target: &str, booted: &str) -> Result<String> {
    let (esp, dev) = mount_esp(boot, target)?;
    let res = (|| -> Result<String> {
        let mut notes = Vec::new();
        let shim = new.join(efi::SIGNED_SHIM);
        if shim.is_file() {
            let other = chain_dir_of(&esp.target, booted);
            notes.push(check_sbat(&fs::read(&shim)?, target, booted, &other)?);
        }
        let (_, files, loader) =
            efi::grub_install_chain(Some(new), boot, &esp.target, target, None).with_context(
                || {
                    format!(
                        "installing slot {target}'s boot chain on the ESP {}",
                        dev.display()
                    )
                },
            )?;
        notes.push(format!(
            "slot {target}'s boot chain: \\{}\\{loader} ({})",
            efi::slot_dir(target).replace('/', "\\"),
            files.join(", ")
        ));
        match efi::write_entry(
            None,
            &disk_of(&dev),
            ESP_PARTITION_NUMBER,
            &efi::slot_label(target),
            &efi::slot_entry_path(target, &loader),
            false,
        ) {
            Ok(_) => notes.push(format!("firmware entry {} written", efi::slot_label(target))),
            Err(e) => warn!(
                "no firmware entry for slot {target}'s chain ({e:#}); it boots through the booted slot's chain until it is confirmed"
            ),
        }
        Ok(notes.join("; "))
    })();
    nix::unistd::sync();
    esp.unmount()?;
    res
}

/// The running slot's own shim or GRUB changed (its package manager updated
/// them: `slot update-boot` from the distribution hooks): its chain on the ESP
/// follows, by its own `grub-install`, unless the new shim would revoke the
/// other slot's chain (SBAT); at the removable path too when that held this
/// slot's chain. Says what it did; nothing when the chain already matches.
pub fn refresh(boot: &Path, slot: &str) -> Result<String> {
    if !uefi(boot) {
        return Ok("no UEFI boot chain here".into());
    }
    let shim = Path::new("/").join(efi::SIGNED_SHIM);
    let grub = Path::new("/").join(efi::SIGNED_GRUB);
    if !shim.is_file() || !grub.is_file() {
        return Ok(format!(
            "slot {slot}'s OS ships no signed shim and GRUB: its chain stays as installed"
        ));
    }
    let (esp, _) = mount_esp(boot, "refresh")?;
    let res = (|| -> Result<String> {
        let dir = esp.target.join(efi::slot_dir(slot));
        let same = |src: &Path, name: &str| {
            std::fs::read(src).ok().is_some()
                && std::fs::read(src).ok() == std::fs::read(dir.join(name)).ok()
        };
        if same(&shim, "shimx64.efi") && same(&grub, "grubx64.efi") {
            return Ok(format!(
                "slot {slot}'s boot chain matches its OS's shim and GRUB"
            ));
        }
        let other = super::state::other(slot);
        let other_dir = esp.target.join(efi::slot_dir(other));
        let mut notes = Vec::new();
        if other_dir.is_dir() {
            notes.push(check_sbat(&fs::read(&shim)?, slot, other, &other_dir)?);
        }
        let removable = esp
            .target
            .join(efi::REMOVABLE_DIR)
            .join(efi::REMOVABLE_LOADER);
        let promoted = std::fs::read(&removable).ok().is_some()
            && std::fs::read(&removable).ok() == std::fs::read(dir.join("shimx64.efi")).ok();
        let (flavor, files, loader) = efi::grub_install_chain(None, boot, &esp.target, slot, None)?;
        if promoted {
            let d = efi::slot_dir(slot);
            efi::install_chain(
                &esp.target.join(&d),
                &files,
                &loader,
                &d,
                &esp.target,
                flavor.dir(),
            )?;
        }
        notes.push(format!(
            "slot {slot}'s boot chain updated to its OS's shim and GRUB ({}){}",
            files.join(", "),
            if promoted {
                ", also at the removable path"
            } else {
                ""
            }
        ));
        Ok(notes.join("; "))
    })();
    nix::unistd::sync();
    esp.unmount()?;
    res
}

/// After slot `slot`'s first confirmed boot: its chain becomes the one the
/// firmware starts (first in BootOrder, the other slot's next) and the one at
/// the removable path. Best effort; says what it did.
pub fn promote(boot: &Path, slot: &str) -> Result<String> {
    let (esp, _) = mount_esp(boot, "promote")?;
    let res = (|| -> Result<String> {
        let dir = efi::slot_dir(slot);
        if !esp.target.join(&dir).is_dir() {
            return Ok(format!(
                "slot {slot} has no chain of its own on the ESP; the firmware keeps booting the chain it has"
            ));
        }
        let (files, loader) = efi::installed_chain(&esp.target, &dir)?;
        let flavor = crate::grub::BootConfig::load(boot)?.flavor;
        efi::install_chain(
            &esp.target.join(&dir),
            &files,
            &loader,
            &dir,
            &esp.target,
            flavor.dir(),
        )?;
        let listing = efi::efibootmgr(None, &[])?;
        let order = efi::order_first(
            &listing,
            &[
                efi::slot_label(slot),
                efi::slot_label(super::state::other(slot)),
            ],
        );
        let order_arg = order.join(",");
        if !order.is_empty() && efi::boot_order(&listing) != order {
            efi::efibootmgr(None, &["-o", &order_arg])?;
        }
        Ok(format!(
            "slot {slot}'s boot chain is at the removable path and first in BootOrder ({order_arg})"
        ))
    })();
    nix::unistd::sync();
    esp.unmount()?;
    if let Err(e) = &res {
        warn!("promoting slot {slot}'s boot chain: {e:#}");
    } else if let Ok(n) = &res {
        info!("{n}");
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/sbat")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// A PE file holding `sections` (names longer than 8 bytes go through the
    /// COFF string table, as GNU ld writes `.sbatlevel` in shim).
    fn pe_with(sections: &[(&str, &[u8])]) -> Vec<u8> {
        let strings_at = 0x400usize;
        let mut pe = vec![0u8; 0x800];
        pe[0..2].copy_from_slice(b"MZ");
        pe[0x3c..0x40].copy_from_slice(&0x40u32.to_le_bytes());
        pe[0x40..0x44].copy_from_slice(b"PE\0\0");
        let coff = 0x44;
        pe[coff + 2..coff + 4].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        pe[coff + 8..coff + 12].copy_from_slice(&(strings_at as u32).to_le_bytes());
        let mut str_off = 4usize;
        for (i, (name, data)) in sections.iter().enumerate() {
            let s = coff + 20 + i * 40;
            if name.len() > 8 {
                let at = strings_at + str_off;
                pe[at..at + name.len()].copy_from_slice(name.as_bytes());
                let short = format!("/{str_off}");
                pe[s..s + short.len()].copy_from_slice(short.as_bytes());
                str_off += name.len() + 1;
            } else {
                pe[s..s + name.len()].copy_from_slice(name.as_bytes());
            }
            let raw_at = pe.len();
            pe.extend_from_slice(data);
            pe[s + 8..s + 12].copy_from_slice(&(data.len() as u32).to_le_bytes());
            pe[s + 16..s + 20].copy_from_slice(&(data.len() as u32).to_le_bytes());
            pe[s + 20..s + 24].copy_from_slice(&(raw_at as u32).to_le_bytes());
        }
        pe
    }

    /// The booted slot a runs Debian 11's chain (shim 15.8, GRUB with
    /// grub,4); slot b's bundle brings Debian 12's shim 16.1, whose automatic
    /// level asks grub,5: refused, naming the component. Debian 11's own shim,
    /// or a shim without a level, is let through.
    #[test]
    fn a_new_shim_that_revokes_the_booted_chain_is_refused() {
        let other = tempfile::tempdir().unwrap();
        std::fs::write(
            other.path().join("grubx64.efi"),
            pe_with(&[(".sbat", &fixture("grubx64-2.06-3~deb11u6.sbat"))]),
        )
        .unwrap();
        std::fs::write(
            other.path().join("shimx64.efi"),
            pe_with(&[
                (".sbat", &fixture("shimx64-15.8-deb11.sbat")),
                (".sbatlevel", &fixture("shimx64-15.8-deb11.sbatlevel")),
            ]),
        )
        .unwrap();
        std::fs::write(other.path().join("grub.cfg"), "configfile x\n").unwrap();
        let shim16 = pe_with(&[
            (".text", b"code"),
            (".sbatlevel", &fixture("shimx64-16.1-deb12.sbatlevel")),
        ]);
        let e = check_sbat(&shim16, "b", "a", other.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("slot b's shim")
                && e.contains("revokes slot a's boot chain")
                && e.contains("below 5"),
            "{e}"
        );
        let shim15 = pe_with(&[(".sbatlevel", &fixture("shimx64-15.8-deb11.sbatlevel"))]);
        let ok = check_sbat(&shim15, "b", "a", other.path()).unwrap();
        assert!(
            ok.contains("spares slot a's chain (grubx64.efi, shimx64.efi)"),
            "{ok}"
        );
        let plain = pe_with(&[(".text", b"code")]);
        assert!(check_sbat(&plain, "b", "a", other.path())
            .unwrap()
            .contains("revokes nothing"));
    }

    #[test]
    fn the_disk_of_the_esp() {
        assert_eq!(disk_of(Path::new("/dev/vda4")), PathBuf::from("/dev/vda"));
        assert_eq!(
            disk_of(Path::new("/dev/nvme0n1p4")),
            PathBuf::from("/dev/nvme0n1")
        );
        assert_eq!(disk_of(Path::new("/dev/sda4")), PathBuf::from("/dev/sda"));
    }
}
