//! The fleet simulator: many appliances speaking the agent's MQTT protocol
//! (agent-lib's own message builder and task parser) to a real broker, with
//! injected faults. Each device registers over HTTP like the agent, keeps a
//! persistent session, answers heartbeats, runs `upgrade` and `migrate`
//! tasks as timed steps with a reboot (a new connection and boot id, the
//! session's queued messages delivered after it), and republishes every
//! result until the controller acks its ackKey. It measures, per result,
//! the time from its first publish to the ack.

use anyhow::{bail, Context, Result};
use dualroot_api::wire::{
    parse_ack, parse_task, CancelReport, Heartbeat, HeartbeatSlot, Parsed, Progress, Status,
    Topics, CANCEL_TASK, PROTOCOL_VERSION,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fault shares in percent of devices (each device draws its faults once,
/// from a hash of its id, so a rerun injects the same faults).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// `slot install` fails (the agent's `failed`, nothing switched).
    pub install_fail_pct: u32,
    /// The new slot does not come up: back on the old one after the reboot.
    pub rollback_pct: u32,
    /// Never comes back after the reboot.
    pub silent_pct: u32,
    /// Downloads take 10× as long.
    pub slow_pct: u32,
    /// Every result is published twice.
    pub dup_pct: u32,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub api: String,
    pub register_token: String,
    pub broker_host: String,
    pub broker_port: u16,
    pub prefix: String,
    pub devices: usize,
    /// What the devices run at the start.
    pub version: String,
    pub legacy: bool,
    /// Labels set on every device; the first `canaries` also get `canary=yes`.
    pub labels: BTreeMap<String, String>,
    pub canaries: usize,
    pub download_ms: u64,
    pub reboot_ms: u64,
    pub outbox_retry_ms: u64,
    pub faults: Faults,
    /// Operator token for labelling devices, when the controller needs one.
    pub operator_token: Option<String>,
    /// Load generator: each device also publishes a heartbeat answer of its
    /// own this often (today's agent answers heartbeat tasks only).
    pub heartbeat_every_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    InstallFail,
    Rollback,
    Silent,
}

/// The fault a device draws: buckets of a hash of its id.
fn draw(f: &Faults, id: &str) -> (Fault, bool, bool) {
    let h = Sha256::digest(id.as_bytes());
    let b = |i: usize| (u16::from_be_bytes([h[i], h[i + 1]]) % 100) as u32;
    let x = b(0);
    let fault = if x < f.install_fail_pct {
        Fault::InstallFail
    } else if x < f.install_fail_pct + f.rollback_pct {
        Fault::Rollback
    } else if x < f.install_fail_pct + f.rollback_pct + f.silent_pct {
        Fault::Silent
    } else {
        Fault::None
    };
    (fault, b(2) < f.slow_pct, b(4) < f.dup_pct)
}

/// What the run measured (printed as JSON by `simulate --report`).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub devices: usize,
    pub heartbeats_acked: u64,
    pub results_acked: u64,
    /// Publish → ack of heartbeat answers, ms.
    pub heartbeat_p50_ms: u64,
    pub heartbeat_p99_ms: u64,
    pub result_p99_ms: u64,
    /// Heartbeat answers acked per second over the run.
    pub heartbeats_per_s: f64,
    pub seconds: f64,
    pub upgraded: u64,
    pub migrated: u64,
    pub install_failed: u64,
    pub rolled_back: u64,
    pub went_silent: u64,
    pub duplicate_tasks: u64,
    /// Tasks dropped on a `cancel` before their point of no return.
    pub canceled: u64,
}

#[derive(Default)]
struct Stats {
    hb_ms: Vec<u32>,
    other_ms: Vec<u32>,
    upgraded: AtomicU64,
    migrated: AtomicU64,
    install_failed: AtomicU64,
    rolled_back: AtomicU64,
    went_silent: AtomicU64,
    duplicate_tasks: AtomicU64,
    canceled: AtomicU64,
}

