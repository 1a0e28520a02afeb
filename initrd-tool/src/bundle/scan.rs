//! One pass over a verified payload for the checks made before anything is
//! written: selected small files (the account databases, for the merge dry run)
//! and whether the payload holds a kernel with its initramfs, and how big they are.

use super::reader::{finish_payload_tar, payload_tar, HashingReader, OpenBundle};
use super::tarstream::Kind;
use super::unpack::clean_name;
use crate::bootfiles::{initramfs_names, version_cmp};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct PayloadScan {
    /// The files asked for, by path without `./`. A path stored twice keeps its
    /// last copy, as unpack does.
    pub members: BTreeMap<String, Vec<u8>>,
    /// Size of every regular file directly in `boot/`, by name.
    pub boot_files: BTreeMap<String, u64>,
    /// The tool the payload rebuilds its initramfs with, if it has one.
    pub initramfs_tool: Option<crate::bootfiles::InitramfsTool>,
    /// Which of the UEFI boot files (`efi::NEW_OS_EFI_FILES`) the payload has.
    pub efi_files: std::collections::BTreeSet<String>,
}

impl PayloadScan {
    /// The newest kernel version that has an initramfs, with the size of both.
    pub fn kernel(&self) -> Option<(String, u64)> {
        let mut versions: Vec<&str> = self
            .boot_files
            .keys()
            .filter_map(|n| n.strip_prefix("vmlinuz-"))
            .collect();
        versions.sort_by(|a, b| version_cmp(a, b));
        versions.into_iter().rev().find_map(|v| {
            let initrd = initramfs_names(v)
                .into_iter()
                .find_map(|n| self.boot_files.get(&n).copied())?;
            Some((
                v.to_string(),
                self.boot_files[&format!("vmlinuz-{v}")] + initrd,
            ))
        })
    }

    /// One sentence when the payload cannot rebuild its initramfs for this
    /// machine (the migration and `slot install` rebuild it in the new root).
    pub fn require_initramfs_tool(&self) -> Result<crate::bootfiles::InitramfsTool> {
        self.initramfs_tool.context(
            "the payload has neither usr/sbin/update-initramfs nor dracut: its initramfs, made on the build machine, cannot be rebuilt for this machine, so the new slot might not find its root",
        )
    }

