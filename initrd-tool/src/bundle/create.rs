//! `dualroot bundle create`: a root tree → signed bundle.
//!
//! The payload is a PAX tar written entry by entry from a walk that never follows
//! symlinks and never crosses into another filesystem (a mount point is kept as an
//! empty directory). Every xattr goes into `SCHILY.xattr.*` records, the form GNU tar
//! and our unpacker both read, on every entry type. Compression is multi-block xz on
//! all cores so the unpacker can decode on several threads.

use super::manifest::{CpuLevel, Manifest, Payload, FORMAT, PAYLOAD_NAME};
use super::outer;
use crate::keys;
use anyhow::{bail, Context, Result};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tar::{EntryType, Header};

/// Paths (relative to the root, glob syntax, `*` stops at `/`) a fresh image must not
/// carry: caches, logs, temporary files and state that identifies one machine.
/// The directories themselves stay; only what is inside goes.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "tmp/*",
    "var/tmp/*",
    "proc/*",
    "sys/*",
    "run/*",
    "dev/shm/*",
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/cache/apt/archives/partial/*",
    "var/cache/dnf/*",
    "var/cache/yum/*",
    "var/cache/man/*",
    "var/cache/debconf/*-old",
    "var/cache/ldconfig/aux-cache",
    "var/lib/apt/lists/*_*",
    "var/lib/apt/lists/partial/*",
    "var/log/**/*.gz",
    "var/log/**/*.[0-9]",
    "var/log/**/*.old",
    "var/log/*.log",
    "var/log/journal/*",
    "var/lib/systemd/random-seed",
    "var/lib/dbus/machine-id",
    "etc/machine-id",
    "etc/ssh/ssh_host_*",
    "root/.bash_history",
    "home/*/.bash_history",
    "root/.cache",
];

pub struct CreateOptions {
    pub rootfs: PathBuf,
    pub os_id: String,
    pub version: String,
    pub model: String,
    pub requires_cpu: CpuLevel,
    pub key: PathBuf,
    pub out: PathBuf,
    pub excludes: Vec<String>,
    pub default_excludes: bool,
    pub threads: u32,
}

#[derive(Debug, Default)]
pub struct CreateReport {
    pub entries: u64,
    pub excluded: u64,
    pub skipped_sockets: Vec<String>,
    pub manifest: Option<Manifest>,
}

fn build_excludes(opts: &CreateOptions) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    let defaults = if opts.default_excludes {
        DEFAULT_EXCLUDES
    } else {
        &[]
    };
    for p in defaults
        .iter()
        .copied()
        .chain(opts.excludes.iter().map(String::as_str))
    {
        let p = p.trim_start_matches('/');
        let g = GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .with_context(|| format!("exclude pattern {p:?} is not a valid glob"))?;
        b.add(g);
    }
    Ok(b.build()?)
}

