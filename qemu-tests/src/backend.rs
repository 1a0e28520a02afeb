//! The cloud side of the agent_e2e scenarios (issue 16): a real mosquitto,
//! the MQTT backend that publishes tasks and acks results, and the HTTP server
//! (registration, files with Range/If-Range, a switch that cuts a transfer).
//! Broker, backend and server are agent-lib's own test code
//! (`agent-lib/tests/common/{broker,http}.rs`, included here), so the agent
//! meets the same backend in QEMU as in its host tests. Everything listens on
//! 127.0.0.1; the guest reaches it only through [`Cloud::guestfwd`] rules.

#[path = "../../agent-lib/tests/common/broker.rs"]
pub mod broker;
#[path = "../../agent-lib/tests/common/http.rs"]
pub mod http;

pub use broker::{Backend, Broker, PREFIX};
pub use http::{Req, Resp, Server};

use crate::error::{Context, Result};
use crate::qemu::{GuestFwd, GUESTFWD_ADDR};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Guest-side ports of the two forwards (on [`GUESTFWD_ADDR`]).
pub const MQTT_GUEST_PORT: u16 = 1883;
pub const HTTP_GUEST_PORT: u16 = 8080;
/// The register token shipped with the appliance (`/etc/dualroot/register-token`).
pub const REGISTER_TOKEN: &str = "e2e-register-jwt";

/// A file the HTTP server serves, as a task names it.
#[derive(Debug, Clone)]
pub struct Served {
    /// Path on the server (`/files/...`).
    pub path: String,
    /// The URL as the guest sees it.
    pub url: String,
    pub sha256: String,
    pub size: u64,
}

/// Broker, MQTT backend and HTTP server for one scenario; all stop on drop.
pub struct Cloud {
    pub broker: Broker,
    pub mqtt: Backend,
    pub http: Server,
    /// Device ids handed out by `/api/register`, in order.
    issued: Arc<Mutex<Vec<String>>>,
}

/// `POST /api/register` (Bearer register token) hands out a new device id on
/// every call, so a second registration shows as a second id;
/// `POST /api/token/refresh` (Bearer device token) keeps the id.
fn registration(r: &Req, issued: &Mutex<Vec<String>>) -> Option<Resp> {
    let auth = r.headers.get("authorization").cloned().unwrap_or_default();
    match (r.method.as_str(), r.path.as_str()) {
        ("POST", "/api/register") => {
            if auth != format!("Bearer {REGISTER_TOKEN}") {
                return Some(Resp::json(401, &json!({"error": "bad register token"})));
            }
            let mut ids = issued.lock().unwrap_or_else(|e| e.into_inner());
            let id = format!("va-e2e-{}", ids.len() + 1);
            ids.push(id.clone());
            Some(Resp::json(
                200,
                &json!({"deviceId": id, "deviceToken": format!("devtok-{id}"), "expiresIn": 86400}),
            ))
        }
        ("POST", "/api/token/refresh") => {
            let id = auth.strip_prefix("Bearer devtok-")?.to_string();
            Some(Resp::json(
                200,
                &json!({"deviceId": id, "deviceToken": format!("devtok-{id}"), "expiresIn": 86400}),
            ))
        }
        _ => None,
    }
}

impl Cloud {
    /// Starts mosquitto (files under `dir/broker`), the backend and the HTTP server.
    pub fn start(dir: &Path) -> Cloud {
        let broker = Broker::start(dir);
        let mqtt = Backend::start(broker.port);
        let http = Server::start();
        let issued = Arc::new(Mutex::new(Vec::new()));
        let ids = issued.clone();
        http.set_handler(move |r| registration(r, &ids));
        println!(
            "[cloud] mosquitto on 127.0.0.1:{}, HTTP on 127.0.0.1:{}",
            broker.port, http.port
        );
        Cloud {
            broker,
            mqtt,
            http,
            issued,
        }
    }

    /// The forwards a guest needs: MQTT and HTTP on [`GUESTFWD_ADDR`], each
    /// connection relayed by `relay` (the `guestfwd-relay` binary) to the
    /// host port.
    pub fn guestfwd(&self, relay: &Path) -> Vec<GuestFwd> {
        let cmd = |port: u16| format!("'{}' {port}", relay.display());
        vec![
            GuestFwd {
                guest_port: MQTT_GUEST_PORT,
                cmd: cmd(self.broker.port),
            },
            GuestFwd {
                guest_port: HTTP_GUEST_PORT,
                cmd: cmd(self.http.port),
            },
        ]
    }

    /// The backend's base URL as the guest sees it.
    pub fn guest_base(&self) -> String {
        format!("http://{GUESTFWD_ADDR}:{HTTP_GUEST_PORT}")
    }

    /// Serves `file` at `path` (read into memory, ETag from its hash).
    pub fn serve_file(&self, path: &str, file: &Path) -> Result<Served> {
        let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let sha256 = hex::encode(Sha256::digest(&data));
        let size = data.len() as u64;
        self.http
            .add_file(path, data, &format!("\"{}\"", &sha256[..16]));
        Ok(Served {
            path: path.into(),
            url: format!("{}{path}", self.guest_base()),
            sha256,
            size,
        })
    }

