//! `dualroot stage` on the running old system: place the bundle and plan where the
//! initramfs finds them, build the migration initramfs with dracut, and add a
//! one-shot boot entry. If the initramfs crashes, the next boot is the old system.

use super::preflight::{self, Env};
use super::{StageInfo, MIGRATION_INITRAMFS, STAGE_DIR, STAGE_INFO, STAGE_NICS};
use crate::bundle;
use crate::cmd::{cmd, find_tool, CommandExt};
use crate::fsutil::{copy_hashed, file_sha256, replace_dir_files, write_atomic};
use crate::keys::Keyring;
use crate::plan::{Plan, MIB};
use anyhow::{bail, Context, Result};
use fs_err as fs;
use log::{info, warn};
use std::path::{Path, PathBuf};

pub const ENTRY_ID: &str = "dualroot-migrate";

#[derive(Debug)]
pub struct Staged {
    pub plan_path: PathBuf,
    pub initramfs: PathBuf,
    pub entry: String,
    pub grub_tool: String,
}

impl Staged {
    pub fn summary(&self) -> String {
        format!(
            "staged plan {}, initramfs {}, one-shot entry set with {}",
            self.plan_path.display(),
            self.initramfs.display(),
            self.grub_tool
        )
    }
}

/// Kernel arguments carried to the migration boot and the new slots: the running
/// ones minus what names the old root, the initrd or a previous migration.
pub fn carry_kernel_args(cmdline: &str) -> String {
    cmdline
        .split_whitespace()
        .filter(|w| {
            let k = w.split('=').next().unwrap_or(w);
            !matches!(
                k,
                "BOOT_IMAGE"
                    | "root"
                    | "ro"
                    | "rw"
                    | "initrd"
                    | "rootflags"
                    | "rootfstype"
                    | "panic"
                    // the old swap LV: the new system has no such device
                    | "resume"
            ) && !k.starts_with("rd.")
                && !k.starts_with("dualroot.")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn root_arg(cmdline: &str) -> Result<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("root="))
        .map(str::to_string)
        .context("the running kernel's command line has no root=")
}

/// What the migration boot needs to find an old root on LVM: dracut activates
/// that LV (the old system's own `rd.lvm.*` are not carried; a slot must never
/// activate the old VG).
pub fn activate_old_root_arg(source: &crate::source_layout::SourceLayout) -> Option<String> {
    match &source.root {
        crate::source_layout::RootDevice::Lvm { vg, lv, .. } => {
            Some(format!("rd.lvm.lv={vg}/{lv}"))
        }
        crate::source_layout::RootDevice::Partition { .. } => None,
    }
}

/// The custom.cfg menu entry: GRUB finds the filesystem holding /boot by UUID.
pub fn render_entry(
    boot_uuid: &str,
    boot_prefix: &str,
    kernel: &str,
    root: &str,
    plan: &str,
    args: &str,
) -> String {
    format!(
        "# Written by `dualroot stage`: one-shot migration entry (grub-reboot {ENTRY_ID}).\nmenuentry 'dualroot migration' --id {ENTRY_ID} {{\n  search --no-floppy --fs-uuid --set=root {boot_uuid}\n  linux {boot_prefix}/{kernel} root={root} ro rd.dualroot.migrate=/{plan} panic=10 {} {args}\n  initrd {boot_prefix}/dualroot/initramfs-migrate.img\n}}\n",
        crate::grub::SLOT_FAILURE_ARGS
    )
}

const BLOCK_BEGIN: &str =
    "### BEGIN dualroot-migrate (written by `dualroot stage`; removed by it) ###\n";
const BLOCK_END: &str = "### END dualroot-migrate ###\n";

/// `custom.cfg` with the migration entry in its own marked block: whatever the
/// operator keeps there stays, and an earlier block is replaced.
pub fn with_entry(existing: &str, entry: &str) -> String {
    let mut rest = without_entry(existing).unwrap_or_default();
    if !rest.is_empty() && !rest.ends_with('\n') {
        rest.push('\n');
    }
    format!("{rest}{BLOCK_BEGIN}{entry}{BLOCK_END}")
}

/// `custom.cfg` without dualroot's block; `None` when nothing else is left (the
/// file can go). A file an older `stage` wrote (its header, no markers) is all ours.
pub fn without_entry(text: &str) -> Option<String> {
    let mut rest = text.to_string();
    if let Some(b) = rest.find(BLOCK_BEGIN) {
        let end = rest[b..]
            .find(BLOCK_END)
            .map(|e| b + e + BLOCK_END.len())
            .unwrap_or(rest.len());
        rest.replace_range(b..end, "");
    } else if rest.starts_with("# Written by `dualroot stage`") {
        rest.clear();
    }
    (!rest.trim().is_empty()).then_some(rest)
}

/// The GRUB of the running old system: its directory and tools (EL: `grub2-*`).
struct OldGrub {
    dir: &'static str,
    reboot_tool: String,
    editenv: Option<String>,
}

fn old_grub() -> Result<OldGrub> {
    let (dir, reboot_tool, editenv) = if Path::new("/boot/grub2").is_dir() {
        ("/boot/grub2", "grub2-reboot", "grub2-editenv")
    } else {
        ("/boot/grub", "grub-reboot", "grub-editenv")
    };
    Ok(OldGrub {
        dir,
        reboot_tool: find_tool(&[reboot_tool, "grub-reboot", "grub2-reboot"])
            .context("neither grub-reboot nor grub2-reboot is installed")?,
        editenv: find_tool(&[editenv, "grub-editenv", "grub2-editenv"]),
    })
}

/// Takes dualroot's migration entry out of a `custom.cfg` (the file goes when
/// nothing else is in it). Returns whether there was one.
pub fn remove_entry(custom: &Path) -> Result<bool> {
    let Ok(text) = fs::read_to_string(custom) else {
        return Ok(false);
    };
    match without_entry(&text) {
        Some(rest) if rest == text => Ok(false),
        Some(rest) => write_atomic(custom, rest.as_bytes()).map(|_| true),
        None => fs::remove_file(custom)
            .with_context(|| format!("removing {}", custom.display()))
            .map(|_| true),
    }
}

/// Takes back a one-shot entry an earlier `stage` armed: `custom.cfg` loses the
/// migration entry and GRUB's `next_entry` is cleared. Best effort, logged.
pub fn disarm() {
    let Ok(g) = old_grub() else { return };
    let custom = Path::new(g.dir).join("custom.cfg");
    match remove_entry(&custom) {
        Ok(true) => info!("took the migration entry out of {}", custom.display()),
        Ok(false) => {}
        Err(e) => warn!(
            "could not take the migration entry out of {}: {e:#}",
            custom.display()
        ),
    }
    if let Some(editenv) = g.editenv {
        let env = format!("{}/grubenv", g.dir);
        if let Err(e) = cmd(&editenv, [env.as_str(), "unset", "next_entry"]).run() {
            warn!("could not clear next_entry in {env}: {e:#}");
        }
    }
}

/// A verified bundle copy waiting beside the staged files, and the keyring that
/// will replace the staged one: [`Checked::commit`] puts both in place once every
/// other check has passed too. Dropped uncommitted, it removes the copy.
pub struct Checked {
    /// The plan to check with: the bundle copy and the source keyring.
    pub plan: Plan,
    /// The plan as staged: bundle and keyring in the stage directory.
    pub staged: Plan,
    pub info: StageInfo,
    bundle_new: Option<PathBuf>,
    bundle_dst: PathBuf,
    keyring: Option<(PathBuf, PathBuf)>,
}

impl Checked {
    /// Replaces the staged bundle and keyring (the keyring as a whole, so a key
    /// removed from the source keyring is no longer trusted).
    pub fn commit(mut self) -> Result<Plan> {
        if let Some(new) = self.bundle_new.take() {
            fs::rename(&new, &self.bundle_dst).with_context(|| {
                format!(
                    "renaming {} to {}",
                    new.display(),
                    self.bundle_dst.display()
                )
            })?;
        }
        if let Some((src, dst)) = self.keyring.take() {
            replace_dir_files(&src, &dst)?;
        }
        Ok(self.staged.clone())
    }
}

impl Drop for Checked {
    fn drop(&mut self) {
        if let Some(new) = &self.bundle_new {
            let _ = std::fs::remove_file(new);
        }
    }
}

/// Copies the bundle beside the stage directory's files and verifies the copy
/// (signature and the whole payload against the manifest) without replacing
/// anything staged earlier: a bad bundle, or a later refusal, leaves the
/// previous staging as it was.
pub fn stage_files(plan: &Plan, stage_dir: &Path) -> Result<Checked> {
    fs::create_dir_all(stage_dir).with_context(|| format!("creating {}", stage_dir.display()))?;
    let bundle_dst = stage_dir.join("os.bundle");
    let keyring_dst = stage_dir.join("keyring");
    let bundle_new = stage_dir.join(".os.bundle.new");
    let need = fs::metadata(&plan.bundle.path)
        .with_context(|| format!("bundle {}", plan.bundle.path.display()))?
        .len();
    if plan.bundle.path != bundle_dst {
        let st = nix::sys::statvfs::statvfs(stage_dir)
            .with_context(|| format!("statfs {}", stage_dir.display()))?;
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        if free < need + STAGE_MARGIN {
            bail!(
                "{} has {} MiB free but the bundle needs {} MiB (+{} MiB margin)",
                stage_dir.display(),
                free / MIB,
                need.div_ceil(MIB),
                STAGE_MARGIN / MIB
            );
        }
    }
    let kr = Keyring::load(&plan.bundle.keyring)?;
    let copied = plan.bundle.path != bundle_dst;
    let mut checked = Checked {
        plan: plan.clone(),
        staged: plan.clone(),
        info: StageInfo {
            bundle_sha256: String::new(),
            bundle_bytes: need,
            slot_boot_bytes: None,
        },
        bundle_new: None,
        bundle_dst: bundle_dst.clone(),
        keyring: (plan.bundle.keyring != keyring_dst)
            .then(|| (plan.bundle.keyring.clone(), keyring_dst.clone())),
    };
    // Verify a copy when the bundle comes from elsewhere, else the staged file.
    let verify_path = if copied {
        checked.bundle_new = Some(bundle_new.clone());
        checked.info.bundle_sha256 = copy_hashed(&plan.bundle.path, &bundle_new)
            .with_context(|| format!("copying the bundle to {}", bundle_new.display()))?;
        bundle_new
    } else {
        checked.info.bundle_sha256 = file_sha256(&bundle_dst)?;
        bundle_dst
    };
    let b = bundle::open(&verify_path, Some(&kr))
        .with_context(|| format!("bundle {}", plan.bundle.path.display()))?;
    bundle::reader::check_payload(b, None).with_context(|| {
        format!(
            "the bundle {} is damaged (its payload does not match its signed manifest)",
            plan.bundle.path.display()
        )
    })?;
    checked.plan.bundle.path = verify_path;
    checked.staged.bundle.path = Path::new("/").join(STAGE_DIR).join("os.bundle");
    checked.staged.bundle.keyring = Path::new("/").join(STAGE_DIR).join("keyring");
    Ok(checked)
}

/// Where the dracut module lives on the old system.
const MODULE_DIRS: [&str; 2] = [
    "/usr/lib/dracut/modules.d/90dualroot",
    "/usr/share/dracut/modules.d/90dualroot",
];

/// Everything the migration initramfs is built from, one line per input: the
/// kernel, this dualroot, the dracut module, dracut's configuration and the
/// tools it copies (by path, size and mtime). Equal stamps mean the image would
/// come out the same; a different line says what changed.
fn initramfs_stamp(kver: &str) -> Result<String> {
    let mut lines = vec![format!("kernel {kver}")];
    let exe = fs::read_link("/proc/self/exe").context("locating the running dualroot")?;
    lines.push(format!("dualroot {}", file_sha256(&exe)?));
    let mut files: Vec<PathBuf> = Vec::new();
    for d in MODULE_DIRS.iter().chain(["/etc/dracut.conf.d"].iter()) {
        if let Ok(rd) = std::fs::read_dir(d) {
            files.extend(rd.flatten().map(|e| e.path()));
        }
    }
    files.push("/etc/dracut.conf".into());
    files.sort();
    for f in &files {
        if f.is_file() {
            lines.push(format!("file {} {}", f.display(), file_sha256(f)?));
        }
    }
    let path = std::env::var("PATH").unwrap_or_default();
    for tool in [
        "dracut",
        "lvm",
        "mkfs.ext4",
        "grub-install",
        "grub2-install",
        "mkfs.vfat",
    ] {
        if let Some(p) = std::env::split_paths(&path)
            .map(|d| d.join(tool))
            .find(|c| c.is_file())
        {
            if let Ok(m) = std::fs::metadata(&p) {
                use std::os::unix::fs::MetadataExt;
                lines.push(format!("tool {} {} {}", p.display(), m.len(), m.mtime()));
            }
        }
    }
    Ok(lines.join("\n") + "\n")
}

/// dracut's arguments for the migration initramfs. A host-only image also stores
/// the old system's kernel arguments in it (`rd.lvm.lv=centos/root`,
/// `rd.lvm.lv=centos/swap`, `resume=`, `root=`): the recovery entry, which boots
/// this image after the old VG is gone, would wait for those devices, time out
/// and reboot, forever. `--no-hostonly-cmdline` keeps them out (dracut without
/// the option has no such feature); what the migration boot needs is on its
/// own menu entry (`rd.lvm.lv=` of the old root, see [`activate_old_root_arg`]).
pub fn dracut_args<'a>(help: &str, kver: &'a str) -> Vec<&'a str> {
    let mut v = vec!["--force", "--quiet", "--add", "dualroot lvm"];
    if help.contains("--no-hostonly-cmdline") {
        v.push("--no-hostonly-cmdline");
    }
    v.extend(["--kver", kver]);
    v
}

