//! The daemon: MQTT transport, journal-first task intake, per-type workers,
//! persistent outbox.

use crate::config::Config;
use crate::engine::{DualrootCli, Engine};
use crate::failpoint;
use crate::journal::{now_ms, Incoming, Journal, Receive, TaskRow};
use crate::protocol::{self, Parsed, Status, Topics, TASK_TYPES, TEST_TASK};
use crate::services::{KubectlAdapter, ServiceAdapter};
use crate::tasks::{self, Outcome};
use anyhow::{Context, Result};
use rumqttc::{Client, Event, MqttOptions, Packet, Publish, QoS, Transport};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Transport packet limit: far above the task limit so an oversized task
/// reaches the application and gets an error result instead of dropping the
/// connection (which would make the broker redeliver it forever).
pub fn transport_limit(max_payload: usize) -> usize {
    (max_payload.saturating_mul(4)).max(16 * 1024 * 1024)
}

/// Jittered exponential backoff ("equal jitter": half fixed, half random).
pub struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial_ms: u64, max_ms: u64) -> Backoff {
        Backoff {
            initial_ms: initial_ms.max(1),
            max_ms: max_ms.max(initial_ms.max(1)),
            attempt: 0,
        }
    }
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .initial_ms
            .saturating_mul(1u64 << self.attempt.min(30))
            .min(self.max_ms);
        self.attempt = self.attempt.saturating_add(1);
        let half = exp / 2;
        Duration::from_millis(half + fastrand::u64(0..=exp - half))
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

pub struct Agent {
    pub cfg: Config,
    pub device_id: String,
    pub topics: Topics,
    pub journal: Arc<Journal>,
    pub engine: Arc<dyn Engine>,
    pub services: Arc<dyn ServiceAdapter>,
    client: Mutex<Option<Client>>,
    connected: AtomicBool,
    wakers: Mutex<HashMap<String, mpsc::Sender<()>>>,
    outbox_wake: Mutex<Option<mpsc::Sender<()>>>,
    /// One download at a time.
    pub download_lock: Mutex<()>,
    /// Set on SIGTERM: workers take no new task.
    stopping: Arc<AtomicBool>,
    /// Workers currently running a task.
    busy: std::sync::atomic::AtomicUsize,
}

