//! The persistent outbox: results and events republished until acked.

use super::Agent;
use crate::journal::now_ms;
use anyhow::{Context, Result};
use rumqttc::{Client, QoS};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Agent {
    pub(super) fn outbox_loop(self: Arc<Self>, rx: mpsc::Receiver<()>) {
        let retry_ms = (self.cfg.mqtt.outbox_retry_secs * 1000) as i64;
        let mut last_purge = Instant::now();
        let mut last_clock_save = Instant::now();
        loop {
            if self.connected.load(Ordering::SeqCst) {
                if let Some(client) = self.client() {
                    if let Err(e) = self.flush_outbox(&client, retry_ms) {
                        log::error!("outbox: {e:#}");
                    }
                }
            }
            // The agent clock counts running time only as far as it was last
            // saved: a kill -9 or a power cut loses at most this minute.
            if last_clock_save.elapsed() > Duration::from_secs(60) {
                last_clock_save = Instant::now();
                if let Err(e) = self.journal.save_clock() {
                    log::error!("journal: saving the agent clock: {e:#}");
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
        if let Err(e) = self.journal.save_clock() {
            log::error!("journal: saving the agent clock: {e:#}");
        }
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
}