pub fn create(opts: &CreateOptions) -> Result<CreateReport> {
    let key = keys::load_secret(&opts.key)?;
    let key_id = keys::key_id(&key.verifying_key());
    let root_meta = fs::symlink_metadata(&opts.rootfs)
        .with_context(|| format!("reading root tree {}", opts.rootfs.display()))?;
    if !root_meta.is_dir() {
        bail!("root tree {} is not a directory", opts.rootfs.display());
    }
    let excludes = build_excludes(opts)?;
    let out_dir = opts
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let out_name = opts
        .out
        .file_name()
        .context("--out has no file name")?
        .to_string_lossy();
    let payload_tmp = out_dir.join(format!(".{out_name}.payload.tmp"));
    let bundle_tmp = out_dir.join(format!(".{out_name}.tmp"));
    let result = (|| {
        let (report, payload) = write_payload(opts, &excludes, root_meta.dev(), &payload_tmp)?;
        let manifest = Manifest {
            format: FORMAT,
            os_id: opts.os_id.clone(),
            version: opts.version.clone(),
            model: opts.model.clone(),
            requires_cpu: opts.requires_cpu,
            created_unix: now_unix(),
            key_id,
            payload,
        };
        let text = manifest.to_toml();
        // Self-check: what we sign must parse back to what we meant.
        Manifest::parse(text.as_bytes()).context("generated manifest does not parse back")?;
        let sig = keys::sign(&key, text.as_bytes());
        let mut out = BufWriter::new(
            fs::File::create(&bundle_tmp)
                .with_context(|| format!("creating {}", bundle_tmp.display()))?,
        );
        let mtime = manifest.created_unix;
        outer::write_member(&mut out, "manifest.toml", text.as_bytes(), mtime)?;
        outer::write_member(&mut out, "manifest.sig", &sig, mtime)?;
        outer::write_header(
            &mut out,
            PAYLOAD_NAME,
            manifest.payload.compressed_size,
            mtime,
        )?;
        let mut payload_file = fs::File::open(&payload_tmp)?;
        let n = io::copy(&mut payload_file, &mut out)?;
        if n != manifest.payload.compressed_size {
            bail!(
                "payload temp file {} changed size while copying",
                payload_tmp.display()
            );
        }
        out.write_all(&[0u8; 512][..outer::padding(n)])?;
        outer::write_end(&mut out)?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
            .with_context(|| format!("syncing {}", bundle_tmp.display()))?;
        fs::rename(&bundle_tmp, &opts.out).with_context(|| {
            format!(
                "renaming {} to {}",
                bundle_tmp.display(),
                opts.out.display()
            )
        })?;
        Ok(CreateReport {
            manifest: Some(manifest),
            ..report
        })
    })();
    let _ = fs::remove_file(&payload_tmp);
    if result.is_err() {
        let _ = fs::remove_file(&bundle_tmp);
    }
    result
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Counts and hashes what passes through.
struct HashWriter<W> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct CountWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_payload(
    opts: &CreateOptions,
    excludes: &GlobSet,
    root_dev: u64,
    tmp: &Path,
) -> Result<(CreateReport, Payload)> {
    let file = fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let hw = HashWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        count: 0,
    };
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(opts.threads.max(1))
        .preset(6)
        .check(liblzma::stream::Check::Crc64)
        .encoder()
        .context("setting up the multi-threaded xz encoder")?;
    let xz = liblzma::write::XzEncoder::new_stream(hw, stream);
    let mut tar = tar::Builder::new(CountWriter {
        inner: BufWriter::with_capacity(1 << 20, xz),
        count: 0,
    });
    let mut w = Walker {
        tar: &mut tar,
        excludes,
        root_dev,
        hardlinks: HashMap::new(),
        report: CreateReport::default(),
    };
    w.add(&opts.rootfs, Path::new(""))?;
    let report = w.report;
    tar.finish()?;
    let cw = tar.into_inner()?;
    let uncompressed = cw.count;
    let xz = cw.inner.into_inner().map_err(|e| e.into_error())?;
    let mut hw = xz.finish().context("finishing the xz stream")?;
    hw.flush()?;
    let file = hw.inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    let payload = Payload {
        name: PAYLOAD_NAME.into(),
        compression: "xz".into(),
        sha256: hex::encode(hw.hash.finalize()),
        compressed_size: hw.count,
        uncompressed_size: uncompressed,
        entries: report.entries,
    };
    Ok((report, payload))
}

