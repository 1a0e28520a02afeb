//! What the `dualroot` binary prints for people, one function per report. (The
//! JSON forms are the reports themselves, serialized.)

use dualroot::bundle::{CreateReport, Manifest, UnpackReport};
use std::path::Path;

pub fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The report as JSON, or as text for people.
pub fn report<T: serde::Serialize>(
    as_json: bool,
    v: &T,
    text: impl FnOnce(),
) -> anyhow::Result<()> {
    if as_json {
        json(v)
    } else {
        text();
        Ok(())
    }
}

pub fn created(out: &Path, r: &CreateReport, m: &Manifest) {
    println!(
        "bundle {}: {} {} ({} entries, {} excluded, {} sockets skipped), payload {} bytes xz of {} bytes, sha256 {}",
        out.display(),
        m.os_id,
        m.version,
        r.entries,
        r.excluded,
        r.skipped_sockets.len(),
        m.payload.compressed_size,
        m.payload.uncompressed_size,
        m.payload.sha256
    );
}

pub fn manifest(bytes: &[u8]) {
    print!("{}", String::from_utf8_lossy(bytes));
    println!("# signature: not checked (use `dualroot bundle verify --keyring DIR`)");
}

pub fn verified(path: &Path, m: &Manifest) {
    println!(
        "OK: {} is {} {} signed by trusted key {}; payload sha256 {} matches",
        path.display(),
        m.os_id,
        m.version,
        m.key_id,
        m.payload.sha256
    );
}

pub fn unpacked(target: &Path, r: &UnpackReport) {
    println!(
        "unpacked {} entries ({:.1} MB) into {} in {:.2} s",
        r.entries,
        r.bytes_written as f64 / 1e6,
        target.display(),
        r.seconds
    );
}

pub fn installed(r: &dualroot::slot::install::InstallReport) {
    println!(
        "slot {} (LV {}) installed: {} {}, {} entries in {:.0} s; {}",
        r.slot, r.lv, r.os_id, r.version, r.entries, r.seconds, r.next
    );
}

pub fn key(secret: &Path, public: &Path, id: &str) {
    println!(
        "secret key: {}\npublic key: {}\nkey id: {id}",
        secret.display(),
        public.display()
    );
}

pub fn line(s: &str) {
    println!("{}", s.trim_end());
}
