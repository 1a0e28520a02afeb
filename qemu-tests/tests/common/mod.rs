//! Shared by the QEMU scenario files: the legacy appliance with its payload disk,
//! console markers, staging a migration, and the reference migration with its
//! checks (`reference`, for migration.rs and matrix.rs).
#![allow(dead_code)] // each test file uses its own subset

pub mod agent;
pub mod reference;

use qemu_tests::disk::{overlay, overlay_on, standard_payload, INSTALL_SH};
use qemu_tests::images;
use qemu_tests::qemu::{Firmware, Vm, VmConfig};
use qemu_tests::scenario::Scenario;
use qemu_tests::states::{self, Input, State};
use qemu_tests::Result;
use std::path::PathBuf;
use std::time::Duration;

pub const BOOTED: &str = "DUALROOT-BOOTED";
pub const DONE: &str = "DUALROOT-MIGRATION-DONE";
pub const REFUSED: &str = "DUALROOT-MIGRATION-REFUSED";
pub const RETRY: &str = "DUALROOT-MIGRATION-RETRY";
pub const GAVE_UP: &str = "DUALROOT-MIGRATION-GAVE-UP";
/// A step inside the unrecoverable window kept failing and the old disk was put
/// back from the undo record (issue 22): the hook reboots into the old system.
pub const UNDONE: &str = "DUALROOT-MIGRATION-UNDONE";
pub const PLAN: &str = "/var/lib/dualroot/stage/plan.toml";

/// Which key signs the bundle put on the payload, and how it is damaged.
#[derive(Clone, Copy, PartialEq)]
pub enum BundleKind {
    Good,
    FlippedByte,
}

/// The old system's disk layout.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Old {
    /// One ext4 root partition (`images/legacy.sh`).
    Partition,
    /// CentOS 7 default: XFS /boot on vda1, XFS root and swap LVs of VG
    /// `centos` on vda2 (`images/legacy-lvm.sh`).
    Lvm,
    /// Matrix row: ext4 /boot on vda1, VG `centos` on vda2 with XFS root, XFS
    /// home (extra files, hashed on the root) and swap LVs, fstab by UUID,
    /// generic dracut (`images/legacy-matrix.sh generic`).
    MatrixGeneric,
    /// Matrix row: [`Old::Lvm`] with host-only dracut and an lvm.conf
    /// `global_filter` accepting only /dev/vda2 (`images/legacy-matrix.sh hostonly`).
    MatrixHostonly,
    /// A CentOS 7 EFI install: GPT, ESP on vda1, XFS /boot on vda2, VG
    /// `centos` on vda3 (XFS root and swap LVs), Debian's signed shim and GRUB;
    /// boots under OVMF with the image's NVRAM (`images/legacy-efi.sh`).
    Efi,
}

impl Old {
    pub fn image(self) -> Result<images::LegacyImage> {
        match self {
            Old::Partition => images::legacy(),
            Old::Lvm => images::legacy_lvm(),
            Old::MatrixGeneric => images::legacy_matrix_generic(),
            Old::MatrixHostonly => images::legacy_matrix_hostonly(),
            Old::Efi => images::legacy_efi(),
        }
    }

    /// Each layout has its own prepared state (the migration initramfs differs).
    fn state_name(self) -> &'static str {
        match self {
            Old::Partition => "prepared-old",
            Old::Lvm => "prepared-old-lvm",
            Old::MatrixGeneric => "prepared-old-matrix-generic",
            Old::MatrixHostonly => "prepared-old-matrix-hostonly",
            Old::Efi => "prepared-old-efi",
        }
    }

    /// The old /boot partition (on the LVM layouts).
    pub fn boot_part(self) -> &'static str {
        if self == Old::Efi {
            "vda2"
        } else {
            "vda1"
        }
    }

    /// The firmware this old system boots with: OVMF with a copy of the image's
    /// NVRAM at `vars` for [`Old::Efi`], SeaBIOS otherwise.
    pub fn firmware(self, vars: &std::path::Path) -> Result<Firmware> {
        if self != Old::Efi {
            return Ok(Firmware::Bios);
        }
        Firmware::uefi_from(&self.image()?.vars(), vars, false)
    }

    /// The old root sits on an LV of VG `centos`, /boot on vda1.
    pub fn on_lvm(self) -> bool {
        self != Old::Partition
    }

    /// What preflight reports as the old root's kind (`source.root.kind`).
    pub fn root_kind(self) -> &'static str {
        if self.on_lvm() {
            "lvm"
        } else {
            "partition"
        }
    }
}

