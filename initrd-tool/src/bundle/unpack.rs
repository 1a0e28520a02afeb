//! The unpack engine: verified bundle → target directory.
//!
//! The payload streams from the bundle through a sha256 hasher and liblzma's
//! multi-threaded decoder into our own extraction loop. The `tar` crate only parses;
//! every entry kind is created here, because the crate turns devices and FIFOs into
//! regular files and drops xattrs on directories and symlinks.
//!
//! Containment: entry names are normalised and `..` or absolute names are refused;
//! every parent directory of an entry must be a real directory (a symlink planted by
//! an earlier entry is refused, never followed); files are created with
//! `O_EXCL|O_NOFOLLOW`; hardlink targets must be inside the archive. Directories get
//! their final owner, mode, xattrs (default ACLs) and mtime at the end, deepest first,
//! so they neither leak inherited ACLs into their content nor get their mtime bumped.
//!
//! On any failure everything the unpack created is removed again, so the target is
//! left as it was found (empty).

use super::reader::{self, HashingReader, OpenBundle};
use crate::keys::Keyring;
use crate::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use filetime::FileTime;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tar::EntryType;

/// Names a fresh filesystem may already hold; the target counts as empty with them.
const PREEXISTING_OK: &[&str] = &["lost+found"];

#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Decoder threads; 0 = one per CPU.
    pub threads: u32,
    pub progress: bool,
    /// Flush the target filesystem before reporting success.
    pub sync: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            threads: 0,
            progress: false,
            sync: true,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct UnpackReport {
    pub entries: u64,
    pub bytes_written: u64,
    pub compressed_bytes: u64,
    pub seconds: f64,
}

