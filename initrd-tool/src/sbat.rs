//! SBAT (UEFI Secure Boot Advanced Targeting) for A/B slots on UEFI (issue 26).
//!
//! Every shim and GRUB carries a `.sbat` section: one `component,generation`
//! line per component it contains. shim (15.8 and later) also carries
//! `.sbatlevel`, the revocation levels it may apply: `previous` (what shim
//! writes into the `SbatLevel` UEFI variable by itself, the default
//! "automatic" policy) and `latest` (only when told to, `mokutil
//! --set-sbat-policy latest`). Once a shim has written a level, every shim
//! refuses any binary whose generation of a listed component is lower, and no
//! shim lowers it again by itself. That is how the 2024 SBAT update stopped
//! dual-boot machines: the newer system's shim revoked the older system's GRUB.
//!
//! For A/B this means: a slot install that brings a shim whose level revokes
//! the GRUB (or shim) the other slot boots through would leave the fallback
//! slot unbootable after the first boot of the new slot. dualroot refuses such
//! an install before anything is written ([`check_install`]), naming the
//! component and both generations. Refusing, not handling: the way out is an
//! update of the other slot's boot chain first (a newer GRUB there), which is
//! an ordinary A/B upgrade of that slot; writing the other slot's GRUB from the
//! new slot would boot the old OS through a GRUB it was never tested with.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;

/// One `.sbat` line that matters for revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub component: String,
    pub generation: u32,
}

/// A `.sbat` section (CSV, NUL padded): `component,generation,vendor,...`. The
/// `sbat,1,...` header line is the format's own entry and is kept like any.
pub fn parse_sbat(bytes: &[u8]) -> Result<Vec<Entry>> {
    let text = std::str::from_utf8(bytes)
        .context(".sbat is not text")?
        .trim_end_matches('\0');
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut f = line.split(',');
        let component = f.next().unwrap_or("").trim();
        let generation = f
            .next()
            .and_then(|g| g.trim().parse().ok())
            .with_context(|| format!(".sbat line {} has no generation: {line:?}", i + 1))?;
        if component.is_empty() {
            bail!(".sbat line {} has no component: {line:?}", i + 1);
        }
        v.push(Entry {
            component: component.to_string(),
            generation,
        });
    }
    Ok(v)
}

/// A revocation level: `sbat,1,<datestamp>` then `component,generation` lines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Level {
    pub datestamp: String,
    pub minimum: BTreeMap<String, u32>,
}

pub fn parse_level(text: &str) -> Result<Level> {
    let mut l = Level::default();
    for line in text.trim_end_matches('\0').lines() {
        let f: Vec<&str> = line.trim().split(',').collect();
        match f.as_slice() {
            [""] => {}
            ["sbat", _, date] => l.datestamp = date.to_string(),
            [c, g] => {
                let g = g
                    .parse()
                    .with_context(|| format!("SBAT level line {line:?}: generation"))?;
                l.minimum.insert(c.to_string(), g);
            }
            _ => bail!("SBAT level line {line:?} is not `component,generation`"),
        }
    }
    if l.datestamp.is_empty() {
        bail!("SBAT level has no `sbat,1,<datestamp>` line");
    }
    Ok(l)
}

/// shim's `.sbatlevel`: the `previous` (applied automatically) and `latest`
/// levels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimLevels {
    pub previous: Level,
    pub latest: Level,
}

pub fn parse_sbatlevel(bytes: &[u8]) -> Result<ShimLevels> {
    let u32_at = |at: usize| -> Result<usize> {
        let b: [u8; 4] = bytes
            .get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .context(".sbatlevel is shorter than its header")?;
        Ok(u32::from_le_bytes(b) as usize)
    };
    let version = u32_at(0)?;
    if version != 0 {
        bail!(".sbatlevel format {version} is not known (0 is)");
    }
    let text_at = |off: usize| -> Result<&str> {
        let start = 4 + off;
        let rest = bytes
            .get(start..)
            .context(".sbatlevel offset points past its end")?;
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).context(".sbatlevel level is not text")
    };
    Ok(ShimLevels {
        previous: parse_level(text_at(u32_at(4)?)?).context(".sbatlevel previous")?,
        latest: parse_level(text_at(u32_at(8)?)?).context(".sbatlevel latest")?,
    })
}

