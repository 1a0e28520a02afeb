//! The agent on a guest, shared by agent_e2e.rs and fleet.rs: its static
//! binary and shipped unit, the payload that installs it, the carry entries
//! that take it into every new root, its log.

use super::{slot, slot_status};
use qemu_tests::disk::standard_payload;
use qemu_tests::images;
use qemu_tests::qemu::Vm;
use qemu_tests::scenario::Scenario;
use qemu_tests::{cmd, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The relay `guestfwd` rules run (this package's `guestfwd-relay` binary).
pub const RELAY: &str = env!("CARGO_BIN_EXE_guestfwd-relay");

/// What `/etc/dualroot/health.toml` asks of every new slot: SSH and the agent run.
pub const HEALTH: &str = "units = [\"ssh.service\", \"dualroot-agent.service\"]\n";

/// Carry-list entries that take the agent into every new root.
pub const CARRY_AGENT: &str = r#"
# dualroot-agent is appliance software: its binary and enabled unit go into every new root
[[carry]]
path = "/usr/local/sbin/dualroot-agent"

[[carry]]
path = "/etc/systemd/system/dualroot-agent.service"

[[carry]]
path = "/etc/systemd/system/multi-user.target.wants/dualroot-agent.service"
"#;

/// Installs the agent from the payload disk (mounted at /mnt/payload) with its
/// shipped unit, config, register token, health check and the vendor keyring
/// (`bundle verify` and service packages check against /etc/dualroot/keyring),
/// enabled, not started.
pub const INSTALL_AGENT: &str = "set -e
P=/mnt/payload/agent
install -m 755 $P/dualroot-agent /usr/local/sbin/dualroot-agent
install -d -m 755 /etc/dualroot
install -m 600 $P/agent.toml /etc/dualroot/agent.toml
install -m 600 $P/register-token /etc/dualroot/register-token
install -m 644 $P/health.toml /etc/dualroot/health.toml
install -d -m 755 /etc/dualroot/keyring
install -m 644 $P/keyring/*.pub /etc/dualroot/keyring/
install -m 644 $P/dualroot-agent.service /etc/systemd/system/dualroot-agent.service
systemctl daemon-reload
systemctl enable dualroot-agent.service 2>&1";

/// Whether an ELF64 file names a program interpreter (a `PT_INTERP` program
/// header): a dynamically linked binary. A static(-pie) binary has none.
pub fn elf_has_interp(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let mut off = [0u8; 8];
    off.copy_from_slice(&b[0x20..0x28]);
    let phoff = u64::from_le_bytes(off) as usize;
    let (size, n) = (u16_at(0x36), u16_at(0x38));
    (0..n).any(|i| {
        let o = phoff.saturating_add(i * size);
        o + 4 <= b.len() && u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) == 3
    })
}

/// The static agent binary; a dynamic one is refused (the legacy guest's
/// glibc is older than the host's).
pub fn agent_bin() -> Result<PathBuf> {
    let p = std::env::var_os("DUALROOT_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| images::workspace_dir().join("target/release/dualroot-agent"));
    let data = std::fs::read(&p).with_context(|| {
        format!(
            "reading the agent binary {} (build it with scripts/build-static.sh or set DUALROOT_AGENT_BIN)",
            p.display()
        )
    })?;
    if elf_has_interp(&data) {
        qemu_tests::bail!(
            "{} is dynamically linked; the guests need the static agent (scripts/build-static.sh)",
            p.display()
        );
    }
    Ok(p)
}

/// The shipped unit, with the binary where the payload installs it.
pub fn agent_unit() -> Result<String> {
    let p = images::workspace_dir().join("agent-lib/dualroot-agent.service");
    let unit = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let from = "ExecStart=/usr/sbin/dualroot-agent ";
    if !unit.contains(from) {
        qemu_tests::bail!(
            "{} has no {from:?} line to point at /usr/local/sbin",
            p.display()
        );
    }
    Ok(unit.replace(from, "ExecStart=/usr/local/sbin/dualroot-agent "))
}

/// The version in a bundle's signed manifest (`dualroot bundle inspect --json`).
pub fn bundle_version(bundle: &Path) -> Result<String> {
    let out = cmd::run(
        Command::new(images::dualroot_bin())
            .args(["bundle", "inspect", "--json"])
            .arg(bundle),
    )?;
    let v: Value = serde_json::from_slice(&out.stdout).context("parsing bundle inspect --json")?;
    v["version"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no version in the manifest of {}: {v}", bundle.display()))
}

/// Payload disk: the standard payload plus the agent, its unit, config,
/// register token, health check, the harness's bundle key and the carry entries.
pub fn agent_payload(sc: &Scenario, agent_toml: &str, register_token: &str) -> Result<PathBuf> {
    let keys = images::bundle()?;
    let p = standard_payload(&sc.path("payload"), &[])?;
    p.file(
        &keys.keyring.join("test.pub"),
        "agent/keyring/test.pub",
        0o644,
    )?;
    p.file(&agent_bin()?, "agent/dualroot-agent", 0o755)?;
    p.bytes(
        agent_unit()?.as_bytes(),
        "agent/dualroot-agent.service",
        0o644,
    )?;
    p.bytes(agent_toml.as_bytes(), "agent/agent.toml", 0o600)?;
    p.bytes(register_token.as_bytes(), "agent/register-token", 0o600)?;
    p.bytes(HEALTH.as_bytes(), "agent/health.toml", 0o644)?;
    p.bytes(CARRY_AGENT.as_bytes(), "agent/carry.toml", 0o644)?;
    p.build(&sc.path("payload.img"))
}

/// The agent's log of this boot (best effort).
pub fn agent_log(vm: &Vm) -> String {
    vm.ssh_timeout(
        "journalctl -b -u dualroot-agent --no-pager -o cat | tail -n 60",
        Duration::from_secs(60),
    )
    .map(|o| o.stdout)
    .unwrap_or_else(|e| format!("(no log: {e})"))
}

/// Waits until the booted slot is confirmed good by its health check.
pub fn wait_booted_good(vm: &Vm) -> Result<Value> {
    let t0 = Instant::now();
    loop {
        let st = slot_status(vm)?;
        let booted = st["booted"].as_str().unwrap_or("");
        if slot(&st, booted)["state"] == "good" {
            return Ok(st);
        }
        if t0.elapsed() > Duration::from_secs(600) {
            qemu_tests::bail!("the booted slot was not confirmed within 600 s: {st}");
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// The reference plan with the agent's carry entries, and its signature by
/// `vendor_key` (the agent stages only a vendor-signed plan): what a
/// `migrate` task carries.
pub fn signed_agent_plan(vendor_key: &Path) -> Result<(String, String)> {
    let plan_path = images::workspace_dir().join("fixtures/plans/reference.toml");
    let plan = std::fs::read_to_string(&plan_path)
        .with_context(|| format!("reading {}", plan_path.display()))?
        + CARRY_AGENT;
    let secret = dualroot_keys::load_secret(vendor_key)
        .map_err(|e| qemu_tests::error::Error::msg(format!("{e:#}")))?;
    let signature = dualroot_keys::sign_plan(&secret, plan.as_bytes());
    Ok((plan, signature))
}
