//! The undo record puts an old filesystem back after the window's real writes
//! (issue 22): a disk image holds an old ext4 root spanning the disk, as the
//! single-partition appliance has; the record of `Layout::undo_regions` is
//! taken; then the window's writes happen for real (dualroot's GPT writer,
//! mkfs.ext4 of the new /boot and of the data LV's region, the PV label); after
//! `undo::restore` the old filesystem is clean under `e2fsck -fn` and every file
//! reads back as it was. Without the restore the same check fails, so the test
//! can fail. Needs root (losetup for e2fsck and mount).

mod common;

use dualroot::layout;
use dualroot::plan::{ByteSizes, MIB};
use std::path::Path;
use std::process::Command;

const DISK: u64 = 256 * MIB;
const OLD_FS_START: u64 = MIB;

fn sizes() -> ByteSizes {
    ByteSizes {
        boot: 32 * MIB,
        root: 48 * MIB,
        back: 48 * MIB,
        data: 32 * MIB,
        image: 8 * MIB,
        slot_reserve: None,
        esp: 0,
    }
}

/// Deterministic incompressible-looking bytes (xorshift), distinct per file.
fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The old root's tree: enough data that the old filesystem has files where
/// the new /boot and the data LV go.
fn old_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/fstab"), "/dev/vda1 / ext4 defaults 0 1\n").unwrap();
    for i in 0..180u64 {
        let sub = dir.join(format!("d{}", i % 7));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("f{i}")), fill(i, 1_000_000)).unwrap();
    }
}

fn losetup(img: &Path, offset: u64, size: u64) -> String {
    common::run_ok(
        Command::new("losetup")
            .args(["-f", "--show", "-o", &offset.to_string()])
            .args(["--sizelimit", &size.to_string()])
            .arg(img),
    )
    .trim()
    .to_string()
}

fn detach(dev: &str) {
    let _ = Command::new("losetup").args(["-d", dev]).status();
}

/// `e2fsck -fn` on the old root: true when clean.
fn old_fs_clean(img: &Path) -> bool {
    let dev = losetup(img, OLD_FS_START, DISK - 2 * MIB);
    let ok = Command::new("e2fsck")
        .args(["-fn", &dev])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    detach(&dev);
    ok
}

/// Every file of `src` reads back the same from the old root.
fn old_files_equal(img: &Path, src: &Path, mnt: &Path) -> Result<(), String> {
    let dev = losetup(img, OLD_FS_START, DISK - 2 * MIB);
    std::fs::create_dir_all(mnt).unwrap();
    let st = Command::new("mount")
        .args(["-o", "ro", &dev])
        .arg(mnt)
        .status()
        .unwrap();
    if !st.success() {
        detach(&dev);
        return Err("the old root does not mount".into());
    }
    let mut res = Ok(());
    for e in walkdir::WalkDir::new(src) {
        let e = e.unwrap();
        if !e.file_type().is_file() {
            continue;
        }
        let rel = e.path().strip_prefix(src).unwrap();
        if std::fs::read(e.path()).ok() != std::fs::read(mnt.join(rel)).ok() {
            res = Err(format!("{} differs", rel.display()));
            break;
        }
    }
    let _ = Command::new("umount").arg(mnt).status();
    detach(&dev);
    res
}

fn mkfs_at(img: &Path, offset: u64, size: u64, label: &str) {
    common::run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", label, "-E"])
            .arg(format!("offset={offset}"))
            .arg(img)
            .arg(format!("{}k", size / 1024)),
    );
}

/// The window's writes, as the migration makes them.
fn window_writes(img: &Path, l: &layout::Layout) {
    l.write_gpt(img).unwrap();
    mkfs_at(img, l.boot.start, l.boot.size, "boot");
    // pvcreate: label and metadata at the PV's start.
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &fill(99, MIB as usize), l.pv.start).unwrap();
    mkfs_at(img, l.data_lv_offset(), l.lvs[2].1, "data");
    // The stash: the bundle fills the data LV's filesystem.
    std::os::unix::fs::FileExt::write_all_at(
        &f,
        &fill(98, 20 * MIB as usize),
        l.data_lv_offset() + 8 * MIB,
    )
    .unwrap();
    f.sync_all().unwrap();
}

#[test]
fn the_undo_record_puts_an_old_root_back_after_the_windows_writes() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let src = d.path().join("old-root");
    old_tree(&src);
    std::fs::File::create(&img).unwrap().set_len(DISK).unwrap();
    // The old root spans the disk from 1 MiB, as a single-partition appliance.
    common::run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "oldroot", "-d"])
            .arg(&src)
            .args(["-E", &format!("offset={OLD_FS_START}")])
            .arg(&img)
            .arg(format!("{}k", (DISK - 2 * MIB) / 1024)),
    );
    // The old boot sector: boot code and the 0x55AA signature.
    let mut mbr = fill(7, 510);
    mbr.extend_from_slice(&[0x55, 0xAA]);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &mbr, 0).unwrap();
    drop(f);
    assert!(old_fs_clean(&img), "the old root is clean to begin with");
    let l = layout::compute(DISK, &sizes()).unwrap();
    let regions = l.undo_regions(DISK, &[]);
    let rec = dualroot::undo::take(&img, &regions, &d.path().join("record")).unwrap();
    println!("undo record: {} MiB: {}", rec.bytes() / MIB, rec.describe());

    // Control: the same writes without the undo leave the old root damaged.
    let control = d.path().join("control.img");
    std::fs::copy(&img, &control).unwrap();
    window_writes(&control, &l);
    assert!(
        !old_fs_clean(&control) || old_files_equal(&control, &src, &d.path().join("m0")).is_err(),
        "the window's writes damage the old root (else this test proves nothing)"
    );

    window_writes(&img, &l);
    dualroot::undo::restore(&rec, &d.path().join("record")).unwrap();
    dualroot::undo::check_boot_sector(&rec, &d.path().join("record")).unwrap();
    let mut on_control = rec.clone();
    on_control.disk = control.clone();
    assert!(
        dualroot::undo::check_boot_sector(&on_control, &d.path().join("record")).is_err(),
        "the GPT's protective MBR is not the old boot sector"
    );
    assert!(
        old_fs_clean(&img),
        "e2fsck -fn finds the old root clean after the undo"
    );
    old_files_equal(&img, &src, &d.path().join("m1")).unwrap();
}