/// Verifies `bundle` against `keyring` and unpacks it into the empty directory `target`.
pub fn unpack_bundle(
    bundle: &Path,
    keyring: &Keyring,
    target: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackReport> {
    let b = reader::open(bundle, Some(keyring))?;
    check_target_empty(target)?;
    unpack_open(b, target, opts)
}

/// Unpacks an already verified bundle into `target`; cleans up on failure.
pub fn unpack_open(b: OpenBundle, target: &Path, opts: &UnpackOptions) -> Result<UnpackReport> {
    if !b.verified {
        bail!("internal error: refusing to unpack a bundle whose signature was not checked");
    }
    let start = Instant::now();
    let before = existing_names(target)?;
    let result = run(b, target, opts, start);
    if let Err(e) = &result {
        eprintln!("unpack failed: {e:#}");
        eprintln!(
            "removing what was unpacked into {} so it is left as it was",
            target.display()
        );
        if let Err(ce) = remove_new(target, &before) {
            eprintln!("cleanup of {} failed too: {ce:#}", target.display());
        }
    }
    result
}

pub fn check_target_empty(target: &Path) -> Result<()> {
    let meta =
        fs::symlink_metadata(target).with_context(|| format!("target {}", target.display()))?;
    if !meta.is_dir() {
        bail!(
            "target {} is not a directory; nothing was written",
            target.display()
        );
    }
    let extra: Vec<String> = existing_names(target)?
        .into_iter()
        .filter(|n| !PREEXISTING_OK.contains(&n.to_string_lossy().as_ref()))
        .map(|n| n.to_string_lossy().into_owned())
        .take(5)
        .collect();
    if !extra.is_empty() {
        bail!(
            "target {} is not empty (it holds {}); unpack needs an empty directory; nothing was written",
            target.display(),
            extra.join(", ")
        );
    }
    Ok(())
}

fn existing_names(dir: &Path) -> Result<HashSet<std::ffi::OsString>> {
    fs::read_dir(dir)
        .with_context(|| format!("listing target {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()).map_err(Into::into))
        .collect()
}

fn remove_new(target: &Path, before: &HashSet<std::ffi::OsString>) -> Result<()> {
    for name in existing_names(target)? {
        if before.contains(&name) {
            continue;
        }
        let p = target.join(&name);
        let m = fs::symlink_metadata(&p)?;
        if m.is_dir() {
            fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        } else {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

fn run(b: OpenBundle, target: &Path, opts: &UnpackOptions, start: Instant) -> Result<UnpackReport> {
    let manifest = b.manifest.clone();
    let progress = opts
        .progress
        .then(|| Progress::new("unpack", manifest.payload.compressed_size));
    let hashing = HashingReader::new(b.payload, progress);
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    } else {
        opts.threads
    };
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(threads)
        // Up to 1 GiB for parallel decoding; past that liblzma falls back to one thread
        // instead of failing (memlimit_stop is left unlimited).
        .memlimit_threading(1 << 30)
        .memlimit_stop(u64::MAX)
        .decoder()
        .context("setting up the multi-threaded xz decoder")?;
    let xz = liblzma::read::XzDecoder::new_stream(hashing, stream);
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, xz));
    let mut ex = Extractor::new(target)?;
    for entry in archive.entries().context("reading the payload tar")? {
        let mut entry = entry.map_err(|e| {
            anyhow!(
                "reading the payload failed after entry {} (damaged or truncated?): {e}",
                ex.entries
            )
        })?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        ex.entry(&mut entry)
            .with_context(|| format!("entry {name:?}"))?;
    }
    // Drain what follows the tar end marker so the xz check and the hash cover the
    // whole payload.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).context("reading the end of the payload")?;
    let xz = rest.into_inner();
    let mut hashing = xz.into_inner();
    io::copy(&mut hashing, &mut io::sink()).context("reading the end of the payload")?;
    reader::finish_payload_check(&manifest, hashing.count, hashing.hash.clone())?;
    if ex.entries != manifest.payload.entries {
        bail!(
            "payload holds {} entries, the manifest says {}",
            ex.entries,
            manifest.payload.entries
        );
    }
    ex.finish_dirs()?;
    if opts.sync {
        let dir = File::open(target)
            .with_context(|| format!("opening {} to sync it", target.display()))?;
        nix::unistd::syncfs(&dir)
            .with_context(|| format!("syncing the filesystem of {}", target.display()))?;
    }
    if let Some(p) = &mut hashing.progress {
        p.finish(hashing.count);
    }
    Ok(UnpackReport {
        entries: ex.entries,
        bytes_written: ex.bytes,
        compressed_bytes: hashing.count,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Old owner -> new owner, applied while extracting carried files (re-own by name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnerMap {
    pub uid: std::collections::BTreeMap<u32, u32>,
    pub gid: std::collections::BTreeMap<u32, u32>,
}

/// Extracts a plain tar stream into `target` (which may hold files already) with the
/// same containment and fidelity rules as a bundle unpack, re-owning through `owners`.
/// Returns the number of entries.
pub fn extract_tar<R: Read>(r: R, target: &Path, owners: Option<&OwnerMap>) -> Result<u64> {
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, r));
    let mut ex = Extractor::new(target)?;
    ex.owners = owners;
    for entry in archive.entries().context("reading tar")? {
        let mut entry =
            entry.map_err(|e| anyhow!("tar is damaged after entry {}: {e}", ex.entries))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        ex.entry(&mut entry)
            .with_context(|| format!("entry {name:?}"))?;
    }
    ex.finish_dirs()?;
    Ok(ex.entries)
}

struct DirMeta {
    path: PathBuf,
    depth: usize,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

struct Extractor<'a> {
    target: &'a Path,
    /// Relative directories known to be real directories inside the target.
    safe_dirs: HashSet<PathBuf>,
    dirs: Vec<DirMeta>,
    buf: Vec<u8>,
    entries: u64,
    bytes: u64,
    owners: Option<&'a OwnerMap>,
}

/// Turns an archive name into a relative path made of normal components.
fn clean_name(raw: &[u8]) -> Result<PathBuf> {
    if raw.first() == Some(&b'/') {
        bail!("absolute path refused: entries must stay inside the target");
    }
    let mut out = PathBuf::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => bail!("path with '..' refused: entries must stay inside the target"),
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok(out)
}

impl<'a> Extractor<'a> {
    fn new(target: &'a Path) -> Result<Self> {
        let mut safe_dirs = HashSet::new();
        safe_dirs.insert(PathBuf::new());
        Ok(Extractor {
            target,
            safe_dirs,
            dirs: Vec::new(),
            buf: vec![0u8; 1 << 20],
            entries: 0,
            bytes: 0,
            owners: None,
        })
    }

    /// Makes sure every parent of `rel` is a real directory inside the target,
    /// creating missing ones; refuses symlinks and other files on the way.
    fn ensure_parents(&mut self, rel: &Path) -> Result<()> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        if self.safe_dirs.contains(parent) {
            return Ok(());
        }
        let mut cur = PathBuf::new();
        for comp in parent.components() {
            cur.push(comp);
            if self.safe_dirs.contains(&cur) {
                continue;
            }
            let full = self.target.join(&cur);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => bail!(
                    "refused: its path goes through the symlink {} (planted earlier in the archive); writing there could leave the target",
                    cur.display()
                ),
                Ok(_) => bail!("refused: its parent {} is not a directory", cur.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&full)
                        .with_context(|| format!("creating parent directory {}", full.display()))?;
                }
                Err(e) => return Err(e).with_context(|| format!("checking {}", full.display())),
            }
            self.safe_dirs.insert(cur.clone());
        }
        Ok(())
    }

    /// Clears the way for a non-directory at `full`: an old non-directory is replaced
    /// (as tar does), a directory never is.
    fn make_room(&self, full: &Path, rel: &Path) -> Result<()> {
        match fs::symlink_metadata(full) {
            Ok(m) if m.is_dir() => {
                bail!("refused: it would replace the directory {}", rel.display())
            }
            Ok(_) => fs::remove_file(full).with_context(|| format!("replacing {}", full.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("checking {}", full.display())),
        }
    }

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<R>) -> Result<()> {
        let kind = e.header().entry_type();
        match kind {
            EntryType::XGlobalHeader => return Ok(()),
            EntryType::GNUSparse => bail!("sparse entries are not supported"),
            _ => {}
        }
        let rel = clean_name(&e.path_bytes())?;
        let h = e.header();
        let mut uid = h.uid()? as u32;
        let mut gid = h.gid()? as u32;
        if let Some(m) = self.owners {
            uid = m.uid.get(&uid).copied().unwrap_or(uid);
            gid = m.gid.get(&gid).copied().unwrap_or(gid);
        }
        let mode = h.mode()? & 0o7777;
        let mtime = h.mtime()? as i64;
        let mut xattrs = Vec::new();
        if let Some(exts) = e.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                }
            }
        }
        self.entries += 1;

        if kind == EntryType::Directory || rel.as_os_str().is_empty() {
            if !rel.as_os_str().is_empty() {
                self.ensure_parents(&rel)?;
                let full = self.target.join(&rel);
                match fs::symlink_metadata(&full) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => bail!(
                        "refused: a non-directory already stands at {}",
                        rel.display()
                    ),
                    Err(_) => fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&full)
                        .with_context(|| format!("creating directory {}", full.display()))?,
                }
                self.safe_dirs.insert(rel.clone());
            }
            let depth = rel.components().count();
            self.dirs.push(DirMeta {
                path: rel,
                depth,
                uid,
                gid,
                mode,
                mtime,
                xattrs,
            });
            return Ok(());
        }

        self.ensure_parents(&rel)?;
        let full = self.target.join(&rel);
        let mt = FileTime::from_unix_time(mtime, 0);
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let mut f = match open_new(&full) {
                    Ok(f) => f,
                    Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                        self.make_room(&full, &rel)?;
                        open_new(&full).with_context(|| format!("creating {}", full.display()))?
                    }
                    Err(err) => {
                        return Err(err).with_context(|| format!("creating {}", full.display()))
                    }
                };
                let mut left = e.header().entry_size()?;
                while left > 0 {
                    let want = left.min(self.buf.len() as u64) as usize;
                    let n = e
                        .read(&mut self.buf[..want])
                        .context("reading file data from the payload")?;
                    if n == 0 {
                        bail!("payload ends inside this file's data (truncated or damaged)");
                    }
                    f.write_all(&self.buf[..n])
                        .with_context(|| format!("writing {}", full.display()))?;
                    left -= n as u64;
                    self.bytes += n as u64;
                }
                // chown before chmod (chown clears setuid) and xattrs last (it also
                // clears security.capability).
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                    .with_context(|| format!("chown {}", full.display()))?;
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .with_context(|| format!("chmod {}", full.display()))?;
                for (k, v) in &xattrs {
                    xattr::FileExt::set_xattr(&f, OsStr::from_bytes(k), v).with_context(|| {
                        format!(
                            "setting xattr {} on {}",
                            String::from_utf8_lossy(k),
                            full.display()
                        )
                    })?;
                }
                filetime::set_file_handle_times(&f, Some(mt), Some(mt))
                    .with_context(|| format!("setting mtime of {}", full.display()))?;
            }
            EntryType::Link => {
                let link = e.link_name_bytes().context("hardlink without a target")?;
                let link_rel = clean_name(&link).context("hardlink target")?;
                if link_rel.as_os_str().is_empty() {
                    bail!("hardlink to the target directory itself refused");
                }
                self.ensure_parents(&link_rel).context("hardlink target")?;
                let src = self.target.join(&link_rel);
                match fs::symlink_metadata(&src) {
                    Ok(m) if m.is_dir() => {
                        bail!("hardlink to directory {} refused", link_rel.display())
                    }
                    Ok(_) => {}
                    Err(_) => bail!(
                        "hardlink target {} is not in the archive before it",
                        link_rel.display()
                    ),
                }
                self.make_room(&full, &rel)?;
                // linkat without AT_SYMLINK_FOLLOW: a symlink source is linked itself, never followed.
                fs::hard_link(&src, &full)
                    .with_context(|| format!("linking {} to {}", full.display(), src.display()))?;
            }
            EntryType::Symlink => {
                let link = e.link_name_bytes().context("symlink without a target")?;
                self.make_room(&full, &rel)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &full)
                    .with_context(|| format!("creating symlink {}", full.display()))?;
                std::os::unix::fs::lchown(&full, Some(uid), Some(gid))
                    .with_context(|| format!("chown {}", full.display()))?;
                set_path_xattrs(&full, &xattrs)?;
                filetime::set_symlink_file_times(&full, mt, mt)
                    .with_context(|| format!("setting mtime of {}", full.display()))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                self.make_room(&full, &rel)?;
                let (flag, dev) = match kind {
                    EntryType::Char => (SFlag::S_IFCHR, dev_of(e.header())?),
                    EntryType::Block => (SFlag::S_IFBLK, dev_of(e.header())?),
                    _ => (SFlag::S_IFIFO, 0),
                };
                mknod(&full, flag, Mode::from_bits_truncate(0o600), dev)
                    .with_context(|| format!("creating node {}", full.display()))?;
                std::os::unix::fs::lchown(&full, Some(uid), Some(gid))
                    .with_context(|| format!("chown {}", full.display()))?;
                fs::set_permissions(&full, fs::Permissions::from_mode(mode))
                    .with_context(|| format!("chmod {}", full.display()))?;
                set_path_xattrs(&full, &xattrs)?;
                filetime::set_symlink_file_times(&full, mt, mt)
                    .with_context(|| format!("setting mtime of {}", full.display()))?;
            }
            other => bail!("entry type {other:?} is not supported"),
        }
        Ok(())
    }

    /// Directory owners, modes, xattrs and mtimes, deepest first.
    fn finish_dirs(&mut self) -> Result<()> {
        self.dirs.sort_by_key(|d| std::cmp::Reverse(d.depth));
        for d in &self.dirs {
            let full = self.target.join(&d.path);
            std::os::unix::fs::lchown(&full, Some(d.uid), Some(d.gid))
                .with_context(|| format!("chown {}", full.display()))?;
            fs::set_permissions(&full, fs::Permissions::from_mode(d.mode))
                .with_context(|| format!("chmod {}", full.display()))?;
            set_path_xattrs(&full, &d.xattrs)?;
            let mt = FileTime::from_unix_time(d.mtime, 0);
            filetime::set_symlink_file_times(&full, mt, mt)
                .with_context(|| format!("setting mtime of {}", full.display()))?;
        }
        Ok(())
    }
}

fn open_new(full: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(full)
}

fn dev_of(h: &tar::Header) -> Result<u64> {
    let major = h
        .device_major()?
        .context("device entry without a major number")?;
    let minor = h
        .device_minor()?
        .context("device entry without a minor number")?;
    Ok(makedev(major as u64, minor as u64))
}

/// Sets xattrs on a path without following a final symlink (lsetxattr).
fn set_path_xattrs(full: &Path, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
    for (k, v) in xattrs {
        xattr::set(full, OsStr::from_bytes(k), v).with_context(|| {
            format!(
                "setting xattr {} on {}",
                String::from_utf8_lossy(k),
                full.display()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_names() {
        assert_eq!(
            clean_name(b"./etc/passwd").unwrap(),
            PathBuf::from("etc/passwd")
        );
        assert_eq!(clean_name(b"./").unwrap(), PathBuf::new());
        assert_eq!(clean_name(b"usr//lib/").unwrap(), PathBuf::from("usr/lib"));
        assert!(format!("{:#}", clean_name(b"a/../../x").unwrap_err()).contains("'..'"));
        assert!(format!("{:#}", clean_name(b"/etc/x").unwrap_err()).contains("absolute"));
    }
}
