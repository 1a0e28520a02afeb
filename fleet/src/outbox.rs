//! The transactional outbox: a message to a device is a row written in the
//! same transaction as the state change it carries; the publisher sends rows
//! over MQTT (QoS 1) and marks them sent when the broker acknowledged them.
//! A row claimed by a publisher that died is sent again after a while: the
//! agent drops a taskId it has seen, so a second copy is harmless.

use crate::params;
use crate::store::Tx;
use anyhow::Result;

/// A claimed row not marked sent within this time is claimed again.
pub const RECLAIM_MS: i64 = 30_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: i64,
    pub topic: String,
    pub payload: String,
}

pub fn enqueue(
    tx: &mut Tx,
    now: i64,
    topic: &str,
    payload: &str,
    task_id: Option<&str>,
) -> Result<i64> {
    let id = tx.next_id("outbox")?;
    tx.exec(
        "INSERT INTO outbox (id, topic, payload, task_id, created_at) VALUES ($1, $2, $3, $4, $5)",
        params![id, topic, payload, task_id, now],
    )?;
    Ok(id)
}

/// Claims up to `limit` unsent rows (oldest first) for publishing.
pub fn claim(tx: &mut Tx, now: i64, limit: i64) -> Result<Vec<Message>> {
    let sql = format!(
        "SELECT id, topic, payload FROM outbox WHERE sent_at IS NULL \
         AND (claimed_at IS NULL OR claimed_at < $1) ORDER BY id LIMIT $2{}",
        tx.skip_locked()
    );
    let rows = tx.query(&sql, params![now - RECLAIM_MS, limit])?;
    let msgs: Vec<Message> = rows
        .iter()
        .map(|r| Message {
            id: r.i64(0),
            topic: r.str(1),
            payload: r.str(2),
        })
        .collect();
    for m in &msgs {
        tx.exec(
            "UPDATE outbox SET claimed_at = $1 WHERE id = $2",
            params![now, m.id],
        )?;
    }
    Ok(msgs)
}

/// The broker acknowledged the PUBLISH (PUBACK).
pub fn mark_sent(tx: &mut Tx, now: i64, id: i64) -> Result<()> {
    tx.exec(
        "UPDATE outbox SET sent_at = $1 WHERE id = $2",
        params![now, id],
    )?;
    Ok(())
}

/// A publish that did not reach the broker: send it on the next turn.
pub fn unclaim(tx: &mut Tx, id: i64) -> Result<()> {
    tx.exec(
        "UPDATE outbox SET claimed_at = NULL WHERE id = $1 AND sent_at IS NULL",
        params![id],
    )?;
    Ok(())
}

/// Rows not yet acknowledged by the broker.
pub fn unsent(tx: &mut Tx) -> Result<i64> {
    Ok(tx
        .query_opt("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL", &[])?
        .map(|r| r.i64(0))
        .unwrap_or(0))
}

/// Sent rows older than `keep_ms` are deleted (the tasks keep the history).
pub fn prune(tx: &mut Tx, now: i64, keep_ms: i64) -> Result<u64> {
    tx.exec(
        "DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < $1",
        params![now - keep_ms],
    )
}
