//! UEFI: what the firmware booted, and the boot chains dualroot puts on the
//! new EFI System Partition.
//!
//! Two chains go onto the new ESP. Inside the window, the **recovery chain** is
//! the old system's own signed shim and GRUB, copied from the old ESP into RAM
//! before the point of no return: signed images are self-contained (a vendor
//! signs only a GRUB with its modules built in), so they boot from the new ESP
//! and, under Secure Boot, keep booting; it gets a firmware entry of its own
//! (`dualroot-recovery`). In `boot`, the **new OS's chain** is installed by the
//! new root's own `grub-install` (signed where the new OS ships it signed) under
//! slot a's `\EFI\dualroot-a\` (each slot has its own: `slot::chain`). A chain
//! is also put at the removable path `\EFI\BOOT\BOOTX64.EFI`, which firmware
//! boots when NVRAM holds no working entry (a hypervisor that resets NVRAM, a
//! stale entry for the old ESP). Next to every GRUB image sits a `grub.cfg`
//! stub that finds `/boot` by its label and reads dualroot's generated
//! `grub.cfg` there: GRUB's environment block stays on ext4 `/boot`, where GRUB
//! can write it, never on FAT.

use crate::sbat::pe_is_signed;
use anyhow::{bail, Context, Result};
use fs_err as fs;
use std::path::{Path, PathBuf};

/// The new OS's UEFI boot files dualroot looks for in a bundle: Debian's signed
/// shim and GRUB (what its `grub-install --uefi-secure-boot` copies to the ESP)
/// and GRUB's x86_64-efi modules (an unsigned `grub-install` builds from them).
pub const SIGNED_SHIM: &str = "usr/lib/shim/shimx64.efi.signed";
pub const SIGNED_GRUB: &str = "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed";
pub const EFI_MODULES: &str = "usr/lib/grub/x86_64-efi/normal.mod";
pub const NEW_OS_EFI_FILES: [&str; 3] = [SIGNED_SHIM, SIGNED_GRUB, EFI_MODULES];

/// Whether the new OS (the payload's `efi_files`) can boot this UEFI machine:
/// under Secure Boot only with its signed shim and GRUB; otherwise also with a
/// GRUB its `grub-install` builds. One sentence either way.
pub fn check_new_os(
    found: &std::collections::BTreeSet<String>,
    secure_boot: bool,
) -> Result<String> {
    let signed = found.contains(SIGNED_SHIM) && found.contains(SIGNED_GRUB);
    if signed {
        return Ok(format!(
            "the new OS installs its signed shim and GRUB into the ESP (Secure Boot {})",
            if secure_boot { "enforcing" } else { "off" }
        ));
    }
    if secure_boot {
        bail!(
            "Secure Boot is enforcing on this machine, but the bundle's OS ships no signed shim and GRUB ({SIGNED_SHIM}, {SIGNED_GRUB}): the firmware would refuse to boot it, so the migration is refused and nothing was changed"
        );
    }
    if found.contains(EFI_MODULES) {
        return Ok("the new OS's grub-install builds its GRUB for x86_64-efi (unsigned: Secure Boot is off)".into());
    }
    bail!(
        "this machine boots with UEFI, but the bundle's OS has no GRUB for it (neither {EFI_MODULES} nor {SIGNED_GRUB}): it could not boot, so the migration is refused and nothing was changed"
    )
}

/// The UEFI global variable GUID (BootCurrent, Boot####, SecureBoot).
const GLOBAL_GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// Where firmware looks when no boot entry works (x86-64).
pub const REMOVABLE_DIR: &str = "EFI/BOOT";
pub const REMOVABLE_LOADER: &str = "BOOTX64.EFI";
/// Each slot boots through the chain of its own OS, in its own directory, with
/// its own firmware entry (see `slot::chain`).
pub fn slot_dir(slot: &str) -> String {
    format!("EFI/dualroot-{slot}")
}

pub fn slot_label(slot: &str) -> String {
    format!("dualroot-{slot}")
}
/// What a chain may weigh in RAM and on the ESP (shim, GRUB and MokManager are
/// 1-5 MiB each).
const MAX_CHAIN_BYTES: u64 = 64 << 20;

