//! Carry the appliance's identity, accounts, files and NIC names into a new root.
//! One sequence, [`carry_into`], used by both drivers: the migration (old side: the
//! files it carried in RAM and stashed) and `slot install` (old side: the running
//! slot). Every piece is re-runnable: the new root's pristine account files are
//! saved once in the scratch directory and every merge starts from them.

use crate::accounts::{self, AccountFiles, Merged};
use crate::bundle::create::write_tar;
use crate::bundle::unpack::{extract_tar, OwnerMap};
use crate::fsutil::in_root;
use crate::lvm_devices::PvRow;
use crate::plan::{Carry, Plan};
use crate::sysinfo::Nic;
use anyhow::{Context, Result};
use fs_err as fs;
use log::info;
use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

const ACCOUNT_FILES: [&str; 4] = ["passwd", "shadow", "group", "gshadow"];
pub const NIC_NAMES: &str = "etc/dualroot/nic-names.toml";
pub const NIC_UNIT: &str = "etc/systemd/system/dualroot-nic-names.service";
pub const DUALROOT_BIN: &str = "usr/local/sbin/dualroot";
/// Trusted bundle keys on an installed slot (`slot install`'s default keyring).
pub const KEYRING: &str = "etc/dualroot/keyring";

/// Always carried: identity and accounts (the plan's carry list comes on top).
pub const IDENTITY_FILES: &[&str] = &[
    "etc/hostname",
    "etc/hosts",
    "etc/machine-id",
    "etc/passwd",
    "etc/shadow",
    "etc/group",
    "etc/gshadow",
    "etc/ssh",
    // dualroot's own settings (health check, NIC pins, trusted keys, agent config).
    "etc/dualroot",
];

/// What the migration carries whatever the plan says, present under `root`, as
/// paths relative to it: [`IDENTITY_FILES`] and the agent's state (device id,
/// token, journal; not its downloads, which may hold the very bundle being
/// staged and would double the RAM the staging needs).
pub fn identity_items(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = IDENTITY_FILES
        .iter()
        .map(PathBuf::from)
        .filter(|p| fs::symlink_metadata(root.join(p)).is_ok())
        .collect();
    if let Ok(rd) = fs::read_dir(root.join(AGENT_STATE_OLD)) {
        let mut agent: Vec<PathBuf> = rd
            .flatten()
            .filter(|e| e.file_name() != "downloads")
            .map(|e| Path::new(AGENT_STATE_OLD).join(e.file_name()))
            .collect();
        agent.sort();
        v.extend(agent);
    }
    v
}

/// The agent's state directory on a system without the data LV.
pub const AGENT_STATE_OLD: &str = "var/lib/dualroot-agent";
/// The migration's stash on the data LV (`/data/dualroot/migration` on a slot):
/// the bundle, the carried files (shadow, SSH host keys, tokens), the plan, the
/// keyring, the journal and the log.
pub const STASH_DIR: &str = "dualroot/migration";

/// What stays in the stash after the first confirmed boot: the record of what
/// happened, and the plan (`slot install` takes its carry list from it). No
/// secrets in any of them.
const STASH_KEEP: &[&str] = &[
    "journal.json",
    "migration.log",
    "manifest.toml",
    "plan.toml",
];

/// After the new OS's first confirmed boot nothing can resume the migration any
/// more, so the stash's copies of the old system's secrets and the bundle go;
/// the journal and the log stay for people and the agent. Returns what was
/// removed. The directory stays 0700 whatever is left.
pub fn clear_stash(data_root: &Path) -> Result<Vec<String>> {
    let st = data_root.join(STASH_DIR);
    let rd = match fs::read_dir(&st) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", st.display())),
    };
    let mut removed = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("listing {}", st.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if STASH_KEEP.contains(&name.as_str()) {
            continue;
        }
        let p = e.path();
        let res = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        res.with_context(|| format!("removing {}", p.display()))?;
        removed.push(name);
    }
    crate::fsutil::set_mode(&st, 0o700)?;
    removed.sort();
    Ok(removed)
}

/// The agent's state directory on the data LV (`/data/dualroot-agent` on a slot).
pub const AGENT_STATE_DATA: &str = "dualroot-agent";

