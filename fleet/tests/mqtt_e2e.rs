//! End to end over a real Mosquitto: the controller (HTTP + MQTT rooms, ticks)
//! and a fake device that registers over HTTP like the agent, reads tasks
//! with the agent's own parser, answers with the agent's message builder, and
//! republishes each result until the controller acks its ackKey.

mod common;

use common::result_message;
use common::{free_port, PREFIX, REGISTER_TOKEN};
use dualroot_api::wire::{parse_ack, parse_task, Parsed, Status, Topics};
use dualroot_fleet::clock::SystemClock;
use dualroot_fleet::mqtt::{Mqtt, Options};
use dualroot_fleet::store::Store;
use dualroot_fleet::tasks::TaskState;
use dualroot_fleet::{http, outbox, tasks, Fleet};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Broker {
    port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

impl Broker {
    fn start(dir: &Path) -> Broker {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let mut b = Broker {
            port,
            conf,
            child: None,
        };
        b.spawn();
        b
    }
    fn spawn(&mut self) {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("mosquitto is installed (scripts/install-deps.sh)");
        self.child = Some(
            Command::new(bin)
                .arg("-c")
                .arg(&self.conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait("the broker to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the fake device saw and keeps: tasks by id, results not yet acked.
#[derive(Default)]
struct DeviceState {
    tasks: Vec<(String, String, Value)>,
    unacked: BTreeMap<String, (String, String)>,
    acked: Vec<String>,
    /// What its heartbeats report: (version, slot).
    running: (String, String),
}

struct FakeDevice {
    id: String,
    client: Client,
    state: Arc<Mutex<DeviceState>>,
}

impl FakeDevice {
    fn start(port: u16, id: &str) -> FakeDevice {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_manual_acks(true);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut conn) = Client::new(o, 64);
        let topics = Topics::new(PREFIX, id);
        let state = Arc::new(Mutex::new(DeviceState {
            running: ("1.0".into(), "a".into()),
            ..Default::default()
        }));
        let (c, st, dev) = (client.clone(), state.clone(), id.to_string());
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c.subscribe(&topics.tasks, QoS::AtLeastOnce);
                        let _ = c.subscribe(&topics.acks, QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic == topics.tasks {
                            if let Parsed::Task(t) = parse_task(&p.payload, 1 << 20, false) {
                                if t.task_type == "heartbeat" {
                                    // the agent answers a heartbeat at once
                                    let (v, slot) = st.lock().unwrap().running.clone();
                                    let msg = result_message(
                                        &dev,
                                        &t.task_id,
                                        Some(&t.task_id),
                                        "heartbeat",
                                        Status::Done,
                                        common::heartbeat_json(
                                            &dev,
                                            &v,
                                            Some((&slot, true)),
                                            None,
                                            &[],
                                        ),
                                        None,
                                        1,
                                    );
                                    st.lock()
                                        .unwrap()
                                        .unacked
                                        .insert(t.task_id.clone(), (topics.heartbeat.clone(), msg));
                                }
                                st.lock()
                                    .unwrap()
                                    .tasks
                                    .push((t.task_id, t.task_type, t.body));
                            }
                        } else if p.topic == topics.acks {
                            let mut s = st.lock().unwrap();
                            for k in parse_ack(&p.payload) {
                                s.unacked.remove(&k);
                                s.acked.push(k);
                            }
                        }
                        let _ = c.ack(&p);
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        FakeDevice {
            id: id.into(),
            client,
            state,
        }
    }

    /// Queues a result; [`FakeDevice::flush`] publishes it until acked.
    fn result(
        &self,
        ack_key: &str,
        task_id: Option<&str>,
        task_type: &str,
        status: Status,
        result: Value,
    ) {
        let msg = result_message(
            &self.id, ack_key, task_id, task_type, status, result, None, 1,
        );
        let topic = Topics::new(PREFIX, &self.id).results;
        self.state
            .lock()
            .unwrap()
            .unacked
            .insert(ack_key.into(), (topic, msg));
    }

    /// Publishes every result not acked yet (the agent's outbox does this on
    /// a timer and after each reconnect).
    fn flush(&self) {
        let pending: Vec<(String, String)> = self
            .state
            .lock()
            .unwrap()
            .unacked
            .values()
            .cloned()
            .collect();
        for (topic, msg) in pending {
            let _ = self.client.try_publish(topic, QoS::AtLeastOnce, false, msg);
        }
    }

    fn task(&self, task_type: &str) -> Option<(String, Value)> {
        self.state
            .lock()
            .unwrap()
            .tasks
            .iter()
            .find(|t| t.1 == task_type)
            .map(|t| (t.0.clone(), t.2.clone()))
    }
}

fn api(
    port: u16,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://127.0.0.1:{port}{path}");
    let resp = if method == "GET" {
        agent.get(&url).call()
    } else {
        let mut r = agent.post(&url).header("Content-Type", "application/json");
        if let Some(b) = bearer {
            r = r.header("Authorization", &format!("Bearer {b}"));
        }
        r.send(body.unwrap_or(json!({})).to_string())
    }
    .unwrap();
    let code = resp.status().as_u16();
    let text = resp.into_body().read_to_string().unwrap();
    (code, serde_json::from_str(&text).unwrap())
}

#[test]
fn controller_and_device_over_a_real_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let mut cfg = common::config();
    cfg.heartbeat_interval_ms = 500;
    let store = Store::open(dir.path().join("fleet.sqlite").to_str().unwrap()).unwrap();
    let fleet = Arc::new(Fleet::new(store, Arc::new(SystemClock), cfg));
    let server = http::Server::start(fleet.clone(), "127.0.0.1:0", 2).unwrap();
    let opts = Options {
        host: "127.0.0.1".into(),
        port: broker.port,
        client_id: "fleet-e2e".into(),
        keep_alive_s: 5,
    };
    let mqtt = Mqtt::start(fleet.clone(), &opts).unwrap();

    // registration as the agent does it
    let (code, _) = api(
        server.port,
        "POST",
        "/api/register",
        Some("wrong"),
        Some(json!({"hardware": {}})),
    );
    assert_eq!(code, 401);
    let (code, reg) = api(
        server.port,
        "POST",
        "/api/register",
        Some(REGISTER_TOKEN),
        Some(json!({"hardware": {"model": "va-1"}})),
    );
    assert_eq!(code, 200, "{reg}");
    let id = reg["deviceId"].as_str().unwrap().to_string();
    let (code, again) = api(
        server.port,
        "POST",
        "/api/token/refresh",
        reg["deviceToken"].as_str(),
        None,
    );
    assert_eq!((code, again["deviceId"].as_str()), (200, Some(id.as_str())));
    assert!(again["expiresIn"].as_i64().unwrap() > 0);

    let dev = FakeDevice::start(broker.port, &id);
    let online = || {
        let (_, v) = api(
            server.port,
            "GET",
            &format!("/api/v1/devices/{id}"),
            None,
            None,
        );
        v["device"]["online"] == json!(true)
    };
    // heartbeat tasks go out from the outbox and the answers come back in
    wait(
        "the device online from heartbeats",
        Duration::from_secs(20),
        || {
            fleet.tick().unwrap();
            dev.flush();
            online()
        },
    );

    // an upgrade through the operator API, delivered over MQTT
    let (code, t) = api(
        server.port,
        "POST",
        "/api/v1/tasks",
        None,
        Some(json!({
        "deviceId": id, "taskType": "upgrade", "targetVersion": "2.0",
        "body": {"version": "2.0", "url": "https://files.example/b", "sha256": "00"}})),
    );
    assert_eq!(code, 201, "{t}");
    let task_id = t["id"].as_str().unwrap().to_string();
    wait(
        "the device to get the upgrade",
        Duration::from_secs(20),
        || dev.task("upgrade").is_some(),
    );
    let (wire, body) = dev.task("upgrade").unwrap();
    assert_eq!(wire, t["wireId"].as_str().unwrap());
    assert_eq!(body["version"], "2.0");

    // the broker goes away: the controller's next messages wait in its outbox
    broker.kill();
    std::thread::sleep(Duration::from_millis(300));
    fleet.tick().unwrap();
    broker.spawn();

    // after its reboot the device runs 2.0 on slot b and reports
    dev.state.lock().unwrap().running = ("2.0".into(), "b".into());
    dev.result(
        "boot-confirmed-boot-2",
        None,
        "bootConfirmed",
        Status::Done,
        json!({"slot": "b", "version": "2.0", "firmwareVersion": "2.0"}),
    );
    dev.result(
        &wire,
        Some(&wire),
        "upgrade",
        Status::Done,
        json!({"status": "upgraded", "slot": "b", "version": "2.0", "previousVersion": "1.0"}),
    );
    let state = || {
        fleet
            .store
            .tx(|tx| tasks::get(tx, &task_id))
            .unwrap()
            .unwrap()
            .state
    };
    wait("the upgrade to succeed", Duration::from_secs(30), || {
        dev.flush();
        fleet.tick().unwrap();
        state() == TaskState::Succeeded
    });
    wait(
        "the controller to ack both results",
        Duration::from_secs(30),
        || {
            dev.flush();
            dev.state.lock().unwrap().unacked.is_empty()
        },
    );
    let acked = dev.state.lock().unwrap().acked.clone();
    assert!(
        acked.contains(&wire) && acked.contains(&"boot-confirmed-boot-2".to_string()),
        "{acked:?}"
    );
    // and every outbox row reached the broker
    wait("the outbox to drain", Duration::from_secs(20), || {
        fleet.store.tx(outbox::unsent).unwrap() == 0
    });
    let (_, v) = api(
        server.port,
        "GET",
        &format!("/api/v1/devices/{id}"),
        None,
        None,
    );
    assert_eq!(v["device"]["version"], "2.0");
    assert_eq!(v["device"]["bootId"], "boot-2");
    mqtt.stop();
    server.stop();
}
