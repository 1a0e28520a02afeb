//! The outer container (ustar, three members, end marker) and the unsigned
//! manifest read of `bundle inspect`, on a file in /dev/shm.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        PathBuf::from(format!(
            "/dev/shm/dualroot-fuzz-outer-{}.bundle",
            std::process::id()
        ))
    })
}

fuzz_target!(|data: &[u8]| {
    let p = scratch();
    std::fs::write(p, data).unwrap();
    if let Ok(b) = dualroot::bundle::open(p, None) {
        assert!(b.payload_offset + b.payload_stored_size <= data.len() as u64);
        assert_eq!(b.payload_stored_size, b.manifest.payload.compressed_size);
        assert!(!b.verified);
    }
    // The member-level reader on the bytes alone.
    let mut r = data;
    if dualroot::bundle::outer::read_small(&mut r, "manifest.toml", 64 * 1024).is_ok() {
        let _ = dualroot::bundle::outer::read_header(&mut r, "manifest.sig");
    }
});
