//! Slow tests on the legacy appliance image (opt-in:
//! `cargo test -p qemu-tests -- --ignored`). The image is built on first
//! use (minutes) and cached under $DUALROOT_CACHE.

use qemu_tests::disk::{overlay, standard_payload};
use qemu_tests::images;
use qemu_tests::parse::{id_output, ip_br_link};
use qemu_tests::qemu::{Boot, Nic, VmConfig, MAC_ETH0, MAC_ETH1};
use qemu_tests::scenario::{self, Scenario};
use qemu_tests::{Context, Result};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const BOOTED: &str = "DUALROOT-BOOTED";

/// Overlay over the legacy base plus a payload disk; returns the config.
fn legacy_config(sc: &Scenario) -> Result<VmConfig> {
    let img = images::legacy()?;
    let (disk, fmt) = overlay(&img.disk, &sc.path("disk.qcow2"))?;
    let payload = standard_payload(&sc.path("payload"), &[])?.build(&sc.path("payload.img"))?;
    Ok(VmConfig::default().disk(&disk, fmt).disk(&payload, "raw"))
}

#[test]
#[ignore = "boots a VM (minutes under TCG)"]
fn legacy_boots_via_grub() {
    scenario::run("legacy-boot", |sc| {
        let mut vm = sc.vm("legacy", legacy_config(sc)?)?;
        vm.wait_for_console(BOOTED, BOOT_TIMEOUT)?;
        vm.wait_for_ssh(Duration::from_secs(120))?;
        let console = vm.console_text();
        sc.check(
            "SeaBIOS then GRUB on the serial console",
            console.contains("GNU GRUB"),
            "GNU GRUB banner",
        )?;

        let cmdline = vm.ssh_ok("cat /proc/cmdline")?;
        sc.check(
            "kernel booted by GRUB with net.ifnames=0",
            cmdline.contains("BOOT_IMAGE=") && cmdline.contains("net.ifnames=0"),
            cmdline.trim(),
        )?;
        let host = vm.ssh_ok("hostname")?;
        sc.check("hostname", host.trim() == "appliance-7", host.trim())?;

        let id_text = vm.ssh_ok("id admin")?;
        let id = id_output(&id_text).context("parsing `id admin`")?;
        sc.check(
            "admin has UID 1000",
            id.uid == 1000 && id.gid == 1000,
            id_text.trim(),
        )?;
        sc.check(
            "admin is in sudo and appliance",
            ["sudo", "appliance"]
                .iter()
                .all(|g| id.groups.iter().any(|(_, n)| n == g)),
            id_text.trim(),
        )?;
        let owner =
            vm.ssh_ok("stat -c %U:%G /etc/appliance/appliance.conf /home/admin/notes/readme.txt")?;
        sc.check(
            "appliance files owned by admin",
            owner.lines().all(|l| l == "admin:admin"),
            &owner.replace('\n', " "),
        )?;
        let svc = vm.ssh_ok("id -u svcapp")?;
        sc.check(
            "svcapp is a system account",
            svc.trim().parse::<u32>().is_ok_and(|u| u < 1000),
            svc.trim(),
        )?;

        let links_text = vm.ssh_ok("ip -br link")?;
        let links = ip_br_link(&links_text);
        let mac_of = |n: &str| {
            links
                .iter()
                .find(|l| l.name == n)
                .map(|l| l.mac.clone())
                .unwrap_or_default()
        };
        sc.check(
            "eth0 has the first NIC's MAC",
            mac_of("eth0") == MAC_ETH0,
            &mac_of("eth0"),
        )?;
        sc.check(
            "eth1 has the second NIC's MAC",
            mac_of("eth1") == MAC_ETH1,
            &mac_of("eth1"),
        )?;
        let addr = vm.ssh_ok("ip -br -4 addr show dev eth1")?;
        sc.check(
            "eth1 static 10.0.3.15/24",
            addr.contains("10.0.3.15/24"),
            addr.trim(),
        )?;
        let payload = vm.ssh_ok("findmnt -n -o SOURCE,FSTYPE /mnt/payload && test -x /mnt/payload/install.sh && echo install.sh")?;
        sc.check(
            "payload disk mounted",
            payload.contains("install.sh"),
            &payload.replace('\n', " "),
        )?;

        let used = vm.sample_guest_memory()?;
        println!("[{}] guest memory in use: {} MiB", sc.name, used / 1024);
        vm.shutdown(Duration::from_secs(120))?;
        Ok(())
    });
}

