//! A real mosquitto and a backend that plays the cloud over MQTT: shared by
//! agent-lib's tests and qemu-tests' agent_e2e scenarios (which include this
//! file with `#[path]`), so both drive the agent with the same code.

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
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
