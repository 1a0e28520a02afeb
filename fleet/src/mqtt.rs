//! The MQTT room: subscribes to every device's results and heartbeat topics
//! and hands each message to the store (acked to the broker only after it
//! was committed); publishes outbox rows with QoS 1 and marks a row sent
//! when the broker's PUBACK for it came.
//!
//! The controller's own session is clean: what devices sent while it was
//! away comes again from the agents' outboxes (they republish until acked),
//! and what it had in flight is dropped by the client on reconnect, so the
//! rows are simply claimed and published again. Nothing here is specific to
//! Mosquitto.

use crate::{outbox, Fleet};
use anyhow::Result;
use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Options {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive_s: u64,
}

/// Outbox rows published and not yet acknowledged by the broker, at most.
const MAX_IN_FLIGHT: usize = 500;

/// Which outbox row each in-flight PUBLISH carries. rumqttc reports
/// `Outgoing::Publish(pkid)` in the order publishes were queued, and only
/// this module's publisher publishes, so a FIFO of row ids maps packet ids
/// to rows.
#[derive(Default)]
struct Tracker {
    connected: bool,
    queued: VecDeque<i64>,
    by_pkid: HashMap<u16, i64>,
}

impl Tracker {
    /// Everything in flight is lost with the connection: hand the rows back.
    fn drop_all(&mut self) -> Vec<i64> {
        self.connected = false;
        let mut ids: Vec<i64> = self.queued.drain(..).collect();
        ids.extend(self.by_pkid.drain().map(|(_, id)| id));
        ids
    }
}

pub struct Mqtt {
    stop: Arc<AtomicBool>,
    client: Client,
    threads: Vec<JoinHandle<()>>,
}

