//! The step functions. Each is idempotent: a resume re-runs the interrupted one.

use super::journal::Step;
use super::preflight::{self, Env};
use super::{log, now, Ctx, IDENTITY_FILES, OLD_RESULT_FILE};
use crate::bundle::{self, UnpackOptions};
use crate::cmd::{cmd, find_tool, run_with_input, CommandExt};
use crate::grub::{self, BootConfig};
use crate::keys::Keyring;
use crate::layout;
use crate::mounts::Mount;
use crate::plan::MIB;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub fn run_step(ctx: &mut Ctx, step: Step) -> Result<()> {
    match step {
        Step::Preflight => preflight_step(ctx),
        Step::StageRam => stage_ram(ctx),
        Step::Partition => partition(ctx),
        Step::Stash => stash(ctx),
        Step::Unpack => unpack(ctx),
        Step::Sync => super::sync::run(ctx),
        Step::Boot => boot(ctx),
        Step::Done => done(ctx),
    }
}

fn old_env(ctx: &Ctx) -> Env {
    let old = ctx.paths.old();
    Env {
        root: old.clone(),
        root_mount: old.display().to_string(),
        proc: ctx.proc.clone(),
        sys: ctx.sys.clone(),
        accounts_dry_run: false,
    }
}

fn preflight_step(ctx: &mut Ctx) -> Result<()> {
    let rep = preflight::run(&ctx.plan, &old_env(ctx));
    log(&rep.render());
    if !rep.ok() {
        bail!("{}", rep.blockers.join("; "));
    }
    ctx.journal.bundle_bytes = rep.memory.bundle;
    Ok(())
}

/// Leaves the reason for a refusal on the old root so the old system (and its
/// agent) can read it after the reboot.
pub fn leave_result_on_old_root(ctx: &Ctx, reason: &str) {
    if ctx.old_mount.is_none() {
        return;
    }
    let p = ctx.paths.old().join(OLD_RESULT_FILE);
    let body = serde_json::json!({
        "outcome": "refused",
        "reason": reason,
        "time_unix": now(),
        "journal": ctx.journal,
        "next": "the old system boots unchanged",
    });
    let res = p
        .parent()
        .map(fs::create_dir_all)
        .transpose()
        .map_err(anyhow::Error::from)
        .and_then(|_| grub::write_atomic(&p, serde_json::to_string_pretty(&body)?.as_bytes()));
    match res {
        Ok(()) => log(&format!(
            "reason written to {OLD_RESULT_FILE} on the old root"
        )),
        Err(e) => log(&format!(
            "could not write {OLD_RESULT_FILE} on the old root: {e:#}"
        )),
    }
}

