//! Mounts as RAII guards: `Drop` retries `umount` (best effort); `unmount()` reports.

use anyhow::{Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::{Path, PathBuf};

/// Where one of `devs` (a device under its names, e.g. /dev/VG/LV and
/// /dev/mapper/VG-LV) is mounted, if it is.
pub fn mount_point_of(devs: &[String]) -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let d = w.next()?;
            let t = w.next()?;
            devs.iter().any(|n| n == d).then(|| PathBuf::from(t))
        })
}

pub struct Mount {
    pub target: PathBuf,
    active: bool,
}

impl Mount {
    pub fn new(
        source: &Path,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<Mount> {
        std::fs::create_dir_all(target)
            .with_context(|| format!("creating mount point {}", target.display()))?;
        mount(Some(source), target, fstype, flags, data).with_context(|| {
            format!(
                "mounting {} on {} ({})",
                source.display(),
                target.display(),
                fstype.unwrap_or("bind")
            )
        })?;
        Ok(Mount {
            target: target.to_path_buf(),
            active: true,
        })
    }

    pub fn ext4(dev: &Path, target: &Path) -> Result<Mount> {
        Mount::new(dev, target, Some("ext4"), MsFlags::empty(), None)
    }

    /// A new root being written: no setuid program and no device node in it takes
    /// effect while it is mounted here, and the directory holding the mount point
    /// is 0700 (only root walks into a half-written tree).
    pub fn ext4_untrusted(dev: &Path, target: &Path) -> Result<Mount> {
        std::fs::create_dir_all(target)
            .with_context(|| format!("creating mount point {}", target.display()))?;
        let parent = target.parent().unwrap_or(target);
        std::fs::set_permissions(parent, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .with_context(|| format!("making {} 0700", parent.display()))?;
        Mount::new(
            dev,
            target,
            Some("ext4"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None,
        )
    }

    pub fn bind(src: &Path, target: &Path) -> Result<Mount> {
        Mount::new(src, target, None, MsFlags::MS_BIND, None)
    }

    pub fn tmpfs(target: &Path, size_bytes: u64) -> Result<Mount> {
        let data = format!("size={size_bytes},mode=0700");
        Mount::new(
            Path::new("tmpfs"),
            target,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(&data),
        )
    }

    /// Takes over a mount made by someone else (e.g. `mount(8)` autodetecting the type).
    pub fn adopt(target: &Path) -> Mount {
        Mount {
            target: target.to_path_buf(),
            active: true,
        }
    }

    /// Makes a read-only mount writable (a refusal leaves its result on the old root).
    pub fn remount_rw(&self) -> Result<()> {
        mount(
            None::<&Path>,
            &self.target,
            None::<&str>,
            MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .with_context(|| format!("remounting {} read-write", self.target.display()))
    }

    pub fn unmount(mut self) -> Result<()> {
        self.active = false;
        nix::unistd::sync();
        umount2(&self.target, MntFlags::empty())
            .with_context(|| format!("unmounting {}", self.target.display()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        for _ in 0..10 {
            if umount2(&self.target, MntFlags::empty()).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let _ = umount2(&self.target, MntFlags::MNT_DETACH);
    }
}

/// `root=`/fstab spellings (`UUID=`, `LABEL=`, `PARTUUID=`, `PARTLABEL=`,
/// dracut's `block:`) → a device path (udev's /dev/disk/by-* links).
pub fn device_of_spec(spec: &str) -> PathBuf {
    let spec = spec.strip_prefix("block:").unwrap_or(spec);
    for (prefix, dir) in [
        ("UUID=", "by-uuid"),
        ("LABEL=", "by-label"),
        ("PARTUUID=", "by-partuuid"),
        ("PARTLABEL=", "by-partlabel"),
    ] {
        if let Some(v) = spec.strip_prefix(prefix) {
            return PathBuf::from(format!("/dev/disk/{dir}/{v}"));
        }
    }
    PathBuf::from(spec)
}