/// The machine booted with UEFI (the kernel saw an EFI system table).
pub fn booted_uefi(sys: &Path) -> bool {
    sys.join("firmware/efi").exists()
}

/// efivarfs under `sys`; mounted if the initramfs did not (best effort: without
/// it the boot entry is unknown and the removable path is used).
pub fn ensure_efivarfs(sys: &Path) {
    let vars = sys.join("firmware/efi/efivars");
    let empty = fs::read_dir(&vars)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    if booted_uefi(sys) && empty {
        if let Err(e) = nix::mount::mount(
            Some("efivarfs"),
            &vars,
            Some("efivarfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        ) {
            log::warn!(
                "cannot mount efivarfs on {}: {e}; the firmware's boot entry is not read",
                vars.display()
            );
        }
    }
}

/// A global UEFI variable's data (efivarfs puts 4 bytes of attributes first).
fn efivar(sys: &Path, name: &str) -> Option<Vec<u8>> {
    let p = sys.join(format!("firmware/efi/efivars/{name}-{GLOBAL_GUID}"));
    let data = std::fs::read(p).ok()?;
    (data.len() > 4).then(|| data[4..].to_vec())
}

/// Secure Boot is enforcing (the `SecureBoot` variable is 1).
pub fn secure_boot(sys: &Path) -> bool {
    efivar(sys, "SecureBoot").is_some_and(|d| d.first() == Some(&1))
}

/// `BootCurrent` as efibootmgr writes entry numbers (`000A`).
pub fn boot_current(sys: &Path) -> Option<String> {
    let cur = efivar(sys, "BootCurrent")?;
    Some(format!(
        "{:04X}",
        u16::from_le_bytes([*cur.first()?, *cur.get(1)?])
    ))
}

/// The file the firmware started, from `BootCurrent` and its `Boot####` load
/// option (`\EFI\debian\shimx64.efi`); `None` when the entry names no file (a
/// whole-disk entry, which boots the removable path) or NVRAM is unreadable.
pub fn booted_file(sys: &Path) -> Option<String> {
    let cur = efivar(sys, "BootCurrent")?;
    let n = u16::from_le_bytes([*cur.first()?, *cur.get(1)?]);
    load_option_file(&efivar(sys, &format!("Boot{n:04X}"))?)
        .ok()
        .flatten()
}

/// The file path in an EFI_LOAD_OPTION: attributes (u32), the device path's
/// length (u16), a NUL-terminated UCS-2 description, then the device path,
/// whose media file-path nodes (type 4, subtype 4) hold the file name in UCS-2.
pub fn load_option_file(opt: &[u8]) -> Result<Option<String>> {
    let len = opt
        .get(4..6)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
        .context("truncated load option")?;
    let mut at = 6;
    loop {
        let c = opt.get(at..at + 2).context("unterminated description")?;
        at += 2;
        if c == [0, 0] {
            break;
        }
    }
    let path = opt
        .get(at..at + len)
        .context("the device path runs past the load option")?;
    let mut file = String::new();
    let mut i = 0;
    while i + 4 <= path.len() {
        let (ty, sub) = (path[i], path[i + 1]);
        let n = u16::from_le_bytes([path[i + 2], path[i + 3]]) as usize;
        if n < 4 || i + n > path.len() {
            bail!("malformed device path node at byte {i}");
        }
        if ty == 0x7f && sub == 0xff {
            break;
        }
        if ty == 4 && sub == 4 {
            let units: Vec<u16> = path[i + 4..i + n]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|u| *u != 0)
                .collect();
            let part = String::from_utf16(&units).context("file path is not UCS-2")?;
            if !file.is_empty() && !file.ends_with('\\') && !part.starts_with('\\') {
                file.push('\\');
            }
            file.push_str(&part);
        }
        i += n;
    }
    Ok((!file.is_empty()).then_some(file))
}

/// `\EFI\debian\shimx64.efi` → `EFI/debian/shimx64.efi`.
pub fn to_relative(efi_path: &str) -> String {
    efi_path
        .split(['\\', '/'])
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// The entry of `dir` named `name` ignoring case, as FAT does.
fn find_ci(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.eq_ignore_ascii_case(name))
}

