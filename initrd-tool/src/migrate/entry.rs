//! Entry points of `dualroot migrate`: the first boot (`rd.dualroot.migrate`) and a
//! resume (`rd.dualroot.resume`).

use super::journal::Journal;
use super::stage::carry_kernel_args;
use super::{drive, log, Ctx, Failpoints, Paths, EXIT_DONE, EXIT_REFUSED, EXIT_RETRY};
use crate::cmd::{cmd, CommandExt};
use crate::mounts::Mount;
use crate::plan::Plan;
use anyhow::{Context, Result};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub fn cmdline() -> String {
    fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

/// `root=` spellings → a device path (udev's /dev/disk/by-* links).
pub fn resolve_root(spec: &str) -> PathBuf {
    let spec = spec.strip_prefix("block:").unwrap_or(spec);
    for (prefix, dir) in [
        ("UUID=", "by-uuid"),
        ("LABEL=", "by-label"),
        ("PARTUUID=", "by-partuuid"),
        ("PARTLABEL=", "by-partlabel"),
    ] {
        if let Some(v) = spec.strip_prefix(prefix) {
            return PathBuf::from(format!("/dev/disk/{dir}/{v}"));
        }
    }
    PathBuf::from(spec)
}

fn ctx_base(plan: Plan, disk: PathBuf, journal: Journal) -> Ctx {
    Ctx {
        plan,
        paths: Paths {
            run: std::env::var("DUALROOT_RUN")
                .map(PathBuf::from)
                .unwrap_or_else(|_| "/run/dualroot".into()),
        },
        disk,
        journal,
        failpoints: Failpoints::from_env_and_cmdline(&cmdline()),
        old_mount: None,
        ram_mount: None,
        data_mount: None,
        boot_mount: None,
        proc: "/proc".into(),
        sys: "/sys".into(),
    }
}

/// First boot: mount the old root, load the plan from it, run from preflight.
pub fn first(plan_rel: &Path, root_device: Option<&Path>) -> u8 {
    match first_inner(plan_rel, root_device) {
        Ok(code) => code,
        Err(e) => {
            log(&format!("migration could not start: {e:#}\nNothing was changed; rebooting into the old system."));
            EXIT_REFUSED
        }
    }
}

fn first_inner(plan_rel: &Path, root_device: Option<&Path>) -> Result<u8> {
    let cl = cmdline();
    let dev = match root_device {
        Some(d) => d.to_path_buf(),
        None => resolve_root(
            cl.split_whitespace()
                .find_map(|w| w.strip_prefix("root="))
                .context("no root= on the kernel command line")?,
        ),
    };
    let run = std::env::var("DUALROOT_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| "/run/dualroot".into());
    let old = run.join("old");
    fs::create_dir_all(&old)?;
    // The old root may be ext4 or xfs: let mount(8) detect it.
    cmd("mount", [dev.as_os_str(), old.as_os_str()])
        .run()
        .with_context(|| format!("mounting the old root {}", dev.display()))?;
    let old_mount = Mount::adopt(&old);
    let plan_path = old.join(plan_rel.strip_prefix("/").unwrap_or(plan_rel));
    let plan = Plan::load(&plan_path)?;
    let disk = if plan.disk == "auto" {
        let rdev = fs::metadata(&dev)
            .with_context(|| format!("stat {}", dev.display()))?
            .rdev();
        crate::sysinfo::disk_of(
            Path::new("/sys"),
            nix::sys::stat::major(rdev) as u32,
            nix::sys::stat::minor(rdev) as u32,
        )?
    } else {
        PathBuf::from(&plan.disk)
    };
    log(&format!(
        "migrating {} (old root {}) with plan {}",
        disk.display(),
        dev.display(),
        plan_rel.display()
    ));
    let journal = Journal::new(
        &disk.display().to_string(),
        &plan.vg,
        &carry_kernel_args(&cl),
    );
    let mut ctx = ctx_base(plan, disk, journal);
    ctx.old_mount = Some(old_mount);
    Ok(finish(&mut ctx))
}

/// Resume after a power cut or a failed step: everything comes from the stash.
pub fn resume(vg: Option<&str>) -> u8 {
    match resume_inner(vg) {
        Ok(code) => code,
        Err(e) => {
            log(&format!("cannot resume the migration: {e:#}\nRebooting to try again from the recovery entry."));
            EXIT_RETRY
        }
    }
}

fn resume_inner(vg: Option<&str>) -> Result<u8> {
    let cl = cmdline();
    let vg = vg
        .map(str::to_string)
        .or_else(|| {
            cl.split_whitespace()
                .find_map(|w| w.strip_prefix("rd.lvm.vg="))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "VA".into());
    let _ = cmd("lvm", ["vgchange", "-ay", &vg]).run();
    let _ = cmd("udevadm", ["settle", "--timeout=10"]).run();
    let run = std::env::var("DUALROOT_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| "/run/dualroot".into());
    let data = Mount::ext4(Path::new(&format!("/dev/{vg}/data")), &run.join("data"))?;
    let stash = run.join("data/dualroot/migration");
    let journal = Journal::load(&stash.join("journal.json"))?;
    let plan = Plan::load(&stash.join("plan.toml"))?;
    let disk = PathBuf::from(&journal.disk);
    log(&format!(
        "resuming the migration of {} at step {}",
        disk.display(),
        journal
            .next_step()
            .map(|s| s.name())
            .unwrap_or("(none: done)")
    ));
    let mut ctx = ctx_base(plan, disk, journal);
    ctx.data_mount = Some(data);
    Ok(finish(&mut ctx))
}

fn finish(ctx: &mut Ctx) -> u8 {
    let code = drive(ctx);
    for m in [
        ctx.boot_mount.take(),
        ctx.data_mount.take(),
        ctx.ram_mount.take(),
        ctx.old_mount.take(),
    ]
    .into_iter()
    .flatten()
    {
        let t = m.target.clone();
        if let Err(e) = m.unmount() {
            log(&format!("unmounting {}: {e:#}", t.display()));
        }
    }
    nix::unistd::sync();
    if code == EXIT_DONE {
        log("rebooting into the new system");
    }
    code
}
