//! The JSON the real `dualroot` binary prints for the agent, kept as fixtures in
//! `fixtures/contract/` that the agent's tests decode. This test runs the built
//! binary and fails when its output no longer matches a fixture (rewrite them
//! with `DUALROOT_UPDATE_CONTRACT=1 cargo test -p initrd-tool --test contract`),
//! so the agent is always tested against what the engine really prints.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/contract")
}

/// A /boot as the migration and `slot install` leave it: grubenv + manifests.
fn boot_dir(env: &[(&str, &str)], versions: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let vars = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    std::fs::create_dir_all(d.path().join("grub")).unwrap();
    dualroot::grub::write_env(&d.path().join("grub/grubenv"), &vars).unwrap();
    for (slot, version) in versions {
        std::fs::create_dir_all(d.path().join(slot)).unwrap();
        std::fs::write(
            d.path().join(slot).join("manifest.toml"),
            format!("os_id = \"debian\"\nversion = \"{version}\"\n"),
        )
        .unwrap();
        std::fs::write(
            d.path().join(slot).join("kernel-version"),
            "6.12.117+deb13-amd64\n",
        )
        .unwrap();
    }
    d
}

fn check(name: &str, boot: &Path, cmdline: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_dualroot"))
        .args(["slot", "status", "--json"])
        .env("DUALROOT_BOOT", boot)
        .env("DUALROOT_CMDLINE", cmdline)
        .env("DUALROOT_NO_KMSG", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let p = fixtures().join(name);
    if std::env::var_os("DUALROOT_UPDATE_CONTRACT").is_some() {
        std::fs::write(&p, &text).unwrap();
    }
    let want = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (DUALROOT_UPDATE_CONTRACT=1 writes it)",
            p.display()
        )
    });
    assert_eq!(
        text, want,
        "`dualroot slot status --json` no longer prints {name}: the agent's tests decode that file. If the change is meant, bump dualroot_api::API_VERSION where it is incompatible and rewrite the fixtures with DUALROOT_UPDATE_CONTRACT=1"
    );
    let decoded: dualroot_api::SlotStatus = dualroot_api::decode("slot status", &text).unwrap();
    assert_eq!(decoded.api_version, dualroot_api::API_VERSION);
}

#[test]
fn slot_status_after_switch_to_b() {
    let boot = boot_dir(
        &[
            ("primary", "b"),
            ("a_state", "good"),
            ("b_state", "trying"),
            ("b_tries", "11"),
            ("b_budget", "3"),
        ],
        &[("a", "13"), ("b", "13.2")],
    );
    check(
        "slot-status-trying-b.json",
        boot.path(),
        "BOOT_IMAGE=/b/vmlinuz root=/dev/mapper/VA-back ro dualroot.slot=b",
    );
}

#[test]
fn slot_status_after_fallback() {
    let boot = boot_dir(
        &[
            ("primary", "a"),
            ("a_state", "good"),
            ("b_state", "bad"),
            ("b_tries", ""),
            ("b_budget", "3"),
            ("fallback_from", "b"),
        ],
        &[("a", "13"), ("b", "13.2")],
    );
    check(
        "slot-status-fallback.json",
        boot.path(),
        "BOOT_IMAGE=/a/vmlinuz root=/dev/mapper/VA-root ro dualroot.slot=a",
    );
}

/// The agent runs the engine under its unit's `UMask=0077`; what the engine
/// writes must still get system-file modes (a slot's fstab, units and tree are
/// read by non-root programs), while secrets keep their explicit 0600.
#[test]
fn the_engine_does_not_take_the_callers_umask() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("vendor.key");
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 077 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_dualroot"))
        .args(["key", "generate", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.path().join("vendor.key.pub")), 0o644);
    assert_eq!(mode(&key), 0o600);
}
