//! Hardening of the bundle reader and unpacker (issue 14): limits enforced while the
//! payload streams (F2), nothing dangerous on disk before the payload's hash matched
//! (F2), complete cleanup including a pre-existing `lost+found` (F3), one reading of
//! the bytes shared with GNU tar (F10), explicit modes for implicit directories (F12)
//! and pre-1970 mtimes. Each test failed on the code before the fix.

mod common;
use common::*;
use dualroot::bundle::outer;
use dualroot::keys::Keyring;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Setuid/setgid files, device nodes and file capabilities under `root`.
fn dangerous(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(root).follow_links(false) {
        let Ok(e) = e else { continue };
        let Ok(m) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        let ft = m.file_type();
        let rel = e.path().strip_prefix(root).unwrap().display().to_string();
        if ft.is_block_device() || ft.is_char_device() {
            out.push(format!("{rel}: device node"));
        }
        if ft.is_file() && m.mode() & 0o6000 != 0 {
            out.push(format!("{rel}: mode {:o}", m.mode() & 0o7777));
        }
        if ft.is_file() {
            if let Ok(Some(_)) = xattr::get(e.path(), "security.capability") {
                out.push(format!("{rel}: file capability"));
            }
        }
    }
    out
}

fn cap_net_raw() -> Vec<u8> {
    let mut cap = vec![0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00];
    cap.extend_from_slice(&[0u8; 12]);
    cap
}

/// A payload with a device node, a setuid file with a capability and a setgid file,
/// then `filler` bytes of data. Returns the tar and the offset of the filler's data.
fn dangerous_tar(filler: &[u8]) -> (Vec<u8>, usize) {
    let mut sda = Raw::new("dev/sda", b'4');
    sda.mode = 0o666;
    sda.dev = (8, 0);
    let mut rootsh = Raw::new("usr/bin/rootsh", b'0');
    rootsh.mode = 0o4755;
    let mut wall = Raw::new("usr/bin/wall", b'0');
    wall.mode = 0o2755;
    let mut head = [
        raw_entry("dev/", b'5', "", b""),
        sda.with(b""),
        raw_entry("usr/", b'5', "", b""),
        raw_entry("usr/bin/", b'5', "", b""),
        pax(&[("SCHILY.xattr.security.capability", &cap_net_raw())]),
        rootsh.with(b"#!/bin/sh\nexec /bin/sh -p\n"),
        wall.with(b"wall"),
    ]
    .concat();
    let at = head.len() + 512;
    head.extend_from_slice(&raw_entry("usr/share-filler", b'0', "", filler));
    head.extend_from_slice(&raw_entry("zz-last", b'0', "", b"end"));
    head.extend_from_slice(&[0u8; 1024]);
    (head, at)
}

/// Hands out a tar 512 bytes at a time and, once the reader is past `check_from`,
/// records whatever dangerous thing already stands in `target`.
struct Spy {
    data: Vec<u8>,
    pos: usize,
    check_from: usize,
    target: PathBuf,
    seen: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

impl Read for Spy {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.check_from {
            self.seen.lock().unwrap().extend(dangerous(&self.target));
        }
        let n = buf.len().min(512).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn f2_no_setid_device_or_capability_on_disk_before_the_end() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("t");
    fs::create_dir(&target).unwrap();
    let (tar, at) = dangerous_tar(&noise(256 * 1024));
    let seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let spy = Spy {
        data: tar,
        pos: 0,
        check_from: at + 1024,
        target: target.clone(),
        seen: seen.clone(),
    };
    dualroot::bundle::unpack::extract_tar(spy, &target, None).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.is_empty(),
        "dangerous entries stood on disk while the payload was still streaming: {seen:?}"
    );
    // ... and everything is in place once the stream was read to its end.
    let m = fs::symlink_metadata(target.join("usr/bin/rootsh")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o4755);
    assert_eq!(
        xattr::get(target.join("usr/bin/rootsh"), "security.capability").unwrap(),
        Some(cap_net_raw())
    );
    let m = fs::symlink_metadata(target.join("usr/bin/wall")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o2755);
    let m = fs::symlink_metadata(target.join("dev/sda")).unwrap();
    assert!(m.file_type().is_block_device());
    assert_eq!(m.mode() & 0o7777, 0o666);
    assert_eq!(m.rdev(), nix::sys::stat::makedev(8, 0));
}

