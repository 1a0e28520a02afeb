//! Tar entry handling: extraction into a scratch directory on tmpfs, with the
//! unpacker's containment rules. Nothing may appear next to the scratch directory.
//! scripts/fuzz.sh runs this target in a private mount namespace with / read-only.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn base() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let root = std::env::var_os("DUALROOT_FUZZ_SCRATCH")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/dev/shm"));
        let p = root.join(format!("dualroot-fuzz-unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    })
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let target = base.join("t");
    std::fs::create_dir(&target).unwrap();
    let _ = dualroot::bundle::unpack::extract_tar(data, &target, None);
    let names: Vec<_> = std::fs::read_dir(base)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        [std::ffi::OsString::from("t")],
        "something was written outside the target"
    );
    std::fs::remove_dir_all(&target).unwrap();
});
