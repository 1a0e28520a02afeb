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
///
/// Every call runs under a configuration dualroot owns, not the appliance's:
/// `LVM_SYSTEM_DIR` points at a directory holding only [`dualroot_lvm_conf`], so
/// nothing the old OS or its initramfs left in `/etc/lvm` applies — dracut's
/// `locking_type = 4` (lvm2 2.03 turns it into `--readonly`), its scan filter
/// that accepts only the old PV, a `global_filter`, `volume_list`,
/// `system_id_source` (a VG made in the initramfs would carry the initramfs's
/// system ID and be foreign to the new OS), lvmetad, `lvmlocal.conf`, profiles,
/// and the devices file (`use_devicesfile = 1` with a `system.devices` that names
/// another machine's PVs). Locks stay in the compiled-in `locking_dir`, shared
/// with the system's own lvm calls.
#[derive(Debug, Clone, Default)]
pub struct Lvm {
    pub only: Option<PathBuf>,
}

/// An lvm2 release, from `lvm version` (`2.02.187(2)-RHEL7 ...` -> 2.2.187).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LvmVersion(pub u32, pub u32, pub u32);

pub fn parse_lvm_version(text: &str) -> Option<LvmVersion> {
    let v = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("LVM version:"))?
        .trim();
    let mut parts = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    Some(LvmVersion(
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}

/// The whole `lvm.conf` dualroot's lvm calls read. Settings are written only for
/// the releases that know them (an unknown one is a warning on every call):
/// `use_lvmetad` exists up to 2.02, `system_id_source` since 2.02.117 and
/// `use_devicesfile` since 2.03.12. An unknown release gets all of them.
pub fn dualroot_lvm_conf(version: Option<LvmVersion>) -> String {
    let at_least = |v: LvmVersion| version.is_none_or(|have| have >= v);
    let before = |v: LvmVersion| version.is_none_or(|have| have < v);
    let mut global = vec!["    locking_type = 1".to_string()];
    if before(LvmVersion(2, 3, 0)) {
        global.push("    use_lvmetad = 0".into());
    }
    if at_least(LvmVersion(2, 2, 117)) {
        global.push("    system_id_source = \"none\"".into());
    }
    let mut devices = Vec::new();
    if at_least(LvmVersion(2, 3, 12)) {
        devices.push("    use_devicesfile = 0".to_string());
    }
    let mut s = String::from(
        "# Written by dualroot for its own lvm calls (LVM_SYSTEM_DIR); the system's\n# /etc/lvm is not read by them.\n",
    );
    s.push_str(&format!("global {{\n{}\n}}\n", global.join("\n")));
    if !devices.is_empty() {
        s.push_str(&format!("devices {{\n{}\n}}\n", devices.join("\n")));
    }
    s
}

/// The per-call `--config`: the device filter of [`Lvm::only`].
pub fn only_filter(dev: &Path) -> String {
    format!(
        "devices {{ filter = [ \"a|^{}$|\", \"r|.*|\" ] }}",
        dev.display()
    )
}

fn lvm_version() -> Option<LvmVersion> {
    static V: std::sync::OnceLock<Option<LvmVersion>> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        // `lvm version` reads no metadata; run it under the same private
        // directory (an empty one here) so a broken system lvm.conf cannot stop it.
        let dir = lvm_dir();
        let _ = fs::create_dir_all(&dir);
        cmd("lvm", ["version"])
            .env("LVM_SYSTEM_DIR", &dir)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .run_stdout()
            .ok()
            .and_then(|t| parse_lvm_version(&t))
    })
}

/// Where dualroot's `lvm.conf` lives: `$DUALROOT_LVM_DIR`, else
/// `/run/dualroot/lvm` (tmpfs in the initramfs and on the running system).
fn lvm_dir() -> PathBuf {
    std::env::var_os("DUALROOT_LVM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/dualroot/lvm"))
}

