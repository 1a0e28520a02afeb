//! Block devices, LVM and filesystems, shared by the migration and slot install:
//! partition device names, waiting for udev, `lvm` limited to one device, mkfs.
//! LVM is read through its JSON report and `sysinfo::parse_lvm_report`.

use crate::cmd::{cmd, CommandExt};
use crate::sysinfo;
use anyhow::{bail, Context, Result};
use fs_err as fs;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// `/dev/vda` + 2 → `/dev/vda2`; `/dev/nvme0n1` + 2 → `/dev/nvme0n1p2`.
pub fn part_dev(disk: &Path, n: u32) -> PathBuf {
    let s = disk.display().to_string();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{n}"))
    } else {
        PathBuf::from(format!("{s}{n}"))
    }
}

/// Waits (udev settle, then up to 10 s) until every path exists.
pub fn wait_for(paths: &[PathBuf]) -> Result<()> {
    let _ = cmd("udevadm", ["settle", "--timeout=10"]).run();
    for _ in 0..100 {
        if paths.iter().all(|p| p.exists()) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let missing: Vec<String> = paths
        .iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    bail!(
        "device node(s) {} did not appear within 10 s",
        missing.join(", ")
    )
}

/// Size of a block device (or file) in bytes.
pub fn device_bytes(dev: &Path) -> Result<u64> {
    let mut f = fs::File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    f.seek(SeekFrom::End(0))
        .with_context(|| format!("reading the size of {}", dev.display()))
}

/// `/dev/<vg>/<lv>`.
pub fn lv_path(vg: &str, lv: &str) -> PathBuf {
    PathBuf::from(format!("/dev/{vg}/{lv}"))
}

/// `lvm` calls; with `only` set, LVM sees no device but that one (the migration
/// must never touch another disk's PVs).
#[derive(Debug, Clone, Default)]
pub struct Lvm {
    pub only: Option<PathBuf>,
}

impl Lvm {
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let mut c = cmd("lvm", args);
        if let Some(dev) = &self.only {
            c.args([
                "--config",
                &format!(
                    "devices {{ filter = [ \"a|^{}$|\", \"r|.*|\" ] }}",
                    dev.display()
                ),
            ]);
        }
        c.run_stdout()
    }

    /// One `lvm <report> --reportformat json` section (`vg`, `lv`, `pv`) in bytes.
    pub fn report(
        &self,
        args: &[&str],
        kind: &str,
    ) -> Result<Vec<std::collections::BTreeMap<String, String>>> {
        let mut a = args.to_vec();
        a.extend(["--reportformat", "json", "--units", "b", "--nosuffix"]);
        let text = self.run(&a)?;
        sysinfo::parse_lvm_report(&text, kind)
    }

    /// Free bytes in a VG.
    pub fn vg_free(&self, vg: &str) -> Result<u64> {
        let rows = self.report(&["vgs", "-o", "vg_name,vg_free", vg], "vg")?;
        let row = rows
            .iter()
            .find(|r| r.get("vg_name").map(String::as_str) == Some(vg))
            .with_context(|| format!("lvm reports no volume group {vg}"))?;
        row.get("vg_free")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("lvm reports no vg_free for {vg}"))
    }

    /// `name size_in_MiB` of every LV of a VG, for people.
    pub fn lv_sizes(&self, vg: &str) -> Result<String> {
        let rows = self.report(&["lvs", "-o", "lv_name,lv_size", vg], "lv")?;
        Ok(rows
            .iter()
            .map(|r| {
                let mib = r
                    .get("lv_size")
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
                    >> 20;
                format!(
                    "{} {mib}M",
                    r.get("lv_name").map(String::as_str).unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join(" "))
    }
}

/// A fresh ext4 with a label.
pub fn mkfs_ext4(dev: &Path, label: &str) -> Result<()> {
    cmd("mkfs.ext4", ["-q", "-F", "-L", label]).arg(dev).run()
}
