//! Per-scenario disks: qcow2 overlays over a cached base image, and the
//! payload disk that carries the current build into a guest.

use crate::cmd;
use crate::error::{Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Filesystem label the guests mount at /mnt/payload.
pub const PAYLOAD_LABEL: &str = "dualroot-payload";

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A copy-on-write qcow2 over `base` (raw), so scenarios share one base
/// image and never change it. Without `qemu-img` (package qemu-utils) it
/// falls back to a sparse raw copy; returns the path and its format.
pub fn overlay(base: &Path, out: &Path) -> Result<(PathBuf, &'static str)> {
    overlay_on(base, "raw", out)
}

/// Like [`overlay`] over a base of format `base_format` (`raw` or `qcow2`):
/// a scenario can save a prepared state (e.g. the old system after
/// `dualroot stage`) as a qcow2 and start several scenarios on top of it.
/// A qcow2 base must not be written again while overlays use it.
pub fn overlay_on(base: &Path, base_format: &str, out: &Path) -> Result<(PathBuf, &'static str)> {
    let _ = fs::remove_file(out);
    if have("qemu-img") {
        cmd::run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"])
                .arg(base)
                .arg(out),
        )
        .context("creating qcow2 overlay")?;
        Ok((out.to_path_buf(), "qcow2"))
    } else if base_format == "raw" {
        cmd::run(Command::new("cp").arg("--sparse=always").arg(base).arg(out))
            .context("copying base image (no qemu-img)")?;
        Ok((out.to_path_buf(), "raw"))
    } else {
        crate::bail!("an overlay on a {base_format} base needs qemu-img (package qemu-utils)")
    }
}

/// Files to put on a payload disk, staged in a directory first.
pub struct Payload {
    staging: PathBuf,
}

impl Payload {
    /// Stage into `staging` (emptied first).
    pub fn new(staging: &Path) -> Result<Payload> {
        if staging.exists() {
            fs::remove_dir_all(staging)
                .with_context(|| format!("emptying {}", staging.display()))?;
        }
        fs::create_dir_all(staging).with_context(|| format!("creating {}", staging.display()))?;
        Ok(Payload {
            staging: staging.to_path_buf(),
        })
    }

    /// Copy a file to `rel` on the payload disk, with `mode`.
    pub fn file(&self, src: &Path, rel: &str, mode: u32) -> Result<&Payload> {
        let dst = self.staging.join(rel);
        if let Some(p) = dst.parent() {
            fs::create_dir_all(p)?;
        }
        fs::copy(src, &dst).with_context(|| format!("copying {} to payload", src.display()))?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(mode))?;
        Ok(self)
    }

    /// Write `data` to `rel` on the payload disk, with `mode`.
    pub fn bytes(&self, data: &[u8], rel: &str, mode: u32) -> Result<&Payload> {
        let dst = self.staging.join(rel);
        if let Some(p) = dst.parent() {
            fs::create_dir_all(p)?;
        }
        fs::write(&dst, data).with_context(|| format!("writing {rel} to payload"))?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(mode))?;
        Ok(self)
    }

    /// Copy a directory tree (modes kept) to `rel`.
    pub fn dir(&self, src: &Path, rel: &str) -> Result<&Payload> {
        let dst = self.staging.join(rel);
        if let Some(p) = dst.parent() {
            fs::create_dir_all(p)?;
        }
        cmd::run(Command::new("cp").arg("-a").arg(src).arg(&dst))
            .with_context(|| format!("copying {} to payload", src.display()))?;
        Ok(self)
    }

    /// Make the raw ext4 image (label `dualroot-payload`) at `out`; sized
    /// to the content plus slack.
    pub fn build(&self, out: &Path) -> Result<PathBuf> {
        let du = cmd::run(Command::new("du").args(["-sk"]).arg(&self.staging))?;
        let kib: u64 = String::from_utf8_lossy(&du.stdout)
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .context("parsing du output")?;
        let mib = kib / 1024 * 5 / 4 + 16;
        let _ = fs::remove_file(out);
        let f = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        f.set_len(mib * 1024 * 1024)?;
        drop(f);
        cmd::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", PAYLOAD_LABEL, "-d"])
                .arg(&self.staging)
                .arg(out),
        )
        .context("making payload filesystem")?;
        Ok(out.to_path_buf())
    }
}

/// Install script put on every standard payload: copies what is present to
/// its place in the guest. Run as `sh /mnt/payload/install.sh`.
pub const INSTALL_SH: &str = r#"#!/bin/sh
set -eu
P=$(dirname "$0")
if [ -x "$P/bin/dualroot" ]; then
    install -m 755 "$P/bin/dualroot" /usr/local/sbin/dualroot
    echo "installed /usr/local/sbin/dualroot"
