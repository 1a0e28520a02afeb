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
