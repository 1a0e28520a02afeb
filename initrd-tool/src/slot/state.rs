//! The slot state machine over the GRUB environment block: pure functions from one
//! environment to the next. Each command writes the block once (atomically, see
//! `grub::write_env`); GRUB itself writes it when it counts a try or falls back
//! (modelled by `grub::select_slot`).
//!
//! Per slot: `<s>_state` is `empty` (no complete OS: never installed, or being
//! overwritten), `installed` (complete, never booted), `trying` (primary and
//! unconfirmed: GRUB counts `<s>_tries` down), `good` (confirmed by its health
//! check) or `bad` (GRUB gave up on it). Only `trying` and `good` are bootable.

use anyhow::{bail, Result};
use std::collections::BTreeMap;

pub type Env = BTreeMap<String, String>;

pub const SLOTS: [&str; 2] = ["a", "b"];
/// The most tries `switch` accepts (each is one character in the 1024-byte block).
pub const MAX_TRIES: u32 = 9;

pub fn check_slot(s: &str) -> Result<&'static str> {
    match s.to_ascii_lowercase().as_str() {
        "a" => Ok("a"),
        "b" => Ok("b"),
        _ => bail!("slot {s:?} does not exist: the slots are a (LV root) and b (LV back)"),
    }
}

pub fn other(s: &str) -> &'static str {
    if s == "a" {
        "b"
    } else {
        "a"
    }
}

/// The logical volume holding a slot's root.
pub fn lv_of(s: &str) -> &'static str {
    if s == "a" {
        "root"
    } else {
        "back"
    }
}

pub fn state<'a>(env: &'a Env, s: &str) -> &'a str {
    env.get(&format!("{s}_state"))
        .map(String::as_str)
        .unwrap_or("empty")
}

pub fn primary(env: &Env) -> &str {
    env.get("primary").map(String::as_str).unwrap_or("a")
}

pub fn bootable(state: &str) -> bool {
    state == "trying" || state == "good"
}

/// Before `install` touches the inactive slot's LV: mark it empty so GRUB never
/// picks it (and `status` says "not installed") whatever happens next.
/// GRUB falls back only to a good slot: while the booted slot is unconfirmed, a
/// new slot that fails to boot would have nowhere to go (both `trying`, GRUB keeps
/// booting the failing one). `install` and `switch` refuse then, unless forced.
fn require_booted_good(env: &Env, booted: &str, what: &str, force: bool) -> Result<()> {
    let st = state(env, booted);
    if st != "good" && !force {
        bail!(
            "the booted slot {booted} is {st}, not confirmed good; GRUB falls back only to a good slot, so {what} now could leave a machine that boots a failing slot forever. Nothing was changed; slot {booted} keeps running. Confirm it first (its health check runs `dualroot slot mark-good`), or pass --force on a lab machine",
            st = if st.is_empty() { "in no state" } else { st }
        );
    }
    Ok(())
}

pub fn install_begin(env: &Env, booted: &str, target: &str, force: bool) -> Result<Env> {
    if target == booted {
        bail!(
            "slot {target} is the booted slot: install writes only the inactive slot ({}); nothing was changed",
            other(booted)
        );
    }
    if state(env, target) == "good" && state(env, booted) != "good" {
        bail!(
            "the booted slot {booted} is not confirmed good yet (state {}), and slot {target} is the only good slot: overwriting it would leave no slot to fall back to. Nothing was changed; confirm this slot first (`dualroot slot mark-good`, run by the health check) or roll back",
            state(env, booted)
        );
    }
    require_booted_good(
        env,
        booted,
        &format!("installing into slot {target}"),
        force,
    )?;
    let mut e = env.clone();
    e.insert(format!("{target}_state"), "empty".into());
    e.remove(&format!("{target}_tries"));
    // The new slot's kernel goes to pair 0; an old trial of that slot is void.
    for k in KERNEL_VARS {
        e.remove(&format!("{target}_{k}"));
    }
    if primary(env) == target {
        // A switch to the slot being overwritten was pending: cancel it.
        e.insert("primary".into(), booted.into());
    }
    Ok(e)
}

/// The kernel-pair variables of a slot (see `grub.rs`).
const KERNEL_VARS: [&str; 5] = ["kpair", "ktrial", "ktry", "ktries", "kfell"];

/// The pair a kernel update of `slot` goes to: the pending trial's (a second
/// update before the first was confirmed replaces it), else the one that is
/// not confirmed.
pub fn next_kernel_pair(env: &Env, slot: &str) -> &'static str {
    let get = |k: &str| env.get(&format!("{slot}_{k}")).map(String::as_str);
    if get("ktrial") == Some("1") {
        return if get("ktry") == Some("1") { "1" } else { "0" };
    }
    if get("kpair") == Some("1") {
        "0"
    } else {
        "1"
    }
}