fi
if [ -d "$P/dracut/90dualroot" ]; then
    rm -rf /usr/lib/dracut/modules.d/90dualroot
    cp -a "$P/dracut/90dualroot" /usr/lib/dracut/modules.d/90dualroot
    echo "installed dracut module 90dualroot"
fi
if [ -d "$P/stage" ]; then
    mkdir -p /var/lib/dualroot
    cp -a "$P/stage/." /var/lib/dualroot/
    echo "staged files to /var/lib/dualroot"
fi
"#;

/// The standard payload: `install.sh`, the workspace's `dualroot` binary
/// (`target/release/dualroot`, if built), the dracut module, and every
/// file of `stage` (bundle, plan, keys) under `stage/`.
pub fn standard_payload(staging: &Path, stage: &[(PathBuf, String)]) -> Result<Payload> {
    let ws = crate::images::workspace_dir();
    let p = Payload::new(staging)?;
    p.bytes(INSTALL_SH.as_bytes(), "install.sh", 0o755)?;
    let bin = crate::images::dualroot_bin();
    if bin.is_file() {
        p.file(&bin, "bin/dualroot", 0o755)?;
    }
    let module = ws.join("dracut-module/90dualroot");
    if module.is_dir() {
        p.dir(&module, "dracut/90dualroot")?;
    }
    for (src, rel) in stage {
        p.file(src, &format!("stage/{rel}"), 0o644)?;
    }
    Ok(p)
}

/// `path` from the ext4 filesystem on partition `number` (1-based) of a guest
/// disk no VM is using, e.g. `/dualroot/journal.json` on the migrated disk's
/// `/boot` after the guest powered off. Done on the host without mounting (it
/// has no device-mapper and its loop devices show no partitions): `qemu-img`
/// copies the first MiB (the partition table) and then the partition alone into
/// `scratch`, `sfdisk -J` finds the partition, `debugfs` reads the file.
/// `path` is relative to that filesystem's root (`/dualroot/...`, not `/boot/...`).
pub fn read_partition_file(
    disk: &Path,
    format: &str,
    number: u32,
    path: &str,
    scratch: &Path,
) -> Result<Vec<u8>> {
    fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let info = cmd::run(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-f", format])
            .arg(disk),
    )
    .context("reading the disk's size with qemu-img info")?;
    let virtual_size = serde_json::from_slice::<serde_json::Value>(&info.stdout)
        .ok()
        .and_then(|v| v["virtual-size"].as_u64())
        .with_context(|| format!("no virtual-size in qemu-img info of {}", disk.display()))?;
    // The table: the first MiB, grown (sparse) to the disk's size so sfdisk
    // takes the primary GPT (the backup at the end is not copied).
    let head = scratch.join("head.raw");
    extract(disk, format, 0, 1 << 20, &head)?;
    fs::OpenOptions::new()
        .write(true)
        .open(&head)
        .and_then(|f| f.set_len(virtual_size))
        .with_context(|| format!("growing {}", head.display()))?;
    let table = cmd::run(Command::new("sfdisk").arg("-J").arg(&head))
        .context("reading the partition table with sfdisk -J")?;
    let _ = fs::remove_file(&head);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let part = crate::parse::sfdisk_partition(&table, number).with_context(|| {
        format!(
            "{} has no partition {number}: {}",
            disk.display(),
            table.trim()
        )
    })?;
    let img = scratch.join(format!("part{number}.raw"));
    extract(disk, format, part.offset_bytes(), part.size_bytes(), &img)?;
    let out = cmd::run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {path}"))
            .arg(&img),
    );
    let _ = fs::remove_file(&img);
    let out = out.with_context(|| format!("reading {path} with debugfs"))?;
    // debugfs exits 0 when the file is missing; it says so on stderr, after
    // its banner line.
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(e) = stderr
        .lines()
        .find(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
    {
        crate::bail!(
            "reading {path} on partition {number} of {}: {e}",
            disk.display()
        );
    }
    Ok(out.stdout)
}

/// `size` bytes at `offset` of a disk of any format QEMU reads, as a raw file.
fn extract(disk: &Path, format: &str, offset: u64, size: u64, out: &Path) -> Result<()> {
    let _ = fs::remove_file(out);
    // A raw layer with offset and size over the disk's own format node
    // (backing files included); a comma in an option value is written twice.
    let file = disk.display().to_string().replace(',', ",,");
    cmd::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw", "--image-opts"])
            .arg(format!(
                "driver=raw,offset={offset},size={size},file.driver={format},file.file.driver=file,file.file.filename={file}"
            ))
            .arg(out),
    )
    .with_context(|| format!("copying {size} bytes at {offset} out of {}", disk.display()))?;
    Ok(())
}
