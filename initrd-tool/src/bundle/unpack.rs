//! The unpack engine: verified bundle → target directory.
//!
//! The payload is read twice. First pass: the compressed bytes are hashed and
//! checked against the signed manifest, so nothing of a payload that does not match
//! is decompressed or written (hashing costs a fraction of decompressing). Second
//! pass: the payload streams through sha256 again, liblzma's multi-threaded decoder
//! (memory-limited) and a counter that stops at the manifest's `uncompressed_size`
//! into our strict tar reader (`tarstream`) and extraction loop; the entry count is
//! enforced as entries arrive.
//!
//! Nothing dangerous stands on disk before the second pass's hash matched too (the
//! file could have been swapped between the passes): setuid/setgid bits and
//! `security.capability` are applied, and device nodes and FIFOs created, only after
//! the whole payload was read and checked. Until then such files exist without those
//! bits and nodes do not exist at all.
//!
//! Containment: entry names are normalised and `..` or absolute names are refused;
//! every parent directory of an entry must be a real directory (a symlink planted by
//! an earlier entry is refused, never followed); files are created with
//! `O_EXCL|O_NOFOLLOW`; hardlink targets must be inside the archive. Directories get
//! their final owner, mode, xattrs (default ACLs) and mtime at the end, deepest first,
//! so they neither leak inherited ACLs into their content nor get their mtime bumped.
//!
//! On any failure everything the unpack created is removed again, so the target is
//! left as it was found: empty, or holding only what stood there before (a
//! `lost+found` and its former content; anything the unpack put inside it goes).

use super::reader::{self, HashingReader, OpenBundle};
use super::tarstream::{Header, Kind, TarReader};
use crate::keys::Keyring;
use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use filetime::FileTime;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

const CAPABILITY: &[u8] = b"security.capability";

/// Names a fresh filesystem may already hold; the target counts as empty with them.
const PREEXISTING_OK: &[&str] = &["lost+found"];

