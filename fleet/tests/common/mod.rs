//! Test harness: a fleet on each store (SQLite in a temp dir; PostgreSQL from
//! the Debian package, one throwaway cluster per test binary on a free
//! loopback port, one database per test), a manual clock, and devices that
//! speak through the agent's own message builder.
#![allow(dead_code)]

use dualroot_api::wire::Status;
use dualroot_fleet::clock::ManualClock;
use dualroot_fleet::config::Config;
use dualroot_fleet::store::{Store, Val};
use dualroot_fleet::tasks::intake::Intake;
use dualroot_fleet::tasks::{self, NewTask, Task};
use dualroot_fleet::{devices, Fleet};
use serde_json::{json, Value};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A result message as the agent builds it (`dualroot_api::wire`), stamped
/// with the wall clock as the agent stamps it with its own.
#[allow(clippy::too_many_arguments)]
pub fn result_message(
    device: &str,
    ack_key: &str,
    task_id: Option<&str>,
    task_type: &str,
    status: Status,
    result: Value,
    error: Option<&str>,
    attempt: u32,
) -> String {
    use dualroot_fleet::clock::Clock;
    dualroot_api::wire::result_message(
        device,
        ack_key,
        task_id,
        task_type,
        status,
        result,
        error,
        attempt,
        dualroot_fleet::clock::SystemClock.now_ms(),
    )
}

/// A heartbeat answer as the agent builds it (`dualroot_api::wire::Heartbeat`):
/// legacy (`slot` None) or A/B (booted slot, confirmed good or not), with the
/// boot id a protocol-2 agent sends and its services (namespace, version, health).
pub fn heartbeat_json(
    dev: &str,
    version: &str,
    slot: Option<(&str, bool)>,
    boot_id: Option<&str>,
    services: &[(&str, &str, &str)],
) -> Value {
    use dualroot_api::wire::{Heartbeat, HeartbeatSlot, ServiceReport, PROTOCOL_VERSION};
    let slot = match slot {
        Some((s, good)) => HeartbeatSlot {
            booted: Some(s.into()),
            primary: dualroot_api::Slot::parse(s),
            fallback: json!(false),
            booted_good: Some(good),
            version: Some(version.into()),
            reason: None,
        },
        None => HeartbeatSlot {
            booted: Some("unknown".into()),
            fallback: json!("unknown"),
            reason: Some("/usr/local/sbin/dualroot not installed".into()),
            ..Default::default()
        },
    };
    serde_json::to_value(Heartbeat {
        device_id: dev.into(),
        firmware_version: Some(version.into()),
        agent_version: Some("0.1.0".into()),
        slot,
        boot_id: boot_id.map(str::to_string),
        protocol: boot_id.map(|_| PROTOCOL_VERSION),
        services: services
            .iter()
            .map(|(code, version, health)| ServiceReport {
                code: code.to_string(),
                version: version.to_string(),
                health: health.to_string(),
            })
            .collect(),
        ..Default::default()
    })
    .unwrap()
}

pub const T0: i64 = 1_800_000_000_000;
pub const MIN: i64 = 60_000;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pg_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists() && p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A PostgreSQL cluster for this test binary. The server runs under a shell
/// that stops it and removes its directory when our stdin pipe closes, which
/// happens when the test process exits, however it exits.
pub struct Pg {
    pub port: u16,
    keeper: Mutex<Child>,
}

/// PostgreSQL refuses to run as root: as root the cluster runs as the
/// `postgres` user (runuser).
fn as_pg_user(cmd: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(cmd);
        c
    } else {
        Command::new(cmd)
    }
}

fn start_pg() -> Option<Pg> {
    let Some(bin) = pg_bin_dir() else {
        eprintln!("SKIPPING PostgreSQL: no /usr/lib/postgresql/*/bin/postgres (Debian package `postgresql`, scripts/install-deps.sh)");
        return None;
    };
    let dir = tempfile::Builder::new()
        .prefix("fleet-pg-")
        .tempdir()
        .unwrap()
        .keep();
    if is_root() {
        let st = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "chown {} to postgres", dir.display());
    }
    let data = dir.join("data");
    let out = as_pg_user(&bin.join("initdb"))
        .args([
            "-U",
            "fleet",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "-D",
        ])
        .arg(&data)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let script = format!(
        "'{pg}' -D '{data}' -p {port} -k '{dir}' -c listen_addresses=127.0.0.1 -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off >'{dir}/log' 2>&1 & p=$!; \
         read _; kill -INT $p; wait $p; rm -rf '{dir}'",
        pg = bin.join("postgres").display(),
        data = data.display(),
        dir = dir.display()
    );
    let keeper = as_pg_user(Path::new("/bin/sh"))
        .args(["-c", &script])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if postgres::Client::connect(
            &format!("host=127.0.0.1 port={port} user=fleet dbname=postgres"),
            postgres::NoTls,
        )
        .is_ok()
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "PostgreSQL did not start on port {port}: {}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Pg {
        port,
        keeper: Mutex::new(keeper),
    })
}

