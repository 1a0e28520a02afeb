//! GRUB configuration and environment block for the A/B layout.
//!
//! State lives in `/boot/grub/grubenv` (plain ext4, never inside LVM):
//! `primary` (a|b), `a_state`/`b_state` (empty|trying|good|bad), `a_tries`/`b_tries`
//! (a string of `1`s; GRUB has no arithmetic, so each boot of a trying slot drops one
//! character with `regexp`), `fallback_from` (set by GRUB when it gave up on a slot),
//! `migrating` (1 while a migration runs: boot the recovery entry),
//! `recovery_tries` (while migrating: `1`s and a terminating `x`; GRUB drops a `1`
//! per recovery boot and dualroot refills it whenever a step finishes, so a
//! recovery that never reaches dualroot, or never gets a step done, stops at the
//! halt entry instead of rebooting forever).
//! "No tries left" is `state=trying` with an empty counter, never an unset variable.
//!
//! Inside a slot, kernel updates are tried the same way: a slot holds two kernel
//! pairs, 0 (`vmlinuz`, `initrd.img`) and 1 (`vmlinuz.1`, `initrd.img.1`);
//! `<slot>_kpair` names the confirmed one (unset: 0). `slot update-boot` writes
//! the new kernel into the other pair and, in one environment write, sets
//! `<slot>_ktrial=1`, `<slot>_ktry` (that pair) and `<slot>_ktries`. GRUB boots
//! the trial pair while tries are left, then goes back to the confirmed pair
//! (`<slot>_ktrial=0`, `<slot>_kfell=1`); the health check's mark-good promotes a
//! trial pair that came up. A good slot can thus never loop on a bad kernel.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

pub const ENV_SIZE: usize = 1024;
const ENV_HEADER: &str = "# GRUB Environment Block\n";

/// Reads an environment block the way GRUB's envblk does: `name=value` entries
/// each ended by a newline, where a backslash takes the next character literally
/// (GRUB writes `\\` for a backslash and a backslash before a newline that belongs
/// to the value); lines starting with `#` (the padding) are skipped.
pub fn parse_env(data: &[u8]) -> Result<BTreeMap<String, String>> {
    let text = std::str::from_utf8(data).context("grubenv is not UTF-8")?;
    let body = text
        .strip_prefix(ENV_HEADER)
        .context("grubenv does not start with the GRUB environment block header")?;
    let mut m = BTreeMap::new();
    let mut chars = body.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c == '#' || c == '\n' {
            // padding or an empty line: skip to the next line
            for c in chars.by_ref() {
                if c == '\n' {
                    break;
                }
            }
            continue;
        }
        let mut name = String::new();
        let mut value = String::new();
        let mut in_value = false;
        while let Some(c) = chars.next() {
            match c {
                '\n' => break,
                '\\' if in_value => {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                }
                '=' if !in_value => in_value = true,
                c if in_value => value.push(c),
                c => name.push(c),
            }
        }
        if in_value {
            m.insert(name, value);
        }
    }
    Ok(m)
}

pub fn render_env(vars: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut s = String::from(ENV_HEADER);
    for (k, v) in vars {
        if k.is_empty() || k.contains(['=', '\n', '\\', '#']) {
            bail!("grubenv variable name {k:?} is invalid");
        }
        s.push_str(k);
        s.push('=');
        for c in v.chars() {
            // GRUB's escaping: a backslash before a backslash or a newline.
            if c == '\\' || c == '\n' {
                s.push('\\');
            }
            s.push(c);
        }
        s.push('\n');
    }
    if s.len() > ENV_SIZE {
        bail!(
            "grubenv content is {} bytes, more than the {ENV_SIZE}-byte block",
            s.len()
        );
    }
    let mut b = s.into_bytes();
    b.resize(ENV_SIZE, b'#');
    Ok(b)
}

/// Writes the environment block crash-safely: temp file, fsync, rename, fsync dir.
/// A power cut leaves either the old or the new block, never a torn one.
pub fn write_env(path: &Path, vars: &BTreeMap<String, String>) -> Result<()> {
    crate::fsutil::write_atomic(path, &render_env(vars)?)
}

