//! Cheap tests of the harness's pure helpers (no QEMU, no images).

use qemu_tests::parse::*;
use qemu_tests::qemu::{Boot, VmConfig};
use std::path::Path;

#[test]
fn clean_console_strips_escapes_and_cr() {
    let raw = "\u{1b}[0m\u{1b}[30m\u{1b}[47mGNU GRUB  version 2.06\r\n\u{1b}[?25l[  OK  ] Reached target \u{1b}[0;1;39mMulti-User System\u{1b}[0m.\r\n\u{7}x";
    assert_eq!(
        clean_console(raw),
        "GNU GRUB  version 2.06\n[  OK  ] Reached target Multi-User System.\nx"
    );
}

#[test]
fn find_first_returns_earliest_marker() {
    let hay = "boot ... DUALROOT-BOOTED appliance-7 ... Kernel panic - not syncing";
    assert_eq!(
        find_first(hay, &[KERNEL_PANIC, "DUALROOT-BOOTED"]),
        Some((1, 24))
    );
    assert_eq!(find_first(hay, &["nope"]), None);
    assert_eq!(find_first(hay, &[""]), None);
}

#[test]
fn meminfo_used() {
    let t =
        "MemTotal:        1000000 kB\nMemFree:          500000 kB\nMemAvailable:     750000 kB\n";
    assert_eq!(meminfo_used_kib(t), Some(250000));
    assert_eq!(meminfo_used_kib("MemTotal: 5 kB\n"), None);
    let status = "Name:\tqemu-system-x86\nVmPeak:\t 2000000 kB\nVmHWM:\t  812345 kB\n";
    assert_eq!(proc_status_kib(status, "VmHWM"), Some(812345));
}

#[test]
fn ip_br_link_parses_captured_output() {
    // captured from the legacy guest (Debian 11, iproute2 5.10)
    let t = "lo               UNKNOWN        00:00:00:00:00:00 <LOOPBACK,UP,LOWER_UP> \n\
             eth0             UP             52:54:00:d0:00:01 <BROADCAST,MULTICAST,UP,LOWER_UP> \n\
             eth1@if2         DOWN           52:54:00:d0:00:02 <BROADCAST,MULTICAST> \n";
    let links = ip_br_link(t);
    assert_eq!(links.len(), 3);
    assert_eq!(
        links[1],
        Link {
            name: "eth0".into(),
            state: "UP".into(),
            mac: "52:54:00:d0:00:01".into()
        }
    );
    assert_eq!(links[2].name, "eth1");
    assert_eq!(links[2].state, "DOWN");
}

#[test]
fn id_output_parses() {
    let id =
        id_output("uid=1000(admin) gid=1000(admin) groups=1000(admin),27(sudo),999(appliance)\n")
            .unwrap();
    assert_eq!((id.uid, id.user.as_str(), id.gid), (1000, "admin", 1000));
    assert_eq!(id.groups[1], (27, "sudo".to_string()));
    assert_eq!(id.groups.len(), 3);
    assert!(id_output("id: 'nobody2': no such user").is_none());
}

#[test]
fn result_lines_round_trip_and_table() {
    let line = format_result_line(&[("scenario", "boot".into()), ("result", "pass\tx".into())]);
    assert_eq!(line, "scenario=boot\tresult=pass x");
    assert_eq!(
        parse_result_line(&line),
        vec![
            ("scenario".into(), "boot".into()),
            ("result".into(), "pass x".into())
        ]
    );
    let t = table(&["a", "bb"], &[vec!["xxx".into(), "y".into()]]);
    assert_eq!(t, "a    bb\n---  --\nxxx  y");
}

#[test]
fn qemu_args_have_tcg_console_nics_and_kernel() {
    let cfg = VmConfig {
        boot: Boot::Kernel {
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "root=/dev/vda1 panic=1".into(),
        },
        no_reboot: true,
        ..VmConfig::default()
    }
    .disk(Path::new("/d.qcow2"), "qcow2");
    let a = cfg.args(Path::new("/c.log"), &[2222, 2223]).join(" ");
    assert!(a.starts_with("-accel tcg "), "{a}");
    assert!(a.contains("-serial file:/c.log"), "{a}");
    assert!(
        a.contains("-drive file=/d.qcow2,format=qcow2,if=virtio"),
        "{a}"
    );
    assert!(
        a.contains("-netdev user,id=n0,restrict=on,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:2222-10.0.2.15:22"),
        "{a}"
    );
    assert!(
        a.contains("net=10.0.4.0/24,hostfwd=tcp:127.0.0.1:2223-10.0.4.15:22"),
        "{a}"
    );
    assert!(
        a.contains("-device virtio-net-pci,netdev=n1,mac=52:54:00:d0:00:02"),
        "{a}"
    );
    assert!(a.contains("-append root=/dev/vda1 panic=1"), "{a}");
    assert!(a.ends_with("-no-reboot"), "{a}");
}

