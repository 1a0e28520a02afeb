//! SELinux labels for what dualroot writes into a new root (issue 15 item 4).
//! The migration and `slot install` write account databases, fstab, units,
//! hooks and carried files from an environment without the new OS's policy
//! loaded, so those files carry no label; on an enforcing EL9 target logins
//! then fail. When the new root enables SELinux, the whole root is labelled
//! offline with its own `setfiles` and policy (what image builders do); when it
//! cannot be, `/.autorelabel` makes the first boot relabel and reboot, and that
//! reboot is paid with one extra boot try (see [`RELABEL_PENDING`]) so it never
//! counts against the slot.

use crate::bootfiles::Sandbox;
use anyhow::Result;
use fs_err as fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disabled,
    Permissive,
    Enforcing,
}

/// `SELINUX=` and `SELINUXTYPE=` of an `/etc/selinux/config`.
pub fn parse_config(text: &str) -> (Mode, String) {
    let mut mode = Mode::Disabled;
    let mut kind = "targeted".to_string();
    for l in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        if let Some(v) = l.strip_prefix("SELINUX=") {
            mode = match v.trim().trim_matches('"') {
                "enforcing" => Mode::Enforcing,
                "permissive" => Mode::Permissive,
                _ => Mode::Disabled,
            };
        } else if let Some(v) = l.strip_prefix("SELINUXTYPE=") {
            kind = v.trim().trim_matches('"').to_string();
        }
    }
    (mode, kind)
}

/// What to do for a root tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No `/etc/selinux/config`, or `SELINUX=disabled`.
    NotEnabled,
    /// Label the whole root with its `setfiles` and this `file_contexts`
    /// (a path inside the root).
    Setfiles { file_contexts: PathBuf },
    /// No way to label offline: `/.autorelabel`, with the reason.
    AutoRelabel { why: String },
}

pub fn decide(root: &Path) -> Decision {
    let Ok(text) = fs::read_to_string(root.join("etc/selinux/config")) else {
        return Decision::NotEnabled;
    };
    let (mode, kind) = parse_config(&text);
    if mode == Mode::Disabled {
        return Decision::NotEnabled;
    }
    let fc = PathBuf::from(format!("/etc/selinux/{kind}/contexts/files/file_contexts"));
    let setfiles = ["usr/sbin/setfiles", "sbin/setfiles"]
        .iter()
        .any(|p| root.join(p).exists());
    if !setfiles {
        return Decision::AutoRelabel {
            why: "the new root has no setfiles".into(),
        };
    }
    if !root.join(fc.strip_prefix("/").unwrap_or(&fc)).is_file() {
        return Decision::AutoRelabel {
            why: format!("the new root has no {}", fc.display()),
        };
    }
    Decision::Setfiles { file_contexts: fc }
}

/// Next to a slot's kernel: its first boot relabels and reboots, so GRUB gives
/// it one try more than asked (migration `done`, `slot switch`).
pub const RELABEL_PENDING: &str = "relabel-pending";

/// Labels `root` as [`decide`] says; a failing `setfiles` falls back to
/// `/.autorelabel`. Returns a sentence for the journal, and whether the first
/// boot will relabel (and reboot).
pub fn label(root: &Path) -> Result<(String, bool)> {
    let why = match decide(root) {
        Decision::NotEnabled => {
            return Ok(("SELinux is not enabled in the new root".into(), false))
        }
        Decision::Setfiles { file_contexts } => {
            let started = std::time::Instant::now();
            let fc = file_contexts.as_os_str();
            let res = Sandbox::new(root).run(&[
                "setfiles".as_ref(),
                "-F".as_ref(),
                "-e".as_ref(),
                "/proc".as_ref(),
                "-e".as_ref(),
                "/sys".as_ref(),
                "-e".as_ref(),
                "/dev".as_ref(),
                fc,
                "/".as_ref(),
            ]);
            match res {
                Ok(()) => {
                    let _ = fs::remove_file(root.join(".autorelabel"));
                    return Ok((
                        format!(
                            "SELinux: the new root was labelled with its setfiles and {} in {:.1} s",
                            file_contexts.display(),
                            started.elapsed().as_secs_f64()
                        ),
                        false,
                    ));
                }
                Err(e) => format!("setfiles failed ({e:#})"),
            }
        }
        Decision::AutoRelabel { why } => why,
    };
    crate::fsutil::write_atomic(
        &crate::fsutil::in_root(root, Path::new(".autorelabel"))?,
        b"",
    )?;
    Ok((
        format!("SELinux: {why}; /.autorelabel set, the first boot relabels and reboots (one extra boot try)"),
        true,
    ))
}