/// Whether a PE/COFF binary carries an Authenticode signature: its certificate
/// table (data directory 4 of the optional header) is not empty. Vendors sign
/// only self-contained images (shim, a GRUB with its modules built in), which is
/// what lets dualroot move them to a new ESP.
pub fn pe_is_signed(pe: &[u8]) -> Result<bool> {
    let u16_at = |at: usize| {
        pe.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |at: usize| {
        pe.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if pe.get(0..2) != Some(b"MZ") {
        bail!("not a PE file (no MZ header)");
    }
    let pe_at = u32_at(0x3c).context("truncated DOS header")?;
    if pe.get(pe_at..pe_at + 4) != Some(b"PE\0\0") {
        bail!("not a PE file (no PE signature at {pe_at:#x})");
    }
    let opt = pe_at + 24;
    let opt_size = u16_at(pe_at + 4 + 16).context("truncated COFF header")?;
    // PE32+ (0x20b) keeps its data directories at 112, PE32 (0x10b) at 96.
    let (count_at, dirs_at) = match u16_at(opt).context("truncated optional header")? {
        0x20b => (opt + 108, opt + 112),
        0x10b => (opt + 92, opt + 96),
        m => bail!("unknown PE optional header magic {m:#x}"),
    };
    let count = u32_at(count_at).context("truncated optional header")?;
    if count <= 4 || dirs_at + 5 * 8 > opt + opt_size {
        return Ok(false);
    }
    Ok(u32_at(dirs_at + 4 * 8 + 4).context("truncated data directories")? > 0)
}

/// The data of PE/COFF section `name` of an EFI binary (`None` when it has no
/// such section).
pub fn pe_section<'a>(pe: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    let u16_at = |at: usize| -> Option<usize> {
        Some(u16::from_le_bytes(pe.get(at..at + 2)?.try_into().ok()?) as usize)
    };
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(pe.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    if pe.get(0..2) != Some(b"MZ") {
        bail!("not a PE file (no MZ header)");
    }
    let pe_at = u32_at(0x3c).context("truncated DOS header")?;
    if pe.get(pe_at..pe_at + 4) != Some(b"PE\0\0") {
        bail!("not a PE file (no PE signature at {pe_at:#x})");
    }
    let coff = pe_at + 4;
    let sections = u16_at(coff + 2).context("truncated COFF header")?;
    let opt_size = u16_at(coff + 16).context("truncated COFF header")?;
    // Names longer than 8 bytes (`.sbatlevel`) are `/<offset>` into the COFF
    // string table, which follows the symbol table (18 bytes per symbol).
    let strings = u32_at(coff + 8)
        .zip(u32_at(coff + 12))
        .map(|(sym, n)| sym + n * 18);
    let table = coff + 20 + opt_size;
    for i in 0..sections {
        let s = table + i * 40;
        let raw_name = pe.get(s..s + 8).context("truncated section table")?;
        let n = raw_name.iter().position(|b| *b == 0).unwrap_or(8);
        let short = &raw_name[..n];
        let long = short
            .strip_prefix(b"/")
            .and_then(|o| std::str::from_utf8(o).ok()?.parse::<usize>().ok())
            .zip(strings)
            .and_then(|(o, at)| {
                let rest = pe.get(at + o..)?;
                Some(&rest[..rest.iter().position(|b| *b == 0)?])
            });
        if long.unwrap_or(short) != name.as_bytes() {
            continue;
        }
        let virtual_size = u32_at(s + 8).context("truncated section header")?;
        let raw_size = u32_at(s + 16).context("truncated section header")?;
        let raw_at = u32_at(s + 20).context("truncated section header")?;
        // The data proper: the virtual size, when the file holds it (the raw
        // size is rounded up to the file alignment).
        let len = if virtual_size > 0 {
            virtual_size.min(raw_size)
        } else {
            raw_size
        };
        return pe
            .get(raw_at..raw_at + len)
            .map(Some)
            .with_context(|| format!("section {name} lies past the end of the file"));
    }
    Ok(None)
}

/// The components of `binary` that `level` revokes: (component, its
/// generation, the level's minimum).
pub fn revoked(level: &Level, binary: &[Entry]) -> Vec<(String, u32, u32)> {
    binary
        .iter()
        .filter_map(|e| {
            let min = *level.minimum.get(&e.component)?;
            (e.generation < min).then(|| (e.component.clone(), e.generation, min))
        })
        .collect()
}

/// One EFI binary a slot boots through, named for people.
pub struct BootBinary<'a> {
    pub what: &'a str,
    pub sbat: &'a [Entry],
}