#[test]
fn build_info_parses() {
    let b = qemu_tests::images::parse_build_info("recipe_hash=abc\ntotal_s=12\n\nbad line\n");
    assert_eq!(
        b,
        vec![
            ("recipe_hash".into(), "abc".into()),
            ("total_s".into(), "12".into())
        ]
    );
}

#[test]
fn overlays_chain_over_raw_and_qcow2() {
    use std::process::Command;
    if Command::new("qemu-img").arg("--version").output().is_err() {
        println!("qemu-img missing (package qemu-utils): skipped");
        return;
    }
    let dir = std::env::temp_dir().join(format!("qemu-tests-overlay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.raw");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let (mid, fmt) = qemu_tests::disk::overlay(&base, &dir.join("mid.qcow2")).unwrap();
    assert_eq!(fmt, "qcow2");
    let (top, _) = qemu_tests::disk::overlay_on(&mid, "qcow2", &dir.join("top.qcow2")).unwrap();
    let info = Command::new("qemu-img")
        .args(["info", "--backing-chain"])
        .arg(&top)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        text.contains("mid.qcow2") && text.contains("base.raw"),
        "{text}"
    );
}

/// `sfdisk -J` (util-linux 2.38) of a disk laid out like the migration's GPT:
/// BIOS boot, /boot, LVM PV.
const SFDISK_GPT: &str = r#"{
   "partitiontable": {
      "label": "gpt",
      "id": "7621CBC5-4518-2842-9EEC-A461325E4344",
      "device": "g.img",
      "unit": "sectors",
      "firstlba": 2048,
      "lastlba": 8388574,
      "sectorsize": 512,
      "partitions": [
         {
            "node": "g.img1",
            "start": 2048,
            "size": 2048,
            "type": "21686148-6449-6E6F-744E-656564454649",
            "uuid": "B98BAA2C-E4A1-0340-8A45-BDC2146A0550"
         },{
            "node": "g.img2",
            "start": 4096,
            "size": 786432,
            "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
            "uuid": "6F6114B1-9B5A-844B-AEE9-18371C6C51BD",
            "name": "boot"
         },{
            "node": "g.img3",
            "start": 790528,
            "size": 7596032,
            "type": "E6D6D379-F507-44C2-A23C-238F2A3DF928",
            "uuid": "4E99BDE4-373D-6644-BC2E-A78AA9A22EAC"
         }
      ]
   }
}"#;

#[test]
fn sfdisk_partition_by_node_name() {
    let p = sfdisk_partition(SFDISK_GPT, 2).unwrap();
    assert_eq!((p.start, p.sectors, p.sector_size), (4096, 786432, 512));
    assert_eq!((p.offset_bytes(), p.size_bytes()), (4096 * 512, 384 << 20));
    assert_eq!(sfdisk_partition(SFDISK_GPT, 3).unwrap().start, 790528);
    assert_eq!(sfdisk_partition(SFDISK_GPT, 4), None);
    // a device whose name ends in a digit, nvme-style nodes
    let nvme = SFDISK_GPT
        .replace("\"g.img\"", "\"/dev/nvme0n1\"")
        .replace("g.img", "/dev/nvme0n1p");
    assert_eq!(sfdisk_partition(&nvme, 2).unwrap().start, 4096);
    assert_eq!(sfdisk_partition(&nvme, 12), None);
    assert_eq!(sfdisk_partition("not json", 1), None);
}