/// Labels the new `/boot` (slot kernels, GRUB's files, the environment block)
/// with the new root's `setfiles` and policy, bound at the root's `/boot`: the
/// migration writes them from an initramfs with no policy loaded, so they would
/// stay unlabelled. Where the root itself is not labelled offline (no policy,
/// `/.autorelabel`) the first boot's relabel covers `/boot` too. Never fatal: a
/// failure is a sentence, and the first boot relabels.
pub fn label_boot(root: &Path, boot: &Path) -> Result<String> {
    let Decision::Setfiles { file_contexts } = decide(root) else {
        return Ok(
            "SELinux: /boot is labelled with the root (not enabled, or relabelled at first boot)"
                .into(),
        );
    };
    let fc = file_contexts.as_os_str();
    let res = Sandbox::new(root).rw_bind(boot, "boot")?.run(&[
        "setfiles".as_ref(),
        "-F".as_ref(),
        fc,
        "/boot".as_ref(),
    ]);
    Ok(match res {
        Ok(()) => format!(
            "SELinux: /boot was labelled with the new root's setfiles and {}",
            file_contexts.display()
        ),
        Err(e) => {
            crate::fsutil::write_atomic(
                &crate::fsutil::in_root(root, Path::new(".autorelabel"))?,
                b"",
            )?;
            format!("SELinux: labelling /boot failed ({e:#}); /.autorelabel set, the first boot relabels")
        }
    })
}

/// Records in a slot's boot directory whether its root will relabel on first
/// boot (`/.autorelabel` present).
pub fn mark_slot(root: &Path, slot_dir: &Path) -> Result<bool> {
    let pending = root.join(".autorelabel").exists();
    let marker = slot_dir.join(RELABEL_PENDING);
    if pending {
        crate::fsutil::write_atomic(&marker, b"1\n")?;
    } else if marker.exists() {
        fs::remove_file(&marker)?;
    }
    Ok(pending)
}

/// The tries a slot gets: one more when its first boot relabels.
pub fn tries_for(slot_dir: &Path, tries: u32) -> u32 {
    tries + u32::from(slot_dir.join(RELABEL_PENDING).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (p, text) in files {
            let f = d.path().join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, text).unwrap();
        }
        d
    }

    const EL9: &str = "# This file controls the state of SELinux\nSELINUX=enforcing\n# SELINUXTYPE= can take\nSELINUXTYPE=targeted\n";

    #[test]
    fn config_is_read_like_libselinux() {
        assert_eq!(parse_config(EL9), (Mode::Enforcing, "targeted".into()));
        assert_eq!(
            parse_config("SELINUX=permissive\nSELINUXTYPE=mls\n"),
            (Mode::Permissive, "mls".into())
        );
        assert_eq!(
            parse_config("#SELINUX=enforcing\nSELINUX=disabled\n").0,
            Mode::Disabled
        );
    }

    #[test]
    fn the_decision_follows_the_new_root() {
        assert_eq!(
            decide(root_with(&[("etc/hostname", "x")]).path()),
            Decision::NotEnabled
        );
        assert_eq!(
            decide(root_with(&[("etc/selinux/config", "SELINUX=disabled\n")]).path()),
            Decision::NotEnabled
        );
        let full = root_with(&[
            ("etc/selinux/config", EL9),
            ("usr/sbin/setfiles", ""),
            (
                "etc/selinux/targeted/contexts/files/file_contexts",
                "/.* system_u:object_r:default_t:s0\n",
            ),
        ]);
        assert_eq!(
            decide(full.path()),
            Decision::Setfiles {
                file_contexts: "/etc/selinux/targeted/contexts/files/file_contexts".into()
            }
        );
        let no_tool = root_with(&[("etc/selinux/config", EL9)]);
        assert!(
            matches!(decide(no_tool.path()), Decision::AutoRelabel { why } if why.contains("setfiles"))
        );
        let no_policy = root_with(&[("etc/selinux/config", EL9), ("usr/sbin/setfiles", "")]);
        assert!(
            matches!(decide(no_policy.path()), Decision::AutoRelabel { why } if why.contains("file_contexts"))
        );
    }

    #[test]
    fn autorelabel_costs_one_extra_try_only_where_it_is_pending() {
        let root = root_with(&[("etc/selinux/config", EL9)]);
        let (note, pending) = label(root.path()).unwrap();
        assert!(pending && note.contains("/.autorelabel"), "{note}");
        assert!(root.path().join(".autorelabel").exists());
        let slot = tempfile::tempdir().unwrap();
        assert!(mark_slot(root.path(), slot.path()).unwrap());
        assert_eq!(tries_for(slot.path(), 3), 4);
        // A later install without SELinux takes the marker back.
        let plain = root_with(&[("etc/hostname", "x")]);
        assert!(!label(plain.path()).unwrap().1);
        assert!(!mark_slot(plain.path(), slot.path()).unwrap());
        assert_eq!(tries_for(slot.path(), 3), 3);
    }
}