impl Agent {
    pub fn new(cfg: Config) -> Result<Arc<Agent>> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let device_id = crate::registration::device_id(&cfg)?;
        let engine = Arc::new(DualrootCli {
            bin: cfg.dualroot_bin.clone(),
            reboot_command: cfg.upgrade.reboot_command.clone(),
        });
        let services = Arc::new(KubectlAdapter {
            kubectl: cfg.services.kubectl.clone(),
            image_import: cfg.services.image_import.clone(),
        });
        Agent::with_parts(cfg, device_id, engine, services)
    }

    pub fn with_parts(
        cfg: Config,
        device_id: String,
        engine: Arc<dyn Engine>,
        services: Arc<dyn ServiceAdapter>,
    ) -> Result<Arc<Agent>> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        if device_id.is_empty() || device_id.contains(['/', '+', '#']) || device_id.len() > 128 {
            anyhow::bail!("device id {device_id:?} cannot be used in MQTT topics and as client id");
        }
        let journal = Arc::new(Journal::open(&cfg.journal_path())?);
        Ok(Arc::new(Agent {
            topics: Topics::new(&cfg.mqtt.topic_prefix, &device_id),
            device_id,
            cfg,
            journal,
            engine,
            services,
            client: Mutex::new(None),
            connected: AtomicBool::new(false),
            wakers: Mutex::new(HashMap::new()),
            outbox_wake: Mutex::new(None),
            download_lock: Mutex::new(()),
            stopping: Arc::new(AtomicBool::new(false)),
            busy: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    pub fn task_types(&self) -> Vec<&'static str> {
        let mut v = TASK_TYPES.to_vec();
        if self.cfg.debug.test_tasks {
            v.push(TEST_TASK);
        }
        v
    }

    fn failpoint(&self, name: &str) {
        failpoint::hit(name, &self.cfg.data_dir);
    }

    /// Tasks left `running` by a crash: never run again (the side effect may
    /// have happened); they get a failed result. Upgrades resume instead:
    /// their phases are persisted and checked against the slot state.
    pub fn recover(&self) -> Result<()> {
        for t in self.journal.running()? {
            if tasks::resumable(&t.task_type) {
                log::info!(
                    "task {} ({}) will resume after restart",
                    t.task_id,
                    t.task_type
                );
                continue;
            }
            let reason = "interrupted: the agent stopped while this task was running; \
                          it is not run a second time";
            log::warn!("task {} ({}): {reason}", t.task_id, t.task_type);
            let msg = self.result_payload(&t, Status::Failed, Value::Null, Some(reason));
            self.journal.finish(
                &t.task_id,
                false,
                self.topics.result_topic(&t.task_type),
                &msg,
            )?;
        }
        Ok(())
    }

    /// First boot of a slot that is not marked good yet (after a migration,
    /// or an upgrade whose task is gone): check service health, confirm the
    /// slot, and report the running version as a `bootConfirmed` event. An
    /// upgrade task waiting for its reboot confirms by itself.
    pub fn confirm_boot(&self) {
        let st = match self.engine.slot_status() {
            Ok(s) => s,
            Err(e) => {
                log::info!("slot status unavailable, no boot confirmation: {e:#}");
                return;
            }
        };
        // Only a slot booted from a dualroot entry and not yet confirmed.
        if st.booted.is_none() || st.booted_good() {
            return;
        }
        let upgrade_pending = self
            .journal
            .kv_prefix("upgrade:")
            .unwrap_or_default()
            .iter()
            .filter_map(|(_, v)| serde_json::from_str::<tasks::UpgradeState>(v).ok())
            .any(|u| u.phase == "switched");
        if upgrade_pending {
            return;
        }
        let unhealthy = tasks::unhealthy_services(self);
        if !unhealthy.is_empty() {
            log::warn!(
                "slot {} not confirmed: services not healthy ({})",
                st.booted.map_or("?", |b| b.name()),
                unhealthy.join(", ")
            );
            return;
        }
        if let Err(e) = self.engine.slot_confirm() {
            log::error!("confirming the booted slot: {e:#}");
            return;
        }
        log::info!(
            "slot {} confirmed good (version {})",
            st.booted.map_or("?", |b| b.name()),
            st.version.as_deref().unwrap_or("unknown")
        );
        let key = format!("boot-confirmed-{}", tasks::boot_id(self));
        let msg = protocol::result_message(
            &self.device_id,
            &key,
            None,
            "bootConfirmed",
            Status::Done,
            json!({"slot": st.booted, "version": st.version, "firmwareVersion": self.cfg.firmware_version()}),
            None,
            0,
        );
        if let Err(e) = self.journal.enqueue(&key, &self.topics.results, &msg) {
            log::error!("queueing boot confirmation: {e:#}");
        }
        self.wake_outbox();
    }

    fn result_payload(
        &self,
        t: &TaskRow,
        status: Status,
        result: Value,
        err: Option<&str>,
    ) -> String {
        protocol::result_message(
            &self.device_id,
            &t.task_id,
            Some(&t.task_id),
            &t.task_type,
            status,
            result,
            err,
            t.attempts,
        )
    }

    /// Runs one claimed (or resumed) task and journals its result.
    pub fn execute(&self, t: &TaskRow, resumed: bool) {
        log::info!(
            "task {} ({}) {} (attempt {})",
            t.task_id,
            t.task_type,
            if resumed { "resumed" } else { "started" },
            t.attempts
        );
        self.failpoint("after_claim");
        let outcome = tasks::run(self, t, resumed);
        let (ok, msg) = match outcome {
            Outcome::Done(v) => {
                log::info!("task {} ({}) done", t.task_id, t.task_type);
                (true, self.result_payload(t, Status::Done, v, None))
            }
            Outcome::Failed(e, v) => {
                log::warn!("task {} ({}) failed: {e}", t.task_id, t.task_type);
                (false, self.result_payload(t, Status::Failed, v, Some(&e)))
            }
            Outcome::Suspended => {
                log::info!(
                    "task {} ({}) suspended; resumes after restart",
                    t.task_id,
                    t.task_type
                );
                return;
            }
        };
        if let Err(e) =
            self.journal
                .finish(&t.task_id, ok, self.topics.result_topic(&t.task_type), &msg)
        {
            log::error!("task {}: journaling result failed: {e:#}", t.task_id);
            return;
        }
        self.failpoint("after_finish");
        self.wake_outbox();
    }

    fn worker(self: Arc<Self>, task_type: &'static str, rx: mpsc::Receiver<()>) {
        if tasks::resumable(task_type) {
            self.busy.fetch_add(1, Ordering::SeqCst);
            match self.journal.running() {
                Ok(rows) => {
                    for t in rows.iter().filter(|t| t.task_type == task_type) {
                        self.execute(t, true);
                    }
                }
                Err(e) => log::error!("reading running tasks: {e:#}"),
            }
            self.busy.fetch_sub(1, Ordering::SeqCst);
        }
        loop {
            while !self.stopping.load(Ordering::SeqCst) {
                self.busy.fetch_add(1, Ordering::SeqCst);
                let claimed = self.journal.claim_next(task_type);
                if let Ok(Some(t)) = &claimed {
                    self.execute(t, false);
                }
                self.busy.fetch_sub(1, Ordering::SeqCst);
                match claimed {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        log::error!("claiming {task_type} task: {e:#}");
                        break;
                    }
                }
            }
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// On SIGTERM/SIGINT: take no new task, give running ones up to 15 s
    /// (systemd's TimeoutStopSec is 20 s), publish what is ready, exit. A
    /// task still running then is reported "interrupted" after the restart;
    /// an upgrade resumes.
    fn stop_watch(&self) {
        while !self.stopping.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        log::info!("stopping: no new tasks; waiting up to 15 s for running ones");
        let start = Instant::now();
        while self.busy.load(Ordering::SeqCst) > 0 && start.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wake_outbox();
        std::thread::sleep(Duration::from_millis(300));
        if let Some(c) = self.client() {
            let _ = c.try_disconnect();
        }
        log::info!(
            "stopped ({} task(s) still running)",
            self.busy.load(Ordering::SeqCst)
        );
        std::process::exit(0);
    }

    fn wake(&self, task_type: &str) {
        if let Some(tx) = self
            .wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(task_type)
        {
            let _ = tx.send(());
        }
    }

    pub fn wake_outbox(&self) {
        if let Some(tx) = &*self.outbox_wake.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = tx.send(());
        }
    }

    fn client(&self) -> Option<Client> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn outbox_loop(self: Arc<Self>, rx: mpsc::Receiver<()>) {
        let retry_ms = (self.cfg.mqtt.outbox_retry_secs * 1000) as i64;
        let mut last_purge = Instant::now();
        loop {
            if self.connected.load(Ordering::SeqCst) {
                if let Some(client) = self.client() {
                    if let Err(e) = self.flush_outbox(&client, retry_ms) {
                        log::error!("outbox: {e:#}");
                    }
                }
            }
            if last_purge.elapsed() > Duration::from_secs(600) {
                last_purge = Instant::now();
                self.purge();
            }
            match rx.recv_timeout(Duration::from_millis(1000)) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    pub fn purge(&self) {
        let ttl = (self.cfg.journal.ttl_secs * 1000) as i64;
        match self.journal.purge_expired(now_ms(), ttl) {
            Ok(0) => {}
            Ok(n) => log::info!("journal: forgot {n} finished tasks older than the TTL"),
            Err(e) => log::error!("journal purge: {e:#}"),
        }
    }

    fn flush_outbox(&self, client: &Client, retry_ms: i64) -> Result<()> {
        loop {
            let due = self.journal.outbox_due(now_ms(), retry_ms, 200)?;
            if due.is_empty() {
                return Ok(());
            }
            let mut sent = Vec::with_capacity(due.len());
            let mut stop = false;
            for m in due {
                if !self.connected.load(Ordering::SeqCst) {
                    stop = true;
                    break;
                }
                client
                    .publish(
                        m.topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        m.payload.into_bytes(),
                    )
                    .context("queueing outbox publish")?;
                if m.sends > 0 {
                    log::info!("outbox: republished {} (send #{})", m.key, m.sends + 1);
                }
                sent.push(m.id);
            }
            self.journal.outbox_sent_many(&sent, now_ms())?;
            if !sent.is_empty() {
                self.failpoint("after_publish");
            }
            if stop {
                return Ok(());
            }
        }
    }

    /// Intake of one task message: journal first, then (by the caller) ack.
    pub fn on_task_message(&self, payload: &[u8], received_us: i64) -> Result<()> {
        self.on_task_messages(&[(payload, received_us)])
    }

    /// Intake of a burst of task messages: valid ones are journaled in one
    /// transaction; rejected ones get an error result. Only after this
    /// returns Ok may the messages be acked.
    pub fn on_task_messages(&self, msgs: &[(&[u8], i64)]) -> Result<()> {
        let mut tasks = Vec::with_capacity(msgs.len());
        for &(payload, received_us) in msgs {
            match protocol::parse_task(
                payload,
                self.cfg.mqtt.max_payload_bytes,
                self.cfg.debug.test_tasks,
            ) {
                Parsed::Task(m) => {
                    let body = m.body.to_string();
                    tasks.push((m, body, received_us));
                }
                Parsed::Reject {
                    key,
                    task_id,
                    task_type,
                    reason,
                } => self.reject(
                    payload,
                    received_us,
                    &key,
                    task_id.as_deref(),
                    &task_type,
                    &reason,
                )?,
            }
        }
        if tasks.is_empty() {
            return Ok(());
        }
        let items: Vec<Incoming<'_>> = tasks
            .iter()
            .map(|(m, body, received_us)| Incoming {
                task_id: &m.task_id,
                task_type: &m.task_type,
                body,
                received_at_ms: received_us / 1000,
                result_topic: self.topics.result_topic(&m.task_type),
            })
            .collect();
        let outcomes = self.journal.receive_batch(&items)?;
        let journaled = now_us();
        let mut to_wake: Vec<&str> = Vec::new();
        for ((m, _, received_us), out) in tasks.iter().zip(outcomes) {
            match out {
                Receive::New => {
                    if !to_wake.contains(&m.task_type.as_str()) {
                        to_wake.push(&m.task_type);
                    }
                    log::debug!(
                        "task {} journaled {} us after receipt",
                        m.task_id,
                        journaled.saturating_sub(*received_us)
                    );
                }
                Receive::DuplicateFinished => {
                    log::info!(
                        "task {}: duplicate of a finished task, result sent again",
                        m.task_id
                    );
                    self.wake_outbox();
                }
                Receive::DuplicateInProgress(state) => {
                    log::info!(
                        "task {}: duplicate while {}, answering in progress",
                        m.task_id,
                        state.as_str()
                    );
                    let msg = protocol::result_message(
                        &self.device_id,
                        &format!("{}#progress", m.task_id),
                        Some(&m.task_id),
                        &m.task_type,
                        Status::InProgress,
                        json!({"state": state.as_str()}),
                        None,
                        0,
                    );
                    if let Some(c) = self.client() {
                        let topic = self.topics.result_topic(&m.task_type).to_string();
                        let _ = c.try_publish(topic, QoS::AtLeastOnce, false, msg.into_bytes());
                    }
                }
            }
        }
        if !to_wake.is_empty() {
            self.failpoint("after_journal");
        }
        for t in to_wake {
            self.wake(t);
        }
        Ok(())
    }

    fn reject(
        &self,
        payload: &[u8],
        received_us: i64,
        key: &str,
        task_id: Option<&str>,
        task_type: &str,
        reason: &str,
    ) -> Result<()> {
        log::warn!(
            "rejected task message (taskId {:?}, type {:?}, {} bytes): {reason}",
            task_id.unwrap_or("-"),
            task_type,
            payload.len()
        );
        let msg = protocol::result_message(
            &self.device_id,
            key,
            task_id,
            task_type,
            Status::Rejected,
            Value::Null,
            Some(reason),
            0,
        );
        let body = String::from_utf8_lossy(&payload[..payload.len().min(512)]).into_owned();
        self.journal.reject(
            key,
            task_type,
            &body,
            received_us / 1000,
            &self.topics.results,
            &msg,
        )?;
        self.wake_outbox();
        Ok(())
    }

    fn on_ack_messages(&self, payloads: &[&[u8]]) {
        let keys: Vec<String> = payloads
            .iter()
            .flat_map(|p| protocol::parse_ack(p))
            .collect();
        if keys.is_empty() {
            return;
        }
        match self.journal.outbox_ack_many(&keys) {
            Ok(n) => log::debug!("outbox: {n} of {} acked entries removed", keys.len()),
            Err(e) => log::error!("outbox acks: {e:#}"),
        }
    }

    fn mqtt_options(&self) -> Result<MqttOptions> {
        let m = &self.cfg.mqtt;
        let mut o = MqttOptions::new(self.device_id.clone(), m.host.clone(), m.port);
        o.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(m.keep_alive_secs.max(5)))
            .set_max_packet_size(
                transport_limit(m.max_payload_bytes),
                transport_limit(m.max_payload_bytes),
            )
            .set_request_channel_capacity(1024);
        if m.tls {
            o.set_transport(Transport::tls_with_config(crate::tls::rumqttc_config(
                m.ca_file.as_deref(),
            )?));
        }
        if m.use_device_token {
            if let Some(tok) = crate::registration::load_token(&self.cfg.token_file())? {
                o.set_credentials(self.device_id.clone(), tok.token);
            }
        }
        Ok(o)
    }

    /// Runs the agent until the MQTT request channel closes (never, in the daemon).
    pub fn run(self: &Arc<Self>) -> Result<()> {
        self.recover()?;
        self.purge();
        for t in self.task_types() {
            let (tx, rx) = mpsc::channel();
            self.wakers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(t.to_string(), tx);
            let me = self.clone();
            std::thread::Builder::new()
                .name(format!("worker-{t}"))
                .spawn(move || me.worker(t, rx))
                .context("spawning worker")?;
        }
        let (otx, orx) = mpsc::channel();
        *self.outbox_wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(otx);
        let me = self.clone();
        std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || me.outbox_loop(orx))
            .context("spawning outbox")?;
        if self.cfg.backend.url.is_some() {
            let me = self.clone();
            std::thread::Builder::new()
                .name("token".into())
                .spawn(move || crate::registration::refresh_loop(&me.cfg))
                .context("spawning token refresher")?;
        }

        signal_hook::flag::register(signal_hook::consts::SIGTERM, self.stopping.clone())
            .context("installing the SIGTERM handler")?;
        signal_hook::flag::register(signal_hook::consts::SIGINT, self.stopping.clone())
            .context("installing the SIGINT handler")?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("stop".into())
            .spawn(move || me.stop_watch())
            .context("spawning stop watcher")?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("confirm-boot".into())
            .spawn(move || me.confirm_boot())
            .context("spawning boot confirmation")?;

        let opts = self.mqtt_options()?;
        log::info!(
            "device {}: broker {}:{} (tls {}), tasks on {}, task payload limit {} bytes \
             (bigger tasks get an error result), transport packet limit {} bytes",
            self.device_id,
            self.cfg.mqtt.host,
            self.cfg.mqtt.port,
            self.cfg.mqtt.tls,
            self.topics.tasks,
            self.cfg.mqtt.max_payload_bytes,
            transport_limit(self.cfg.mqtt.max_payload_bytes)
        );
        let (client, mut conn) = Client::new(opts, 1024);
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
        let mut backoff = Backoff::new(
            self.cfg.mqtt.backoff_initial_ms,
            self.cfg.mqtt.backoff_max_ms,
        );
        let mut unacked: Vec<Publish> = Vec::new();
        loop {
            // one blocking receive, then drain what is already there so a
            // burst of tasks is journaled with one fsync
            let first = match conn.recv() {
                Ok(ev) => ev,
                Err(_) => return Ok(()),
            };
            let mut events = vec![(first, now_us())];
            while matches!(
                events.last(),
                Some((Ok(Event::Incoming(Packet::Publish(_))), _))
            ) && events.len() < 256
            {
                match conn.try_recv() {
                    Ok(ev) => events.push((ev, now_us())),
                    Err(_) => break,
                }
            }
            let mut task_msgs: Vec<(Publish, i64)> = Vec::new();
            let mut ack_msgs: Vec<Publish> = Vec::new();
            let mut failure = None;
            for (ev, at) in events {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        log::info!(
                            "connected to broker (session present: {}); subscribing",
                            ack.session_present
                        );
                        backoff.reset();
                        let subs = [
                            rumqttc::SubscribeFilter::new(
                                self.topics.tasks.clone(),
                                QoS::AtLeastOnce,
                            ),
                            rumqttc::SubscribeFilter::new(
                                self.topics.acks.clone(),
                                QoS::AtLeastOnce,
                            ),
                        ];
                        if let Err(e) = client.try_subscribe_many(subs) {
                            log::error!("subscribe request: {e}");
                        }
                        self.connected.store(true, Ordering::SeqCst);
                        if let Err(e) = self.journal.outbox_reset() {
                            log::error!("outbox reset: {e:#}");
                        }
                        self.wake_outbox();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        log::info!(
                            "subscribed to {} and {}",
                            self.topics.tasks,
                            self.topics.acks
                        );
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic == self.topics.tasks {
                            task_msgs.push((p, at));
                        } else if p.topic == self.topics.acks {
                            ack_msgs.push(p);
                        } else {
                            log::warn!("message on unexpected topic {}", p.topic);
                            unacked.push(p);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => failure = Some(e),
                }
            }
            if !task_msgs.is_empty() {
                let refs: Vec<(&[u8], i64)> = task_msgs
                    .iter()
                    .map(|(p, at)| (&p.payload[..], *at))
                    .collect();
                match self.on_task_messages(&refs) {
                    // journaled: now they may be acked
                    Ok(()) => unacked.extend(task_msgs.into_iter().map(|(p, _)| p)),
                    // not journaled: no ack, the broker redelivers after a reconnect
                    Err(e) => log::error!("journaling incoming tasks failed, not acked: {e:#}"),
                }
            }
            if !ack_msgs.is_empty() {
                let refs: Vec<&[u8]> = ack_msgs.iter().map(|p| &p.payload[..]).collect();
                self.on_ack_messages(&refs);
                unacked.extend(ack_msgs);
            }
            unacked.retain(|p| client.try_ack(p).is_err());
            if let Some(e) = failure {
                self.connected.store(false, Ordering::SeqCst);
                let d = backoff.next_delay();
                log::warn!("mqtt connection: {e}; reconnecting in {} ms", d.as_millis());
                std::thread::sleep(d);
                let refused = matches!(
                    e,
                    rumqttc::ConnectionError::ConnectionRefused(
                        rumqttc::ConnectReturnCode::BadUserNamePassword
                            | rumqttc::ConnectReturnCode::NotAuthorized
                    )
                );
                if refused && self.cfg.mqtt.use_device_token && self.cfg.backend.url.is_some() {
                    // refresh, and register again if the backend answers 401
                    match crate::registration::refresh(&self.cfg) {
                        Ok(_) => log::info!("device token renewed after the broker refused it"),
                        Err(e) => log::error!("renewing the device token: {e:#}"),
                    }
                }
                if self.cfg.mqtt.use_device_token {
                    if let Ok(Some(tok)) = crate::registration::load_token(&self.cfg.token_file()) {
                        conn.eventloop
                            .mqtt_options
                            .set_credentials(self.device_id.clone(), tok.token);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jittered_and_capped() {
        let mut b = Backoff::new(100, 1000);
        let d: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert!((50..=100).contains(&d[0]), "{d:?}");
        assert!((100..=200).contains(&d[1]), "{d:?}");
        assert!(d[7] <= 1000 && d[7] >= 500, "{d:?}");
        b.reset();
        assert!(b.next_delay().as_millis() <= 100);
    }

    #[test]
    fn transport_limit_exceeds_task_limit() {
        assert!(transport_limit(1024) > 1024);
        assert!(transport_limit(64 << 20) >= 4 * (64 << 20));
    }
}