    /// Device ids `/api/register` handed out.
    pub fn issued_ids(&self) -> Vec<String> {
        self.issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The agent's config on the guest (`/etc/dualroot/agent.toml`): no device
    /// id (it registers with the shipped token), the default state directory
    /// (`/data/dualroot-agent` on an A/B appliance), the real engine, and the
    /// test image's version file as the firmware version (it comes with each
    /// slot's OS, unlike `/etc/dualroot/version`, which is carried).
    pub fn agent_config(&self) -> String {
        self.agent_config_for(
            GUESTFWD_ADDR,
            MQTT_GUEST_PORT,
            HTTP_GUEST_PORT,
            Path::new("/etc/dualroot/register-token"),
        )
    }

    /// [`Cloud::agent_config`] for an agent that reaches the cloud at `host`
    /// on these ports (the host's own view: 127.0.0.1 and the real ports).
    pub fn agent_config_for(
        &self,
        host: &str,
        mqtt_port: u16,
        http_port: u16,
        register_token_file: &Path,
    ) -> String {
        agent_toml(
            host,
            mqtt_port,
            PREFIX,
            &format!("http://{host}:{http_port}/api"),
            register_token_file,
        )
    }

    pub fn publish(&self, device: &str, task_id: &str, task_type: &str, body: Value) {
        println!("[cloud] task {task_id} ({task_type}) to {device}");
        self.mqtt.publish_task(device, task_id, task_type, body);
    }

    /// Every message the backend received, in arrival order.
    pub fn messages(&self) -> Vec<Value> {
        self.mqtt.all()
    }

    /// Result messages (not `in_progress`) for an ack key.
    pub fn results_for(&self, key: &str) -> Vec<Value> {
        self.mqtt.results_for(key)
    }

    /// Device ids of every message the backend received.
    pub fn devices_seen(&self) -> BTreeSet<String> {
        self.messages()
            .iter()
            .filter_map(|m| m["deviceId"].as_str().map(str::to_string))
            .collect()
    }

    /// Waits for the first result (not `in_progress`) for `key`.
    pub fn wait_result(&self, key: &str, timeout: Duration) -> Result<Value> {
        let t0 = Instant::now();
        loop {
            if let Some(r) = self.results_for(key).into_iter().next() {
                return Ok(r);
            }
            if t0.elapsed() > timeout {
                crate::bail!(
                    "no result for {key} within {} s; the backend got: {}",
                    timeout.as_secs(),
                    self.summary()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits for the first message for which `f` holds.
    pub fn wait_message(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let t0 = Instant::now();
        loop {
            if let Some(m) = self.messages().into_iter().find(|m| f(m)) {
                return Ok(m);
            }
            if t0.elapsed() > timeout {
                crate::bail!(
                    "no {what} within {} s; the backend got: {}",
                    timeout.as_secs(),
                    self.summary()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Publishes a `heartbeat` task with id `task_id` and returns its answer
    /// (the result message's `result`). A device that is not subscribed yet
    /// misses a task, so the task is published again (same id: the agent runs
    /// an id once) every 15 s until an answer comes.
    pub fn heartbeat(&self, device: &str, task_id: &str, timeout: Duration) -> Result<Value> {
        let t0 = Instant::now();
        loop {
            self.publish(device, task_id, "heartbeat", json!({}));
            if let Ok(r) = self.wait_result(task_id, Duration::from_secs(15)) {
                println!("[cloud] heartbeat {task_id}: {}", r["result"]);
                return Ok(r["result"].clone());
            }
            if t0.elapsed() > timeout {
                crate::bail!(
                    "no heartbeat answer from {device} within {} s; the backend got: {}",
                    timeout.as_secs(),
                    self.summary()
                );
            }
        }
    }

    /// One line per message received (for errors): type, key, status, device.
    pub fn summary(&self) -> String {
        let m = self.messages();
        if m.is_empty() {
            return "nothing".into();
        }
        m.iter()
            .map(|v| {
                format!(
                    "{} {} {} from {}",
                    v["taskType"].as_str().unwrap_or("?"),
                    v["ackKey"].as_str().unwrap_or("?"),
                    v["status"].as_str().unwrap_or("?"),
                    v["deviceId"].as_str().unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// An agent config (`/etc/dualroot/agent.toml`) for a lab cloud: the broker at
/// `host:mqtt_port` with `topic_prefix`, registration at `backend_url`, the
/// register token in `register_token_file`; no device id (it registers), the
/// default state directory (`/data/dualroot-agent` on an A/B appliance), the
/// real engine, and the test image's version file as the firmware version (it
/// comes with each slot's OS, unlike `/etc/dualroot/version`, which is carried).
pub fn agent_toml(
    host: &str,
    mqtt_port: u16,
    topic_prefix: &str,
    backend_url: &str,
    register_token_file: &Path,
) -> String {
    format!(
        "# the harness's broker and backend are plain text on loopback or the\n\
         # host: a lab, so the transport check is waived\n\
         insecure = true\n\
         firmware_version_file = \"/etc/dualroot-test-version\"\n\
         dualroot_bin = \"/usr/local/sbin/dualroot\"\n\n\
         [mqtt]\nhost = \"{host}\"\nport = {mqtt_port}\ntopic_prefix = \"{topic_prefix}\"\n\
         keep_alive_secs = 15\nsession_expiry_secs = 86400\nbackoff_initial_ms = 500\n\
         backoff_max_ms = 5000\noutbox_retry_secs = 10\n\n\
         [journal]\nttl_secs = 172800\n\n\
         [backend]\nurl = \"{backend_url}\"\nregister_token_file = \"{token}\"\n\n\
         [downloads]\nstall_timeout_secs = 60\n\
         # the harness serves plain http on the host (guestfwd) or loopback\n\
         allow_http = true\nallow_local = true\n\n\
         [upgrade]\nhealth_timeout_secs = 600\n\n\
         [logs]\npaths = []\njournalctl_lines = 0\n",
        token = register_token_file.display()
    )
}
