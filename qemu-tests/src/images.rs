//! Guest images, built by the shell recipes in `qemu-tests/images/` and
//! cached under `$DUALROOT_CACHE` (default `/var/cache/dualroot`) keyed by a
//! hash of the recipe. Building takes minutes; a cached image is reused.

use crate::cmd;
use crate::error::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `dualroot` binary the guests get: `$DUALROOT_BIN`, else the
/// workspace's `target/release/dualroot` (scripts/build-static.sh).
pub fn dualroot_bin() -> PathBuf {
    std::env::var_os("DUALROOT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target/release/dualroot"))
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("DUALROOT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/dualroot"))
}

/// `qemu-tests/` in the source tree.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The workspace root (parent of `qemu-tests/`).
pub fn workspace_dir() -> PathBuf {
    crate_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(crate_dir)
}

/// Run one recipe under an exclusive lock (several test binaries may ask
/// for the same image at once) and return the directory it printed.
fn build(recipe: &str) -> Result<PathBuf> {
    build_with(recipe, &[])
}

fn build_with(recipe: &str, args: &[&str]) -> Result<PathBuf> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let script = crate_dir().join("images").join(recipe);
    let lock = cache.join(format!(".{recipe}.lock"));
    let out = cmd::run_stdout_passthrough(
        Command::new("flock")
            .arg(&lock)
            .arg("bash")
            .arg(&script)
            .args(args)
            .env("DUALROOT_CACHE", &cache),
    )
    .with_context(|| format!("building image with {recipe}"))?;
    let dir = out.lines().last().map(str::trim).unwrap_or_default();
    if dir.is_empty() {
        crate::bail!("{recipe} printed no image directory");
    }
    Ok(PathBuf::from(dir))
}

