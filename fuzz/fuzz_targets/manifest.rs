//! The bundle manifest parser: never panics; what it accepts serializes back to
//! itself.
#![no_main]
use dualroot::bundle::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        let again = Manifest::parse(m.to_toml().as_bytes()).expect("a parsed manifest re-parses");
        assert_eq!(again, m);
    }
});
