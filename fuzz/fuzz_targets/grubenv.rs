//! grubenv parsing; what parses renders back and parses to the same variables
//! (GRUB's escaping: a backslash before a backslash or a newline in a value).
//! fuzz/regressions/grubenv/ holds the input that found the old `lines()`-based
//! parser's divergences (`\r`, `\\n`); `grub::tests` has it as a unit test.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(vars) = dualroot::grub::parse_env(data) {
        if let Ok(block) = dualroot::grub::render_env(&vars) {
            let again = dualroot::grub::parse_env(&block).expect("a rendered grubenv parses");
            assert_eq!(again, vars);
        }
    }
});
