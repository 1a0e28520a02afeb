//! The undo record: the old bytes of every disk region the unrecoverable window
//! may write (partition tables and boot gap, the new `/boot`, the new PV's label
//! and metadata, the `data` LV that receives the stash, the backup-GPT tail, the
//! old PVs' labels), read before the point of no return into RAM, and written
//! back when a step inside the window keeps failing.
//!
//! Whole regions, not the blocks a tool happens to touch: mkfs, the kernel's
//! lazy inode-table init, grub-install and discards write where they like inside
//! their region, so only the region bounds are known in advance. Raw bytes, not
//! files: the old `/boot` comes back with its type, UUID, label and boot code
//! bit for bit.

use crate::fsutil::write_atomic;
use crate::plan::MIB;
use anyhow::{bail, Context, Result};
use fs_err as fs;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One saved region: `len` bytes at `offset` of the disk, in `file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub offset: u64,
    pub len: u64,
    /// What the region held, as read.
    pub sha256: String,
    /// File name under the record's directory.
    pub file: String,
    /// What the region is, for people.
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub disk: PathBuf,
    pub regions: Vec<Saved>,
}

/// A region to save: offset, length and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
    pub what: String,
}

const MANIFEST: &str = "record.json";

/// Sorted, with overlapping or touching regions merged (their names joined), so
/// no byte is saved twice and the restore order does not matter.
pub fn merge(mut regions: Vec<Region>) -> Vec<Region> {
    regions.retain(|r| r.len > 0);
    regions.sort_by_key(|r| r.offset);
    let mut out: Vec<Region> = Vec::new();
    for r in regions {
        if let Some(last) = out.last_mut() {
            if r.offset <= last.offset + last.len {
                let end = (r.offset + r.len).max(last.offset + last.len);
                last.len = end - last.offset;
                last.what = format!("{} + {}", last.what, r.what);
                continue;
            }
        }
        out.push(r);
    }
    out
}

pub fn total(regions: &[Region]) -> u64 {
    regions.iter().map(|r| r.len).sum()
}

impl Record {
    pub fn bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    pub fn describe(&self) -> String {
        self.regions
            .iter()
            .map(|r| {
                format!(
                    "{} ({} MiB at MiB {})",
                    r.what,
                    r.len.div_ceil(MIB),
                    r.offset / MIB
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn load(dir: &Path) -> Result<Record> {
        let p = dir.join(MANIFEST);
        let text = fs::read_to_string(&p)?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }
}

/// Reads every region of `disk` into files under `dir` (the staging tmpfs) and
/// writes the manifest last, so a record without one is never used.
pub fn take(disk: &Path, regions: &[Region], dir: &Path) -> Result<Record> {
    fs::create_dir_all(dir)?;
    let f = fs::File::open(disk).with_context(|| {
        format!(
            "opening {} to read the undo record (nothing was changed)",
            disk.display()
        )
    })?;
    let mut buf = vec![0u8; MIB as usize];
    let mut saved = Vec::new();
    for (i, r) in regions.iter().enumerate() {
        let name = format!("region-{i:02}.bin");
        let mut out = std::io::BufWriter::new(fs::File::create(dir.join(&name))?);
        let mut h = Sha256::new();
        let mut at = r.offset;
        while at < r.offset + r.len {
            let n = (r.offset + r.len - at).min(MIB) as usize;
            f.file().read_exact_at(&mut buf[..n], at).with_context(|| {
                format!(
                    "reading {} bytes at byte {at} of {} ({}) for the undo record",
                    n,
                    disk.display(),
                    r.what
                )
            })?;
            h.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {} (the undo record in RAM)", name))?;
            at += n as u64;
        }
        out.into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {} (the undo record in RAM)", name))?;
        saved.push(Saved {
            offset: r.offset,
            len: r.len,
            sha256: hex::encode(h.finalize()),
            file: name,
            what: r.what.clone(),
        });
    }
    let rec = Record {
        disk: disk.to_path_buf(),
        regions: saved,
    };
    write_atomic(&dir.join(MANIFEST), &serde_json::to_vec_pretty(&rec)?)?;
    Ok(rec)
}

/// Writes every saved region back to the disk, syncs, drops the disk's page
/// cache and reads each region back from the device: it is done only when every
/// region hashes as it did when it was taken.
pub fn restore(rec: &Record, dir: &Path) -> Result<()> {
    let disk = &rec.disk;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .with_context(|| format!("opening {} to put the old regions back", disk.display()))?;
    let mut buf = vec![0u8; MIB as usize];
    for r in &rec.regions {
        let src = dir.join(&r.file);
        let mut input = std::io::BufReader::new(fs::File::open(&src)?);
        let mut h = Sha256::new();
        let mut at = r.offset;
        while at < r.offset + r.len {
            let n = (r.offset + r.len - at).min(MIB) as usize;
            input
                .read_exact(&mut buf[..n])
                .with_context(|| format!("reading {}", src.display()))?;
            h.update(&buf[..n]);
            f.file().write_all_at(&buf[..n], at).with_context(|| {
                format!(
                    "writing {} bytes back at byte {at} of {} ({})",
                    n,
                    disk.display(),
                    r.what
                )
            })?;
            at += n as u64;
        }
        let got = hex::encode(h.finalize());
        if got != r.sha256 {
            bail!(
                "the undo record of {} ({}) hashes to {got}, not {} as taken: RAM corrupted it; the region was written back anyway",
                r.what,
                src.display(),
                r.sha256
            );
        }
    }
    f.sync_all()
        .with_context(|| format!("syncing {}", disk.display()))?;
    if let Err(e) = nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    ) {
        log::warn!(
            "could not drop the page cache of {} before reading it back: {e}",
            disk.display()
        );
    }
    verify(rec)
}

/// Every saved region reads back from the disk with the hash it was taken with.
pub fn verify(rec: &Record) -> Result<()> {
    let f = fs::File::open(&rec.disk)?;
    let mut buf = vec![0u8; MIB as usize];
    for r in &rec.regions {
        let mut h = Sha256::new();
        let mut at = r.offset;
        while at < r.offset + r.len {
            let n = (r.offset + r.len - at).min(MIB) as usize;
            f.file()
                .read_exact_at(&mut buf[..n], at)
                .with_context(|| format!("reading back byte {at} of {}", rec.disk.display()))?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        let got = hex::encode(h.finalize());
        if got != r.sha256 {
            bail!(
                "{} at MiB {} of {} reads back as {got}, not {} as recorded: the disk did not keep what was written back",
                r.what,
                r.offset / MIB,
                rec.disk.display(),
                r.sha256
            );
        }
    }
    Ok(())
}

/// The disk's first sector (the old boot code and partition table) is the one
/// recorded, and it is a boot sector (0x55AA). Reads the device, not the cache.
pub fn check_boot_sector(rec: &Record, dir: &Path) -> Result<()> {
    let head = rec
        .regions
        .iter()
        .find(|r| r.offset == 0)
        .context("the undo record has no region at the start of the disk")?;
    let mut want = [0u8; 512];
    fs::File::open(dir.join(&head.file))?
        .read_exact(&mut want)
        .context("reading the recorded boot sector")?;
    let f = fs::File::open(&rec.disk)?;
    let _ = nix::fcntl::posix_fadvise(
        &f,
        0,
        512,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    let mut got = [0u8; 512];
    f.file()
        .read_exact_at(&mut got, 0)
        .with_context(|| format!("reading the boot sector of {}", rec.disk.display()))?;
    if got != want {
        bail!(
            "the boot sector of {} is not the one recorded: GRUB's boot code is not back",
            rec.disk.display()
        );
    }
    if got[510..] != [0x55, 0xAA] {
        bail!(
            "the recorded boot sector of {} has no boot signature",
            rec.disk.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(offset: u64, len: u64, what: &str) -> Region {
        Region {
            offset,
            len,
            what: what.into(),
        }
    }

    #[test]
    fn overlapping_regions_merge() {
        let m = merge(vec![
            region(10, 5, "c"),
            region(0, 4, "a"),
            region(4, 2, "b"),
            region(30, 0, "empty"),
            region(12, 10, "d"),
        ]);
        assert_eq!(
            m,
            vec![region(0, 6, "a + b"), region(10, 12, "c + d")],
            "touching and overlapping regions merge, empty ones go"
        );
        assert_eq!(total(&m), 18);
    }

    #[test]
    fn restore_puts_back_exactly_the_recorded_bytes() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("disk.img");
        // Distinct bytes everywhere, so a misplaced write shows.
        let orig: Vec<u8> = (0..5 * MIB as usize + 77)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&disk, &orig).unwrap();
        let regions = merge(vec![
            region(0, MIB + 5, "head"),
            region(3 * MIB, MIB, "middle"),
            region(orig.len() as u64 - 4096, 4096, "tail"),
        ]);
        let rec = take(&disk, &regions, &d.path().join("rec")).unwrap();
        assert_eq!(Record::load(&d.path().join("rec")).unwrap(), rec);
        // The window writes: inside every region, and outside them (kept).
        let mut damaged = orig.clone();
        for (at, len) in [(100usize, 2_000_000usize), (3 * MIB as usize + 9, 1000)] {
            damaged[at..at + len].fill(0xEE);
        }
        let n = damaged.len();
        damaged[n - 100..].fill(0);
        std::fs::write(&disk, &damaged).unwrap();
        assert!(verify(&rec).is_err(), "verify sees the damage");
        restore(&rec, &d.path().join("rec")).unwrap();
        let back = std::fs::read(&disk).unwrap();
        for r in &regions {
            let (a, b) = (r.offset as usize, (r.offset + r.len) as usize);
            assert_eq!(back[a..b], orig[a..b], "{} restored", r.what);
        }
        // Outside the regions the damage stays: the record covers only regions.
        assert_eq!(
            back[MIB as usize + 5..2_000_100],
            damaged[MIB as usize + 5..2_000_100]
        );
    }

    #[test]
    fn a_corrupted_record_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("disk.img");
        std::fs::write(&disk, vec![7u8; 2 * MIB as usize]).unwrap();
        let rec = take(&disk, &[region(0, MIB, "head")], &d.path().join("rec")).unwrap();
        std::fs::write(d.path().join("rec/region-00.bin"), vec![8u8; MIB as usize]).unwrap();
        let e = restore(&rec, &d.path().join("rec")).unwrap_err();
        assert!(format!("{e:#}").contains("RAM corrupted it"), "{e:#}");
    }
}
