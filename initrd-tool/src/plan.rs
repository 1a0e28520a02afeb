//! The migration plan (`fixtures/plans/*.toml`, schema in docs/plan.md).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MIB: u64 = 1 << 20;
/// Smallest sizes a plan may ask for (below them mkfs or LVM fail).
pub const MIN_BOOT: u64 = 128 * MIB;
/// A floor against typos only: the room rules check what the payload needs.
pub const MIN_SLOT: u64 = 256 * MIB;
pub const MIN_DATA: u64 = 64 * MIB;
pub const MIN_IMAGE: u64 = 16 * MIB;
/// The EFI System Partition on a UEFI machine: FAT32 needs 65525 clusters, so
/// below about 33 MiB (512-byte clusters) it cannot be FAT32 at all; 64 MiB
/// holds shim, GRUB, the fallback loader and their updates with room to spare.
pub const MIN_ESP: u64 = 64 * MIB;
/// `sizes.esp = "auto"`: what Fedora and RHEL 9 installers make (600 MiB is
/// theirs with firmware updates; 256 MiB is the common Linux-only choice).
pub const DEFAULT_ESP: u64 = 256 * MIB;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Target disk: a device path, or `auto` for the disk holding the current root.
    #[serde(default = "auto")]
    pub disk: String,
    #[serde(default = "default_vg")]
    pub vg: String,
    #[serde(default)]
    pub sizes: Sizes,
    pub bundle: BundleRef,
    #[serde(default)]
    pub memory: Memory,
    /// Files and directories taken across, beyond the identity set (hostname,
    /// machine-id, SSH host keys, accounts) that is always carried.
    #[serde(default)]
    pub carry: Vec<Carry>,
    /// Mount points of the old system's own filesystems on the migrated disk
    /// (`/home` on its LV, `/var/tmp`, ...) whose content the migration may
    /// drop. Every such filesystem must be carried (a `[[carry]]` path on it) or
    /// listed here, or preflight refuses before anything is written.
    #[serde(default)]
    pub discard: Vec<PathBuf>,
    #[serde(default)]
    pub accounts: Accounts,
    /// Executables in the *new* root run after sync, in a chroot, with the old
    /// system's carried files visible under /run/dualroot/old.
    #[serde(default = "default_hooks")]
    pub hooks_dir: PathBuf,
    /// Kernel arguments for the new slots; default: the old system's own, minus
    /// root/initrd/rd.* and dualroot's.
    #[serde(default)]
    pub kernel_args: Option<String>,
    /// Boot tries an unconfirmed slot gets before GRUB falls back.
    #[serde(default = "default_tries")]
    pub boot_tries: u32,
    /// The appliance's model, when /etc/dualroot/model does not say it: a bundle
    /// for another model (not `any`) is refused.
    #[serde(default)]
    pub model: Option<String>,
}

fn auto() -> String {
    "auto".into()
}
fn default_vg() -> String {
    "VA".into()
}
fn default_hooks() -> PathBuf {
    "/usr/lib/dualroot/hooks.d".into()
}
fn default_tries() -> u32 {
    3
}

/// Sizes as text with a unit (`512M`, `1G`, `1GiB`, `2048MiB`), or `auto`: computed
/// from the bundle and the carried files (`capacity::resolve`). `data` defaults to
/// `auto`, so the stash always fits the bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sizes {
    pub boot: String,
    pub root: String,
    pub back: String,
    pub data: String,
    pub image: String,
    /// VG space kept free for the slots to grow into (`slot install` of a
    /// bigger OS extends the target slot from it; `data` and `image` never
    /// take it). `auto`: root + back (each slot can double), but at most half
    /// of the space the fixed LVs leave on the disk. See `layout::compute`.
    #[serde(default = "auto")]
    pub slot_reserve: String,
    /// The EFI System Partition, made on UEFI machines only (a BIOS machine
    /// gets none and the key is ignored). `auto`: [`DEFAULT_ESP`].
    #[serde(default = "auto")]
    pub esp: String,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes {
            boot: "512M".into(),
            root: "3G".into(),
            back: "3G".into(),
            data: "auto".into(),
            image: "256M".into(),
            slot_reserve: "auto".into(),
            esp: "auto".into(),
        }
    }
}

