//! The strict payload tar reader alone: never panics, never hands out an entry that
//! breaks its own rules, never reads more data than an entry declares.
#![no_main]
use dualroot::bundle::tarstream::{Kind, TarReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut t = TarReader::new(data);
    let mut buf = [0u8; 4096];
    loop {
        match t.next_entry() {
            Ok(Some(h)) => {
                assert!(!h.name.is_empty());
                assert!(h.kind == Kind::Dir || !h.name.ends_with(b"/"));
                assert!(h.kind == Kind::File || h.size == 0);
                assert!(h.mode <= 0o7777);
                assert!(h.mtime_nsec < 1_000_000_000);
                let mut total = 0u64;
                loop {
                    match t.read_data(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => break,
                    }
                }
                assert!(total <= h.size);
            }
            Ok(None) => {
                let _ = t.finish();
                break;
            }
            Err(_) => break,
        }
    }
});
