//! Command line: `serve` runs the controller; every other command is a
//! client of its HTTP API (so a dashboard sees exactly what the CLI sees).

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::store::Store;
use crate::Fleet;
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "dualroot-fleet", about = "dualroot fleet controller")]
pub struct Cli {
    /// The controller's API (client commands).
    #[arg(
        long,
        env = "DUALROOT_FLEET_API",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub api: String,
    /// Operator token for the API, when the controller requires one.
    #[arg(long, env = "DUALROOT_FLEET_TOKEN", global = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the controller: HTTP API, MQTT intake and outbox, ticks.
    Serve(Serve),
    #[command(subcommand)]
    Rollout(RolloutCmd),
    #[command(subcommand)]
    Devices(DevicesCmd),
    #[command(subcommand)]
    Tasks(TasksCmd),
    /// Simulated appliances speaking the agent's protocol to a broker.
    Simulate(Simulate),
    /// Bench helper: add registered, silent devices straight to a store.
    Seed {
        #[arg(long, env = "DUALROOT_FLEET_DB")]
        db: String,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        devices: usize,
        #[arg(long)]
        label: Vec<String>,
    },
}

#[derive(clap::Args, Debug)]
pub struct Simulate {
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    #[arg(long)]
    pub register_token: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub mqtt_host: String,
    #[arg(long, default_value_t = 1883)]
    pub mqtt_port: u16,
    #[arg(long, default_value = "dualroot")]
    pub prefix: String,
    /// Version the devices run at the start.
    #[arg(long, default_value = "1.0")]
    pub version: String,
    /// Old single-root systems (they take migrations) instead of A/B ones.
    #[arg(long)]
    pub legacy: bool,
    /// `key=value` labels for every device.
    #[arg(long)]
    pub label: Vec<String>,
    /// The first N devices also get `canary=yes`.
    #[arg(long, default_value_t = 0)]
    pub canaries: usize,
    #[arg(long, default_value_t = 1000)]
    pub download_ms: u64,
    #[arg(long, default_value_t = 2000)]
    pub reboot_ms: u64,
    #[arg(long, default_value_t = 5000)]
    pub outbox_retry_ms: u64,
    #[arg(long, default_value_t = 0)]
    pub install_fail_pct: u32,
    #[arg(long, default_value_t = 0)]
    pub rollback_pct: u32,
    #[arg(long, default_value_t = 0)]
    pub silent_pct: u32,
    #[arg(long, default_value_t = 0)]
    pub slow_pct: u32,
    #[arg(long, default_value_t = 0)]
    pub dup_pct: u32,
    /// Load generator: every device also publishes a heartbeat answer of its
    /// own this often (the controller applies it like any other).
    #[arg(long)]
    pub heartbeat_every_ms: Option<u64>,
    /// Stop after this many seconds (else at SIGTERM/SIGINT).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Write the report (JSON) here too.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct Serve {
    /// SQLite file, or a postgres:// URL.
    #[arg(
        long,
        env = "DUALROOT_FLEET_DB",
        default_value = "/var/lib/dualroot-fleet/fleet.sqlite"
    )]
    pub db: String,
    /// Settings (TOML, the fields of `Config`); defaults otherwise.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub mqtt_host: String,
    #[arg(long, default_value_t = 1883)]
    pub mqtt_port: u16,
    #[arg(long, default_value = "dualroot-fleet")]
    pub mqtt_client_id: String,
    /// Milliseconds between ticks (deadlines, rollouts, heartbeats).
    #[arg(long, default_value_t = 1000)]
    pub tick_ms: u64,
    /// This controller's name in the ticker lease (several controllers on
    /// one PostgreSQL: one ticks, all take traffic). Default: the client id.
    #[arg(long)]
    pub instance: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum RolloutCmd {
    /// Create a rollout (draft) from a JSON spec (README.md).
    Create {
        spec: PathBuf,
    },
    Start {
        id: String,
    },
    Freeze {
        id: String,
    },
    Resume {
        id: String,
    },
    Abort {
        id: String,
    },
    Status {
        id: String,
    },
    List,
}