pub fn read_env(path: &Path) -> Result<BTreeMap<String, String>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_env(&data).with_context(|| format!("parsing {}", path.display()))
}

/// Kernel arguments that make an initramfs reboot instead of waiting when it
/// fails (dracut; initramfs-tools reboots on `panic=` after its rootdelay): no
/// emergency shell, and a limit on the wait for the root device: systemd-based
/// dracut waits for it with "no limit" otherwise (seen in the slot_native
/// scenario: a slot whose initramfs has no LVM hung for good and its tries
/// never moved). 180 s is initramfs-tools' own default rootdelay. Used by the
/// slot entries, the recovery entry and the one-shot migration entry.
pub const SLOT_FAILURE_ARGS: &str = "rd.shell=0 rd.emergency=reboot rd.timeout=180";

/// The one environment block, relative to /boot, whatever GRUB reads its config
/// from: the generated grub.cfg names it in every `load_env`/`save_env`.
pub const ENV_FILE: &str = "grub/grubenv";

/// Which GRUB build a tool belongs to: Debian's `grub-*` use `/boot/grub`, EL's
/// `grub2-*` (`grub2-install` sets the prefix to `/grub2`) use `/boot/grub2`. The
/// one place that decides; every config path derives from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Grub,
    Grub2,
}

impl Flavor {
    /// From the name (or path) of the tool that installs GRUB.
    pub fn of_tool(tool: &str) -> Flavor {
        let name = Path::new(tool)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("grub2-") {
            Flavor::Grub2
        } else {
            Flavor::Grub
        }
    }

    pub fn parse(dir: &str) -> Flavor {
        if dir == "grub2" {
            Flavor::Grub2
        } else {
            Flavor::Grub
        }
    }

    /// The directory below /boot its core image looks for `grub.cfg` in.
    pub fn dir(self) -> &'static str {
        match self {
            Flavor::Grub => "grub",
            Flavor::Grub2 => "grub2",
        }
    }

    pub fn cfg_path(self, boot: &Path) -> std::path::PathBuf {
        boot.join(self.dir()).join("grub.cfg")
    }
}

/// What the generated grub.cfg needs to know.
#[derive(Debug, Clone)]
pub struct BootConfig {
    pub vg: String,
    /// The GRUB whose config this is (the new OS's, once installed).
    pub flavor: Flavor,
    /// Kernel arguments for the slots (console, net.ifnames, ...).
    pub kernel_args: String,
    /// Arguments of the recovery entry (the migration initramfs, resuming).
    pub recovery_args: String,
    pub panic_secs: u32,
}