impl Pg {
    /// Stops the server now (the keeper sees its stdin close).
    pub fn stop(&self) {
        let mut k = self.keeper.lock().unwrap();
        if let Some(mut stdin) = k.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let _ = k.wait();
    }
}

static PG: OnceLock<Option<Pg>> = OnceLock::new();
static DB_SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh database on the shared cluster; `None` when PostgreSQL is missing.
pub fn pg_url(test: &str) -> Option<String> {
    let pg = PG.get_or_init(start_pg).as_ref()?;
    let name = format!(
        "{}_{}",
        test.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        DB_SEQ.fetch_add(1, Ordering::SeqCst)
    )
    .to_lowercase();
    let mut c = postgres::Client::connect(
        &format!("host=127.0.0.1 port={} user=fleet dbname=postgres", pg.port),
        postgres::NoTls,
    )
    .unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    Some(format!("postgres://fleet@127.0.0.1:{}/{name}", pg.port))
}

pub const PREFIX: &str = "drtest";
pub const REGISTER_TOKEN: &str = "reg-token";

pub fn config() -> Config {
    let mut c = Config {
        topic_prefix: PREFIX.into(),
        heartbeat_interval_ms: MIN,
        resend_interval_ms: 5 * MIN,
        max_resends: 2,
        ..Config::default()
    };
    c.register_tokens.insert(
        REGISTER_TOKEN.into(),
        [("site".to_string(), "lab".to_string())].into(),
    );
    c
}

pub struct H {
    pub name: &'static str,
    pub fleet: Fleet,
    pub clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

/// A harness on SQLite in a temp dir.
pub fn sqlite_harness(cfg: Config) -> H {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fleet.sqlite");
    let clock = Arc::new(ManualClock::new(T0));
    H {
        name: "sqlite",
        fleet: Fleet::new(
            Store::open(db.to_str().unwrap()).unwrap(),
            clock.clone(),
            cfg,
        ),
        clock,
        _dir: dir,
    }
}

/// One harness per store: SQLite always, PostgreSQL when installed.
pub fn harnesses(test: &str, cfg: Config) -> Vec<H> {
    let mut out = vec![sqlite_harness(cfg.clone())];
    if let Some(url) = pg_url(test) {
        let clock = Arc::new(ManualClock::new(T0));
        out.push(H {
            name: "postgres",
            fleet: Fleet::new(Store::open(&url).unwrap(), clock.clone(), cfg),
            clock,
            _dir: tempfile::tempdir().unwrap(),
        });
    }
    out
}

/// A harness on an existing database, sharing a clock, named in the lease
/// (several controllers on one PostgreSQL).
pub fn harness_on(url: &str, cfg: Config, clock: Arc<ManualClock>, instance: &str) -> H {
    H {
        name: "postgres",
        fleet: Fleet::named(Store::open(url).unwrap(), clock.clone(), cfg, instance),
        clock,
        _dir: tempfile::tempdir().unwrap(),
    }
}

/// Runs `f` on every store; the store's name is printed so a failure says
/// which one failed.
pub fn each_store(test: &str, f: impl Fn(&H)) {
    each_store_with(test, config(), f)
}

pub fn each_store_with(test: &str, cfg: Config, f: impl Fn(&H)) {
    for h in harnesses(test, cfg.clone()) {
        println!("--- {test} on {}", h.name);
        f(&h);
    }
}

static HB_SEQ: AtomicU32 = AtomicU32::new(0);

impl H {
    pub fn now(&self) -> i64 {
        self.fleet.now()
    }
    pub fn advance(&self, ms: i64) {
        self.clock.advance(ms);
    }
    /// Moves the clock in steps of one heartbeat interval, every device
    /// answering its heartbeat with what it runs (so none goes offline).
    pub fn advance_alive(&self, ms: i64) {
        let iv = self.fleet.cfg.heartbeat_interval_ms;
        let mut left = ms;
        while left > 0 {
            let step = left.min(iv);
            self.advance(step);
            left -= step;
            let now = self.now();
            let devs = self
                .fleet
                .store
                .tx(|tx| devices::list(tx, &self.fleet.cfg, now))
                .unwrap();
            for d in devs.iter().filter(|d| d.last_seen.is_some_and(|t| t > 0)) {
                let v = d.version.clone().unwrap_or_default();
                let slot = d.slot.as_deref().map(|s| (s, true));
                self.heartbeat_boot(&d.id, &v, slot, d.current_boot_id.as_deref());
            }
        }
    }

    pub fn tick(&self) {
        self.fleet.tick().unwrap();
    }

    /// Registers a device (as the agent's POST /register would).
    pub fn register(&self) -> String {
        let now = self.now();
        self.fleet
            .store
            .tx(|tx| {
                devices::register(
                    tx,
                    &self.fleet.cfg,
                    now,
                    REGISTER_TOKEN,
                    &json!({"model": "va-1"}),
                )
            })
            .unwrap()
            .unwrap()
            .device_id
    }

