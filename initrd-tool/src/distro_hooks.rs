//! Keeping the A/B boot when a slot's own package manager installs a kernel or
//! GRUB (issue 15). Each distribution has its extension points; dualroot puts a
//! hook into each that runs `dualroot slot update-boot`, which copies the slot's
//! kernel and initramfs to `/boot/<slot>/` and regenerates dualroot's grub.cfg:
//!
//! - Debian: `/etc/kernel/postinst.d/zzz-dualroot` (after initramfs-tools and
//!   zz-update-grub), `/etc/initramfs/post-update.d/dualroot` (every
//!   update-initramfs), and `update-grub` diverted (dpkg-divert) to a script that
//!   runs dualroot instead of writing the distribution's grub.cfg.
//! - EL (kernel-install, BLS, grub2-mkconfig): `/etc/kernel/install.d/
//!   99-dualroot.install`, `GRUB_ENABLE_BLSCFG=false`, and `grub2-mkconfig`
//!   replaced like `update-grub`. Checked by unit tests only: no EL packages are
//!   reachable from the machines this is built on.
//!
//! The files are written into a new root by the migration's and `slot install`'s
//! sync (through `fsutil::in_root`).

use crate::bootfiles::NO_HOOK_ENV;
use crate::fsutil::in_root;
use crate::sync::DUALROOT_BIN;
use anyhow::Result;
use fs_err as fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Which family a root tree belongs to, from the tools it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// dpkg, /etc/kernel/postinst.d, initramfs-tools or dracut.
    Debian,
    /// rpm, kernel-install, grub2-mkconfig.
    El,
}

impl Family {
    pub fn of_root(root: &Path) -> Option<Family> {
        let has = |p: &str| root.join(p).exists();
        if has("usr/bin/dpkg") || has("var/lib/dpkg/status") {
            Some(Family::Debian)
        } else if has("usr/bin/rpm") || has("usr/bin/kernel-install") {
            Some(Family::El)
        } else {
            None
        }
    }
}

/// One file dualroot puts into a slot: path in the root, mode, content.
#[derive(Debug, Clone, PartialEq)]
pub struct HookFile {
    pub path: &'static str,
    pub mode: u32,
    pub text: String,
}

const MARK: &str =
    "# Written by dualroot: keeps the A/B boot menu when this slot installs a kernel.";

fn update_boot_cmd(arg: &str) -> String {
    format!("/{DUALROOT_BIN} slot update-boot{arg}")
}

/// The hook files for a family (the diversion itself is made by [`install`]).
pub fn hook_files(family: Family) -> Vec<HookFile> {
    let sh = |body: String| format!("#!/bin/sh\n{MARK}\n{body}\n");
    // dualroot itself rebuilding the initramfs (migration, slot install) installs
    // the result itself; the hook would run outside any booted slot.
    let guard = format!("[ -n \"${NO_HOOK_ENV}\" ] && exit 0\n");
    match family {
        Family::Debian => vec![
            HookFile {
                path: "etc/kernel/postinst.d/zzz-dualroot",
                mode: 0o755,
                // $1 is the kernel version being installed.
                text: sh(format!("{guard}exec {} --kernel \"$1\"", update_boot_cmd(""))),
            },
            HookFile {
                path: "etc/initramfs/post-update.d/dualroot",
                mode: 0o755,
                // update-initramfs passes the version and the image path.
                text: sh(format!("{guard}exec {} --kernel \"$1\"", update_boot_cmd(""))),
            },
            HookFile {
                path: UPDATE_GRUB,
                mode: 0o755,
                text: sh(format!(
                    "# update-grub is diverted to {UPDATE_GRUB}.distrib: the distribution's\n# grub.cfg would replace the A/B menu on the shared /boot.\nexec {}",
                    update_boot_cmd("")
                )),
            },
            HookFile {
                // After every dpkg run: an updated shim-signed or
                // grub-efi-amd64-signed reaches the slot's chain on the ESP
                // (which the slot does not mount); a no-op when nothing changed
                // or on BIOS. Never fails apt.
                path: APT_EFI_HOOK,
                mode: 0o644,
                text: format!(
                    "// Written by dualroot: keeps this slot's UEFI boot chain on the ESP current.\nDPkg::Post-Invoke {{ \"if [ -d /sys/firmware/efi ] && [ -x /{DUALROOT_BIN} ]; then {} || true; fi\"; }};\n",
                    update_boot_cmd(" --chain")
                ),
            },
        ],
        Family::El => vec![
            HookFile {
                path: "etc/kernel/install.d/99-dualroot.install",
                mode: 0o755,
                // kernel-install calls plugins with COMMAND KERNEL-VERSION ...
                text: sh(format!(
                    "{guard}[ \"$1\" = add ] || exit 0\nexec {} --kernel \"$2\"",
                    update_boot_cmd("")
                )),
            },
            HookFile {
                path: GRUB2_MKCONFIG,
                mode: 0o755,
                text: sh(format!(
                    "# grub2-mkconfig is replaced: the distribution's grub.cfg (and its BLS\n# entries) would replace the A/B menu on the shared /boot.\nexec {}",
                    update_boot_cmd("")
                )),
            },
        ],
    }
}