/// Legacy appliance overlay + payload disk carrying dualroot, the dracut module,
/// the signed bundle, the keyring and the reference plan.
pub fn appliance(sc: &Scenario, kind: BundleKind, memory_mib: u32) -> Result<VmConfig> {
    appliance_on(sc, Old::Partition, kind, memory_mib)
}

pub fn appliance_on(
    sc: &Scenario,
    old: Old,
    kind: BundleKind,
    memory_mib: u32,
) -> Result<VmConfig> {
    appliance_with_on(sc, old, kind, memory_mib, &[], None, None)
}

/// The appliance staged with another bundle than the reference one (`stage`
/// verifies and stages it over the state's; the migration initramfs is reused).
pub fn appliance_with_bundle(
    sc: &Scenario,
    old: Old,
    bundle: &std::path::Path,
) -> Result<VmConfig> {
    appliance_with_on(sc, old, BundleKind::Good, 1024, &[], Some(bundle), None)
}

/// `appliance` with extra files on the payload disk (source, path on the payload).
pub fn appliance_with(
    sc: &Scenario,
    kind: BundleKind,
    memory_mib: u32,
    extra: &[(PathBuf, &str)],
) -> Result<VmConfig> {
    appliance_with_on(sc, Old::Partition, kind, memory_mib, extra, None, None)
}

/// `appliance_with` staging another plan than the reference one (`stage`
/// builds the migration initramfs again when the plan changes what it holds).
pub fn appliance_with_plan(
    sc: &Scenario,
    plan: &std::path::Path,
    memory_mib: u32,
    extra: &[(PathBuf, &str)],
) -> Result<VmConfig> {
    appliance_with_on(
        sc,
        Old::Partition,
        BundleKind::Good,
        memory_mib,
        extra,
        None,
        Some(plan),
    )
}

/// The appliance staged with another bundle and another plan.
pub fn appliance_with_bundle_and_plan(
    sc: &Scenario,
    bundle: &std::path::Path,
    plan: &std::path::Path,
    memory_mib: u32,
) -> Result<VmConfig> {
    appliance_with_on(
        sc,
        Old::Partition,
        BundleKind::Good,
        memory_mib,
        &[],
        Some(bundle),
        Some(plan),
    )
}

pub fn appliance_with_on(
    sc: &Scenario,
    old: Old,
    kind: BundleKind,
    memory_mib: u32,
    extra: &[(PathBuf, &str)],
    bundle_override: Option<&std::path::Path>,
    plan_override: Option<&std::path::Path>,
) -> Result<VmConfig> {
    let b = images::bundle()?;
    let state = prepared_old_on(sc, old)?;
    sc.uses_state(&state);
    let (disk, fmt) = overlay_on(&state.disk, "qcow2", &sc.path("disk.qcow2"))?;
    let bundle = match kind {
        BundleKind::Good => bundle_override.map(PathBuf::from).unwrap_or(b.path.clone()),
        BundleKind::FlippedByte => {
            let p = sc.path("flipped.bundle");
            let mut data = std::fs::read(&b.path)?;
            let at = data.len() / 2;
            data[at] ^= 0x01;
            std::fs::write(&p, data)?;
            p
        }
    };
    let plan = plan_override
        .map(PathBuf::from)
        .unwrap_or_else(|| images::workspace_dir().join("fixtures/plans/reference.toml"));
    let stage: Vec<(PathBuf, String)> = vec![
        (bundle, "stage/os.bundle".into()),
        (b.keyring.join("test.pub"), "stage/keyring/test.pub".into()),
        (plan, "stage/plan.toml".into()),
    ];
    let p = standard_payload(&sc.path("payload"), &stage)?;
    for (src, rel) in extra {
        p.file(src, rel, 0o644)?;
    }
    let payload = p.build(&sc.path("payload.img"))?;
    let mut cfg = VmConfig::default().disk(&disk, fmt).disk(&payload, "raw");
    cfg.memory_mib = memory_mib;
    cfg.firmware = old.firmware(&sc.path("vars.fd"))?;
    Ok(cfg)
}

