//! dualroot's lvm calls run under its own configuration, whatever `lvm.conf` the
//! appliance or its initramfs left (issue 21 item 1). Real `lvm` on a loop
//! device (PV and VG metadata need no device-mapper, which this host lacks):
//! under each captured configuration in `fixtures/lvm-conf/` a plain `lvm` call
//! fails or misbehaves the way the field saw, and `dualroot::blockdev::Lvm`
//! creates the PV and VG, reports them, and gives the VG no system ID.
//! Needs root (losetup).

mod common;

use dualroot::blockdev::Lvm;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/lvm-conf")
}

struct LoopDev {
    dev: String,
}

impl LoopDev {
    fn new(img: &Path) -> LoopDev {
        std::fs::File::create(img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let out = common::run_ok(Command::new("losetup").args(["-f", "--show"]).arg(img));
        LoopDev {
            dev: out.trim().to_string(),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A directory that stands for the appliance's `/etc/lvm`.
fn system_dir(root: &Path, conf: &str, devices: Option<&str>) -> PathBuf {
    let d = root.join(conf.trim_end_matches(".conf"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(fixtures().join(conf), d.join("lvm.conf")).unwrap();
    if let Some(dir) = devices {
        std::fs::create_dir_all(d.join("devices")).unwrap();
        std::fs::copy(
            fixtures().join(dir).join("system.devices"),
            d.join("devices/system.devices"),
        )
        .unwrap();
    }
    d
}

/// `lvm` as the appliance would run it: its configuration, no dualroot.
fn plain_lvm(system: &Path, args: &[&str]) -> Output {
    Command::new("lvm")
        .args(args)
        .env("LVM_SYSTEM_DIR", system)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap()
}

enum Control {
    /// A plain `pvcreate` of the device fails, with this in its stderr.
    PvcreateFails(&'static str),
    /// A plain `vgs` does not see the VG dualroot made.
    VgInvisible,
    /// A plain `vgcreate` gives the VG a system ID.
    VgGetsSystemId,
    /// Nothing hostile: the plain call works too.
    Harmless,
}

#[test]
fn dualroot_lvm_works_under_every_captured_lvm_conf() {
    common::require_root();
    let tmp = tempfile::tempdir().unwrap();
    // The appliance's configuration is set in the environment too: dualroot's
    // calls must not take it from there either.
    let cases: [(&str, Option<&str>, Control); 7] = [
        (
            "dracut033-scan.conf",
            None,
            Control::PvcreateFails("--readonly"),
        ),
        (
            "dracut051-scan.conf",
            None,
            Control::PvcreateFails("--readonly"),
        ),
        (
            "el7-hostonly.conf",
            None,
            Control::PvcreateFails("--readonly"),
        ),
        (
            "el9-devicesfile.conf",
            Some("el9-devices"),
            Control::VgInvisible,
        ),
        ("global-filter.conf", None, Control::PvcreateFails("filter")),
        ("system-id.conf", None, Control::VgGetsSystemId),
        ("debian12.conf", None, Control::Harmless),
    ];
    for (i, (conf, devices, control)) in cases.into_iter().enumerate() {
        let system = system_dir(tmp.path(), conf, devices);
        let dev = LoopDev::new(&tmp.path().join(format!("pv{i}.img")));
        let vg = format!("drtest{}x{i}", std::process::id());
        let lvm = Lvm {
            only: Some(PathBuf::from(&dev.dev)),
        };
        // SAFETY of the environment: this test file has one test, so no other
        // thread reads the environment while it changes.
        std::env::set_var("LVM_SYSTEM_DIR", &system);

        if let Control::PvcreateFails(why) = control {
            let out = plain_lvm(&system, &["pvcreate", "-y", &dev.dev]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains(why),
                "{conf}: a plain pvcreate should fail ({why}), got {:?}: {err}",
                out.status
            );
        }

        lvm.run(&["pvcreate", "-ff", "-y", "--zero", "y", &dev.dev])
            .unwrap_or_else(|e| panic!("{conf}: dualroot's pvcreate: {e:#}"));
        lvm.run(&["vgcreate", "-y", &vg, &dev.dev])
            .unwrap_or_else(|e| panic!("{conf}: dualroot's vgcreate: {e:#}"));
        let rows = lvm
            .report(&["vgs", "-o", "vg_name,vg_systemid", &vg], "vg")
            .unwrap_or_else(|e| panic!("{conf}: dualroot's vgs: {e:#}"));
        assert_eq!(rows.len(), 1, "{conf}: {rows:?}");
        assert_eq!(rows[0]["vg_name"], vg);
        assert_eq!(
            rows[0].get("vg_systemid").map(String::as_str).unwrap_or(""),
            "",
            "{conf}: the new VG must carry no system ID"
        );

        match control {
            Control::VgInvisible => {
                let out = plain_lvm(&system, &["vgs", &vg]);
                assert!(
                    !out.status.success(),
                    "{conf}: a plain vgs should not see {vg} (the devices file names another PV)"
                );
            }
            Control::VgGetsSystemId => {
                let out = plain_lvm(&system, &["vgs", "--noheadings", "-o", "vg_systemid", &vg]);
                // Made by dualroot: no system ID, so the appliance's lvm sees it too.
                assert!(out.status.success(), "{conf}: {out:?}");
                lvm.run(&["vgremove", "-ff", "-y", &vg]).unwrap();
                let out = plain_lvm(&system, &["vgcreate", "-y", &vg, &dev.dev]);
                assert!(out.status.success(), "{conf}: {out:?}");
                let out = plain_lvm(&system, &["vgs", "--noheadings", "-o", "vg_systemid", &vg]);
                assert!(
                    !String::from_utf8_lossy(&out.stdout).trim().is_empty(),
                    "{conf}: a plain vgcreate should stamp a system ID: {out:?}"
                );
            }
            Control::Harmless => {
                let out = plain_lvm(&system, &["vgs", &vg]);
                assert!(out.status.success(), "{conf}: {out:?}");
            }
            Control::PvcreateFails(_) => {}
        }
        let _ = lvm.run(&["vgremove", "-ff", "-y", &vg]);
        let _ = lvm.run(&["pvremove", "-ff", "-y", &dev.dev]);
        std::env::remove_var("LVM_SYSTEM_DIR");
    }
}
