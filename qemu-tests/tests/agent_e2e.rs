//! The agent drives the real engine over MQTT, in QEMU (issue 16 item 5).
//! Mosquitto, the MQTT backend and the HTTP server (registration, files with
//! Range) run on the host on 127.0.0.1 (`qemu_tests::backend`, agent-lib's own
//! test backend); the guest reaches exactly those two ports through `guestfwd`
//! rules on its `restrict=on` network. The agent is the static
//! `dualroot-agent` (`$DUALROOT_AGENT_BIN`, default
//! `target/release/dualroot-agent`), installed with its shipped unit; it
//! registers with the register token the image ships.
//! - (a) online upgrade on a migrated Debian 13 guest: `upgrade` task for the
//!   v2 bundle, the download cut once mid-way and resumed, real `slot
//!   install`, `switch`, reboot, the health check confirms slot b, the agent
//!   on slot b reports the result once, its heartbeat shows the new version;
//! - (b) rollback report: an `upgrade` to a bundle whose init exits; GRUB
//!   falls back to slot a; the agent reports the upgrade failed ("rolled
//!   back") and its heartbeat shows the old version;
//! - (c) `migrate` task on the Debian 11 legacy guest: the agent registers,
//!   downloads, stages with the task's plan and reboots; after the migration
//!   the agent on the new OS keeps its device id (one registration) and
//!   reports the boot of the new OS.
//!
//! The agent is appliance software, not part of the test OS bundles: the
//! plan's carry list takes its binary and unit into every new root (the task's
//! plan in (c); the migration's plan on the data LV in (a) and (b)), and
//! /etc/dualroot (config, register token, health.toml) is carried anyway.
//!
//! `DUALROOT_AGENT_BIN=... qemu-tests/run-scenarios.sh agent_e2e`

mod common;

