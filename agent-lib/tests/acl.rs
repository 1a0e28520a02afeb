//! The broker access-control contract (issue 23 item 3): a real mosquitto
//! configured with `broker/dualroot.acl` and the settings of
//! `broker/mosquitto-dualroot.conf` (no anonymous clients, user name = device
//! id = client id). The real agent of device B works under it (its tasks,
//! acks, results and heartbeats pass), while device A, with valid credentials
//! of its own, can neither read B's tasks, nor send B a task, nor forge a
//! result for B, nor take over B's session by using B's client id.

mod common;

use common::*;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

struct AclBroker {
    port: u16,
    child: Child,
}

impl Drop for AclBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn passwd(file: &Path, user: &str, pass: &str) {
    let mut c = Command::new("mosquitto_passwd");
    if !file.exists() {
        c.arg("-c");
    }
    let st = c.arg("-b").arg(file).args([user, pass]).status().unwrap();
    assert!(st.success(), "mosquitto_passwd {user}");
}

fn start_broker(dir: &Path, users: &[(&str, &str)]) -> AclBroker {
    let acl =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/dualroot.acl"))
            .unwrap()
            .replace("dualroot/", &format!("{PREFIX}/"));
    std::fs::write(dir.join("dualroot.acl"), acl).unwrap();
    let pw = dir.join("dualroot.passwd");
    for (u, p) in users {
        passwd(&pw, u, p);
    }
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous false\npassword_file {pw}\n\
             acl_file {acl}\npersistence false\nuser root\n\
             log_dest file {log}\nlog_type all\n\
             listener {port} 127.0.0.1\nuse_username_as_clientid true\n",
            pw = pw.display(),
            acl = dir.join("dualroot.acl").display(),
            log = dir.join("mosquitto.log").display(),
        ),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting mosquitto");
    wait_until("mosquitto to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    AclBroker { port, child }
}

/// An MQTT client that records what it receives (topic, JSON body).
struct Peer {
    client: Client,
    got: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Peer {
    fn connect(port: u16, client_id: &str, user: &str, pass: &str, subs: &[String]) -> Peer {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_credentials(user, pass)
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5));
        let (client, mut conn) = Client::new(o, 100);
        let got = Arc::new(Mutex::new(Vec::new()));
        let subacks = Arc::new(Mutex::new(Vec::new()));
        let n = subs.len();
        let (g, s, c, subs) = (got.clone(), subacks.clone(), client.clone(), subs.to_vec());
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for t in &subs {
                            let _ = c.try_subscribe(t.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => {
                        s.lock().unwrap().push(a.return_codes)
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        g.lock().unwrap().push((p.topic.clone(), v));
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        let s = subacks.clone();
        wait_until("subscriptions answered", T, || s.lock().unwrap().len() >= n);
        Peer { client, got }
    }

    fn publish(&self, topic: String, body: Value) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .unwrap();
    }

    fn received(&self, pred: impl Fn(&str, &Value) -> bool) -> bool {
        self.got.lock().unwrap().iter().any(|(t, v)| pred(t, v))
    }
}

#[test]
fn a_device_cannot_read_write_or_take_over_another_devices_topics() {
    let d = tempfile::tempdir().unwrap();
    let broker = start_broker(
        d.path(),
        &[
            ("dev-a", "tok-a"),
            ("dev-b", "tok-b"),
            ("dualroot-backend", "backend-pw"),
        ],
    );
    // The backend: reads every device's results, sends tasks and acks.
    let backend = Peer::connect(
        broker.port,
        "dualroot-backend",
        "dualroot-backend",
        "backend-pw",
        &[
            format!("{PREFIX}/+/results"),
            format!("{PREFIX}/+/heartbeat"),
        ],
    );
    // Device B: the real agent, user dev-b with its token as password.
    let mut agent = AgentProc::new(
        d.path(),
        "dev-b",
        broker.port,
        AgentOpts {
            mqtt_extra: "use_device_token = true".into(),
            ..Default::default()
        },
    );
    std::fs::create_dir_all(agent.data_dir()).unwrap();
    std::fs::write(
        agent.data_dir().join("token.json"),
        json!({"deviceId": "dev-b", "token": "tok-b", "obtainedAt": 1, "expiresAt": null})
            .to_string(),
    )
    .unwrap();
    agent.start("");
    let task = |id: &str| json!({"taskId": id, "taskType": "heartbeat", "body": {}});
    let answered = |id: &'static str| {
        move |t: &str, v: &Value| t == format!("{PREFIX}/dev-b/heartbeat") && v["ackKey"] == id
    };
    backend.publish(format!("{PREFIX}/dev-b/tasks"), task("hb-1"));
    wait_until("device B answers under the ACL", T, || {
        backend.received(answered("hb-1"))
    });
    backend.publish(format!("{PREFIX}/dev-b/acks"), json!({"taskId": "hb-1"}));

    // Device A, with its own valid credentials, asks for B's client id and
    // B's topics.
    let attacker = Peer::connect(
        broker.port,
        "dev-b",
        "dev-a",
        "tok-a",
        &[format!("{PREFIX}/dev-b/tasks"), format!("{PREFIX}/+/tasks")],
    );
    attacker.publish(format!("{PREFIX}/dev-b/tasks"), task("evil-task"));
    attacker.publish(
        format!("{PREFIX}/dev-b/results"),
        json!({"deviceId": "dev-b", "ackKey": "forged", "taskId": "forged", "status": "done"}),
    );
    // B still has its session and gets the next task; A sees none of it.
    backend.publish(format!("{PREFIX}/dev-b/tasks"), task("hb-2"));
    wait_until("device B still answers", T, || {
        backend.received(answered("hb-2"))
    });
    std::thread::sleep(Duration::from_secs(2));

    assert!(
        !attacker.received(|t, _| t.ends_with("/dev-b/tasks")),
        "device A read device B's tasks: {:?}",
        attacker.got.lock().unwrap()
    );
    assert!(
        !backend.received(|_, v| v["ackKey"] == "forged"),
        "a result forged by device A reached the backend"
    );
    assert!(
        agent.journal().get("evil-task").unwrap().is_none(),
        "device B took a task published by device A"
    );
    assert_eq!(
        agent.count_log("disconnected"),
        0,
        "device A's connect with B's client id threw B off: {}",
        agent.log_text()
    );
    // (mosquitto grants a 3.1.1 SUBSCRIBE it will not deliver on and filters
    // at delivery, so the SUBACK says nothing: the checks above are on what
    // was delivered.)
}

#[test]
fn the_agent_refuses_a_plain_or_unauthenticated_transport() {
    let d = tempfile::tempdir().unwrap();
    let conf = d.path().join("agent.toml");
    std::fs::write(
        &conf,
        format!(
            "device_id = \"dev-plain\"\ndata_dir = \"{}\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {}\n",
            d.path().join("data").display(),
            free_port()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dualroot-agent"))
        .args(["run", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent started: {err}");
    assert!(
        err.contains("refusing to start with an insecure transport")
            && err.contains("mqtt.tls is false")
            && err.contains("does not authenticate this device"),
        "{err}"
    );
}
