//! Test harness: a real mosquitto per test, the agent binary as a child
//! process, a backend that plays the cloud over MQTT, and a tiny HTTP server.
#![allow(dead_code)]

pub mod http;

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const PREFIX: &str = "drtest";

/// SIGTERM through the shell's builtin `kill` (no procps needed).
pub fn sigterm(pid: u32) {
    let st = Command::new("sh")
        .args(["-c", "kill -TERM \"$1\"", "sh", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -TERM {pid}");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mosquitto_bin() -> String {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "mosquitto".into()
}

/// A mosquitto on a free loopback port with persistence on; killed on drop.
pub struct Broker {
    pub port: u16,
    /// Extra TLS listener (port, CA PEM path) when started with `start_tls`.
    pub tls: Option<(u16, PathBuf)>,
    /// The TLS listener requires a client certificate signed by the CA
    /// (`require_certificate true`); `client.pem`/`client.key` are made for it.
    pub require_client_cert: bool,
    /// With persistence off a restart loses every session and queued message.
    pub persistence: bool,
    dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        let dir = dir.join("broker");
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = Broker {
            port: free_port(),
            tls: None,
            require_client_cert: false,
            persistence: true,
            dir,
            child: None,
        };
        b.spawn();
        b
    }

    /// Plain listener plus a TLS listener whose certificate (for 127.0.0.1)
    /// is signed by a CA generated here.
    pub fn start_tls(dir: &Path) -> Broker {
        Broker::start_tls_with(dir, false)
    }

    /// Like `start_tls`, but the TLS listener refuses clients without a
    /// certificate signed by its CA; one is written to `client_pair()`.
    pub fn start_tls_client_auth(dir: &Path) -> Broker {
        Broker::start_tls_with(dir, true)
    }

    /// Client certificate and key (PEM) signed by the broker's CA.
    pub fn client_pair(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("client.pem"), self.dir.join("client.key"))
    }

    fn start_tls_with(dir: &Path, require_client_cert: bool) -> Broker {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let bdir = dir.join("broker");
        std::fs::create_dir_all(&bdir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(bdir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(bdir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(bdir.join("server.key"), key.serialize_pem()).unwrap();
        // a client certificate for the device, signed by the same CA
        let ckey = KeyPair::generate().unwrap();
        let mut cparams = CertificateParams::new(Vec::<String>::new()).unwrap();
        cparams
            .distinguished_name
            .push(rcgen::DnType::CommonName, "dev-mtls");
        let ccert = cparams.signed_by(&ckey, &ca).unwrap();
        std::fs::write(bdir.join("client.pem"), ccert.pem()).unwrap();
        std::fs::write(bdir.join("client.key"), ckey.serialize_pem()).unwrap();
        let mut b = Broker {
            port: free_port(),
            tls: Some((free_port(), bdir.join("ca.pem"))),
            require_client_cert,
            persistence: true,
            dir: bdir,
            child: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        let tls = match &self.tls {
            Some((port, _)) => format!(
                "listener {port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n{req}",
                d = self.dir.display(),
                req = if self.require_client_cert {
                    "require_certificate true\n"
                } else {
                    ""
                },
            ),
            None => String::new(),
        };
        std::fs::write(
            &conf,
            tls + &format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n\
                 persistence {persistence}\npersistence_location {dir}/\nautosave_interval 1\n\
                 persistent_client_expiration 1d\nmax_queued_messages 100000\n\
                 max_inflight_messages 100\nmessage_size_limit 0\n\
                 log_dest file {dir}/mosquitto.log\nlog_type error\nlog_type warning\nlog_type notice\n",
                port = self.port,
                dir = self.dir.display(),
                persistence = self.persistence,
            ),
        )
        .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        for port in [Some(self.port), self.tls.as_ref().map(|t| t.0)]
            .into_iter()
            .flatten()
        {
            wait_until("mosquitto to listen", Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
        }
    }

    /// Graceful stop (SIGTERM, so the persistence file is written) and start
    /// again on the same port with the same persistence directory.
    pub fn restart(&mut self, down_for: Duration) {
        self.stop();
        std::thread::sleep(down_for);
        self.spawn();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigterm(c.id());
            let start = Instant::now();
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The agent binary as a child process; SIGKILLed on drop.
pub struct AgentProc {
    pub dir: PathBuf,
    pub device_id: String,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    starts: u32,
    pub log_level: String,
}

pub struct AgentOpts {
    pub max_payload: usize,
    pub dualroot_bin: String,
    pub extra: String,
    /// Extra lines for the `[mqtt]` table.
    pub mqtt_extra: String,
    pub session_expiry_secs: u64,
    pub ttl_secs: u64,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            max_payload: 64 * 1024,
            dualroot_bin: "/nonexistent/dualroot".into(),
            extra: String::new(),
            mqtt_extra: String::new(),
            session_expiry_secs: 86400,
            ttl_secs: 172800,
        }
    }
}

impl AgentProc {
    pub fn new(dir: &Path, device_id: &str, port: u16, o: AgentOpts) -> AgentProc {
        let dir = dir.join(format!("agent-{device_id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "device_id = \"{device_id}\"\nfirmware_version = \"9.9.9-test\"\n\
                 data_dir = \"{data}\"\ndualroot_bin = \"{dr}\"\n{extra}\n\
                 [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\ntopic_prefix = \"{PREFIX}\"\n\
                 keep_alive_secs = 5\nmax_payload_bytes = {max}\nbackoff_initial_ms = 100\n\
                 backoff_max_ms = 1000\noutbox_retry_secs = 2\nsession_expiry_secs = {sess}\n{mqtt_extra}\n\
                 [journal]\nttl_secs = {ttl}\n[logs]\npaths = []\njournalctl_lines = 0\n\
                 [debug]\ntest_tasks = true\n",
                data = dir.join("data").display(),
                dr = o.dualroot_bin,
                max = o.max_payload,
                extra = o.extra,
                mqtt_extra = o.mqtt_extra,
                sess = o.session_expiry_secs,
                ttl = o.ttl_secs,
            ),
        )
        .unwrap();
        AgentProc {
            log: dir.join("agent.log"),
            dir,
            device_id: device_id.into(),
            config,
            child: None,
            starts: 0,
            log_level: std::env::var("AGENT_TEST_LOG").unwrap_or_else(|_| "info".into()),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the agent; `failpoints` as in `DUALROOT_AGENT_FAILPOINTS`.
    /// Waits until it is subscribed to its task topic.
    pub fn start(&mut self, failpoints: &str) {
        let before = self.count_log("subscribed to");
        self.start_nowait(failpoints);
        wait_until("agent to subscribe", Duration::from_secs(20), || {
            self.count_log("subscribed to") > before
        });
    }

    /// Starts the agent without waiting for anything.
    pub fn start_nowait(&mut self, failpoints: &str) {
        self.starts += 1;
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dualroot-agent"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("DUALROOT_AGENT_FAILPOINTS", failpoints)
            .env("DUALROOT_AGENT_LOG", &self.log_level)
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Waits until the agent process has exited; its exit code (None: signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take().expect("agent running");
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                panic!("agent did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
        for fp in [
            "after_journal",
            "after_claim",
            "in_task",
            "after_finish",
            "after_publish",
        ] {
            let _ = std::fs::remove_file(self.data_dir().join(format!("failpoint-{fp}")));
        }
    }

    /// SIGTERM (what systemd sends) and wait for the exit; returns its status code.
    pub fn term(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        sigterm(c.id());
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                panic!("agent did not stop within {timeout:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    pub fn wait_failpoint(&self, name: &str) {
        let p = self.data_dir().join(format!("failpoint-{name}"));
        wait_until(
            &format!("failpoint {name}"),
            Duration::from_secs(20),
            || p.exists(),
        );
    }

    pub fn journal(&self) -> agent_lib::journal::Journal {
        agent_lib::journal::Journal::open(&self.data_dir().join("journal.sqlite")).unwrap()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- agent {} log (last 60 lines) ---", self.device_id);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Plays the cloud: publishes tasks, collects results and heartbeats, acks them.
pub struct Backend {
    client: Client,
    pub results: Arc<Mutex<Vec<Value>>>,
    pub auto_ack: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    connected: Arc<AtomicBool>,
}

impl Backend {
    pub fn start(port: u16) -> Backend {
        let id = format!("backend-{:x}", fastrand::u64(..));
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(64 << 20, 64 << 20)
            .set_request_channel_capacity(100_000)
            .set_inflight(200);
        let (client, mut conn) = Client::new(o, 100_000);
        let results = Arc::new(Mutex::new(Vec::new()));
        let auto_ack = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(false));
        {
            let (client, results, auto_ack, stop, connected) = (
                client.clone(),
                results.clone(),
                auto_ack.clone(),
                stop.clone(),
                connected.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match conn.recv_timeout(Duration::from_millis(200)) {
                        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                            let _ = client
                                .try_subscribe(format!("{PREFIX}/+/results"), QoS::AtLeastOnce);
                            let _ = client
                                .try_subscribe(format!("{PREFIX}/+/heartbeat"), QoS::AtLeastOnce);
                        }
                        Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                            connected.store(true, Ordering::SeqCst);
                        }
                        Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                            let Ok(mut v) = serde_json::from_slice::<Value>(&p.payload) else {
                                continue;
                            };
                            v["_topic"] = json!(p.topic);
                            let dev = v["deviceId"].as_str().unwrap_or("").to_string();
                            let key = v["ackKey"].as_str().unwrap_or("").to_string();
                            let is_progress = v["status"] == "in_progress";
                            results.lock().unwrap().push(v);
                            if auto_ack.load(Ordering::SeqCst) && !is_progress {
                                let _ = client.try_publish(
                                    format!("{PREFIX}/{dev}/acks"),
                                    QoS::AtLeastOnce,
                                    false,
                                    json!({"taskId": key}).to_string(),
                                );
                            }
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => std::thread::sleep(Duration::from_millis(200)),
                        Err(rumqttc::RecvTimeoutError::Timeout) => {}
                        Err(_) => break,
                    }
                }
            });
        }
        let b = Backend {
            client,
            results,
            auto_ack,
            stop,
            connected,
        };
        let c = b.connected.clone();
        wait_until("backend to subscribe", Duration::from_secs(10), || {
            c.load(Ordering::SeqCst)
        });
        b
    }

    pub fn publish_raw(&self, device: &str, payload: Vec<u8>) {
        self.client
            .publish(
                format!("{PREFIX}/{device}/tasks"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .unwrap();
    }

    pub fn publish_task(&self, device: &str, task_id: &str, task_type: &str, body: Value) {
        let m = json!({"taskId": task_id, "taskType": task_type, "body": body});
        self.publish_raw(device, m.to_string().into_bytes());
    }

    /// Result messages (not "in progress") for a key.
    pub fn results_for(&self, key: &str) -> Vec<Value> {
        self.results
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["ackKey"] == key && v["status"] != "in_progress")
            .cloned()
            .collect()
    }

    pub fn all(&self) -> Vec<Value> {
        self.results.lock().unwrap().clone()
    }

    pub fn wait_result(&self, key: &str, n: usize, timeout: Duration) -> Vec<Value> {
        wait_until(&format!("{n} result(s) for {key}"), timeout, || {
            self.results_for(key).len() >= n
        });
        self.results_for(key)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.client.try_disconnect();
    }
}

/// Lines of a marker file written by `test.sleep` tasks.
pub fn marker_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Writes an executable shell script (test doubles of external programs).
pub fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A vendor key for service packages: the keyring directory (with the
/// public key in the engine's `*.pub` format) and the signing key.
pub fn vendor_keyring(dir: &Path) -> (PathBuf, ed25519_dalek::SigningKey) {
    use base64::Engine;
    let ring = dir.join("keyring");
    std::fs::create_dir_all(&ring).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    std::fs::write(
        ring.join("vendor.pub"),
        format!(
            "dualroot-ed25519 {} vendor test key\n",
            base64::engine::general_purpose::STANDARD.encode(key.verifying_key().as_bytes())
        ),
    )
    .unwrap();
    (ring, key)
}

/// The `signature` field of an installService task for a package with this sha256.
pub fn sign_package(key: &ed25519_dalek::SigningKey, sha256_hex: &str) -> String {
    use base64::Engine;
    use ed25519_dalek::Signer;
    let msg = agent_lib::keyring::package_message(sha256_hex);
    base64::engine::general_purpose::STANDARD.encode(key.sign(&msg).to_bytes())
}

/// A service package (`tar.gz`) with these files.
pub fn package(files: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let enc = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
        let mut b = tar::Builder::new(enc);
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_bytes()).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
    }
    out
}

/// Shell for a kubectl double: `create --dry-run=client -o json ... -f FILE`
/// prints FILE (test manifests are JSON, which is YAML too), as kubectl
/// would print the objects it read.
pub const KUBECTL_RENDER: &str = r#"if [ "$1 $2" = "create --dry-run=client" ]; then
  for a; do last=$a; done; cat "$last"; exit 0
fi"#;

/// What the real `dualroot slot status --json` prints for this state, made from
/// the contract types (the doubles at the process boundary cannot drift from
/// the engine: initrd-tool's tests/contract.rs checks the real binary's output
/// against the same types).
pub fn slot_status_json(booted: &str, booted_state: &str, fallback: bool, version: &str) -> String {
    use dualroot_api::{Slot, SlotInfo, SlotState, SlotStatus, API_VERSION};
    let b = Slot::parse(booted).expect("slot a or b");
    let state = SlotState::from_env(booted_state);
    let info = |s: Slot| SlotInfo {
        slot: s,
        lv: s.lv().into(),
        state: if s == b {
            state
        } else if fallback {
            SlotState::Bad
        } else {
            SlotState::Good
        },
        tries_left: (s == b && state == SlotState::Trying).then_some(2),
        os_id: Some("debian".into()),
        version: Some(if s == b { version.into() } else { "0".into() }),
        kernel: Some("6.12.117+deb13-amd64".into()),
    };
    serde_json::to_string(&SlotStatus {
        api_version: API_VERSION,
        booted: Some(b),
        primary: b,
        fallback_from: fallback.then(|| b.other()),
        last_boot_was_fallback: fallback,
        fallback_tries_used: fallback.then_some(3),
        version: Some(version.into()),
        migrating: false,
        slots: vec![info(Slot::A), info(Slot::B)],
    })
    .unwrap()
}

/// What the real `dualroot slot install --json` prints after installing into `slot`.
pub fn install_report_json(slot: &str, version: &str) -> String {
    use dualroot_api::{InstallReport, Slot, SlotState, API_VERSION};
    let s = Slot::parse(slot).expect("slot a or b");
    serde_json::to_string(&InstallReport {
        api_version: API_VERSION,
        slot: s,
        lv: s.lv().into(),
        state: SlotState::Installed,
        os_id: "debian".into(),
        version: version.into(),
        entries: 1,
        unpack_seconds: 0.1,
        seconds: 0.2,
        next: format!("run `dualroot slot switch` to boot slot {s} next"),
    })
    .unwrap()
}
