//! `dualroot-agent`: the daemon on the booted appliance.
//!
//! Usage:
//!   dualroot-agent [run] [--config PATH]
//!   dualroot-agent register --token JWT [--config PATH]
//!   dualroot-agent heartbeat [--config PATH]     (prints the heartbeat answer)
//!   dualroot-agent check-services [--config PATH] (exit 1 when a service is unhealthy)

use agent_lib::agent::Agent;
use agent_lib::config::Config;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

const USAGE: &str =
    "usage: dualroot-agent [run|register --token JWT|heartbeat|check-services] [--config PATH]";

fn main() {
    agent_lib::logger::init();
    if let Err(e) = real_main() {
        for (i, cause) in e.chain().enumerate() {
            if i == 0 {
                log::error!("{cause}");
            } else {
                log::error!("  caused by: {cause}");
            }
        }
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut cmd = None;
    let mut config = PathBuf::from("/etc/dualroot/agent.toml");
    let mut token = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => config = args.next().context("--config needs a path")?.into(),
            "--token" => token = Some(args.next().context("--token needs a value")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "run" | "register" | "heartbeat" | "check-services" if cmd.is_none() => cmd = Some(a),
            other => bail!("unexpected argument {other:?}\n{USAGE}"),
        }
    }
    let cfg = Config::load(&config)?;
    if matches!(cmd.as_deref(), None | Some("run") | Some("register")) {
        for line in cfg.check_transport()? {
            log::warn!("insecure = true: {line}");
        }
    }
    cfg.adopt_legacy_state()?;
    match cmd.as_deref().unwrap_or("run") {
        "register" => {
            let token = token.context("register needs --token JWT")?;
            let t = agent_lib::registration::register(&cfg, &token)?;
            println!("registered as {}", t.device_id);
            Ok(())
        }
        "heartbeat" => {
            let agent = Agent::new(cfg)?;
            println!("{:#}", agent_lib::tasks::heartbeat(&agent));
            Ok(())
        }
        // For /etc/dualroot/health.toml: `command = "dualroot-agent check-services"`,
        // so the engine's health check, the one owner of the decision, includes
        // the installed services.
        "check-services" => {
            let agent = Agent::new(cfg)?;
            let unhealthy = agent_lib::tasks::unhealthy_services(&agent);
            if unhealthy.is_empty() {
                println!("all installed services are healthy");
                Ok(())
            } else {
                anyhow::bail!("services not healthy: {}", unhealthy.join(", "))
            }
        }
        _ => {
            agent_lib::registration::ensure_registered(&cfg)?;
            let agent = Agent::new(cfg)?;
            agent.run()
        }
    }
}