fn pct(v: &mut [u32], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize] as u64
}

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// Registers one device as the agent does (`POST <api>/api/register`).
pub fn register(api: &str, token: &str, model: &str) -> Result<String> {
    let url = format!("{}/api/register", api.trim_end_matches('/'));
    let mut r = http_agent()
        .post(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .send(json!({"hardware": {"model": model, "simulated": true}}).to_string())
        .with_context(|| format!("registering at {url}"))?;
    let code = r.status().as_u16();
    let text = r.body_mut().read_to_string()?;
    if code != 200 {
        bail!("registering at {url}: {code} {text}");
    }
    let v: Value = serde_json::from_str(&text)?;
    v["deviceId"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no deviceId in {text}"))
}

fn set_labels(o: &Options, id: &str, labels: &BTreeMap<String, String>) -> Result<()> {
    let url = format!("{}/api/v1/devices/{id}/labels", o.api.trim_end_matches('/'));
    let mut req = http_agent()
        .put(&url)
        .header("Content-Type", "application/json");
    if let Some(t) = &o.operator_token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let r = req
        .send(serde_json::to_string(labels)?)
        .with_context(|| format!("labelling {id}"))?;
    if r.status().as_u16() != 200 {
        bail!("labelling {id} at {url}: {}", r.status());
    }
    Ok(())
}

/// One simulated appliance.
struct Device {
    id: String,
    topics: Topics,
    version: String,
    slot: &'static str,
    legacy: bool,
    boot: u64,
    fault: Fault,
    slow: bool,
    dup: bool,
    /// taskId → stored result (finished) or None (running).
    journal: HashMap<String, Option<(String, String)>>,
    /// ackKey → (topic, message, first publish).
    outbox: BTreeMap<String, (String, String, Instant)>,
    /// taskIds canceled before they arrived (the agent keeps such a cancel).
    canceled: HashSet<String>,
}

/// The upgrade or migration a device is downloading: when its timer fires
/// the download is done and the device installs and reboots.
struct Download {
    task_id: String,
    kind: String,
    body: Value,
}

impl Device {
    fn result(
        &mut self,
        key: &str,
        task_id: Option<&str>,
        ty: &str,
        status: Status,
        result: Value,
        error: Option<&str>,
    ) {
        let msg = wire_result(&self.id, key, task_id, ty, status, result, error, 1);
        let topic = self.topics.result_topic(ty).to_string();
        // a progress report does not finish the task
        if let Some(t) = task_id.filter(|_| status != Status::Progress) {
            self.journal
                .insert(t.to_string(), Some((topic.clone(), msg.clone())));
        }
        self.outbox
            .insert(key.to_string(), (topic, msg, Instant::now()));
    }

    fn heartbeat(&mut self, task_id: &str) {
        let slot = if self.legacy {
            HeartbeatSlot {
                booted: Some("unknown".into()),
                fallback: json!("unknown"),
                reason: Some("dualroot not installed".into()),
                ..Default::default()
            }
        } else {
            HeartbeatSlot {
                booted: Some(self.slot.to_string()),
                primary: dualroot_api::Slot::parse(self.slot),
                fallback: json!(false),
                booted_good: Some(true),
                version: Some(self.version.clone()),
                reason: None,
            }
        };
        let answer = serde_json::to_value(Heartbeat {
            device_id: self.id.clone(),
            firmware_version: Some(self.version.clone()),
            agent_version: Some("sim".into()),
            slot,
            services: Vec::new(),
            outbox_pending: self.outbox.len() as u64,
            clock_offset_seconds: None,
            boot_id: Some(self.boot_id()),
            protocol: Some(PROTOCOL_VERSION),
        })
        .expect("a heartbeat serializes");
        self.result(
            task_id,
            Some(task_id),
            "heartbeat",
            Status::Done,
            answer,
            None,
        );
    }

    fn boot_id(&self) -> String {
        format!("{}-boot-{}", self.id, self.boot)
    }
}

fn mqtt_options(o: &Options, id: &str) -> MqttOptions {
    let mut m = MqttOptions::new(id, &o.broker_host, o.broker_port);
    m.set_clean_session(false);
    m.set_manual_acks(true);
    m.set_keep_alive(Duration::from_secs(60));
    m.set_max_packet_size(1 << 20, 1 << 20);
    m
}

async fn publish_all(client: &AsyncClient, d: &Device) {
    let copies = if d.dup { 2 } else { 1 };
    for (topic, msg, _) in d.outbox.values() {
        for _ in 0..copies {
            let _ = client.try_publish(topic.as_str(), QoS::AtLeastOnce, false, msg.clone());
        }
    }
}

/// Runs one device until `stop`; returns when it stops or goes silent.
async fn run_device(
    o: Arc<Options>,
    mut d: Device,
    stats: Arc<Mutex<Stats>>,
    stop: Arc<AtomicBool>,
) {
    let (mut client, mut events) = AsyncClient::new(mqtt_options(&o, &d.id), 64);
    let mut retry = tokio::time::interval(Duration::from_millis(o.outbox_retry_ms.max(100)));
    let mut timer: Option<(tokio::time::Instant, Download)> = None;
    // unsolicited heartbeats (load mode), started at a random phase
    let every = Duration::from_millis(o.heartbeat_every_ms.unwrap_or(3_600_000).max(10));
    let phase = Duration::from_millis(
        u64::from(Sha256::digest(d.id.as_bytes())[0]) * every.as_millis() as u64 / 256,
    );
    let mut own_hb = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
    let mut own_seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = timer.as_ref().map(|(at, _)| *at);
        tokio::select! {
            ev = events.poll() => {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(d.topics.tasks.as_str(), QoS::AtLeastOnce).await;
                        let _ = client.subscribe(d.topics.acks.as_str(), QoS::AtLeastOnce).await;
                        publish_all(&client, &d).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic == d.topics.acks {
                            let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                            for k in parse_ack(&p.payload) {
                                if let Some((topic, _, t0)) = d.outbox.remove(&k) {
                                    let ms = t0.elapsed().as_millis() as u32;
                                    if topic == d.topics.heartbeat { s.hb_ms.push(ms) } else { s.other_ms.push(ms) }
                                }
                            }
                        } else if let Parsed::Task(t) = parse_task(&p.payload, 1 << 20, false) {
                            match d.journal.get(&t.task_id).cloned() {
                                // seen: the stored result again, or "in progress"
                                Some(Some((topic, msg))) => {
                                    stats.lock().unwrap_or_else(|e| e.into_inner()).duplicate_tasks.fetch_add(1, Ordering::Relaxed);
                                    let _ = client.try_publish(topic, QoS::AtLeastOnce, false, msg);
                                }
                                Some(None) => {
                                    stats.lock().unwrap_or_else(|e| e.into_inner()).duplicate_tasks.fetch_add(1, Ordering::Relaxed);
                                    let m = wire_result(&d.id, &t.task_id, Some(&t.task_id), &t.task_type, Status::InProgress, json!({"state": "running"}), None, 1);
                                    let _ = client.try_publish(d.topics.results.as_str(), QoS::AtLeastOnce, false, m);
                                }
                                None if t.task_type == CANCEL_TASK => {
                                    // as the agent: a task still downloading is dropped
                                    // (before its point of no return), one past it runs on
                                    let target = t.body.get("taskId").and_then(Value::as_str).unwrap_or("").to_string();
                                    let downloading = matches!(&timer, Some((_, dl)) if dl.task_id == target);
                                    let (canceled, phase, reason) = match d.journal.get(&target) {
                                        _ if downloading => {
                                            let Some((_, Download { kind, .. })) = timer.take() else { unreachable!() };
                                            d.result(&target, Some(&target), &kind, Status::Canceled,
                                                json!({"status": "canceled", "phase": "downloading"}),
                                                Some("canceled by the backend while downloading; nothing was installed"));
                                            stats.lock().unwrap_or_else(|e| e.into_inner()).canceled.fetch_add(1, Ordering::Relaxed);
                                            (true, "downloading", None)
                                        }
                                        Some(Some(_)) => (false, "finished", Some("the task has finished")),
                                        Some(None) => (false, "installing", Some("past the point of no return")),
                                        None => {
                                            d.canceled.insert(target.clone());
                                            (true, "unknown", None)
                                        }
                                    };
                                    let report = CancelReport { task_id: target, canceled, phase: phase.into(), reason: reason.map(str::to_string) };
                                    d.result(&t.task_id, Some(&t.task_id), CANCEL_TASK, Status::Done,
                                        serde_json::to_value(report).unwrap_or(Value::Null), None);
                                    publish_all(&client, &d).await;
                                }
                                None if d.canceled.contains(&t.task_id) => {
                                    d.result(&t.task_id, Some(&t.task_id), &t.task_type, Status::Canceled,
                                        json!({"status": "canceled", "phase": "queued"}), Some("canceled by the backend while queued"));
                                    publish_all(&client, &d).await;
                                }
                                None if t.task_type == "heartbeat" => {
                                    d.heartbeat(&t.task_id);
                                    publish_all(&client, &d).await;
                                }
                                None if (t.task_type == "upgrade" || t.task_type == "migrate") && timer.is_none() => {
                                    d.journal.insert(t.task_id.clone(), None);
                                    let ms = o.download_ms * if d.slow { 10 } else { 1 };
                                    timer = Some((tokio::time::Instant::now() + Duration::from_millis(ms),
                                        Download { task_id: t.task_id, kind: t.task_type, body: t.body }));
                                }
                                None => {
                                    let err = if timer.is_some() { "another upgrade has armed a slot switch and waits for its reboot" } else { "not simulated" };
                                    d.result(&t.task_id, Some(&t.task_id), &t.task_type, Status::Failed, Value::Null, Some(err));
                                    publish_all(&client, &d).await;
                                }
                            }
                        }
                        let _ = client.ack(&p).await;
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            _ = retry.tick() => publish_all(&client, &d).await,
            _ = own_hb.tick(), if o.heartbeat_every_ms.is_some() => {
                own_seq += 1;
                let key = format!("{}-own-{own_seq}", d.id);
                d.heartbeat(&key);
                // only this one: the retry timer republishes the rest
                if let Some((topic, msg, _)) = d.outbox.get(&key) {
                    let _ = client.try_publish(topic.as_str(), QoS::AtLeastOnce, false, msg.clone());
                }
            }
            _ = async { tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await }, if due.is_some() => {
                let Some((_, Download { task_id, kind, body })) = timer.take() else { continue };
                // protocol 2 progress: downloaded, then the engine writes
                for p in [Progress::Staged, Progress::Installing] {
                    d.result(&p.ack_key(&task_id), Some(&task_id), &kind, Status::Progress, json!({"state": p}), None);
                }
                publish_all(&client, &d).await;
                if d.fault == Fault::InstallFail && kind == "upgrade" {
                    stats.lock().unwrap_or_else(|e| e.into_inner()).install_failed.fetch_add(1, Ordering::Relaxed);
                    d.result(&task_id, Some(&task_id), &kind, Status::Failed, Value::Null,
                        Some("installing into the inactive slot: dualroot slot install failed: write error (simulated)"));
                    publish_all(&client, &d).await;
                    continue;
                }
                if kind == "migrate" {
                    // armed: the result leaves before the reboot
                    d.result(&task_id, Some(&task_id), &kind, Status::Done, json!({"staged": true, "output": "simulated"}), None);
                    publish_all(&client, &d).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // reboot: the connection goes, the session keeps what comes meanwhile
                let _ = client.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_millis(200), async { while events.poll().await.is_ok() {} }).await;
                if d.fault == Fault::Silent {
                    stats.lock().unwrap_or_else(|e| e.into_inner()).went_silent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(o.reboot_ms)).await;
                d.boot += 1;
                // the new boot runs the new system before it connects: a
                // heartbeat task waiting in the session is answered by it
                let wanted = body.get("version").and_then(Value::as_str).unwrap_or("migrated").to_string();
                let boot_key = format!("boot-confirmed-{}", d.boot_id());
                if kind == "migrate" {
                    d.legacy = false;
                    d.slot = "a";
                    d.version = wanted.clone();
                    stats.lock().unwrap_or_else(|e| e.into_inner()).migrated.fetch_add(1, Ordering::Relaxed);
                } else if d.fault == Fault::Rollback {
                    stats.lock().unwrap_or_else(|e| e.into_inner()).rolled_back.fetch_add(1, Ordering::Relaxed);
                    let err = format!("rolled back: running slot {} version {} instead of slot b version {wanted}", d.slot, d.version);
                    d.result(&task_id, Some(&task_id), &kind, Status::Failed,
                        json!({"status": "rolled back", "runningSlot": d.slot, "runningVersion": d.version, "wantedVersion": wanted}), Some(&err));
                } else {
                    let prev = std::mem::replace(&mut d.version, wanted.clone());
                    d.slot = if d.slot == "a" { "b" } else { "a" };
                    stats.lock().unwrap_or_else(|e| e.into_inner()).upgraded.fetch_add(1, Ordering::Relaxed);
                    d.result(&task_id, Some(&task_id), &kind, Status::Done,
                        json!({"status": "upgraded", "slot": d.slot, "version": wanted, "previousVersion": prev}), None);
                }
                let confirmed = json!({"slot": d.slot, "version": d.version, "firmwareVersion": d.version});
                d.result(&boot_key, None, "bootConfirmed", Status::Done, confirmed, None);
                // published on the ConnAck of the new connection
                (client, events) = AsyncClient::new(mqtt_options(&o, &d.id), 64);
            }
        }
    }
}

/// Registers `o.devices` devices and runs them until `stop`. Returns the
/// report when stopped.
pub fn run(o: Options, stop: Arc<AtomicBool>) -> Result<Report> {
    let o = Arc::new(o);
    let mut devices = Vec::with_capacity(o.devices);
    for i in 0..o.devices {
        let id = register(&o.api, &o.register_token, "va-sim")?;
        let mut labels = o.labels.clone();
        if i < o.canaries {
            labels.insert("canary".into(), "yes".into());
        }
        if !labels.is_empty() {
            set_labels(&o, &id, &labels)?;
        }
        let (fault, slow, dup) = draw(&o.faults, &id);
        devices.push(Device {
            topics: Topics::new(&o.prefix, &id),
            id,
            version: o.version.clone(),
            slot: "a",
            legacy: o.legacy,
            boot: 0,
            fault,
            slow,
            dup,
            journal: HashMap::new(),
            outbox: BTreeMap::new(),
            canceled: HashSet::new(),
        });
    }
    log::info!("simulating {} devices", devices.len());
    let stats = Arc::new(Mutex::new(Stats::default()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the simulator's runtime")?;
    let t0 = Instant::now();
    let n = devices.len();
    rt.block_on(async {
        let mut handles = Vec::new();
        for d in devices {
            handles.push(tokio::spawn(run_device(
                o.clone(),
                d,
                stats.clone(),
                stop.clone(),
            )));
        }
        for h in handles {
            let _ = h.await;
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
    let hb = s.hb_ms.len() as u64;
    Ok(Report {
        devices: n,
        heartbeats_acked: hb,
        results_acked: s.other_ms.len() as u64,
        heartbeat_p50_ms: pct(&mut s.hb_ms, 0.5),
        heartbeat_p99_ms: pct(&mut s.hb_ms, 0.99),
        result_p99_ms: pct(&mut s.other_ms, 0.99),
        heartbeats_per_s: hb as f64 / secs.max(0.001),
        seconds: secs,
        upgraded: s.upgraded.load(Ordering::Relaxed),
        migrated: s.migrated.load(Ordering::Relaxed),
        install_failed: s.install_failed.load(Ordering::Relaxed),
        canceled: s.canceled.load(Ordering::Relaxed),
        rolled_back: s.rolled_back.load(Ordering::Relaxed),
        went_silent: s.went_silent.load(Ordering::Relaxed),
        duplicate_tasks: s.duplicate_tasks.load(Ordering::Relaxed),
    })
}

/// A result message as the agent builds it, stamped with this clock.
#[allow(clippy::too_many_arguments)]
fn wire_result(
    device: &str,
    key: &str,
    task_id: Option<&str>,
    ty: &str,
    status: Status,
    result: Value,
    error: Option<&str>,
    attempt: u32,
) -> String {
    dualroot_api::wire::result_message(
        device,
        key,
        task_id,
        ty,
        status,
        result,
        error,
        attempt,
        crate::clock::Clock::now_ms(&crate::clock::SystemClock),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_drawn_in_their_shares_and_stably() {
        let f = Faults {
            install_fail_pct: 3,
            rollback_pct: 2,
            silent_pct: 1,
            slow_pct: 10,
            dup_pct: 50,
        };
        let ids: Vec<String> = (0..10_000).map(|i| format!("va-{i}")).collect();
        let draws: Vec<_> = ids.iter().map(|id| draw(&f, id)).collect();
        let share =
            |p: &dyn Fn(&(Fault, bool, bool)) -> bool| draws.iter().filter(|d| p(d)).count();
        let inst = share(&|d| d.0 == Fault::InstallFail);
        assert!(
            (200..=400).contains(&inst),
            "install failures {inst} of 10000 for 3%"
        );
        let rb = share(&|d| d.0 == Fault::Rollback);
        assert!((120..=280).contains(&rb), "rollbacks {rb} for 2%");
        let dup = share(&|d| d.2);
        assert!((4700..=5300).contains(&dup), "duplicates {dup} for 50%");
        assert_eq!(draws[17], draw(&f, &ids[17]));
        assert_eq!(draw(&Faults::default(), "x"), (Fault::None, false, false));
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<u32> = (1..=100).collect();
        assert_eq!(pct(&mut v, 0.5), 51);
        assert_eq!(pct(&mut v, 0.99), 99);
        assert_eq!(pct(&mut [], 0.99), 0);
    }
}