/// Arms the trial of kernel `pair` in `slot` (its files are written): one
/// environment write switches GRUB to it, with `grub::KERNEL_TRIES` boots.
pub fn kernel_trial(env: &Env, slot: &str, pair: &str) -> Env {
    let mut e = env.clone();
    e.insert(format!("{slot}_ktrial"), "1".into());
    e.insert(format!("{slot}_ktry"), pair.into());
    e.insert(
        format!("{slot}_ktries"),
        "1".repeat(crate::grub::KERNEL_TRIES),
    );
    e.remove(&format!("{slot}_kfell"));
    e
}

/// On mark-good: a trial pair that booted (`dualroot.kpair=` of this boot)
/// becomes the slot's confirmed pair.
pub fn confirm_kernel(env: &Env, slot: &str, booted_pair: &str) -> Env {
    let mut e = env.clone();
    let get = |k: &str| env.get(&format!("{slot}_{k}")).cloned().unwrap_or_default();
    if get("ktrial") == "1" && get("ktry") == booted_pair {
        e.insert(format!("{slot}_kpair"), booted_pair.into());
        for k in ["ktrial", "ktry", "ktries", "kfell"] {
            e.remove(&format!("{slot}_{k}"));
        }
    }
    e
}

/// After the slot's root, kernel and manifest are written and synced.
pub fn install_done(env: &Env, target: &str) -> Env {
    let mut e = env.clone();
    e.insert(format!("{target}_state"), "installed".into());
    e
}

/// Makes `target` the primary slot for the next boot, unconfirmed with `tries`.
pub fn switch(env: &Env, booted: &str, target: &str, tries: u32, force: bool) -> Result<Env> {
    if !(1..=MAX_TRIES).contains(&tries) {
        bail!("--tries {tries} is out of range: use 1 to {MAX_TRIES}");
    }
    if target == booted {
        bail!(
            "slot {target} is already the booted slot: nothing to switch to; nothing was changed"
        );
    }
    require_booted_good(env, booted, &format!("switching to slot {target}"), force)?;
    match state(env, target) {
        "installed" | "good" | "bad" | "trying" => {}
        s => bail!(
            "slot {target} is {s}: it holds no complete OS. Install a bundle into it first (`dualroot slot install BUNDLE`); slot {booted} stays primary"
        ),
    }
    let mut e = env.clone();
    e.insert("primary".into(), target.into());
    e.insert(format!("{target}_state"), "trying".into());
    e.insert(format!("{target}_tries"), "1".repeat(tries as usize));
    e.insert(format!("{target}_budget"), tries.to_string());
    e.remove("fallback_from");
    Ok(e)
}

/// Confirms the booted slot after its health check passed.
pub fn mark_good(env: &Env, booted: &str) -> Result<Env> {
    check_slot(booted)?;
    let mut e = env.clone();
    e.insert(format!("{booted}_state"), "good".into());
    e.remove(&format!("{booted}_tries"));
    Ok(e)
}

/// Makes the other, good slot primary. With a switch still pending (primary is
/// not the booted slot), cancels it instead: the booted slot stays primary.
pub fn rollback(env: &Env, booted: &str) -> Result<(Env, String)> {
    let o = other(booted);
    let mut e = env.clone();
    if primary(env) != booted && bootable(state(env, booted)) {
        if state(env, o) == "trying" {
            e.insert(format!("{o}_state"), "installed".into());
            e.remove(&format!("{o}_tries"));
        }
        e.insert("primary".into(), booted.into());
        return Ok((
            e,
            format!("pending switch to slot {o} cancelled: slot {booted} stays primary"),
        ));
    }
    if state(env, o) != "good" {
        bail!(
            "slot {o} is {}, not good: there is no confirmed slot to roll back to; slot {booted} stays primary",
            state(env, o)
        );
    }
    e.insert("primary".into(), o.into());
    e.remove("fallback_from");
    Ok((
        e,
        format!("slot {o} is primary from the next boot on (slot {booted} keeps its state)"),
    ))
}

