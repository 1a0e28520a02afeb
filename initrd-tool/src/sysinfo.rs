//! Facts about the machine, read from /proc, /sys and system tools. Every parser is a
//! pure function over text, tested on captured output in `fixtures/tool-output/`.

use crate::bundle::CpuLevel;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

/// The `flags` of the first processor in `/proc/cpuinfo`.
pub fn cpu_flags(cpuinfo: &str) -> BTreeSet<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Flags missing for `level` (and the levels below it).
pub fn missing_cpu_flags(flags: &BTreeSet<String>, level: CpuLevel) -> Vec<&'static str> {
    [CpuLevel::V1, CpuLevel::V2, CpuLevel::V3]
        .into_iter()
        .filter(|l| *l <= level)
        .flat_map(|l| l.flags().iter().copied())
        .filter(|f| !flags.contains(*f))
        .collect()
}

/// A field of `/proc/meminfo`, in bytes.
pub fn meminfo_bytes(meminfo: &str, field: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k != field {
            return None;
        }
        let mut it = v.split_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        Some(match it.next() {
            Some("kB") => n * 1024,
            _ => n,
        })
    })
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Nic {
    pub name: String,
    pub mac: String,
    pub driver: String,
    /// Bus address of the device, e.g. `0000:00:03.0`.
    pub bus: String,
}

