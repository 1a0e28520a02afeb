//! Bad input: each bundle below must be refused with an error that names the
//! problem, and the target directory must be left empty (nothing written outside it
//! either). Bundles are crafted byte by byte with the library's own key and outer
//! format code, so every defect is exactly the one the test names.

mod common;
use common::*;
use dualroot::bundle::manifest::{CpuLevel, Manifest, Payload, PAYLOAD_NAME};
use dualroot::bundle::outer;
use dualroot::keys;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One raw ustar entry; the name is written as given (no sanitising).
fn raw_entry(name: &str, kind: u8, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"14000000000\0");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut v = h.to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

fn tar_of(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut v: Vec<u8> = entries.concat();
    v.extend_from_slice(&[0u8; 1024]);
    v
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn manifest_for(payload: &[u8], uncompressed: u64, entries: u64, key_id: &str) -> Manifest {
    Manifest {
        format: 1,
        os_id: "testos".into(),
        version: "1.0".into(),
        model: "any".into(),
        requires_cpu: CpuLevel::V2,
        created_unix: 1_700_000_000,
        key_id: key_id.into(),
        payload: Payload {
            name: PAYLOAD_NAME.into(),
            compression: "xz".into(),
            sha256: hex::encode(Sha256::digest(payload)),
            compressed_size: payload.len() as u64,
            uncompressed_size: uncompressed,
            entries,
        },
    }
}

/// Writes a bundle from its three parts, exactly as given.
fn assemble(path: &Path, manifest: &[u8], sig: Option<&[u8]>, payload: &[u8]) {
    let mut v = Vec::new();
    outer::write_member(&mut v, "manifest.toml", manifest, 0).unwrap();
    if let Some(sig) = sig {
        outer::write_member(&mut v, "manifest.sig", sig, 0).unwrap();
    }
    outer::write_member(&mut v, PAYLOAD_NAME, payload, 0).unwrap();
    outer::write_end(&mut v).unwrap();
    fs::write(path, v).unwrap();
}

struct Case {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    keys: Keys,
    bundle: PathBuf,
    target: PathBuf,
}

fn case() -> Case {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let keys = keys(&dir, "vendor");
    let target = dir.join("target");
    fs::create_dir(&target).unwrap();
    Case {
        bundle: dir.join("b.bundle"),
        target,
        dir,
        keys,
        _tmp: tmp,
    }
}

impl Case {
    fn secret(&self) -> ed25519_dalek::SigningKey {
        keys::load_secret(&self.keys.secret).unwrap()
    }

    /// A properly signed bundle of `tar`, after `edit` had its say on the manifest.
    fn signed(&self, tar: &[u8], edit: impl FnOnce(&mut Manifest)) {
        let k = self.secret();
        let payload = xz(tar);
        let entries = count_entries(tar);
        let mut m = manifest_for(
            &payload,
            tar.len() as u64,
            entries,
            &keys::key_id(&k.verifying_key()),
        );
        edit(&mut m);
        let text = m.to_toml();
        assemble(
            &self.bundle,
            text.as_bytes(),
            Some(&keys::sign(&k, text.as_bytes())),
            &payload,
        );
    }

    /// Runs unpack, expects failure mentioning every `needles`, and an empty target.
    fn refused(&self, needles: &[&str]) -> String {
        let out = run(dualroot()
            .args(["bundle", "unpack"])
            .arg(&self.bundle)
            .arg(&self.target)
            .arg("--keyring")
            .arg(&self.keys.keyring));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "unpack succeeded but should have been refused"
        );
        for n in needles {
            assert!(err.contains(n), "error does not mention {n:?}:\n{err}");
        }
        let left: Vec<_> = fs::read_dir(&self.target)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "target not left empty: {left:?}");
        println!("refused as expected: {}", err.lines().last().unwrap_or(""));
        err
    }
}

fn count_entries(tar: &[u8]) -> u64 {
    let mut a = tar::Archive::new(tar);
    a.entries().map(|es| es.count() as u64).unwrap_or(0)
}

/// Incompressible bytes, so the payload is large and offsets near its end are inside it.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

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