/// `rel` under `esp` with each component in the case it has on the disk.
fn resolve_ci(esp: &Path, rel: &str) -> Option<PathBuf> {
    let mut p = esp.to_path_buf();
    for c in rel.split('/') {
        p = p.join(find_ci(&p, c)?);
    }
    Some(p)
}

/// The old system's boot chain: the directory of the file the firmware booted
/// (`EFI/debian`), that loader, and every EFI binary beside it that the chain
/// may load (GRUB, MokManager), without shim's fallback (`fb*.efi`, which would
/// rewrite NVRAM and reboot).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Chain {
    /// Relative to the ESP's root, in the case found on the disk.
    pub dir: String,
    pub loader: String,
    pub files: Vec<String>,
    pub bytes: u64,
    /// The firmware entry (`0001`) that booted this chain by its file; once the
    /// old ESP is gone it names nothing and step `boot` removes it.
    #[serde(default)]
    pub old_entry: Option<String>,
}

impl Chain {
    pub fn describe(&self) -> String {
        format!(
            "\\{}\\{} with {}",
            self.dir.replace('/', "\\"),
            self.loader,
            self.files
                .iter()
                .filter(|f| **f != self.loader)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Finds and checks the chain the firmware booted on the old ESP mounted at
/// `esp`: `booted` is the firmware's file (`booted_file`), or the removable
/// path when it names none or a file that is not there.
pub fn old_chain(esp: &Path, booted: Option<&str>) -> Result<Chain> {
    let from_entry = booted
        .map(to_relative)
        .and_then(|rel| resolve_ci(esp, &rel).map(|p| (rel, p)));
    let (rel, path) = match from_entry {
        Some(x) => x,
        None => {
            let rel = format!("{REMOVABLE_DIR}/{REMOVABLE_LOADER}");
            let p = resolve_ci(esp, &rel).with_context(|| {
                format!(
                    "the firmware's boot entry names {} and the ESP at {} has no \\EFI\\BOOT\\BOOTX64.EFI: dualroot cannot tell which boot chain this machine uses, so the migration is refused and nothing was changed",
                    booted.unwrap_or("no file"),
                    esp.display()
                )
            })?;
            (rel, p)
        }
    };
    let dir_path = path.parent().unwrap_or(esp).to_path_buf();
    let dir = dir_path
        .strip_prefix(esp)
        .unwrap_or(Path::new(""))
        .to_string_lossy()
        .into_owned();
    let loader = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut files = vec![loader.clone()];
    let mut bytes = 0u64;
    let mut names: Vec<String> = fs::read_dir(&dir_path)?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        let lower = n.to_ascii_lowercase();
        if lower.ends_with(".efi") && !lower.starts_with("fb") && n != loader {
            files.push(n);
        }
    }
    for f in &files {
        let p = dir_path.join(f);
        let data = fs::read(&p)?;
        bytes += data.len() as u64;
        let signed = pe_is_signed(&data).with_context(|| format!("reading {}", p.display()))?;
        let is_grub = f.to_ascii_lowercase().starts_with("grub");
        if (f == &loader || is_grub) && !signed {
            bail!(
                "the firmware boots \\{} through \\{}\\{f}, which is not signed: an unsigned GRUB reads its modules from the old /boot, which the migration rewrites, so it could not boot the recovery entry. Install the distribution's signed boot chain (shim-x64 and grub2-efi-x64 on EL, shim-signed and grub-efi-amd64-signed on Debian) and stage again; nothing was changed",
                rel.replace('/', "\\"),
                dir.replace('/', "\\")
            );
        }
    }
    let is_shim = loader.to_ascii_lowercase().starts_with("shim")
        || (loader.eq_ignore_ascii_case(REMOVABLE_LOADER)
            && files
                .iter()
                .any(|f| f.to_ascii_lowercase().starts_with("grub")));
    if is_shim
        && !files
            .iter()
            .any(|f| f.to_ascii_lowercase().starts_with("grub"))
    {
        bail!(
            "the firmware boots shim \\{}, but its directory has no GRUB (grubx64.efi) for it to load; nothing was changed",
            rel.replace('/', "\\")
        );
    }
    if bytes > MAX_CHAIN_BYTES {
        bail!(
            "the boot chain in \\{} is {} MiB, more than the {} MiB dualroot carries; nothing was changed",
            dir.replace('/', "\\"),
            bytes >> 20,
            MAX_CHAIN_BYTES >> 20
        );
    }
    Ok(Chain {
        dir,
        loader,
        files,
        bytes,
        old_entry: None,
    })
}

/// Where the old ESP is mounted under `root` (`boot/efi` or `efi`).
pub fn old_esp_dir(root: &Path) -> Option<PathBuf> {
    ["boot/efi", "efi"]
        .iter()
        .map(|d| root.join(d))
        .find(|p| p.join("EFI").is_dir() || find_ci(p, "EFI").is_some())
}

/// Copies the chain's files from the old ESP into `dest` (RAM), with
/// `chain.json` naming the directory and loader.
pub fn stage_chain(chain: &Chain, esp: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest)?;
    for f in &chain.files {
        fs::copy(esp.join(&chain.dir).join(f), dest.join(f))?;
    }
    crate::fsutil::write_atomic(&dest.join("chain.json"), &serde_json::to_vec_pretty(chain)?)
}

/// The `grub.cfg` beside a GRUB image on the ESP: `/boot` by its label, then
/// dualroot's generated config in the GRUB flavor's directory.
pub fn stub_cfg(flavor_dir: &str) -> String {
    format!(
        "# Generated by dualroot: the configuration is on /boot (label boot).\nsearch --no-floppy --label boot --set=root\nset prefix=($root)/{flavor_dir}\nconfigfile ($root)/{flavor_dir}/grub.cfg\n"
    )
}

/// Puts a chain from `src` (its files by name) at `dir` on the ESP mounted at
/// `esp` and at the removable path (the loader as `BOOTX64.EFI`), each with the
/// `grub.cfg` stub.
pub fn install_chain(
    src: &Path,
    files: &[String],
    loader: &str,
    dir: &str,
    esp: &Path,
    flavor_dir: &str,
) -> Result<()> {
    install_chain_at(src, files, loader, dir, esp, flavor_dir, true)
}

/// [`install_chain`], at the removable path too only when `removable`.
pub fn install_chain_at(
    src: &Path,
    files: &[String],
    loader: &str,
    dir: &str,
    esp: &Path,
    flavor_dir: &str,
    removable: bool,
) -> Result<()> {
    let stub = stub_cfg(flavor_dir);
    let mut targets = vec![(dir.to_string(), None)];
    if removable && !dir.eq_ignore_ascii_case(REMOVABLE_DIR) {
        targets.push((REMOVABLE_DIR.to_string(), Some(REMOVABLE_LOADER)));
    }
    for (d, loader_name) in targets {
        let to = esp.join(&d);
        fs::create_dir_all(&to)?;
        for f in files {
            let name = match loader_name {
                Some(l) if f == loader => l.to_string(),
                _ => f.clone(),
            };
            crate::fsutil::write_atomic(&to.join(&name), &fs::read(src.join(f))?)?;
        }
        crate::fsutil::write_atomic(&to.join("grub.cfg"), stub.as_bytes())?;
    }
    Ok(())
}

/// A chain as `grub-install` left it in `dir` of the ESP: shim when there is
/// one (it loads the GRUB beside it), else GRUB itself; fallback binaries left
/// out.
pub fn installed_chain(esp: &Path, dir: &str) -> Result<(Vec<String>, String)> {
    let d = esp.join(dir);
    let mut files: Vec<String> = fs::read_dir(&d)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            let l = n.to_ascii_lowercase();
            l.ends_with(".efi") && !l.starts_with("fb")
        })
        .collect();
    files.sort();
    let pick = |prefix: &str| {
        files
            .iter()
            .find(|f| f.to_ascii_lowercase().starts_with(prefix))
            .cloned()
    };
    let loader = pick("shim")
        .or_else(|| pick("grub"))
        .with_context(|| format!("grub-install left no shim or GRUB image in {}", d.display()))?;
    Ok((files, loader))
}