/// Writes dualroot's lvm.conf once per process; returns its directory.
fn lvm_system_dir() -> Result<PathBuf> {
    static DIR: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = lvm_dir();
        let conf = dualroot_lvm_conf(lvm_version());
        (|| -> Result<PathBuf> {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            crate::fsutil::set_mode(&dir, 0o700)?;
            crate::fsutil::write_atomic(&dir.join("lvm.conf"), conf.as_bytes())?;
            Ok(dir.clone())
        })()
        .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!("writing dualroot's lvm configuration: {e}"))
}

impl Lvm {
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let dir = lvm_system_dir()?;
        let mut c = cmd("lvm", args);
        c.env("LVM_SYSTEM_DIR", &dir)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1");
        if let Some(dev) = &self.only {
            c.args(["--config", &only_filter(dev)]);
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

/// Byte offset on the disk of an LV that lvm allocated as one segment on the
/// PV that starts at `pv_start` bytes: PV data start + first extent x extent size.
pub fn lv_disk_offset(lvm: &Lvm, vg: &str, lv: &str, pv_start: u64) -> Result<u64> {
    // `lvs --segments` reports its rows in a `seg` section, not `lv`.
    let segs = lvm.report(
        &[
            "lvs",
            "--segments",
            "-o",
            "lv_name,seg_pe_ranges,vg_extent_size",
            vg,
        ],
        "seg",
    )?;
    let pvs = lvm.report(&["pvs", "-o", "pv_name,vg_name,pe_start"], "pv")?;
    offset_from_reports(&segs, &pvs, vg, lv, pv_start)
}

type Rows = [std::collections::BTreeMap<String, String>];

fn offset_from_reports(segs: &Rows, pvs: &Rows, vg: &str, lv: &str, pv_start: u64) -> Result<u64> {
    let mine: Vec<_> = segs
        .iter()
        .filter(|r| r.get("lv_name").map(String::as_str) == Some(lv))
        .collect();
    let [seg] = mine.as_slice() else {
        bail!(
            "lvm reports {} segments for {vg}/{lv}; one was expected",
            mine.len()
        );
    };
    let first_pe = first_extent(seg.get("seg_pe_ranges").map(String::as_str).unwrap_or(""))
        .with_context(|| format!("lvm's seg_pe_ranges of {vg}/{lv}"))?;
    let extent: u64 = seg
        .get("vg_extent_size")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("lvm reports no extent size for {vg}"))?;
    let pe_start: u64 = pvs
        .iter()
        .find(|r| r.get("vg_name").map(String::as_str) == Some(vg))
        .and_then(|r| r.get("pe_start"))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("lvm reports no pe_start for the PV of {vg}"))?;
    Ok(pv_start + pe_start + first_pe * extent)
}

/// The first extent of `/dev/vda3:640-767` (one range: a one-segment LV).
fn first_extent(ranges: &str) -> Result<u64> {
    let r = ranges.trim();
    if r.split_whitespace().count() != 1 {
        bail!("{r:?} is not one extent range");
    }
    let (_, span) = r
        .rsplit_once(':')
        .with_context(|| format!("{r:?} has no device:extents form"))?;
    let first = span.split('-').next().unwrap_or("");
    first
        .parse()
        .with_context(|| format!("{r:?}: extent {first:?} is not a number"))
}

