//! dualroot and GNU tar must never read the same bytes differently (issue 14, F10).
//! Each tar below is extracted by dualroot's extraction loop and by GNU tar
//! (`--numeric-owner --xattrs --xattrs-include='*' -xpf`), and the two trees are
//! compared entry by entry: owners, modes, mtimes, content, device numbers, xattrs
//! and hardlink groups. The cases are the ones the held-back setuid bits and device
//! nodes (F2) and "the last entry of a name wins" make delicate.

mod common;
use common::*;
use std::fs;
use std::process::Command;

fn both_agree(tar: &[u8]) -> (std::collections::BTreeMap<String, Facts>, tempfile::TempDir) {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("ours");
    let gnu = tmp.path().join("gnu");
    fs::create_dir(&ours).unwrap();
    fs::create_dir(&gnu).unwrap();
    let started = now_secs();
    dualroot::bundle::unpack::extract_tar(tar, &ours, None).unwrap();
    let file = tmp.path().join("x.tar");
    fs::write(&file, tar).unwrap();
    run_ok(
        Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
            .arg(&file)
            .arg("-C")
            .arg(&gnu),
    );
    let ended = now_secs();
    let mut a = snapshot(&ours, &[]);
    let mut b = snapshot(&gnu, &[]);
    // Directories the tar does not hold (the roots, implicit parents) get the
    // time each tool ran at, which differs when a second ticks in between:
    // such times count as equal, every time the tar gives must match exactly.
    for snap in [&mut a, &mut b] {
        for f in snap.0.values_mut() {
            if f.kind == "dir" && (started..=ended).contains(&f.mtime) {
                f.mtime = 0;
            }
        }
    }
    let d = diff("gnu-tar", &b, "dualroot", &a);
    assert!(d.is_empty(), "dualroot vs GNU tar:\n{}", d.join("\n"));
    (a.0, tmp)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn file(name: &str, mode: u32, data: &[u8]) -> Vec<u8> {
    let mut r = Raw::new(name, b'0');
    r.mode = mode;
    r.with(data)
}

fn node(name: &str, kind: u8, mode: u32, dev: (u32, u32)) -> Vec<u8> {
    let mut r = Raw::new(name, kind);
    r.mode = mode;
    r.dev = dev;
    r.with(b"")
}

fn link(name: &str, kind: u8, to: &str) -> Vec<u8> {
    raw_entry(name, kind, to, b"")
}

#[test]
fn the_last_entry_of_a_name_wins() {
    let f = both_agree(&tar_of(&[
        file("f", 0o644, b"one"),
        file("f", 0o600, b"two"),
        link("s", b'2', "f"),
        file("s", 0o644, b"file now"),
    ]))
    .0;
    assert!(f["f"].content.starts_with("3 bytes"));
    assert_eq!(f["f"].mode, 0o600);
    assert_eq!(f["s"].kind, "file");
}

#[test]
fn a_setuid_file_replaced_after_a_hardlink_keeps_its_bits_on_the_link() {
    let f = both_agree(&tar_of(&[
        file("bin-su", 0o4755, b"old su"),
        link("bin-su-link", b'1', "bin-su"),
        file("bin-su", 0o644, b"replaced"),
    ]))
    .0;
    assert_eq!(f["bin-su-link"].mode, 0o4755);
    assert_eq!(f["bin-su"].mode, 0o644);
}

#[test]
fn a_device_replaced_after_a_hardlink_stays_a_device_under_the_link() {
    let f = both_agree(&tar_of(&[
        raw_entry("dev/", b'5', "", b""),
        node("dev/null", b'3', 0o666, (1, 3)),
        link("dev/null-link", b'1', "dev/null"),
        file("dev/null", 0o644, b"not a device any more"),
        node("dev/fifo", b'6', 0o640, (0, 0)),
        node("dev/sda", b'4', 0o660, (8, 0)),
        node("dev/sda", b'4', 0o600, (8, 16)),
    ]))
    .0;
    assert_eq!(f["dev/null-link"].kind, "char");
    assert_eq!(f["dev/null"].kind, "file");
    assert_eq!(f["dev/fifo"].kind, "fifo");
    assert_eq!(f["dev/sda"].rdev, nix::sys::stat::makedev(8, 16));
}

#[test]
fn pax_records_capabilities_and_times() {
    let mut cap = vec![0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00];
    cap.extend_from_slice(&[0u8; 12]);
    let long = format!("usr/share/{}/{}", "d".repeat(120), "f".repeat(90));
    let f = both_agree(&tar_of(&[
        raw_entry("usr/", b'5', "", b""),
        pax(&[
            ("SCHILY.xattr.security.capability", &cap),
            ("SCHILY.xattr.user.origin", b"iputils"),
            ("mtime", b"-86400"),
        ]),
        file("usr/ping", 0o4711, b"ping"),
        pax(&[
            ("path", long.as_bytes()),
            ("uid", b"4242"),
            ("gid", b"4343"),
        ]),
        file("placeholder", 0o640, b"long"),
        pax(&[("mtime", b"1700000000.5")]),
        file("usr/half", 0o2755, b"sg"),
        pax(&[("SCHILY.xattr.trusted.k", b"v")]),
        link("usr/ping-sym", b'2', "ping"),
    ]))
    .0;
    assert_eq!(f["usr/ping"].mode, 0o4711);
    assert_eq!(f["usr/ping"].mtime, -86400);
    assert!(f["usr/ping"].xattrs.contains_key("security.capability"));
    assert_eq!((f[&long].uid, f[&long].gid), (4242, 4343));
    assert_eq!(f["usr/half"].mode, 0o2755);
}

#[test]
fn directories_named_after_their_content_and_implicit_parents() {
    let mut dir = Raw::new("opt/app/", b'5');
    dir.mode = 0o750;
    let f = both_agree(&tar_of(&[
        file("opt/app/bin/tool", 0o755, b"tool"),
        dir.with(b""),
        file("var/lib/x", 0o644, b"x"),
    ]))
    .0;
    assert_eq!(f["opt/app"].mode, 0o750);
    assert_eq!(f["opt/app/bin"].mode, 0o755);
}
