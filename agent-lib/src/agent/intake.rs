//! Intake: task messages are journaled (one transaction per burst) before
//! they are acked; invalid ones get a `rejected` result; acks of results
//! clear the outbox.

use super::{now_us, Agent};
use crate::journal::{Incoming, Receive};
use crate::protocol::{self, Parsed, Status};
use anyhow::Result;
use rumqttc::QoS;
use serde_json::{json, Value};

impl Agent {
    /// Intake of one task message: journal first, then (by the caller) ack.
    pub fn on_task_message(&self, payload: &[u8], received_us: i64) -> Result<()> {
        self.on_task_messages(&[(payload, received_us)])
    }

    /// Intake of a burst of task messages: valid ones are journaled in one
    /// transaction; rejected ones get an error result. Only after this
    /// returns Ok may the messages be acked.
    pub fn on_task_messages(&self, msgs: &[(&[u8], i64)]) -> Result<()> {
        if crate::failpoint::fails("intake_journal") {
            anyhow::bail!("failpoint intake_journal: the journal write fails");
        }
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

    pub(super) fn on_ack_messages(&self, payloads: &[&[u8]]) {
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
}