/// Puts the old system's agent state (device id, token, journal, downloads) on
/// the data LV mounted at `data_root`, so the agent on every slot keeps its
/// identity and sees one journal. State already there is kept. Returns whether
/// there was any to carry.
pub fn carry_agent_state(old: &Path, data_root: &Path, scratch: &Path) -> Result<bool> {
    if fs::symlink_metadata(old.join(AGENT_STATE_OLD)).is_err()
        || data_root.join(AGENT_STATE_DATA).exists()
    {
        return Ok(false);
    }
    let n = copy_items(
        old,
        data_root,
        &[(
            PathBuf::from(AGENT_STATE_OLD),
            PathBuf::from(AGENT_STATE_DATA),
        )],
        &OwnerMap::default(),
        scratch,
    )?;
    info!("agent: {n} entries of its state carried to the data LV ({AGENT_STATE_DATA})");
    Ok(true)
}

/// Where the carried things come from, and what the new root is.
pub struct CarrySource<'a> {
    /// The old system's files: the carried tree (migration) or `/` (slot install).
    pub old: &'a Path,
    /// Room for the pristine account files and temporary tars; kept between
    /// re-runs of the same sync.
    pub scratch: &'a Path,
    /// Carry list, account policy, VG and hooks.
    pub plan: &'a Plan,
    /// The LV the new root lives on (for its fstab).
    pub lv: &'a str,
    /// NICs to pin by MAC; `None` keeps the pins carried in /etc/dualroot.
    pub nics: Option<&'a [Nic]>,
    /// Keys the new root trusts when the old side had none in /etc/dualroot.
    pub keyring: Option<&'a Path>,
    /// This machine's PVs (`lvm_devices::pv_rows`), asked for only when the new
    /// root has an LVM devices file to rewrite.
    pub pvs: &'a dyn Fn() -> Result<Vec<PvRow>>,
}

/// The whole sync into `new`. `after_accounts` runs once the account files are
/// rewritten (the migration's power-cut failpoint). Returns notes for the journal.
pub fn carry_into(new: &Path, src: &CarrySource, after_accounts: &dyn Fn()) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    fs::create_dir_all(src.scratch)
        .with_context(|| format!("creating {}", src.scratch.display()))?;
    let merged = sync_accounts(
        src.old,
        new,
        &src.scratch.join("new-accounts"),
        &src.plan.accounts,
    )
    .context("merging accounts")?;
    for n in &merged.notes {
        info!("accounts: {n}");
    }
    notes.extend(merged.notes.iter().cloned());
    after_accounts();
    let owners = owner_map_by_name(src.old, &merged)?;
    sync_identity(src.old, new, &owners, src.scratch)?;
    sync_carry(src.old, new, &src.plan.carry, &owners, src.scratch)?;
    match src.nics {
        Some(nics) => notes.push(write_nic_pins(new, nics)?),
        None if in_root(new, Path::new(NIC_NAMES))?.exists() => write_nic_unit(new)?,
        None => {}
    }
    write_fstab(new, &src.plan.vg, src.lv)?;
    // Before the boot step rebuilds the slot's initramfs, which copies the file.
    if let Some(n) = crate::lvm_devices::fix_in_root(new, &src.plan.vg, src.pvs)? {
        notes.push(n);
    }
    install_self(new)?;
    write_confirm_unit(new)?;
    // The slot's own kernel and GRUB updates keep the A/B menu.
    let hooks = crate::distro_hooks::install(new)?;
    info!("{hooks}");
    notes.push(hooks);
    notes.push(finish_new_root(
        new,
        src.keyring,
        &src.plan.hooks_dir,
        src.old,
    )?);
    nix::unistd::sync();
    Ok(notes)
}

/// The last writes into a new root, then its SELinux label: the keyring later
/// `slot install`s check bundles against, the plan's hooks (which may write
/// NetworkManager keyfiles and the like), and only then `setfiles`, so nothing
/// written into the root stays unlabelled on an enforcing system. Returns the
/// labelling sentence for the journal.
pub fn finish_new_root(
    new: &Path,
    trusted: Option<&Path>,
    hooks_dir: &Path,
    old: &Path,
) -> Result<String> {
    // Later `slot install`s check bundles against the keys the migration trusted.
    let keyring = in_root(new, Path::new(KEYRING))?;
    if let (Some(k), false) = (trusted, keyring.exists()) {
        fs::create_dir_all(&keyring).with_context(|| format!("creating {}", keyring.display()))?;
        for e in fs::read_dir(k)? {
            let e = e?;
            if e.file_type()?.is_file() {
                let rel = Path::new(KEYRING).join(e.file_name());
                fs::copy(e.path(), in_root(new, &rel)?)?;
            }
        }
    }
    run_hooks(new, hooks_dir, old)?;
    let (labels, _) = crate::selinux::label(new)?;
    info!("{labels}");
    Ok(labels)
}

