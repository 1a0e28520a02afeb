//! Shared helpers for the bundle integration tests (run as root: they mount ext4
//! images through loop devices and create device nodes).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn dualroot() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dualroot"))
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    out
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (loop devices, mknod, chown to foreign UIDs); CI runs them as root"
    );
}

/// An ext4 filesystem in a sparse image file, mounted through `losetup`.
pub struct LoopFs {
    pub img: PathBuf,
    pub dev: String,
    pub mnt: PathBuf,
}

impl LoopFs {
    pub fn new(dir: &Path, size_mib: u64) -> LoopFs {
        let img = dir.join("fs.img");
        let f = fs::File::create(&img).unwrap();
        f.set_len(size_mib << 20).unwrap();
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        let dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&img))
            .trim()
            .to_string();
        let mnt = dir.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let fsg = LoopFs { img, dev, mnt };
        run_ok(Command::new("mount").arg(&fsg.dev).arg(&fsg.mnt));
        fsg
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        for _ in 0..5 {
            if Command::new("umount")
                .arg(&self.mnt)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A key pair and a keyring directory trusting it.
pub struct Keys {
    pub secret: PathBuf,
    pub keyring: PathBuf,
}

pub fn keys(dir: &Path, name: &str) -> Keys {
    let secret = dir.join(name);
    run_ok(dualroot().args(["key", "generate", "--out"]).arg(&secret));
    let keyring = dir.join(format!("{name}-keyring"));
    fs::create_dir_all(&keyring).unwrap();
    fs::copy(
        format!("{}.pub", secret.display()),
        keyring.join(format!("{name}.pub")),
    )
    .unwrap();
    Keys { secret, keyring }
}

#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Facts {
    pub kind: String,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub mtime: i64,
    pub content: String,
    pub rdev: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Everything about a tree that an unpack must restore, by relative path, plus the
/// hardlink groups (sets of paths sharing an inode).
pub fn snapshot(
    root: &Path,
    skip: &[&str],
) -> (BTreeMap<String, Facts>, BTreeSet<BTreeSet<String>>) {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<u64, BTreeSet<String>> = HashMap::new();
    for e in walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
    {
        let e = e.unwrap();
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if skip
            .iter()
            .any(|s| rel == *s || rel.starts_with(&format!("{s}/")))
        {
            continue;
        }
        let m = fs::symlink_metadata(e.path()).unwrap();
        let ft = m.file_type();
        let (kind, content) = if ft.is_dir() {
            ("dir", String::new())
        } else if ft.is_symlink() {
            (
                "symlink",
                fs::read_link(e.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            )
        } else if ft.is_file() {
            let data = fs::read(e.path()).unwrap();
            (
                "file",
                format!("{} bytes, fnv {:x}", data.len(), fnv(&data)),
            )
        } else if ft.is_char_device() {
            ("char", String::new())
        } else if ft.is_block_device() {
            ("block", String::new())
        } else if ft.is_fifo() {
            ("fifo", String::new())
        } else {
            ("other", String::new())
        };
        if ft.is_file() && m.nlink() > 1 {
            inodes.entry(m.ino()).or_default().insert(rel.clone());
        }
        let mut xattrs = BTreeMap::new();
        for name in xattr::list(e.path()).unwrap() {
            if let Some(v) = xattr::get(e.path(), &name).unwrap() {
                xattrs.insert(String::from_utf8_lossy(name.as_bytes()).into_owned(), v);
            }
        }
        out.insert(
            rel,
            Facts {
                kind: kind.into(),
                uid: m.uid(),
                gid: m.gid(),
                mode: if ft.is_symlink() {
                    0
                } else {
                    m.mode() & 0o7777
                },
                mtime: m.mtime(),
                content,
                rdev: m.rdev(),
                xattrs,
            },
        );
    }
    (out, inodes.into_values().filter(|s| s.len() > 1).collect())
}

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Differences between two snapshots, one line each.
pub fn diff(
    a_name: &str,
    a: &(BTreeMap<String, Facts>, BTreeSet<BTreeSet<String>>),
    b_name: &str,
    b: &(BTreeMap<String, Facts>, BTreeSet<BTreeSet<String>>),
) -> Vec<String> {
    let mut d = Vec::new();
    for (k, fa) in &a.0 {
        match b.0.get(k) {
            None => d.push(format!("{k}: in {a_name}, missing in {b_name}")),
            Some(fb) if fa != fb => d.push(format!("{k}: {a_name} {fa:?} != {b_name} {fb:?}")),
            _ => {}
        }
    }
    for k in b.0.keys() {
        if !a.0.contains_key(k) {
            d.push(format!("{k}: in {b_name}, missing in {a_name}"));
        }
    }
    if a.1 != b.1 {
        d.push(format!(
            "hardlink groups differ: {a_name} {:?} vs {b_name} {:?}",
            a.1, b.1
        ));
    }
    d
}

// ---------------------------------------------------------------------------
// Crafting bundles byte by byte (shared by the refusal and hardening tests).

use dualroot::bundle::manifest::{CpuLevel, Manifest, Payload, PAYLOAD_NAME};
use dualroot::bundle::outer;
use dualroot::keys;
use sha2::{Digest, Sha256};
use std::io::Write;

/// Fields of one raw ustar header, written exactly as given (no sanitising).
pub struct Raw<'a> {
    pub name: &'a [u8],
    pub kind: u8,
    pub link: &'a [u8],
    pub mode: u32,
    pub size: Option<u64>,
    pub dev: (u32, u32),
    pub prefix: &'a [u8],
}

impl<'a> Raw<'a> {
    pub fn new(name: &'a str, kind: u8) -> Raw<'a> {
        Raw {
            name: name.as_bytes(),
            kind,
            link: b"",
            mode: 0o644,
            size: None,
            dev: (0, 0),
            prefix: b"",
        }
    }

    /// The header block followed by `data`, padded to 512 bytes.
    pub fn with(&self, data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; 512];
        h[..self.name.len()].copy_from_slice(self.name);
        h[100..108].copy_from_slice(format!("{:07o}\0", self.mode).as_bytes());
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        let size = self.size.unwrap_or(data.len() as u64);
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"14000000000\0");
        h[156] = self.kind;
        h[157..157 + self.link.len()].copy_from_slice(self.link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[329..337].copy_from_slice(format!("{:07o}\0", self.dev.0).as_bytes());
        h[337..345].copy_from_slice(format!("{:07o}\0", self.dev.1).as_bytes());
        h[345..345 + self.prefix.len()].copy_from_slice(self.prefix);
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let mut v = h.to_vec();
        v.extend_from_slice(data);
        v.resize(v.len().div_ceil(512) * 512, 0);
        v
    }
}

/// One raw ustar entry; the name is written as given (no sanitising).
pub fn raw_entry(name: &str, kind: u8, link: &str, data: &[u8]) -> Vec<u8> {
    let mut r = Raw::new(name, kind);
    r.link = link.as_bytes();
    r.with(data)
}

/// A PAX extended header ('x') holding `records`, to precede one entry.
pub fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in records {
        let base = k.len() + v.len() + 3;
        let mut len = base + 1;
        while len != base + len.to_string().len() {
            len = base + len.to_string().len();
        }
        body.extend_from_slice(format!("{len} {k}=").as_bytes());
        body.extend_from_slice(v);
        body.push(b'\n');
    }
    raw_entry("PaxHeader", b'x', "", &body)
}