/// The generated grub.cfg. Only the fallback logic lives in GRUB; everything else
/// (which slot is installed, how many tries) is decided by dualroot in grubenv.
pub fn render_cfg(c: &BootConfig) -> String {
    let vg = &c.vg;
    let mut s = String::new();
    s.push_str("# Generated by dualroot. Do not edit: `dualroot slot` rewrites it.\n");
    s.push_str("set timeout=3\nserial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n");
    s.push_str("search --no-floppy --label boot --set=root\n");
    s.push_str(&format!("load_env -f /{ENV_FILE}\n"));
    s.push_str(
        r#"set chosen="${primary}"
if [ "${migrating}" = "1" ]; then
  if [ -z "${recovery_tries}" ]; then
    set default=recovery
  elif regexp --set=1:left '^1(.*)$' "${recovery_tries}"; then
    set recovery_tries="${left}"
    save_env -f /grub/grubenv recovery_tries
    set default=recovery
  else
    set default=recovery_halt
  fi
else
  if [ "${chosen}" != "b" ]; then set chosen=a; fi
"#,
    );
    // A primary without a bootable OS (never installed, or being overwritten by
    // `slot install` when a power cut came) gives way to a bootable other slot.
    for (me, other) in [("a", "b"), ("b", "a")] {
        s.push_str(&format!(
            r#"  if [ "${{chosen}}" = "{me}" -a "${{{me}_state}}" != "trying" -a "${{{me}_state}}" != "good" ]; then
    if [ "${{{other}_state}}" = "trying" ]; then set chosen={other}; fi
    if [ "${{{other}_state}}" = "good" ]; then set chosen={other}; fi
  fi
"#
        ));
    }
    for (me, other) in [("a", "b"), ("b", "a")] {
        s.push_str(&format!(
            r#"  if [ "${{chosen}}" = "{me}" -a "${{{me}_state}}" = "trying" ]; then
    if regexp --set=1:left '^1(.*)$' "${{{me}_tries}}"; then
      set {me}_tries="${{left}}"
      save_env -f /{ENV_FILE} {me}_tries
    elif [ "${{{other}_state}}" = "good" ]; then
      set {me}_state=bad
      set primary={other}
      set fallback_from={me}
      save_env -f /{ENV_FILE} {me}_state primary fallback_from
      set chosen={other}
    fi
  fi
"#
        ));
    }
    // The kernel pair inside the chosen slot: a pending kernel update is
    // tried `_ktries` times, then the slot's confirmed pair boots again.
    for me in ["a", "b"] {
        s.push_str(&format!(
            r#"  set {me}_kboot="${{{me}_kpair}}"
  if [ "${{chosen}}" = "{me}" -a "${{{me}_ktrial}}" = "1" ]; then
    if regexp --set=1:left '^1(.*)$' "${{{me}_ktries}}"; then
      set {me}_ktries="${{left}}"
      save_env -f /{ENV_FILE} {me}_ktries
      set {me}_kboot="${{{me}_ktry}}"
    else
      set {me}_ktrial=0
      set {me}_kfell=1
      save_env -f /{ENV_FILE} {me}_ktrial {me}_kfell
    fi
  fi
"#
        ));
    }
    s.push_str(
        r#"  if [ "${chosen}" = "b" ]; then set default=slot_b; else set default=slot_a; fi
  if [ "${chosen}" = "a" -a "${a_kboot}" = "1" ]; then set default=slot_a_k1; fi
  if [ "${chosen}" = "b" -a "${b_kboot}" = "1" ]; then set default=slot_b_k1; fi
fi
"#,
    );
    // An initramfs that cannot find or mount its root must reboot, so GRUB
    // spends a try and falls back: `rd.shell=0 rd.emergency=reboot` for dracut;
    // initramfs-tools reboots from its panic() when `panic=` is set.
    // One entry per slot and kernel pair (the menu picks by id: variables set
    // above are not visible inside a menu entry unless exported).
    for (slot, lv, title) in [("a", "root", "A"), ("b", "back", "B")] {
        for pair in ["0", "1"] {
            let (id, sfx, what) = match pair {
                "0" => (format!("slot_{slot}"), "", String::new()),
                _ => (
                    format!("slot_{slot}_k1"),
                    ".1",
                    ", kernel pair 1".to_string(),
                ),
            };
            s.push_str(&format!(
                "menuentry 'dualroot slot {title} ({lv}){what}' --id {id} {{\n  linux /{slot}/vmlinuz{sfx} root=/dev/mapper/{vg}-{lv} ro dualroot.slot={slot} dualroot.kpair={pair} panic={p} {SLOT_FAILURE_ARGS} {args}\n  initrd /{slot}/initrd.img{sfx}\n}}\n",
                p = c.panic_secs,
                args = c.kernel_args
            ));
        }
    }
    // The recovery boot must reach dualroot whatever the journal says: its root
    // is the /boot filesystem (label `boot`, which exists before this entry does:
    // GRUB itself just found it), never a volume that may not exist yet (a
    // `root=/dev/mapper/VA-data` made dracut wait for a VG that `volumes` never
    // created, reboot, and do it again forever). dracut's own LVM handling is off
    // (`rd.lvm=0`): dualroot activates the VG itself, under its own lvm.conf.
    s.push_str(&format!(
        "menuentry 'dualroot recovery (resume migration)' --id recovery {{\n  linux /recovery/vmlinuz root=LABEL=boot ro rd.lvm=0 rd.dualroot.vg={vg} rd.dualroot.resume=1 panic={p} {args}\n  initrd /recovery/initrd.img\n}}\n",
        p = c.panic_secs,
        args = c.recovery_args
    ));
    s.push_str(&format!(
        "menuentry 'dualroot recovery gave up' --id recovery_halt {{\n  echo '{RECOVERY_HALT_MESSAGE}'\n  sleep 10\n  halt\n}}\n"
    ));
    s
}

