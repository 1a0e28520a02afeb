//! The devices file sync writes, read by the real lvm2 (root: a PV on a loop
//! device; no device-mapper needed, nothing is activated).

mod common;

use common::{require_root, run_ok};
use dualroot::blockdev::Lvm;
use dualroot::lvm_devices::{fix_in_root, pv_rows, DEVICES_FILE};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A PV in a VG on a loop device; removed again on drop.
struct LoopPv {
    dev: String,
    vg: String,
}

impl LoopPv {
    fn lvm(&self) -> Lvm {
        Lvm {
            only: Some(PathBuf::from(&self.dev)),
        }
    }
}

impl Drop for LoopPv {
    fn drop(&mut self) {
        let _ = self.lvm().run(&["vgremove", "-f", &self.vg]);
        let _ = self.lvm().run(&["pvremove", "-f", &self.dev]);
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// The VGs lvm2 sees with `etc_lvm` as its configuration directory and the
/// devices file in use (what the new OS does at boot).
fn vgs_seen(etc_lvm: &Path) -> Vec<String> {
    let out = run_ok(
        Command::new("lvm")
            .args([
                "vgs",
                "-o",
                "vg_name",
                "--reportformat",
                "json",
                "--config",
                "devices { use_devicesfile = 1 }",
            ])
            .env("LVM_SYSTEM_DIR", etc_lvm)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1"),
    );
    dualroot::sysinfo::parse_lvm_report(&out, "vg")
        .unwrap()
        .into_iter()
        .filter_map(|r| r.get("vg_name").cloned())
        .collect()
}

#[test]
fn lvm_sees_the_vg_through_the_rewritten_devices_file() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("pv.img");
    fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
    let dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&img))
        .trim()
        .to_string();
    let pv = LoopPv {
        dev: dev.clone(),
        vg: format!("dualroottest{}", std::process::id()),
    };
    pv.lvm().run(&["pvcreate", "-q", &dev]).unwrap();
    pv.lvm().run(&["vgcreate", "-q", &pv.vg, &dev]).unwrap();

    // The new root as the bundle ships it: the build machine's devices file.
    let new = d.path().join("new");
    let file = new.join(DEVICES_FILE);
    fs::create_dir_all(file.parent().unwrap()).unwrap();
    fs::write(
        &file,
        "# LVM uses devices listed in this file.\n# Created by LVM command vgimportdevices pid 1287 at Tue Mar  5 10:12:01 2024\nVERSION=1.1.7\nIDTYPE=sys_wwid IDNAME=naa.6000c2912f1c3b5a9d2e8f7a6b5c4d3e DEVNAME=/dev/sda3 PVID=Zq3xYb8mN2pL5kR7tV9wC1dF4gH6jK0s PART=3\n",
    )
    .unwrap();
    let etc_lvm = new.join("etc/lvm");
    assert!(
        !vgs_seen(&etc_lvm).contains(&pv.vg),
        "the foreign devices file should hide the VG (the bug)"
    );

    let note = fix_in_root(&new, &pv.vg, &|| pv_rows(&pv.lvm(), Path::new("/sys")))
        .unwrap()
        .unwrap();
    assert!(note.contains(&format!("now lists {dev}")), "{note}");
    assert!(
        vgs_seen(&etc_lvm).contains(&pv.vg),
        "lvm does not see {} through {}:\n{}",
        pv.vg,
        file.display(),
        fs::read_to_string(&file).unwrap()
    );
}
