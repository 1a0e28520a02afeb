//! The controller's one handle: store, clock and settings, and the turns
//! that the MQTT intake, the ticker and the HTTP API run, each one
//! transaction.

use crate::clock::Clock;
use crate::config::Config;
use crate::store::Store;
use crate::tasks::intake::{self, Intake};
use crate::{outbox, rollout, tasks};
use anyhow::Result;
use std::sync::Arc;

pub struct Fleet {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub cfg: Config,
}

impl Fleet {
    pub fn new(store: Store, clock: Arc<dyn Clock>, cfg: Config) -> Fleet {
        Fleet { store, clock, cfg }
    }

    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// One message from a device (results or heartbeat topic).
    pub fn ingest(&self, topic: &str, payload: &[u8]) -> Result<Intake> {
        let now = self.now();
        let r = self
            .store
            .tx(|tx| intake::ingest(tx, &self.cfg, now, topic, payload))?;
        if let Intake::Ignored(why) = &r {
            log::info!("message on {topic} not applied: {why}");
        }
        Ok(r)
    }

    /// Periodic work: deadlines and retries, rollouts, heartbeat tasks.
    pub fn tick(&self) -> Result<()> {
        let now = self.now();
        self.store.tx(|tx| tasks::tick(tx, &self.cfg, now))?;
        self.store.tx(|tx| rollout::tick_all(tx, &self.cfg, now))?;
        self.store
            .tx(|tx| tasks::send_heartbeats(tx, &self.cfg, now))?;
        self.store.tx(|tx| {
            tasks::intake::prune(tx, now - self.cfg.dedup_keep_ms)?;
            outbox::prune(tx, now, 24 * 3_600_000)
        })?;
        Ok(())
    }
}
