//! Issue 12 on real files: `stage` verifies a bundle before it replaces anything
//! staged earlier, replaces the stage keyring as a whole, and `plan check` (the
//! same room and payload rules as preflight and stage) refuses a bundle whose
//! payload has no kernel. No root needed.

mod common;

use common::*;
use dualroot::migrate::stage::stage_files;
use dualroot::plan::Plan;
use std::fs;
use std::path::Path;

/// A payload tar with the given regular files.
fn tree(files: &[(&str, &[u8])]) -> Vec<u8> {
    let entries: Vec<Vec<u8>> = files
        .iter()
        .map(|(n, d)| raw_entry(n, b'0', "", d))
        .collect();
    tar_of(&entries)
}

fn plan_for(bundle: &Path, keyring: &Path) -> Plan {
    Plan::parse(&format!(
        "[bundle]\npath = \"{}\"\nkeyring = \"{}\"\n",
        bundle.display(),
        keyring.display()
    ))
    .unwrap()
}

#[test]
fn a_damaged_bundle_leaves_the_earlier_staging_untouched() {
    let c = case();
    c.signed(&tree(&[("etc/hostname", b"appliance\n")]), |_| {});
    let stage = c.dir.join("stage");
    let plan = plan_for(&c.bundle, &c.keys.keyring);
    stage_files(&plan, &stage).unwrap().commit().unwrap();
    let good = fs::read(stage.join("os.bundle")).unwrap();

    // The same bundle with one payload byte flipped: signature fine, hash not.
    let mut bad = fs::read(&c.bundle).unwrap();
    let at = bad.len() - 2048;
    bad[at] ^= 0x01;
    let bad_path = c.dir.join("bad.bundle");
    fs::write(&bad_path, &bad).unwrap();
    let e = stage_files(&plan_for(&bad_path, &c.keys.keyring), &stage)
        .err()
        .expect("a damaged bundle is refused");
    let msg = format!("{e:#}");
    assert!(msg.contains("bad.bundle"), "{msg}");
    assert_eq!(
        fs::read(stage.join("os.bundle")).unwrap(),
        good,
        "the staged bundle was replaced by one that failed its check"
    );
    assert!(
        !stage.join(".os.bundle.new").exists(),
        "the failed copy was left behind"
    );
    // A good bundle whose staging is then refused (preflight) is not committed.
    let other = c.dir.join("other.bundle");
    c.signed(&tree(&[("etc/hostname", b"other\n")]), |_| {});
    fs::copy(&c.bundle, &other).unwrap();
    let checked = stage_files(&plan_for(&other, &c.keys.keyring), &stage).unwrap();
    assert!(checked.plan.bundle.path.ends_with(".os.bundle.new"));
    drop(checked);
    assert_eq!(fs::read(stage.join("os.bundle")).unwrap(), good);
    assert!(!stage.join(".os.bundle.new").exists());
}

#[test]
fn a_revoked_key_is_no_longer_trusted_after_staging_again() {
    let c = case();
    c.signed(&tree(&[("etc/hostname", b"appliance\n")]), |_| {});
    let other = keys(&c.dir, "revoked");
    fs::copy(
        other.keyring.join("revoked.pub"),
        c.keys.keyring.join("revoked.pub"),
    )
    .unwrap();
    let stage = c.dir.join("stage");
    let plan = plan_for(&c.bundle, &c.keys.keyring);
    stage_files(&plan, &stage).unwrap().commit().unwrap();
    assert!(stage.join("keyring/revoked.pub").exists());
    fs::remove_file(c.keys.keyring.join("revoked.pub")).unwrap();
    stage_files(&plan, &stage).unwrap().commit().unwrap();
    assert!(stage.join("keyring/vendor.pub").exists());
    assert!(
        !stage.join("keyring/revoked.pub").exists(),
        "a key removed from the source keyring stayed trusted by the next migration"
    );
}

#[test]
fn plan_check_refuses_a_payload_without_a_kernel() {
    let c = case();
    let plan = c.dir.join("plan.toml");
    fs::write(
        &plan,
        "[bundle]\npath = \"/var/lib/dualroot/stage/os.bundle\"\nkeyring = \"/etc/dualroot/keyring\"\n",
    )
    .unwrap();
    let check = |bundle: &Path| {
        run(dualroot()
            .args(["plan", "check", "--plan"])
            .arg(&plan)
            .arg("--bundle")
            .arg(bundle)
            .arg("--keyring")
            .arg(&c.keys.keyring)
            .args(["--disk-size", "8G"]))
    };
    c.signed(&tree(&[("etc/hostname", b"appliance\n")]), |_| {});
    let out = check(&c.bundle);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("the payload has no kernel"), "{text}");

    let kernel = vec![7u8; 4096];
    let initrd = vec![9u8; 8192];
    // A kernel and its initramfs, but no tool to rebuild the initramfs for the
    // appliance (it was made on the build machine): refused too.
    c.signed(
        &tree(&[
            ("boot/vmlinuz-6.1.0-9-amd64", &kernel),
            ("boot/initrd.img-6.1.0-9-amd64", &initrd),
            ("etc/hostname", b"appliance\n"),
        ]),
        |_| {},
    );
    let out = check(&c.bundle);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("neither usr/sbin/update-initramfs nor dracut"),
        "{text}"
    );

    c.signed(
        &tree(&[
            ("boot/vmlinuz-6.1.0-9-amd64", &kernel),
            ("boot/initrd.img-6.1.0-9-amd64", &initrd),
            ("usr/bin/dracut", b"#!/bin/bash\n"),
            ("etc/hostname", b"appliance\n"),
        ]),
        |_| {},
    );
    let out = check(&c.bundle);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("the plan would pass"), "{text}");
}