#[test]
fn f2_swapped_payload_leaves_nothing_dangerous_when_killed() {
    // A same-size payload that does not match the manifest's sha256; the unpack is
    // killed the moment anything shows up in the target.
    require_root();
    let c = case();
    let (tar, _) = dangerous_tar(&noise(32 << 20));
    c.signed(&tar, |m| m.payload.sha256 = "ab".repeat(32));
    let mut child = c.unpack_cmd().spawn().unwrap();
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        let present = fs::read_dir(&c.target).unwrap().next().is_some();
        if present {
            seen = dangerous(&c.target);
            let _ = child.kill();
            seen.extend(dangerous(&c.target));
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "unpack hangs");
        std::thread::sleep(Duration::from_micros(200));
    }
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        seen.is_empty(),
        "killed mid-unpack of a swapped payload, the target held: {seen:?}"
    );
    assert!(dangerous(&c.target).is_empty());
}

#[test]
fn f2_uncompressed_size_is_enforced_while_streaming() {
    let c = case();
    let tar = tar_of(&[raw_entry("big", b'0', "", &vec![0u8; 4 << 20])]);
    c.signed(&tar, |m| m.payload.uncompressed_size = 1 << 20);
    c.refused(&["more than the 1048576 bytes", "uncompressed_size"]);
}

#[test]
fn f2_uncompressed_size_larger_than_the_payload_is_refused() {
    let c = case();
    c.signed(&tar_of(&[raw_entry("small", b'0', "", b"x")]), |m| {
        m.payload.uncompressed_size += 512
    });
    c.refused(&["uncompressed_size"]);
}

#[test]
fn f2_entry_count_is_enforced_while_streaming() {
    let c = case();
    let tar = tar_of(&[
        raw_entry("a", b'0', "", b"a"),
        raw_entry("b", b'0', "", b"b"),
        raw_entry("c", b'0', "", b"c"),
        raw_entry("d", b'0', "", b"d"),
    ]);
    c.signed(&tar, |m| m.payload.entries = 2);
    c.refused(&["\"c\"", "more than the 2 entries"]);
}

#[test]
fn f2_huge_pax_header_is_refused_before_it_is_read() {
    let c = case();
    let comment = vec![b'c'; 2 << 20];
    let tar = tar_of(&[
        pax(&[("comment", &comment)]),
        raw_entry("f", b'0', "", b"x"),
    ]);
    c.signed(&tar, |_| {});
    c.refused(&["extended header", "limit"]);
}

