//! The old system's other filesystems on the migrated disk: `/home` on its own
//! LV (CentOS on larger disks), `/var` or `/opt` on LVs or partitions. The
//! migration overwrites the whole disk, so each one is either carried (a
//! `[[carry]]` path lies on it) or given up by the plan (`discard`); anything
//! else is refused by preflight before a byte is written. In the migration
//! initramfs they are mounted read-only under the old root, so carried paths on
//! them arrive with their content (before, a carried `/home` on its own LV was
//! an empty directory of the root filesystem).

use crate::mounts::Mount;
use crate::plan::Plan;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One line of `/etc/fstab`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FstabEntry {
    pub spec: String,
    pub mountpoint: String,
    pub fstype: String,
    pub options: String,
}

/// The entries of an fstab text (comments, blank and one-field lines skipped; octal
/// escapes such as `\040` in mount points decoded).
pub fn parse_fstab(text: &str) -> Vec<FstabEntry> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                return None;
            }
            let mut w = l.split_whitespace();
            Some(FstabEntry {
                spec: w.next()?.to_string(),
                mountpoint: unescape(w.next()?),
                // mount(8) defaults a missing type to auto
                fstype: w.next().unwrap_or("auto").to_string(),
                options: w.next().unwrap_or("defaults").to_string(),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Filesystem types that hold no data of the disk (pseudo, network, swap).
const NOT_ON_DISK: &[&str] = &[
    "swap",
    "tmpfs",
    "proc",
    "sysfs",
    "devpts",
    "devtmpfs",
    "cgroup",
    "cgroup2",
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "sshfs",
    "fuse",
    "fuse.sshfs",
    "glusterfs",
    "ceph",
    "9p",
    "virtiofs",
    "none",
    "auto9p",
    "efivarfs",
    "securityfs",
    "debugfs",
    "hugetlbfs",
    "mqueue",
    "bpf",
];

/// The fstab entries that are block filesystems other than `/`, `/boot` and the
/// ESP (vfat at `/boot/efi` or `/efi`: its boot chain is the migration's own
/// business, staged and replaced by the new ESP's). Bind mounts are skipped:
/// their data lives on another entry.
pub fn other_filesystems(entries: &[FstabEntry]) -> Vec<FstabEntry> {
    entries
        .iter()
        .filter(|e| e.mountpoint.starts_with('/') && e.mountpoint != "/" && e.mountpoint != "/boot")
        .filter(|e| !(e.fstype == "vfat" && ["/boot/efi", "/efi"].contains(&e.mountpoint.as_str())))
        .filter(|e| !NOT_ON_DISK.contains(&e.fstype.as_str()))
        .filter(|e| !e.options.split(',').any(|o| o == "bind" || o == "rbind"))
        .filter(|e| {
            ["UUID=", "LABEL=", "PARTUUID=", "PARTLABEL=", "/dev/"]
                .iter()
                .any(|p| e.spec.starts_with(p))
        })
        .cloned()
        .collect()
}

/// What the plan does with a filesystem mounted at `mountpoint`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// These carry paths lie on it.
    Carried(Vec<PathBuf>),
    Discarded,
}

/// A carry path is on the filesystem when it is the mount point or below it, or
/// when it contains the mount point (carrying `/var` carries `/var/lib/x`'s LV).
pub fn decide(plan: &Plan, mountpoint: &str) -> Option<Decision> {
    let mp = Path::new(mountpoint);
    let carried: Vec<PathBuf> = plan
        .carry
        .iter()
        .map(|c| c.path.clone())
        .filter(|p| p.starts_with(mp) || mp.starts_with(p))
        .collect();
    if !carried.is_empty() {
        return Some(Decision::Carried(carried));
    }
    plan.discard
        .iter()
        .any(|d| d == mp)
        .then_some(Decision::Discarded)
}

/// A filesystem of the old system on the migrated disk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OldFs {
    pub entry: FstabEntry,
    /// The block device (`/dev/dm-3`, `/dev/vda3`).
    pub device: PathBuf,
    /// Used bytes when it is mounted where the caller looks.
    pub used_bytes: Option<u64>,
    pub decision: Option<Decision>,
}