/// What GRUB prints before it stops the machine at the halt entry.
pub const RECOVERY_HALT_MESSAGE: &str = "DUALROOT-RECOVERY-HALT: the recovery entry used up its boot tries without the migration finishing a step; stopping here instead of rebooting again. The journal is on /boot/dualroot/journal.json.";

/// Recovery boots GRUB allows between two finished steps: one more than the
/// attempts dualroot gives a step, so dualroot's own budget (with its message)
/// ends a failing step first; GRUB's stops a recovery that never reaches dualroot.
pub const RECOVERY_TRIES: u32 = crate::migrate::journal::MAX_ATTEMPTS + 1;

/// The full `recovery_tries` value: `1` per allowed boot and the terminator, so
/// "no tries left" (`x`) never reads like "never set" (empty).
pub fn recovery_tries_full() -> String {
    format!("{}x", "1".repeat(RECOVERY_TRIES as usize))
}

/// Refills `recovery_tries` in the environment block at `env_path` when a
/// migration is under way there (dualroot finished a step: progress).
pub fn rearm_recovery(env_path: &Path) -> Result<()> {
    let mut env = read_env(env_path)?;
    if env.get("migrating").map(String::as_str) != Some("1") {
        return Ok(());
    }
    if env.get("recovery_tries") == Some(&recovery_tries_full()) {
        return Ok(());
    }
    env.insert("recovery_tries".into(), recovery_tries_full());
    write_env(env_path, &env)
}

/// Boots a pending kernel update gets in a slot before GRUB goes back to the
/// slot's confirmed kernel pair.
pub const KERNEL_TRIES: usize = 3;

/// A kernel pair's file suffix: pair 0 is `vmlinuz`, pair 1 `vmlinuz.1`.
pub fn kernel_pair_suffix(pair: &str) -> &'static str {
    if pair == "1" {
        ".1"
    } else {
        ""
    }
}

/// The kernel block of the generated grub.cfg for the slot GRUB chose, in
/// Rust (after [`select_slot`]): returns the kernel pair it boots ("0" or "1")
/// and the environment after `save_env`.
pub fn select_kernel(
    env: &BTreeMap<String, String>,
    chosen: &str,
) -> (String, BTreeMap<String, String>) {
    let mut e = env.clone();
    let get = |e: &BTreeMap<String, String>, k: &str| e.get(k).cloned().unwrap_or_default();
    let mut kboot = get(&e, &format!("{chosen}_kpair"));
    if get(&e, &format!("{chosen}_ktrial")) == "1" {
        let tries = get(&e, &format!("{chosen}_ktries"));
        if let Some(left) = tries.strip_prefix('1') {
            e.insert(format!("{chosen}_ktries"), left.to_string());
            kboot = get(&e, &format!("{chosen}_ktry"));
        } else {
            e.insert(format!("{chosen}_ktrial"), "0".into());
            e.insert(format!("{chosen}_kfell"), "1".into());
        }
    }
    (if kboot == "1" { "1" } else { "0" }.into(), e)
}