fn read_accounts(dir: &Path) -> Result<AccountFiles> {
    let r = |n: &str| fs::read_to_string(dir.join(n)).unwrap_or_default();
    let files = AccountFiles {
        passwd: r("passwd"),
        shadow: r("shadow"),
        group: r("group"),
        gshadow: r("gshadow"),
    };
    if files.passwd.is_empty() {
        anyhow::bail!("{} has no passwd", dir.display());
    }
    Ok(files)
}

/// In the pristine directory: `sha256  name` of every account file taken from the
/// new root (`sha256sum -c` reads it), written last. Without a valid one the set is
/// incomplete (a power cut while taking it leaves empty or partial files) and is
/// taken again.
pub const PRISTINE_MANIFEST: &str = "complete.sha256";

/// Whether `pristine` holds a complete set: the manifest names `passwd`, every file
/// it names has its hash, and no account file it does not name is there.
fn pristine_complete(pristine: &Path) -> Result<()> {
    let path = pristine.join(PRISTINE_MANIFEST);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut listed = BTreeMap::new();
    for line in text.lines() {
        let (hash, name) = line
            .split_once("  ")
            .with_context(|| format!("{}: malformed line {line:?}", path.display()))?;
        anyhow::ensure!(
            ACCOUNT_FILES.contains(&name),
            "{} names {name:?}, not an account file",
            path.display()
        );
        listed.insert(name, hash);
    }
    anyhow::ensure!(
        listed.contains_key("passwd"),
        "{} does not name passwd",
        path.display()
    );
    for f in ACCOUNT_FILES {
        let p = pristine.join(f);
        match listed.get(f) {
            Some(want) => {
                let have = crate::fsutil::file_sha256(&p)?;
                anyhow::ensure!(
                    have == *want,
                    "{} has sha256 {have}, the manifest says {want}",
                    p.display()
                );
            }
            None => anyhow::ensure!(
                fs::symlink_metadata(&p).is_err(),
                "{} is there but not in the manifest",
                p.display()
            ),
        }
    }
    Ok(())
}

/// Saves the new root's account files to `pristine` unless a complete set is
/// there. Each file is written atomically (temp file, fsync, rename, fsync of the
/// directory) and the manifest last, so a power cut at any point leaves either a
/// complete set or one that is taken again. The caller rewrites the new root's
/// account files only after this returns: until then they are still pristine, so
/// taking them again gives the same set.
fn take_pristine(new: &Path, pristine: &Path) -> Result<()> {
    let why = match pristine_complete(pristine) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    if pristine.exists() {
        info!("accounts: taking the new root's pristine account files again ({why:#})");
    } else {
        let parent = pristine
            .parent()
            .with_context(|| format!("{} has no parent directory", pristine.display()))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(pristine)
            .with_context(|| format!("creating {}", pristine.display()))?;
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", parent.display()))?;
    }
    // The new OS's shadow may hold a hash: the copies are for root alone.
    crate::fsutil::set_mode(pristine, 0o700)?;
    // No manifest may describe a set while it is being replaced.
    let manifest = pristine.join(PRISTINE_MANIFEST);
    if fs::symlink_metadata(&manifest).is_ok() {
        fs::remove_file(&manifest)?;
    }
    let mut sums = String::new();
    for f in ACCOUNT_FILES {
        let src = in_root(new, &Path::new("etc").join(f))?;
        let dst = pristine.join(f);
        if src.is_file() {
            let data = fs::read(&src).with_context(|| format!("saving {}", src.display()))?;
            anyhow::ensure!(
                !(f == "passwd" && data.is_empty()),
                "the new root's {} is empty",
                src.display()
            );
            crate::fsutil::write_atomic(&dst, &data)?;
            sums.push_str(&format!("{}  {f}\n", crate::fsutil::file_sha256(&dst)?));
        } else {
            anyhow::ensure!(f != "passwd", "the new root has no {}", src.display());
            if fs::symlink_metadata(&dst).is_ok() {
                fs::remove_file(&dst)?;
            }
        }
    }
    crate::fsutil::write_atomic(&manifest, sums.as_bytes())
}

