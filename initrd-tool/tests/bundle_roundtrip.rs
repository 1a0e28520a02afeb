//! Round trip as root on a real ext4 filesystem (a `mkfs.ext4` image mounted through
//! `losetup`): a tree with every entry kind is bundled, unpacked by `dualroot`, and
//! compared entry by entry with the source and with GNU tar's extraction of the same
//! payload. Zero differences allowed.

mod common;
use common::*;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    xattr::set(p, name, value).unwrap_or_else(|e| panic!("setting {name} on {}: {e}", p.display()));
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

fn build_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/appliance")).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    fs::create_dir_all(root.join("srv/shared")).unwrap();
    fs::create_dir_all(root.join("home/admin")).unwrap();
    let deep = root.join("usr/share/a-rather-long-directory-name-to-force-pax-path-records/and-another-long-component-here");
    fs::create_dir_all(&deep).unwrap();
    fs::write(
        deep.join("file-with-a-long-name-that-does-not-fit-ustar.txt"),
        b"long",
    )
    .unwrap();

    fs::write(root.join("etc/hostname"), b"appliance\n").unwrap();
    fs::write(root.join("etc/appliance/config.toml"), vec![b'x'; 300_000]).unwrap();
    chown(&root.join("etc/appliance/config.toml"), 4242, 4343); // UIDs that exist nowhere
    chown(&root.join("home/admin"), 1000, 1000);
    fs::write(root.join("home/admin/notes"), b"mine").unwrap();
    chown(&root.join("home/admin/notes"), 1000, 1000);

    // setuid binary with a file capability (cap_net_raw, effective).
    let ping = root.join("usr/bin/ping");
    fs::write(&ping, b"\x7fELF not really").unwrap();
    fs::set_permissions(&ping, fs::Permissions::from_mode(0o4755)).unwrap();
    let mut cap = vec![0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00];
    cap.extend_from_slice(&[0u8; 12]);
    set_xattr(&ping, "security.capability", &cap);
    set_xattr(&ping, "user.origin", b"iputils");

    // Hardlink group of three, one of them in another directory.
    fs::write(root.join("usr/bin/busybox"), b"multi-call").unwrap();
    fs::hard_link(root.join("usr/bin/busybox"), root.join("usr/bin/sh-link")).unwrap();
    fs::hard_link(root.join("usr/bin/busybox"), root.join("etc/busybox-copy")).unwrap();

    // Symlinks, one with a trusted xattr (user.* is not allowed on symlinks).
    symlink("../usr/bin/busybox", root.join("etc/sh")).unwrap();
    set_xattr(
        &root.join("etc/sh"),
        "trusted.overlay.test",
        b"on-a-symlink",
    );
    symlink("/nonexistent/absolute/target", root.join("etc/dangling")).unwrap();
    chown(&root.join("etc/dangling"), 77, 88);

    // Directory with xattrs and a default ACL; file with an access ACL.
    set_xattr(&root.join("etc/appliance"), "user.role", b"config");
    set_xattr(
        &root.join("etc/appliance"),
        "trusted.dir",
        b"\x00\x01binary\xff",
    );
    run_ok(
        Command::new("setfacl")
            .args(["-m", "u:1000:rwx", "-d", "-m", "g:4343:rx"])
            .arg(root.join("srv/shared")),
    );
    fs::write(root.join("etc/acl-file"), b"acl").unwrap();
    run_ok(
        Command::new("setfacl")
            .args(["-m", "u:1234:rw,g:99:r"])
            .arg(root.join("etc/acl-file")),
    );

    // Device nodes and a FIFO.
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    mknod(
        &root.join("dev/null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .unwrap();
    mknod(
        &root.join("dev/vda"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o660),
        makedev(254, 0),
    )
    .unwrap();
    chown(&root.join("dev/vda"), 0, 6);
    set_xattr(
        &root.join("dev/null"),
        "security.selinux",
        b"system_u:object_r:null_device_t:s0\0",
    );
    nix::unistd::mkfifo(&root.join("dev/initctl"), Mode::from_bits_truncate(0o600)).unwrap();

    // Sticky and odd modes; an empty file; fixed mtimes.
    fs::create_dir_all(root.join("tmpdir")).unwrap();
    fs::set_permissions(root.join("tmpdir"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(root.join("etc/empty"), b"").unwrap();
    fs::set_permissions(root.join("etc/empty"), fs::Permissions::from_mode(0o2640)).unwrap();
    // A socket is skipped with a warning.
    let _sock = std::os::unix::net::UnixListener::bind(root.join("srv/control.sock")).unwrap();
    for (i, e) in walkdir::WalkDir::new(root)
        .contents_first(true)
        .into_iter()
        .enumerate()
    {
        let e = e.unwrap();
        let t = filetime::FileTime::from_unix_time(1_600_000_000 + i as i64 * 3600, 0);
        filetime::set_symlink_file_times(e.path(), t, t).unwrap();
    }
}

#[test]
fn round_trip_on_ext4_matches_source_and_gnu_tar() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let lfs = LoopFs::new(tmp.path(), 128);
    let m = &lfs.mnt;
    let src = m.join("src");
    build_tree(&src);
    let k = keys(tmp.path(), "vendor");
    let bundle = m.join("os.bundle");
    let out = run(dualroot()
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
        .arg(&bundle));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "create failed: {stderr}");
    assert!(
        stderr.contains("skipping socket") && stderr.contains("control.sock"),
        "{stderr}"
    );

    let ours = m.join("ours");
    fs::create_dir(&ours).unwrap();
    run_ok(
        dualroot()
            .args(["bundle", "unpack"])
            .arg(&bundle)
            .arg(&ours)
            .arg("--keyring")
            .arg(&k.keyring),
    );

    // GNU tar extracts the same payload.
    let gnu = m.join("gnu");
    fs::create_dir(&gnu).unwrap();
    let payload = m.join("payload.tar.xz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -xOf '{}' rootfs.tar.xz > '{}' && xz -dc '{}' | tar --numeric-owner --xattrs --xattrs-include='*' -xpf - -C '{}'",
            bundle.display(),
            payload.display(),
            payload.display(),
            gnu.display()
        ))
        .status()
        .unwrap();
    assert!(st.success(), "GNU tar extraction failed");

    let s_src = snapshot(&src, &["srv/control.sock"]);
    let s_ours = snapshot(&ours, &[]);
    let s_gnu = snapshot(&gnu, &[]);
    let d1 = diff("gnu-tar", &s_gnu, "dualroot", &s_ours);
    let d2 = diff("source", &s_src, "dualroot", &s_ours);
    println!(
        "compared {} entries, {} hardlink groups",
        s_ours.0.len(),
        s_ours.1.len()
    );
    assert!(d1.is_empty(), "dualroot vs GNU tar:\n{}", d1.join("\n"));
    assert!(d2.is_empty(), "dualroot vs source:\n{}", d2.join("\n"));

    // The tree really holds what the test claims, so the comparison means something.
    let f = &s_ours.0;
    assert_eq!(f["dev/null"].kind, "char");
    assert_eq!(f["dev/vda"].kind, "block");
    assert_eq!(f["dev/initctl"].kind, "fifo");
    assert_eq!(f["usr/bin/ping"].mode, 0o4755);
    assert!(f["usr/bin/ping"].xattrs.contains_key("security.capability"));
    assert!(f["etc/sh"].xattrs.contains_key("trusted.overlay.test"));
    assert!(f["etc/appliance"].xattrs.contains_key("trusted.dir"));
    assert!(f["srv/shared"]
        .xattrs
        .contains_key("system.posix_acl_default"));
    assert!(f["etc/acl-file"]
        .xattrs
        .contains_key("system.posix_acl_access"));
    assert_eq!(
        (
            f["etc/appliance/config.toml"].uid,
            f["etc/appliance/config.toml"].gid
        ),
        (4242, 4343)
    );
    assert_eq!(s_ours.1.len(), 1);
    assert_eq!(s_ours.1.iter().next().unwrap().len(), 3);
    assert!(!f.contains_key("srv/control.sock"));
}
