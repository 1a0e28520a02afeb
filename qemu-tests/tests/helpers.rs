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
