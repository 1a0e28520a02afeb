//! A/B slots on the running system: `dualroot slot status|install|switch|mark-good|
//! rollback|health-check`. The state lives in /boot/grub/grubenv (`state.rs` has
//! the transitions, `grub.rs` what GRUB does with them); the booted slot comes from
//! `dualroot.slot=` on the kernel command line, which only the generated grub.cfg
//! sets.

pub mod chain;
pub mod health;
pub mod install;
pub mod room;
pub mod state;

use crate::grub;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

pub use dualroot_api::{Slot, SlotInfo, SlotState, SlotStatus as Status};

/// The kernel pair this boot came from (`dualroot.kpair=`; entries written
/// before kernel pairs existed booted pair 0).
pub fn booted_kernel_pair(cmdline: &str) -> String {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dualroot.kpair="))
        .map(|p| if p == "1" { "1" } else { "0" })
        .unwrap_or("0")
        .to_string()
}

/// mark-good for the booted slot, and its kernel pair if that was a trial.
pub fn confirm_booted(env: &state::Env, booted: &str) -> Result<state::Env> {
    let e = state::mark_good(env, booted)?;
    Ok(state::confirm_kernel(
        &e,
        booted,
        &booted_kernel_pair(&kernel_cmdline()),
    ))
}

pub fn booted_slot(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dualroot.slot="))
        .map(str::to_string)
}

/// Pure: the status from the environment block, the command line and the
/// manifests of the slots' bundles (`/boot/<slot>/manifest.toml`).
pub fn status_from(
    env: &BTreeMap<String, String>,
    cmdline: &str,
    manifests: &BTreeMap<String, String>,
) -> Status {
    let booted = booted_slot(cmdline).as_deref().and_then(Slot::parse);
    let primary = env
        .get("primary")
        .and_then(|p| Slot::parse(p))
        .unwrap_or(Slot::A);
    let fallback_from = env.get("fallback_from").and_then(|s| Slot::parse(s));
    let slots = Slot::ALL
        .iter()
        .map(|&slot| {
            let s = slot.name();
            let state = SlotState::from_env(state::state(env, s));
            let m: Option<toml::Table> = manifests.get(s).and_then(|t| toml::from_str(t).ok());
            let field = |k: &str| {
                m.as_ref()
                    .and_then(|m| m.get(k))
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            };
            // An empty slot's manifest (if a cut install left one) describes nothing.
            let installed = state != SlotState::Empty;
            let field = |k: &str| installed.then(|| field(k)).flatten();
            SlotInfo {
                slot,
                lv: slot.lv().to_string(),
                tries_left: (state == SlotState::Trying)
                    .then(|| env.get(&format!("{s}_tries")).map(|t| t.len()).unwrap_or(0)),
                state,
                os_id: field("os_id"),
                version: field("version"),
                kernel: None,
                kernel_fell_back: env.get(&format!("{s}_kfell")).map(String::as_str) == Some("1"),
            }
        })
        .collect::<Vec<SlotInfo>>();
    let fallback_tries_used = fallback_from.map(|f| f.name()).and_then(|f| {
        let budget: usize = env.get(&format!("{f}_budget"))?.parse().ok()?;
        let left = env.get(&format!("{f}_tries")).map(|t| t.len()).unwrap_or(0);
        Some(budget.saturating_sub(left))
    });
    let version = booted.and_then(|b| {
        slots
            .iter()
            .find(|s: &&SlotInfo| s.slot == b)
            .and_then(|s| s.version.clone())
    });
    Status {
        api_version: dualroot_api::API_VERSION,
        fallback_tries_used,
        version,
        last_boot_was_fallback: fallback_from.is_some()
            && booted.is_some()
            && booted != fallback_from,
        booted,
        primary,
        fallback_from,
        migrating: env.get("migrating").map(|v| v == "1").unwrap_or(false),
        slots,
    }
}

/// The text `dualroot slot status` prints for people.
pub fn render_status(s: &Status) -> String {
    let mut out = format!(
        "booted: {}  primary: {}{}\n",
        s.booted.map(|b| b.name()).unwrap_or("?"),
        s.primary,
        if s.migrating {
            "  (migration in progress)"
        } else {
            ""
        }
    );
    for sl in &s.slots {
        out.push_str(&format!(
            "  slot {} ({}): {}{}  {} {}{}\n",
            sl.slot,
            sl.lv,
            sl.state,
            sl.tries_left
                .map(|t| format!(", {t} tries left"))
                .unwrap_or_default(),
            sl.os_id.as_deref().unwrap_or("-"),
            sl.version.as_deref().unwrap_or(""),
            sl.kernel
                .as_deref()
                .map(|k| format!("  kernel {k}"))
                .unwrap_or_default()
        ));
    }
    for sl in s.slots.iter().filter(|sl| sl.kernel_fell_back) {
        out.push_str(&format!(
            "  slot {}: its last kernel update did not come up; GRUB boots the slot's previous kernel again\n",
            sl.slot
        ));
    }
    if let Some(f) = s.fallback_from {
        out.push_str(&format!(
            "  slot {f} failed to come up{}; GRUB fell back to slot {}\n",
            s.fallback_tries_used
                .map(|n| format!(" in {n} tries"))
                .unwrap_or_default(),
            f.other()
        ));
    }
    out
}

