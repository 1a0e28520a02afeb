//! The controller's one handle: store, clock and settings, and the turns
//! that the MQTT intake, the ticker and the HTTP API run, each one
//! transaction.

use crate::clock::Clock;
use crate::config::Config;
use crate::store::Store;
use crate::tasks::intake::{self, Intake};
use crate::{lease, outbox, rollout, tasks};
use anyhow::Result;
use std::sync::Arc;

/// One transaction's worth of periodic work.
type Step<'a> = dyn Fn(&mut crate::store::Tx) -> Result<()> + 'a;

pub struct Fleet {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub cfg: Config,
    /// This controller's name in the ticker lease.
    pub instance: String,
}

impl Fleet {
    pub fn new(store: Store, clock: Arc<dyn Clock>, cfg: Config) -> Fleet {
        Fleet::named(store, clock, cfg, &format!("fleet-{}", std::process::id()))
    }

    pub fn named(store: Store, clock: Arc<dyn Clock>, cfg: Config, instance: &str) -> Fleet {
        Fleet {
            store,
            clock,
            cfg,
            instance: instance.to_string(),
        }
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

    /// Many messages in one transaction (one commit, one fsync, for a burst
    /// of heartbeats). Applied in arrival order per device; across devices
    /// in device order, so two controllers lock device rows in the same
    /// order. When the batch fails as a whole, each message is tried in a
    /// transaction of its own, so one bad message holds back only itself.
    pub fn ingest_batch(&self, msgs: &[(&str, &[u8])]) -> Vec<Result<Intake>> {
        let mut order: Vec<usize> = (0..msgs.len()).collect();
        order.sort_by_key(|&i| intake::topic_device(&self.cfg, msgs[i].0).unwrap_or(""));
        let now = self.now();
        let batch = self.store.tx(|tx| {
            let mut out = vec![None; msgs.len()];
            for &i in &order {
                out[i] = Some(intake::ingest(tx, &self.cfg, now, msgs[i].0, msgs[i].1)?);
            }
            Ok(out)
        });
        match batch {
            Ok(out) => out
                .into_iter()
                .map(|r| Ok(r.expect("every message was applied")))
                .collect(),
            Err(e) => {
                log::warn!(
                    "applying {} messages in one transaction: {e:#}; applying them one by one",
                    msgs.len()
                );
                msgs.iter().map(|(t, p)| self.ingest(t, p)).collect()
            }
        }
    }

    /// Periodic work: deadlines and retries, rollouts, heartbeat tasks.
    /// Runs only while this instance holds the ticker lease (taken again at
    /// the start of each transaction); false when another instance holds it.
    pub fn tick(&self) -> Result<bool> {
        let now = self.now();
        let (cfg, me) = (&self.cfg, self.instance.as_str());
        let held =
            |tx: &mut crate::store::Tx| lease::hold(tx, lease::TICKER, me, now, cfg.lease_ttl_ms);
        let steps: [&Step; 4] = [
            &|tx| tasks::tick(tx, cfg, now),
            &|tx| rollout::tick_all(tx, cfg, now),
            &|tx| tasks::send_heartbeats(tx, cfg, now).map(|_| ()),
            &|tx| {
                tasks::intake::prune(tx, now - cfg.dedup_keep_ms)?;
                outbox::prune(tx, now, 24 * 3_600_000).map(|_| ())
            },
        ];
        for step in steps {
            let ran = self.store.tx(|tx| {
                if !held(tx)? {
                    return Ok(false);
                }
                step(tx)?;
                Ok(true)
            })?;
            if !ran {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