pub fn tar_of(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut v: Vec<u8> = entries.concat();
    v.extend_from_slice(&[0u8; 1024]);
    v
}

pub fn xz(data: &[u8]) -> Vec<u8> {
    xz_level(data, 6)
}

pub fn xz_level(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), level);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn manifest_for(payload: &[u8], uncompressed: u64, entries: u64, key_id: &str) -> Manifest {
    Manifest {
        format: 1,
        os_id: "testos".into(),
        version: "1.0".into(),
        model: "any".into(),
        requires_cpu: CpuLevel::V2,
        created_unix: 1_700_000_000,
        key_id: key_id.into(),
        payload: Payload {
            name: PAYLOAD_NAME.into(),
            compression: "xz".into(),
            sha256: hex::encode(Sha256::digest(payload)),
            compressed_size: payload.len() as u64,
            uncompressed_size: uncompressed,
            entries,
        },
    }
}

/// The bytes of a bundle made of its three parts, exactly as given.
pub fn assemble_bytes(manifest: &[u8], sig: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    outer::write_member(&mut v, "manifest.toml", manifest, 0).unwrap();
    if let Some(sig) = sig {
        outer::write_member(&mut v, "manifest.sig", sig, 0).unwrap();
    }
    outer::write_member(&mut v, PAYLOAD_NAME, payload, 0).unwrap();
    outer::write_end(&mut v).unwrap();
    v
}