/// What is on the ESP besides `keep` (directories under `EFI/`), removed: the
/// recovery chain once the new OS's chain is in place.
pub fn remove_other_dirs(esp: &Path, keep: &[&str]) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let efi = esp.join("EFI");
    for e in fs::read_dir(&efi)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let rel = format!("EFI/{n}");
        if keep.iter().any(|k| k.eq_ignore_ascii_case(&rel)) {
            continue;
        }
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            fs::remove_dir_all(e.path())?;
            removed.push(rel);
        }
    }
    Ok(removed)
}

/// The OS in `root` installs its own chain with its own `grub-install` (in a
/// chroot; the ESP mounted at `esp` appears at its /boot/efi, `boot` at its
/// /boot) into `\EFI\dualroot-<slot>\`, signed (`--uefi-secure-boot`) when it
/// ships Debian's signed shim and GRUB, without touching NVRAM. The `grub.cfg`
/// stub then replaces the one grub-install wrote. Returns the GRUB flavor, the
/// chain's files and its loader. `efi_dir` overrides /boot/efi (failpoint).
pub fn grub_install_chain(
    root: Option<&Path>,
    boot: &Path,
    esp: &Path,
    slot: &str,
    efi_dir: Option<&str>,
) -> Result<(crate::grub::Flavor, Vec<String>, String)> {
    use crate::cmd::{cmd, CommandExt};
    let live = Path::new("/");
    let r = root.unwrap_or(live);
    let tool = ["grub-install", "grub2-install"]
        .into_iter()
        .find(|t| {
            ["usr/sbin", "sbin", "usr/bin"]
                .iter()
                .any(|d| r.join(d).join(t).exists())
        })
        .with_context(|| format!("{} has no grub-install", r.display()))?;
    let signed = [SIGNED_SHIM, SIGNED_GRUB]
        .iter()
        .all(|f| r.join(f).is_file());
    // In a new root: a chroot with the ESP at its /boot/efi; on the running
    // slot (an update of its own shim or GRUB): the ESP where it is mounted.
    let (mut c, binds, efi_default) = match root {
        Some(root) => {
            let mut binds = crate::bootfiles::chroot_binds(root, Some(boot))?;
            binds.push(crate::mounts::Mount::bind(
                esp,
                &crate::fsutil::in_root(root, Path::new("boot/efi"))?,
            )?);
            let mut c = cmd("chroot", [root.as_os_str()]);
            c.arg(tool);
            (c, binds, "/boot/efi".to_string())
        }
        None => (cmd(tool, [""; 0]), Vec::new(), esp.display().to_string()),
    };
    c.args([
        "--target=x86_64-efi".to_string(),
        format!("--efi-directory={}", efi_dir.unwrap_or(&efi_default)),
        format!("--bootloader-id={}", slot_label(slot)),
        "--no-nvram".to_string(),
    ]);
    if signed {
        c.arg("--uefi-secure-boot");
    }
    let res = c.run();
    drop(binds);
    res?;
    let flavor = crate::grub::Flavor::of_tool(tool);
    let dir = slot_dir(slot);
    let (files, loader) = installed_chain(esp, &dir)?;
    install_chain_at(
        &esp.join(&dir),
        &files,
        &loader,
        &dir,
        esp,
        flavor.dir(),
        false,
    )?;
    Ok((flavor, files, loader))
}