impl Sizes {
    /// Exact sizes (`auto` resolved), written back into a staged plan.
    pub fn from_bytes(b: &ByteSizes) -> Sizes {
        let t = |v: u64| format!("{v}");
        Sizes {
            boot: t(b.boot),
            root: t(b.root),
            back: t(b.back),
            data: t(b.data),
            image: t(b.image),
            // `auto` depends on the disk only: the same disk gives the same reserve.
            slot_reserve: b.slot_reserve.map_or_else(|| "auto".into(), t),
            esp: if b.esp > 0 { t(b.esp) } else { "auto".into() },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleRef {
    pub path: PathBuf,
    pub keyring: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// RAM left to the kernel and the tools while staging.
    #[serde(default = "default_reserve")]
    pub reserve: String,
    /// Working margin on top of bundle + carried files.
    #[serde(default = "default_margin")]
    pub margin: String,
    /// The undo record of the unrecoverable window (see `undo`): `auto` takes it
    /// when it fits in RAM next to the staged files, `required` refuses the
    /// migration when it does not, `off` never takes it (a failure in the window
    /// then reboots into the recovery entry).
    #[serde(default = "default_undo")]
    pub undo: UndoMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UndoMode {
    #[default]
    Auto,
    Required,
    Off,
}

fn default_undo() -> UndoMode {
    UndoMode::Auto
}

fn default_reserve() -> String {
    "128M".into()
}
fn default_margin() -> String {
    "32M".into()
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            reserve: default_reserve(),
            margin: default_margin(),
            undo: default_undo(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Carry {
    pub path: PathBuf,
    /// Where it goes in the new root; default: the same path.
    #[serde(default)]
    pub dest: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Accounts {
    /// Accounts with a UID in [people_min_uid, people_max_uid] are carried.
    #[serde(default = "default_min_uid")]
    pub people_min_uid: u32,
    #[serde(default = "default_max_uid")]
    pub people_max_uid: u32,
    /// Service (system) accounts of the appliance to carry as well.
    #[serde(default)]
    pub services: Vec<String>,
    /// Carry root's password hash.
    #[serde(default = "yes")]
    pub root_password: bool,
}

fn default_min_uid() -> u32 {
    1000
}
fn default_max_uid() -> u32 {
    59999
}
fn yes() -> bool {
    true
}

impl Default for Accounts {
    fn default() -> Self {
        Accounts {
            people_min_uid: 1000,
            people_max_uid: 59999,
            services: Vec::new(),
            root_password: true,
        }
    }
}

/// The plan's sizes in bytes (`auto` resolved by `capacity::resolve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteSizes {
    pub boot: u64,
    pub root: u64,
    pub back: u64,
    pub data: u64,
    pub image: u64,
    /// The slot reserve asked for; `None`: `auto` (resolved by `layout::compute`).
    #[serde(default)]
    pub slot_reserve: Option<u64>,
    /// The EFI System Partition; 0 on a BIOS machine (no ESP). See
    /// [`ByteSizes::for_firmware`].
    #[serde(default)]
    pub esp: u64,
}

/// How the machine boots: decides whether the layout has an ESP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Firmware {
    Bios,
    Uefi,
}

impl ByteSizes {
    /// These sizes on a machine with this firmware: an ESP of `sizes.esp` on
    /// UEFI, none on BIOS.
    pub fn for_firmware(self, fw: Firmware, plan: &Plan) -> Result<ByteSizes> {
        Ok(ByteSizes {
            esp: match fw {
                Firmware::Bios => 0,
                Firmware::Uefi => plan.esp()?,
            },
            ..self
        })
    }
}

pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("size {s:?} does not start with a number"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        u => bail!("size {s:?} has unknown unit {u:?} (use K, M, G, T or KiB, MiB, GiB, TiB)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

impl Plan {
    pub fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading plan {}", path.display()))?;
        Plan::parse(&text).with_context(|| format!("plan {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Plan> {
        let p: Plan = toml::from_str(text)?;
        p.check()?;
        Ok(p)
    }

    fn check(&self) -> Result<()> {
        let s = &self.sizes;
        for (name, text, min) in [
            ("boot", &s.boot, MIN_BOOT),
            ("root", &s.root, MIN_SLOT),
            ("back", &s.back, MIN_SLOT),
            ("data", &s.data, MIN_DATA),
            ("image", &s.image, MIN_IMAGE),
            ("slot_reserve", &s.slot_reserve, 0),
            ("esp", &s.esp, MIN_ESP),
        ] {
            if text.trim() == "auto" {
                continue;
            }
            let v = parse_size(text).with_context(|| format!("sizes.{name}"))?;
            if v < min {
                bail!(
                    "sizes.{name} is {} MiB; at least {} MiB is needed",
                    v / MIB,
                    min / MIB
                );
            }
        }
        if self.vg.is_empty()
            || !self
                .vg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '+')
        {
            bail!(
                "vg {:?} is not a valid volume group name (letters, digits, _ . +)",
                self.vg
            );
        }
        if self.disk != "auto" && !self.disk.starts_with("/dev/") {
            bail!("disk {:?} must be `auto` or a path under /dev", self.disk);
        }
        if self.boot_tries == 0 || self.boot_tries > 9 {
            bail!("boot_tries is {}; use 1 to 9", self.boot_tries);
        }
        for c in &self.carry {
            if !c.path.is_absolute() || c.dest.as_ref().is_some_and(|d| !d.is_absolute()) {
                bail!(
                    "carry path {} (and its dest) must be absolute",
                    c.path.display()
                );
            }
        }
        let m = &self.memory;
        parse_size(&m.reserve).context("memory.reserve")?;
        parse_size(&m.margin).context("memory.margin")?;
        Ok(())
    }

    /// `sizes.esp` in bytes (`auto`: [`DEFAULT_ESP`]).
    pub fn esp(&self) -> Result<u64> {
        match self.sizes.esp.trim() {
            "auto" => Ok(DEFAULT_ESP),
            t => parse_size(t).context("sizes.esp"),
        }
    }

    pub fn reserve(&self) -> u64 {
        parse_size(&self.memory.reserve).unwrap_or(128 * MIB)
    }

    pub fn margin(&self) -> u64 {
        parse_size(&self.memory.margin).unwrap_or(32 * MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[bundle]
path = "/var/lib/dualroot/stage/os.bundle"
keyring = "/etc/dualroot/keyring"
"#;

    #[test]
    fn minimal_plan_gets_defaults() {
        let p = Plan::parse(MINIMAL).unwrap();
        assert_eq!(p.disk, "auto");
        assert_eq!(p.vg, "VA");
        assert_eq!(p.boot_tries, 3);
        assert_eq!(p.sizes.boot, "512M");
        assert_eq!(
            p.sizes.data, "auto",
            "data defaults to auto: the stash always fits"
        );
        assert_eq!(p.accounts.people_min_uid, 1000);
    }

    #[test]
    fn fixture_plans_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/plans");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Plan::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Plan::parse(&format!("colour = \"red\"\n{MINIMAL}")).unwrap_err();
        assert!(format!("{e:#}").contains("colour"), "{e:#}");
        let e = Plan::parse(&format!("{MINIMAL}\n[sizes]\nboot = \"1G\"\nroot = \"4G\"\nback = \"4G\"\ndata = \"1G\"\nimage = \"1G\"\nswap = \"1G\"\n")).unwrap_err();
        assert!(format!("{e:#}").contains("swap"), "{e:#}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_size("1GiB").unwrap(), 1024 * MIB);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(format!("{:#}", parse_size("3 parsecs").unwrap_err()).contains("unknown unit"));
        assert!(parse_size("G").is_err());
        let e = Plan::parse(&format!("{MINIMAL}\n[sizes]\nboot = \"1M\"\nroot = \"4G\"\nback = \"4G\"\ndata = \"1G\"\nimage = \"1G\"\n")).unwrap_err();
        assert!(format!("{e:#}").contains("sizes.boot is 1 MiB"), "{e:#}");
        let p = Plan::parse(&format!("{MINIMAL}\n[sizes]\nboot = \"auto\"\nroot = \"auto\"\nback = \"4G\"\ndata = \"auto\"\nimage = \"1G\"\n")).unwrap();
        assert_eq!(p.sizes.root, "auto");
        let e = Plan::parse(&format!("{MINIMAL}\n[sizes]\nboot = \"1G\"\nroot = \"4G\"\nback = \"4G\"\ndata = \"lots\"\nimage = \"1G\"\n")).unwrap_err();
        assert!(format!("{e:#}").contains("sizes.data"), "{e:#}");
    }

    #[test]
    fn bad_values_named() {
        let e = Plan::parse(&format!("vg = \"my vg\"\n{MINIMAL}")).unwrap_err();
        assert!(format!("{e:#}").contains("not a valid volume group"));
        let e = Plan::parse(&format!("disk = \"sda\"\n{MINIMAL}")).unwrap_err();
        assert!(format!("{e:#}").contains("must be `auto`"));
        let e = Plan::parse(&format!("{MINIMAL}\n[[carry]]\npath = \"etc/x\"\n")).unwrap_err();
        assert!(format!("{e:#}").contains("must be absolute"));
    }
}
