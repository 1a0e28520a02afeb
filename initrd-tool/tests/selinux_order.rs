//! SELinux labels come last (issue 23 item 7): in a new root whose SELinux is
//! enforcing, the keyring copy and the plan's hooks (which write, say, a
//! NetworkManager keyfile) happen before `setfiles`, so `setfiles` sees, and
//! labels, what they wrote. The new root is a busybox tree run with the real
//! `chroot`; its `setfiles` is a test double (this host has no SELinux policy)
//! that records which of those files existed when it ran. Needs root.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn write(root: &Path, rel: &str, text: &str, mode: u32) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn setfiles_runs_after_the_keyring_and_the_hooks() {
    let d = tempfile::tempdir().unwrap();
    let new = d.path().join("new");
    common::busybox_root(&new, &["sh", "ls", "cat", "mkdir"]);
    write(
        &new,
        "etc/selinux/config",
        "SELINUX=enforcing\nSELINUXTYPE=targeted\n",
        0o644,
    );
    write(
        &new,
        "etc/selinux/targeted/contexts/files/file_contexts",
        "/.* system_u:object_r:default_t:s0\n",
        0o644,
    );
    // The double: lists what it would label among the late writes.
    write(
        &new,
        "usr/sbin/setfiles",
        "#!/bin/sh\nfor a in \"$@\"; do last=$a; done\nif [ \"$last\" = /boot ]; then ls /boot/a /boot/grub > /setfiles-saw-boot 2>&1; else ls /etc/NetworkManager/system-connections /etc/dualroot/keyring > /setfiles-saw 2>&1; fi\nexit 0\n",
        0o755,
    );
    write(
        &new,
        "usr/lib/dualroot/hooks.d/10-network",
        "#!/bin/sh\nmkdir -p /etc/NetworkManager/system-connections\necho '[connection]' > /etc/NetworkManager/system-connections/eth0.nmconnection\n",
        0o755,
    );
    let keys = d.path().join("keys");
    write(&keys, "vendor.pub", "ed25519 key\n", 0o644);
    let old = d.path().join("old");
    std::fs::create_dir_all(&old).unwrap();

    let note = dualroot::sync::finish_new_root(
        &new,
        Some(&keys),
        Path::new("/usr/lib/dualroot/hooks.d"),
        &old,
    )
    .unwrap();
    assert!(note.contains("labelled"), "{note}");
    let saw = std::fs::read_to_string(new.join("setfiles-saw")).unwrap();
    assert!(
        saw.contains("eth0.nmconnection"),
        "setfiles ran before the hook wrote its keyfile: {saw}"
    );
    assert!(
        saw.contains("vendor.pub"),
        "setfiles ran before the keyring was copied: {saw}"
    );

    // /boot, written by the migration from an initramfs with no policy, is
    // labelled by the new root's setfiles with /boot bound in.
    let boot = d.path().join("boot");
    write(&boot, "a/vmlinuz", "kernel", 0o644);
    write(&boot, "grub/grubenv", "# GRUB Environment Block\n", 0o644);
    std::fs::create_dir_all(new.join("boot")).unwrap();
    let note = dualroot::selinux::label_boot(&new, &boot).unwrap();
    assert!(note.contains("/boot was labelled"), "{note}");
    let saw = std::fs::read_to_string(new.join("setfiles-saw-boot")).unwrap();
    assert!(
        saw.contains("vmlinuz") && saw.contains("grubenv"),
        "setfiles saw /boot's files: {saw}"
    );
}
