//! `dualroot stage` on the running old system: place the bundle and plan where the
//! initramfs finds them, build the migration initramfs with dracut, and add a
//! one-shot boot entry. If the initramfs crashes, the next boot is the old system.

use super::preflight::{self, Env};
use crate::cmd::{cmd, find_tool, CommandExt};
use crate::plan::Plan;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

pub const STAGE_DIR: &str = "var/lib/dualroot/stage";
pub const STAGE_NICS: &str = "var/lib/dualroot/stage/nics.json";
pub const STAGE_INFO: &str = "var/lib/dualroot/stage/stage.toml";
pub const MIGRATION_INITRAMFS: &str = "boot/dualroot/initramfs-migrate.img";
pub const ENTRY_ID: &str = "dualroot-migrate";

#[derive(Debug)]
pub struct Staged {
    pub plan_path: PathBuf,
    pub initramfs: PathBuf,
    pub entry: String,
    pub grub_tool: String,
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
        "# Written by `dualroot stage`: one-shot migration entry (grub-reboot {ENTRY_ID}).\nmenuentry 'dualroot migration' --id {ENTRY_ID} {{\n  search --no-floppy --fs-uuid --set=root {boot_uuid}\n  linux {boot_prefix}/{kernel} root={root} ro rd.dualroot.migrate=/{plan} panic=10 rd.shell=0 rd.emergency=reboot {args}\n  initrd {boot_prefix}/dualroot/initramfs-migrate.img\n}}\n"
    )
}