/// Merges the old accounts into the new root's. The new root's own files are saved
/// once to `pristine` (completely, or taken again) so a re-run merges from the
/// same input.
pub fn sync_accounts(
    old: &Path,
    new: &Path,
    pristine: &Path,
    policy: &crate::plan::Accounts,
) -> Result<Merged> {
    take_pristine(new, pristine).context("saving the new root's pristine account files")?;
    let merged = accounts::merge(
        &read_accounts(&old.join("etc"))?,
        &read_accounts(pristine)?,
        policy,
    )?;
    let shadow_gid = accounts::parse_group(&merged.files.group)?
        .into_iter()
        .find(|g| g.name == "shadow")
        .map(|g| g.gid)
        .unwrap_or(0);
    for (f, text, mode, gid) in [
        ("passwd", &merged.files.passwd, 0o644, 0),
        ("group", &merged.files.group, 0o644, 0),
        ("shadow", &merged.files.shadow, 0o640, shadow_gid),
        ("gshadow", &merged.files.gshadow, 0o640, shadow_gid),
    ] {
        let p = in_root(new, &Path::new("etc").join(f))?;
        crate::fsutil::write_atomic(&p, text.as_bytes())?;
        std::os::unix::fs::chown(&p, Some(0), Some(gid))?;
        fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(merged)
}

/// Old owner -> new owner for every name present in both the old and the merged
/// databases: carried files are re-owned by name, never by number.
pub fn owner_map_by_name(old: &Path, merged: &Merged) -> Result<OwnerMap> {
    let old_users = accounts::parse_passwd(&fs::read_to_string(old.join("etc/passwd"))?)?;
    let old_groups = accounts::parse_group(&fs::read_to_string(old.join("etc/group"))?)?;
    let new_users: BTreeMap<String, u32> = accounts::parse_passwd(&merged.files.passwd)?
        .into_iter()
        .map(|u| (u.name, u.uid))
        .collect();
    let new_groups: BTreeMap<String, u32> = accounts::parse_group(&merged.files.group)?
        .into_iter()
        .map(|g| (g.name, g.gid))
        .collect();
    Ok(OwnerMap {
        uid: old_users
            .iter()
            .filter_map(|u| new_users.get(&u.name).map(|n| (u.uid, *n)))
            .collect(),
        gid: old_groups
            .iter()
            .filter_map(|g| new_groups.get(&g.name).map(|n| (g.gid, *n)))
            .collect(),
    })
}

/// Copies `items` (path under `old`, destination path in the new root) into `new`,
/// keeping modes and xattrs, re-owning by name. Goes through a tar on the data LV
/// so the same code restores everything `bundle create` records.
fn copy_items(
    old: &Path,
    new: &Path,
    items: &[(PathBuf, PathBuf)],
    owners: &OwnerMap,
    scratch: &Path,
) -> Result<u64> {
    let present: Vec<(PathBuf, PathBuf)> = items
        .iter()
        .filter(|(src, _)| {
            fs::symlink_metadata(old.join(src.strip_prefix("/").unwrap_or(src))).is_ok()
        })
        .map(|(src, dst)| (old.join(src.strip_prefix("/").unwrap_or(src)), dst.clone()))
        .collect();
    if present.is_empty() {
        return Ok(0);
    }
    let tmp = scratch.join("copy.tar");
    let (f, _) = write_tar(std::io::BufWriter::new(fs::File::create(&tmp)?), &present)?;
    f.into_inner().map_err(|e| e.into_error())?;
    let n = extract_tar(fs::File::open(&tmp)?, new, Some(owners))?;
    fs::remove_file(&tmp)?;
    Ok(n)
}

/// Hostname, hosts, machine-id, SSH host keys (modes kept) and dualroot's own
/// settings in /etc/dualroot. `scratch` holds a temporary tar.
pub fn sync_identity(old: &Path, new: &Path, owners: &OwnerMap, scratch: &Path) -> Result<()> {
    let mut items: Vec<(PathBuf, PathBuf)> = [
        "etc/hostname",
        "etc/hosts",
        "etc/machine-id",
        "etc/dualroot",
    ]
    .iter()
    .map(|p| (PathBuf::from(p), PathBuf::from(p)))
    .collect();
    if let Ok(rd) = fs::read_dir(old.join("etc/ssh")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("ssh_host_") {
                let p = PathBuf::from("etc/ssh").join(&name);
                items.push((p.clone(), p));
            }
        }
    }
    let n = copy_items(old, new, &items, owners, scratch)?;
    info!("identity: {n} entries (hostname, hosts, machine-id, SSH host keys, /etc/dualroot)");
    Ok(())
}