/// Builds the migration initramfs with dracut, unless the one in place was built
/// from exactly the same inputs (re-staging, e.g. with another plan or after a
/// refusal, then takes seconds instead of minutes).
fn build_initramfs(kver: &str, initramfs: &Path) -> Result<()> {
    let stamp_path = initramfs.with_extension("img.stamp");
    let stamp = initramfs_stamp(kver)?;
    if initramfs.is_file()
        && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str())
    {
        info!(
            "the migration initramfs {} is up to date (same kernel, dualroot, dracut module, configuration and tools); not rebuilt",
            initramfs.display()
        );
        return Ok(());
    }
    let _ = fs::remove_file(&stamp_path);
    let dir = initramfs.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    info!(
        "building the migration initramfs {} for kernel {kver} (dracut)...",
        initramfs.display()
    );
    // dracut 051 (Debian 11) exits 1 after printing its help: read it anyway.
    let help = crate::cmd::run_unchecked(
        &mut cmd("dracut", ["--help"]),
        None,
        std::time::Duration::from_secs(30),
    )
    .map(|(_, o)| o.stdout)
    .unwrap_or_default();
    cmd("dracut", dracut_args(&help, kver))
        .arg(initramfs)
        .run()
        .context("building the migration initramfs")?;
    check_initramfs(initramfs)?;
    write_atomic(&stamp_path, stamp.as_bytes())
}