/// `efibootmgr ARGS`, the running system's, or the one of `root` in a chroot
/// (with efivarfs mounted inside it for the call).
pub fn efibootmgr(root: Option<&Path>, args: &[&str]) -> Result<String> {
    use crate::cmd::{cmd, CommandExt};
    match root {
        None => cmd("efibootmgr", args).run_stdout(),
        Some(r) => {
            // /dev for the disk, /sys for its partitions, efivarfs on top.
            let _binds = crate::bootfiles::chroot_binds(r, None)?;
            let vars = crate::fsutil::in_root(r, Path::new("sys/firmware/efi/efivars"))?;
            let _m = crate::mounts::Mount::new(
                Path::new("efivarfs"),
                &vars,
                Some("efivarfs"),
                nix::mount::MsFlags::empty(),
                None,
            )?;
            cmd("chroot", [r.as_os_str()])
                .arg("efibootmgr")
                .args(args)
                .run_stdout()
        }
    }
}

/// The entries of an `efibootmgr` listing: (number, label).
pub fn boot_entries(listing: &str) -> Vec<(String, String)> {
    listing
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Boot")?;
            let cut = rest.find(|c: char| !c.is_ascii_hexdigit())?;
            let (num, tail) = rest.split_at(cut);
            let label = tail.trim_start_matches('*').trim_start();
            let label = label.split('\t').next().unwrap_or(label).trim_end();
            (num.len() == 4).then(|| (num.to_string(), label.to_string()))
        })
        .collect()
}