const UPDATE_GRUB: &str = "usr/sbin/update-grub";
const APT_EFI_HOOK: &str = "etc/apt/apt.conf.d/99dualroot-efi-chain";
const GRUB2_MKCONFIG: &str = "usr/sbin/grub2-mkconfig";

/// Whether `path` in `root` is already dualroot's (re-runs keep the diversion).
fn ours(root: &Path, path: &str) -> bool {
    fs::read_to_string(root.join(path)).is_ok_and(|t| t.contains(MARK))
}

/// Puts the hooks into `root`. On Debian `update-grub` is first diverted with the
/// root's own `dpkg-divert` (in a chroot), so package upgrades install theirs
/// beside it. Returns what was done, for the journal.
pub fn install(root: &Path) -> Result<String> {
    let Some(family) = Family::of_root(root) else {
        return Ok("no dpkg or rpm in the new root: no distribution kernel hooks installed".into());
    };
    for (tool, distrib) in [
        (UPDATE_GRUB, "usr/sbin/update-grub.distrib"),
        (GRUB2_MKCONFIG, "usr/sbin/grub2-mkconfig.distrib"),
    ] {
        if !root.join(tool).exists() || ours(root, tool) {
            continue;
        }
        let diverted = family == Family::Debian
            && root.join("usr/bin/dpkg-divert").exists()
            && crate::cmd::CommandExt::run(&mut crate::cmd::cmd(
                "chroot",
                [
                    root.as_os_str(),
                    "dpkg-divert".as_ref(),
                    "--local".as_ref(),
                    "--rename".as_ref(),
                    "--divert".as_ref(),
                    Path::new("/").join(distrib).as_os_str(),
                    "--add".as_ref(),
                    Path::new("/").join(tool).as_os_str(),
                ],
            ))
            .map_err(|e| {
                log::warn!("dpkg-divert of /{tool} failed ({e:#}); moving it aside instead")
            })
            .is_ok();
        if !diverted {
            // Without a diversion a grub package upgrade may put the tool back;
            // the kernel hook (zzz-dualroot) still rewrites dualroot's grub.cfg after it.
            let to = in_root(root, Path::new(distrib))?;
            fs::rename(root.join(tool), &to)?;
        }
    }
    // EL: no BLS entries for a grub.cfg that dualroot does not write.
    let default_grub = root.join("etc/default/grub");
    if family == Family::El {
        if let Ok(text) = fs::read_to_string(&default_grub) {
            if !text.lines().any(|l| l.trim() == "GRUB_ENABLE_BLSCFG=false") {
                let p = in_root(root, Path::new("etc/default/grub"))?;
                fs::write(&p, format!("{text}{MARK}\nGRUB_ENABLE_BLSCFG=false\n"))?;
            }
        }
    }
    let files = hook_files(family);
    for f in &files {
        let p = in_root(root, Path::new(f.path))?;
        fs::write(&p, &f.text)?;
        fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode))?;
    }
    Ok(format!(
        "{} kernel and GRUB hooks installed ({})",
        match family {
            Family::Debian => "Debian",
            Family::El => "EL",
        },
        files.iter().map(|f| f.path).collect::<Vec<_>>().join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_hooks_call_update_boot_and_replace_update_grub() {
        let f = hook_files(Family::Debian);
        let post = f
            .iter()
            .find(|h| h.path == "etc/kernel/postinst.d/zzz-dualroot")
            .unwrap();
        assert!(post.text.starts_with("#!/bin/sh\n"));
        assert!(post
            .text
            .contains("exec /usr/local/sbin/dualroot slot update-boot --kernel \"$1\""));
        // After initramfs-tools and zz-update-grub in run-parts order.
        assert!("zzz-dualroot" > "zz-update-grub" && "zzz-dualroot" > "initramfs-tools");
        assert!(f
            .iter()
            .any(|h| h.path == "etc/initramfs/post-update.d/dualroot" && h.mode == 0o755));
        let ug = f.iter().find(|h| h.path == "usr/sbin/update-grub").unwrap();
        assert!(ug.text.contains("slot update-boot"));
    }

    /// The apt hook is read by the real apt-config as one DPkg::Post-Invoke
    /// command that refreshes the UEFI chain and never fails apt.
    #[test]
    fn the_apt_hook_parses_and_refreshes_the_efi_chain() {
        let h = hook_files(Family::Debian)
            .into_iter()
            .find(|h| h.path == APT_EFI_HOOK)
            .unwrap();
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("hook.conf");
        fs::write(&conf, &h.text).unwrap();
        let out = std::process::Command::new("apt-config")
            .arg("-c")
            .arg(&conf)
            .args(["dump", "DPkg::Post-Invoke"])
            .output()
            .expect("apt-config (apt) runs the parse check");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("/usr/local/sbin/dualroot slot update-boot --chain || true"),
            "{text}"
        );
    }

    #[test]
    fn kernel_hooks_stand_aside_while_dualroot_rebuilds_the_initramfs() {
        let d = tempfile::tempdir().unwrap();
        for family in [Family::Debian, Family::El] {
            for h in hook_files(family)
                .iter()
                .filter(|h| !h.path.starts_with("usr/sbin/") && h.mode == 0o755)
            {
                let p = d.path().join("hook");
                fs::write(&p, &h.text).unwrap();
                let run = |env: bool| {
                    let mut c = std::process::Command::new("sh");
                    c.arg(&p).args(["add", "6.12.0"]).env_remove(NO_HOOK_ENV);
                    if env {
                        c.env(NO_HOOK_ENV, "1");
                    }
                    c.output().unwrap().status.success()
                };
                // With the variable the hook ends at once; without it, it execs
                // dualroot (not installed here, so it fails).
                assert!(run(true), "{}", h.path);
                assert!(!run(false), "{}", h.path);
            }
        }
    }

    #[test]
    fn el_hooks_use_kernel_install_and_disable_bls() {
        let f = hook_files(Family::El);
        let ki = f
            .iter()
            .find(|h| h.path == "etc/kernel/install.d/99-dualroot.install")
            .unwrap();
        assert!(ki.text.contains("[ \"$1\" = add ] || exit 0"));
        assert!(ki.text.contains("--kernel \"$2\""));
        assert!(f.iter().any(|h| h.path == "usr/sbin/grub2-mkconfig"));
    }

    #[test]
    fn installs_into_a_root_and_keeps_the_distribution_tool() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        // An EL-like tree (no dpkg-divert: the tool is renamed aside).
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("usr/sbin")).unwrap();
        std::fs::write(r.join("usr/bin/rpm"), "").unwrap();
        std::fs::write(r.join("usr/sbin/grub2-mkconfig"), "distribution's").unwrap();
        std::fs::create_dir_all(r.join("etc/default")).unwrap();
        std::fs::write(r.join("etc/default/grub"), "GRUB_ENABLE_BLSCFG=true\n").unwrap();
        let note = install(r).unwrap();
        assert!(note.starts_with("EL"), "{note}");
        assert_eq!(
            std::fs::read_to_string(r.join("usr/sbin/grub2-mkconfig.distrib")).unwrap(),
            "distribution's"
        );
        assert!(ours(r, GRUB2_MKCONFIG));
        let g = std::fs::read_to_string(r.join("etc/default/grub")).unwrap();
        assert!(g.ends_with("GRUB_ENABLE_BLSCFG=false\n"), "{g}");
        // Re-runnable: the distribution's copy stays where it is.
        install(r).unwrap();
        assert_eq!(
            std::fs::read_to_string(r.join("usr/sbin/grub2-mkconfig.distrib")).unwrap(),
            "distribution's"
        );
        assert_eq!(Family::of_root(d.path()), Some(Family::El));
    }
}