/// dracut only logs a module whose check() failed and still "succeeds": the
/// image must hold the migration hook and dualroot, or the migration boot would
/// be an ordinary boot.
fn check_initramfs(initramfs: &Path) -> Result<()> {
    let Some(lsinitrd) = find_tool(&["lsinitrd"]) else {
        warn!(
            "lsinitrd not found: cannot check that the migration initramfs holds the dualroot hook"
        );
        return Ok(());
    };
    let listing = cmd(&lsinitrd, [initramfs]).run_stdout()?;
    let missing: Vec<&str> = ["dualroot-migrate.sh", "usr/bin/dualroot"]
        .into_iter()
        .filter(|f| !listing.contains(f))
        .collect();
    if !missing.is_empty() {
        let _ = fs::remove_file(initramfs);
        bail!(
            "dracut built {} without {} (its dualroot module was skipped: see dracut's log); removed it",
            initramfs.display(),
            missing.join(" and ")
        );
    }
    Ok(())
}

/// Free room `stage` keeps beside the staged bundle on the old root.
const STAGE_MARGIN: u64 = 64 * MIB;

/// Who vouches for the plan: its detached signature (`<plan>.sig`, made by
/// `dualroot plan sign`) checked with `keyring`. A plan from a backend (the
/// agent passes `--require-signed-plan`) must be signed: its carry list, model,
/// kernel arguments and keyring choice decide what the new OS trusts.
#[derive(Debug, Clone)]
pub struct PlanTrust {
    pub require_signature: bool,
    pub keyring: PathBuf,
}

