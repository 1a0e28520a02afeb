//! `dualroot`: command-line driver over the engine library. Parses arguments and
//! dispatches; the work lives in the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dualroot::bundle::{self, CpuLevel, CreateOptions, UnpackOptions};
use dualroot::keys::{self, Keyring};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "dualroot",
    version,
    about = "Migrate appliances to an A/B dual-root layout and keep them updated"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Signing keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Signed OS bundles.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Read-only checks of a migration plan on this machine; exits 1 on blockers.
    Preflight {
        #[arg(long)]
        plan: PathBuf,
        #[arg(long)]
        json: bool,
        /// Skip the account merge dry run (it decodes the payload).
        #[arg(long)]
        no_accounts: bool,
    },
    /// On the old system: stage bundle and plan, build the migration initramfs, add a one-shot boot entry.
    Stage {
        /// Bundle to migrate to (default: the plan's `bundle.path`).
        bundle: Option<PathBuf>,
        #[arg(long)]
        plan: PathBuf,
        #[arg(long)]
        reboot: bool,
        /// Extra kernel argument for the migration boot (repeatable), e.g.
        /// `rd.dualroot.failpoint=boot` in tests.
        #[arg(long = "kernel-arg")]
        kernel_args: Vec<String>,
    },
    /// Inside the migration initramfs: run or resume the migration (exit 0 done,
    /// 2 refused before the point of no return, 3 failed after it: reboot to resume,
    /// 4 gave up).
    Migrate {
        /// Plan path on the old root (rd.dualroot.migrate=).
        #[arg(long, conflicts_with = "resume")]
        plan: Option<PathBuf>,
        /// Old root device (default: root= of the kernel command line).
        #[arg(long)]
        root_device: Option<PathBuf>,
        #[arg(long)]
        resume: bool,
        #[arg(long)]
        vg: Option<String>,
    },
    /// Rename interfaces to the names pinned by MAC (run by a unit before networking).
    NicPin { file: PathBuf },
    /// A/B slots on the running system.
    #[command(subcommand)]
    Slot(SlotCmd),
    /// Sync and reboot or power off now (used by the initramfs hook).
    Power {
        #[arg(value_parser = ["reboot", "off"])]
        action: String,
    },
}

#[derive(Subcommand)]
enum SlotCmd {
    /// Booted slot, primary, each slot's OS/version/state/tries, fallback.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/boot")]
        boot: PathBuf,
    },
    /// Confirm the booted slot (after its health check passed).
    #[command(alias = "confirm")]
    MarkGood {
        #[arg(long, default_value = "/boot")]
        boot: PathBuf,
    },
    /// Verify a bundle and install it into the inactive slot (never the booted one).
    Install {
        bundle: PathBuf,
        #[arg(long, default_value = dualroot::slot::install::DEFAULT_KEYRING)]
        keyring: PathBuf,
        /// Carry list and account policy (default: the migration's plan on the data LV).
        #[arg(long, default_value = dualroot::slot::install::DEFAULT_PLAN)]
        plan: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/boot")]
        boot: PathBuf,
    },
    /// Boot the other slot next, unconfirmed, with N tries before GRUB falls back.
    Switch {
        /// The slot to switch to (must be the inactive one; default: it).
        slot: Option<String>,
        #[arg(long, default_value_t = 3)]
        tries: u32,
        #[arg(long, default_value = "/boot")]
        boot: PathBuf,
    },
    /// Make the other, good slot primary (or cancel a pending switch).
    Rollback {
        #[arg(long, default_value = "/boot")]
        boot: PathBuf,
    },
    /// Run the health check (/etc/dualroot/health.toml), then confirm the booted
    /// slot; grows data and image after the first good boot following migration.
    HealthCheck {
        #[arg(long, default_value = dualroot::slot::health::DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, default_value = "/boot")]
        boot: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Generate an ed25519 key pair: OUT (secret, mode 0600) and OUT.pub.
    Generate {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "dualroot")]
        comment: String,
    },
}