/// Copies a file, hashing while copying; fsyncs the copy.
pub fn copy_hashed(src: &Path, dst: &Path) -> Result<String> {
    let mut r = fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut w = fs::File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = r
            .read(&mut buf)
            .with_context(|| format!("reading {}", src.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        w.write_all(&buf[..n])
            .with_context(|| format!("writing {}", dst.display()))?;
    }
    w.sync_all()
        .with_context(|| format!("syncing {}", dst.display()))?;
    Ok(hex::encode(h.finalize()))
}

pub fn file_sha256(path: &Path) -> Result<String> {
    let mut r = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = r
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

pub fn copy_dir_files(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst)?;
    for e in fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let e = e?;
        if e.file_type()?.is_file() {
            fs::copy(e.path(), dst.join(e.file_name()))
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

fn stage_ram(ctx: &mut Ctx) -> Result<()> {
    let env = old_env(ctx);
    let bundle_src = env.under_root(&ctx.plan.bundle.path);
    let bundle_size = fs::metadata(&bundle_src)
        .with_context(|| format!("bundle {}", bundle_src.display()))?
        .len();
    let carry = preflight::carry_bytes(&env, &ctx.plan);
    let (kernel, initrd) = preflight::recovery_files(&env);
    let recovery: u64 = [&kernel, &initrd]
        .iter()
        .map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    // Cap: what we copy plus the margin; tar headers and the keyring fit in it.
    let cap = bundle_size + carry + recovery + ctx.plan.margin();
    let ram = ctx.paths.ram();
    ctx.ram_mount = Some(
        Mount::tmpfs(&ram, cap).with_context(|| format!("mounting a {} MiB tmpfs", cap / MIB))?,
    );
    log(&format!(
        "staging {} MiB into a {} MiB tmpfs",
        (bundle_size + carry + recovery) / MIB,
        cap / MIB
    ));

    let sha = copy_hashed(&bundle_src, &ram.join("os.bundle"))?;
    let info = env.under_root(Path::new(super::stage::STAGE_INFO));
    if let Ok(text) = fs::read_to_string(&info) {
        let t: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", info.display()))?;
        if let Some(want) = t.get("bundle_sha256").and_then(|v| v.as_str()) {
            if want != sha {
                bail!("the staged bundle changed since `dualroot stage` (sha256 {sha}, expected {want}); re-run stage");
            }
        }
    }
    copy_dir_files(
        &env.under_root(&ctx.plan.bundle.keyring),
        &ram.join("keyring"),
    )?;
    let kr = Keyring::load(&ram.join("keyring"))?;
    bundle::open(&ram.join("os.bundle"), Some(&kr))
        .context("checking the RAM copy of the bundle")?;
    fs::write(ram.join("plan.toml"), toml::to_string(&ctx.plan)?)?;

    // Carried files: identity set + the plan's list, as they are on the old root.
    let mut items = Vec::new();
    for id in IDENTITY_FILES {
        let p = env.under_root(Path::new(id));
        if p.exists() {
            items.push((p, PathBuf::from(id)));
        }
    }
    for c in &ctx.plan.carry {
        let p = env.under_root(&c.path);
        if fs::symlink_metadata(&p).is_ok() {
            items.push((p, c.path.clone()));
        } else {
            log(&format!(
                "carry: {} does not exist on the old system; skipped",
                c.path.display()
            ));
        }
    }
    let f = fs::File::create(ram.join("carry.tar"))?;
    let (f, entries) = bundle::create::write_tar(std::io::BufWriter::new(f), &items)?;
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    log(&format!(
        "carry: {entries} entries from {} item(s)",
        items.len()
    ));

    // The inventory `stage` took on the running system; sysfs here only when the
    // plan was staged by hand (a host-only initramfs may lack the NIC drivers).
    let staged_nics = env.under_root(Path::new(super::stage::STAGE_NICS));
    let nics: Vec<crate::sysinfo::Nic> = match fs::read(&staged_nics) {
        Ok(data) => serde_json::from_slice(&data)
            .with_context(|| format!("parsing {}", staged_nics.display()))?,
        Err(_) => crate::sysinfo::nics(&ctx.sys.join("class/net"))?,
    };
    log(&format!("nics: {} interface(s) to pin by MAC", nics.len()));
    fs::write(ram.join("nics.json"), serde_json::to_vec_pretty(&nics)?)?;
    fs::create_dir_all(ram.join("recovery"))?;
    copy_hashed(&kernel, &ram.join("recovery/vmlinuz")).context("copying the recovery kernel")?;
    copy_hashed(&initrd, &ram.join("recovery/initrd.img"))
        .context("copying the migration initramfs for recovery")?;
    ctx.journal.bundle_bytes = bundle_size;
    ctx.sample_memory();
    ctx.failpoints.check_powercut(Step::StageRam);
    if let Some(m) = ctx.old_mount.take() {
        m.unmount().context("unmounting the old root")?;
    }
    Ok(())
}

fn part_dev(disk: &Path, n: u32) -> PathBuf {
    let s = disk.display().to_string();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{n}"))
    } else {
        PathBuf::from(format!("{s}{n}"))
    }
}

fn wait_for(paths: &[PathBuf]) -> Result<()> {
    let _ = cmd("udevadm", ["settle", "--timeout=10"]).run();
    for _ in 0..100 {
        if paths.iter().all(|p| p.exists()) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let missing: Vec<String> = paths
        .iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    bail!(
        "device node(s) {} did not appear within 10 s",
        missing.join(", ")
    )
}

pub fn lvm(ctx: &Ctx, args: &[&str]) -> Result<String> {
    let pv = part_dev(&ctx.disk, 3);
    let filter = format!(
        "devices {{ filter = [ \"a|^{}$|\", \"r|.*|\" ] }}",
        pv.display()
    );
    let mut c = cmd("lvm", args);
    c.args(["--config", &filter]);
    c.run_stdout()
}

fn lv_path(ctx: &Ctx, lv: &str) -> PathBuf {
    PathBuf::from(format!("/dev/{}/{lv}", ctx.plan.vg))
}

pub fn mkfs(dev: &Path, label: &str) -> Result<()> {
    cmd("mkfs.ext4", ["-q", "-F", "-L", label]).arg(dev).run()
}

fn partition(ctx: &mut Ctx) -> Result<()> {
    let sizes = ctx.plan.byte_sizes()?;
    let env = Env {
        root: ctx.paths.old(),
        root_mount: String::new(),
        proc: ctx.proc.clone(),
        sys: ctx.sys.clone(),
        accounts_dry_run: false,
    };
    let bytes = preflight::disk_bytes(&env, &ctx.disk)?;
    let l = layout::compute(bytes, &sizes)?;
    ctx.journal.point_of_no_return_unix = Some(now());
    ctx.save_journal()?;
    log(&format!(
        "point of no return: writing a GPT to {}",
        ctx.disk.display()
    ));
    let disk = ctx.disk.display().to_string();
    run_with_input(
        &mut cmd(
            "sfdisk",
            [
                "--quiet",
                "--wipe",
                "always",
                "--wipe-partitions",
                "always",
                &disk,
            ],
        ),
        l.sfdisk_script().as_bytes(),
    )?;
    ctx.failpoints.check_powercut(Step::Partition);
    let _ = cmd("blockdev", ["--rereadpt", &disk])
        .run()
        .or_else(|_| cmd("partx", ["-u", &disk]).run());
    let parts: Vec<PathBuf> = (1..=3).map(|n| part_dev(&ctx.disk, n)).collect();
    wait_for(&parts)?;
    let pv = parts[2].display().to_string();
    let vg = ctx.plan.vg.clone();
    lvm(ctx, &["pvcreate", "-ff", "-y", "--zero", "y", &pv])?;
    lvm(ctx, &["vgcreate", "-y", &vg, &pv])?;
    for (name, size) in l.lvs {
        lvm(
            ctx,
            &[
                "lvcreate",
                "-y",
                "-Wy",
                "-Zy",
                "-L",
                &format!("{size}b"),
                "-n",
                name,
                &vg,
            ],
        )?;
    }
    let lvs: Vec<PathBuf> = l.lvs.iter().map(|(n, _)| lv_path(ctx, n)).collect();
    wait_for(&lvs)?;
    mkfs(&parts[1], "boot")?;
    mkfs(&lv_path(ctx, "data"), "data")?;
    mkfs(&lv_path(ctx, "image"), "image")?;
    Ok(())
}

fn mount_data_and_boot(ctx: &mut Ctx) -> Result<()> {
    if ctx.data_mount.is_none() {
        ctx.data_mount = Some(Mount::ext4(&lv_path(ctx, "data"), &ctx.paths.data())?);
    }
    if ctx.boot_mount.is_none() {
        ctx.boot_mount = Some(Mount::ext4(&part_dev(&ctx.disk, 2), &ctx.paths.boot())?);
    }
    Ok(())
}

fn boot_config(ctx: &Ctx) -> BootConfig {
    let args = ctx.journal.kernel_args.clone();
    BootConfig {
        vg: ctx.plan.vg.clone(),
        recovery_args: format!("{args} rd.shell=0 rd.emergency=reboot"),
        kernel_args: args,
        panic_secs: 10,
    }
}

fn write_grub_files(ctx: &Ctx, env_vars: &BTreeMap<String, String>) -> Result<()> {
    let gdir = ctx.paths.boot().join("grub");
    fs::create_dir_all(&gdir)?;
    let bc = boot_config(ctx);
    let bc_path = ctx.paths.boot().join(grub::BOOT_CONFIG_FILE);
    fs::create_dir_all(bc_path.parent().unwrap_or(&gdir))?;
    grub::write_atomic(&bc_path, bc.to_toml().as_bytes())?;
    grub::write_atomic(&gdir.join("grub.cfg"), grub::render_cfg(&bc).as_bytes())?;
    grub::write_env(&gdir.join("grubenv"), env_vars)
}

fn migrating_env() -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    v.insert("migrating".into(), "1".into());
    v
}

/// Installs the GRUB that came with the migration initramfs (the old OS's), booting
/// the recovery entry.
fn install_recovery_grub(ctx: &Ctx) -> Result<()> {
    let tool = find_tool(&["grub-install", "grub2-install"])
        .context("no grub-install in the migration initramfs")?;
    cmd(&tool, ["--target=i386-pc", "--force"])
        .arg(format!("--boot-directory={}", ctx.paths.boot().display()))
        .arg(&ctx.disk)
        .run()
}

fn stash(ctx: &mut Ctx) -> Result<()> {
    mount_data_and_boot(ctx)?;
    let ram = ctx.paths.ram();
    let st = ctx.paths.stash();
    fs::create_dir_all(&st)?;
    copy_hashed(&ram.join("os.bundle"), &st.join("os.bundle"))?;
    copy_dir_files(&ram.join("keyring"), &st.join("keyring"))?;
    for f in ["plan.toml", "carry.tar", "nics.json"] {
        copy_hashed(&ram.join(f), &st.join(f))?;
    }
    let rec = ctx.paths.boot().join("recovery");
    fs::create_dir_all(&rec)?;
    copy_hashed(&ram.join("recovery/vmlinuz"), &rec.join("vmlinuz"))?;
    copy_hashed(&ram.join("recovery/initrd.img"), &rec.join("initrd.img"))?;
    write_grub_files(ctx, &migrating_env())?;
    install_recovery_grub(ctx)?;
    nix::unistd::sync();
    ctx.journal.recovery_ready_unix = Some(now());
    log(&format!(
        "recovery entry installed: a power cut from here on resumes (unrecoverable window {:.1} s)",
        ctx.journal.unrecoverable_window().unwrap_or(0.0)
    ));
    ctx.sample_memory();
    if let Some(m) = ctx.ram_mount.take() {
        m.unmount().context("unmounting the staging tmpfs")?;
    }
    Ok(())
}

fn mount_new_root(ctx: &Ctx) -> Result<Mount> {
    Mount::ext4(&lv_path(ctx, "root"), &ctx.paths.new_root())
}

fn unpack(ctx: &mut Ctx) -> Result<()> {
    mount_data_and_boot(ctx)?;
    let root = lv_path(ctx, "root");
    mkfs(&root, "root")?;
    let m = mount_new_root(ctx)?;
    let st = ctx.paths.stash();
    let kr = Keyring::load(&st.join("keyring"))?;
    let b = bundle::open(&st.join("os.bundle"), Some(&kr))?;
    let manifest = b.manifest.clone();
    ctx.failpoints.check_powercut(Step::Unpack);
    let rep = bundle::unpack::unpack_open(
        b,
        &m.target,
        &UnpackOptions {
            threads: 0,
            progress: true,
            sync: true,
        },
    )?;
    log(&format!(
        "unpacked {} {} into {}: {} entries, {} MiB in {:.1} s",
        manifest.os_id,
        manifest.version,
        root.display(),
        rep.entries,
        rep.bytes_written / MIB,
        rep.seconds
    ));
    fs::write(st.join("manifest.toml"), manifest.to_toml())?;
    ctx.sample_memory();
    m.unmount()
}

/// The newest kernel in the new root's /boot and its initramfs.
pub fn find_kernel(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let boot = root.join("boot");
    let mut versions: Vec<String> = fs::read_dir(&boot)
        .with_context(|| format!("listing {}", boot.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .collect();
    versions.sort_by(|a, b| version_cmp(a, b));
    let v = versions
        .pop()
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let initrd = [format!("initrd.img-{v}"), format!("initramfs-{v}.img")]
        .into_iter()
        .map(|n| boot.join(n))
        .find(|p| p.exists())
        .with_context(|| format!("no initramfs for kernel {v} in {}", boot.display()))?;
    Ok((boot.join(format!("vmlinuz-{v}")), initrd))
}

fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    key(a).cmp(&key(b))
}

/// Bind mounts for running tools of the new root in a chroot.
pub fn chroot_binds(root: &Path, boot: Option<&Path>) -> Result<Vec<Mount>> {
    let mut v = Vec::new();
    for d in ["dev", "proc", "sys"] {
        v.push(Mount::bind(Path::new(&format!("/{d}")), &root.join(d))?);
    }
    if let Some(b) = boot {
        v.push(Mount::bind(b, &root.join("boot"))?);
    }
    Ok(v)
}

fn boot(ctx: &mut Ctx) -> Result<()> {
    mount_data_and_boot(ctx)?;
    let m = mount_new_root(ctx)?;
    let (kernel, initrd) = find_kernel(&m.target)?;
    let slot = ctx.paths.boot().join("a");
    fs::create_dir_all(&slot)?;
    copy_hashed(&kernel, &slot.join("vmlinuz"))?;
    copy_hashed(&initrd, &slot.join("initrd.img"))?;
    let manifest = fs::read_to_string(ctx.paths.stash().join("manifest.toml")).unwrap_or_default();
    grub::write_atomic(&slot.join("manifest.toml"), manifest.as_bytes())?;
    write_grub_files(ctx, &migrating_env())?;
    ctx.failpoints.check_powercut(Step::Boot);

    let binds = chroot_binds(&m.target, Some(&ctx.paths.boot()))?;
    let tool = ["grub-install", "grub2-install"]
        .into_iter()
        .find(|t| {
            ["usr/sbin", "sbin", "usr/bin"]
                .iter()
                .any(|d| m.target.join(d).join(t).exists())
        })
        .context("the new root has no grub-install");
    let disk = if ctx.failpoints.fail.as_deref() == Some("grub-install") {
        log("failpoint grub-install armed: running the new root's grub-install against a missing disk");
        PathBuf::from("/dev/dualroot-failpoint-no-such-disk")
    } else {
        ctx.disk.clone()
    };
    let res = tool.and_then(|t| {
        cmd("chroot", [m.target.as_os_str()])
            .arg(t)
            .args(["--target=i386-pc"])
            .arg(&disk)
            .run()
    });
    drop(binds);
    if let Err(e) = res {
        log(&format!(
            "the new root's grub-install failed: {e:#}\nputting the recovery GRUB back"
        ));
        write_grub_files(ctx, &migrating_env())?;
        install_recovery_grub(ctx)
            .context("reinstalling the recovery GRUB after grub-install failed")?;
        nix::unistd::sync();
        return Err(e.context(
            "installing the new OS's GRUB (recovery entry restored; the next boot retries)",
        ));
    }
    // grub-install of the new root wrote its own modules; our grub.cfg stays.
    write_grub_files(ctx, &migrating_env())?;
    m.unmount()
}

fn done(ctx: &mut Ctx) -> Result<()> {
    mount_data_and_boot(ctx)?;
    let mut v = BTreeMap::new();
    v.insert("primary".into(), "a".into());
    v.insert("a_state".into(), "trying".into());
    v.insert("a_tries".into(), "1".repeat(ctx.plan.boot_tries as usize));
    v.insert("b_state".into(), "empty".into());
    v.insert("migrated_unix".into(), format!("{}", now() as u64));
    // The first good boot grows data and image (`slot health-check`).
    v.insert("grow_pending".into(), "1".into());
    // Before the one write that ends the migration.
    ctx.failpoints.check_powercut(Step::Done);
    grub::write_env(&ctx.paths.boot().join("grub/grubenv"), &v)?;
    ctx.journal.outcome = Some("done".into());
    ctx.sample_memory();
    Ok(())
}