/// What the generated grub.cfg does with the environment, in Rust, so the state
/// machine can be tested across boots: returns the entry id's slot (`a`, `b` or
/// `recovery`) and the environment after GRUB's `save_env`. Keep it line by line
/// in step with `render_cfg` (the QEMU slot scenarios boot the real thing).
pub fn select_slot(env: &BTreeMap<String, String>) -> (String, BTreeMap<String, String>) {
    let mut e = env.clone();
    let get = |e: &BTreeMap<String, String>, k: &str| e.get(k).cloned().unwrap_or_default();
    if get(&e, "migrating") == "1" {
        let tries = get(&e, "recovery_tries");
        if tries.is_empty() {
            return ("recovery".into(), e);
        }
        if let Some(left) = tries.strip_prefix('1') {
            e.insert("recovery_tries".into(), left.to_string());
            return ("recovery".into(), e);
        }
        return ("recovery_halt".into(), e);
    }
    let bootable = |s: &str| s == "trying" || s == "good";
    let mut chosen = if get(&e, "primary") == "b" { "b" } else { "a" };
    for (me, other) in [("a", "b"), ("b", "a")] {
        if chosen == me
            && !bootable(&get(&e, &format!("{me}_state")))
            && bootable(&get(&e, &format!("{other}_state")))
        {
            chosen = other;
        }
    }
    for (me, other) in [("a", "b"), ("b", "a")] {
        if chosen == me && get(&e, &format!("{me}_state")) == "trying" {
            let tries = get(&e, &format!("{me}_tries"));
            if let Some(left) = tries.strip_prefix('1') {
                e.insert(format!("{me}_tries"), left.to_string());
            } else if get(&e, &format!("{other}_state")) == "good" {
                e.insert(format!("{me}_state"), "bad".into());
                e.insert("primary".into(), other.into());
                e.insert("fallback_from".into(), me.into());
                chosen = other;
            }
        }
    }
    (chosen.into(), e)
}

/// Written next to grub.cfg at migration so `slot install` regenerates the same
/// configuration on the running system.
pub const BOOT_CONFIG_FILE: &str = "dualroot/boot.toml";

impl BootConfig {
    pub fn to_toml(&self) -> String {
        let mut t = toml::Table::new();
        t.insert("vg".into(), self.vg.clone().into());
        t.insert("kernel_args".into(), self.kernel_args.clone().into());
        t.insert("recovery_args".into(), self.recovery_args.clone().into());
        t.insert("panic_secs".into(), i64::from(self.panic_secs).into());
        t.insert("grub_dir".into(), self.flavor.dir().into());
        format!(
            "# Written by dualroot: what the generated grub.cfg is made from.\n{}",
            toml::to_string(&t).unwrap_or_default()
        )
    }

    pub fn parse(text: &str) -> Result<BootConfig> {
        let t: toml::Table = toml::from_str(text)?;
        let s = |k: &str| -> Result<String> {
            Ok(t.get(k)
                .and_then(|v| v.as_str())
                .with_context(|| format!("{k} is missing"))?
                .to_string())
        };
        Ok(BootConfig {
            // Written before GRUB flavors were told apart: /boot/grub.
            flavor: Flavor::parse(t.get("grub_dir").and_then(|v| v.as_str()).unwrap_or("grub")),
            vg: s("vg")?,
            kernel_args: s("kernel_args")?,
            recovery_args: s("recovery_args")?,
            panic_secs: t
                .get("panic_secs")
                .and_then(|v| v.as_integer())
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(10),
        })
    }