/// The plan's carry list, each to its destination.
pub fn sync_carry(
    old: &Path,
    new: &Path,
    carry: &[Carry],
    owners: &OwnerMap,
    scratch: &Path,
) -> Result<()> {
    let items: Vec<(PathBuf, PathBuf)> = carry
        .iter()
        .map(|c| {
            (
                c.path.clone(),
                c.dest.clone().unwrap_or_else(|| c.path.clone()),
            )
        })
        .collect();
    let n = copy_items(old, new, &items, owners, scratch)?;
    info!("carry: {n} entries copied into the new root");
    Ok(())
}

/// The NIC name pins as TOML: one `[[nic]]` per interface.
pub fn render_nic_pins(nics: &[Nic]) -> String {
    let mut s =
        String::from("# Written by dualroot during migration: interface names pinned by MAC.\n");
    for n in nics {
        s.push_str(&format!(
            "\n[[nic]]\nname = \"{}\"\nmac = \"{}\"\n# driver {} at {}\n",
            n.name, n.mac, n.driver, n.bus
        ));
    }
    s
}

pub fn nic_unit() -> String {
    format!(
        "[Unit]\nDescription=dualroot: keep network interface names on the same MACs\nDefaultDependencies=no\nAfter=systemd-udev-settle.service\nWants=systemd-udev-settle.service\nBefore=network-pre.target networking.service systemd-networkd.service NetworkManager.service\nWants=network-pre.target\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/{DUALROOT_BIN} nic-pin /{NIC_NAMES}\n\n[Install]\nWantedBy=multi-user.target\n"
    )
}

/// Pins names by MAC with a unit that renames interfaces before networking starts.
/// systemd .link files cannot swap two kernel names (renaming into the kernel's own
/// `ethN` namespace fails when the name is taken), so `dualroot nic-pin` renames
/// through temporary names itself.
pub fn write_nic_pins(new: &Path, nics: &[Nic]) -> Result<String> {
    fs::write(in_root(new, Path::new(NIC_NAMES))?, render_nic_pins(nics))?;
    write_nic_unit(new)?;
    let line = nics
        .iter()
        .map(|n| format!("{}={}", n.name, n.mac))
        .collect::<Vec<_>>()
        .join(", ");
    info!("nics: pinned {line}");
    Ok(format!("NIC names pinned by MAC: {line}"))
}

/// The unit that applies /etc/dualroot/nic-names.toml, enabled.
pub fn write_nic_unit(new: &Path) -> Result<()> {
    install_enabled_unit(new, NIC_UNIT, &nic_unit())
}

/// Writes a unit file (path relative to the root) and enables it for
/// multi-user.target, as `systemctl enable` would, without running systemctl.
fn install_enabled_unit(new: &Path, unit: &str, text: &str) -> Result<()> {
    fs::write(in_root(new, Path::new(unit))?, text)?;
    let name = Path::new(unit)
        .file_name()
        .context("unit path has no file name")?;
    let link = in_root(
        new,
        &Path::new("etc/systemd/system/multi-user.target.wants").join(name),
    )?;
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(Path::new("/").join(unit), &link)?;
    Ok(())
}

pub fn render_fstab(vg: &str, lv: &str) -> String {
    format!(
        "# Written by dualroot. This slot's root is the LV {vg}/{lv}.\n/dev/mapper/{vg}-{lv} / ext4 errors=remount-ro 0 1\nLABEL=boot /boot ext4 defaults 0 2\n/dev/mapper/{vg}-data /data ext4 defaults,nofail 0 2\n/dev/mapper/{vg}-image /image ext4 defaults,nofail 0 2\n"
    )
}

