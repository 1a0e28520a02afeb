//! One pass over a verified payload for the checks made before anything is
//! written: selected small files (the account databases, for the merge dry run)
//! and whether the payload holds a kernel with its initramfs, and how big they are.

use super::reader::OpenBundle;
use crate::bootfiles::{initramfs_names, version_cmp};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{BufReader, Read};

#[derive(Debug, Default)]
pub struct PayloadScan {
    /// The files asked for, by path without `./`. A path stored twice keeps its
    /// last copy, as unpack does.
    pub members: BTreeMap<String, Vec<u8>>,
    /// Size of every regular file directly in `boot/`, by name.
    pub boot_files: BTreeMap<String, u64>,
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

/// Reads the whole payload once (it must have been verified: signature checked).
pub fn scan(b: OpenBundle, names: &[&str]) -> Result<PayloadScan> {
    if !b.verified {
        bail!("internal error: scanning a bundle whose signature was not checked");
    }
    let stream = liblzma::stream::Stream::new_stream_decoder(u64::MAX, 0)
        .context("setting up the xz decoder")?;
    let xz = liblzma::read::XzDecoder::new_stream(b.payload, stream);
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, xz));
    let mut out = PayloadScan::default();
    for entry in archive.entries().context("reading the payload tar")? {
        let mut e = entry.context("reading the payload tar")?;
        let raw = e.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw);
        let name = name.trim_start_matches("./").to_string();
        let is_file = e.header().entry_type().is_file();
        if names.contains(&name.as_str()) {
            out.members.remove(&name);
            if is_file {
                let mut v = Vec::new();
                e.read_to_end(&mut v)
                    .with_context(|| format!("reading {name} from the payload"))?;
                out.members.insert(name.clone(), v);
            }
        }
        if let Some(f) = name.strip_prefix("boot/").filter(|f| !f.contains('/')) {
            out.boot_files.remove(f);
            if is_file || e.header().entry_type().is_hard_link() {
                out.boot_files.insert(f.to_string(), e.size());
            }
        }
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