pub fn status(boot: &Path) -> Result<Status> {
    let env = grub::read_env(&boot.join(grub::ENV_FILE))?;
    let cmdline = kernel_cmdline();
    let mut manifests = BTreeMap::new();
    for s in ["a", "b"] {
        if let Ok(t) = std::fs::read_to_string(boot.join(s).join("manifest.toml")) {
            manifests.insert(s.to_string(), t);
        }
    }
    let mut st = status_from(&env, &cmdline, &manifests);
    for info in &mut st.slots {
        if info.state != SlotState::Empty {
            let pair = env
                .get(&format!("{}_kpair", info.slot.name()))
                .map(String::as_str)
                .unwrap_or("0");
            info.kernel = std::fs::read_to_string(boot.join(info.slot.name()).join(format!(
                "{}{}",
                crate::bootfiles::KERNEL_VERSION_FILE,
                grub::kernel_pair_suffix(pair)
            )))
            .ok()
            .map(|v| v.trim().to_string());
        }
    }
    Ok(st)
}

/// The running kernel's command line. `DUALROOT_CMDLINE` replaces it, so the
/// contract test can run the real binary as if booted from a slot.
fn kernel_cmdline() -> String {
    std::env::var("DUALROOT_CMDLINE")
        .unwrap_or_else(|_| std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
}

/// The booted slot, from the kernel command line.
pub fn running_slot() -> Result<&'static str> {
    let cmdline = kernel_cmdline();
    let s = booted_slot(&cmdline).context(
        "the kernel command line has no dualroot.slot=: this boot did not come from a dualroot slot entry, so no slot can be chosen; nothing was changed",
    )?;
    state::check_slot(&s)
}

fn env_path(boot: &Path) -> std::path::PathBuf {
    boot.join(grub::ENV_FILE)
}

/// Reads the environment, applies one transition, writes it back atomically.
fn update(boot: &Path, f: impl FnOnce(&state::Env) -> Result<state::Env>) -> Result<state::Env> {
    let p = env_path(boot);
    let env = grub::read_env(&p)?;
    let new = f(&env)?;
    grub::write_env(&p, &new)?;
    Ok(new)
}

pub fn mark_good(boot: &Path) -> Result<String> {
    let booted = running_slot()?;
    update(boot, |e| confirm_booted(e, booted))?;
    Ok(booted.into())
}

/// `switch [SLOT] [--tries N]`: the other slot (or SLOT, which must be it) is tried
/// from the next boot on.
pub fn switch(boot: &Path, target: Option<&str>, tries: u32, force: bool) -> Result<String> {
    let booted = running_slot()?;
    let target = match target {
        Some(t) => state::check_slot(t)?,
        None => state::other(booted),
    };
    // A slot whose first boot relabels SELinux (and reboots) gets one try more.
    let tries = crate::selinux::tries_for(&boot.join(target), tries);
    update(boot, |e| state::switch(e, booted, target, tries, force))?;
    Ok(format!(
        "slot {target} is primary from the next boot on, with {tries} tries before GRUB falls back to slot {booted}"
    ))
}