/// Debian 11 appliance disk with GRUB installed (see `images/legacy.sh`).
#[derive(Debug, Clone)]
pub struct LegacyImage {
    pub dir: PathBuf,
    /// Raw disk, msdos label, root on partition 1; boots via SeaBIOS+GRUB.
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl LegacyImage {
    /// The image's NVRAM (OVMF variables with its boot entry): UEFI images only.
    pub fn vars(&self) -> PathBuf {
        self.dir.join("vars.fd")
    }

    pub fn build_info(&self) -> Result<Vec<(String, String)>> {
        read_build_info(&self.dir.join("build-info"))
    }
}

pub fn legacy() -> Result<LegacyImage> {
    legacy_from(build("legacy.sh")?)
}

/// The same appliance with the CentOS 7 default layout (see `images/legacy-lvm.sh`):
/// MBR, XFS /boot on partition 1, VG `centos` (XFS root LV, swap LV) on partition 2.
pub fn legacy_lvm() -> Result<LegacyImage> {
    legacy_from(build("legacy-lvm.sh")?)
}

/// Matrix row (see `images/legacy-matrix.sh generic`): 6 GiB, MBR, ext4 /boot on
/// partition 1, VG `centos` on partition 2 with XFS root, XFS home (the old /home
/// plus `/home/admin/matrix/`, hashed in `/var/lib/matrix-home.sha256`) and swap
/// LVs, fstab by UUID, a generic dracut initramfs (`hostonly="no"`).
pub fn legacy_matrix_generic() -> Result<LegacyImage> {
    legacy_from(build_with("legacy-matrix.sh", &["generic"])?)
}

/// Matrix row (see `images/legacy-matrix.sh hostonly`): the CentOS 7 layout of
/// [`legacy_lvm`] (XFS /boot, fstab by `/dev/mapper` names, host-only dracut)
/// with an `lvm.conf` whose `global_filter` accepts only `/dev/vda2`.
pub fn legacy_matrix_hostonly() -> Result<LegacyImage> {
    legacy_from(build_with("legacy-matrix.sh", &["hostonly"])?)
}

/// The CentOS 7 EFI layout (see `images/legacy-efi.sh`): GPT, ESP on partition
/// 1 (vfat, `/boot/efi`), XFS `/boot` on 2, VG `centos` on 3 (XFS root, swap);
/// Debian's signed shim and GRUB in `\EFI\debian\` and at the removable path.
/// Boots under OVMF with its NVRAM, [`LegacyImage::vars`].
pub fn legacy_efi() -> Result<LegacyImage> {
    legacy_from(build("legacy-efi.sh")?)
}

fn legacy_from(dir: PathBuf) -> Result<LegacyImage> {
    Ok(LegacyImage {
        disk: dir.join("disk.raw"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        dir,
    })
}

/// Debian 13 tree for the bundle (see `images/newos.sh`); `root` is the tree.
#[derive(Debug, Clone)]
pub struct NewOsTree {
    pub dir: PathBuf,
    pub root: PathBuf,
}

pub fn newos() -> Result<NewOsTree> {
    let dir = build("newos.sh")?;
    Ok(NewOsTree {
        root: dir.join("root"),
        dir,
    })
}

/// The dracut variant of the new OS tree (see `images/newos-dracut.sh`); its
/// `boot/initrd.img-*` is host-only for the build machine (no LVM).
pub fn newos_dracut() -> Result<NewOsTree> {
    let dir = build("newos-dracut.sh")?;
    Ok(NewOsTree {
        root: dir.join("root"),
        dir,
    })
}

/// A second kernel package for the new OS, another flavour (see
/// `images/kernel-deb.sh`).
pub fn kernel_deb() -> Result<PathBuf> {
    build("kernel-deb.sh")
}

/// Private key the harness logs in with (root, every image).
pub fn ssh_key() -> PathBuf {
    cache_dir().join("ssh").join("id_ed25519")
}

/// `key=value` lines as written by the recipes.
pub fn parse_build_info(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn read_build_info(path: &Path) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(parse_build_info(&text))
}

/// The signed bundle of the new OS and the keys around it (see
/// `images/bundle.sh`; needs `target/release/dualroot` or `$DUALROOT_BIN`).
#[derive(Debug, Clone)]
pub struct Bundle {
    pub path: PathBuf,
    /// Directory of trusted public keys (holds `test.pub`).
    pub keyring: PathBuf,
    /// Secret key the bundle is signed with.
    pub key: PathBuf,
    /// A second secret key, not in the keyring.
    pub wrong_key: PathBuf,
}

pub fn bundle() -> Result<Bundle> {
    bundle_variant(&[])
}

/// The same new OS with another version (`<v>.2`, also in
/// /etc/dualroot-test-version), signed with the same key: the A/B upgrade.
pub fn bundle_v2() -> Result<Bundle> {
    bundle_variant(&["v2"])
}

/// The same new OS padded to about 1.5x its payload (version `<v>.3`,
/// `bundle.sh grow`): an A/B upgrade whose slot must grow.
pub fn bundle_grow() -> Result<Bundle> {
    bundle_variant(&["grow"])
}

/// The new OS with 1400 MiB of zeros added (version `<v>.4`, `bundle.sh
/// huge`): more than a slot and the slot reserve hold.
pub fn bundle_huge() -> Result<Bundle> {
    bundle_variant(&["huge"])
}

/// The new OS at the field's size (version `<v>.5`, `bundle.sh scale`): about
/// 1.8 GB compressed, 3.3 GB unpacked, random data, text and many small files.
pub fn bundle_scale() -> Result<Bundle> {
    bundle_variant(&["scale"])
}

/// The new OS with dracut and a host-only initramfs made on the build machine
/// (`images/newos-dracut.sh`): it boots only if rebuilt on the appliance.
pub fn bundle_dracut() -> Result<Bundle> {
    bundle_variant(&["dracut"])
}

/// The new OS as a tree taken from an installed EL9 machine has it: an LVM
/// devices file naming a PV the appliance does not have, `use_devicesfile = 1`
/// (`bundle.sh devicesfile`; version `<v>-devicesfile`).
#[derive(Debug, Clone)]
pub struct DevicesFileBundle {
    pub bundle: Bundle,
    /// The bundle's `/etc/lvm/devices/system.devices`, as shipped (foreign).
    pub foreign_devices: String,
}

pub fn bundle_devicesfile() -> Result<DevicesFileBundle> {
    let bundle = bundle_variant(&["devicesfile"])?;
    // bundle.sh keeps the shipped file next to the bundle
    let mut name = bundle.path.clone().into_os_string();
    name.push(".system.devices");
    let path = PathBuf::from(name);
    let foreign_devices =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(DevicesFileBundle {
        bundle,
        foreign_devices,
    })
}

fn bundle_variant(args: &[&str]) -> Result<Bundle> {
    let path = build_with("bundle.sh", args)?;
    let keys = cache_dir().join("keys");
    Ok(Bundle {
        path,
        keyring: keys.join("keyring"),
        key: keys.join("test.key"),
        wrong_key: keys.join("wrong.key"),
    })
}