/// Writes a bundle from its three parts, exactly as given.
pub fn assemble(path: &Path, manifest: &[u8], sig: Option<&[u8]>, payload: &[u8]) {
    fs::write(path, assemble_bytes(manifest, sig, payload)).unwrap();
}

pub struct Case {
    pub _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub keys: Keys,
    pub bundle: PathBuf,
    pub target: PathBuf,
}

pub fn case() -> Case {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let keys = keys(&dir, "vendor");
    let target = dir.join("target");
    fs::create_dir(&target).unwrap();
    Case {
        bundle: dir.join("b.bundle"),
        target,
        dir,
        keys,
        _tmp: tmp,
    }
}

impl Case {
    pub fn secret(&self) -> ed25519_dalek::SigningKey {
        keys::load_secret(&self.keys.secret).unwrap()
    }

    /// A signed manifest for `payload` (compressed), after `edit` had its say.
    pub fn signed_manifest(
        &self,
        payload: &[u8],
        uncompressed: u64,
        entries: u64,
        edit: impl FnOnce(&mut Manifest),
    ) -> (String, Vec<u8>) {
        let k = self.secret();
        let mut m = manifest_for(
            payload,
            uncompressed,
            entries,
            &keys::key_id(&k.verifying_key()),
        );
        edit(&mut m);
        let text = m.to_toml();
        let sig = keys::sign(&k, text.as_bytes());
        (text, sig)
    }

    /// A properly signed bundle of `tar`, after `edit` had its say on the manifest.
    pub fn signed(&self, tar: &[u8], edit: impl FnOnce(&mut Manifest)) {
        self.signed_payload(&xz(tar), tar.len() as u64, count_entries(tar), edit);
    }

    /// A properly signed bundle of an already compressed payload.
    pub fn signed_payload(
        &self,
        payload: &[u8],
        uncompressed: u64,
        entries: u64,
        edit: impl FnOnce(&mut Manifest),
    ) {
        let (text, sig) = self.signed_manifest(payload, uncompressed, entries, edit);
        assemble(&self.bundle, text.as_bytes(), Some(&sig), payload);
    }

    pub fn unpack_cmd(&self) -> Command {
        let mut c = dualroot();
        c.args(["bundle", "unpack"])
            .arg(&self.bundle)
            .arg(&self.target)
            .arg("--keyring")
            .arg(&self.keys.keyring);
        c
    }

    pub fn unpack_ok(&self) {
        run_ok(&mut self.unpack_cmd());
    }

    /// Runs unpack, expects failure mentioning every `needles`; returns stderr.
    pub fn fails(&self, needles: &[&str]) -> String {
        let out = run(&mut self.unpack_cmd());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "unpack succeeded but should have been refused"
        );
        for n in needles {
            assert!(err.contains(n), "error does not mention {n:?}:\n{err}");
        }
        println!("refused as expected: {}", err.lines().last().unwrap_or(""));
        err
    }

    /// Runs unpack, expects failure mentioning every `needles`, and an empty target.
    pub fn refused(&self, needles: &[&str]) -> String {
        let err = self.fails(needles);
        let left: Vec<_> = fs::read_dir(&self.target)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "target not left empty: {left:?}");
        err
    }
}

/// Entries as GNU tar counts them (extension headers are not entries).
pub fn count_entries(tar: &[u8]) -> u64 {
    let mut a = tar::Archive::new(tar);
    a.entries().map(|es| es.count() as u64).unwrap_or(0)
}

/// Incompressible bytes, so the payload is large and offsets near its end are inside it.
pub fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A minimal root to chroot into: busybox-static as `bin/busybox` with
/// `tools` linked to it, and the usual mount points.
pub fn busybox_root(root: &Path, tools: &[&str]) {
    let bb = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is installed (scripts/install-deps.sh)");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(bb, root.join("bin/busybox")).unwrap();
    for tool in tools {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).unwrap();
    }
    for d in ["dev", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
}