/// `dualroot slot update-boot [--kernel V]`, run by the distribution's kernel and
/// initramfs hooks in the booted slot (and by its diverted update-grub): the
/// slot's kernel `V` (else the newest) and its initramfs from the top of /boot go
/// to `/boot/<slot>/`, and dualroot's grub.cfg is written again, so the A/B menu,
/// try counter and recovery entry survive the slot's own updates. A kernel whose
/// initramfs is not built yet is left for the initramfs hook that follows.
pub fn update_boot(boot: &Path, kernel: Option<&str>) -> Result<String> {
    let booted = running_slot()?;
    let bc = grub::BootConfig::load(boot)?;
    let mut note = match crate::bootfiles::find_kernel_in(boot, kernel) {
        Ok((k, i)) => {
            // Into the pair GRUB does not boot as confirmed; the switch to it is
            // one environment write, with a try budget (issue 23 item 9).
            let env = grub::read_env(&env_path(boot))?;
            let dir = boot.join(booted);
            let confirmed = grub::kernel_pair_suffix(
                env.get(&format!("{booted}_kpair"))
                    .map(String::as_str)
                    .unwrap_or("0"),
            );
            let same = |src: &Path, name: &str| {
                let have = crate::fsutil::file_sha256(&dir.join(format!("{name}{confirmed}")));
                have.is_ok() && have.ok() == crate::fsutil::file_sha256(src).ok()
            };
            let pending = env.get(&format!("{booted}_ktrial")).map(String::as_str) == Some("1");
            if !pending && same(&k, "vmlinuz") && same(&i, "initrd.img") {
                // update-grub runs for many reasons: the same kernel is no update.
                format!(
                    "slot {booted} already boots {}; no kernel change",
                    k.display()
                )
            } else {
                let pair = state::next_kernel_pair(&env, booted);
                let version = crate::bootfiles::install_slot_kernel_pair(&dir, pair, &k, &i)?;
                nix::unistd::sync();
                update(boot, |e| Ok(state::kernel_trial(e, booted, pair)))?;
                format!(
                    "slot {booted} tries kernel {version} (pair {pair} in {}) for {} boots; if it does not come up, GRUB boots the slot's previous kernel again",
                    dir.display(),
                    grub::KERNEL_TRIES
                )
            }
        }
        Err(e) => format!("slot {booted}'s kernel is unchanged ({e:#})"),
    };
    crate::fsutil::write_atomic(&bc.flavor.cfg_path(boot), grub::render_cfg(&bc).as_bytes())?;
    note.push_str("; dualroot's grub.cfg written again");
    // A GRUB or shim package update reaches here through update-grub: on UEFI
    // the slot's chain on the ESP follows (the apt hook also runs it alone).
    if chain::uefi(boot) {
        match chain::refresh(boot, booted) {
            Ok(n) => note.push_str(&format!("; {n}")),
            Err(e) => note.push_str(&format!(
                "; slot {booted}'s boot chain on the ESP is unchanged: {e:#}"
            )),
        }
    }
    Ok(note)
}

