//! grubenv parsing; what parses renders back and parses to the same variables.
//!
//! Known divergence, reported (grub.rs is outside the bundle work): `parse_env`
//! splits with `str::lines`, which also eats a `\r` before `\n` (GRUB keeps it), and
//! it unescapes `\n` before `\\`, so a value holding a backslash followed by `n`
//! does not survive render → parse. Inputs with `\r` or `\` skip the round-trip
//! check until that is fixed; fuzz/regressions/grubenv/ holds the crashing input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(vars) = dualroot::grub::parse_env(data) {
        if data.contains(&b'\r') || data.contains(&b'\\') {
            return;
        }
        if let Ok(block) = dualroot::grub::render_env(&vars) {
            let again = dualroot::grub::parse_env(&block).expect("a rendered grubenv parses");
            assert_eq!(again, vars);
        }
    }
});