/// Whether installing a slot whose shim carries `new_shim` keeps the other
/// slot bootable: the level that shim writes by itself (`previous`) must not
/// revoke any binary of the other slot's boot chain. `latest` is checked too
/// when the machine's policy asks for it (`latest_policy`).
pub fn check_install(
    new_shim: &ShimLevels,
    new_what: &str,
    other_slot: &str,
    other_chain: &[BootBinary],
    latest_policy: bool,
) -> Result<()> {
    let level = if latest_policy {
        &new_shim.latest
    } else {
        &new_shim.previous
    };
    let mut why = Vec::new();
    for b in other_chain {
        for (c, have, min) in revoked(level, b.sbat) {
            why.push(format!("{} has {c} generation {have}, below {min}", b.what));
        }
    }
    if why.is_empty() {
        return Ok(());
    }
    bail!(
        "{new_what} would set the SBAT revocation level {} ({}), which revokes slot {other_slot}'s boot chain: {}; after the first boot of the new slot the firmware would refuse slot {other_slot}, so a fallback could not boot. Upgrade slot {other_slot}'s GRUB and shim first (an A/B upgrade of that slot to an OS with SBAT generations at least these), then install this bundle",
        level.datestamp,
        level
            .minimum
            .iter()
            .map(|(c, g)| format!("{c},{g}"))
            .collect::<Vec<_>>()
            .join(" "),
        why.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/sbat")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn captured_sections_parse() {
        let g12 = parse_sbat(&fixture("grubx64-2.06-13+deb12u2.sbat")).unwrap();
        assert_eq!(
            g12.iter()
                .map(|e| (e.component.as_str(), e.generation))
                .collect::<Vec<_>>(),
            [
                ("sbat", 1),
                ("grub", 5),
                ("grub.debian", 5),
                ("grub.debian12", 1)
            ]
        );
        let l16 = parse_sbatlevel(&fixture("shimx64-16.1-deb12.sbatlevel")).unwrap();
        assert_eq!(l16.previous.datestamp, "2025021800");
        assert_eq!(l16.previous.minimum["grub"], 5);
        assert_eq!(l16.previous.minimum["shim"], 4);
        assert_eq!(l16.latest.minimum["grub.proxmox"], 2);
        let l15 = parse_sbatlevel(&fixture("shimx64-15.8-deb11.sbatlevel")).unwrap();
        assert_eq!(l15.previous.datestamp, "2024010900");
        assert_eq!(l15.previous.minimum["grub"], 3);
        assert_eq!(l15.previous.minimum["grub.debian"], 4);
        assert_eq!(l15.latest.minimum["grub"], 4);
    }

    /// The 2024 story on Debian: slot a boots Debian 11's GRUB (grub,4), the
    /// bundle for slot b brings Debian 12's shim 16.1, whose automatic level
    /// asks grub,5: refused. Debian 11's own shim 15.8 (grub,3) is fine, and so
    /// is 16.1 once slot a has Debian 12's GRUB.
    #[test]
    fn a_shim_that_revokes_the_other_slots_grub_is_refused() {
        let grub11 = parse_sbat(&fixture("grubx64-2.06-3~deb11u6.sbat")).unwrap();
        let grub12 = parse_sbat(&fixture("grubx64-2.06-13+deb12u2.sbat")).unwrap();
        let shim11 = parse_sbat(&fixture("shimx64-15.8-deb11.sbat")).unwrap();
        let l16 = parse_sbatlevel(&fixture("shimx64-16.1-deb12.sbatlevel")).unwrap();
        let l15 = parse_sbatlevel(&fixture("shimx64-15.8-deb11.sbatlevel")).unwrap();
        let chain = |grub| {
            vec![
                BootBinary {
                    what: "shimx64.efi 15.8",
                    sbat: &shim11,
                },
                BootBinary {
                    what: "grubx64.efi",
                    sbat: grub,
                },
            ]
        };
        let e = check_install(&l16, "the bundle's shim 16.1", "a", &chain(&grub11), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("grubx64.efi has grub generation 4, below 5")
                && e.contains("revokes slot a's boot chain"),
            "{e}"
        );
        assert!(
            e.contains("SBAT revocation level 2025021800 (grub,5 shim,4)"),
            "{e}"
        );
        check_install(&l15, "shim 15.8", "a", &chain(&grub11), false).unwrap();
        check_install(&l16, "shim 16.1", "a", &chain(&grub12), false).unwrap();
        // With the latest policy 15.8 asks grub,4: Debian 11's GRUB still passes.
        check_install(&l15, "shim 15.8", "a", &chain(&grub11), true).unwrap();
    }

    /// A PE32+ optional header with 16 data directories: signed exactly when
    /// the certificate table (directory 4) has a size.
    #[test]
    fn a_signature_is_seen_in_the_certificate_table() {
        let mut pe = vec![0u8; 0x200];
        pe[0..2].copy_from_slice(b"MZ");
        pe[0x3c..0x40].copy_from_slice(&0x40u32.to_le_bytes());
        pe[0x40..0x44].copy_from_slice(b"PE\0\0");
        pe[0x44 + 16..0x44 + 18].copy_from_slice(&240u16.to_le_bytes());
        let opt = 0x58;
        pe[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        pe[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes());
        assert!(!pe_is_signed(&pe).unwrap());
        let cert = opt + 112 + 4 * 8;
        pe[cert..cert + 4].copy_from_slice(&0x180u32.to_le_bytes());
        pe[cert + 4..cert + 8].copy_from_slice(&0x40u32.to_le_bytes());
        assert!(pe_is_signed(&pe).unwrap());
        pe[opt..opt + 2].copy_from_slice(&0x999u16.to_le_bytes());
        assert!(pe_is_signed(&pe).is_err());
        assert!(pe_is_signed(b"#!/bin/sh").is_err());
    }

    /// A minimal PE: DOS header, PE signature, COFF header, no optional
    /// header, two sections; the parser finds `.sbat` by name.
    #[test]
    fn sections_are_found_in_a_pe_file() {
        let sbat = b"sbat,1,SBAT Version,sbat,1,x\ngrub,5,x,grub,2.06,x\n";
        let mut pe = vec![0u8; 0x300];
        pe[0..2].copy_from_slice(b"MZ");
        pe[0x3c..0x40].copy_from_slice(&0x40u32.to_le_bytes());
        pe[0x40..0x44].copy_from_slice(b"PE\0\0");
        let coff = 0x44;
        pe[coff + 2..coff + 4].copy_from_slice(&3u16.to_le_bytes());
        // No symbols; the string table (4-byte size, then names) at 0x280, as
        // GNU ld leaves it in shim: `.sbatlevel` is `/4` there.
        pe[coff + 8..coff + 12].copy_from_slice(&0x280u32.to_le_bytes());
        pe[0x284..0x284 + 11].copy_from_slice(b".sbatlevel\0");
        let table = coff + 20;
        for (i, (name, at)) in [(".text", 0x100usize), (".sbat", 0x180), ("/4", 0x200)]
            .iter()
            .enumerate()
        {
            let s = table + i * 40;
            pe[s..s + name.len()].copy_from_slice(name.as_bytes());
            pe[s + 8..s + 12].copy_from_slice(&(sbat.len() as u32).to_le_bytes());
            pe[s + 16..s + 20].copy_from_slice(&0x80u32.to_le_bytes());
            pe[s + 20..s + 24].copy_from_slice(&(*at as u32).to_le_bytes());
        }
        pe[0x180..0x180 + sbat.len()].copy_from_slice(sbat);
        let got = pe_section(&pe, ".sbat").unwrap().unwrap();
        assert_eq!(got, sbat);
        assert_eq!(parse_sbat(got).unwrap()[1].generation, 5);
        let lvl = b"\0\0\0\0\x08\0\0\0\x08\0\0\0sbat,1,2025021800\ngrub,5\n\0";
        pe[0x200..0x200 + lvl.len()].copy_from_slice(lvl);
        let got = pe_section(&pe, ".sbatlevel").unwrap().unwrap();
        assert_eq!(parse_sbatlevel(got).unwrap().previous.minimum["grub"], 5);
        assert_eq!(pe_section(&pe, ".vendor_cert").unwrap(), None);
        assert!(pe_section(b"ELF...", ".sbat").is_err());
    }
}