pub fn stage(
    plan_path: &Path,
    bundle: Option<&Path>,
    reboot: bool,
    extra_args: &[String],
) -> Result<Staged> {
    let mut plan = Plan::load(plan_path)?;
    if let Some(b) = bundle {
        plan.bundle.path = b.to_path_buf();
    }
    let env = Env::live();
    let stage_dir = Path::new("/").join(STAGE_DIR);
    fs::create_dir_all(&stage_dir).with_context(|| format!("creating {}", stage_dir.display()))?;

    // The bundle and keyring go next to the plan on the old root; the staged plan
    // points at them.
    let bundle_dst = stage_dir.join("os.bundle");
    let keyring_dst = stage_dir.join("keyring");
    let mut staged_plan = plan.clone();
    if plan.bundle.path != bundle_dst {
        let need = fs::metadata(&plan.bundle.path)
            .with_context(|| format!("bundle {}", plan.bundle.path.display()))?
            .len();
        let st = nix::sys::statvfs::statvfs(&stage_dir)?;
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        if free < need + (64 << 20) {
            bail!(
                "{} has {} MiB free but the bundle needs {} MiB (+64 MiB margin); nothing was staged",
                stage_dir.display(),
                free >> 20,
                need >> 20
            );
        }
        fs::copy(&plan.bundle.path, &bundle_dst)
            .with_context(|| format!("copying the bundle to {}", bundle_dst.display()))?;
        staged_plan.bundle.path = Path::new("/").join(STAGE_DIR).join("os.bundle");
    }
    if plan.bundle.keyring != keyring_dst {
        fs::create_dir_all(&keyring_dst)?;
        for e in fs::read_dir(&plan.bundle.keyring)
            .with_context(|| format!("keyring {}", plan.bundle.keyring.display()))?
        {
            let e = e?;
            fs::copy(e.path(), keyring_dst.join(e.file_name()))?;
        }
        staged_plan.bundle.keyring = keyring_dst.clone();
    }
    let staged_plan_path = stage_dir.join("plan.toml");
    fs::write(&staged_plan_path, toml::to_string(&staged_plan)?)?;
    let sha = super::steps::file_sha256(&bundle_dst)?;
    fs::write(
        Path::new("/").join(STAGE_INFO),
        format!("bundle_sha256 = \"{sha}\"\n"),
    )?;

    // Everything the initramfs will check, checked now on the running system first.
    let rep = preflight::run(&staged_plan, &env);
    eprint!("{}", rep.render());
    let payload_check = crate::keys::Keyring::load(&keyring_dst)
        .and_then(|kr| crate::bundle::open(&bundle_dst, Some(&kr)))
        .and_then(|b| crate::bundle::reader::check_payload(b, None));
    if let Err(e) = payload_check {
        bail!("the staged bundle is damaged: {e:#}; the migration was not staged and the next boot is the old system");
    }
    if !rep.ok() {
        bail!("preflight found {} blocker(s); the migration was not staged and the next boot is the old system", rep.blockers.len());
    }

    // NIC drivers may be missing from a host-only initramfs: the inventory the
    // migration pins names from is taken here, on the running system.
    fs::write(
        stage_dir.join("nics.json"),
        serde_json::to_vec_pretty(&rep.nics)?,
    )?;

    let kver = preflight::kernel_release(&env);
    let initramfs = Path::new("/").join(MIGRATION_INITRAMFS);
    fs::create_dir_all(initramfs.parent().unwrap_or(Path::new("/")))?;
    eprintln!(
        "building the migration initramfs {} for kernel {kver} (dracut)...",
        initramfs.display()
    );
    cmd(
        "dracut",
        [
            "--force",
            "--quiet",
            "--add",
            "dualroot lvm",
            "--kver",
            &kver,
        ],
    )
    .arg(&initramfs)
    .run()
    .context("building the migration initramfs")?;

    let cmdline = fs::read_to_string("/proc/cmdline")?;
    let (grub_dir, reboot_tool, probe) = if Path::new("/boot/grub2").is_dir() {
        ("/boot/grub2", "grub2-reboot", "grub2-probe")
    } else {
        ("/boot/grub", "grub-reboot", "grub-probe")
    };
    let reboot_tool = find_tool(&[reboot_tool, "grub-reboot", "grub2-reboot"])
        .context("neither grub-reboot nor grub2-reboot is installed")?;
    let probe = find_tool(&[probe, "grub-probe", "grub2-probe"])
        .context("neither grub-probe nor grub2-probe is installed")?;
    let boot_uuid = cmd(&probe, ["--target=fs_uuid", "/boot"])
        .run_stdout()?
        .trim()
        .to_string();
    let mi = fs::read_to_string("/proc/self/mountinfo")?;
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
            .chain(extra_args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
    );
    // GRUB sources custom.cfg from the generated grub.cfg (41_custom) on Debian and
    // EL alike, so no grub-mkconfig run is needed.
    let cfg = fs::read_to_string(format!("{grub_dir}/grub.cfg")).unwrap_or_default();
    if !cfg.contains("custom.cfg") {
        bail!("{grub_dir}/grub.cfg does not source custom.cfg; regenerate it with grub-mkconfig (41_custom) first");
    }
    fs::write(format!("{grub_dir}/custom.cfg"), &entry)?;
    cmd(&reboot_tool, [ENTRY_ID])
        .run()
        .context("setting the one-shot boot entry")?;
    nix::unistd::sync();
    eprintln!("staged: the next boot (once) runs the migration; later boots fall back to this system if it does not finish");
    if reboot {
        cmd("systemctl", ["reboot"]).run()?;
    }
    Ok(Staged {
        plan_path: staged_plan_path,
        initramfs,
        entry,
        grub_tool: reboot_tool,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_args_drop_root_and_initrd_bits() {
        let c = "BOOT_IMAGE=/boot/vmlinuz-5.10.0-30-amd64 root=UUID=abc ro console=ttyS0 net.ifnames=0 panic=10 rd.dualroot.migrate=/x dualroot.slot=a quiet";
        assert_eq!(carry_kernel_args(c), "console=ttyS0 net.ifnames=0 quiet");
        assert_eq!(root_arg(c).unwrap(), "UUID=abc");
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
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("custom.cfg");
        fs::write(&p, &e).unwrap();
        cmd("grub-script-check", [&p]).run().unwrap();
    }
}