/// `BootOrder` of an `efibootmgr` listing.
pub fn boot_order(listing: &str) -> Vec<String> {
    listing
        .lines()
        .find_map(|l| l.strip_prefix("BootOrder:"))
        .map(|o| o.trim().split(',').map(str::to_string).collect())
        .unwrap_or_default()
}

/// `\EFI\dualroot-<slot>\<loader>`, as a firmware entry names it.
pub fn slot_entry_path(slot: &str, loader: &str) -> String {
    format!("\\{}\\{loader}", slot_dir(slot).replace('/', "\\"))
}

/// The label of the recovery chain's firmware entry (inside the window).
pub const RECOVERY_LABEL: &str = "dualroot-recovery";

/// Removes every entry labelled `label`.
pub fn remove_entries(root: Option<&Path>, label: &str) -> Result<()> {
    for (n, l) in boot_entries(&efibootmgr(root, &[])?) {
        if l == label {
            efibootmgr(root, &["-b", &n, "-B"])?;
        }
    }
    Ok(())
}

/// A firmware entry `label` for the file `path` (`\EFI\...`) on partition
/// `part` of `disk`, replacing earlier ones of that label; first in BootOrder
/// when `first`, else created without joining BootOrder.
pub fn write_entry(
    root: Option<&Path>,
    disk: &Path,
    part: u32,
    label: &str,
    path: &str,
    first: bool,
) -> Result<String> {
    remove_entries(root, label)?;
    let disk = disk.display().to_string();
    let part = part.to_string();
    efibootmgr(
        root,
        &[
            if first { "-c" } else { "-C" },
            "-d",
            &disk,
            "-p",
            &part,
            "-L",
            label,
            "-l",
            path,
        ],
    )
}

/// Entry `num` of a listing, when it still starts `file` (`\EFI\debian\shimx64.efi`):
/// the old system's entry, to be removed once its ESP is gone.
pub fn entry_names_file(listing: &str, num: &str, file: &str) -> bool {
    listing.lines().any(|l| {
        l.starts_with(&format!("Boot{num}"))
            && l.to_ascii_lowercase()
                .contains(&format!("file({})", file.to_ascii_lowercase()))
    })
}

