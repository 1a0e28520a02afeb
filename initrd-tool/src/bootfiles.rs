//! A root tree's kernel and initramfs, and the bind mounts for running its tools in
//! a chroot; shared by the migration and slot install.

use crate::fsutil::in_root;
use crate::mounts::Mount;
use anyhow::{Context, Result};
use fs_err as fs;
use std::path::{Path, PathBuf};

/// The newest kernel in `root/boot` and its initramfs.
pub fn find_kernel(root: &Path) -> Result<(PathBuf, PathBuf)> {
    find_kernel_in(&root.join("boot"), None)
}

/// Kernel `version` (else the newest) in the directory `boot` and its initramfs.
pub fn find_kernel_in(boot: &Path, version: Option<&str>) -> Result<(PathBuf, PathBuf)> {
    let boot = boot.to_path_buf();
    if let Some(v) = version {
        let k = boot.join(format!("vmlinuz-{v}"));
        if !k.is_file() {
            anyhow::bail!("no {} for kernel {v}", k.display());
        }
        let initrd = initramfs_names(v)
            .into_iter()
            .map(|n| boot.join(n))
            .find(|p| p.exists())
            .with_context(|| format!("no initramfs for kernel {v} in {} yet", boot.display()))?;
        return Ok((k, initrd));
    }
    let mut versions: Vec<String> = fs::read_dir(&boot)
        .with_context(|| format!("listing {}", boot.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .collect();
    versions.sort_by(|a, b| version_cmp(a, b));
    let v = versions
        .pop()
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let initrd = initramfs_names(&v)
        .into_iter()
        .map(|n| boot.join(n))
        .find(|p| p.exists())
        .with_context(|| format!("no initramfs for kernel {v} in {}", boot.display()))?;
    Ok((boot.join(format!("vmlinuz-{v}")), initrd))
}

/// The kernel version a slot boots, written next to its kernel (`slot status`).
pub const KERNEL_VERSION_FILE: &str = "kernel-version";

/// `<slot_dir>/kernel-version` from the kernel's file name (`vmlinuz-V`).
pub fn write_kernel_version(slot_dir: &Path, kernel: &Path) -> Result<String> {
    let v = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();
    crate::fsutil::write_atomic(
        &slot_dir.join(KERNEL_VERSION_FILE),
        format!("{v}\n").as_bytes(),
    )?;
    Ok(v)
}

/// Puts a kernel and its initramfs into a slot's boot directory as `vmlinuz` and
/// `initrd.img` (each through a temp file and a rename, so a cut leaves the old
/// or the new file) and records the kernel version. Returns the version.
pub fn install_slot_kernel(slot_dir: &Path, kernel: &Path, initrd: &Path) -> Result<String> {
    fs::create_dir_all(slot_dir).with_context(|| format!("creating {}", slot_dir.display()))?;
    for (src, name) in [(kernel, "vmlinuz"), (initrd, "initrd.img")] {
        let tmp = slot_dir.join(format!(".{name}.new"));
        crate::fsutil::copy_hashed(src, &tmp)?;
        fs::rename(&tmp, slot_dir.join(name))
            .with_context(|| format!("renaming {} into {}", tmp.display(), slot_dir.display()))?;
    }
    write_kernel_version(slot_dir, kernel)
}

/// The names distributions give the initramfs of kernel `v` (Debian, EL).
pub fn initramfs_names(v: &str) -> [String; 2] {
    [format!("initrd.img-{v}"), format!("initramfs-{v}.img")]
}

/// Numeric-aware comparison of kernel versions (`6.1.0-9` < `6.1.0-10`).
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    key(a).cmp(&key(b))
}

/// Bind mounts for running tools of the new root in a chroot (its
/// `grub-install`): the host's /dev, /proc and /sys, and `boot` at /boot. Mount
/// points are resolved inside the root, so a link in the new root never moves a
/// mount onto the host.
pub fn chroot_binds(root: &Path, boot: Option<&Path>) -> Result<Vec<Mount>> {
    let mut v = Vec::new();
    for d in ["dev", "proc", "sys"] {
        v.push(Mount::bind(
            Path::new(&format!("/{d}")),
            &in_root(root, Path::new(d))?,
        )?);
    }
    if let Some(b) = boot {
        v.push(Mount::bind(b, &in_root(root, Path::new("boot"))?)?);
    }
    Ok(v)
}

/// Binds for the new OS's translation hooks: /dev only. No host /proc (its
/// `/proc/1/root` leads out of any chroot) and no /sys.
pub fn hook_binds(root: &Path) -> Result<Vec<Mount>> {
    Ok(vec![Mount::bind(
        Path::new("/dev"),
        &in_root(root, Path::new("dev"))?,
    )?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_kernel_with_its_initramfs() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join("boot");
        fs::create_dir_all(&b).unwrap();
        for n in [
            "vmlinuz-6.1.0-9-amd64",
            "vmlinuz-6.1.0-10-amd64",
            "initrd.img-6.1.0-9-amd64",
            "initrd.img-6.1.0-10-amd64",
        ] {
            fs::write(b.join(n), n).unwrap();
        }
        let (k, i) = find_kernel(d.path()).unwrap();
        assert!(k.ends_with("vmlinuz-6.1.0-10-amd64"), "{}", k.display());
        assert!(i.ends_with("initrd.img-6.1.0-10-amd64"), "{}", i.display());
        fs::write(b.join("vmlinuz-5.14.0-427.el9.x86_64"), "").unwrap();
        fs::write(b.join("vmlinuz-6.2.0"), "").unwrap();
        fs::write(b.join("initramfs-6.2.0.img"), "").unwrap();
        assert!(find_kernel(d.path())
            .unwrap()
            .1
            .ends_with("initramfs-6.2.0.img"));
    }
}