/// Physical NICs (those with a `device` link) under a sysfs `class/net` directory.
pub fn nics(class_net: &Path) -> Result<Vec<Nic>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(class_net) {
        Ok(rd) => rd,
        Err(e) => return Err(e).with_context(|| format!("listing {}", class_net.display())),
    };
    for e in rd {
        let dir = e?.path();
        let dev = dir.join("device");
        if !dev.exists() {
            continue; // lo, bridges, tunnels
        }
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mac = fs::read_to_string(dir.join("address"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let driver = fs::read_link(dev.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "unknown".into());
        let real = fs::canonicalize(&dev).unwrap_or(dev.clone());
        // virtio NICs sit one level below their PCI function (…/0000:00:03.0/virtio0).
        let bus = real
            .ancestors()
            .filter_map(|a| a.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .find(|n| n.len() == 12 && n.as_bytes()[4] == b':' && n.as_bytes()[7] == b':')
            .unwrap_or_else(|| real.display().to_string());
        out.push(Nic {
            name,
            mac,
            driver,
            bus,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// `major:minor` of the filesystem mounted at `mountpoint`, from `/proc/self/mountinfo`.
pub fn mount_device(mountinfo: &str, mountpoint: &str) -> Option<(u32, u32)> {
    mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 4 && f[4] == mountpoint {
            let (a, b) = f[2].split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        } else {
            None
        }
    })
}

/// The filesystem type of what is mounted at `mountpoint` (the newest mount).
pub fn mount_fstype(mountinfo: &str, mountpoint: &str) -> Option<String> {
    mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 4 && f[4] == mountpoint {
            // optional fields end at "-"; the type follows it
            let dash = f.iter().position(|x| *x == "-")?;
            f.get(dash + 1).map(|t| t.to_string())
        } else {
            None
        }
    })
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LsblkDevice {
    pub name: String,
    pub path: Option<String>,
    pub size: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub pkname: Option<String>,
    pub mountpoint: Option<String>,
    pub fstype: Option<String>,
    pub label: Option<String>,
    #[serde(default)]
    pub children: Vec<LsblkDevice>,
}

#[derive(Debug, Deserialize)]
struct Lsblk {
    blockdevices: Vec<LsblkDevice>,
}

/// `lsblk -J -b -o NAME,PATH,SIZE,TYPE,PKNAME,MOUNTPOINT,FSTYPE,LABEL`.
pub fn parse_lsblk(json: &str) -> Result<Vec<LsblkDevice>> {
    Ok(serde_json::from_str::<Lsblk>(json)
        .context("parsing lsblk JSON")?
        .blockdevices)
}

pub const LSBLK_COLUMNS: &str = "NAME,PATH,SIZE,TYPE,PKNAME,MOUNTPOINT,FSTYPE,LABEL";

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SfdiskPartition {
    pub node: String,
    pub start: u64,
    pub size: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SfdiskTable {
    pub label: String,
    pub sectorsize: Option<u64>,
    #[serde(default)]
    pub partitions: Vec<SfdiskPartition>,
}

/// `sfdisk -J DEVICE`.
pub fn parse_sfdisk(json: &str) -> Result<SfdiskTable> {
    #[derive(Deserialize)]
    struct Top {
        partitiontable: SfdiskTable,
    }
    Ok(serde_json::from_str::<Top>(json)
        .context("parsing sfdisk JSON")?
        .partitiontable)
}

/// One row of an `lvm ... --reportformat json --units b --nosuffix` report; every
/// value is a string in LVM's JSON.
pub fn parse_lvm_report(
    json: &str,
    kind: &str,
) -> Result<Vec<std::collections::BTreeMap<String, String>>> {
    let v: serde_json::Value = serde_json::from_str(json).context("parsing lvm JSON report")?;
    let rows = v["report"][0][kind]
        .as_array()
        .with_context(|| format!("lvm report has no `{kind}` section"))?;
    rows.iter()
        .map(|r| {
            let obj = r.as_object().context("lvm report row is not an object")?;
            Ok(obj
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu64_lacks_v2_and_host_has_it() {
        let qemu64 = crate::tool_output("cpuinfo-qemu64.txt");
        let missing = missing_cpu_flags(&cpu_flags(&qemu64), CpuLevel::V2);
        assert!(
            missing.contains(&"sse4_2") && missing.contains(&"popcnt"),
            "{missing:?}"
        );
        let host = crate::tool_output("cpuinfo-host.txt");
        assert!(missing_cpu_flags(&cpu_flags(&host), CpuLevel::V2).is_empty());
    }

    #[test]
    fn meminfo() {
        let m =
            "MemTotal:        2030000 kB\nMemFree:          100 kB\nMemAvailable:    1500000 kB\n";
        assert_eq!(meminfo_bytes(m, "MemAvailable"), Some(1_500_000 * 1024));
        assert_eq!(meminfo_bytes(m, "Nope"), None);
    }

    #[test]
    fn mountinfo_root() {
        let mi = "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n25 22 0:5 / /dev rw - devtmpfs udev rw\n";
        assert_eq!(mount_device(mi, "/"), Some((254, 1)));
        assert_eq!(mount_device(mi, "/boot"), None);
    }

    #[test]
    fn lsblk_captured() {
        let d = parse_lsblk(&crate::tool_output("lsblk-host.json")).unwrap();
        let vda = d.iter().find(|d| d.name == "vda").unwrap();
        assert_eq!(vda.kind, "disk");
        assert_eq!(vda.size, 274_877_906_944);
        assert_eq!(vda.mountpoint.as_deref(), Some("/"));
    }

    #[test]
    fn sfdisk_captured() {
        let before = parse_sfdisk(&crate::tool_output("sfdisk-dos-before.json")).unwrap();
        assert_eq!(before.label, "dos");
        assert_eq!(before.partitions.len(), 1);
        assert_eq!(before.partitions[0].start, 2048);
        let after = parse_sfdisk(&crate::tool_output("sfdisk-gpt-after.json")).unwrap();
        assert_eq!(after.label, "gpt");
        assert_eq!(
            after.partitions[0].kind,
            "21686148-6449-6E6F-744E-656564454649"
        );
        assert_eq!(after.partitions[2].name.as_deref(), Some("lvm"));
    }

    #[test]
    fn lvm_captured() {
        let vgs = parse_lvm_report(&crate::tool_output("lvm-vgs.json"), "vg").unwrap();
        assert_eq!(vgs[0]["vg_name"], "VA");
        assert_eq!(vgs[0]["vg_extent_size"], "4194304");
        let pvs = parse_lvm_report(&crate::tool_output("lvm-pvs.json"), "pv").unwrap();
        assert_eq!(pvs[0]["pv_size"], "2143289344");
        assert!(parse_lvm_report(&crate::tool_output("lvm-vgs.json"), "lv").is_err());
    }
}
