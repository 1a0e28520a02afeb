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

// BLKRRPART, <linux/fs.h>: _IO(0x12, 95).
nix::ioctl_none!(blkrrpart, 0x12, 95);

/// Makes the kernel read `disk`'s partition table again: the BLKRRPART ioctl
/// (no tool of the old OS needed), `partx -u` when the ioctl keeps being refused.
/// Writing the disk makes udev probe its old partitions (inotify on close), and
/// while a probe holds one open the ioctl fails with EBUSY: wait for udev and
/// try again for up to 5 s.
/// The workspace denies unsafe code; this one no-argument ioctl is the exception.
#[allow(unsafe_code)]
pub fn reread_partitions(disk: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
    let mut last = nix::errno::Errno::UnknownErrno;
    for attempt in 0..20 {
        let _ = cmd("udevadm", ["settle", "--timeout=5"]).run();
        // SAFETY: BLKRRPART takes no argument; the fd is open for the call's duration.
        match unsafe { blkrrpart(f.file().as_raw_fd()) } {
            Ok(_) => {
                if attempt > 0 {
                    log::info!(
                        "{}: partition table re-read after {attempt} busy attempt(s)",
                        disk.display()
                    );
                }
                return Ok(());
            }
            Err(nix::errno::Errno::EBUSY) => {
                last = nix::errno::Errno::EBUSY;
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            Err(e) => {
                last = e;
                break;
            }
        }
    }
    cmd("partx", ["-u"]).arg(disk).run().with_context(|| {
        format!(
            "the kernel did not re-read the partition table of {} (BLKRRPART: {last}), nor did partx",
            disk.display()
        )
    })
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

/// The lvm2 release line from `lvm version` (`2.02.187(2)-RHEL7 ...` -> (2, 2)).
pub fn parse_lvm_version(text: &str) -> Option<(u32, u32)> {
    let v = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("LVM version:"))?
        .trim();
    let mut parts = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// What every `lvm` call adds to its `--config`: on lvm2 2.02 (EL7), dracut's
/// initramfs `lvm.conf` sets `locking_type = 4` (read-only) and lvmetad may be
/// configured, so pvcreate/vgcreate would fail; 2.03 has neither setting.
pub fn lvm_config_override(version: Option<(u32, u32)>) -> &'static str {
    match version {
        Some((2, minor)) if minor < 3 => "global { locking_type = 1 use_lvmetad = 0 } ",
        _ => "",
    }
}

fn lvm_version() -> Option<(u32, u32)> {
    static V: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        cmd("lvm", ["version"])
            .run_stdout()
            .ok()
            .and_then(|t| parse_lvm_version(&t))
    })
}

impl Lvm {
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let mut c = cmd("lvm", args);
        let mut config = lvm_config_override(lvm_version()).to_string();
        if let Some(dev) = &self.only {
            config.push_str(&format!(
                "devices {{ filter = [ \"a|^{}$|\", \"r|.*|\" ] }}",
                dev.display()
            ));
        }
        if !config.is_empty() {
            c.args(["--config", config.trim_end()]);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvm_locking_is_overridden_on_lvm2_202_only() {
        let el7 = "  LVM version:     2.02.187(2)-RHEL7 (2020-03-24)\n  Library version: 1.02.170-RHEL7 (2020-03-24)\n  Driver version:  4.37.1\n";
        let debian = "  LVM version:     2.03.16(2) (2022-05-18)\n  Library version: 1.02.185 (2022-05-18)\n";
        assert_eq!(parse_lvm_version(el7), Some((2, 2)));
        assert_eq!(parse_lvm_version(debian), Some((2, 3)));
        assert_eq!(parse_lvm_version("garbage"), None);
        assert!(lvm_config_override(parse_lvm_version(el7)).contains("locking_type = 1"));
        assert!(lvm_config_override(parse_lvm_version(el7)).contains("use_lvmetad = 0"));
        assert_eq!(lvm_config_override(parse_lvm_version(debian)), "");
        assert_eq!(lvm_config_override(None), "");
        assert_eq!(
            part_dev(Path::new("/dev/nvme0n1"), 3),
            Path::new("/dev/nvme0n1p3")
        );
        assert_eq!(part_dev(Path::new("/dev/vda"), 3), Path::new("/dev/vda3"));
    }
}