impl Mqtt {
    pub fn start(fleet: Arc<Fleet>, opts: &Options) -> Result<Mqtt> {
        let mut o = MqttOptions::new(&opts.client_id, &opts.host, opts.port);
        o.set_keep_alive(Duration::from_secs(opts.keep_alive_s.max(5)));
        o.set_clean_session(true);
        o.set_manual_acks(true);
        // results carry service lists and error texts: more than 10 KiB
        o.set_max_packet_size(1 << 20, 1 << 20);
        // in flight toward the broker (QoS 1 publishes awaiting PUBACK)
        o.set_inflight(MAX_IN_FLIGHT as u16);
        // room for a burst's acks plus the publisher's batch: a full
        // channel fails `try_ack`/`try_publish` (both are retried, but a
        // broker waits for the acks of what it delivered before it sends more)
        let (client, mut conn) = Client::new(o, 4 * MAX_IN_FLIGHT);
        let stop = Arc::new(AtomicBool::new(false));
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let prefix = fleet.cfg.topic_prefix.clone();

        let (f, c, t, s) = (fleet.clone(), client.clone(), tracker.clone(), stop.clone());
        let events = std::thread::Builder::new()
            .name("mqtt-events".into())
            .spawn(move || {
                let mut backoff = Duration::from_millis(200);
                // applied messages whose ack did not fit in the client's
                // channel: acked on the next turns (the broker holds back
                // deliveries while too many are unacked)
                let mut unacked: Vec<rumqttc::Publish> = Vec::new();
                while !s.load(Ordering::SeqCst) {
                    unacked.retain(|p| c.try_ack(p).is_err());
                    // one event, then whatever else is ready: a burst of
                    // results is applied in one transaction
                    let first = match conn.recv_timeout(Duration::from_millis(200)) {
                        Ok(ev) => ev,
                        Err(rumqttc::RecvTimeoutError::Timeout) => continue,
                        Err(rumqttc::RecvTimeoutError::Disconnected) => break,
                    };
                    let mut evs = vec![first];
                    while evs.len() < 500 && evs.last().is_some_and(|e| e.is_ok()) {
                        match conn.try_recv() {
                            Ok(ev) => evs.push(ev),
                            Err(_) => break,
                        }
                    }
                    let mut incoming = Vec::new();
                    let mut sent = Vec::new();
                    let mut failed = None;
                    for ev in evs {
                        match ev {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                backoff = Duration::from_millis(200);
                                for leaf in ["results", "heartbeat"] {
                                    let topic = format!("{prefix}/+/{leaf}");
                                    if let Err(e) = c.try_subscribe(&topic, QoS::AtLeastOnce) {
                                        log::error!("subscribing to {topic}: {e}; the next reconnect tries again");
                                    }
                                }
                                lock(&t).connected = true;
                                log::info!("connected to the broker");
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => incoming.push(p),
                            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                                let mut tr = lock(&t);
                                if let Some(id) = tr.queued.pop_front() {
                                    tr.by_pkid.insert(pkid, id);
                                }
                            }
                            Ok(Event::Incoming(Packet::PubAck(a))) => {
                                if let Some(id) = lock(&t).by_pkid.remove(&a.pkid) {
                                    sent.push(id);
                                }
                            }
                            Ok(_) => {}
                            Err(e) => failed = Some(e),
                        }
                    }
                    if !incoming.is_empty() {
                        let msgs: Vec<(&str, &[u8])> = incoming
                            .iter()
                            .map(|p| (p.topic.as_str(), &p.payload[..]))
                            .collect();
                        for (p, r) in incoming.iter().zip(f.ingest_batch(&msgs)) {
                            match r {
                                // acked only once it is in the database
                                Ok(_) => {
                                    if c.try_ack(p).is_err() {
                                        unacked.push(p.clone());
                                    }
                                }
                                Err(e) => log::error!(
                                    "storing a message from {}: {e:#}; not acked, the agent sends it again",
                                    p.topic
                                ),
                            }
                        }
                    }
                    if !sent.is_empty() {
                        let now = f.now();
                        let r = f.store.tx(|tx| {
                            for id in &sent {
                                outbox::mark_sent(tx, now, *id)?;
                            }
                            Ok(())
                        });
                        if let Err(e) = r {
                            log::error!("marking {} outbox rows sent: {e:#}; they will be sent again", sent.len());
                        }
                    }
                    if let Some(e) = failed {
                        // the session is clean: the broker forgets what it delivered
                        unacked.clear();
                        let ids = lock(&t).drop_all();
                        if !ids.is_empty() {
                            let r = f.store.tx(|tx| {
                                for id in &ids {
                                    outbox::unclaim(tx, *id)?;
                                }
                                Ok(())
                            });
                            if let Err(e) = r {
                                log::error!("handing back {} outbox rows: {e:#}; they are sent again in {} s", ids.len(), outbox::RECLAIM_MS / 1000);
                            }
                        }
                        if s.load(Ordering::SeqCst) {
                            break;
                        }
                        log::warn!("broker connection: {e}; reconnecting in {} ms", backoff.as_millis());
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            })?;

        let (f, c, t, s) = (fleet, client.clone(), tracker, stop.clone());
        let publisher = std::thread::Builder::new()
            .name("outbox-publisher".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    match publish_some(&f, &c, &t) {
                        Ok(Turn::Sent(n)) if n > 0 => {}
                        Ok(Turn::Sent(_)) => std::thread::sleep(Duration::from_millis(100)),
                        Ok(Turn::NoRoom) => std::thread::sleep(Duration::from_millis(5)),
                        Err(e) => {
                            log::error!("outbox publisher: {e:#}; trying again");
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    }
                }
            })?;
        Ok(Mqtt {
            stop,
            client,
            threads: vec![events, publisher],
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.client.disconnect();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

enum Turn {
    /// Rows published (0: nothing to send, or not connected).
    Sent(usize),
    /// Too many in flight: wait for PUBACKs.
    NoRoom,
}

/// Claims a batch of outbox rows and publishes them while connected.
fn publish_some(f: &Fleet, c: &Client, t: &Mutex<Tracker>) -> Result<Turn> {
    let room = {
        let tr = lock(t);
        if !tr.connected {
            return Ok(Turn::Sent(0));
        }
        MAX_IN_FLIGHT.saturating_sub(tr.queued.len() + tr.by_pkid.len())
    };
    if room < 50 {
        return Ok(Turn::NoRoom);
    }
    let now = f.now();
    let batch = f
        .store
        .tx(|tx| outbox::claim(tx, now, room.min(200) as i64))?;
    let mut handed_back = Vec::new();
    for m in &batch {
        // under the lock: a disconnect is seen either before (the row goes
        // back) or after (drop_all hands it back)
        let mut tr = lock(t);
        if !tr.connected {
            handed_back.push(m.id);
            continue;
        }
        tr.queued.push_back(m.id);
        if let Err(e) = c.try_publish(&m.topic, QoS::AtLeastOnce, false, m.payload.clone()) {
            tr.queued.pop_back();
            log::warn!(
                "publishing outbox row {} to {}: {e}; it is sent again",
                m.id,
                m.topic
            );
            handed_back.push(m.id);
        }
    }
    if !handed_back.is_empty() {
        f.store.tx(|tx| {
            for id in &handed_back {
                outbox::unclaim(tx, *id)?;
            }
            Ok(())
        })?;
    }
    Ok(Turn::Sent(batch.len() - handed_back.len()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
