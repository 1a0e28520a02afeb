//! Bundle code runs in its own mount and PID namespaces (issue 23 item 6): a
//! hook or tool of the new root can write its own root, but not the running
//! system's view it is given (read-only), not /sys, and cannot leave the chroot
//! through /proc/1/root (its /proc shows only its own processes; with the host's
//! /proc bound in, as before, /proc/1/root was the host's /). Real `unshare`,
//! `mount` and `chroot` on a busybox root. Needs root.

mod common;

use dualroot::bootfiles::Sandbox;

fn sh(sb: &Sandbox, script: &str) -> bool {
    sb.run(&["/bin/sh", "-c", script]).is_ok()
}

#[test]
fn bundle_code_cannot_leave_its_root_or_write_the_running_system() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("new");
    common::busybox_root(&root, &["sh", "cat", "touch", "ls", "grep", "echo"]);
    let old = d.path().join("running");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("shadow"), "root:$6$x:1::::::\n").unwrap();
    // A file of the running system outside the new root.
    let secret = d.path().join("host-only-file");
    std::fs::write(&secret, "host secret\n").unwrap();

    let sb = Sandbox::new(&root)
        .ro_bind(&old, "run/dualroot/old")
        .unwrap()
        .env("DUALROOT_OLD", "/run/dualroot/old");
    // It runs, sees the old files, and writes its own root.
    assert!(sh(
        &sb,
        "grep -q root: $DUALROOT_OLD/shadow && touch /written-by-hook"
    ));
    assert!(root.join("written-by-hook").exists());
    // The running system's view is read-only.
    assert!(!sh(&sb, "echo x > /run/dualroot/old/shadow"));
    assert!(!sh(&sb, "touch /run/dualroot/old/new-file"));
    assert_eq!(
        std::fs::read_to_string(old.join("shadow")).unwrap(),
        "root:$6$x:1::::::\n"
    );
    assert!(!old.join("new-file").exists());
    // No way out through /proc: PID 1 is the sandbox's own, rooted in the chroot.
    let path = secret.display();
    assert!(!sh(&sb, &format!("cat /proc/1/root{path}")));
    assert!(!sh(&sb, &format!("cat /proc/*/root{path}")));
    // /sys is mounted read-only.
    assert!(sh(&sb, "grep -q ' /sys sysfs ro' /proc/mounts"));
    // Every mount went with the namespace.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&root.display().to_string()),
        "a sandbox mount stayed on the host: {mounts}"
    );
}
