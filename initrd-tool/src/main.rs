//! `dualroot`: command-line driver over the engine library. Parses arguments and
//! dispatches; the work lives in the library, the text output in `cli/render.rs`.

#[path = "cli/args.rs"]
mod args;
#[path = "cli/bundle.rs"]
mod bundle_cmd;
#[path = "cli/render.rs"]
mod render;

use anyhow::{Context, Result};
use args::{KeyCmd, PlanCmd, SlotCmd};
use bundle_cmd::BundleCmd;
use clap::{Parser, Subcommand};
use dualroot::keys;
use dualroot::{migrate, plan, slot};
use std::path::PathBuf;
use std::process::ExitCode;

/// Where the slots' kernels, grub.cfg and grubenv live on a running system
/// (`DUALROOT_BOOT` replaces it for the contract test).
const BOOT: &str = "/boot";

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
    /// Migration plans, offline.
    #[command(subcommand)]
    Plan(PlanCmd),
    /// Read-only checks of a migration plan on this machine; exits 1 on blockers.
    Preflight {
        #[arg(long)]
        plan: PathBuf,
        #[arg(long)]
        json: bool,
        /// Skip the account merge dry run and kernel check (they decode the payload).
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
        /// Extra kernel argument for the migration boot (repeatable), e.g. `rd.dualroot.failpoint=boot`.
        #[arg(long = "kernel-arg")]
        kernel_args: Vec<String>,
        /// Refuse a plan without a valid `<plan>.sig` (the agent always passes
        /// this: plans from a backend must be vendor-signed).
        #[arg(long)]
        require_signed_plan: bool,
        /// Keyring the plan's signature is checked with.
        #[arg(long, default_value = args::KEYRING)]
        keyring: PathBuf,
    },
    /// Inside the migration initramfs: run or resume the migration (exit 0 done,
    /// 2 refused before the point of no return, 3 failed after it: reboot to resume, 4 gave up,
    /// 5 undone: a step inside the window kept failing and the old disk was put back).
    Migrate {
        /// Plan path on the old root (rd.dualroot.migrate=).
        #[arg(long, conflicts_with = "resume")]
        plan: Option<PathBuf>,
        /// Old root device (default: root= of the kernel command line).
        #[arg(long)]
        root_device: Option<PathBuf>,
        #[arg(long)]
        resume: bool,
        /// Only take back the one-shot migration entry in the old grubenv (the
        /// dracut hook runs this first, in its own process).
        #[arg(long, conflicts_with_all = ["resume", "plan"])]
        disarm: bool,
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

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    let boot = PathBuf::from(std::env::var("DUALROOT_BOOT").unwrap_or_else(|_| BOOT.into()));
    match cmd {
        Cmd::Preflight {
            plan,
            json,
            no_accounts,
        } => {
            let mut env = migrate::preflight::Env::live();
            env.accounts_dry_run = !no_accounts;
            let rep = migrate::preflight::run(&plan::Plan::load(&plan)?, &env);
            render::report(json, &rep, || render::line(&rep.render()))?;
            return Ok(exit(rep.ok()));
        }
        Cmd::Plan(PlanCmd::Check {
            plan,
            bundle,
            keyring,
            disk_size,
            json,
        }) => {
            let disk = disk_size
                .as_deref()
                .map(plan::parse_size)
                .transpose()
                .context("--disk-size")?;
            let c = migrate::plan_check::check(&plan, bundle.as_deref(), keyring.as_deref(), disk);
            render::report(json, &c, || render::line(&c.render()))?;
            return Ok(exit(c.ok));
        }
        Cmd::Plan(PlanCmd::Sign { plan, key }) => {
            let text =
                std::fs::read(&plan).with_context(|| format!("reading {}", plan.display()))?;
            // Only a plan that parses is worth a signature.
            plan::Plan::parse(std::str::from_utf8(&text).context("the plan is not UTF-8")?)
                .with_context(|| format!("plan {}", plan.display()))?;
            let secret = keys::load_secret(&key)?;
            let sig_path = keys::plan_signature_path(&plan);
            dualroot::fsutil::write_atomic(&sig_path, keys::sign_plan(&secret, &text).as_bytes())?;
            render::line(&format!(
                "signed {} with key {}: {}",
                plan.display(),
                keys::key_id(&secret.verifying_key()),
                sig_path.display()
            ));
        }
        Cmd::Plan(PlanCmd::Verify { plan, keyring }) => {
            let trust = migrate::stage::PlanTrust {
                require_signature: true,
                keyring,
            };
            migrate::stage::load_trusted_plan(&plan, &trust)?;
            render::line(&format!(
                "OK: {} is signed by a trusted key",
                plan.display()
            ));
        }
        Cmd::Stage {
            bundle,
            plan,
            reboot,
            kernel_args,
            require_signed_plan,
            keyring,
        } => {
            let trust = migrate::stage::PlanTrust {
                require_signature: require_signed_plan,
                keyring,
            };
            let s = migrate::stage::stage(&plan, bundle.as_deref(), &kernel_args, &trust)?;
            render::line(&s.summary());
            if reboot {
                dualroot::power::reboot_via_systemd()?;
            }
        }
        Cmd::Migrate {
            plan,
            root_device,
            resume,
            disarm,
            vg,
        } => {
            let code = if disarm {
                migrate::entry::disarm(root_device.as_deref())
            } else if resume {
                migrate::entry::resume(vg.as_deref())
            } else {
                migrate::entry::first(
                    &plan.context("--plan or --resume is required")?,
                    root_device.as_deref(),
                )
            };
            return Ok(ExitCode::from(code));
        }
        Cmd::Slot(SlotCmd::Status { json }) => {
            let s = slot::status(&boot)?;
            render::report(json, &s, || render::line(&slot::render_status(&s)))?;
        }
        Cmd::Slot(SlotCmd::MarkGood) => {
            render::line(&format!("slot {} marked good", slot::mark_good(&boot)?))
        }
        Cmd::Slot(SlotCmd::Install {
            bundle,
            keyring,
            plan,
            json,
            allow_downgrade,
            force,
        }) => {
            let o = slot::install::InstallOptions {
                bundle,
                keyring,
                plan,
                boot,
                source_root: "/".into(),
                allow_downgrade,
                force,
            };
            let r = slot::install::install(&o)?;
            render::report(json, &r, || render::installed(&r))?;
        }
        Cmd::Slot(SlotCmd::Switch { slot, tries, force }) => {
            render::line(&slot::switch(&boot, slot.as_deref(), tries, force)?)
        }
        Cmd::Slot(SlotCmd::Rollback) => render::line(&slot::rollback(&boot)?),
        Cmd::Slot(SlotCmd::UpdateBoot { kernel, chain }) => {
            if chain {
                render::line(&slot::chain::refresh(&boot, slot::running_slot()?)?)
            } else {
                render::line(&slot::update_boot(&boot, kernel.as_deref())?)
            }
        }
        Cmd::Slot(SlotCmd::HealthCheck { config }) => {
            return Ok(exit(slot::health::run_and_act(&boot, &config)?))
        }
        Cmd::Power { action } => dualroot::power::now(action == "off")?,
        Cmd::NicPin { file } => {
            dualroot::nicpin::run(&file, std::path::Path::new("/sys/class/net"))?
        }
        Cmd::Key(KeyCmd::Generate { out, comment }) => {
            let (public, id) = keys::generate(&out, &comment)?;
            render::key(&out, &public, &id);
        }
        Cmd::Bundle(c) => bundle_cmd::run(c)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // What the engine writes (fstab, units, grub.cfg, a slot's tree) are system
    // files: they must not take the caller's umask (the agent's unit has
    // UMask=0077). Secrets are created with explicit modes.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    dualroot::logging::init();
    match run(Cli::parse().cmd) {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
