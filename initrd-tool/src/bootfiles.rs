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
    write_pair_version(slot_dir, "", kernel)
}

fn write_pair_version(slot_dir: &Path, sfx: &str, kernel: &Path) -> Result<String> {
    let v = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();
    crate::fsutil::write_atomic(
        &slot_dir.join(format!("{KERNEL_VERSION_FILE}{sfx}")),
        format!("{v}\n").as_bytes(),
    )?;
    Ok(v)
}

/// Puts a kernel and its initramfs into a slot's boot directory as `vmlinuz` and
/// `initrd.img` (each through a temp file and a rename, so a cut leaves the old
/// or the new file) and records the kernel version. Returns the version.
pub fn install_slot_kernel(slot_dir: &Path, kernel: &Path, initrd: &Path) -> Result<String> {
    install_slot_kernel_pair(slot_dir, "0", kernel, initrd)
}

/// The same for kernel pair `pair` of the slot (`grub.rs`: pair 1 is
/// `vmlinuz.1`, `initrd.img.1`, `kernel-version.1`).
pub fn install_slot_kernel_pair(
    slot_dir: &Path,
    pair: &str,
    kernel: &Path,
    initrd: &Path,
) -> Result<String> {
    let sfx = crate::grub::kernel_pair_suffix(pair);
    fs::create_dir_all(slot_dir).with_context(|| format!("creating {}", slot_dir.display()))?;
    for (src, name) in [(kernel, "vmlinuz"), (initrd, "initrd.img")] {
        let name = format!("{name}{sfx}");
        let tmp = slot_dir.join(format!(".{name}.new"));
        crate::fsutil::copy_hashed(src, &tmp)?;
        fs::rename(&tmp, slot_dir.join(&name))
            .with_context(|| format!("renaming {} into {}", tmp.display(), slot_dir.display()))?;
    }
    write_pair_version(slot_dir, sfx, kernel)
}

/// The tool a root tree builds its initramfs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitramfsTool {
    /// Debian's initramfs-tools (`update-initramfs`).
    InitramfsTools,
    /// dracut (EL, or Debian with dracut).
    Dracut,
}

/// Where each tool lives in a root tree (paths without the leading `/`).
pub const INITRAMFS_TOOL_PATHS: [(&str, InitramfsTool); 3] = [
    ("usr/sbin/update-initramfs", InitramfsTool::InitramfsTools),
    ("usr/bin/dracut", InitramfsTool::Dracut),
    ("usr/sbin/dracut", InitramfsTool::Dracut),
];

/// Set while dualroot runs a root's initramfs tool itself: dualroot's own
/// kernel hooks in that root then do nothing (dualroot installs the result).
pub const NO_HOOK_ENV: &str = "DUALROOT_NO_HOOK";

impl InitramfsTool {
    pub fn of_root(root: &Path) -> Option<InitramfsTool> {
        INITRAMFS_TOOL_PATHS
            .iter()
            .find(|(p, _)| root.join(p).exists())
            .map(|(_, t)| *t)
    }

    /// The command (run in a chroot of the root) that rebuilds kernel `kver`'s
    /// initramfs at `image` (a path inside the root) for any machine: not
    /// host-only (it would describe the machine it runs on, here the migration
    /// initramfs or the other slot), with LVM, since every slot's root is an LV.
    /// `exists`: whether `image` is there already (update-initramfs updates, or
    /// creates).
    pub fn command(self, kver: &str, image: &str, exists: bool) -> Vec<String> {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match self {
            InitramfsTool::InitramfsTools => v(&[
                "update-initramfs",
                if exists { "-u" } else { "-c" },
                "-k",
                kver,
            ]),
            InitramfsTool::Dracut => v(&[
                "dracut",
                "--force",
                "--no-hostonly",
                "--add",
                "lvm",
                "--kver",
                kver,
                image,
            ]),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            InitramfsTool::InitramfsTools => "update-initramfs",
            InitramfsTool::Dracut => "dracut",
        }
    }
}