impl OldFs {
    /// For people: `/home (xfs on /dev/dm-2, 12 MiB used)`.
    pub fn describe(&self) -> String {
        let used = self
            .used_bytes
            .map(|b| format!("{} MiB used", b.div_ceil(crate::plan::MIB)))
            .unwrap_or_else(|| "not mounted".into());
        format!(
            "{} ({} on {}, {used})",
            self.entry.mountpoint,
            self.entry.fstype,
            self.device.display()
        )
    }
}

/// The old root's other filesystems that live on `disk` (e.g. `/dev/vda`),
/// from its fstab at `old_root/etc/fstab`. Devices that are not present (a
/// `nofail` USB disk, another disk's LV not active) are not on this disk as far
/// as the migration is concerned and are left out. `mounted_under` is where the
/// old root's tree is visible (`/` on the running system, the old root's mount
/// point in the initramfs), to read the used size.
pub fn on_disk(
    old_root: &Path,
    sys: &Path,
    disk: &str,
    plan: &Plan,
    mounted_under: &Path,
) -> Result<Vec<OldFs>> {
    let fstab_path = old_root.join("etc/fstab");
    let text = std::fs::read_to_string(&fstab_path)
        .with_context(|| format!("reading {}", fstab_path.display()))?;
    let disk_name = Path::new(disk)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = Vec::new();
    for e in other_filesystems(&parse_fstab(&text)) {
        let link = crate::mounts::device_of_spec(&e.spec);
        let Ok(device) = std::fs::canonicalize(&link) else {
            log::info!(
                "old fstab: {} ({}) has no device here; not on the migrated disk",
                e.mountpoint,
                e.spec
            );
            continue;
        };
        let name = device
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let disks = crate::source_layout::disks_of(sys, &name).with_context(|| {
            format!(
                "finding the disk of {} ({})",
                e.mountpoint,
                device.display()
            )
        })?;
        if !disks.contains(&disk_name) {
            continue;
        }
        let at = mounted_under.join(e.mountpoint.trim_start_matches('/'));
        let used_bytes = is_mount_of(&at, &device)
            .then(|| crate::fsutil::used_bytes(&at))
            .flatten();
        let decision = decide(plan, &e.mountpoint);
        out.push(OldFs {
            entry: e,
            device,
            used_bytes,
            decision,
        });
    }
    Ok(out)
}

/// Whether `dir` is where `device` is mounted (same device number).
fn is_mount_of(dir: &Path, device: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(dir), std::fs::metadata(device)) {
        (Ok(d), Ok(dev)) => d.dev() == dev.rdev(),
        _ => false,
    }
}