    pub fn load(boot: &Path) -> Result<BootConfig> {
        let p = boot.join(BOOT_CONFIG_FILE);
        let text = fs::read_to_string(&p)
            .with_context(|| format!("reading {} (written by the migration)", p.display()))?;
        BootConfig::parse(&text).with_context(|| format!("parsing {}", p.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_round_trip_as_grub_escapes_them() {
        // Found by the grubenv fuzz target (fuzz/regressions/grubenv/).
        let mut m = BTreeMap::new();
        for (k, v) in [
            ("a", "a\r"),
            ("b", "x\\ny"),
            ("c", "x\\"),
            ("d", "line1\nline2"),
            ("e", ""),
        ] {
            m.insert(k.to_string(), v.to_string());
        }
        let block = render_env(&m).unwrap();
        assert_eq!(parse_env(&block).unwrap(), m);
        let text = String::from_utf8(block).unwrap();
        assert!(
            text.contains("d=line1\\\nline2\n"),
            "GRUB writes a backslash before a newline: {text:?}"
        );
        assert!(text.contains("c=x\\\\\n"), "{text:?}");
        // What grub-editenv writes for a value with a newline reads back the same.
        let grub = format!("{ENV_HEADER}next_entry=one\\\ntwo\nsaved_entry=0\n");
        let e = parse_env(grub.as_bytes()).unwrap();
        assert_eq!(e["next_entry"], "one\ntwo");
        assert_eq!(e["saved_entry"], "0");
        assert!(render_env(&BTreeMap::from([("x=y".to_string(), String::new())])).is_err());
    }

    #[test]
    fn env_round_trip_is_one_block() {
        let mut v = BTreeMap::new();
        v.insert("primary".to_string(), "a".to_string());
        v.insert("a_tries".to_string(), "111".to_string());
        v.insert("odd".to_string(), "x\\y\nz".to_string());
        let b = render_env(&v).unwrap();
        assert_eq!(b.len(), 1024);
        assert!(b.starts_with(b"# GRUB Environment Block\na_tries=111\n"));
        assert_eq!(parse_env(&b).unwrap(), v);
    }

    #[test]
    fn env_too_big_refused() {
        let mut v = BTreeMap::new();
        v.insert("x".to_string(), "y".repeat(1100));
        assert!(render_env(&v)
            .unwrap_err()
            .to_string()
            .contains("1024-byte block"));
    }

    #[test]
    fn env_written_atomically() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("grubenv");
        let mut v = BTreeMap::new();
        v.insert("primary".to_string(), "b".to_string());
        write_env(&p, &v).unwrap();
        assert_eq!(read_env(&p).unwrap(), v);
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn boot_config_round_trip() {
        let c = BootConfig {
            flavor: Flavor::Grub,
            vg: "VA".into(),
            kernel_args: "console=ttyS0 net.ifnames=0".into(),
            recovery_args: "console=ttyS0 rd.shell=0".into(),
            panic_secs: 10,
        };
        let back = BootConfig::parse(&c.to_toml()).unwrap();
        assert_eq!(render_cfg(&back), render_cfg(&c));
        assert!(BootConfig::parse("vg = \"VA\"\n")
            .unwrap_err()
            .to_string()
            .contains("kernel_args is missing"));
    }

    #[test]
    fn select_slot_models_the_template() {
        let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(select_slot(&env(&[("migrating", "1")])).0, "recovery");
        // No state at all (a bare grubenv): slot a.
        assert_eq!(select_slot(&env(&[])).0, "a");
        // Primary points at a slot being overwritten: the good one boots.
        let e = env(&[("primary", "b"), ("a_state", "good"), ("b_state", "empty")]);
        assert_eq!(select_slot(&e).0, "a");
        // No tries left and nothing good to fall back to: keep booting it.
        let e = env(&[
            ("primary", "a"),
            ("a_state", "trying"),
            ("a_tries", ""),
            ("b_state", "empty"),
        ]);
        let (s, after) = select_slot(&e);
        assert_eq!(s, "a");
        assert_eq!(after, e);
        // The template holds the same decisions.
        let c = render_cfg(&BootConfig {
            flavor: Flavor::Grub,
            vg: "VA".into(),
            kernel_args: String::new(),
            recovery_args: String::new(),
            panic_secs: 10,
        });
        assert!(c.contains(r#"if [ "${chosen}" = "b" -a "${b_state}" != "trying" -a "${b_state}" != "good" ]; then"#));
        assert!(c.contains(r#"if [ "${a_state}" = "good" ]; then set chosen=a; fi"#));
        assert!(c.contains(r#"if [ "${chosen}" != "b" ]; then set chosen=a; fi"#));
    }

    /// The recovery entry cannot loop: GRUB spends one of `recovery_tries` per
    /// recovery boot and stops at the halt entry when none is left; dualroot's
    /// refill after each finished step gives a progressing migration its budget back.
    #[test]
    fn recovery_boots_are_counted_and_end_at_the_halt_entry() {
        let d = tempfile::tempdir().unwrap();
        let env_path = d.path().join("grubenv");
        let mut e = BTreeMap::new();
        e.insert("migrating".to_string(), "1".to_string());
        e.insert("recovery_tries".to_string(), recovery_tries_full());
        write_env(&env_path, &e).unwrap();
        let mut boots = Vec::new();
        for _ in 0..10 {
            let (entry, after) = select_slot(&read_env(&env_path).unwrap());
            write_env(&env_path, &after).unwrap();
            boots.push(entry);
        }
        let recovery = boots.iter().filter(|b| *b == "recovery").count();
        assert_eq!(recovery as u32, RECOVERY_TRIES, "{boots:?}");
        assert!(boots[RECOVERY_TRIES as usize..]
            .iter()
            .all(|b| b == "recovery_halt"));
        // A finished step refills the budget; after the migration (no
        // `migrating`) the refill touches nothing.
        rearm_recovery(&env_path).unwrap();
        assert_eq!(select_slot(&read_env(&env_path).unwrap()).0, "recovery");
        let done = BTreeMap::from([("primary".to_string(), "a".to_string())]);
        write_env(&env_path, &done).unwrap();
        rearm_recovery(&env_path).unwrap();
        assert_eq!(read_env(&env_path).unwrap(), done);
        // An environment from before the budget existed still boots recovery.
        let old = BTreeMap::from([("migrating".to_string(), "1".to_string())]);
        assert_eq!(select_slot(&old).0, "recovery");

        // The template: same decisions, and the recovery boot waits for nothing
        // but the /boot filesystem GRUB booted from.
        let c = render_cfg(&BootConfig {
            flavor: Flavor::Grub,
            vg: "VA".into(),
            kernel_args: String::new(),
            recovery_args: "console=ttyS0".into(),
            panic_secs: 10,
        });
        assert!(c.contains(r#"elif regexp --set=1:left '^1(.*)$' "${recovery_tries}"; then"#));
        assert!(c.contains(&format!("save_env -f /{ENV_FILE} recovery_tries")));
        assert!(c.contains("set default=recovery_halt"));
        assert!(c.contains("--id recovery_halt"));
        let rec = c.lines().find(|l| l.contains("/recovery/vmlinuz")).unwrap();
        assert!(
            rec.contains("root=LABEL=boot") && rec.contains("rd.dualroot.vg=VA"),
            "{rec}"
        );
        assert!(
            !rec.contains("/dev/mapper") && !rec.contains("rd.lvm.vg"),
            "{rec}"
        );
    }

    #[test]
    fn grub_flavor_from_the_installing_tool() {
        assert_eq!(Flavor::of_tool("grub2-install"), Flavor::Grub2);
        assert_eq!(Flavor::of_tool("/usr/sbin/grub2-install"), Flavor::Grub2);
        assert_eq!(Flavor::of_tool("grub-install"), Flavor::Grub);
        assert_eq!(
            Flavor::Grub2.cfg_path(Path::new("/boot")),
            Path::new("/boot/grub2/grub.cfg")
        );
        let mut bc =
            BootConfig::parse("vg = \"VA\"\nkernel_args = \"\"\nrecovery_args = \"\"\n").unwrap();
        assert_eq!(bc.flavor, Flavor::Grub, "boot.toml from before flavors");
        bc.flavor = Flavor::Grub2;
        assert_eq!(
            BootConfig::parse(&bc.to_toml()).unwrap().flavor,
            Flavor::Grub2
        );
        // The environment stays in one place whichever directory holds grub.cfg.
        assert!(render_cfg(&bc).contains("load_env -f /grub/grubenv"));
    }

    /// Issue 23 item 9: a kernel update in a good slot whose kernel never comes
    /// up is tried KERNEL_TRIES times, then the slot's previous pair boots again
    /// (no loop, no lost slot); one that comes up is promoted by mark-good.
    #[test]
    fn a_bad_kernel_update_falls_back_to_the_slots_previous_pair() {
        let mut env: BTreeMap<String, String> =
            [("primary", "a"), ("a_state", "good"), ("b_state", "good")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        // No update pending: pair 0, nothing changes.
        let (slot, e) = select_slot(&env);
        assert_eq!(select_kernel(&e, &slot), ("0".to_string(), e.clone()));
        // `slot update-boot` wrote pair 1 and armed the trial.
        env = crate::slot::state::kernel_trial(&env, "a", "1");
        let mut pairs = Vec::new();
        for _ in 0..KERNEL_TRIES + 2 {
            let (slot, e) = select_slot(&env);
            assert_eq!(slot, "a", "the good slot stays chosen");
            let (pair, e) = select_kernel(&e, &slot);
            pairs.push(pair);
            env = e;
        }
        assert_eq!(pairs, ["1", "1", "1", "0", "0"]);
        assert_eq!(env["a_kfell"], "1");
        assert_eq!(env["a_ktrial"], "0");
        // mark-good on the old pair keeps pair 0 confirmed.
        let e = crate::slot::state::confirm_kernel(&env, "a", "0");
        assert_eq!(select_kernel(&e, "a").0, "0");

        // A kernel update that comes up: promoted, and the next update goes to pair 0.
        let mut env = crate::slot::state::kernel_trial(&e, "a", "1");
        let (pair, e) = select_kernel(&env, "a");
        assert_eq!(pair, "1");
        env = crate::slot::state::confirm_kernel(&e, "a", "1");
        assert_eq!(env["a_kpair"], "1");
        assert!(!env.contains_key("a_ktrial") && !env.contains_key("a_kfell"));
        for _ in 0..5 {
            assert_eq!(select_kernel(&env, "a").0, "1", "confirmed pair 1 stays");
        }
        assert_eq!(crate::slot::state::next_kernel_pair(&env, "a"), "0");
    }

    #[test]
    fn cfg_has_three_entries_and_counts_tries() {
        let c = render_cfg(&BootConfig {
            flavor: Flavor::Grub,
            vg: "VA".into(),
            kernel_args: "console=ttyS0 net.ifnames=0".into(),
            recovery_args: "console=ttyS0".into(),
            panic_secs: 10,
        });
        assert!(c.contains("--id slot_a"));
        assert!(c.contains("--id slot_b"));
        assert!(c.contains("--id recovery"));
        assert!(c.contains(
            "root=/dev/mapper/VA-root ro dualroot.slot=a dualroot.kpair=0 panic=10 rd.shell=0 rd.emergency=reboot rd.timeout=180 console=ttyS0 net.ifnames=0"
        ));
        // Kernel pair 1 of each slot has its own entry and files.
        assert!(c.contains("--id slot_b_k1"));
        assert!(c.contains(
            "linux /a/vmlinuz.1 root=/dev/mapper/VA-root ro dualroot.slot=a dualroot.kpair=1"
        ));
        assert!(c.contains("initrd /b/initrd.img.1\n"));
        assert!(c.contains(r#"regexp --set=1:left '^1(.*)$' "${a_ktries}""#));
        assert!(c.contains("save_env -f /grub/grubenv b_ktrial b_kfell"));
        // Every slot entry reboots from a failing initramfs, so the try counter moves.
        assert_eq!(
            c.matches("panic=10 rd.shell=0 rd.emergency=reboot rd.timeout=180")
                .count(),
            4
        );
        assert!(c.contains("root=/dev/mapper/VA-back"));
        assert!(c.contains("rd.dualroot.resume=1"));
        assert!(c.contains(r#"regexp --set=1:left '^1(.*)$' "${a_tries}""#));
        assert!(c.contains("save_env -f /grub/grubenv b_state primary fallback_from"));
        assert!(c.contains("load_env -f /grub/grubenv"));
        assert!(
            !c.contains("save_env a_"),
            "every save_env names the one block"
        );
        // Balanced braces and if/fi, a cheap guard against a broken template.
        assert_eq!(
            c.matches('{').count() - c.matches("${").count(),
            c.matches('}').count() - c.matches("${").count()
        );
        let ifs = c
            .lines()
            .filter(|l| l.trim_start().starts_with("if "))
            .count();
        let fis = c
            .lines()
            .filter(|l| l.trim() == "fi" || l.trim_end().ends_with("; fi"))
            .count();
        assert_eq!(ifs, fis);
        // GRUB's own parser accepts it (grub-script-check from grub-common).
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("grub.cfg");
        fs::write(&p, &c).unwrap();
        crate::cmd::CommandExt::run(&mut crate::cmd::cmd("grub-script-check", [&p]))
            .expect("grub-script-check (package grub-common) rejects the generated grub.cfg");
    }
}