#[test]
#[ignore = "boots a VM (minutes under TCG)"]
fn legacy_survives_power_cut() {
    scenario::run("legacy-power-cut", |sc| {
        let mut vm = sc.vm("legacy", legacy_config(sc)?)?;
        vm.wait_for_ssh(BOOT_TIMEOUT)?;
        vm.ssh_ok("echo before-cut > /root/marker && sync")?;
        vm.power_cut()?;
        vm.restart()?;
        vm.wait_for_ssh(BOOT_TIMEOUT)?;
        let m = vm.ssh_ok("cat /root/marker")?;
        sc.check(
            "synced file survives the power cut",
            m.trim() == "before-cut",
            m.trim(),
        )?;
        vm.shutdown(Duration::from_secs(120))?;
        Ok(())
    });
}

/// A guest whose init dies must end the wait at once (kernel panic seen on
/// the console), well within the timeout, with the console tail in the
/// error. This tests the harness's failure path, so it passes when the
/// wait fails that way.
#[test]
#[ignore = "boots a VM (about a minute under TCG)"]
fn panicking_guest_fails_fast_with_console_tail() {
    scenario::run("panic-guest", |sc| {
        let img = images::legacy()?;
        let (disk, fmt) = overlay(&img.disk, &sc.path("disk.qcow2"))?;
        let cfg = VmConfig {
            boot: Boot::Kernel {
                kernel: img.kernel.clone(),
                initrd: img.initrd.clone(),
                append: "root=/dev/vda1 ro console=ttyS0 panic=1 init=/bin/false".into(),
            },
            ..VmConfig::default()
        }
        .disk(&disk, fmt);
        let timeout = Duration::from_secs(240);
        let t0 = Instant::now();
        let mut vm = sc.vm("panic", cfg)?;
        let err = match vm.wait_for_console(BOOTED, timeout) {
            Ok(()) => qemu_tests::bail!("a guest with init=/bin/false reached {BOOTED}"),
            Err(e) => e,
        };
        let took = t0.elapsed();
        let text = err.to_string();
        println!("[{}] the harness reported:\n{text}", sc.name);
        sc.check(
            "ended before the timeout",
            took < timeout,
            &format!("{:.0} s", took.as_secs_f64()),
        )?;
        sc.check(
            "error names the panic",
            text.contains("Kernel panic"),
            "Kernel panic in message",
        )?;
        let tail = err.console_tail().unwrap_or_default();
        sc.check(
            "error carries the console tail",
            text.contains("console tail") && tail.contains("Attempted to kill init"),
            &format!("{} lines", tail.lines().count()),
        )?;
        Ok(())
    });
}

/// Two NIC models (e1000 first, virtio-net second): both come up with their
/// MACs, and the names the old system gives them are printed (the base of the
/// "NIC order flips across the OS change" scenario). Seen here: virtio_net
/// probes first and takes eth0 although e1000 is first on the PCI bus; SSH
/// then answers behind the second NIC.
#[test]
#[ignore = "boots a VM (minutes under TCG)"]
fn legacy_two_nic_models() {
    scenario::run("legacy-nic-models", |sc| {
        let mut cfg = legacy_config(sc)?;
        cfg.nics = vec![
            Nic::new("e1000", MAC_ETH0),
            Nic::new("virtio-net-pci", MAC_ETH1),
        ];
        let mut vm = sc.vm("legacy", cfg)?;
        vm.wait_for_ssh(BOOT_TIMEOUT)?;
        let text = vm.ssh_ok(
            "for n in /sys/class/net/eth*; do echo $(basename $n) $(cat $n/address) $(basename $(readlink $n/device/driver)); done",
        )?;
        println!("[{}] names on the old system:\n{text}", sc.name);
        println!("[{}] SSH answered behind NIC {}", sc.name, vm.ssh_nic());
        for mac in [MAC_ETH0, MAC_ETH1] {
            sc.check(
                &format!("a NIC with MAC {mac}"),
                text.contains(mac),
                text.trim(),
            )?;
        }
        sc.check(
            "drivers e1000 and virtio_net",
            text.contains("e1000") && text.contains("virtio_net"),
            &text.replace('\n', "; "),
        )?;
        vm.shutdown(Duration::from_secs(120))?;
        Ok(())
    });
}
