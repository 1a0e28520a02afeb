//! File helpers shared by both drivers: crash-safe writes and copies that hash what
//! they copy. Every error names its path.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::path::Path;

/// Writes `data` crash-safely: temp file, fsync, rename, fsync dir. A power cut
/// leaves either the old or the new content, never a torn file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.new",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
    }
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

/// Copies a file, hashing while copying; fsyncs the copy. Returns the sha256 (hex).
pub fn copy_hashed(src: &Path, dst: &Path) -> Result<String> {
    let mut r = fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut w = fs::File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = r
            .read(&mut buf)
            .with_context(|| format!("reading {}", src.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        w.write_all(&buf[..n])
            .with_context(|| format!("writing {}", dst.display()))?;
    }
    w.sync_all()
        .with_context(|| format!("syncing {}", dst.display()))?;
    Ok(hex::encode(h.finalize()))
}

/// sha256 (hex) of a whole file.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut r = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = r
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Copies the regular files directly in `src` into `dst` (created if needed).
pub fn copy_dir_files(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for e in fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let e = e.with_context(|| format!("listing {}", src.display()))?;
        let ft = e
            .file_type()
            .with_context(|| format!("reading {}", e.path().display()))?;
        if ft.is_file() {
            fs::copy(e.path(), dst.join(e.file_name()))
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Makes `dst` hold exactly the regular files of `src`: built beside it and renamed
/// over it, so a file removed from `src` (a revoked key) disappears from `dst` too.
pub fn replace_dir_files(src: &Path, dst: &Path) -> Result<()> {
    let parent = dst
        .parent()
        .with_context(|| format!("{} has no parent directory", dst.display()))?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dst.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!(".{name}.new"));
    let old = parent.join(format!(".{name}.old"));
    for p in [&tmp, &old] {
        if p.exists() {
            fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    copy_dir_files(src, &tmp)?;
    if dst.exists() {
        fs::rename(dst, &old)
            .with_context(|| format!("renaming {} to {}", dst.display(), old.display()))?;
    }
    fs::rename(&tmp, dst)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    if old.exists() {
        fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaced_directory_drops_removed_files() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let dst = d.path().join("stage/keyring");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("a.pub"), "a").unwrap();
        fs::write(src.join("revoked.pub"), "r").unwrap();
        replace_dir_files(&src, &dst).unwrap();
        assert!(dst.join("revoked.pub").exists());
        fs::remove_file(src.join("revoked.pub")).unwrap();
        replace_dir_files(&src, &dst).unwrap();
        assert!(dst.join("a.pub").exists());
        assert!(
            !dst.join("revoked.pub").exists(),
            "a revoked key stayed trusted"
        );
        // copy_dir_files alone would have kept it: the bug replace_dir_files fixes.
        fs::write(dst.join("stale.pub"), "s").unwrap();
        copy_dir_files(&src, &dst).unwrap();
        assert!(dst.join("stale.pub").exists());
    }

    #[test]
    fn hashes_agree() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        fs::write(&a, b"hello").unwrap();
        let h = copy_hashed(&a, &d.path().join("b")).unwrap();
        assert_eq!(h, file_sha256(&d.path().join("b")).unwrap());
        assert_eq!(
            h,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let e = format!("{:#}", file_sha256(&d.path().join("missing")).unwrap_err());
        assert!(e.contains("missing"), "{e}");
    }
}