/// After the very first good boot following migration: `data` and `image` grow
/// once, then the flag goes.
pub fn grow_done(env: &Env) -> Env {
    let mut e = env.clone();
    e.remove("grow_pending");
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grub::select_slot;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn migrated() -> Env {
        env(&[
            ("primary", "a"),
            ("a_state", "trying"),
            ("a_tries", "111"),
            ("b_state", "empty"),
            ("grow_pending", "1"),
        ])
    }

    /// A machine: the env on /boot plus which slots hold a complete OS on disk.
    #[derive(Clone, Debug)]
    struct Machine {
        env: Env,
        complete: BTreeMap<&'static str, bool>,
    }

    impl Machine {
        /// GRUB runs: which slot does it boot, and is that slot's OS complete?
        fn boot(&mut self) -> &'static str {
            let (s, e) = select_slot(&self.env);
            self.env = e;
            let s = check_slot(&s).expect("GRUB chose a or b");
            assert!(
                self.complete[s],
                "GRUB booted slot {s} whose OS is not complete: {:?}",
                self.env
            );
            s
        }
    }

    /// Every write `install` makes, in order, as (env after it, completeness of the
    /// target after it). Returns the machine after each write.
    fn install_writes(start: &Machine, booted: &str) -> Vec<Machine> {
        let t = other(booted);
        let mut out = vec![start.clone()];
        let mut m = start.clone();
        m.env = install_begin(&m.env, booted, t, false).unwrap(); // grubenv: target empty
        out.push(m.clone());
        m.complete.insert(check_slot(t).unwrap(), false); // mkfs, unpack, sync
        out.push(m.clone());
        // kernel, initramfs, manifest to /boot/<t>, grub.cfg, all synced
        m.complete.insert(check_slot(t).unwrap(), true);
        out.push(m.clone());
        m.env = install_done(&m.env, t); // grubenv: target installed
        out.push(m);
        out
    }

    #[test]
    fn power_cut_between_any_two_install_writes_boots_the_running_slot() {
        let mut start = Machine {
            env: mark_good(&migrated(), "a").unwrap(),
            complete: [("a", true), ("b", false)].into_iter().collect(),
        };
        assert_eq!(start.boot(), "a");
        for (i, mut m) in install_writes(&start, "a").into_iter().enumerate() {
            for _ in 0..5 {
                assert_eq!(m.boot(), "a", "power cut after write {i}");
            }
        }
        // A switch to b was pending (b installed, primary, trying) when a new
        // install into b began: b must never be booted half-written.
        let mut pending = start.clone();
        pending.complete.insert("b", true);
        pending.env = switch(&install_done(&pending.env, "b"), "a", "b", 3, false).unwrap();
        for (i, mut m) in install_writes(&pending, "a")
            .into_iter()
            .enumerate()
            .skip(1)
        {
            for _ in 0..5 {
                assert_eq!(m.boot(), "a", "pending switch, power cut after write {i}");
            }
        }
        // Same with b running and a (the old good slot) being overwritten.
        let mut on_b = Machine {
            env: env(&[("primary", "b"), ("a_state", "good"), ("b_state", "good")]),
            complete: [("a", true), ("b", true)].into_iter().collect(),
        };
        assert_eq!(on_b.boot(), "b");
        for (i, mut m) in install_writes(&on_b, "b").into_iter().enumerate() {
            for _ in 0..3 {
                assert_eq!(m.boot(), "b", "power cut after write {i}");
            }
        }
    }

    #[test]
    fn install_switch_boot_confirm() {
        let mut m = Machine {
            env: mark_good(&migrated(), "a").unwrap(),
            complete: [("a", true), ("b", true)].into_iter().collect(),
        };
        m.env = install_done(&install_begin(&m.env, "a", "b", false).unwrap(), "b");
        assert_eq!(state(&m.env, "b"), "installed");
        assert_eq!(
            m.boot(),
            "a",
            "an installed slot is not booted before a switch"
        );
        m.env = switch(&m.env, "a", "b", 3, false).unwrap();
        assert_eq!(m.env["b_tries"], "111");
        assert_eq!(m.boot(), "b");
        assert_eq!(m.env["b_tries"], "11");
        m.env = mark_good(&m.env, "b").unwrap();
        assert_eq!(state(&m.env, "b"), "good");
        assert!(!m.env.contains_key("b_tries"));
        for _ in 0..4 {
            assert_eq!(m.boot(), "b");
        }
    }

    #[test]
    fn unconfirmed_slot_falls_back_after_its_tries() {
        let mut m = Machine {
            env: mark_good(&migrated(), "a").unwrap(),
            complete: [("a", true), ("b", true)].into_iter().collect(),
        };
        m.env = install_done(&install_begin(&m.env, "a", "b", false).unwrap(), "b");
        m.env = switch(&m.env, "a", "b", 3, false).unwrap();
        // b never confirms itself: three boots of b, then a by itself.
        assert_eq!(
            (0..5).map(|_| m.boot()).collect::<Vec<_>>(),
            ["b", "b", "b", "a", "a"]
        );
        assert_eq!(state(&m.env, "b"), "bad");
        assert_eq!(m.env["fallback_from"], "b");
        assert_eq!(primary(&m.env), "a");
        // Switching again is allowed (a new try budget) and clears the fallback mark.
        let e = switch(&m.env, "a", "b", 1, false).unwrap();
        assert!(!e.contains_key("fallback_from"));
    }

    #[test]
    fn power_cut_around_switch_and_mark_good() {
        let base = Machine {
            env: install_done(
                &install_begin(&mark_good(&migrated(), "a").unwrap(), "a", "b", false).unwrap(),
                "b",
            ),
            complete: [("a", true), ("b", true)].into_iter().collect(),
        };
        // Cut before the switch write: a boots. After it: b is tried.
        assert_eq!(base.clone().boot(), "a");
        let mut sw = base.clone();
        sw.env = switch(&sw.env, "a", "b", 2, false).unwrap();
        assert_eq!(sw.boot(), "b");
        // Cut before mark-good lands (the try was spent): b is tried again, then a.
        let mut no_confirm = sw.clone();
        assert_eq!(no_confirm.boot(), "b");
        assert_eq!(no_confirm.boot(), "a");
        // Cut after mark-good: b for good.
        let mut ok = sw.clone();
        ok.env = mark_good(&ok.env, "b").unwrap();
        assert_eq!(ok.boot(), "b");
        assert_eq!(ok.boot(), "b");
    }

    /// Issue 23 item 8: right after the migration slot a is `trying`; an install
    /// or switch then would leave two unconfirmed slots and no fallback.
    #[test]
    fn install_and_switch_wait_for_the_booted_slot_to_be_good() {
        let trying_a = migrated();
        let e = install_begin(&trying_a, "a", "b", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("slot a is trying, not confirmed good") && e.contains("--force"),
            "{e}"
        );
        let installed = install_done(&install_begin(&trying_a, "a", "b", true).unwrap(), "b");
        let e = switch(&installed, "a", "b", 3, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not confirmed good") && e.contains("Nothing was changed"),
            "{e}"
        );
        assert_eq!(
            primary(&switch(&installed, "a", "b", 3, true).unwrap()),
            "b"
        );
        // Confirmed: both work without force.
        let good_a = mark_good(&trying_a, "a").unwrap();
        let e = install_done(&install_begin(&good_a, "a", "b", false).unwrap(), "b");
        assert_eq!(primary(&switch(&e, "a", "b", 3, false).unwrap()), "b");
    }

    #[test]
    fn refusals_change_nothing_and_say_why() {
        let good_a = mark_good(&migrated(), "a").unwrap();
        let e = install_begin(&good_a, "a", "a", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("booted slot") && e.contains("inactive slot (b)"),
            "{e}"
        );
        // b running unconfirmed, a the only good slot: a must not be overwritten.
        let trying_b = env(&[
            ("primary", "b"),
            ("a_state", "good"),
            ("b_state", "trying"),
            ("b_tries", "11"),
        ]);
        let e = install_begin(&trying_b, "b", "a", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only good slot"), "{e}");
        let e = switch(&good_a, "a", "b", 3, false).unwrap_err().to_string();
        assert!(
            e.contains("slot b is empty") && e.contains("install"),
            "{e}"
        );
        assert!(switch(&good_a, "a", "a", 3, false).is_err());
        assert!(switch(&good_a, "a", "b", 0, false).is_err());
        assert!(switch(&good_a, "a", "b", 10, false).is_err());
        let e = rollback(&good_a, "a").unwrap_err().to_string();
        assert!(e.contains("slot b is empty, not good"), "{e}");
        assert!(check_slot("c").is_err());
        assert_eq!(check_slot("B").unwrap(), "b");
    }

    #[test]
    fn install_cancels_a_pending_switch_to_the_target() {
        let mut e = install_done(
            &install_begin(&mark_good(&migrated(), "a").unwrap(), "a", "b", false).unwrap(),
            "b",
        );
        e = switch(&e, "a", "b", 3, false).unwrap();
        let again = install_begin(&e, "a", "b", false).unwrap();
        assert_eq!(primary(&again), "a");
        assert_eq!(state(&again, "b"), "empty");
        assert!(!again.contains_key("b_tries"));
    }

    #[test]
    fn rollback_to_good_slot_and_cancel_pending_switch() {
        let both = env(&[("primary", "b"), ("a_state", "good"), ("b_state", "good")]);
        let (e, msg) = rollback(&both, "b").unwrap();
        assert_eq!(primary(&e), "a");
        assert!(msg.contains("slot a is primary"));
        let pending = switch(
            &install_done(
                &install_begin(&mark_good(&migrated(), "a").unwrap(), "a", "b", false).unwrap(),
                "b",
            ),
            "a",
            "b",
            3,
            false,
        )
        .unwrap();
        let (e, msg) = rollback(&pending, "a").unwrap();
        assert_eq!(primary(&e), "a");
        assert_eq!(state(&e, "b"), "installed");
        assert!(msg.contains("cancelled"), "{msg}");
    }

    #[test]
    fn grow_flag_goes_once_done() {
        assert!(!grow_done(&migrated()).contains_key("grow_pending"));
    }
}