pub fn write_fstab(new: &Path, vg: &str, lv: &str) -> Result<()> {
    for d in ["data", "image", "boot"] {
        fs::create_dir_all(in_root(new, Path::new(d))?)?;
    }
    fs::write(in_root(new, Path::new("etc/fstab"))?, render_fstab(vg, lv))
        .context("writing the new root's fstab")
}

pub const CONFIRM_UNIT: &str = "etc/systemd/system/dualroot-confirm.service";

/// Confirms the slot once the system reached multi-user and the health check
/// (/etc/dualroot/health.toml) passed: until then the slot is "trying" and GRUB
/// counts its boots.
pub fn confirm_unit() -> String {
    format!(
        "[Unit]\nDescription=dualroot: health check, then confirm this slot\nAfter=multi-user.target data.mount image.mount\n\n[Service]\nType=oneshot\nExecStart=/{DUALROOT_BIN} slot health-check\n\n[Install]\nWantedBy=multi-user.target\n"
    )
}

pub fn write_confirm_unit(new: &Path) -> Result<()> {
    install_enabled_unit(new, CONFIRM_UNIT, &confirm_unit())
}

/// The running (static) dualroot goes into the new root for `slot` and `nic-pin`.
pub fn install_self(new: &Path) -> Result<()> {
    let exe = fs::read_link("/proc/self/exe").context("locating the running dualroot")?;
    let dst = in_root(new, Path::new(DUALROOT_BIN))?;
    fs::copy(&exe, &dst)
        .with_context(|| format!("copying {} to {}", exe.display(), dst.display()))?;
    fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Runs the new OS's translation hooks in a chroot; the old system's carried files
/// are visible at /run/dualroot/old inside it. A failing hook fails the step.
pub fn run_hooks(new: &Path, hooks_dir: &Path, old: &Path) -> Result<()> {
    let dir = new.join(hooks_dir.strip_prefix("/").unwrap_or(hooks_dir));
    let mut hooks: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                fs::metadata(p)
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
            .collect(),
        Err(_) => return Ok(()),
    };
    hooks.sort();
    if hooks.is_empty() {
        return Ok(());
    }
    // The old system's files are there to read: read-only.
    let sandbox = crate::bootfiles::Sandbox::new(new)
        .ro_bind(old, "run/dualroot/old")?
        .env("DUALROOT_OLD", "/run/dualroot/old");
    for h in &hooks {
        let inside = Path::new("/").join(h.strip_prefix(new).unwrap_or(h));
        info!("hook: running {}", inside.display());
        sandbox
            .run(&[inside.as_os_str()])
            .with_context(|| format!("hook {}", inside.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_pins_render_name_and_mac() {
        let nics = vec![
            Nic {
                name: "eth0".into(),
                mac: "52:54:00:12:34:56".into(),
                driver: "virtio_net".into(),
                bus: "0000:00:03.0".into(),
            },
            Nic {
                name: "eth1".into(),
                mac: "52:54:00:ab:cd:ef".into(),
                driver: "e1000".into(),
                bus: "0000:00:04.0".into(),
            },
        ];
        let t = render_nic_pins(&nics);
        let parsed: toml::Table = toml::from_str(&t).unwrap();
        let arr = parsed["nic"].as_array().unwrap();
        assert_eq!(arr.len(), 2);
        assert_eq!(arr[1]["name"].as_str(), Some("eth1"));
        assert_eq!(arr[1]["mac"].as_str(), Some("52:54:00:ab:cd:ef"));
        assert!(nic_unit()
            .contains("ExecStart=/usr/local/sbin/dualroot nic-pin /etc/dualroot/nic-names.toml"));
        assert!(nic_unit().contains("Before=network-pre.target networking.service"));
    }

    #[test]
    fn units_are_written_and_enabled() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc/systemd/system")).unwrap();
        write_confirm_unit(d.path()).unwrap();
        write_nic_unit(d.path()).unwrap();
        write_nic_unit(d.path()).unwrap(); // re-runnable
        let wants = d.path().join("etc/systemd/system/multi-user.target.wants");
        assert_eq!(
            fs::read_link(wants.join("dualroot-confirm.service")).unwrap(),
            Path::new("/etc/systemd/system/dualroot-confirm.service")
        );
        assert_eq!(
            fs::read_link(wants.join("dualroot-nic-names.service")).unwrap(),
            Path::new("/etc/systemd/system/dualroot-nic-names.service")
        );
        assert!(fs::read_to_string(d.path().join(CONFIRM_UNIT))
            .unwrap()
            .contains("slot health-check"));
    }

    #[test]
    fn a_new_root_linking_out_cannot_make_sync_write_outside() {
        // F6: a bundle whose /etc is a link to the running system's /etc (here a
        // stand-in) must not get the running system's account files rewritten.
        let d = tempfile::tempdir().unwrap();
        let host = d.path().join("host");
        let old = d.path().join("old");
        let new = d.path().join("new");
        for p in [host.join("etc"), old.join("etc"), new.clone()] {
            fs::create_dir_all(p).unwrap();
        }
        fs::write(host.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::write(host.join("etc/shadow"), "root:HOST:1::::::\n").unwrap();
        fs::write(old.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::write(old.join("etc/shadow"), "root:OLD:1::::::\n").unwrap();
        fs::write(old.join("etc/group"), "root:x:0:\n").unwrap();
        std::os::unix::fs::symlink(host.join("etc"), new.join("etc")).unwrap();
        let _ = sync_accounts(&old, &new, &d.path().join("pristine"), &Default::default());
        write_fstab(&new, "VA", "root").unwrap();
        assert_eq!(
            fs::read_to_string(host.join("etc/shadow")).unwrap(),
            "root:HOST:1::::::\n"
        );
        assert!(
            !host.join("etc/fstab").exists(),
            "fstab went through the link"
        );
    }

    #[test]
    fn agent_state_goes_to_the_data_lv_once() {
        let d = tempfile::tempdir().unwrap();
        let old = d.path().join("old");
        let data = d.path().join("data");
        let scratch = d.path().join("scratch");
        for p in [old.join(AGENT_STATE_OLD), data.clone(), scratch.clone()] {
            fs::create_dir_all(p).unwrap();
        }
        fs::write(
            old.join(AGENT_STATE_OLD).join("device.json"),
            "{\"id\":\"dev-7\"}",
        )
        .unwrap();
        assert!(carry_agent_state(&old, &data, &scratch).unwrap());
        assert_eq!(
            fs::read_to_string(data.join(AGENT_STATE_DATA).join("device.json")).unwrap(),
            "{\"id\":\"dev-7\"}"
        );
        // A resume (or a later slot) never overwrites what the agent wrote since.
        fs::write(data.join(AGENT_STATE_DATA).join("device.json"), "newer").unwrap();
        assert!(!carry_agent_state(&old, &data, &scratch).unwrap());
        assert_eq!(
            fs::read_to_string(data.join(AGENT_STATE_DATA).join("device.json")).unwrap(),
            "newer"
        );
    }

    #[test]
    fn fstab_names_slot_lv() {
        let f = render_fstab("VA", "back");
        assert!(f.contains("/dev/mapper/VA-back / ext4"));
        assert!(f.contains("LABEL=boot /boot"));
    }

    /// An old root with `admin` at 1000 and a new root with `admin` at 1001 and
    /// a `shadow` group, under `dir`.
    fn account_roots(dir: &Path) -> (PathBuf, PathBuf) {
        let old = dir.join("old");
        let new = dir.join("new");
        fs::create_dir_all(old.join("etc")).unwrap();
        fs::create_dir_all(new.join("etc")).unwrap();
        fs::write(
            old.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nadmin:x:1000:1000::/home/admin:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            old.join("etc/shadow"),
            "root:$6$r:1::::::\nadmin:$6$a:1::::::\n",
        )
        .unwrap();
        fs::write(old.join("etc/group"), "root:x:0:\nadmin:x:1000:\n").unwrap();
        fs::write(
            new.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nadmin:x:1001:1001::/home/admin:/bin/sh\n",
        )
        .unwrap();
        fs::write(new.join("etc/shadow"), "root:*:1::::::\nadmin:!:1::::::\n").unwrap();
        fs::write(
            new.join("etc/group"),
            "root:x:0:\nshadow:x:42:\noperators:x:1000:\nadmin:x:1001:\n",
        )
        .unwrap();
        (old, new)
    }

    #[test]
    fn accounts_and_owners_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let (old, new) = account_roots(d.path());
        let pristine = d.path().join("pristine");
        let m1 = sync_accounts(&old, &new, &pristine, &Default::default()).unwrap();
        // Idempotent: a second run merges from the saved pristine files.
        let m2 = sync_accounts(&old, &new, &pristine, &Default::default()).unwrap();
        assert_eq!(m1.files, m2.files);
        assert!(fs::read_to_string(new.join("etc/shadow"))
            .unwrap()
            .contains("admin:$6$a:"));
        let o = owner_map_by_name(&old, &m1).unwrap();
        assert_eq!(o.uid[&1000], 1001);
        assert_eq!(o.gid[&1000], 1001);
    }

    #[test]
    fn a_pristine_set_cut_by_a_power_failure_is_taken_again() {
        // What a clean run merges.
        let clean = tempfile::tempdir().unwrap();
        let (old, new) = account_roots(clean.path());
        let want = sync_accounts(&old, &new, &clean.path().join("p"), &Default::default())
            .unwrap()
            .files;
        let pristine_mode = fs::metadata(clean.path().join("p")).unwrap().permissions();
        assert_eq!(pristine_mode.mode() & 0o777, 0o700);
        assert!(clean.path().join("p").join(PRISTINE_MANIFEST).exists());
        // What a power cut during the first take can leave: an empty passwd (the
        // copy's data never reached the disk), or a partial one and no shadow.
        let torn: [&[(&str, &str)]; 3] = [
            &[("passwd", "")],
            &[
                ("passwd", "root:x:0:0::/root:/bin/sh\n"),
                ("group", "root:x:0:\n"),
            ],
            // A manifest of an earlier take whose files no longer match it.
            &[
                ("passwd", "root:x:0:0::/root:/bin/sh\n"),
                (PRISTINE_MANIFEST, "0000  passwd\n"),
            ],
        ];
        for files in torn {
            let d = tempfile::tempdir().unwrap();
            let (old, new) = account_roots(d.path());
            let pristine = d.path().join("p");
            fs::create_dir_all(&pristine).unwrap();
            for (name, text) in files {
                fs::write(pristine.join(name), text).unwrap();
            }
            let got = sync_accounts(&old, &new, &pristine, &Default::default())
                .unwrap_or_else(|e| panic!("{files:?}: {e:#}"));
            assert_eq!(got.files, want, "{files:?}");
            assert_eq!(
                fs::read_to_string(new.join("etc/passwd")).unwrap(),
                want.passwd
            );
            // The set taken again is complete: a resume after the rewrite of the
            // new root's files merges from it, not from the merged files.
            pristine_complete(&pristine).unwrap();
            let again = sync_accounts(&old, &new, &pristine, &Default::default()).unwrap();
            assert_eq!(again.files, want, "{files:?}");
        }
    }

    /// Issue 23 item 5: after the first confirmed boot the stash keeps only its
    /// record; the carried secrets and the bundle are gone, the directory 0700.
    #[test]
    fn clear_stash_keeps_the_record_and_drops_the_secrets() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let st = d.path().join(STASH_DIR);
        fs::create_dir_all(st.join("old/etc")).unwrap();
        fs::create_dir_all(st.join("keyring")).unwrap();
        for f in [
            "journal.json",
            "migration.log",
            "manifest.toml",
            "carry.tar",
            "os.bundle",
            "plan.toml",
            "nics.json",
        ] {
            fs::write(st.join(f), f).unwrap();
        }
        fs::write(st.join("old/etc/shadow"), "root:$6$x:1::::::\n").unwrap();
        crate::fsutil::set_mode(&st, 0o755).unwrap();
        let removed = clear_stash(d.path()).unwrap();
        assert_eq!(
            removed,
            ["carry.tar", "keyring", "nics.json", "old", "os.bundle"]
        );
        let mut left: Vec<String> = fs::read_dir(&st)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "journal.json",
                "manifest.toml",
                "migration.log",
                "plan.toml"
            ]
        );
        assert_eq!(
            fs::metadata(&st).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(clear_stash(d.path()).unwrap().is_empty(), "idempotent");
        assert!(clear_stash(&d.path().join("none")).unwrap().is_empty());
    }
}