/// Writes an uncompressed tar of `items` (source path, name in the archive) with the
/// same fidelity as a bundle payload: owners, modes, xattrs, hardlinks, devices.
/// Used to carry files across a migration.
pub fn write_tar<W: Write>(w: W, items: &[(PathBuf, PathBuf)]) -> Result<(W, u64)> {
    let none = GlobSetBuilder::new().build()?;
    let mut tar = tar::Builder::new(w);
    let mut walker = Walker {
        tar: &mut tar,
        excludes: &none,
        root_dev: 0,
        hardlinks: HashMap::new(),
        report: CreateReport::default(),
    };
    for (src, name) in items {
        let meta =
            fs::symlink_metadata(src).with_context(|| format!("reading {}", src.display()))?;
        walker.root_dev = meta.dev();
        let name = name.strip_prefix("/").unwrap_or(name);
        walker.add(src, name)?;
    }
    let entries = walker.report.entries;
    tar.finish()?;
    Ok((tar.into_inner()?, entries))
}

struct Walker<'a, W: Write> {
    tar: &'a mut tar::Builder<W>,
    excludes: &'a GlobSet,
    root_dev: u64,
    hardlinks: HashMap<(u64, u64), PathBuf>,
    report: CreateReport,
}

/// One PAX extended-header record: `"<len> <key>=<value>\n"`, where len counts itself.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let body = key.len() + value.len() + 3; // space, '=', newline
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl<W: Write> Walker<'_, W> {
    fn add(&mut self, path: &Path, rel: &Path) -> Result<()> {
        let meta =
            fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let ft = meta.file_type();
        if ft.is_socket() {
            log::warn!(
                "skipping socket {} (sockets cannot be archived)",
                path.display()
            );
            self.report.skipped_sockets.push(rel.display().to_string());
            return Ok(());
        }
        let name: Vec<u8> = if rel.as_os_str().is_empty() {
            b"./".to_vec()
        } else if ft.is_dir() {
            let mut v = rel.as_os_str().as_bytes().to_vec();
            v.push(b'/');
            v
        } else {
            rel.as_os_str().as_bytes().to_vec()
        };

        let mut pax = Vec::new();
        let mut header = Header::new_ustar();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(meta.uid() as u64);
        header.set_gid(meta.gid() as u64);
        header.set_size(0);
        // A ustar mtime is an unsigned 11-digit octal number; pre-1970 (negative) and
        // far-future times go into a PAX `mtime` record, as GNU tar writes them.
        if (0..=0o77777777777).contains(&meta.mtime()) {
            header.set_mtime(meta.mtime() as u64);
        } else {
            header.set_mtime(0);
            pax_record(&mut pax, "mtime", meta.mtime().to_string().as_bytes());
        }
        if name.len() > 100
            || header
                .set_path(Path::new(std::ffi::OsStr::from_bytes(&name)))
                .is_err()
        {
            pax_record(&mut pax, "path", &name);
            set_placeholder_name(&mut header, &name);
        }
        for attr in
            xattr::list(path).with_context(|| format!("listing xattrs of {}", path.display()))?
        {
            let value = match xattr::get(path, &attr) {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading xattr {attr:?} of {}", path.display()))
                }
            };
            pax_record(
                &mut pax,
                &format!("SCHILY.xattr.{}", attr.to_string_lossy()),
                &value,
            );
        }

        let mut data: Option<fs::File> = None;
        let link_key = (meta.dev(), meta.ino());
        if !ft.is_dir() && meta.nlink() > 1 && self.hardlinks.contains_key(&link_key) {
            let target = self.hardlinks[&link_key].clone();
            header.set_entry_type(EntryType::Link);
            self.set_link(&mut header, &mut pax, target.as_os_str().as_bytes());
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                self.hardlinks.insert(link_key, rel.to_path_buf());
            }
            header.set_entry_type(EntryType::Regular);
            header.set_size(meta.len());
            data = Some(
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            );
        } else if ft.is_dir() {
            header.set_entry_type(EntryType::Directory);
        } else if ft.is_symlink() {
            header.set_entry_type(EntryType::Symlink);
            let target = fs::read_link(path)
                .with_context(|| format!("reading symlink {}", path.display()))?;
            self.set_link(&mut header, &mut pax, target.as_os_str().as_bytes());
        } else if ft.is_char_device() || ft.is_block_device() {
            header.set_entry_type(if ft.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            });
            let rdev = meta.rdev();
            header.set_device_major(nix::sys::stat::major(rdev) as u32)?;
            header.set_device_minor(nix::sys::stat::minor(rdev) as u32)?;
        } else if ft.is_fifo() {
            header.set_entry_type(EntryType::Fifo);
        } else {
            bail!("{} has a file type that cannot be archived", path.display());
        }

        if !pax.is_empty() {
            let mut ph = Header::new_ustar();
            ph.set_entry_type(EntryType::XHeader);
            ph.set_path("PaxHeader")?;
            ph.set_size(pax.len() as u64);
            ph.set_mode(0o644);
            ph.set_cksum();
            self.tar.append(&ph, &pax[..])?;
        }
        header.set_cksum();
        match data {
            Some(f) => {
                let len = meta.len();
                let reader = ExactReader {
                    inner: f.take(len),
                    left: len,
                    path,
                };
                self.tar.append(&header, reader)?;
            }
            None => self.tar.append(&header, io::empty())?,
        }
        self.report.entries += 1;

        if ft.is_dir() && (rel.as_os_str().is_empty() || meta.dev() == self.root_dev) {
            let mut children: Vec<_> = fs::read_dir(path)
                .with_context(|| format!("listing {}", path.display()))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()?;
            children.sort();
            for c in children {
                let child_rel = rel.join(&c);
                if self.excludes.is_match(&child_rel) {
                    self.report.excluded += 1;
                    continue;
                }
                self.add(&path.join(&c), &child_rel)?;
            }
        }
        Ok(())
    }

    fn set_link(&mut self, header: &mut Header, pax: &mut Vec<u8>, target: &[u8]) {
        let p = Path::new(std::ffi::OsStr::from_bytes(target));
        if target.len() >= 100 || header.set_link_name(p).is_err() {
            pax_record(pax, "linkpath", target);
        }
    }
}