/// What preparing the old system runs: install dualroot and the dracut module,
/// stage the reference plan (this builds the migration initramfs, minutes of
/// dracut under TCG), then take the one-shot entry back, so the state boots
/// into the old system and each scenario stages with its own arguments (the
/// initramfs is reused: `stage` sees the same inputs).
const PREPARE: &str = "sh /mnt/payload/install.sh && dualroot stage --plan /var/lib/dualroot/stage/plan.toml 2>&1 && grub-editenv /boot/grub/grubenv unset next_entry && rm -f /boot/grub/custom.cfg && sync";

/// The cached state "prepared-old": the legacy appliance with this build's
/// dualroot, dracut module, bundle and plan installed and the migration
/// initramfs built, nothing armed. Keyed by all of those.
pub fn prepared_old_on(sc: &Scenario, old: Old) -> Result<State> {
    let img = old.image()?;
    let b = images::bundle()?;
    let ws = images::workspace_dir();
    let bin = images::dualroot_bin();
    let plan = ws.join("fixtures/plans/reference.toml");
    let module = ws.join("dracut-module/90dualroot");
    let key = states::key(&[
        Input::Stamp(&img.disk),
        Input::File(&bin),
        Input::Dir(&module),
        Input::Stamp(&b.path),
        Input::File(&plan),
        Input::Dir(&b.keyring),
        Input::Text(INSTALL_SH),
        Input::Text(PREPARE),
    ])?;
    states::get_or_build(old.state_name(), &key, |out| {
        let (_, fmt) = overlay(&img.disk, out)?;
        let stage: Vec<(PathBuf, String)> = vec![
            (b.path.clone(), "stage/os.bundle".into()),
            (b.keyring.join("test.pub"), "stage/keyring/test.pub".into()),
            (plan.clone(), "stage/plan.toml".into()),
        ];
        let payload = standard_payload(&sc.path("prepare-payload"), &stage)?
            .build(&sc.path("prepare-payload.img"))?;
        let mut cfg = VmConfig::default().disk(out, fmt).disk(&payload, "raw");
        cfg.firmware = old.firmware(&sc.path("prepare-vars.fd"))?;
        let mut vm = sc.vm("prepare", cfg)?;
        boot_old(sc, &mut vm)?;
        let out = vm.ssh_ok(PREPARE)?;
        println!("[{}] prepared the old system:\n{out}", sc.name);
        vm.shutdown(Duration::from_secs(120))
    })
}

/// What the unit tests of `source_layout` read (fixtures/tool-output/sysfs-*.txt,
/// mountinfo-*.txt, pvs-*.txt), captured on a guest: its block devices as sysfs
/// shows them, the mounts of / and /boot, and lvm's PV list.
pub const CAPTURE_LAYOUT: &str = r#"for d in /sys/class/block/*; do n=${d##*/}; v=$(cat $d/dev); if [ -e $d/partition ]; then echo "$n $v part $(basename $(dirname $(readlink -f $d))) $(cat $d/start)"; elif [ -d $d/dm ]; then echo "$n $v dm $(cat $d/dm/name) $(cat $d/dm/uuid) $(ls $d/slaves | paste -sd, -)"; elif [ -d $d/md ]; then echo "$n $v md"; else echo "$n $v disk"; fi; done; echo ==; grep -E '^[0-9]+ [0-9]+ [0-9:]+ [^ ]+ /(boot)? ' /proc/self/mountinfo; echo ==; pvs --noheadings -o pv_name,vg_name --separator '|'"#;

/// `dualroot slot status --json` of a migrated guest, decoded strictly as the
/// contract type first (what the agent reads), then as JSON for the checks.
pub fn slot_status(vm: &Vm) -> Result<serde_json::Value> {
    let s = vm.ssh_ok("/usr/local/sbin/dualroot slot status --json")?;
    dualroot_api::decode::<dualroot_api::SlotStatus>("slot status --json", &s)
        .map_err(qemu_tests::Error::msg)?;
    serde_json::from_str(&s)
        .map_err(|e| qemu_tests::Error::msg(format!("parsing slot status --json: {e}")))
}