use common::agent::*;
use common::*;
use qemu_tests::backend::{Cloud, Served, REGISTER_TOKEN};
use qemu_tests::disk::overlay_on;
use qemu_tests::images;
use qemu_tests::qemu::{GuestFwd, Vm, VmConfig};
use qemu_tests::scenario::{self, Scenario};
use qemu_tests::states::{self, Input};
use qemu_tests::{cmd, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What the broken bundle's init does: the kernel panics when PID 1 exits and
/// `panic=10` reboots, so GRUB spends the slot's tries.
const BROKEN_INIT: &str = "#!/bin/sh\necho DUALROOT-TEST-INIT-EXITS\nexit 1\n";
const INIT_EXITS: &str = "DUALROOT-TEST-INIT-EXITS";

/// The new OS with an init that exits (version `<v>.3`, newer than the
/// migrated one), signed with the harness key: a bundle whose slot cannot
/// boot. Cached under `$DUALROOT_CACHE/bundles/newosbroken-<key>.bundle`.
fn broken_init_bundle() -> Result<PathBuf> {
    let tree = images::newos()?;
    let keys = images::bundle()?;
    let bin = images::dualroot_bin();
    let info = std::fs::read_to_string(tree.dir.join("build-info"))?;
    let base = images::parse_build_info(&info)
        .into_iter()
        .find(|(k, _)| k == "test_version")
        .map(|(_, v)| v)
        .context("the new OS tree's build-info has no test_version")?;
    let version = format!("{base}.3");
    let key = states::key(&[
        Input::Text(&info),
        Input::File(&keys.key),
        Input::File(&bin),
        Input::Text(BROKEN_INIT),
    ])?;
    let dir = images::cache_dir().join("bundles");
    let out = dir.join(format!("newosbroken-{key}.bundle"));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir)?;
    let root = dir.join(format!(".broken-root-{key}"));
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    let t0 = Instant::now();
    cmd::run(Command::new("cp").arg("-a").arg(&tree.root).arg(&root))?;
    std::fs::write(
        root.join("etc/dualroot-test-version"),
        format!("{version}\n"),
    )?;
    let init = root.join("usr/sbin/init");
    if std::fs::symlink_metadata(&init).is_ok() {
        std::fs::remove_file(&init)?;
    }
    std::fs::write(&init, BROKEN_INIT)?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    let partial = out.with_extension("partial");
    let made = cmd::run(
        Command::new(&bin)
            .args(["bundle", "create", "--rootfs"])
            .arg(&root)
            .args(["--os-id", "debian", "--version", &version])
            .args(["--model", "va-7", "--requires-cpu", "x86-64-v2", "--key"])
            .arg(&keys.key)
            .arg("--out")
            .arg(&partial),
    );
    std::fs::remove_dir_all(&root)?;
    made?;
    std::fs::rename(&partial, &out)?;
    println!(
        "[bundle] broken-init bundle {version} made in {:.0} s: {}",
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(out)
}

/// A VM config on `disk` with the payload and the cloud's forwards.
fn vm_config(cloud: &Cloud, disk: &Path, fmt: &str, payload: &Path) -> VmConfig {
    let mut cfg = VmConfig::default().disk(disk, fmt).disk(payload, "raw");
    cfg.guestfwd = cloud.guestfwd(Path::new(RELAY));
    cfg
}

/// Starts the installed agent and waits for its registration; returns the
/// device id the backend handed out.
fn start_agent(sc: &Scenario, cloud: &Cloud, vm: &Vm) -> Result<String> {
    vm.ssh_ok("systemctl start dualroot-agent.service")?;
    let t0 = Instant::now();
    loop {
        if let Some(id) = cloud.issued_ids().first() {
            println!(
                "[{}] the agent registered as {id} after {:.0} s",
                sc.name,
                t0.elapsed().as_secs_f64()
            );
            return Ok(id.clone());
        }
        if t0.elapsed() > Duration::from_secs(180) {
            qemu_tests::bail!(
                "the agent did not register within 180 s; its log:\n{}",
                agent_log(vm)
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The result messages for `key` after the agent had time to send any
/// repeat (two outbox retry periods of the guest config, 10 s each).
fn settled_results(cloud: &Cloud, key: &str) -> Vec<Value> {
    std::thread::sleep(Duration::from_secs(25));
    cloud.results_for(key)
}

/// One registration, and every message from that one device.
fn check_one_identity(sc: &Scenario, cloud: &Cloud, dev: &str) -> Result<()> {
    let issued = cloud.issued_ids();
    let seen = cloud.devices_seen();
    sc.check(
        "one registration; every message came from that device id",
        issued == [dev.to_string()] && seen == BTreeSet::from([dev.to_string()]),
        &format!("registered {issued:?}, messages from {seen:?}"),
    )
}

/// The migrated appliance (cached state "migrated") with the agent installed,
/// carried by the data LV's plan, started and registered.
fn migrated_with_agent(sc: &Scenario, cloud: &Cloud) -> Result<(Vm, String)> {
    let st = migrated(sc)?;
    sc.uses_state(&st);
    let (disk, fmt) = overlay_on(&st.disk, "qcow2", &sc.path("disk.qcow2"))?;
    let payload = agent_payload(sc, &cloud.agent_config(), REGISTER_TOKEN)?;
    let mut vm = sc.vm("appliance", vm_config(cloud, &disk, fmt, &payload))?;
    vm.wait_for_console_any(&[BOOTED], &[GAVE_UP], Duration::from_secs(900))?;
    vm.wait_for_ssh(Duration::from_secs(300))?;
    mount_payload(&vm)?;
    vm.ssh_ok(INSTALL_AGENT)?;
    // `slot install` takes its carry list from the migration's plan on the
    // data LV; its `[[carry]]` tables take the appended ones (an inline
    // `carry = [...]` would not)
    vm.ssh_ok(
        "P=/data/dualroot/migration/plan.toml; test -f $P && ! grep -q '^carry *=' $P && \
         cat /mnt/payload/agent/carry.toml >>$P && grep -c '^\\[\\[carry\\]\\]' $P",
    )?;
    let dev = start_agent(sc, cloud, &vm)?;
    Ok((vm, dev))
}

/// Runs a scenario's steps; on failure prints the agent's log first.
fn with_agent_log(sc: &Scenario, vm: &mut Vm, r: Result<()>) -> Result<()> {
    if r.is_err() {
        println!("[{}] agent log:\n{}", sc.name, agent_log(vm));
        return r;
    }
    vm.shutdown(Duration::from_secs(120))
}

#[test]
#[ignore = "boots VMs (about 25 minutes under TCG)"]
fn agent_e2e_online_upgrade() {
    scenario::run("agent-e2e-online-upgrade", |sc| {
        let cloud = Cloud::start(&sc.dir);
        let v2 = images::bundle_v2()?;
        let version = bundle_version(&v2.path)?;
        let bundle = cloud.serve_file("/files/os-v2.bundle", &v2.path)?;
        let cut_at = bundle.size / 2;
        cloud.http.cut(&bundle.path, cut_at as usize, 1);
        let (mut vm, dev) = migrated_with_agent(sc, &cloud)?;
        let r = online_upgrade(sc, &cloud, &mut vm, &dev, &bundle, &version, cut_at);
        with_agent_log(sc, &mut vm, r)
    });
}

fn online_upgrade(
    sc: &Scenario,
    cloud: &Cloud,
    vm: &mut Vm,
    dev: &str,
    bundle: &Served,
    version: &str,
    cut_at: u64,
) -> Result<()> {
    let hb = cloud.heartbeat(dev, "hb-before", Duration::from_secs(300))?;
    let v1 = hb["slot"]["version"].as_str().unwrap_or("").to_string();
    sc.check(
        "before: the heartbeat shows slot a, confirmed, and the migrated version",
        hb["deviceId"] == dev
            && hb["slot"]["booted"] == "a"
            && hb["slot"]["bootedGood"] == true
            && !v1.is_empty()
            && hb["firmwareVersion"] == v1.as_str(),
        &hb.to_string(),
    )?;
    vm.mark_console();
    let t0 = Instant::now();
    cloud.publish(
        dev,
        "up-1",
        "upgrade",
        json!({"version": version, "url": bundle.url, "sha256": bundle.sha256, "size": bundle.size}),
    );
    // download (cut once), verify, slot install, switch, reboot: all the agent's
    vm.wait_for_console_any(&[BOOTED], &[GAVE_UP], Duration::from_secs(2700))?;
    vm.wait_for_ssh(Duration::from_secs(300))?;
    sc.note(
        "task_to_new_slot_s",
        &format!("{:.0}", t0.elapsed().as_secs_f64()),
    );
    let reqs = cloud.http.requests_to(&bundle.path);
    let resumed_at = reqs
        .get(1)
        .and_then(|r| r.headers.get("range"))
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok());
    sc.check(
        "the download was cut once mid-way and resumed from the bytes it had (Range)",
        reqs.len() == 2
            && !reqs[0].headers.contains_key("range")
            && resumed_at.is_some_and(|n| n > 0 && n <= cut_at),
        &format!(
            "{} requests; cut after {cut_at} of {} bytes, resumed at {resumed_at:?}",
            reqs.len(),
            bundle.size
        ),
    )?;
    let st = wait_booted_good(vm)?;
    sc.check(
        "slot b booted, is primary and its health check confirmed it",
        st["booted"] == "b"
            && st["primary"] == "b"
            && st["version"] == version
            && st["last_boot_was_fallback"] == false,
        &st.to_string(),
    )?;
    let r = cloud.wait_result("up-1", Duration::from_secs(900))?;
    sc.check(
        "the agent on slot b reported the upgrade done: slot b, new version, previous version",
        r["status"] == "done"
            && r["deviceId"] == dev
            && r["result"]["status"] == "upgraded"
            && r["result"]["slot"] == "b"
            && r["result"]["version"] == version
            && r["result"]["previousVersion"] == v1.as_str(),
        &r.to_string(),
    )?;
    // "upgraded" is only ever computed after the reboot (another boot id, slot b
    // booted and confirmed); anything sent from slot a would be another message
    let all = settled_results(cloud, "up-1");
    sc.check(
        "the task's result came exactly once",
        all.len() == 1,
        &format!("{} result message(s): {}", all.len(), cloud.summary()),
    )?;
    let hb = cloud.heartbeat(dev, "hb-after", Duration::from_secs(300))?;
    sc.check(
        "after: the heartbeat shows slot b, confirmed, and the new version",
        hb["deviceId"] == dev
            && hb["slot"]["booted"] == "b"
            && hb["slot"]["bootedGood"] == true
            && hb["slot"]["fallback"] == false
            && hb["slot"]["version"] == version
            && hb["firmwareVersion"] == version,
        &hb.to_string(),
    )?;
    check_one_identity(sc, cloud, dev)
}

#[test]
#[ignore = "boots VMs (about 30 minutes under TCG)"]
fn agent_e2e_rollback_report() {
    scenario::run("agent-e2e-rollback-report", |sc| {
        let cloud = Cloud::start(&sc.dir);
        let broken = broken_init_bundle()?;
        let version = bundle_version(&broken)?;
        let bundle = cloud.serve_file("/files/os-broken.bundle", &broken)?;
        let (mut vm, dev) = migrated_with_agent(sc, &cloud)?;
        let r = rollback_report(sc, &cloud, &mut vm, &dev, &bundle, &version);
        with_agent_log(sc, &mut vm, r)
    });
}

fn rollback_report(
    sc: &Scenario,
    cloud: &Cloud,
    vm: &mut Vm,
    dev: &str,
    bundle: &Served,
    version: &str,
) -> Result<()> {
    let hb = cloud.heartbeat(dev, "hb-before", Duration::from_secs(300))?;
    let v1 = hb["slot"]["version"].as_str().unwrap_or("").to_string();
    sc.check(
        "before: the heartbeat shows slot a and the migrated version",
        hb["slot"]["booted"] == "a" && !v1.is_empty() && v1 != version,
        &hb.to_string(),
    )?;
    vm.mark_console();
    let t0 = Instant::now();
    cloud.publish(
        dev,
        "up-broken",
        "upgrade",
        json!({"version": version, "url": bundle.url, "sha256": bundle.sha256, "size": bundle.size}),
    );
    // install, switch, reboot; slot b's init exits on every try; GRUB falls back
    vm.wait_for_console_any(&[BOOTED], &[GAVE_UP], Duration::from_secs(3600))?;
    vm.wait_for_ssh(Duration::from_secs(300))?;
    sc.note(
        "task_to_fallback_s",
        &format!("{:.0}", t0.elapsed().as_secs_f64()),
    );
    let tries = vm.console_text().matches(INIT_EXITS).count();
    let st = slot_status(vm)?;
    sc.check(
        "slot b failed its boots and GRUB booted slot a by itself",
        tries >= 1
            && st["booted"] == "a"
            && st["fallback_from"] == "b"
            && st["last_boot_was_fallback"] == true
            && slot(&st, "b")["state"] == "bad",
        &format!("{tries} x {INIT_EXITS:?} on the console; status {st}"),
    )?;
    sc.note("failed_boots_of_b", &tries.to_string());
    let r = cloud.wait_result("up-broken", Duration::from_secs(900))?;
    sc.check(
        "the agent reported the upgrade failed: rolled back, running slot a with the old version, GRUB gave up on slot b after its tries",
        r["status"] == "failed"
            && r["deviceId"] == dev
            && r["result"]["status"] == "rolled back"
            && r["result"]["runningSlot"] == "a"
            && r["result"]["runningVersion"] == v1.as_str()
            && r["result"]["wantedVersion"] == version
            && r["result"]["wantedSlot"] == "b"
            && r["result"]["fallbackFrom"] == "b"
            && r["result"]["fallbackTriesUsed"].as_u64().is_some_and(|n| n >= 1)
            && r["error"]
                .as_str()
                .is_some_and(|e| e.contains("rolled back")),
        &r.to_string(),
    )?;
    let all = settled_results(cloud, "up-broken");
    sc.check(
        "the task's result came exactly once",
        all.len() == 1,
        &format!("{} results", all.len()),
    )?;
    let hb = cloud.heartbeat(dev, "hb-after", Duration::from_secs(300))?;
    sc.check(
        "after: the heartbeat shows slot a, the fallback, and the old version",
        hb["deviceId"] == dev
            && hb["slot"]["booted"] == "a"
            && hb["slot"]["fallback"] == true
            && hb["slot"]["version"] == v1.as_str()
            && hb["firmwareVersion"] == v1.as_str(),
        &hb.to_string(),
    )?;
    check_one_identity(sc, cloud, dev)
}

#[test]
#[ignore = "boots VMs (about 30 minutes under TCG)"]
fn agent_e2e_migration_task() {
    scenario::run("agent-e2e-migration-task", |sc| {
        let cloud = Cloud::start(&sc.dir);
        let b = images::bundle()?;
        let version = bundle_version(&b.path)?;
        let bundle = cloud.serve_file("/files/os.bundle", &b.path)?;
        let state = prepared_old_on(sc, Old::Partition)?;
        sc.uses_state(&state);
        let (disk, fmt) = overlay_on(&state.disk, "qcow2", &sc.path("disk.qcow2"))?;
        let payload = agent_payload(sc, &cloud.agent_config(), REGISTER_TOKEN)?;
        let mut vm = sc.vm("appliance", vm_config(&cloud, &disk, fmt, &payload))?;
        boot_old(sc, &mut vm)?;
        let r = migration_task(sc, &cloud, &mut vm, &bundle, &version, &b.key);
        with_agent_log(sc, &mut vm, r)
    });
}

fn migration_task(
    sc: &Scenario,
    cloud: &Cloud,
    vm: &mut Vm,
    bundle: &Served,
    version: &str,
    vendor_key: &std::path::Path,
) -> Result<()> {
    // Only the bundle the agent downloads can be staged; the old system says
    // which OS it is in the file the agent reads its firmware version from.
    vm.ssh_ok(
        "rm -f /var/lib/dualroot/stage/os.bundle && echo 11-legacy >/etc/dualroot-test-version",
    )?;
    mount_payload(vm)?;
    vm.ssh_ok(INSTALL_AGENT)?;
    let dev = start_agent(sc, cloud, vm)?;
    let hb = cloud.heartbeat(&dev, "hb-before", Duration::from_secs(300))?;
    sc.check(
        "before: the heartbeat shows the old system (no slots yet)",
        hb["deviceId"] == dev.as_str()
            && hb["firmwareVersion"] == "11-legacy"
            && hb["slot"]["booted"] == "unknown",
        &hb.to_string(),
    )?;
    // The agent stages only a vendor-signed plan (issue 23 item 1).
    let (plan, plan_signature) = signed_agent_plan(vendor_key)?;
    vm.mark_console();
    let t0 = Instant::now();
    cloud.publish(
        &dev,
        "mig-1",
        "migrate",
        json!({"url": bundle.url, "sha256": bundle.sha256, "size": bundle.size, "plan": plan,
               "planSignature": plan_signature, "reboot": true}),
    );
    // download, verify, stage with the task's plan, reboot, migrate
    vm.wait_for_console_any(
        &[DONE],
        &[REFUSED, RETRY, GAVE_UP],
        Duration::from_secs(3000),
    )?;
    let before_new_os = cloud.results_for("mig-1");
    sc.note(
        "task_to_migration_done_s",
        &format!("{:.0}", t0.elapsed().as_secs_f64()),
    );
    vm.wait_for_console_any(&[BOOTED], &[GAVE_UP], Duration::from_secs(900))?;
    vm.wait_for_ssh(Duration::from_secs(300))?;
    let os = vm.ssh_ok("cat /etc/dualroot-test-version; findmnt -n -o SOURCE /; findmnt -n -o SOURCE /data; cat /data/dualroot-agent/token.json")?;
    sc.check(
        "the new OS runs on slot a with the agent's state on the data LV, same device id",
        os.lines().next() == Some(version)
            && os.contains("VA-root")
            && os.contains("VA-data")
            && os.contains(&format!("\"{dev}\"")),
        &os.replace('\n', " "),
    )?;
    let r = cloud.wait_result("mig-1", Duration::from_secs(600))?;
    sc.check(
        "the migrate task was reported done (staged) under the device id",
        r["status"] == "done" && r["deviceId"] == dev.as_str() && r["result"]["staged"] == true,
        &format!("{} {}", r["status"], r["result"]["staged"]),
    )?;
    sc.note(
        "migrate_result_from",
        if before_new_os.is_empty() {
            "new-os"
        } else {
            "old-os"
        },
    );
    let boot = cloud.wait_message(
        "bootConfirmed event from the new OS",
        Duration::from_secs(900),
        |m| m["taskType"] == "bootConfirmed",
    )?;
    sc.check(
        "the agent on the new OS reported the confirmed boot of slot a with the new version",
        boot["deviceId"] == dev.as_str()
            && boot["status"] == "done"
            && boot["result"]["slot"] == "a"
            && boot["result"]["version"] == version
            && boot["result"]["firmwareVersion"] == version,
        &boot.to_string(),
    )?;
    let all = settled_results(cloud, "mig-1");
    let runs: BTreeSet<String> = all.iter().map(|m| m["run"].to_string()).collect();
    sc.check(
        "the migrate task ran once: every result message for it is the same run, done",
        runs.len() == 1 && all.iter().all(|m| m["status"] == "done"),
        &format!("{} message(s), runs {runs:?}", all.len()),
    )?;
    let hb = cloud.heartbeat(&dev, "hb-after", Duration::from_secs(300))?;
    sc.check(
        "after: the heartbeat shows slot a, confirmed, and the new OS's version",
        hb["deviceId"] == dev.as_str()
            && hb["slot"]["booted"] == "a"
            && hb["slot"]["bootedGood"] == true
            && hb["slot"]["version"] == version
            && hb["firmwareVersion"] == version,
        &hb.to_string(),
    )?;
    check_one_identity(sc, cloud, &dev)
}

// Pure checks of this file's helpers (run by the default `cargo test`).

#[test]
fn guestfwd_rules_go_on_the_first_nic_with_commas_escaped() {
    let cfg = VmConfig {
        guestfwd: vec![GuestFwd {
            guest_port: 1883,
            cmd: "'/x/relay' 4242,1".into(),
        }],
        ..VmConfig::default()
    };
    let a = cfg.args(Path::new("/c.log"), &[2222, 2223]);
    let netdevs: Vec<&String> = a.iter().filter(|s| s.starts_with("user,")).collect();
    assert_eq!(netdevs.len(), 2, "{a:?}");
    assert!(
        netdevs[0].contains("restrict=on")
            && netdevs[0].ends_with(",guestfwd=tcp:10.0.2.100:1883-cmd:'/x/relay' 4242,,1"),
        "{}",
        netdevs[0]
    );
    assert!(!netdevs[1].contains("guestfwd"), "{}", netdevs[1]);
}

#[test]
fn static_and_dynamic_elf_are_told_apart() {
    // a distribution's shell is dynamically linked
    let sh = std::fs::read("/bin/sh").unwrap();
    assert!(elf_has_interp(&sh));
    // an ELF64 header with one PT_LOAD program header and no PT_INTERP
    let mut b = vec![0u8; 64 + 56];
    b[..5].copy_from_slice(b"\x7fELF\x02");
    b[0x20] = 64; // e_phoff
    b[0x36] = 56; // e_phentsize
    b[0x38] = 1; // e_phnum
    b[64] = 1; // PT_LOAD
    assert!(!elf_has_interp(&b));
    b[64] = 3; // PT_INTERP
    assert!(elf_has_interp(&b));
    assert!(!elf_has_interp(b"#!/bin/sh\n"));
}

/// Builds (or finds) the bundle (b) installs, and checks it is signed and
/// carries the broken init's version; run ahead so (b) does not wait for xz.
#[test]
#[ignore = "builds the broken-init bundle for agent_e2e_rollback_report (minutes of xz); no VM"]
fn prepare_broken_init_bundle() {
    let b = broken_init_bundle().unwrap_or_else(|e| panic!("{e}"));
    let version = bundle_version(&b).unwrap_or_else(|e| panic!("{e}"));
    assert!(version.ends_with(".3"), "{version}");
    let keys = images::bundle().unwrap_or_else(|e| panic!("{e}"));
    cmd::run(
        Command::new(images::dualroot_bin())
            .args(["bundle", "verify"])
            .arg(&b)
            .arg("--keyring")
            .arg(&keys.keyring),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    println!("{} {version}", b.display());
}

#[test]
fn relay_joins_a_connection_to_the_host_port_and_passes_half_closes() {
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap(); // ends at the guest's half-close
        s.write_all(&got.to_ascii_uppercase()).unwrap();
        got
    });
    // as QEMU's user network runs it: one socket is stdin, stdout and stderr
    let (mut guest, relay_end) = UnixStream::pair().unwrap();
    let fd = || std::process::Stdio::from(OwnedFd::from(relay_end.try_clone().unwrap()));
    let mut child = Command::new(RELAY)
        .arg(port.to_string())
        .stdin(fd())
        .stdout(fd())
        .stderr(fd())
        .spawn()
        .unwrap();
    drop(relay_end);
    guest.write_all(b"hello relay").unwrap();
    guest.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    guest.read_to_end(&mut back).unwrap(); // ends when the host side closed
    assert_eq!(back, b"HELLO RELAY");
    assert_eq!(server.join().unwrap(), b"hello relay");
    assert!(child.wait().unwrap().success());
    // nothing listening: the relay ends at once and the guest sees a close
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let st = Command::new(RELAY)
        .arg(closed.to_string())
        .stdin(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(1));
}

/// The cloud of these scenarios with the real agent binary on the host
/// (127.0.0.1 instead of the guest's forwards): registration with the
/// shipped token, a heartbeat, and a download cut once and resumed.
#[test]
#[ignore = "needs mosquitto and the agent binary ($DUALROOT_AGENT_BIN, default target/release/dualroot-agent); no VM"]
fn cloud_backend_drives_the_real_agent_on_the_host() {
    let dir = std::env::temp_dir().join(format!("agent-e2e-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bin = std::env::var_os("DUALROOT_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| images::workspace_dir().join("target/release/dualroot-agent"));
    let cloud = Cloud::start(&dir);
    let token = dir.join("register-token");
    std::fs::write(&token, REGISTER_TOKEN).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!("data_dir = \"{}\"\n", dir.join("data").display())
            + &cloud.agent_config_for("127.0.0.1", cloud.broker.port, cloud.http.port, &token),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let mut agent = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("DUALROOT_AGENT_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let result = (|| -> Result<()> {
        let t0 = Instant::now();
        while cloud.issued_ids().is_empty() {
            if t0.elapsed() > Duration::from_secs(30) {
                qemu_tests::bail!("the agent did not register within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let dev = cloud.issued_ids()[0].clone();
        let hb = cloud.heartbeat(&dev, "hb-1", Duration::from_secs(60))?;
        if hb["deviceId"] != dev.as_str() || hb["slot"]["booted"] != "unknown" {
            qemu_tests::bail!("heartbeat: {hb}");
        }
        // a migrate task without a plan: downloaded (cut once, resumed), then
        // refused (no plan, or no engine on this host to verify the bundle)
        let file = dir.join("payload.bin");
        std::fs::write(&file, vec![7u8; 3 << 20])?;
        let served = cloud.serve_file("/files/p.bin", &file)?;
        cloud.http.cut(&served.path, 1 << 20, 1);
        let url = served.url.replace(
            &cloud.guest_base(),
            &format!("http://127.0.0.1:{}", cloud.http.port),
        );
        cloud.publish(
            &dev,
            "mig-noplan",
            "migrate",
            json!({"url": url, "sha256": served.sha256, "size": served.size}),
        );
        let r = cloud.wait_result("mig-noplan", Duration::from_secs(60))?;
        let reqs = cloud.http.requests_to(&served.path);
        let ranges: Vec<Option<&String>> = reqs.iter().map(|q| q.headers.get("range")).collect();
        if r["status"] != "failed"
            || !r["error"]
                .as_str()
                .is_some_and(|e| e.contains("plan") || e.contains("verifying bundle"))
            || ranges.len() != 2
            || ranges[0].is_some()
            || ranges[1].map(String::as_str) != Some("bytes=1048576-")
        {
            qemu_tests::bail!("migrate without plan: {r}; requests with ranges {ranges:?}");
        }
        if cloud.issued_ids().len() != 1 || cloud.devices_seen().len() != 1 {
            qemu_tests::bail!(
                "registered {:?}, messages from {:?}",
                cloud.issued_ids(),
                cloud.devices_seen()
            );
        }
        Ok(())
    })();
    let _ = agent.kill();
    let _ = agent.wait();
    if let Err(e) = result {
        let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
        panic!("{e}\nagent log:\n{log}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
