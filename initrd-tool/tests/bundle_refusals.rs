//! Bad input: each bundle below must be refused with an error that names the
//! problem, and the target directory must be left empty (nothing written outside it
//! either). Bundles are crafted byte by byte with the library's own key and outer
//! format code, so every defect is exactly the one the test names.

mod common;
use common::*;
use dualroot::keys;
use std::fs;

fn good_tar() -> Vec<u8> {
    tar_of(&[
        raw_entry("etc/", b'5', "", b""),
        raw_entry("etc/hostname", b'0', "", b"appliance\n"),
        raw_entry("usr/", b'5', "", b""),
        raw_entry("usr/data", b'0', "", &noise(200_000)),
    ])
}

#[test]
fn a_good_crafted_bundle_unpacks() {
    // The control: the crafting helpers make bundles dualroot accepts.
    let c = case();
    c.signed(&good_tar(), |_| {});
    run_ok(
        dualroot()
            .args(["bundle", "unpack"])
            .arg(&c.bundle)
            .arg(&c.target)
            .arg("--keyring")
            .arg(&c.keys.keyring),
    );
    assert_eq!(
        fs::read(c.target.join("etc/hostname")).unwrap(),
        b"appliance\n"
    );
}

#[test]
fn unsigned() {
    let c = case();
    let payload = xz(&good_tar());
    let m = manifest_for(&payload, 0, 4, "0011223344556677").to_toml();
    assemble(&c.bundle, m.as_bytes(), None, &payload);
    c.refused(&["unsigned", "manifest.sig"]);
}

#[test]
fn empty_signature() {
    let c = case();
    let payload = xz(&good_tar());
    let m = manifest_for(&payload, 0, 4, "0011223344556677").to_toml();
    assemble(&c.bundle, m.as_bytes(), Some(b""), &payload);
    c.refused(&["unsigned", "empty"]);
}

#[test]
fn wrong_key() {
    let c = case();
    let other = keys(&c.dir, "intruder");
    let k = keys::load_secret(&other.secret).unwrap();
    let payload = xz(&good_tar());
    let text = manifest_for(&payload, 0, 4, &keys::key_id(&k.verifying_key())).to_toml();
    assemble(
        &c.bundle,
        text.as_bytes(),
        Some(&keys::sign(&k, text.as_bytes())),
        &payload,
    );
    c.refused(&["signed by key", "not in keyring"]);
}

#[test]
fn wrong_key_claiming_trusted_id() {
    // Signed by another key but naming the trusted key's id.
    let c = case();
    let other = keys(&c.dir, "intruder");
    let k = keys::load_secret(&other.secret).unwrap();
    let payload = xz(&good_tar());
    let trusted_id = keys::key_id(&c.secret().verifying_key());
    let text = manifest_for(&payload, 0, 4, &trusted_id).to_toml();
    assemble(
        &c.bundle,
        text.as_bytes(),
        Some(&keys::sign(&k, text.as_bytes())),
        &payload,
    );
    c.refused(&["signature does not match"]);
}

#[test]
fn manifest_edited_after_signing() {
    let c = case();
    let k = c.secret();
    let payload = xz(&good_tar());
    let text = manifest_for(&payload, 0, 4, &keys::key_id(&k.verifying_key())).to_toml();
    let sig = keys::sign(&k, text.as_bytes());
    let edited = text.replace("version = \"1.0\"", "version = \"9.9\"");
    assert_ne!(edited, text);
    assemble(&c.bundle, edited.as_bytes(), Some(&sig), &payload);
    c.refused(&["signature does not match", "changed after signing"]);
}

#[test]
fn payload_truncated() {
    let c = case();
    c.signed(&good_tar(), |_| {});
    let data = fs::read(&c.bundle).unwrap();
    fs::write(&c.bundle, &data[..data.len() / 2]).unwrap();
    c.refused(&["truncated"]);
}

#[test]
fn payload_hash_mismatch() {
    let c = case();
    c.signed(&good_tar(), |m| m.payload.sha256 = "ab".repeat(32));
    c.refused(&["sha256 mismatch"]);
}

#[test]
fn payload_byte_flipped() {
    let c = case();
    c.signed(&good_tar(), |_| {});
    let mut data = fs::read(&c.bundle).unwrap();
    let at = data.len() / 2; // inside the payload's xz data (200 KB of noise)
    data[at] ^= 0x40;
    fs::write(&c.bundle, data).unwrap();
    c.refused(&["payload"]);
}

#[test]
fn verify_reports_hash_mismatch() {
    let c = case();
    c.signed(&good_tar(), |m| m.payload.sha256 = "cd".repeat(32));
    let out = run(dualroot()
        .args(["bundle", "verify"])
        .arg(&c.bundle)
        .arg("--keyring")
        .arg(&c.keys.keyring));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sha256 mismatch"), "{err}");
}