/// Names that only fit in PAX still get a readable, truncated ustar name.
fn set_placeholder_name(header: &mut Header, name: &[u8]) {
    let n = name.len().min(99);
    let old = header.as_old_mut();
    old.name = [0; 100];
    old.name[..n].copy_from_slice(&name[..n]);
}

/// Reads exactly `left` bytes or fails: a file that shrinks while being archived must
/// not produce a tar whose header and data disagree.
struct ExactReader<'a, R> {
    inner: R,
    left: u64,
    path: &'a Path,
}

impl<R: Read> Read for ExactReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was being archived", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        for vlen in [0usize, 1, 5, 90, 95, 96, 97, 1000] {
            let mut v = Vec::new();
            pax_record(&mut v, "path", &vec![b'a'; vlen]);
            let s = String::from_utf8(v.clone()).unwrap();
            let len: usize = s.split(' ').next().unwrap().parse().unwrap();
            assert_eq!(len, v.len(), "value length {vlen}");
        }
    }

    #[test]
    fn default_excludes_keep_directories() {
        let opts = CreateOptions {
            rootfs: "/".into(),
            os_id: "x".into(),
            version: "1".into(),
            model: "any".into(),
            requires_cpu: CpuLevel::V1,
            key: "/k".into(),
            out: "/o".into(),
            excludes: vec!["/opt/big/**".into()],
            default_excludes: true,
            threads: 1,
        };
        let g = build_excludes(&opts).unwrap();
        assert!(g.is_match("tmp/foo"));
        assert!(!g.is_match("tmp"));
        assert!(g.is_match("var/log/apt/history.log.1.gz"));
        assert!(!g.is_match("var/log/apt"));
        assert!(g.is_match("etc/ssh/ssh_host_rsa_key"));
        assert!(!g.is_match("etc/ssh/sshd_config"));
        assert!(g.is_match("opt/big/x/y"));
        assert!(!g.is_match("usr/lib/tmp/x"));
    }
}