/// The preflight line, or the blocker naming each filesystem the plan neither
/// carries nor discards.
pub fn check(found: &[OldFs]) -> Result<String> {
    let undecided: Vec<String> = found
        .iter()
        .filter(|f| f.decision.is_none())
        .map(OldFs::describe)
        .collect();
    if !undecided.is_empty() {
        anyhow::bail!(
            "the old system has {} on the migrated disk, which the plan neither carries nor lists under `discard`; its data would be lost, so nothing was changed and the old system keeps running. Add a [[carry]] path on it, or its mount point to `discard`",
            undecided.join(", ")
        );
    }
    if found.is_empty() {
        return Ok("no filesystems besides / and /boot on the disk".into());
    }
    Ok(found
        .iter()
        .map(|f| {
            let what = match &f.decision {
                Some(Decision::Carried(p)) => format!(
                    "carried ({})",
                    p.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => "discarded by the plan".into(),
            };
            format!("{}: {what}", f.describe())
        })
        .collect::<Vec<_>>()
        .join("; "))
}

/// Mounts them read-only under `old_root` (the migration initramfs), parents
/// first. Returned in mount order; unmount in reverse.
pub fn mount_all(old_root: &Path, found: &[OldFs]) -> Result<Vec<Mount>> {
    let mut sorted: Vec<&OldFs> = found.iter().collect();
    sorted.sort_by_key(|f| f.entry.mountpoint.matches('/').count());
    let mut mounts = Vec::new();
    for f in sorted {
        let target = old_root.join(f.entry.mountpoint.trim_start_matches('/'));
        crate::cmd::cmd(
            "mount",
            [
                std::ffi::OsStr::new("-o"),
                "ro".as_ref(),
                f.device.as_os_str(),
                target.as_os_str(),
            ],
        )
        .run()
        .with_context(|| {
            format!(
                "mounting the old {} ({}) read-only to stage what is carried from it",
                f.entry.mountpoint,
                f.device.display()
            )
        })?;
        mounts.push(Mount::adopt(&target));
    }
    Ok(mounts)
}

use crate::cmd::CommandExt;

#[cfg(test)]
mod tests {
    use super::*;

    const CENTOS_HOME: &str = "#\n# /etc/fstab\n# Created by anaconda on Tue Mar 12 10:41:07 2024\n#\n/dev/mapper/centos-root /                       xfs     defaults        0 0\nUUID=6b1c1a9e-77aa-4b4e-9a0c-0c1d2e3f4a5b /boot                   xfs     defaults        0 0\n/dev/mapper/centos-home /home                   xfs     defaults        0 0\n/dev/mapper/centos-swap swap                    swap    defaults        0 0\nUUID=11111111-2222 /var/lib/app\\040data ext4 defaults,nofail 0 2\ntmpfs /tmp tmpfs defaults 0 0\nserver:/export /mnt/nfs nfs defaults 0 0\n/srv/a /srv/b none bind 0 0\nUUID=7A1B-33C4 /boot/efi vfat umask=0077,shortname=winnt 0 0\n";

    #[test]
    fn other_filesystems_of_a_centos_fstab() {
        let all = parse_fstab(CENTOS_HOME);
        assert_eq!(all.len(), 9);
        // The ESP is not among them: the migration replaces its boot chain.
        let other: Vec<String> = other_filesystems(&all)
            .into_iter()
            .map(|e| e.mountpoint)
            .collect();
        assert_eq!(other, vec!["/home", "/var/lib/app data"]);
    }

    fn plan(extra: &str) -> Plan {
        Plan::parse(&format!(
            "{extra}\n[bundle]\npath = \"/b\"\nkeyring = \"/k\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_filesystem_is_carried_discarded_or_refused() {
        let p = plan("discard = [\"/var/tmp\"]\n[[carry]]\npath = \"/home/admin\"\n[[carry]]\npath = \"/var\"");
        assert_eq!(
            decide(&p, "/home"),
            Some(Decision::Carried(vec!["/home/admin".into()]))
        );
        assert_eq!(
            decide(&p, "/var/lib/app"),
            Some(Decision::Carried(vec!["/var".into()]))
        );
        // /var is carried, so /var/tmp counts as carried too.
        assert!(matches!(decide(&p, "/var/tmp"), Some(Decision::Carried(_))));
        let p = plan("discard = [\"/scratch\"]\n");
        assert_eq!(decide(&p, "/scratch"), Some(Decision::Discarded));
        assert_eq!(decide(&p, "/opt"), None);
        // "/homework" is not on "/home".
        let p = plan("[[carry]]\npath = \"/homework\"\n");
        assert_eq!(decide(&p, "/home"), None);

        let fs = |mp: &str, d: Option<Decision>| OldFs {
            entry: FstabEntry {
                spec: format!("/dev/mapper/centos-{}", &mp[1..]),
                mountpoint: mp.into(),
                fstype: "xfs".into(),
                options: "defaults".into(),
            },
            device: "/dev/dm-2".into(),
            used_bytes: Some(12 << 20),
            decision: d,
        };
        let err = check(&[fs("/home", None), fs("/scratch", Some(Decision::Discarded))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/home (xfs on /dev/dm-2, 12 MiB used)"),
            "{err}"
        );
        assert!(
            err.contains("nothing was changed") && !err.contains("/scratch"),
            "{err}"
        );
        let ok = check(&[fs("/scratch", Some(Decision::Discarded))]).unwrap();
        assert!(ok.contains("/scratch") && ok.contains("discarded"), "{ok}");
    }
}
