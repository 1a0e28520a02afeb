//! File helpers shared by both drivers: crash-safe writes and copies that hash what
//! they copy. Every error names its path.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Writes `data` crash-safely: temp file, fsync, rename, fsync dir. A power cut
/// leaves either the old or the new content, never a torn file. Neither the temp
/// file nor the target is followed if it is a symlink (the rename replaces a link
/// at `path` itself).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.new",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    remove_if_present(&tmp)?;
    {
        // create_new: O_CREAT|O_EXCL never follows a symlink planted at `tmp`.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
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

fn remove_if_present(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => bail!("{} is a directory", p.display()),
        Ok(_) => fs::remove_file(p).with_context(|| format!("removing {}", p.display())),
        Err(_) => Ok(()),
    }
}

/// How many symlinks one resolution may follow (as the kernel's ELOOP limit).
const MAX_LINKS: usize = 40;

/// `root`/`rel` for writing into a root tree that is not the running system (a
/// new slot): every symlink among the directories on the way is resolved as if
/// `root` were `/` (absolute targets and `..` never leave it, like
/// `openat2(RESOLVE_IN_ROOT)`), and a symlink at the last component is removed,
/// so the write that follows creates a regular file there instead of writing
/// through the link. Missing directories are created (mode 0755).
pub fn in_root(root: &Path, rel: &Path) -> Result<PathBuf> {
    use std::path::Component;
    let rel = rel.strip_prefix("/").unwrap_or(rel);
    let mut parts: Vec<std::ffi::OsString> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .collect();
    let last = parts
        .pop()
        .with_context(|| format!("{} names no file", rel.display()))?;
    // Resolved directory, as components below root.
    let mut dir: Vec<std::ffi::OsString> = Vec::new();
    let mut todo: std::collections::VecDeque<std::ffi::OsString> = parts.into();
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            dir.pop();
            continue;
        }
        if c == "." {
            continue;
        }
        let here: PathBuf = dir
            .iter()
            .fold(root.to_path_buf(), |p, c| p.join(c))
            .join(&c);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    bail!(
                        "too many symlinks resolving {} in {}",
                        rel.display(),
                        root.display()
                    );
                }
                let target = fs::read_link(&here)
                    .with_context(|| format!("reading the link {}", here.display()))?;
                if target.is_absolute() {
                    dir.clear();
                }
                let mut next: std::collections::VecDeque<std::ffi::OsString> = target
                    .components()
                    .filter_map(|t| match t {
                        Component::Normal(n) => Some(n.to_os_string()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                next.extend(todo.drain(..));
                todo = next;
            }
            Ok(m) if m.is_dir() => dir.push(c),
            Ok(_) => bail!(
                "{} is not a directory, so {} cannot be written in {}",
                here.display(),
                rel.display(),
                root.display()
            ),
            Err(_) => {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&here)
                    .with_context(|| format!("creating {}", here.display()))?;
                dir.push(c);
            }
        }
    }
    let out = dir
        .iter()
        .fold(root.to_path_buf(), |p, c| p.join(c))
        .join(last);
    if fs::symlink_metadata(&out).is_ok_and(|m| m.file_type().is_symlink()) {
        fs::remove_file(&out).with_context(|| format!("removing the symlink {}", out.display()))?;
    }
    Ok(out)
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

/// Sets a path's permission bits (no symlink following concerns: used on
/// paths dualroot made itself).
pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))
}

/// Bytes in use on the filesystem holding `path` (statvfs), `None` when it
/// cannot be read.
pub fn used_bytes(path: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some((s.blocks() - s.blocks_free()) * s.fragment_size())
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
    fn writes_into_a_root_never_leave_it() {
        let d = tempfile::tempdir().unwrap();
        let host = d.path().join("host");
        let new = d.path().join("new");
        fs::create_dir_all(host.join("etc")).unwrap();
        fs::write(host.join("etc/shadow"), "host secret").unwrap();
        fs::create_dir_all(new.join("usr/lib")).unwrap();
        // A bundle's tricks: an absolute dir link to the host, a file link, a
        // relative link climbing out, and merged /usr (a legitimate link).
        std::os::unix::fs::symlink(host.join("etc"), new.join("etc")).unwrap();
        std::os::unix::fs::symlink("../../../host/etc", new.join("usr/lib/up")).unwrap();
        std::os::unix::fs::symlink("usr/lib", new.join("lib")).unwrap();
        let p = in_root(&new, Path::new("etc/shadow")).unwrap();
        assert!(p.starts_with(&new), "{}", p.display());
        write_atomic(&p, b"new").unwrap();
        let p = in_root(&new, Path::new("/usr/lib/up/fstab")).unwrap();
        assert!(p.starts_with(&new), "{}", p.display());
        fs::write(&p, "x").unwrap();
        let p = in_root(&new, Path::new("lib/systemd/x.service")).unwrap();
        assert_eq!(p, new.join("usr/lib/systemd/x.service"));
        // A link at the last component is replaced, not written through.
        fs::create_dir_all(new.join("real")).unwrap();
        std::os::unix::fs::symlink(host.join("etc/shadow"), new.join("real/fstab")).unwrap();
        let p = in_root(&new, Path::new("real/fstab")).unwrap();
        fs::write(&p, "fstab").unwrap();
        assert_eq!(
            fs::read_to_string(host.join("etc/shadow")).unwrap(),
            "host secret"
        );
        assert!(!fs::symlink_metadata(new.join("real/fstab"))
            .unwrap()
            .file_type()
            .is_symlink());
        // A planted temp file of write_atomic is not followed either.
        std::os::unix::fs::symlink(host.join("etc/shadow"), new.join("real/.passwd.new")).unwrap();
        write_atomic(&new.join("real/passwd"), b"p").unwrap();
        assert_eq!(
            fs::read_to_string(host.join("etc/shadow")).unwrap(),
            "host secret"
        );
    }

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