#[test]
fn garbage_outer_tar() {
    let c = case();
    let mut junk = Vec::new();
    for i in 0..8192u32 {
        junk.push((i.wrapping_mul(2654435761) >> 13) as u8);
    }
    fs::write(&c.bundle, junk).unwrap();
    c.refused(&["not a dualroot bundle"]);
}

#[test]
fn dotdot_entry() {
    let c = case();
    c.signed(
        &tar_of(&[
            raw_entry("etc/", b'5', "", b""),
            raw_entry("etc/../../escaped", b'0', "", b"x"),
        ]),
        |_| {},
    );
    c.refused(&["etc/../../escaped", "'..'"]);
    assert!(!c.dir.join("escaped").exists());
}

#[test]
fn absolute_entry() {
    let c = case();
    let outside = c.dir.join("abs-victim");
    let name = outside.display().to_string();
    c.signed(
        &tar_of(&[
            raw_entry("etc/", b'5', "", b""),
            raw_entry(&name, b'0', "", b"x"),
        ]),
        |_| {},
    );
    c.refused(&[&name, "absolute path refused"]);
    assert!(!outside.exists());
}

#[test]
fn symlink_then_file_escape() {
    let c = case();
    let outside = c.dir.join("outside");
    fs::create_dir(&outside).unwrap();
    let link = outside.display().to_string();
    c.signed(
        &tar_of(&[
            raw_entry("evil", b'2', &link, b""),
            raw_entry("evil/pwned", b'0', "", b"gotcha"),
        ]),
        |_| {},
    );
    c.refused(&["evil/pwned", "symlink evil"]);
    assert!(
        !outside.join("pwned").exists(),
        "a file was written outside the target"
    );
}

#[test]
fn file_over_planted_symlink_replaces_the_link() {
    // A symlink followed by a regular file of the same name must replace the link,
    // never write through it.
    let c = case();
    let victim = c.dir.join("victim");
    fs::write(&victim, b"original").unwrap();
    let link = victim.display().to_string();
    c.signed(
        &tar_of(&[
            raw_entry("f", b'2', &link, b""),
            raw_entry("f", b'0', "", b"new"),
        ]),
        |_| {},
    );
    run_ok(
        dualroot()
            .args(["bundle", "unpack"])
            .arg(&c.bundle)
            .arg(&c.target)
            .arg("--keyring")
            .arg(&c.keys.keyring),
    );
    assert_eq!(fs::read(&victim).unwrap(), b"original");
    assert_eq!(fs::read(c.target.join("f")).unwrap(), b"new");
}

#[test]
fn hardlink_to_outside() {
    let c = case();
    c.signed(
        &tar_of(&[
            raw_entry("etc/", b'5', "", b""),
            raw_entry("etc/shadow", b'1', "../../../etc/shadow", b""),
        ]),
        |_| {},
    );
    c.refused(&["etc/shadow", "hardlink target", "'..'"]);
}

#[test]
fn hardlink_to_absolute_path() {
    let c = case();
    c.signed(
        &tar_of(&[raw_entry("passwd", b'1', "/etc/passwd", b"")]),
        |_| {},
    );
    c.refused(&["passwd", "hardlink target", "absolute"]);
}

#[test]
fn oversized_manifest() {
    let c = case();
    let payload = xz(&good_tar());
    let mut text = manifest_for(&payload, 0, 4, "0011223344556677").to_toml();
    text.push_str(&format!("# {}\n", "x".repeat(100_000)));
    assemble(&c.bundle, text.as_bytes(), Some(&[0u8; 64]), &payload);
    c.refused(&["manifest.toml is", "limit"]);
}

#[test]
fn unknown_manifest_format_version() {
    let c = case();
    let k = c.secret();
    let payload = xz(&good_tar());
    let text = manifest_for(&payload, 0, 4, &keys::key_id(&k.verifying_key()))
        .to_toml()
        .replace("format = 1", "format = 7");
    assemble(
        &c.bundle,
        text.as_bytes(),
        Some(&keys::sign(&k, text.as_bytes())),
        &payload,
    );
    c.refused(&["unknown manifest format version 7"]);
}

#[test]
fn entry_count_mismatch() {
    let c = case();
    c.signed(&good_tar(), |m| m.payload.entries += 1);
    c.refused(&["entries", "manifest says 5"]);
}

#[test]
fn target_not_empty_is_untouched() {
    let c = case();
    c.signed(&good_tar(), |_| {});
    fs::write(c.target.join("precious"), b"keep me").unwrap();
    let out = run(dualroot()
        .args(["bundle", "unpack"])
        .arg(&c.bundle)
        .arg(&c.target)
        .arg("--keyring")
        .arg(&c.keys.keyring));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not empty")
            && err.contains("precious")
            && err.contains("nothing was written"),
        "{err}"
    );
    assert_eq!(fs::read(c.target.join("precious")).unwrap(), b"keep me");
    assert_eq!(fs::read_dir(&c.target).unwrap().count(), 1);
}