#[test]
fn recovery_boots_counted_by_kernel_command_line() {
    // Shaped like the console of one QEMU run (a guest reboot stays in it): the
    // migration boot, then one recovery boot, lines as the Debian 11 kernel and
    // the dracut hook print them.
    let console = "\
[    0.000000] Command line: BOOT_IMAGE=/vmlinuz-5.10.0-32-amd64 root=UUID=0d0a ro rd.dualroot.migrate=/var/lib/dualroot/stage/plan.toml panic=10 console=ttyS0
[    0.075101] Kernel command line: BOOT_IMAGE=/vmlinuz-5.10.0-32-amd64 root=UUID=0d0a ro rd.dualroot.migrate=/var/lib/dualroot/stage/plan.toml panic=10 console=ttyS0
[   21.520011] dualroot-hook: migration requested with plan /var/lib/dualroot/stage/plan.toml
dualroot-hook: migration requested with plan /var/lib/dualroot/stage/plan.toml
dualroot-hook: DUALROOT-MIGRATION-RETRY: a step failed after the point of no return; rebooting to resume
  Booting `dualroot recovery (resume migration)'
[    0.000000] Command line: BOOT_IMAGE=/recovery/vmlinuz root=/dev/mapper/VA-data rd.lvm.vg=VA rd.dualroot.resume=1 panic=10 console=ttyS0
[    0.074512] Kernel command line: BOOT_IMAGE=/recovery/vmlinuz root=/dev/mapper/VA-data rd.lvm.vg=VA rd.dualroot.resume=1 panic=10 console=ttyS0
[   20.100001] dualroot-hook: resuming the migration
dualroot-hook: resuming the migration
";
    assert_eq!(recovery_boots(console), 1);
    let twice = format!(
        "{console}{}",
        &console[console.find("  Booting").unwrap()..]
    );
    assert_eq!(recovery_boots(&twice), 2);
    // a quiet kernel: the hook's console lines still count
    let quiet: String = console
        .lines()
        .filter(|l| !l.contains("ommand line"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(recovery_boots(&quiet), 1);
    assert_eq!(
        recovery_boots("[ 0.0] Kernel command line: root=/dev/vda1\n"),
        0
    );
}

#[test]
fn sha256_list_parses_text_and_binary_mode() {
    let h = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let text = format!(
        "{h}  /home/admin/matrix/docs/empty.txt\n{h} */home/admin/matrix/bin/blob 1.bin\n{h}  /home/admin/matrix/docs/name with spaces.txt\nsha256sum: x: No such file\n"
    );
    let l = sha256_list(&text);
    assert_eq!(l.len(), 3);
    assert_eq!(l[0], ("/home/admin/matrix/docs/empty.txt".into(), h.into()));
    assert_eq!(l[1].0, "/home/admin/matrix/bin/blob 1.bin");
    assert_eq!(l[2].0, "/home/admin/matrix/docs/name with spaces.txt");
    assert!(sha256_list("short  /x\n").is_empty());
}

#[test]
fn devices_file_pvids_skip_comments() {
    // as EL9's lvm writes /etc/lvm/devices/system.devices
    let text = "# LVM uses devices listed in this file.\n# Created by LVM command vgimportdevices pid 1187 at Tue Jun  4 09:12:44 2024\nVERSION=1.1.1\nIDTYPE=sys_wwid IDNAME=naa.6000c2932b4b7c1d9e8f0a1b2c3d4e5f DEVNAME=/dev/sda2 PVID=CpHzPo1KtTwCZrtRGbse1dtvg5wC6EhG PART=2\nIDTYPE=devname IDNAME=/dev/vda3 DEVNAME=/dev/vda3 PVID=aaaabbbbccccddddeeeeffffgggghhhh\n";
    assert_eq!(
        devices_file_pvids(text),
        vec![
            "CpHzPo1KtTwCZrtRGbse1dtvg5wC6EhG".to_string(),
            "aaaabbbbccccddddeeeeffffgggghhhh".to_string()
        ]
    );
    assert!(devices_file_pvids("# PVID=commented\n").is_empty());
}

/// A file on partition 2 of a GPT disk, read from the host through a qcow2
/// overlay without mounting anything (how a scenario reads the journal of a
/// guest that powered off).
#[test]
fn read_partition_file_through_a_qcow2_overlay() {
    use std::process::{Command, Stdio};
    let have = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if let Some(t) = ["qemu-img", "sfdisk", "mkfs.ext4", "debugfs"]
        .iter()
        .find(|t| !have(t))
    {
        println!("{t} missing (packages qemu-utils, fdisk, e2fsprogs): skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("dualroot")).unwrap();
    std::fs::write(
        tree.join("dualroot/journal.json"),
        b"{\"outcome\":\"gave up\"}\n",
    )
    .unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let run = |c: &mut Command| {
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let mut sfdisk = Command::new("sfdisk");
    sfdisk.args(["-q"]).arg(&raw).stdin(Stdio::piped());
    let mut child = sfdisk.spawn().unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        b"label: gpt\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\nstart=4096, size=65536, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\nstart=69632, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n",
    )
    .unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "boot", "-d"])
        .arg(&tree)
        .args(["-E", &format!("offset={}", 4096 * 512)])
        .arg(&raw)
        .arg("32M"));
    let (top, fmt) = qemu_tests::disk::overlay(&raw, &dir.path().join("top.qcow2")).unwrap();
    let scratch = dir.path().join("scratch");
    let got =
        qemu_tests::disk::read_partition_file(&top, fmt, 2, "/dualroot/journal.json", &scratch)
            .unwrap();
    assert_eq!(got, b"{\"outcome\":\"gave up\"}\n");
    let same =
        qemu_tests::disk::read_partition_file(&raw, "raw", 2, "/dualroot/journal.json", &scratch)
            .unwrap();
    assert_eq!(same, got);
    let missing = qemu_tests::disk::read_partition_file(&top, fmt, 2, "/dualroot/nope", &scratch);
    assert!(format!("{:?}", missing.err()).contains("not found"));
    assert!(qemu_tests::disk::read_partition_file(&top, fmt, 4, "/x", &scratch).is_err());
    // nothing is left behind in the scratch directory
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
}