/// Reads the plan once, checks its signature (required, or present) and parses
/// the same bytes.
pub fn load_trusted_plan(plan_path: &Path, trust: &PlanTrust) -> Result<Plan> {
    let text =
        fs::read(plan_path).with_context(|| format!("reading plan {}", plan_path.display()))?;
    let sig_path = dualroot_keys::plan_signature_path(plan_path);
    match fs::read_to_string(&sig_path) {
        Ok(sig) => {
            let ring = Keyring::load(&trust.keyring)?;
            let id = dualroot_keys::verify_plan(&ring, &text, &sig).with_context(|| {
                format!(
                    "plan {} with signature {} and keyring {}",
                    plan_path.display(),
                    sig_path.display(),
                    trust.keyring.display()
                )
            })?;
            info!("plan {} is signed by trusted key {id}", plan_path.display());
        }
        Err(_) if trust.require_signature => bail!(
            "the plan {} is not signed ({} does not exist) and a signed plan is required (--require-signed-plan): sign it with `dualroot plan sign`",
            plan_path.display(),
            sig_path.display()
        ),
        Err(_) => info!(
            "the plan {} is not signed: accepted because --require-signed-plan was not given",
            plan_path.display()
        ),
    }
    let text = String::from_utf8(text)
        .with_context(|| format!("plan {} is not UTF-8", plan_path.display()))?;
    Plan::parse(&text).with_context(|| format!("plan {}", plan_path.display()))
}