#[test]
fn f2_huge_gnu_long_name_is_refused_before_it_is_read() {
    let c = case();
    let mut name = vec![b'n'; 2 << 20];
    name.push(0);
    let mut l = Raw::new("././@LongLink", b'L');
    l.mode = 0;
    let tar = tar_of(&[l.with(&name), raw_entry("f", b'0', "", b"x")]);
    c.signed(&tar, |_| {});
    c.refused(&["long name", "limit"]);
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Sets the LZMA2 dictionary-size byte of the first block of a single-block xz
/// stream, fixing the block header's CRC32.
fn patch_xz_dict(x: &mut [u8], dict: u8) {
    let hsize = (x[12] as usize + 1) * 4;
    let flags = x[13];
    assert_eq!(flags & 3, 0, "one filter");
    let mut pos = 14;
    let skip_varint = |pos: &mut usize| {
        while x[*pos] & 0x80 != 0 {
            *pos += 1;
        }
        *pos += 1;
    };
    if flags & 0x40 != 0 {
        skip_varint(&mut pos);
    }
    if flags & 0x80 != 0 {
        skip_varint(&mut pos);
    }
    assert_eq!(x[pos], 0x21, "LZMA2 filter");
    assert_eq!(x[pos + 1], 1, "one property byte");
    x[pos + 2] = dict;
    let crc = crc32(&x[12..12 + hsize - 4]);
    x[12 + hsize - 4..12 + hsize].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn f2_xz_dictionary_past_the_memory_limit_is_refused() {
    let c = case();
    let tar = tar_of(&[raw_entry("f", b'0', "", b"hello")]);
    let mut payload = xz(&tar);
    patch_xz_dict(&mut payload, 36); // 1 GiB
    c.signed_payload(&payload, tar.len() as u64, 1, |_| {});
    c.refused(&["memory"]);
}

#[test]
fn f3_cleanup_empties_a_preexisting_lost_found() {
    require_root();
    let c = case();
    let lf = c.target.join("lost+found");
    fs::create_dir(&lf).unwrap();
    fs::set_permissions(&lf, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(lf.join("#12"), b"fsck found me").unwrap();
    let mut evil = Raw::new("lost+found/evil-suid", b'0');
    evil.mode = 0o4755;
    let tar = tar_of(&[
        evil.with(b"#!/bin/sh\n"),
        raw_entry("lost+found/sub/deeper", b'0', "", b"x"),
        raw_entry("etc/", b'5', "", b""),
        raw_entry("etc/../../escape", b'0', "", b"x"),
    ]);
    c.signed(&tar, |_| {});
    c.fails(&["etc/../../escape"]);
    let mut left: Vec<String> = fs::read_dir(&c.target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["lost+found"]);
    let mut inside: Vec<String> = fs::read_dir(&lf)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    inside.sort();
    assert_eq!(inside, ["#12"], "lost+found keeps only what it held before");
    assert_eq!(fs::read(lf.join("#12")).unwrap(), b"fsck found me");
    assert_eq!(fs::metadata(&lf).unwrap().mode() & 0o7777, 0o700);
}

#[test]
fn f10_a_fourth_outer_member_is_refused() {
    let c = case();
    let tar = tar_of(&[raw_entry("f", b'0', "", b"x")]);
    let payload = xz(&tar);
    let (m, sig) = c.signed_manifest(&payload, tar.len() as u64, 1, |_| {});
    let mut v = assemble_bytes(m.as_bytes(), Some(&sig), &payload);
    v.truncate(v.len() - 1024);
    outer::write_member(&mut v, "extra.sh", b"echo GNU tar extracts me\n", 0).unwrap();
    outer::write_end(&mut v).unwrap();
    fs::write(&c.bundle, v).unwrap();
    c.refused(&["after the payload"]);
}

#[test]
fn f10_bytes_after_the_end_marker_are_refused() {
    let c = case();
    let tar = tar_of(&[raw_entry("f", b'0', "", b"x")]);
    let payload = xz(&tar);
    let (m, sig) = c.signed_manifest(&payload, tar.len() as u64, 1, |_| {});
    let mut v = assemble_bytes(m.as_bytes(), Some(&sig), &payload);
    v.extend_from_slice(b"trailing junk");
    fs::write(&c.bundle, v).unwrap();
    c.refused(&["after the payload"]);
}

fn fix_outer_checksum(h: &mut [u8]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h[..512].iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

#[test]
fn f10_outer_member_name_with_a_ustar_prefix_is_refused() {
    // GNU tar reads this member as "evil/manifest.toml".
    let c = case();
    let tar = tar_of(&[raw_entry("f", b'0', "", b"x")]);
    let payload = xz(&tar);
    let (m, sig) = c.signed_manifest(&payload, tar.len() as u64, 1, |_| {});
    let mut v = assemble_bytes(m.as_bytes(), Some(&sig), &payload);
    v[345..349].copy_from_slice(b"evil");
    fix_outer_checksum(&mut v[..512]);
    fs::write(&c.bundle, v).unwrap();
    c.refused(&["prefix"]);
}

#[test]
fn f10_outer_base256_size_with_high_bytes_is_refused() {
    // GNU tar reads all 12 bytes of a base-256 size; the payload's header here
    // claims 2^64+ bytes to GNU tar.
    let c = case();
    let tar = tar_of(&[raw_entry("f", b'0', "", b"x")]);
    let payload = xz(&tar);
    let (m, sig) = c.signed_manifest(&payload, tar.len() as u64, 1, |_| {});
    let mut v = assemble_bytes(m.as_bytes(), Some(&sig), &payload);
    let at = 512 + m.len().div_ceil(512) * 512 + 512 + 512;
    let h = &mut v[at..at + 512];
    assert_eq!(&h[..13], b"rootfs.tar.xz");
    let size = payload.len() as u64;
    h[124..136].fill(0);
    h[124] = 0x80;
    h[125] = 0x01;
    h[128..136].copy_from_slice(&size.to_be_bytes());
    fix_outer_checksum(h);
    fs::write(&c.bundle, v).unwrap();
    c.refused(&["size field"]);
}

#[test]
fn f10_a_second_xz_stream_is_refused() {
    let c = case();
    let tar = tar_of(&[raw_entry("f", b'0', "", b"first")]);
    let tar2 = tar_of(&[raw_entry("g", b'0', "", b"hidden")]);
    let mut payload = xz(&tar);
    payload.extend_from_slice(&xz(&tar2));
    c.signed_payload(&payload, tar.len() as u64, 1, |_| {});
    c.refused(&["after the end of its xz stream"]);
}

#[test]
fn f10_bytes_after_the_xz_stream_are_refused() {
    let c = case();
    let tar = tar_of(&[raw_entry("f", b'0', "", b"first")]);
    let mut payload = xz(&tar);
    payload.extend_from_slice(b"not xz at all");
    c.signed_payload(&payload, tar.len() as u64, 1, |_| {});
    c.refused(&["after the end of its xz stream"]);
}

#[test]
fn f10_pax_size_disagreeing_with_the_header_is_refused() {
    // dualroot wrote 5 bytes, GNU tar 10.
    let c = case();
    let mut f = Raw::new("f", b'0');
    f.size = Some(5);
    let tar = tar_of(&[pax(&[("size", b"10")]), f.with(b"0123456789")]);
    c.signed(&tar, |_| {});
    c.refused(&["\"f\"", "PAX size"]);
}

#[test]
fn f10_a_file_entry_named_like_a_directory_is_refused() {
    // GNU tar makes a directory of a regular-file entry whose name ends in '/'.
    let c = case();
    let tar = tar_of(&[
        raw_entry("etc/", b'5', "", b""),
        raw_entry("etc/cron.d/", b'0', "", b""),
    ]);
    c.signed(&tar, |_| {});
    c.refused(&["etc/cron.d/", "ends in '/'"]);
}

#[test]
fn f10_duplicates_read_the_same_by_the_dry_run_and_unpack() {
    require_root();
    let c = case();
    let tar = tar_of(&[
        raw_entry("etc/", b'5', "", b""),
        raw_entry("etc/passwd", b'0', "", b"root:x:0:0:first:/root:/bin/sh\n"),
        raw_entry("etc/group", b'0', "", b"root:x:0:\n"),
        raw_entry("./etc/passwd", b'0', "", b"root:x:0:0:last:/root:/bin/sh\n"),
    ]);
    c.signed(&tar, |_| {});
    let kr = Keyring::load(&c.keys.keyring).unwrap();
    let b = dualroot::bundle::open(&c.bundle, Some(&kr)).unwrap();
    let got = dualroot::bundle::reader::read_members(b, &["etc/passwd", "etc/group"]).unwrap();
    c.unpack_ok();
    let unpacked = fs::read(c.target.join("etc/passwd")).unwrap();
    assert_eq!(unpacked, b"root:x:0:0:last:/root:/bin/sh\n");
    assert_eq!(
        got.get("etc/passwd").map(|v| v.as_slice()),
        Some(unpacked.as_slice()),
        "the accounts dry run read another etc/passwd than unpack wrote"
    );
    assert_eq!(
        got.get("etc/group").map(|v| v.as_slice()),
        Some(&b"root:x:0:\n"[..])
    );
}

#[test]
fn f12_implicit_directories_are_0755_under_umask_077() {
    require_root();
    let c = case();
    let tar = tar_of(&[raw_entry("opt/app/bin/tool", b'0', "", b"tool")]);
    c.signed(&tar, |_| {});
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask 077 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_dualroot"))
        .args(["bundle", "unpack"])
        .arg(&c.bundle)
        .arg(&c.target)
        .arg("--keyring")
        .arg(&c.keys.keyring);
    run_ok(&mut cmd);
    for d in ["opt", "opt/app", "opt/app/bin"] {
        let mode = fs::metadata(c.target.join(d)).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{d} has mode {mode:o}");
    }
    let mode = fs::metadata(c.target.join("opt/app/bin/tool"))
        .unwrap()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o644);
}

#[test]
fn negative_mtimes_survive_create_and_unpack_and_gnu_tar_agrees() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("old-dir")).unwrap();
    fs::write(src.join("old-dir/1969"), b"moon landing").unwrap();
    std::os::unix::fs::symlink("1969", src.join("old-dir/link")).unwrap();
    fs::write(src.join("new"), b"now").unwrap();
    let times = [
        ("old-dir/1969", -14_182_940i64),
        ("old-dir/link", -86_400),
        ("old-dir", -1),
        ("new", 1_700_000_000),
    ];
    for (p, t) in times {
        let ft = filetime::FileTime::from_unix_time(t, 0);
        filetime::set_symlink_file_times(src.join(p), ft, ft).unwrap();
    }
    let k = keys(tmp.path(), "vendor");
    let bundle = tmp.path().join("os.bundle");
    run_ok(
        dualroot()
            .args([
                "bundle",
                "create",
                "--no-default-excludes",
                "--os-id",
                "testos",
                "--version",
                "1.0",
            ])
            .arg("--rootfs")
            .arg(&src)
            .arg("--key")
            .arg(&k.secret)
            .arg("--out")
            .arg(&bundle),
    );
    let ours = tmp.path().join("ours");
    fs::create_dir(&ours).unwrap();
    run_ok(
        dualroot()
            .args(["bundle", "unpack"])
            .arg(&bundle)
            .arg(&ours)
            .arg("--keyring")
            .arg(&k.keyring),
    );
    let gnu = tmp.path().join("gnu");
    fs::create_dir(&gnu).unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -xOf '{}' rootfs.tar.xz | xz -dc | tar --numeric-owner -xpf - -C '{}'",
            bundle.display(),
            gnu.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    for (p, t) in times {
        let a = fs::symlink_metadata(ours.join(p)).unwrap().mtime();
        let g = fs::symlink_metadata(gnu.join(p)).unwrap().mtime();
        assert_eq!(a, t, "dualroot restored {p} with mtime {a}, source has {t}");
        assert_eq!(g, t, "GNU tar reads {p} with mtime {g}, source has {t}");
    }
}

#[test]
fn the_scan_names_the_payloads_uefi_boot_files() {
    // What preflight decides a UEFI machine's new OS by (efi::check_new_os).
    let c = case();
    let tar = tar_of(&[
        raw_entry("usr/", b'5', "", b""),
        raw_entry("usr/lib/shim/shimx64.efi.signed", b'0', "", b"MZ shim"),
        raw_entry("usr/lib/grub/x86_64-efi/normal.mod", b'0', "", b"mod"),
    ]);
    c.signed(&tar, |_| {});
    let kr = Keyring::load(&c.keys.keyring).unwrap();
    let b = dualroot::bundle::open(&c.bundle, Some(&kr)).unwrap();
    let scan = dualroot::bundle::scan::scan(b, &[]).unwrap();
    assert_eq!(
        scan.efi_files
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        [dualroot::efi::EFI_MODULES, dualroot::efi::SIGNED_SHIM]
    );
    // A shim without its signed GRUB: fine without Secure Boot (grub-install
    // builds from the modules), refused with it.
    assert!(dualroot::efi::check_new_os(&scan.efi_files, false).is_ok());
    let e = dualroot::efi::check_new_os(&scan.efi_files, true).unwrap_err();
    assert!(
        e.to_string().contains("ships no signed shim and GRUB"),
        "{e}"
    );
}
