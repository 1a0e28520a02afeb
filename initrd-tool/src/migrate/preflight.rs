//! Phase 1: read-only checks, usable on the running old system (`dualroot preflight`,
//! `dualroot stage`) and inside the migration initramfs. Every blocker is one plain
//! sentence with the numbers.

use crate::accounts::{self, AccountFiles};
use crate::bundle::{self, Manifest};
use crate::capacity::{self, Needs};
use crate::keys::Keyring;
use crate::layout::{self, Layout};
use crate::plan::{ByteSizes, Firmware, Plan, MIB};
use crate::source_layout::SourceLayout;
use crate::sysinfo::{self, Nic};
use anyhow::{Context, Result};
use fs_err as fs;
use serde::Serialize;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Tools the migration initramfs needs from the old system (alternative names).
const MIGRATION_TOOLS: &[&[&str]] = &[
    &["lvm"],
    &["mkfs.ext4"],
    &["grub-install", "grub2-install"],
    &["dracut"],
];

/// What makes the new ESP's FAT filesystem (dosfstools' names).
pub const VFAT_TOOLS: [&str; 3] = ["mkfs.vfat", "mkfs.fat", "mkdosfs"];

/// The chain the firmware booted, on the old ESP under the old root.
pub fn uefi_old_chain(env: &Env) -> Result<crate::efi::Chain> {
    let esp = crate::efi::old_esp_dir(&env.root).with_context(|| {
        format!(
            "this machine boots with UEFI, but no ESP with an EFI directory is mounted at {}/boot/efi or /efi; nothing was changed",
            env.root.display()
        )
    })?;
    let booted = crate::efi::booted_file(&env.sys);
    let mut chain = crate::efi::old_chain(&esp, booted.as_deref())?;
    if booted.is_some() && !chain.dir.eq_ignore_ascii_case(crate::efi::REMOVABLE_DIR) {
        chain.old_entry = crate::efi::boot_current(&env.sys);
    }
    Ok(chain)
}

/// Where the checks look.
#[derive(Debug, Clone)]
pub struct Env {
    /// The old system's root (`/` when running on it, the mount in the initramfs);
    /// plan paths resolve under it.
    pub root: PathBuf,
    /// Mount point whose device is "the disk holding the current root".
    pub root_mount: String,
    pub proc: PathBuf,
    pub sys: PathBuf,
    /// Decode the payload to dry-run the account merge (seconds; skipped in the
    /// initramfs, where `stage` already did it on the running system).
    pub accounts_dry_run: bool,
}

impl Env {
    pub fn live() -> Env {
        Env {
            root: "/".into(),
            root_mount: "/".into(),
            proc: "/proc".into(),
            sys: "/sys".into(),
            accounts_dry_run: true,
        }
    }

    /// Inside the migration initramfs: the old root mounted at `old`.
    pub fn initramfs(old: &Path, proc: &Path, sys: &Path) -> Env {
        Env {
            root: old.to_path_buf(),
            root_mount: old.display().to_string(),
            proc: proc.to_path_buf(),
            sys: sys.to_path_buf(),
            accounts_dry_run: false,
        }
    }