pub fn stage(
    plan_path: &Path,
    bundle: Option<&Path>,
    extra_args: &[String],
    trust: &PlanTrust,
) -> Result<Staged> {
    let res = stage_inner(plan_path, bundle, extra_args, trust);
    if res.is_err() {
        // Whatever an earlier `stage` armed must not run with what failed now.
        disarm();
    }
    res.map_err(|e| e.context("the migration was not staged and the next boot is the old system"))
}

fn stage_inner(
    plan_path: &Path,
    bundle: Option<&Path>,
    extra_args: &[String],
    trust: &PlanTrust,
) -> Result<Staged> {
    let mut plan = load_trusted_plan(plan_path, trust)?;
    if let Some(b) = bundle {
        plan.bundle.path = b.to_path_buf();
    }
    let env = Env::live();
    let stage_dir = Path::new("/").join(STAGE_DIR);
    let checked = stage_files(&plan, &stage_dir)?;

    // Everything the initramfs will check, checked now on the running system
    // first, on the verified copy: nothing staged earlier is replaced before.
    let rep = preflight::run(&checked.plan, &env);
    info!("{}", rep.render());
    if !rep.ok() {
        bail!("preflight found {} blocker(s)", rep.blockers.len());
    }
    let mut stage_info = checked.info.clone();
    let staged_plan = checked.commit()?;
    // The layout preflight resolved (`auto` sizes) is what the migration uses.
    let mut staged_plan = staged_plan;
    if let Some(s) = rep.sizes {
        staged_plan.sizes = crate::plan::Sizes::from_bytes(&s);
    }
    stage_info.slot_boot_bytes = rep.needs.slot_boot_files;
    let staged_plan_path = stage_dir.join("plan.toml");
    write_atomic(&staged_plan_path, toml::to_string(&staged_plan)?.as_bytes())?;
    write_atomic(
        &Path::new("/").join(STAGE_INFO),
        stage_info.to_toml().as_bytes(),
    )?;
    // NIC drivers may be missing from a host-only initramfs: the inventory the
    // migration pins names from is taken here, on the running system.
    write_atomic(
        &Path::new("/").join(STAGE_NICS),
        &serde_json::to_vec_pretty(&rep.nics)?,
    )?;

    let kver = preflight::kernel_release(&env);
    let initramfs = Path::new("/").join(MIGRATION_INITRAMFS);
    build_initramfs(&kver, &initramfs)?;
    // Memory and /boot room again, now with the real size of the initramfs the
    // recovery entry boots (the payload is not decoded again).
    let recheck = preflight::run(
        &staged_plan,
        &Env {
            accounts_dry_run: false,
            ..Env::live()
        },
    );
    if !recheck.ok() {
        info!("{}", recheck.render());
        bail!(
            "with the migration initramfs built, preflight found {} blocker(s)",
            recheck.blockers.len()
        );
    }

    let cmdline = fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    let grub = old_grub()?;
    let probe = find_tool(&["grub-probe", "grub2-probe"])
        .context("neither grub-probe nor grub2-probe is installed")?;
    let boot_uuid = cmd(&probe, ["--target=fs_uuid", "/boot"])
        .run_stdout()?
        .trim()
        .to_string();
    let mi = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let boot_prefix = if crate::sysinfo::mount_device(&mi, "/boot").is_some() {
        ""
    } else {
        "/boot"
    };
    let entry = render_entry(
        &boot_uuid,
        boot_prefix,
        &format!("vmlinuz-{kver}"),
        &root_arg(&cmdline)?,
        &staged_plan_path
            .strip_prefix("/")
            .unwrap_or(&staged_plan_path)
            .display()
            .to_string(),
        &[carry_kernel_args(&cmdline)]
            .into_iter()
            .chain(rep.source.as_ref().and_then(activate_old_root_arg))
            .chain(extra_args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
    );
    // GRUB sources custom.cfg from the generated grub.cfg (41_custom) on Debian and
    // EL alike, so no grub-mkconfig run is needed.
    let cfg = fs::read_to_string(format!("{}/grub.cfg", grub.dir)).unwrap_or_default();
    if !cfg.contains("custom.cfg") {
        bail!(
            "{}/grub.cfg does not source custom.cfg; regenerate it with grub-mkconfig (41_custom) first",
            grub.dir
        );
    }
    let custom = Path::new(grub.dir).join("custom.cfg");
    let existing = match fs::read_to_string(&custom) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", custom.display())),
    };
    write_atomic(&custom, with_entry(&existing, &entry).as_bytes())?;
    cmd(&grub.reboot_tool, [ENTRY_ID])
        .run()
        .context("setting the one-shot boot entry")?;
    nix::unistd::sync();
    info!("staged: the next boot (once) runs the migration; later boots fall back to this system if it does not finish");
    Ok(Staged {
        plan_path: staged_plan_path,
        initramfs,
        entry,
        grub_tool: grub.reboot_tool,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 23 item 1: a plan from a backend must carry a vendor signature over
    /// its exact bytes; a changed plan (a carry `dest` to authorized_keys, a
    /// `model`, `selinux=0` in kernel_args) no longer verifies.
    #[test]
    fn a_required_plan_signature_is_checked_over_the_exact_bytes() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("vendor.key");
        crate::keys::generate(&secret, "vendor").unwrap();
        let ring = d.path().join("ring");
        fs::create_dir_all(&ring).unwrap();
        fs::copy(d.path().join("vendor.key.pub"), ring.join("vendor.pub")).unwrap();
        let text = "[bundle]\npath = \"/b\"\nkeyring = \"/k\"\n";
        let plan = d.path().join("plan.toml");
        fs::write(&plan, text).unwrap();
        let trust = PlanTrust {
            require_signature: true,
            keyring: ring.clone(),
        };
        let e = format!("{:#}", load_trusted_plan(&plan, &trust).unwrap_err());
        assert!(
            e.contains("not signed") && e.contains("plan.toml.sig"),
            "{e}"
        );
        let lax = PlanTrust {
            require_signature: false,
            keyring: ring.clone(),
        };
        load_trusted_plan(&plan, &lax).expect("an operator may stage an unsigned plan by hand");

        let key = crate::keys::load_secret(&secret).unwrap();
        fs::write(
            dualroot_keys::plan_signature_path(&plan),
            dualroot_keys::sign_plan(&key, text.as_bytes()),
        )
        .unwrap();
        let p = load_trusted_plan(&plan, &trust).unwrap();
        assert_eq!(p.bundle.path, PathBuf::from("/b"));
        // The backend adds a carry to root's authorized_keys: refused, even
        // where no signature is required (a signature that does not verify is
        // never ignored).
        fs::write(
            &plan,
            format!(
                "{text}[[carry]]\npath = \"/var/lib/x\"\ndest = \"/root/.ssh/authorized_keys\"\n"
            ),
        )
        .unwrap();
        for t in [&trust, &lax] {
            let e = format!("{:#}", load_trusted_plan(&plan, t).unwrap_err());
            assert!(e.contains("changed after signing"), "{e}");
        }
    }

    /// A refusal or an undo takes stage's entry out of the old custom.cfg, so
    /// the old system's /boot is as it was before stage.
    #[test]
    fn remove_entry_keeps_the_operators_lines_and_drops_a_file_of_ours() {
        let d = tempfile::tempdir().unwrap();
        let entry = "menuentry 'dualroot migration' --id dualroot-migrate {\n}\n";
        let ours = d.path().join("ours.cfg");
        fs::write(&ours, with_entry("", entry)).unwrap();
        assert!(remove_entry(&ours).unwrap());
        assert!(!ours.exists());
        let mixed = d.path().join("mixed.cfg");
        fs::write(&mixed, with_entry("set timeout=5\n", entry)).unwrap();
        assert!(remove_entry(&mixed).unwrap());
        assert_eq!(fs::read_to_string(&mixed).unwrap(), "set timeout=5\n");
        assert!(!remove_entry(&mixed).unwrap(), "nothing of ours left");
        assert!(!remove_entry(&d.path().join("none.cfg")).unwrap());
    }

    /// Issue 23 item 12: an operator's custom.cfg survives stage and disarm.
    #[test]
    fn the_operators_custom_cfg_is_kept() {
        let operator = "menuentry 'rescue' {\n  linux /vmlinuz-rescue\n}\n";
        let entry = "menuentry 'dualroot migration' --id dualroot-migrate {\n}\n";
        let armed = with_entry(operator, entry);
        assert!(
            armed.starts_with(operator) && armed.contains(entry),
            "{armed}"
        );
        // Staging again replaces the block instead of stacking a second one.
        let again = with_entry(&armed, entry);
        assert_eq!(again.matches("--id dualroot-migrate").count(), 1);
        assert_eq!(without_entry(&again).as_deref(), Some(operator));
        // Only ours: the file goes.
        assert_eq!(without_entry(&with_entry("", entry)), None);
        // A file written by an older stage (header, no markers) is ours.
        let older = format!("# Written by `dualroot stage`: one-shot migration entry (grub-reboot dualroot-migrate).\n{entry}");
        assert_eq!(without_entry(&older), None);
        // No trailing newline in the operator's file.
        let armed = with_entry("set timeout=5", entry);
        assert_eq!(without_entry(&armed).as_deref(), Some("set timeout=5\n"));
        assert!(!armed.contains("set timeout=5###"));
    }

    #[test]
    fn kernel_args_drop_root_and_initrd_bits() {
        let c = "BOOT_IMAGE=/boot/vmlinuz-5.10.0-30-amd64 root=UUID=abc ro console=ttyS0 net.ifnames=0 panic=10 rd.dualroot.migrate=/x dualroot.slot=a quiet resume=/dev/mapper/centos-swap rd.lvm.lv=centos/root";
        assert_eq!(carry_kernel_args(c), "console=ttyS0 net.ifnames=0 quiet");
        assert_eq!(root_arg(c).unwrap(), "UUID=abc");
    }

    #[test]
    fn the_migration_initramfs_keeps_no_old_kernel_arguments() {
        let dracut_051 = "Usage: dracut [OPTION]... [<initramfs> [<kernel-version>]]\n  --hostonly-cmdline    Store kernel command line arguments needed\n  --no-hostonly-cmdline Do not store kernel command line arguments needed\n";
        let a = dracut_args(dracut_051, "5.10.0-32-amd64");
        assert!(a.contains(&"--no-hostonly-cmdline"), "{a:?}");
        assert_eq!(&a[a.len() - 2..], ["--kver", "5.10.0-32-amd64"]);
        // An old dracut (EL 7.0's 033) has neither the option nor the feature.
        let dracut_033 = "Usage: dracut [OPTION]... [<initramfs> [<kernel-version>]]\n  -H, --hostonly        Host-Only mode\n";
        assert!(
            !dracut_args(dracut_033, "3.10.0-123.el7.x86_64").contains(&"--no-hostonly-cmdline")
        );
    }

    #[test]
    fn entry_is_valid_grub_script() {
        let e = render_entry(
            "1234-abcd",
            "/boot",
            "vmlinuz-5.10.0",
            "UUID=abc",
            "var/lib/dualroot/stage/plan.toml",
            "console=ttyS0",
        );
        assert!(e.contains("--id dualroot-migrate"));
        assert!(e.contains("linux /boot/vmlinuz-5.10.0 root=UUID=abc ro rd.dualroot.migrate=/var/lib/dualroot/stage/plan.toml"));
        assert!(e.contains("initrd /boot/dualroot/initramfs-migrate.img"));
        // A root that never shows up must end in a reboot into the old system.
        assert!(
            e.contains("rd.shell=0 rd.emergency=reboot rd.timeout=180"),
            "{e}"
        );
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("custom.cfg");
        fs::write(&p, &e).unwrap();
        cmd("grub-script-check", [&p]).run().unwrap();
    }
}