pub fn rollback(boot: &Path) -> Result<String> {
    let booted = running_slot()?;
    let mut msg = String::new();
    update(boot, |e| {
        let (n, m) = state::rollback(e, booted)?;
        msg = m;
        Ok(n)
    })?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn status_after_migration() {
        let e = env(&[
            ("primary", "a"),
            ("a_state", "trying"),
            ("a_tries", "11"),
            ("b_state", "empty"),
        ]);
        let mut m = BTreeMap::new();
        m.insert(
            "a".to_string(),
            "os_id = \"debian\"\nversion = \"13\"\n".to_string(),
        );
        let s = status_from(
            &e,
            "BOOT_IMAGE=/a/vmlinuz root=/dev/mapper/VA-root dualroot.slot=a",
            &m,
        );
        assert_eq!(s.booted, Some(Slot::A));
        assert_eq!(s.slots[0].tries_left, Some(2));
        assert_eq!(s.slots[0].version.as_deref(), Some("13"));
        assert_eq!(s.slots[1].state, SlotState::Empty);
        assert!(!s.last_boot_was_fallback);
    }

    #[test]
    fn fallback_is_reported() {
        let e = env(&[
            ("primary", "a"),
            ("a_state", "good"),
            ("b_state", "bad"),
            ("b_tries", ""),
            ("b_budget", "3"),
            ("fallback_from", "b"),
        ]);
        let mut m = BTreeMap::new();
        m.insert(
            "a".to_string(),
            "os_id = \"debian\"\nversion = \"13.1\"\n".to_string(),
        );
        // A manifest left behind by a cut install says nothing about an empty slot.
        m.insert(
            "b".to_string(),
            "os_id = \"debian\"\nversion = \"13.2\"\n".to_string(),
        );
        let mut e2 = e.clone();
        e2.insert("b_state".into(), "empty".into());
        let s = status_from(&e2, "dualroot.slot=a", &m);
        assert_eq!(s.slots[1].version, None);
        let s = status_from(&e, "dualroot.slot=a", &m);
        assert!(s.last_boot_was_fallback);
        assert_eq!(s.fallback_from, Some(Slot::B));
        assert_eq!(s.fallback_tries_used, Some(3));
        assert_eq!(s.version.as_deref(), Some("13.1"));
        assert_eq!(
            s.slots[1].version.as_deref(),
            Some("13.2"),
            "a bad slot still names its OS"
        );
    }

    #[test]
    fn a_kernel_installed_by_the_slot_goes_to_its_directory_and_the_menu_stays() {
        // As Debian's postinst.d hook would call it in slot a after apt installed
        // a kernel and update-grub (diverted) ran.
        std::env::set_var(
            "DUALROOT_CMDLINE",
            "root=/dev/mapper/VA-root dualroot.slot=a",
        );
        let d = tempfile::tempdir().unwrap();
        let boot = d.path();
        std::fs::create_dir_all(boot.join("dualroot")).unwrap();
        let bc = grub::BootConfig {
            flavor: grub::Flavor::Grub,
            vg: "VA".into(),
            kernel_args: "console=ttyS0".into(),
            recovery_args: String::new(),
            panic_secs: 10,
        };
        std::fs::write(boot.join(grub::BOOT_CONFIG_FILE), bc.to_toml()).unwrap();
        std::fs::create_dir_all(boot.join("grub")).unwrap();
        std::fs::write(
            boot.join("grub/grub.cfg"),
            "### BEGIN /etc/grub.d/10_linux ###",
        )
        .unwrap();
        grub::write_env(
            &boot.join(grub::ENV_FILE),
            &env(&[("primary", "a"), ("a_state", "good"), ("b_state", "good")]),
        )
        .unwrap();
        std::fs::create_dir_all(boot.join("a")).unwrap();
        std::fs::write(boot.join("a/vmlinuz"), "old kernel").unwrap();
        std::fs::write(boot.join("a/initrd.img"), "old initrd").unwrap();
        std::fs::write(boot.join("vmlinuz-6.12.57+deb13-cloud-amd64"), "kernel").unwrap();
        // The kernel hook runs before its initramfs exists: nothing to copy yet.
        let n = update_boot(boot, Some("6.12.57+deb13-cloud-amd64")).unwrap();
        assert!(n.contains("unchanged"), "{n}");
        std::fs::write(boot.join("initrd.img-6.12.57+deb13-cloud-amd64"), "initrd").unwrap();
        let n = update_boot(boot, Some("6.12.57+deb13-cloud-amd64")).unwrap();
        assert!(
            n.contains("slot a tries kernel 6.12.57+deb13-cloud-amd64 (pair 1"),
            "{n}"
        );
        // The confirmed pair is untouched; the new kernel is pair 1, on trial.
        let read = |p: &str| std::fs::read_to_string(boot.join(p)).unwrap();
        assert_eq!(read("a/vmlinuz"), "old kernel");
        assert_eq!(read("a/vmlinuz.1"), "kernel");
        assert_eq!(read("a/initrd.img.1"), "initrd");
        assert_eq!(read("a/kernel-version.1"), "6.12.57+deb13-cloud-amd64\n");
        let e = grub::read_env(&boot.join(grub::ENV_FILE)).unwrap();
        assert_eq!(
            (
                e["a_ktrial"].as_str(),
                e["a_ktry"].as_str(),
                e["a_ktries"].as_str()
            ),
            ("1", "1", "111")
        );
        let cfg = read("grub/grub.cfg");
        assert!(
            cfg.contains("--id slot_b")
                && cfg.contains("--id slot_a_k1")
                && cfg.contains("--id recovery"),
            "the A/B menu is back"
        );
        // The initramfs hook runs it again: the same trial pair, a full budget.
        std::fs::write(
            boot.join("initrd.img-6.12.57+deb13-cloud-amd64"),
            "initrd 2",
        )
        .unwrap();
        update_boot(boot, Some("6.12.57+deb13-cloud-amd64")).unwrap();
        assert_eq!(read("a/initrd.img.1"), "initrd 2");
        assert_eq!(read("a/vmlinuz"), "old kernel");
        // Booted from pair 1 and confirmed: pair 1 is the slot's kernel now.
        std::env::set_var(
            "DUALROOT_CMDLINE",
            "BOOT_IMAGE=/a/vmlinuz.1 root=/dev/mapper/VA-root dualroot.slot=a dualroot.kpair=1",
        );
        mark_good(boot).unwrap();
        let e = grub::read_env(&boot.join(grub::ENV_FILE)).unwrap();
        assert_eq!(e["a_kpair"], "1");
        assert!(!e.contains_key("a_ktrial"));
        assert_eq!(
            status(boot).unwrap().slots[0].kernel.as_deref(),
            Some("6.12.57+deb13-cloud-amd64")
        );
        // update-grub with nothing new: no second trial, no pair flip.
        let n = update_boot(boot, None).unwrap();
        assert!(n.contains("no kernel change"), "{n}");
        let e = grub::read_env(&boot.join(grub::ENV_FILE)).unwrap();
        assert!(!e.contains_key("a_ktrial"), "no trial of the same kernel");
        std::env::remove_var("DUALROOT_CMDLINE");
    }

    #[test]
    fn mark_good_confirms_only_the_booted_slot() {
        let e = env(&[
            ("primary", "a"),
            ("a_state", "trying"),
            ("a_tries", "1"),
            ("b_state", "empty"),
        ]);
        let g = state::mark_good(&e, "a").unwrap();
        assert_eq!(g["a_state"], "good");
        assert!(!g.contains_key("a_tries"));
        assert_eq!(g["b_state"], "empty");
        assert!(state::mark_good(&e, "c").is_err());
    }
}