    pub fn under_root(&self, p: &Path) -> PathBuf {
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    pub mem_available: u64,
    pub reserve: u64,
    pub bundle: u64,
    pub carry: u64,
    pub recovery: u64,
    pub margin: u64,
    /// The undo record of the window (0 when it is not taken: plan `off`, or
    /// `auto` and it does not fit).
    pub undo: u64,
    /// What the undo record would take.
    pub undo_wanted: u64,
    pub needed: u64,
}

/// Byte offsets of the old root VG's PVs on the disk (their labels are wiped first).
pub fn old_pv_starts(s: &SourceLayout) -> Vec<u64> {
    match &s.root {
        crate::source_layout::RootDevice::Lvm { pvs, .. } => {
            pvs.iter().map(|p| p.start_bytes).collect()
        }
        _ => Vec::new(),
    }
}

/// `MemAvailable - reserve >= bundle + carried + recovery + margin [+ undo]`.
/// The undo record is taken when it fits (`auto`), must fit (`required`) or is
/// never taken (`off`); every term is printed.
fn memory_budget(mem: &mut Memory, mode: crate::plan::UndoMode) -> Result<String> {
    use crate::plan::UndoMode;
    let base = mem.bundle + mem.carry + mem.recovery + mem.margin;
    let usable = mem.mem_available.saturating_sub(mem.reserve);
    let with_undo = base + mem.undo_wanted;
    let undo_fits = mode != UndoMode::Off && usable >= with_undo;
    mem.undo = if undo_fits { mem.undo_wanted } else { 0 };
    mem.needed = base + mem.undo;
    let terms = format!(
        "bundle {} + carried files {} + recovery kernel/initramfs {} + margin {} + undo record {} MiB",
        mem.bundle / MIB,
        mem.carry / MIB,
        mem.recovery / MIB,
        mem.margin / MIB,
        mem.undo / MIB
    );
    let usable_text = format!(
        "{} MiB usable (MemAvailable {} - reserve {})",
        usable / MIB,
        mem.mem_available / MIB,
        mem.reserve / MIB
    );
    if usable < base || (mode == UndoMode::Required && !undo_fits) {
        let need = if mode == UndoMode::Required {
            with_undo
        } else {
            base
        };
        anyhow::bail!(
            "{} MiB of RAM are needed to stage the migration ({}) but only {}; nothing was changed",
            need / MIB,
            if mode == UndoMode::Required {
                terms.replace(
                    &format!("undo record {} MiB", mem.undo / MIB),
                    &format!(
                        "undo record {} MiB, required by the plan",
                        mem.undo_wanted / MIB
                    ),
                )
            } else {
                terms
            },
            usable_text
        );
    }
    let undo_note = match (mode, undo_fits) {
        (UndoMode::Off, _) => "; no undo record (plan: undo = \"off\"): a failure inside the window reboots into the recovery entry".to_string(),
        (_, true) => "; a failure inside the window puts the old disk back".to_string(),
        (_, false) => format!(
            "; no undo record: its {} MiB do not fit, so a failure inside the window reboots into the recovery entry",
            mem.undo_wanted / MIB
        ),
    };
    Ok(format!(
        "{} MiB needed ({terms}), {usable_text}{undo_note}",
        mem.needed / MIB
    ))
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub blockers: Vec<String>,
    pub disk: Option<String>,
    /// The old system's layout (root on a partition or an LV, /boot).
    pub source: Option<SourceLayout>,
    pub disk_bytes: u64,
    pub layout: Option<Layout>,
    /// The layout's sizes, `auto` resolved.
    pub sizes: Option<ByteSizes>,
    /// What `data`, the slots and `/boot` must hold.
    pub needs: Needs,
    pub memory: Memory,
    pub nics: Vec<Nic>,
    pub manifest: Option<Manifest>,
    pub account_notes: Vec<String>,
    /// The old system's filesystems on the disk besides / and /boot.
    pub old_filesystems: Vec<crate::old_fs::OldFs>,
}

impl Report {
    fn check(&mut self, name: &str, result: Result<String>) -> bool {
        match result {
            Ok(detail) => {
                self.checks.push(Check {
                    name: name.into(),
                    ok: true,
                    detail,
                });
                true
            }
            Err(e) => {
                let msg = format!("{e:#}");
                self.checks.push(Check {
                    name: name.into(),
                    ok: false,
                    detail: msg.clone(),
                });
                self.blockers.push(format!("{name}: {msg}"));
                false
            }
        }
    }

    pub fn ok(&self) -> bool {
        self.blockers.is_empty()
    }