/// A fresh ext4 with a label.
pub fn mkfs_ext4(dev: &Path, label: &str) -> Result<()> {
    cmd("mkfs.ext4", ["-q", "-F", "-L", label]).arg(dev).run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lv_offset_from_lvm_json_reports() {
        // As lvm 2.03 prints `lvs --segments ... --reportformat json --units b
        // --nosuffix` (section `seg`) and `pvs -o pv_name,vg_name,pe_start`.
        let segs = r#"{"report": [{"seg": [
            {"lv_name":"root", "seg_pe_ranges":"/dev/vda3:0-319", "vg_extent_size":"4194304"},
            {"lv_name":"data", "seg_pe_ranges":"/dev/vda3:640-767", "vg_extent_size":"4194304"}
        ]}]}"#;
        let pvs = r#"{"report": [{"pv": [
            {"pv_name":"/dev/vda3", "vg_name":"VA", "pe_start":"1048576"}
        ]}]}"#;
        let segs = sysinfo::parse_lvm_report(segs, "seg").unwrap();
        let pvs = sysinfo::parse_lvm_report(pvs, "pv").unwrap();
        let pv_start = 386 << 20;
        assert_eq!(
            offset_from_reports(&segs, &pvs, "VA", "data", pv_start).unwrap(),
            pv_start + (1 << 20) + 640 * (4 << 20)
        );
        assert!(offset_from_reports(&segs, &pvs, "VA", "image", pv_start).is_err());
    }

    #[test]
    fn extent_ranges_parse() {
        assert_eq!(first_extent("/dev/vda3:640-767").unwrap(), 640);
        assert_eq!(first_extent(" /dev/mapper/x:0-3 ").unwrap(), 0);
        assert!(first_extent("/dev/vda3:0-3 /dev/vdb1:0-9").is_err());
        assert!(first_extent("").is_err());
    }

    #[test]
    fn lvm_versions_parse() {
        let el7 = "  LVM version:     2.02.187(2)-RHEL7 (2020-03-24)\n  Library version: 1.02.170-RHEL7 (2020-03-24)\n  Driver version:  4.37.1\n";
        let debian = "  LVM version:     2.03.16(2) (2022-05-18)\n  Library version: 1.02.185 (2022-05-18)\n";
        assert_eq!(parse_lvm_version(el7), Some(LvmVersion(2, 2, 187)));
        assert_eq!(parse_lvm_version(debian), Some(LvmVersion(2, 3, 16)));
        assert_eq!(parse_lvm_version("garbage"), None);
        assert_eq!(
            part_dev(Path::new("/dev/nvme0n1"), 3),
            Path::new("/dev/nvme0n1p3")
        );
        assert_eq!(part_dev(Path::new("/dev/vda"), 3), Path::new("/dev/vda3"));
    }

    /// Each release line gets the settings it knows, and only those.
    #[test]
    fn dualroot_lvm_conf_per_release() {
        let el7_0 = dualroot_lvm_conf(Some(LvmVersion(2, 2, 105)));
        assert!(el7_0.contains("locking_type = 1") && el7_0.contains("use_lvmetad = 0"));
        assert!(!el7_0.contains("system_id_source") && !el7_0.contains("use_devicesfile"));
        let el7 = dualroot_lvm_conf(Some(LvmVersion(2, 2, 187)));
        assert!(el7.contains("use_lvmetad = 0") && el7.contains("system_id_source = \"none\""));
        assert!(!el7.contains("use_devicesfile"));
        let bullseye = dualroot_lvm_conf(Some(LvmVersion(2, 3, 11)));
        assert!(!bullseye.contains("use_lvmetad") && !bullseye.contains("use_devicesfile"));
        assert!(bullseye.contains("system_id_source"));
        let el9 = dualroot_lvm_conf(Some(LvmVersion(2, 3, 21)));
        assert!(el9.contains("use_devicesfile = 0") && !el9.contains("use_lvmetad"));
        let unknown = dualroot_lvm_conf(None);
        for k in [
            "locking_type = 1",
            "use_lvmetad = 0",
            "system_id_source",
            "use_devicesfile = 0",
        ] {
            assert!(unknown.contains(k), "{k} missing for an unknown release");
        }
        // Nothing that restricts devices or activation is ever written: the
        // per-call filter is the only one.
        for text in [&el7_0, &el7, &bullseye, &el9, &unknown] {
            for k in ["filter", "volume_list", "locking_type = 4", "readonly"] {
                assert!(!text.contains(k), "{k} in\n{text}");
            }
        }
        assert_eq!(
            only_filter(Path::new("/dev/vda3")),
            "devices { filter = [ \"a|^/dev/vda3$|\", \"r|.*|\" ] }"
        );
    }
}