/// Waits until `f(status)` holds (the health check runs after multi-user).
pub fn wait_status(
    vm: &Vm,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let t0 = std::time::Instant::now();
    loop {
        let st = slot_status(vm)?;
        if f(&st) {
            return Ok(st);
        }
        if t0.elapsed() > Duration::from_secs(300) {
            qemu_tests::bail!("{what}: not reached within 300 s; status: {st}");
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// One slot's entry in a [`slot_status`].
pub fn slot<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["slots"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["slot"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// What the "migrated" state runs on a prepared-old overlay: stage the reference
/// plan, reboot into the migration, first boot of slot a until its health check
/// confirms it, power off.
const MIGRATE_STATE: &str = "stage reference plan; reboot; DONE; slot a good; poweroff";

/// The cached state "migrated": the reference migration done and slot a
/// confirmed good (grown data/image), for scenarios that start from a migrated
/// appliance. Keyed by prepared-old's key (binary, module, bundle, plan, image).
pub fn migrated(sc: &Scenario) -> Result<State> {
    let prepared = prepared_old_on(sc, Old::Partition)?;
    let key = states::key(&[Input::Text(&prepared.key), Input::Text(MIGRATE_STATE)])?;
    states::get_or_build("migrated", &key, |out| {
        let b = images::bundle()?;
        let (_, fmt) = overlay_on(&prepared.disk, "qcow2", out)?;
        let plan = images::workspace_dir().join("fixtures/plans/reference.toml");
        let stage: Vec<(PathBuf, String)> = vec![
            (b.path.clone(), "stage/os.bundle".into()),
            (b.keyring.join("test.pub"), "stage/keyring/test.pub".into()),
            (plan, "stage/plan.toml".into()),
        ];
        let payload = standard_payload(&sc.path("migrate-payload"), &stage)?
            .build(&sc.path("migrate-payload.img"))?;
        let cfg = VmConfig::default().disk(out, fmt).disk(&payload, "raw");
        let mut vm = sc.vm("migrate", cfg)?;
        boot_old(sc, &mut vm)?;
        migrate_now(&mut vm)?;
        vm.wait_for_console(BOOTED, Duration::from_secs(600))?;
        vm.wait_for_ssh(Duration::from_secs(300))?;
        let t0 = std::time::Instant::now();
        loop {
            let st = slot_status(&vm)?;
            if slot(&st, "a")["state"] == "good" {
                break;
            }
            if t0.elapsed() > Duration::from_secs(300) {
                qemu_tests::bail!("slot a was not confirmed good within 300 s: {st}");
            }
            std::thread::sleep(Duration::from_secs(3));
        }
        println!("[{}] migrated, slot a good", sc.name);
        vm.shutdown(Duration::from_secs(120))
    })
}

/// Waits until the migrated system (a slot of the new OS) is up and
/// reachable; returns its test version (`/etc/dualroot-test-version`).
pub fn boot_new(sc: &Scenario, vm: &mut Vm) -> Result<String> {
    vm.wait_for_console_any(&[BOOTED], &[GAVE_UP], Duration::from_secs(900))?;
    vm.wait_for_ssh(Duration::from_secs(300))?;
    let v = vm
        .ssh_ok("cat /etc/dualroot-test-version")?
        .trim()
        .to_string();
    println!("[{}] up, version {v}", sc.name);
    Ok(v)
}

/// Mounts the payload disk (bundles, binaries) read-only at /mnt/payload.
pub fn mount_payload(vm: &Vm) -> Result<()> {
    vm.ssh_ok("mkdir -p /mnt/payload && (mountpoint -q /mnt/payload || mount -o ro LABEL=dualroot-payload /mnt/payload)")?;
    Ok(())
}

pub fn boot_old(sc: &Scenario, vm: &mut Vm) -> Result<()> {
    vm.wait_for_console(BOOTED, Duration::from_secs(400))?;
    vm.wait_for_ssh(Duration::from_secs(180))?;
    println!("[{}] old system up", sc.name);
    Ok(())
}

/// Installs dualroot from the payload disk and stages the migration; extra
/// kernel arguments go to the migration boot (failpoints). Returns stage's output.
pub fn install_and_stage(vm: &Vm, kernel_args: &[&str]) -> Result<String> {
    let args: String = kernel_args
        .iter()
        .map(|a| format!(" --kernel-arg {a}"))
        .collect();
    vm.ssh_ok(&format!(
        "sh /mnt/payload/install.sh >/dev/null && dualroot stage --plan {PLAN}{args} 2>&1"
    ))
}

/// Stages the reference migration on the running old system, reboots into it and
/// waits until the migration initramfs reports it done (any other outcome fails).
pub fn migrate_now(vm: &mut Vm) -> Result<()> {
    install_and_stage(vm, &[])?;
    vm.mark_console();
    let _ = vm.ssh("systemctl reboot");
    vm.wait_for_console_any(
        &[DONE],
        &[REFUSED, RETRY, GAVE_UP],
        Duration::from_secs(1800),
    )?;
    Ok(())
}