#[derive(Subcommand, Debug)]
pub enum DevicesCmd {
    List,
    Show {
        id: String,
    },
    /// Replace a device's labels: `devices label va-1 site=lab canary=yes`.
    Label {
        id: String,
        labels: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TasksCmd {
    List {
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        rollout: Option<String>,
        #[arg(long, default_value_t = 200)]
        limit: i64,
    },
    /// One task with its state changes (time, from, to, reason).
    Show { id: String },
    /// Cancel a task: at once when never sent, else the device is asked
    /// (refused past its point of no return).
    Cancel { id: String },
}

pub fn run(cli: Cli) -> Result<()> {
    match &cli.cmd {
        Cmd::Serve(s) => serve(s),
        Cmd::Simulate(s) => simulate(&cli, s),
        Cmd::Seed {
            db,
            config,
            devices,
            label,
        } => {
            let cfg = load_config(config.as_deref())?;
            let labels = parse_labels(label)?;
            let store = Store::open(db)?;
            let now = SystemClock.now_ms();
            let mut done = 0;
            while done < *devices {
                let n = (*devices - done).min(5000);
                store.tx(|tx| crate::devices::seed(tx, &cfg, now, done, n, &labels))?;
                done += n;
            }
            println!("{done} devices added to {}", store.what);
            Ok(())
        }
        Cmd::Rollout(r) => {
            let (method, path, body) = match r {
                RolloutCmd::Create { spec } => (
                    "POST",
                    "/api/v1/rollouts".to_string(),
                    Some(
                        std::fs::read_to_string(spec)
                            .with_context(|| format!("reading {}", spec.display()))?,
                    ),
                ),
                RolloutCmd::Start { id } => (
                    "POST",
                    format!("/api/v1/rollouts/{id}/start"),
                    Some(String::new()),
                ),
                RolloutCmd::Freeze { id } => (
                    "POST",
                    format!("/api/v1/rollouts/{id}/freeze"),
                    Some(String::new()),
                ),
                RolloutCmd::Resume { id } => (
                    "POST",
                    format!("/api/v1/rollouts/{id}/resume"),
                    Some(String::new()),
                ),
                RolloutCmd::Abort { id } => (
                    "POST",
                    format!("/api/v1/rollouts/{id}/abort"),
                    Some(String::new()),
                ),
                RolloutCmd::Status { id } => ("GET", format!("/api/v1/rollouts/{id}"), None),
                RolloutCmd::List => ("GET", "/api/v1/rollouts".to_string(), None),
            };
            let v = call(&cli, method, &path, body)?;
            print(&cli, &v, |v| match r {
                RolloutCmd::List => v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|r| {
                                format!(
                                    "{}\t{}",
                                    r["id"].as_str().unwrap_or("?"),
                                    r["state"].as_str().unwrap_or("?")
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default(),
                _ => rollout_summary(v),
            });
            Ok(())
        }
        Cmd::Devices(d) => {
            let v = match d {
                DevicesCmd::List => {
                    // every page, following the cursor
                    let mut all = Vec::new();
                    let mut cursor: Option<String> = None;
                    loop {
                        let path = match &cursor {
                            Some(c) => format!("/api/v1/devices?cursor={c}"),
                            None => "/api/v1/devices".to_string(),
                        };
                        let page = call(&cli, "GET", &path, None)?;
                        all.extend(page["devices"].as_array().cloned().unwrap_or_default());
                        match page["nextCursor"].as_str() {
                            Some(c) => cursor = Some(c.to_string()),
                            None => break,
                        }
                    }
                    Value::Array(all)
                }
                DevicesCmd::Show { id } => {
                    call(&cli, "GET", &format!("/api/v1/devices/{id}"), None)?
                }
                DevicesCmd::Label { id, labels } => {
                    let mut map = serde_json::Map::new();
                    for l in labels {
                        let Some((k, v)) = l.split_once('=') else {
                            bail!("label {l:?} is not key=value; nothing was changed");
                        };
                        map.insert(k.into(), Value::String(v.into()));
                    }
                    call(
                        &cli,
                        "PUT",
                        &format!("/api/v1/devices/{id}/labels"),
                        Some(Value::Object(map).to_string()),
                    )?
                }
            };
            print(&cli, &v, |v| match d {
                DevicesCmd::List => v
                    .as_array()
                    .map(|a| a.iter().map(device_line).collect::<Vec<_>>().join("\n"))
                    .unwrap_or_default(),
                DevicesCmd::Label { .. } => format!("{}: {}", s(&v["deviceId"]), s(&v["labels"])),
                DevicesCmd::Show { .. } => {
                    let mut out = device_line(&v["device"]);
                    for t in v["tasks"].as_array().into_iter().flatten() {
                        out.push_str(&format!("\n  {}", task_line(t)));
                    }
                    out
                }
            });
            Ok(())
        }
        Cmd::Tasks(TasksCmd::Cancel { id }) => {
            let v = call(&cli, "POST", &format!("/api/v1/tasks/{id}/cancel"), None)?;
            print(&cli, &v, |v| {
                format!("{}: {}", task_line(&v["task"]), s(&v["cancel"]))
            });
            Ok(())
        }
        Cmd::Tasks(TasksCmd::Show { id }) => {
            let v = call(&cli, "GET", &format!("/api/v1/tasks/{id}"), None)?;
            print(&cli, &v, |v| {
                let mut out = task_line(&v["task"]);
                for h in v["history"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n  {} {} -> {}: {}",
                        h["at"],
                        s(&h["from"]),
                        s(&h["to"]),
                        s(&h["reason"])
                    ));
                }
                out
            });
            Ok(())
        }
        Cmd::Tasks(TasksCmd::List {
            device,
            rollout,
            limit,
        }) => {
            let mut path = format!("/api/v1/tasks?limit={limit}");
            if let Some(d) = device {
                path.push_str(&format!("&device={d}"));
            }
            if let Some(r) = rollout {
                path.push_str(&format!("&rollout={r}"));
            }
            let v = call(&cli, "GET", &path, None)?;
            print(&cli, &v, |v| {
                v.as_array()
                    .map(|a| a.iter().map(task_line).collect::<Vec<_>>().join("\n"))
                    .unwrap_or_default()
            });
            Ok(())
        }
    }
}

fn print(cli: &Cli, v: &Value, human: impl Fn(&Value) -> String) {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        println!("{}", human(v));
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn device_line(d: &Value) -> String {
    format!(
        "{}\t{}\t{}\tversion {}\tslot {}\t{}",
        s(&d["id"]),
        if d["online"] == Value::Bool(true) {
            "online"
        } else {
            "offline"
        },
        s(&d["layout"]),
        s(&d["version"]),
        s(&d["slot"]),
        s(&d["labels"])
    )
}

fn task_line(t: &Value) -> String {
    format!(
        "{}\t{}\tattempt {}\t{}{}",
        s(&t["id"]),
        s(&t["state"]),
        s(&t["attempt"]),
        s(&t["rolloutId"]),
        t["error"]
            .as_str()
            .map(|e| format!("\t{e}"))
            .unwrap_or_default()
    )
}

pub fn rollout_summary(v: &Value) -> String {
    let mut out = format!(
        "rollout {} ({} {}): {}, wave {} of {}, {} in flight (cap {})",
        s(&v["id"]),
        s(&v["kind"]),
        s(&v["version"]),
        s(&v["state"]),
        v["wave"].as_i64().unwrap_or(0) + 1,
        s(&v["waveCount"]),
        s(&v["inFlight"]),
        s(&v["inFlightCap"])
    );
    if let Some(r) = v["reason"].as_str() {
        out.push_str(&format!("\n  reason: {r}"));
    }
    for w in v["waves"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n  wave {}: {} members, {} succeeded, {} failed, {} in flight, {} not started",
            v_i(&w["index"]) + 1,
            s(&w["members"]),
            s(&w["succeeded"]),
            s(&w["failed"]),
            s(&w["inFlight"]),
            s(&w["notStarted"])
        ));
    }
    let b = &v["budget"];
    out.push_str(&format!(
        "\n  budget: {} failed of {} acknowledged (at most the larger of {} and {}%)",
        s(&b["failed"]),
        s(&b["acked"]),
        s(&b["maxFailures"]),
        s(&b["maxFailurePct"])
    ));
    match v["gate"]["verdict"].as_str() {
        Some("met") => out.push_str("\n  gate: met"),
        Some("waiting") => {
            for w in v["gate"]["why"].as_array().into_iter().flatten() {
                out.push_str(&format!("\n  gate not met: {}", s(w)));
            }
        }
        Some("broken") => out.push_str(&format!("\n  gate broken: {}", s(&v["gate"]["why"]))),
        _ => {}
    }
    if let Some(n) = v["floorNote"].as_str() {
        out.push_str(&format!("\n  floor: {n}"));
    }
    if v["canceled"].is_number() {
        out.push_str(&format!(
            "\n  abort: {} canceled, {} asked to cancel (the device answers), {} past the point of no return still finishing",
            s(&v["canceled"]),
            s(&v["canceling"]),
            s(&v["finishing"])
        ));
    }
    if v["holding"].is_number() {
        out.push_str(&format!(
            "\n  freeze: {} devices asked to drop their task before installing (sent again on resume)",
            s(&v["holding"])
        ));
    }
    out
}

fn v_i(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn call(cli: &Cli, method: &str, path: &str, body: Option<String>) -> Result<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let url = format!("{}{path}", cli.api.trim_end_matches('/'));
    let auth = cli.token.as_ref().map(|t| format!("Bearer {t}"));
    let resp = match (method, body) {
        ("GET", _) => {
            let mut r = agent.get(&url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        (m, b) => {
            let r = if m == "PUT" {
                agent.put(&url)
            } else {
                agent.post(&url)
            };
            let mut r = r.header("Content-Type", "application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send(b.unwrap_or_default())
        }
    }
    .with_context(|| {
        format!("calling {method} {url} (is `dualroot-fleet serve` running there?)")
    })?;
    let code = resp.status().as_u16();
    let text = resp
        .into_body()
        .read_to_string()
        .with_context(|| format!("reading the answer of {method} {url}"))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{method} {url} answered {code} with no JSON: {text}"))?;
    if code >= 300 {
        bail!(
            "{method} {url}: {code}: {}",
            v["error"].as_str().unwrap_or(&text)
        );
    }
    Ok(v)
}

fn parse_labels(list: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    let mut labels = std::collections::BTreeMap::new();
    for l in list {
        let Some((k, v)) = l.split_once('=') else {
            bail!("label {l:?} is not key=value");
        };
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config> {
    match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
        }
        None => Ok(Config::default()),
    }
}

fn simulate(cli: &Cli, s: &Simulate) -> Result<()> {
    let labels = parse_labels(&s.label)?;
    let o = crate::sim::Options {
        api: cli.api.clone(),
        register_token: s.register_token.clone(),
        broker_host: s.mqtt_host.clone(),
        broker_port: s.mqtt_port,
        prefix: s.prefix.clone(),
        devices: s.devices,
        version: s.version.clone(),
        legacy: s.legacy,
        labels,
        canaries: s.canaries,
        download_ms: s.download_ms,
        reboot_ms: s.reboot_ms,
        outbox_retry_ms: s.outbox_retry_ms,
        faults: crate::sim::Faults {
            install_fail_pct: s.install_fail_pct,
            rollback_pct: s.rollback_pct,
            silent_pct: s.silent_pct,
            slow_pct: s.slow_pct,
            dup_pct: s.dup_pct,
        },
        operator_token: cli.token.clone(),
        heartbeat_every_ms: s.heartbeat_every_ms,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    if let Some(secs) = s.seconds {
        let st = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            st.store(true, Ordering::SeqCst);
        });
    }
    let report = crate::sim::run(o, stop)?;
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &s.report {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{text}");
    Ok(())
}

fn serve(s: &Serve) -> Result<()> {
    let cfg: Config = match &s.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => Config::default(),
    };
    if !s.db.contains("://") {
        if let Some(dir) = std::path::Path::new(&s.db)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let store = Store::open(&s.db)?;
    if s.tick_ms as i64 * 2 >= cfg.lease_ttl_ms {
        bail!(
            "--tick-ms {} must be under half of lease_ttl_ms ({}) or the lease lapses between ticks",
            s.tick_ms,
            cfg.lease_ttl_ms
        );
    }
    let instance = s
        .instance
        .clone()
        .unwrap_or_else(|| s.mqtt_client_id.clone());
    let fleet = Arc::new(Fleet::named(store, Arc::new(SystemClock), cfg, &instance));
    let http = crate::http::Server::start(fleet.clone(), &s.listen, 4)?;
    let mqtt = crate::mqtt::Mqtt::start(
        fleet.clone(),
        &crate::mqtt::Options {
            host: s.mqtt_host.clone(),
            port: s.mqtt_port,
            client_id: s.mqtt_client_id.clone(),
            keep_alive_s: 30,
        },
    )?;
    log::info!(
        "serving: HTTP on port {}, broker {}:{}, store {}",
        http.port,
        s.mqtt_host,
        s.mqtt_port,
        fleet.store.what
    );
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let mut leading = None;
    while !stop.load(Ordering::SeqCst) {
        match fleet.tick() {
            Ok(lead) => {
                if leading != Some(lead) {
                    log::info!(
                        "{}",
                        if lead {
                            "holding the ticker lease: this instance runs deadlines, rollouts and heartbeats"
                        } else {
                            "another instance holds the ticker lease: taking traffic only"
                        }
                    );
                    leading = Some(lead);
                }
            }
            Err(e) => log::error!("tick: {e:#}; the next tick tries again"),
        }
        std::thread::sleep(Duration::from_millis(s.tick_ms));
    }
    log::info!("stopping");
    mqtt.stop();
    http.stop();
    Ok(())
}
