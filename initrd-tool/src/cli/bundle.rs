//! `dualroot bundle ...`: its clap type and dispatch.

use crate::render;
use anyhow::{Context, Result};
use clap::Subcommand;
use dualroot::bundle::{self, CpuLevel, CreateOptions, UnpackOptions};
use dualroot::keys::Keyring;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BundleCmd {
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
        #[arg(long, default_value = crate::args::KEYRING)]
        keyring: PathBuf,
    },
    /// Verify, then unpack into an empty directory.
    Unpack {
        bundle: PathBuf,
        target: PathBuf,
        #[arg(long)]
        keyring: PathBuf,
        /// Decoder threads: 0 or 1 = one decoder thread pipelined with the
        /// extraction (bounded memory); N > 1 = liblzma's multi-threaded decoder.
        #[arg(long, default_value_t = 0)]
        threads: u32,
    },
}

pub fn run(cmd: BundleCmd) -> Result<()> {
    match cmd {
        BundleCmd::Create {
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
        } => {
            let opts = CreateOptions {
                rootfs,
                os_id,
                version,
                model,
                key,
                out: out.clone(),
                excludes: exclude,
                requires_cpu: CpuLevel::parse(&requires_cpu)?,
                default_excludes: !no_default_excludes,
                threads: if threads == 0 {
                    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
                } else {
                    threads
                },
            };
            let r = bundle::create(&opts)?;
            render::created(
                &out,
                &r,
                r.manifest.as_ref().context("create returned no manifest")?,
            );
        }
        BundleCmd::Inspect { bundle: path, json } => {
            let b = bundle::open(&path, None)?;
            if json {
                render::json(&b.manifest)?
            } else {
                render::manifest(&b.manifest_bytes)
            }
        }
        BundleCmd::Verify {
            bundle: path,
            keyring,
        } => {
            let b = bundle::open(&path, Some(&Keyring::load(&keyring)?))?;
            let progress = std::io::stderr()
                .is_terminal()
                .then(|| dualroot::progress::Progress::new("verify", b.payload_stored_size));
            let m = bundle::reader::check_payload(b, progress)
                .with_context(|| format!("bundle {}", path.display()))?;
            render::verified(&path, &m);
        }
        BundleCmd::Unpack {
            bundle: path,
            target,
            keyring,
            threads,
        } => {
            let opts = UnpackOptions {
                threads,
                progress: true,
                sync: true,
            };
            let r = bundle::unpack_bundle(&path, &Keyring::load(&keyring)?, &target, &opts)?;
            render::unpacked(&target, &r);
        }
    }
    Ok(())
}