    /// One sentence when the payload cannot boot a slot.
    pub fn require_kernel(&self) -> Result<(String, u64)> {
        if let Some(k) = self.kernel() {
            return Ok(k);
        }
        let kernels: Vec<&String> = self
            .boot_files
            .keys()
            .filter(|n| n.starts_with("vmlinuz-"))
            .collect();
        if kernels.is_empty() {
            bail!("the payload has no kernel (no boot/vmlinuz-*): the new slot could not boot");
        }
        bail!(
            "the payload has a kernel ({}) but no initramfs for it (boot/initrd.img-VERSION or boot/initramfs-VERSION.img): the new slot could not boot",
            kernels
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Largest account file the dry run reads into memory.
const MAX_MEMBER_BYTES: u64 = 16 << 20;

/// Reads the whole payload once (it must have been verified: signature checked),
/// with unpack's reader and rules: the same strict tar reading, names cleaned the
/// same way, the LAST entry of a name wins, and the result is returned only once the
/// payload's sha256, sizes, entry count and xz framing matched the manifest.
pub fn scan(b: OpenBundle, names: &[&str]) -> Result<PayloadScan> {
    if !b.verified {
        bail!("internal error: scanning a bundle whose signature was not checked");
    }
    let path = b.path.clone();
    scan_inner(b, names).with_context(|| {
        format!(
            "reading the payload of bundle {} before anything is written",
            path.display()
        )
    })
}

fn scan_inner(b: OpenBundle, names: &[&str]) -> Result<PayloadScan> {
    let manifest = b.manifest.clone();
    let mut tar = payload_tar(HashingReader::new(b.payload, None), &manifest, 1)?;
    let mut out = PayloadScan::default();
    let mut entries = 0u64;
    while let Some(h) = tar.next_entry()? {
        entries += 1;
        let shown = String::from_utf8_lossy(&h.name).into_owned();
        if entries > manifest.payload.entries {
            bail!(
                "entry {shown:?} is one more than the {} entries the manifest declares",
                manifest.payload.entries
            );
        }
        let rel = clean_name(&h.name).with_context(|| format!("entry {shown:?}"))?;
        let name = rel.to_string_lossy().into_owned();
        let link = if h.kind == Kind::HardLink {
            Some(
                clean_name(&h.link)
                    .with_context(|| format!("hardlink target of {name}"))?
                    .to_string_lossy()
                    .into_owned(),
            )
        } else {
            None
        };
        if let Some((_, t)) = crate::bootfiles::INITRAMFS_TOOL_PATHS
            .iter()
            .find(|(p, _)| *p == name)
        {
            out.initramfs_tool = out.initramfs_tool.or(Some(*t));
        }
        if crate::efi::NEW_OS_EFI_FILES.contains(&name.as_str())
            && matches!(h.kind, Kind::File | Kind::HardLink | Kind::Symlink)
        {
            out.efi_files.insert(name.clone());
        }
        if names.contains(&name.as_str()) {
            // A later entry of the same name replaces the earlier one, as in unpack.
            let old = out.members.remove(&name);
            match (h.kind, &link) {
                (Kind::File, _) => {
                    if h.size > MAX_MEMBER_BYTES {
                        bail!(
                            "{name} is {} bytes, more than the {} MiB the dry run reads",
                            h.size,
                            MAX_MEMBER_BYTES >> 20
                        );
                    }
                    let mut v = vec![0u8; h.size as usize];
                    let mut got = 0;
                    while got < v.len() {
                        got += tar
                            .read_data(&mut v[got..])
                            .with_context(|| format!("reading {name} from the payload"))?;
                    }
                    out.members.insert(name.clone(), v);
                }
                (Kind::HardLink, Some(to)) => match out.members.get(to) {
                    Some(v) => {
                        let v = v.clone();
                        out.members.insert(name.clone(), v);
                    }
                    None => bail!("{name} is a hardlink to {to}, which the dry run did not read"),
                },
                _ => drop(old),
            }
        }
        if let Some(f) = name.strip_prefix("boot/").filter(|f| !f.contains('/')) {
            out.boot_files.remove(f);
            match (h.kind, &link) {
                (Kind::File, _) => {
                    out.boot_files.insert(f.to_string(), h.size);
                }
                (Kind::HardLink, Some(to)) => {
                    if let Some(&size) =
                        to.strip_prefix("boot/").and_then(|t| out.boot_files.get(t))
                    {
                        out.boot_files.insert(f.to_string(), size);
                    }
                }
                _ => {}
            }
        }
    }
    finish_payload_tar(tar, &manifest)?;
    if entries != manifest.payload.entries {
        bail!(
            "payload holds {entries} entries, the manifest says {}",
            manifest.payload.entries
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_of(files: &[(&str, u64)]) -> PayloadScan {
        PayloadScan {
            members: BTreeMap::new(),
            boot_files: files.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
            ..PayloadScan::default()
        }
    }

    #[test]
    fn kernel_needs_its_initramfs() {
        let s = scan_of(&[
            ("vmlinuz-6.1.0-9-amd64", 8),
            ("initrd.img-6.1.0-9-amd64", 30),
            ("vmlinuz-6.1.0-10-amd64", 9),
        ]);
        assert_eq!(s.kernel(), Some(("6.1.0-9-amd64".into(), 38)));
        let el = scan_of(&[
            ("vmlinuz-5.14.0-427.el9.x86_64", 12),
            ("initramfs-5.14.0-427.el9.x86_64.img", 40),
        ]);
        assert_eq!(el.kernel().unwrap().1, 52);
        let e = format!(
            "{:#}",
            scan_of(&[("config-6.1", 1)]).require_kernel().unwrap_err()
        );
        assert!(e.contains("the payload has no kernel"), "{e}");
        let e = format!(
            "{:#}",
            scan_of(&[("vmlinuz-6.1", 1)]).require_kernel().unwrap_err()
        );
        assert!(e.contains("no initramfs for it"), "{e}");
    }
}