/// BootOrder with the entries labelled `labels` first, in that order, the
/// others after them as they were.
pub fn order_first(listing: &str, labels: &[String]) -> Vec<String> {
    let entries = boot_entries(listing);
    let mut order: Vec<String> = labels
        .iter()
        .filter_map(|l| entries.iter().find(|(_, e)| e == l).map(|(n, _)| n.clone()))
        .collect();
    for n in boot_order(listing) {
        if !order.contains(&n) {
            order.push(n);
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ucs2(s: &str) -> Vec<u8> {
        s.encode_utf16()
            .chain([0])
            .flat_map(|u| u.to_le_bytes())
            .collect()
    }

    /// `Boot0001` as OVMF stores what `efibootmgr -c -L debian -l
    /// \EFI\debian\shimx64.efi` wrote: an HD() node for the ESP, the file node,
    /// the end node.
    fn load_option(desc: &str, file: Option<&str>) -> Vec<u8> {
        let mut path = Vec::new();
        let mut hd = vec![4u8, 1, 42, 0];
        hd.extend([0u8; 38]);
        path.extend(hd);
        if let Some(f) = file {
            let name = ucs2(f);
            path.extend([4u8, 4]);
            path.extend(((name.len() + 4) as u16).to_le_bytes());
            path.extend(name);
        }
        path.extend([0x7f, 0xff, 4, 0]);
        let mut o = 1u32.to_le_bytes().to_vec();
        o.extend((path.len() as u16).to_le_bytes());
        o.extend(ucs2(desc));
        o.extend(path);
        o
    }

    #[test]
    fn the_new_os_must_bring_a_grub_this_firmware_boots() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let signed = set(&[SIGNED_SHIM, SIGNED_GRUB, EFI_MODULES]);
        assert!(check_new_os(&signed, true)
            .unwrap()
            .contains("signed shim and GRUB"));
        let unsigned = set(&[EFI_MODULES]);
        assert!(check_new_os(&unsigned, false).unwrap().contains("unsigned"));
        let e = check_new_os(&unsigned, true).unwrap_err().to_string();
        assert!(
            e.contains("Secure Boot is enforcing") && e.contains("nothing was changed"),
            "{e}"
        );
        let e = check_new_os(&set(&[SIGNED_SHIM]), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no GRUB for it"), "{e}");
    }

    /// What efibootmgr 17/18 print.
    #[test]
    fn boot_entries_and_order_are_read_and_reordered() {
        let listing = "BootCurrent: 0001\nTimeout: 0 seconds\nBootOrder: 0003,0001,0000,0004\nBoot0000* UiApp\tFvVol(7cb8bdc9)/FvFile(462caa21)\nBoot0001* debian\tHD(1,GPT,966b,0x800,0x64000)/File(\\EFI\\debian\\shimx64.efi)\nBoot0003* dualroot-a\tHD(4,GPT,1234,0x1000,0x80000)/File(\\EFI\\dualroot-a\\shimx64.efi)\nBoot0004  dualroot-b\n";
        let e = boot_entries(listing);
        assert_eq!(
            e.iter()
                .map(|(n, l)| format!("{n}={l}"))
                .collect::<Vec<_>>(),
            [
                "0000=UiApp",
                "0001=debian",
                "0003=dualroot-a",
                "0004=dualroot-b"
            ]
        );
        assert_eq!(boot_order(listing), ["0003", "0001", "0000", "0004"]);
        assert_eq!(
            order_first(listing, &[slot_label("b"), slot_label("a")]),
            ["0004", "0003", "0001", "0000"]
        );
        assert_eq!(slot_dir("b"), "EFI/dualroot-b");
        assert_eq!(
            slot_entry_path("b", "shimx64.efi"),
            "\\EFI\\dualroot-b\\shimx64.efi"
        );
        // The old system's entry goes only while it still names the old chain.
        assert!(entry_names_file(
            listing,
            "0001",
            "\\EFI\\DEBIAN\\shimx64.efi"
        ));
        assert!(!entry_names_file(
            listing,
            "0003",
            "\\EFI\\debian\\shimx64.efi"
        ));
    }

    #[test]
    fn the_booted_file_is_read_from_the_load_option() {
        assert_eq!(
            load_option_file(&load_option("debian", Some("\\EFI\\debian\\shimx64.efi")))
                .unwrap()
                .as_deref(),
            Some("\\EFI\\debian\\shimx64.efi")
        );
        // OVMF's entry for a whole disk names no file: the removable path boots.
        assert_eq!(
            load_option_file(&load_option("UEFI Misc Device", None)).unwrap(),
            None
        );
        let mut bad = load_option("x", Some("\\a.efi"));
        bad.truncate(bad.len() - 6);
        assert!(load_option_file(&bad).is_err());
        assert_eq!(
            to_relative("\\EFI\\debian\\shimx64.efi"),
            "EFI/debian/shimx64.efi"
        );
    }

    /// A PE32+ header that is signed or not (see `sbat::pe_is_signed`).
    fn pe(signed: bool) -> Vec<u8> {
        let mut pe = vec![0u8; 0x200];
        pe[0..2].copy_from_slice(b"MZ");
        pe[0x3c..0x40].copy_from_slice(&0x40u32.to_le_bytes());
        pe[0x40..0x44].copy_from_slice(b"PE\0\0");
        pe[0x44 + 16..0x44 + 18].copy_from_slice(&240u16.to_le_bytes());
        pe[0x58..0x5a].copy_from_slice(&0x20bu16.to_le_bytes());
        pe[0x58 + 108..0x58 + 112].copy_from_slice(&16u32.to_le_bytes());
        if signed {
            let cert = 0x58 + 112 + 32;
            pe[cert + 4..cert + 8].copy_from_slice(&0x40u32.to_le_bytes());
        }
        pe
    }

    fn esp_with(files: &[(&str, bool)]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for (f, signed) in files {
            let p = t.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, pe(*signed)).unwrap();
        }
        t
    }

    #[test]
    fn the_chain_is_the_booted_directory_without_fallback() {
        let esp = esp_with(&[
            ("EFI/debian/shimx64.efi", true),
            ("EFI/debian/grubx64.efi", true),
            ("EFI/debian/mmx64.efi", true),
            ("EFI/debian/fbx64.efi", true),
            ("EFI/BOOT/BOOTX64.EFI", true),
        ]);
        let c = old_chain(esp.path(), Some("\\EFI\\DEBIAN\\shimx64.efi")).unwrap();
        assert_eq!(c.dir, "EFI/debian");
        assert_eq!(c.loader, "shimx64.efi");
        assert_eq!(c.files, ["shimx64.efi", "grubx64.efi", "mmx64.efi"]);
        assert_eq!(c.bytes, 3 * 0x200);
        // No file in the entry (or one that is gone): the removable path.
        let c = old_chain(esp.path(), None).unwrap();
        assert_eq!(
            (c.dir.as_str(), c.loader.as_str()),
            ("EFI/BOOT", "BOOTX64.EFI")
        );
        let c = old_chain(esp.path(), Some("\\EFI\\centos\\shimx64.efi")).unwrap();
        assert_eq!(c.dir, "EFI/BOOT");
    }

    #[test]
    fn an_unsigned_grub_or_a_lone_shim_is_refused() {
        let esp = esp_with(&[("EFI/debian/grubx64.efi", false)]);
        let e = old_chain(esp.path(), Some("\\EFI\\debian\\grubx64.efi"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("grubx64.efi, which is not signed") && e.contains("nothing was changed"),
            "{e}"
        );
        let esp = esp_with(&[("EFI/centos/shimx64.efi", true)]);
        let e = old_chain(esp.path(), Some("\\EFI\\centos\\shimx64.efi"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no GRUB"), "{e}");
        let esp = esp_with(&[("EFI/centos/shimx64.efi", true)]);
        let e = old_chain(esp.path(), None).unwrap_err().to_string();
        assert!(e.contains("no \\EFI\\BOOT\\BOOTX64.EFI"), "{e}");
    }

    #[test]
    fn a_chain_goes_to_its_directory_and_the_removable_path_with_stubs() {
        let old = esp_with(&[
            ("EFI/debian/shimx64.efi", true),
            ("EFI/debian/grubx64.efi", true),
        ]);
        let c = old_chain(old.path(), Some("\\EFI\\debian\\shimx64.efi")).unwrap();
        let ram = tempfile::tempdir().unwrap();
        stage_chain(&c, old.path(), ram.path()).unwrap();
        let new = tempfile::tempdir().unwrap();
        install_chain(ram.path(), &c.files, &c.loader, &c.dir, new.path(), "grub").unwrap();
        for f in [
            "EFI/debian/shimx64.efi",
            "EFI/debian/grubx64.efi",
            "EFI/BOOT/BOOTX64.EFI",
            "EFI/BOOT/grubx64.efi",
        ] {
            assert!(new.path().join(f).is_file(), "{f}");
        }
        let stub = std::fs::read_to_string(new.path().join("EFI/BOOT/grub.cfg")).unwrap();
        assert!(stub.contains("search --no-floppy --label boot --set=root"));
        assert!(stub.contains("configfile ($root)/grub/grub.cfg"));
        assert!(new.path().join("EFI/debian/grub.cfg").is_file());
        let a = slot_dir("a");
        std::fs::create_dir_all(new.path().join(&a)).unwrap();
        for f in ["shimx64.efi", "grubx64.efi", "fbx64.efi"] {
            std::fs::write(new.path().join(&a).join(f), pe(true)).unwrap();
        }
        let (files, loader) = installed_chain(new.path(), &a).unwrap();
        assert_eq!((files.len(), loader.as_str()), (2, "shimx64.efi"));
        let gone = remove_other_dirs(new.path(), &[&a, REMOVABLE_DIR]).unwrap();
        assert_eq!(gone, ["EFI/debian"]);
    }
}