    pub fn render(&self) -> String {
        let mut s = String::from("dualroot preflight\n");
        for c in &self.checks {
            s.push_str(&format!(
                "  [{}] {:<10} {}\n",
                if c.ok { " ok " } else { "FAIL" },
                c.name,
                c.detail
            ));
        }
        if !self.nics.is_empty() {
            s.push_str("  NICs:\n");
            for n in &self.nics {
                s.push_str(&format!(
                    "    {:<8} {}  driver {:<12} bus {}\n",
                    n.name, n.mac, n.driver, n.bus
                ));
            }
        }
        if self.blockers.is_empty() {
            s.push_str("result: ready to migrate\n");
        } else {
            s.push_str(&format!(
                "result: {} blocker(s); nothing was changed:\n",
                self.blockers.len()
            ));
            for b in &self.blockers {
                s.push_str(&format!("  - {b}\n"));
            }
        }
        s
    }
}

/// The account databases the merge dry run reads from the payload.
const ACCOUNT_MEMBERS: [&str; 4] = ["etc/passwd", "etc/shadow", "etc/group", "etc/gshadow"];

/// Total size of the regular files directly in a directory (a keyring).
fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The capacity check's line when everything fits.
pub fn room_summary(s: &ByteSizes, n: &Needs) -> String {
    format!(
        "data {} MiB holds the stash ({} MiB); root/back {}/{} MiB hold the payload ({}); /boot {} MiB holds {} MiB{}{}",
        s.data / MIB,
        n.data_min().div_ceil(MIB),
        s.root / MIB,
        s.back / MIB,
        match (n.slot_min(), n.payload_entries) {
            (Some(v), Some(e)) => format!(
                "{} MiB, {} inodes for {e} entries",
                v.div_ceil(MIB),
                crate::capacity::slot_inodes_for(e)
            ),
            (Some(v), None) => format!("{} MiB", v.div_ceil(MIB)),
            (None, _) => "size unknown".into(),
        },
        s.boot / MIB,
        n.boot_min().div_ceil(MIB),
        if s.boot >= n.boot_auto() {
            String::new()
        } else {
            format!(
                " (a newer OS with kernels and initramfs twice today's needs {} MiB: sizes.boot = \"auto\"; /boot cannot grow after the migration)",
                n.boot_auto().div_ceil(MIB)
            )
        },
        match s.slot_reserve {
            Some(r) => format!(
                "; slot reserve {} MiB kept free in the VG for bigger OS images",
                r / MIB
            ),
            None => String::new(),
        }
    )
}

/// Total size of regular files under the carry paths (what staging copies to RAM).
pub fn carry_bytes(env: &Env, plan: &Plan) -> u64 {
    let mut paths: Vec<PathBuf> = plan.carry.iter().map(|c| env.under_root(&c.path)).collect();
    for id in crate::sync::identity_items(&env.root) {
        paths.push(env.under_root(&id));
    }
    paths
        .iter()
        .flat_map(|p| {
            walkdir::WalkDir::new(p)
                .follow_links(false)
                .into_iter()
                .filter_map(|e| e.ok())
        })
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

pub fn kernel_release(env: &Env) -> String {
    fs::read_to_string(env.proc.join("sys/kernel/osrelease"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Kernel and initramfs the recovery entry will boot (copied to /boot during stash).
pub fn recovery_files(env: &Env) -> (PathBuf, PathBuf) {
    let rel = kernel_release(env);
    (
        env.under_root(Path::new(&format!("boot/vmlinuz-{rel}"))),
        env.under_root(Path::new(super::MIGRATION_INITRAMFS)),
    )
}

/// Size of the recovery kernel and migration initramfs (staged in RAM, then put on
/// /boot). Before `stage` has built the initramfs, what it will be is estimated.
pub fn recovery_bytes(env: &Env) -> u64 {
    let (kernel, initrd) = recovery_files(env);
    fs::metadata(&kernel).map(|m| m.len()).unwrap_or(0)
        + fs::metadata(&initrd)
            .map(|m| m.len())
            .unwrap_or(super::plan_check::RECOVERY_ESTIMATE)
}

/// The disk the plan migrates: the one holding the old system (a plan naming
/// another disk is refused: dualroot never writes a disk the old OS is not on).
pub fn resolve_disk(plan: &Plan, source: &SourceLayout) -> Result<PathBuf> {
    if plan.disk != "auto" && plan.disk != source.disk {
        anyhow::bail!(
            "the plan names disk {} but the old system is on {}; nothing was changed",
            plan.disk,
            source.disk
        );
    }
    Ok(PathBuf::from(&source.disk))
}

/// The old system's layout as seen from `env` (its root and `root/boot`).
pub fn source_layout(env: &Env) -> Result<SourceLayout> {
    let boot = Path::new(&env.root_mount).join("boot");
    crate::source_layout::probe(
        &env.sys,
        &env.proc,
        &env.root_mount,
        &boot.display().to_string(),
    )
}

pub fn disk_bytes(sys: &Path, disk: &Path) -> Result<u64> {
    let name = disk
        .file_name()
        .context("disk path has no name")?
        .to_string_lossy();
    let p = sys.join(format!("class/block/{name}/size"));
    let sectors: u64 = fs::read_to_string(&p)
        .with_context(|| format!("reading {}", p.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} is not a number", p.display()))?;
    Ok(sectors * 512)
}

fn read_regions(disk: &Path, regions: &[(u64, u64)]) -> Result<String> {
    let mut f =
        fs::File::open(disk).with_context(|| format!("opening {} for reading", disk.display()))?;
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0;
    for &(start, len) in regions {
        f.seek(SeekFrom::Start(start))?;
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..n]).with_context(|| {
                format!("reading {} bytes at offset {} of {}: the disk has unreadable sectors where the migration must write", n, start + len - left, disk.display())
            })?;
            left -= n as u64;
            total += n as u64;
        }
    }
    Ok(format!(
        "{} MiB read back from {} region(s) of {}",
        total / MIB,
        regions.len(),
        disk.display()
    ))
}

pub fn old_account_files(env: &Env) -> Result<AccountFiles> {
    let r = |n: &str| {
        let p = env.under_root(Path::new(n));
        fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    Ok(AccountFiles {
        passwd: r("etc/passwd")?,
        shadow: r("etc/shadow")?,
        group: r("etc/group")?,
        gshadow: r("etc/gshadow").unwrap_or_default(),
    })
}

pub fn run(plan: &Plan, env: &Env) -> Report {
    let mut rep = Report {
        checks: Vec::new(),
        blockers: Vec::new(),
        disk: None,
        source: None,
        disk_bytes: 0,
        layout: None,
        sizes: None,
        needs: Needs::default(),
        memory: Memory::default(),
        nics: Vec::new(),
        manifest: None,
        account_notes: Vec::new(),
        old_filesystems: Vec::new(),
    };
    rep.check(
        "plan",
        Ok(format!(
            "valid (VG {}, {} carry item(s))",
            plan.vg,
            plan.carry.len()
        )),
    );

    // Bundle: signature and manifest.
    let bundle_path = env.under_root(&plan.bundle.path);
    let keyring_path = env.under_root(&plan.bundle.keyring);
    let opened = Keyring::load(&keyring_path).and_then(|kr| bundle::open(&bundle_path, Some(&kr)));
    let bundle_size = fs::metadata(&bundle_path).map(|m| m.len()).unwrap_or(0);
    // Kernel + initramfs of the new OS: scanned here on the running system, or
    // as `stage` recorded it (the initramfs does not decode the payload again).
    // The new OS's UEFI boot files (decided below, once the firmware is known).
    let mut payload_efi: Option<std::collections::BTreeSet<String>> = None;
    let mut slot_boot_files = super::StageInfo::load(&env.under_root(Path::new(super::STAGE_INFO)))
        .ok()
        .and_then(|i| i.slot_boot_bytes);
    let manifest = match opened {
        Ok(b) => {
            let m = b.manifest.clone();
            let model = crate::compat::appliance_model(&env.root, plan.model.as_deref());
            rep.check(
                "bundle",
                crate::compat::check_model(&m.model, model.as_deref()).map(|_| {
                    format!(
                        "{} {} for model {} signed by trusted key {}, {} MiB",
                        m.os_id,
                        m.version,
                        m.model,
                        m.key_id,
                        bundle_size / MIB
                    )
                }),
            );
            if env.accounts_dry_run {
                // One pass over the payload: the account merge dry run and the
                // kernel the new slot boots.
                match bundle::scan::scan(b, &ACCOUNT_MEMBERS) {
                    Ok(scan) => {
                        let res = (|| -> Result<String> {
                            let get = |n: &str| {
                                String::from_utf8_lossy(
                                    scan.members.get(n).map(|v| v.as_slice()).unwrap_or(b""),
                                )
                                .into_owned()
                            };
                            let new = AccountFiles {
                                passwd: get("etc/passwd"),
                                shadow: get("etc/shadow"),
                                group: get("etc/group"),
                                gshadow: get("etc/gshadow"),
                            };
                            let merged =
                                accounts::merge(&old_account_files(env)?, &new, &plan.accounts)?;
                            rep.account_notes = merged.notes.clone();
                            Ok(format!(
                                "merge dry run: {} account(s) carried, {} re-owned by name",
                                merged.uid_map.len(),
                                merged.uid_map.iter().filter(|(a, b)| a != b).count()
                            ))
                        })();
                        rep.check("accounts", res);
                        rep.check(
                            "initramfs",
                            scan.require_initramfs_tool().map(|t| {
                                format!(
                                    "the payload rebuilds its initramfs for this machine with {}",
                                    t.name()
                                )
                            }),
                        );
                        payload_efi = Some(scan.efi_files.clone());
                        let kernel = scan.require_kernel();
                        if let Ok((_, bytes)) = &kernel {
                            slot_boot_files = Some(*bytes);
                        }
                        rep.check(
                            "kernel",
                            kernel.map(|(v, bytes)| {
                                format!(
                                    "the payload boots kernel {v} ({} MiB with its initramfs)",
                                    bytes.div_ceil(MIB)
                                )
                            }),
                        );
                    }
                    Err(e) => {
                        rep.check(
                            "payload",
                            Err(e.context(format!(
                                "reading the payload of {}",
                                bundle_path.display()
                            ))),
                        );
                    }
                }
            }
            Some(m)
        }
        Err(e) => {
            rep.check(
                "bundle",
                Err(e.context(format!(
                    "bundle {} with keyring {}",
                    bundle_path.display(),
                    keyring_path.display()
                ))),
            );
            None
        }
    };

    // CPU level.
    if let Some(m) = &manifest {
        let res = fs::read_to_string(env.proc.join("cpuinfo"))
            .context("reading cpuinfo")
            .and_then(|ci| {
                let missing = sysinfo::missing_cpu_flags(&sysinfo::cpu_flags(&ci), m.requires_cpu);
                if missing.is_empty() {
                    Ok(format!("meets {}", m.requires_cpu.name()))
                } else {
                    anyhow::bail!(
                    "the CPU lacks {} required by {} {} ({}); this machine cannot run the new OS",
                    missing.join(", "),
                    m.os_id,
                    m.version,
                    m.requires_cpu.name()
                )
                }
            });
        rep.check("cpu", res);
    }

    // Memory budget for staging in RAM (checked below, once the layout gives
    // the undo record's size).
    let recovery = recovery_bytes(env);
    let carry = carry_bytes(env, plan);
    let meminfo = fs::read_to_string(env.proc.join("meminfo")).unwrap_or_default();
    let avail = sysinfo::meminfo_bytes(&meminfo, "MemAvailable").unwrap_or(0);
    let mut mem = Memory {
        mem_available: avail,
        reserve: plan.reserve(),
        bundle: bundle_size,
        carry,
        recovery,
        margin: plan.margin(),
        ..Memory::default()
    };

    // Disk: size against the layout, and the regions to be written are readable.
    rep.needs = Needs {
        bundle: bundle_size,
        carried: carry + dir_bytes(&keyring_path),
        payload: manifest.as_ref().map(|m| m.payload.uncompressed_size),
        payload_entries: manifest.as_ref().map(|m| m.payload.entries),
        slot_boot_files,
        recovery_boot_files: recovery,
    };
    let source = source_layout(env);
    let described = source.as_ref().map(SourceLayout::describe);
    rep.check("layout", described.map_err(|e| anyhow::anyhow!("{e:#}")));
    let firmware = match source.as_ref().map(|s| s.esp.is_some()) {
        Ok(true) => Firmware::Uefi,
        _ => Firmware::Bios,
    };
    if firmware == Firmware::Uefi {
        let sb = crate::efi::secure_boot(&env.sys);
        let chain = uefi_old_chain(env);
        if let Ok(c) = &chain {
            // Staged in RAM with the recovery kernel, then put on the new ESP.
            mem.recovery += c.bytes;
            rep.needs.recovery_boot_files += c.bytes;
        }
        rep.check(
            "boot chain",
            chain.map(|c| {
                format!(
                    "UEFI, Secure Boot {}; the recovery entry boots the old signed chain {} ({} KiB)",
                    if sb { "enforcing" } else { "off" },
                    c.describe(),
                    c.bytes.div_ceil(1024)
                )
            }),
        );
        if let Some(found) = &payload_efi {
            rep.check("uefi", crate::efi::check_new_os(found, sb));
        }
    }
    // A refused layout is one blocker (above), not a second one for the disk.
    let disk = source.ok().map(|s| {
        rep.source = Some(s.clone());
        resolve_disk(plan, &s).and_then(|d| disk_bytes(&env.sys, &d).map(|b| (d, b)))
    });
    if let Some(disk) = disk {
        match disk {
            Ok((disk, bytes)) => {
                rep.disk = Some(disk.display().to_string());
                rep.disk_bytes = bytes;
                let found = crate::old_fs::on_disk(
                    &env.root,
                    &env.sys,
                    &disk.display().to_string(),
                    plan,
                    &env.root,
                );
                let res = found.and_then(|f| {
                    let line = crate::old_fs::check(&f);
                    rep.old_filesystems = f;
                    line
                });
                rep.check("filesystems", res);
                let sizes = capacity::resolve(plan, &rep.needs)
                    .and_then(|s| s.for_firmware(firmware, plan));
                if let Ok(s) = &sizes {
                    rep.sizes = Some(*s);
                }
                match sizes
                    .and_then(|s| layout::compute(bytes, &s).map(|l| (l, layout::min_disk(&s))))
                {
                    Ok((l, need)) => {
                        rep.check(
                            "disk",
                            Ok(format!(
                                "{} is {} MiB, layout needs {} MiB",
                                disk.display(),
                                bytes / MIB,
                                need / MIB
                            )),
                        );
                        let room = capacity::check(&l.sizes(), &rep.needs)
                            .map(|_| room_summary(&l.sizes(), &rep.needs));
                        rep.check("capacity", room);
                        let regions = l.written_regions(bytes);
                        rep.check("readable", read_regions(&disk, &regions));
                        let old_pvs = rep.source.as_ref().map(old_pv_starts).unwrap_or_default();
                        mem.undo_wanted = crate::undo::total(&l.undo_regions(bytes, &old_pvs));
                        rep.layout = Some(l);
                    }
                    Err(e) => {
                        rep.check("disk", Err(e.context(format!("disk {}", disk.display()))));
                    }
                }
            }
            Err(e) => {
                rep.check("disk", Err(e));
            }
        }
    }

    let res = memory_budget(&mut mem, plan.memory.undo);
    rep.memory = mem;
    rep.check("memory", res);

    // Tools the migration initramfs is built from (only checkable on the old system).
    if env.accounts_dry_run {
        let mut missing: Vec<&str> = MIGRATION_TOOLS
            .iter()
            .filter(|alts| crate::cmd::find_tool(alts).is_none())
            .map(|alts| alts[0])
            .collect();
        if firmware == Firmware::Uefi && crate::cmd::find_tool(&VFAT_TOOLS).is_none() {
            missing.push("mkfs.vfat (dosfstools, for the new ESP)");
        }
        let res = if missing.is_empty() {
            Ok("lvm, mkfs.ext4, grub-install and dracut are installed".to_string())
        } else {
            Err(anyhow::anyhow!(
                "{} not installed; the migration initramfs is built from this system's tools (install lvm2, e2fsprogs, grub, dracut)",
                missing.join(", ")
            ))
        };
        rep.check("tools", res);
    }

    // NIC inventory (informational; pinned by MAC during sync).
    match sysinfo::nics(&env.sys.join("class/net")) {
        Ok(n) => {
            rep.check(
                "nics",
                Ok(format!("{} physical NIC(s) inventoried", n.len())),
            );
            rep.nics = n;
        }
        Err(e) => {
            rep.check("nics", Err(e));
        }
    }
    rep.manifest = manifest;
    rep
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::UndoMode;

    fn mem(avail_mib: u64) -> Memory {
        Memory {
            mem_available: avail_mib * MIB,
            reserve: 100 * MIB,
            bundle: 200 * MIB,
            carry: 10 * MIB,
            recovery: 50 * MIB,
            margin: 40 * MIB,
            undo_wanted: 900 * MIB,
            ..Memory::default()
        }
    }

    #[test]
    fn the_undo_record_is_its_own_term_and_taken_only_when_it_fits() {
        // 300 MiB staged + 900 MiB undo + 100 reserve = 1300.
        let mut m = mem(1300);
        let line = memory_budget(&mut m, UndoMode::Auto).unwrap();
        assert_eq!(m.undo, 900 * MIB);
        assert_eq!(m.needed, 1200 * MIB);
        assert!(line.contains("undo record 900 MiB"), "{line}");
        assert!(line.contains("puts the old disk back"), "{line}");

        let mut m = mem(1299);
        let line = memory_budget(&mut m, UndoMode::Auto).unwrap();
        assert_eq!(m.undo, 0, "auto: no record when it does not fit");
        assert_eq!(m.needed, 300 * MIB);
        assert!(line.contains("its 900 MiB do not fit"), "{line}");
        assert!(line.contains("recovery entry"), "{line}");

        let mut m = mem(1299);
        let e = memory_budget(&mut m, UndoMode::Required).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("1200 MiB of RAM are needed"), "{e}");
        assert!(
            e.contains("undo record 900 MiB, required by the plan"),
            "{e}"
        );
        assert!(e.contains("nothing was changed"), "{e}");

        let mut m = mem(5000);
        let line = memory_budget(&mut m, UndoMode::Off).unwrap();
        assert_eq!(m.undo, 0);
        assert!(line.contains("undo = \"off\""), "{line}");

        let mut m = mem(399);
        let e = format!("{:#}", memory_budget(&mut m, UndoMode::Auto).unwrap_err());
        assert!(e.contains("300 MiB of RAM are needed"), "{e}");
        assert!(e.contains("299 MiB usable"), "{e}");
    }
}