/// Rebuilds the initramfs of the newest kernel in `root` with the root's own
/// tool, in a chroot: a bundle's initramfs was made on its build machine (a
/// host-only dracut image may name the build machine's root and drivers and
/// never find `VA`). Returns the kernel and the rebuilt initramfs.
pub fn rebuild_initramfs(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let (kernel, initrd) = find_kernel(root)?;
    let kver = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();
    let tool = InitramfsTool::of_root(root).with_context(|| {
        format!(
            "{} has neither update-initramfs nor dracut: its initramfs cannot be rebuilt for this machine",
            root.display()
        )
    })?;
    let image = Path::new("/").join(initrd.strip_prefix(root).unwrap_or(&initrd));
    let argv = tool.command(&kver, &image.display().to_string(), initrd.exists());
    let started = std::time::Instant::now();
    let res = Sandbox::new(root).env(NO_HOOK_ENV, "1").run(&argv);
    res.with_context(|| {
        format!(
            "rebuilding the initramfs of kernel {kver} with {}",
            tool.name()
        )
    })?;
    log::info!(
        "initramfs of kernel {kver} rebuilt for this machine with {} in {:.1} s ({} MiB)",
        tool.name(),
        started.elapsed().as_secs_f64(),
        fs::metadata(&initrd).map(|m| m.len() >> 20).unwrap_or(0)
    );
    find_kernel_in(&root.join("boot"), Some(&kver))
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

/// Bundle code on a live system (the new root's initramfs tool, `setfiles`,
/// the plan's hooks) runs chrooted in the new root inside new mount and PID
/// namespaces (util-linux `unshare`): its /proc is its own (the host's
/// `/proc/1/root` led out of any chroot), /sys is read-only, the views it is
/// given of the running system are read-only unless asked for (`/boot` for
/// labelling), and every mount vanishes with the namespace. A signed but faulty
/// bundle can then write only its own root (the target LV) and what is bound
/// in writable. /dev is the host's: the tools need it. Where `unshare` is
/// missing (an old initramfs), the same binds are made in a plain chroot.
pub struct Sandbox {
    root: PathBuf,
    binds: Vec<(bool, PathBuf, PathBuf)>,
    env: Vec<(String, String)>,
}

/// Runs inside the namespaces: `sh -c SCRIPT sandbox ROOT DEV PROC SYS [ro|rw SRC DST]... -- ARGV...`.
const SANDBOX_SCRIPT: &str = r#"set -e
R=$1; D=$2; P=$3; S=$4; shift 4
mount --bind /dev "$D"
mount -t proc proc "$P"
mount --bind /sys "$S"
mount -o remount,bind,ro "$S"
while [ "$1" != "--" ]; do
  mode=$1; src=$2; dst=$3; shift 3
  mount --bind "$src" "$dst"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$dst"; fi
done
shift
exec chroot "$R" "$@"
"#;

impl Sandbox {
    pub fn new(root: &Path) -> Sandbox {
        Sandbox {
            root: root.to_path_buf(),
            binds: Vec::new(),
            env: Vec::new(),
        }
    }

    /// `src` of the running system at `inside` (a path in the root), read-only.
    pub fn ro_bind(mut self, src: &Path, inside: &str) -> Result<Sandbox> {
        let dst = in_root(&self.root, Path::new(inside))?;
        self.binds.push((false, src.to_path_buf(), dst));
        Ok(self)
    }

    /// `src` at `inside`, writable (what the tool is there to change).
    pub fn rw_bind(mut self, src: &Path, inside: &str) -> Result<Sandbox> {
        let dst = in_root(&self.root, Path::new(inside))?;
        self.binds.push((true, src.to_path_buf(), dst));
        Ok(self)
    }

    pub fn env(mut self, k: &str, v: &str) -> Sandbox {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Runs `argv` (a path inside the root and its arguments).
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, argv: &[S]) -> Result<()> {
        // Mount points resolved inside the root: a link in the new root never
        // moves a mount onto the host.
        let mp = |d: &str| in_root(&self.root, Path::new(d));
        let (dev, proc_, sys) = (mp("dev")?, mp("proc")?, mp("sys")?);
        for d in [&dev, &proc_, &sys] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        for (_, _, dst) in &self.binds {
            fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
        }
        let mut c = if crate::cmd::find_tool(&["unshare"]).is_some() {
            let mut c = crate::cmd::cmd(
                "unshare",
                [
                    "--mount",
                    "--pid",
                    "--fork",
                    "sh",
                    "-c",
                    SANDBOX_SCRIPT,
                    "sandbox",
                ],
            );
            c.arg(&self.root).arg(&dev).arg(&proc_).arg(&sys);
            for (rw, src, dst) in &self.binds {
                c.arg(if *rw { "rw" } else { "ro" }).arg(src).arg(dst);
            }
            c.arg("--").args(argv);
            c
        } else {
            log::warn!(
                "unshare is not installed: running {} in a plain chroot",
                argv.first()
                    .map(|a| a.as_ref().to_string_lossy().into_owned())
                    .unwrap_or_default()
            );
            let mut c = crate::cmd::cmd("chroot", [self.root.as_os_str()]);
            c.args(argv);
            c
        };
        for (k, v) in &self.env {
            c.env(k, v);
        }
        // The fallback's binds, undone when `_binds` drops after the run.
        let _binds = if crate::cmd::find_tool(&["unshare"]).is_none() {
            let mut v = chroot_binds(&self.root, None)?;
            for (_, src, dst) in &self.binds {
                v.push(Mount::bind(src, dst)?);
            }
            v
        } else {
            Vec::new()
        };
        crate::cmd::CommandExt::run(&mut c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_tool_and_its_command() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(InitramfsTool::of_root(d.path()), None);
        fs::create_dir_all(d.path().join("usr/bin")).unwrap();
        fs::write(d.path().join("usr/bin/dracut"), "").unwrap();
        assert_eq!(
            InitramfsTool::of_root(d.path()),
            Some(InitramfsTool::Dracut)
        );
        let c = InitramfsTool::Dracut.command(
            "5.14.0-427.el9.x86_64",
            "/boot/initramfs-5.14.0-427.el9.x86_64.img",
            true,
        );
        assert!(c.contains(&"--no-hostonly".to_string()), "{c:?}");
        assert_eq!(
            c.last().unwrap(),
            "/boot/initramfs-5.14.0-427.el9.x86_64.img"
        );
        assert!(c.windows(2).any(|w| w == ["--add", "lvm"]), "{c:?}");
        fs::create_dir_all(d.path().join("usr/sbin")).unwrap();
        fs::write(d.path().join("usr/sbin/update-initramfs"), "").unwrap();
        assert_eq!(
            InitramfsTool::of_root(d.path()),
            Some(InitramfsTool::InitramfsTools)
        );
        assert_eq!(
            InitramfsTool::InitramfsTools.command(
                "6.12.57+deb13-amd64",
                "/boot/initrd.img-6.12.57+deb13-amd64",
                false
            ),
            ["update-initramfs", "-c", "-k", "6.12.57+deb13-amd64"]
        );
    }

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