    pub fn label(&self, dev: &str, k: &str, v: &str) {
        let mut labels = self.device(dev).labels;
        labels.insert(k.into(), v.into());
        self.fleet
            .store
            .tx(|tx| devices::set_labels(tx, self.now(), dev, &labels))
            .unwrap();
    }

    pub fn device(&self, dev: &str) -> devices::Device {
        let now = self.now();
        self.fleet
            .store
            .tx(|tx| devices::get(tx, &self.fleet.cfg, now, dev))
            .unwrap()
            .unwrap()
    }

    /// A message as the agent builds it, on the topic the agent uses.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &self,
        dev: &str,
        ack_key: &str,
        task_id: Option<&str>,
        task_type: &str,
        status: Status,
        result: Value,
        error: Option<&str>,
    ) -> Intake {
        let msg = result_message(dev, ack_key, task_id, task_type, status, result, error, 1);
        let topics = dualroot_api::wire::Topics::new(PREFIX, dev);
        self.fleet
            .ingest(topics.result_topic(task_type), msg.as_bytes())
            .unwrap()
    }

    /// A heartbeat answer of a protocol-1 agent (no boot id): legacy
    /// (`slot` None) or A/B (booted slot, good).
    pub fn heartbeat(&self, dev: &str, version: &str, slot: Option<(&str, bool)>) -> Intake {
        self.heartbeat_boot(dev, version, slot, None)
    }

    /// A heartbeat answer as the agent builds it (`dualroot_api::wire::Heartbeat`),
    /// with the boot id a protocol-2 agent reports.
    pub fn heartbeat_boot(
        &self,
        dev: &str,
        version: &str,
        slot: Option<(&str, bool)>,
        boot_id: Option<&str>,
    ) -> Intake {
        self.heartbeat_services(dev, version, slot, boot_id, &[])
    }

    /// [`H::heartbeat_boot`] with installed services: (namespace, version, health).
    pub fn heartbeat_services(
        &self,
        dev: &str,
        version: &str,
        slot: Option<(&str, bool)>,
        boot_id: Option<&str>,
        services: &[(&str, &str, &str)],
    ) -> Intake {
        let key = format!("hb-test-{}", HB_SEQ.fetch_add(1, Ordering::SeqCst));
        self.send(
            dev,
            &key,
            Some(&key),
            "heartbeat",
            Status::Done,
            heartbeat_json(dev, version, slot, boot_id, services),
            None,
        )
    }

    pub fn boot_confirmed(&self, dev: &str, boot_id: &str, slot: &str, version: &str) -> Intake {
        self.send(
            dev,
            &format!("boot-confirmed-{boot_id}"),
            None,
            "bootConfirmed",
            Status::Done,
            json!({"slot": slot, "version": version, "firmwareVersion": version}),
            None,
        )
    }

    /// An A/B device on `version`, online, booted `boot_id`.
    pub fn ab_device(&self, version: &str, boot_id: &str) -> String {
        let d = self.register();
        self.heartbeat(&d, version, Some(("a", true)));
        self.boot_confirmed(&d, boot_id, "a", version);
        d
    }

    pub fn create(&self, dev: &str, task_type: &str, body: Value, target: Option<&str>) -> Task {
        let now = self.now();
        let new = NewTask {
            device_id: dev.into(),
            task_type: task_type.into(),
            body,
            target_version: target.map(str::to_string),
            rollout_id: None,
        };
        self.fleet
            .store
            .tx(|tx| tasks::create(tx, &self.fleet.cfg, now, &new, true))
            .unwrap()
    }

    pub fn task(&self, id: &str) -> Task {
        self.fleet
            .store
            .tx(|tx| tasks::get(tx, id))
            .unwrap()
            .unwrap()
    }

    pub fn history(&self, id: &str) -> Vec<(i64, String, String, String)> {
        self.fleet.store.tx(|tx| tasks::history(tx, id)).unwrap()
    }

    /// Every outbox row: (topic, payload JSON), oldest first.
    pub fn outbox(&self) -> Vec<(String, Value)> {
        self.fleet
            .store
            .tx(|tx| {
                Ok(tx
                    .query("SELECT topic, payload FROM outbox ORDER BY id", &[])?
                    .iter()
                    .map(|r| (r.str(0), serde_json::from_str(&r.str(1)).unwrap()))
                    .collect())
            })
            .unwrap()
    }

    /// Task messages in the outbox for a device's tasks topic.
    pub fn sent_tasks(&self, dev: &str) -> Vec<Value> {
        let topic = format!("{PREFIX}/{dev}/tasks");
        self.outbox()
            .into_iter()
            .filter(|(t, p)| *t == topic && p["taskType"] != "heartbeat")
            .map(|(_, p)| p)
            .collect()
    }

    /// ackKeys sent back to a device.
    pub fn acks(&self, dev: &str) -> Vec<String> {
        let topic = format!("{PREFIX}/{dev}/acks");
        self.outbox()
            .into_iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, p)| p["taskId"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn sql(&self, q: &str, params: &[Val]) -> anyhow::Result<u64> {
        self.fleet.store.tx(|tx| tx.exec(q, params))
    }
}