#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Decoder threads: 0 or 1 = one decoder thread beside the extraction
    /// (memory: the xz dictionary, about 8 MiB); more = liblzma's
    /// multi-threaded decoder (about 60 MiB per thread, for benchmarks).
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
    let before = inventory(target)?;
    let result = run(b, target, opts, start);
    if let Err(e) = &result {
        log::error!("unpack failed: {e:#}");
        log::info!(
            "removing what was unpacked into {} so it is left as it was",
            target.display()
        );
        if let Err(ce) = remove_new(target, &before) {
            log::error!("cleanup of {} failed too: {ce:#}", target.display());
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

/// What stood in the target before the unpack: relative path → identity and the
/// metadata a failed unpack must give back.
#[derive(Clone, Copy)]
struct Before {
    dev: u64,
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    is_dir: bool,
}

fn inventory(target: &Path) -> Result<HashMap<PathBuf, Before>> {
    let mut out = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = target.join(&rel);
        let m = fs::symlink_metadata(&full)
            .with_context(|| format!("reading target {}", full.display()))?;
        let is_dir = m.is_dir();
        out.insert(
            rel.clone(),
            Before {
                dev: m.dev(),
                ino: m.ino(),
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                is_dir,
            },
        );
        if is_dir {
            for e in fs::read_dir(&full).with_context(|| format!("listing {}", full.display()))? {
                let e = e.with_context(|| format!("listing {}", full.display()))?;
                stack.push(rel.join(e.file_name()));
            }
        }
    }
    Ok(out)
}

/// Removes everything in `target` that is not in `before` (by path and inode),
/// descending into directories that stood there before (`lost+found`), and gives
/// those back their owner and mode.
fn remove_new(target: &Path, before: &HashMap<PathBuf, Before>) -> Result<()> {
    let mut stack = vec![PathBuf::new()];
    let mut first_err = None;
    while let Some(rel) = stack.pop() {
        let dir = target.join(&rel);
        if let Some(b) = before.get(&rel) {
            let _ = std::os::unix::fs::lchown(&dir, Some(b.uid), Some(b.gid));
            let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(b.mode));
        }
        let listing = match fs::read_dir(&dir) {
            Ok(l) => l,
            Err(e) => {
                first_err.get_or_insert(
                    anyhow::Error::new(e).context(format!("listing {}", dir.display())),
                );
                continue;
            }
        };
        for e in listing {
            let e = match e {
                Ok(e) => e,
                Err(e) => {
                    first_err.get_or_insert(
                        anyhow::Error::new(e).context(format!("listing {}", dir.display())),
                    );
                    continue;
                }
            };
            let child = rel.join(e.file_name());
            let p = target.join(&child);
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let old = before
                .get(&child)
                .filter(|b| b.dev == m.dev() && b.ino == m.ino());
            let res = match old {
                Some(b) if b.is_dir && m.is_dir() => {
                    stack.push(child);
                    Ok(())
                }
                Some(_) => Ok(()),
                None if m.is_dir() => fs::remove_dir_all(&p),
                None => fs::remove_file(&p),
            };
            if let Err(e) = res {
                first_err.get_or_insert(
                    anyhow::Error::new(e).context(format!("removing {}", p.display())),
                );
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn run(
    mut b: OpenBundle,
    target: &Path,
    opts: &UnpackOptions,
    start: Instant,
) -> Result<UnpackReport> {
    let manifest = b.manifest.clone();
    let bundle = b.path.clone();
    if !b.payload_checked {
        let progress = opts
            .progress
            .then(|| Progress::new("verify", manifest.payload.compressed_size));
        b.verify_payload(progress)?;
    }
    let progress = opts
        .progress
        .then(|| Progress::new("unpack", manifest.payload.compressed_size));
    let hashing = HashingReader::new(b.payload, progress);
    let mut tar = reader::payload_tar(hashing, &manifest, opts.threads)?;
    let mut ex = Extractor::new(target)?;
    loop {
        let h = tar.next_entry().with_context(|| {
            format!(
                "bundle {}: reading the payload after entry {}",
                bundle.display(),
                ex.entries
            )
        })?;
        let Some(h) = h else { break };
        let name = String::from_utf8_lossy(&h.name).into_owned();
        if ex.entries >= manifest.payload.entries {
            bail!(
                "bundle {}: entry {name:?} is one more than the {} entries the manifest declares; the unpack stops",
                bundle.display(),
                manifest.payload.entries
            );
        }
        ex.entry(&h, &mut tar)
            .with_context(|| format!("bundle {}: entry {name:?}", bundle.display()))?;
    }
    let mut hashing = reader::finish_payload_tar(tar, &manifest)
        .with_context(|| format!("bundle {}", bundle.display()))?;
    if ex.entries != manifest.payload.entries {
        bail!(
            "bundle {}: payload holds {} entries, the manifest says {}",
            bundle.display(),
            ex.entries,
            manifest.payload.entries
        );
    }
    // The whole payload was read and matched: now the held-back bits and nodes.
    ex.apply_held()?;
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
    let mut tar = TarReader::new(BufReader::with_capacity(1 << 20, r));
    let mut ex = Extractor::new(target)?;
    ex.owners = owners;
    while let Some(h) = tar
        .next_entry()
        .with_context(|| format!("reading the tar after entry {}", ex.entries))?
    {
        let name = String::from_utf8_lossy(&h.name).into_owned();
        ex.entry(&h, &mut tar)
            .with_context(|| format!("entry {name:?}"))?;
    }
    tar.finish().context("reading the end of the tar")?;
    ex.apply_held()?;
    ex.finish_dirs()?;
    Ok(ex.entries)
}

struct DirMeta {
    path: PathBuf,
    depth: usize,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: FileTime,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A regular file whose setuid/setgid bits or file capability wait until the whole
/// payload was read and its hash matched. Keyed by inode; `names` are the paths
/// (hardlinks included) that still lead to it.
struct HeldFile {
    names: Vec<PathBuf>,
    mode: u32,
    capability: Option<Vec<u8>>,
}

/// A device node or FIFO created only once the whole payload was read and matched.
struct HeldNode {
    names: Vec<PathBuf>,
    flag: SFlag,
    dev: u64,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: FileTime,
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
    held_files: HashMap<(u64, u64), HeldFile>,
    held_file_names: HashMap<PathBuf, (u64, u64)>,
    held_nodes: Vec<HeldNode>,
    held_node_names: HashMap<PathBuf, usize>,
}

/// Turns an archive name into a relative path made of normal components.
pub(crate) fn clean_name(raw: &[u8]) -> Result<PathBuf> {
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
            held_files: HashMap::new(),
            held_file_names: HashMap::new(),
            held_nodes: Vec::new(),
            held_node_names: HashMap::new(),
        })
    }

    /// Makes sure every parent of `rel` is a real directory inside the target,
    /// creating missing ones with mode 0755 (whatever the umask); refuses symlinks and
    /// other files on the way.
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
            if self.held_node_names.contains_key(&cur) {
                bail!("refused: its parent {} is not a directory", cur.display());
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
                    // The umask applied to the mode above; an implicit directory is 0755.
                    fs::set_permissions(&full, fs::Permissions::from_mode(0o755))
                        .with_context(|| format!("chmod {}", full.display()))?;
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

    /// A later entry takes the name `rel`: whatever was held back under that name
    /// no longer applies to it (the inode behind other names keeps it).
    fn claim(&mut self, rel: &Path) {
        if let Some(key) = self.held_file_names.remove(rel) {
            if let Some(h) = self.held_files.get_mut(&key) {
                h.names.retain(|n| n != rel);
                if h.names.is_empty() {
                    self.held_files.remove(&key);
                }
            }
        }
        if let Some(i) = self.held_node_names.remove(rel) {
            self.held_nodes[i].names.retain(|n| n != rel);
        }
    }

    fn entry<R: Read>(&mut self, h: &Header, data: &mut TarReader<R>) -> Result<()> {
        let rel = clean_name(&h.name)?;
        let (mut uid, mut gid) = (h.uid, h.gid);
        if let Some(m) = self.owners {
            uid = m.uid.get(&uid).copied().unwrap_or(uid);
            gid = m.gid.get(&gid).copied().unwrap_or(gid);
        }
        let mode = h.mode & 0o7777;
        let mt = FileTime::from_unix_time(h.mtime, h.mtime_nsec);
        self.entries += 1;

        if h.kind == Kind::Dir || rel.as_os_str().is_empty() {
            if h.kind != Kind::Dir {
                bail!("refused: a non-directory entry names the target directory itself");
            }
            if !rel.as_os_str().is_empty() {
                self.ensure_parents(&rel)?;
                if self.held_node_names.contains_key(&rel) {
                    bail!(
                        "refused: a non-directory already stands at {}",
                        rel.display()
                    );
                }
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
                mtime: mt,
                xattrs: h.xattrs.clone(),
            });
            return Ok(());
        }

        self.ensure_parents(&rel)?;
        let full = self.target.join(&rel);
        match h.kind {
            Kind::File => {
                self.claim(&rel);
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
                let mut left = h.size;
                while left > 0 {
                    let want = left.min(self.buf.len() as u64) as usize;
                    let n = data
                        .read_data(&mut self.buf[..want])
                        .context("reading file data from the payload")?;
                    f.write_all(&self.buf[..n])
                        .with_context(|| format!("writing {}", full.display()))?;
                    left -= n as u64;
                    self.bytes += n as u64;
                }
                // chown before chmod (chown clears setuid) and xattrs last (chown also
                // clears security.capability). Setuid/setgid and the capability wait.
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                    .with_context(|| format!("chown {}", full.display()))?;
                f.set_permissions(fs::Permissions::from_mode(mode & !0o6000))
                    .with_context(|| format!("chmod {}", full.display()))?;
                let mut capability = None;
                for (k, v) in &h.xattrs {
                    if k == CAPABILITY {
                        capability = Some(v.clone());
                        continue;
                    }
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
                if mode & 0o6000 != 0 || capability.is_some() {
                    let m = f
                        .metadata()
                        .with_context(|| format!("reading {}", full.display()))?;
                    let key = (m.dev(), m.ino());
                    self.held_files.insert(
                        key,
                        HeldFile {
                            names: vec![rel.clone()],
                            mode,
                            capability,
                        },
                    );
                    self.held_file_names.insert(rel, key);
                }
            }
            Kind::HardLink => {
                let link_rel = clean_name(&h.link).context("hardlink target")?;
                if link_rel.as_os_str().is_empty() {
                    bail!("hardlink to the target directory itself refused");
                }
                if link_rel == rel {
                    bail!("hardlink to itself refused");
                }
                self.ensure_parents(&link_rel).context("hardlink target")?;
                if let Some(&i) = self.held_node_names.get(&link_rel) {
                    // The node is created later; so is this name for it.
                    self.claim(&rel);
                    self.make_room(&full, &rel)?;
                    self.held_nodes[i].names.push(rel.clone());
                    self.held_node_names.insert(rel, i);
                    return Ok(());
                }
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
                self.claim(&rel);
                self.make_room(&full, &rel)?;
                // linkat without AT_SYMLINK_FOLLOW: a symlink source is linked itself, never followed.
                fs::hard_link(&src, &full)
                    .with_context(|| format!("linking {} to {}", full.display(), src.display()))?;
                if let Some(&key) = self.held_file_names.get(&link_rel) {
                    if let Some(hf) = self.held_files.get_mut(&key) {
                        hf.names.push(rel.clone());
                        self.held_file_names.insert(rel, key);
                    }
                }
            }
            Kind::Symlink => {
                self.claim(&rel);
                self.make_room(&full, &rel)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&h.link), &full)
                    .with_context(|| format!("creating symlink {}", full.display()))?;
                std::os::unix::fs::lchown(&full, Some(uid), Some(gid))
                    .with_context(|| format!("chown {}", full.display()))?;
                set_path_xattrs(&full, &h.xattrs)?;
                filetime::set_symlink_file_times(&full, mt, mt)
                    .with_context(|| format!("setting mtime of {}", full.display()))?;
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                self.claim(&rel);
                self.make_room(&full, &rel)?;
                let (flag, dev) = match h.kind {
                    Kind::Char => (
                        SFlag::S_IFCHR,
                        makedev(h.dev_major as u64, h.dev_minor as u64),
                    ),
                    Kind::Block => (
                        SFlag::S_IFBLK,
                        makedev(h.dev_major as u64, h.dev_minor as u64),
                    ),
                    _ => (SFlag::S_IFIFO, 0),
                };
                self.held_nodes.push(HeldNode {
                    names: vec![rel.clone()],
                    flag,
                    dev,
                    uid,
                    gid,
                    mode,
                    mtime: mt,
                    xattrs: h.xattrs.clone(),
                });
                self.held_node_names.insert(rel, self.held_nodes.len() - 1);
            }
            Kind::Dir => unreachable!("directories are handled above"),
        }
        Ok(())
    }

    /// Called only once the whole payload was read and matched: creates the held-back
    /// nodes and gives files their setuid/setgid bits and capabilities.
    fn apply_held(&mut self) -> Result<()> {
        for n in std::mem::take(&mut self.held_nodes) {
            let Some((first, others)) = n.names.split_first() else {
                continue;
            };
            let full = self.target.join(first);
            mknod(&full, n.flag, Mode::from_bits_truncate(0o600), n.dev)
                .with_context(|| format!("creating node {}", full.display()))?;
            std::os::unix::fs::lchown(&full, Some(n.uid), Some(n.gid))
                .with_context(|| format!("chown {}", full.display()))?;
            fs::set_permissions(&full, fs::Permissions::from_mode(n.mode))
                .with_context(|| format!("chmod {}", full.display()))?;
            set_path_xattrs(&full, &n.xattrs)?;
            filetime::set_symlink_file_times(&full, n.mtime, n.mtime)
                .with_context(|| format!("setting mtime of {}", full.display()))?;
            for o in others {
                let link = self.target.join(o);
                fs::hard_link(&full, &link)
                    .with_context(|| format!("linking {} to {}", link.display(), full.display()))?;
            }
        }
        self.held_node_names.clear();
        for (key, hf) in std::mem::take(&mut self.held_files) {
            let mut done = false;
            for name in &hf.names {
                let full = self.target.join(name);
                let f = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(
                        nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK,
                    )
                    .open(&full)
                    .with_context(|| format!("opening {}", full.display()))?;
                let m = f
                    .metadata()
                    .with_context(|| format!("reading {}", full.display()))?;
                if !m.is_file() || (m.dev(), m.ino()) != key {
                    continue;
                }
                f.set_permissions(fs::Permissions::from_mode(hf.mode))
                    .with_context(|| format!("chmod {}", full.display()))?;
                if let Some(cap) = &hf.capability {
                    xattr::FileExt::set_xattr(&f, OsStr::from_bytes(CAPABILITY), cap)
                        .with_context(|| {
                            format!("setting xattr security.capability on {}", full.display())
                        })?;
                }
                done = true;
                break;
            }
            if !done {
                bail!(
                    "internal error: {} changed while it was unpacked",
                    hf.names[0].display()
                );
            }
        }
        self.held_file_names.clear();
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
            filetime::set_symlink_file_times(&full, d.mtime, d.mtime)
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