#[derive(Subcommand)]
enum BundleCmd {
    /// Build a signed bundle from a root tree.
    Create {
        #[arg(long)]
        rootfs: PathBuf,
        #[arg(long)]
        os_id: String,
        #[arg(long)]
        version: String,
        #[arg(long, default_value = "any")]
        model: String,
        #[arg(long, default_value = "x86-64-v2")]
        requires_cpu: String,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Glob (relative to the root, `*` stops at `/`); repeatable.
        #[arg(long)]
        exclude: Vec<String>,
        /// Keep caches, logs and machine identity that are excluded by default.
        #[arg(long)]
        no_default_excludes: bool,
        /// Compression threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: u32,
    },
    /// Print the manifest and payload facts (signature not checked).
    Inspect {
        bundle: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check the signature against a keyring and the payload's size and hash.
    Verify {
        bundle: PathBuf,
        #[arg(long, default_value = "/etc/dualroot/keyring")]
        keyring: PathBuf,
    },
    /// Verify, then unpack into an empty directory.
    Unpack {
        bundle: PathBuf,
        target: PathBuf,
        #[arg(long)]
        keyring: PathBuf,
        /// Decoder threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: u32,
    },
}

fn cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Preflight {
            plan,
            json,
            no_accounts,
        } => {
            let plan = dualroot::plan::Plan::load(&plan)?;
            let mut env = dualroot::migrate::preflight::Env::live();
            env.accounts_dry_run = !no_accounts;
            let rep = dualroot::migrate::preflight::run(&plan, &env);
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                print!("{}", rep.render());
            }
            return Ok(if rep.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Cmd::Stage {
            bundle,
            plan,
            reboot,
            kernel_args,
        } => {
            let s =
                dualroot::migrate::stage::stage(&plan, bundle.as_deref(), reboot, &kernel_args)?;
            println!(
                "staged plan {}, initramfs {}, one-shot entry set with {}",
                s.plan_path.display(),
                s.initramfs.display(),
                s.grub_tool
            );
        }
        Cmd::Migrate {
            plan,
            root_device,
            resume,
            vg,
        } => {
            let code = if resume {
                dualroot::migrate::entry::resume(vg.as_deref())
            } else {
                let plan = plan.context("--plan or --resume is required")?;
                dualroot::migrate::entry::first(&plan, root_device.as_deref())
            };
            return Ok(ExitCode::from(code));
        }
        Cmd::Slot(SlotCmd::Status { json, boot }) => {
            let s = dualroot::slot::status(&boot)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "booted: {}  primary: {}{}",
                    s.booted.as_deref().unwrap_or("?"),
                    s.primary,
                    if s.migrating {
                        "  (migration in progress)"
                    } else {
                        ""
                    }
                );
                for sl in &s.slots {
                    println!(
                        "  slot {} ({}): {}{}  {} {}",
                        sl.slot,
                        sl.lv,
                        sl.state,
                        sl.tries_left
                            .map(|t| format!(", {t} tries left"))
                            .unwrap_or_default(),
                        sl.os_id.as_deref().unwrap_or("-"),
                        sl.version.as_deref().unwrap_or("")
                    );
                }
                if let Some(f) = &s.fallback_from {
                    println!(
                        "  slot {f} failed to come up{}; GRUB fell back to slot {}",
                        s.fallback_tries_used
                            .map(|n| format!(" in {n} tries"))
                            .unwrap_or_default(),
                        dualroot::slot::state::other(f)
                    );
                }
            }
        }
        Cmd::Slot(SlotCmd::MarkGood { boot }) => {
            let slot = dualroot::slot::mark_good(&boot)?;
            println!("slot {slot} marked good");
        }
        Cmd::Slot(SlotCmd::Install {
            bundle,
            keyring,
            plan,
            json,
            boot,
        }) => {
            let r = dualroot::slot::install::install(&dualroot::slot::install::InstallOptions {
                bundle,
                keyring,
                plan,
                boot,
                source_root: PathBuf::from("/"),
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "slot {} (LV {}) installed: {} {}, {} entries in {:.0} s; {}",
                    r.slot, r.lv, r.os_id, r.version, r.entries, r.seconds, r.next
                );
            }
        }
        Cmd::Slot(SlotCmd::Switch { slot, tries, boot }) => {
            println!("{}", dualroot::slot::switch(&boot, slot.as_deref(), tries)?);
        }
        Cmd::Slot(SlotCmd::Rollback { boot }) => {
            println!("{}", dualroot::slot::rollback(&boot)?);
        }
        Cmd::Slot(SlotCmd::HealthCheck { config, boot }) => {
            use dualroot::slot::health::{self, Outcome};
            match health::run(&boot, &config)? {
                Outcome::Confirmed(notes) => println!("health check passed: {notes}"),
                Outcome::Failed { reason, reboot } => {
                    eprintln!("dualroot: health check failed: {reason}");
                    if reboot {
                        let _ = std::process::Command::new("systemctl")
                            .arg("reboot")
                            .status();
                    }
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Cmd::Power { action } => {
            nix::unistd::sync();
            let mode = if action == "off" {
                nix::sys::reboot::RebootMode::RB_POWER_OFF
            } else {
                nix::sys::reboot::RebootMode::RB_AUTOBOOT
            };
            nix::sys::reboot::reboot(mode).context("reboot(2)")?;
        }
        Cmd::NicPin { file } => {
            dualroot::nicpin::run(&file, std::path::Path::new("/sys/class/net"))?;
        }
        Cmd::Key(KeyCmd::Generate { out, comment }) => {
            let (pub_path, id) = keys::generate(&out, &comment)?;
            println!(
                "secret key: {}\npublic key: {}\nkey id: {id}",
                out.display(),
                pub_path.display()
            );
        }
        Cmd::Bundle(BundleCmd::Create {
            rootfs,
            os_id,
            version,
            model,
            requires_cpu,
            key,
            out,
            exclude,
            no_default_excludes,
            threads,
        }) => {
            let opts = CreateOptions {
                rootfs,
                os_id,
                version,
                model,
                requires_cpu: CpuLevel::parse(&requires_cpu)?,
                key,
                out: out.clone(),
                excludes: exclude,
                default_excludes: !no_default_excludes,
                threads: if threads == 0 { cores() } else { threads },
            };
            let r = bundle::create(&opts)?;
            let m = r.manifest.context("create returned no manifest")?;
            println!(
                "bundle {}: {} {} ({} entries, {} excluded, {} sockets skipped), payload {} bytes xz of {} bytes, sha256 {}",
                out.display(),
                m.os_id,
                m.version,
                r.entries,
                r.excluded,
                r.skipped_sockets.len(),
                m.payload.compressed_size,
                m.payload.uncompressed_size,
                m.payload.sha256
            );
        }
        Cmd::Bundle(BundleCmd::Inspect { bundle: path, json }) => {
            let b = bundle::open(&path, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b.manifest)?);
            } else {
                print!("{}", String::from_utf8_lossy(&b.manifest_bytes));
                println!("# signature: not checked (use `dualroot bundle verify --keyring DIR`)");
            }
        }
        Cmd::Bundle(BundleCmd::Verify {
            bundle: path,
            keyring,
        }) => {
            let kr = Keyring::load(&keyring)?;
            let b = bundle::open(&path, Some(&kr))?;
            let progress = std::io::stderr()
                .is_terminal()
                .then(|| dualroot::progress::Progress::new("verify", b.payload_stored_size));
            let m = bundle::reader::check_payload(b, progress)
                .with_context(|| format!("bundle {}", path.display()))?;
            println!(
                "OK: {} is {} {} signed by trusted key {}; payload sha256 {} matches",
                path.display(),
                m.os_id,
                m.version,
                m.key_id,
                m.payload.sha256
            );
        }
        Cmd::Bundle(BundleCmd::Unpack {
            bundle: path,
            target,
            keyring,
            threads,
        }) => {
            let kr = Keyring::load(&keyring)?;
            let opts = UnpackOptions {
                threads,
                progress: true,
                sync: true,
            };
            let r = bundle::unpack_bundle(&path, &kr, &target, &opts)?;
            println!(
                "unpacked {} entries ({:.1} MB) into {} in {:.2} s",
                r.entries,
                r.bytes_written as f64 / 1e6,
                target.display(),
                r.seconds
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dualroot: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
