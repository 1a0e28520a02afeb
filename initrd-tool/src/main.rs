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
        #[arg(long)]
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

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
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
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dualroot: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
