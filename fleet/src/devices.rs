//! Device registry: registration and token refresh (the agent's HTTP
//! contract), facts from heartbeats and boot confirmations, online/offline.

use crate::config::Config;
use crate::params;
use crate::store::{Row, Tx};
use anyhow::{bail, Context, Result};
use dualroot_api::wire::Heartbeat;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;

/// Where a device is in its life: the migration floor depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// The old single-root system.
    Legacy,
    /// A migration is armed or running (it reboots into the new layout).
    Migrating,
    /// A/B slots.
    Dualroot,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Legacy => "legacy",
            Layout::Migrating => "migrating",
            Layout::Dualroot => "dualroot",
        }
    }
    pub fn parse(s: &str) -> Option<Layout> {
        [Layout::Legacy, Layout::Migrating, Layout::Dualroot]
            .into_iter()
            .find(|l| l.name() == s)
    }
}

/// A device as the operator sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub model: Option<String>,
    pub layout: Layout,
    pub version: Option<String>,
    pub agent_version: Option<String>,
    /// Booted slot (`a`/`b`), none on a legacy system.
    pub slot: Option<String>,
    pub slot_primary: Option<String>,
    pub slot_fallback: Option<bool>,
    pub slot_good: Option<bool>,
    /// Boot id of the last boot confirmed good, and its version.
    pub boot_id: Option<String>,
    pub boot_version: Option<String>,
    pub boot_at: Option<i64>,
    pub services: Value,
    pub last_seen: Option<i64>,
    pub online: bool,
    /// Times the device came back after being offline.
    pub outages: i64,
    /// Task failures in a row (the retry penalty).
    pub failures: i64,
    pub registered_at: i64,
    /// The boot id of the newest heartbeat (protocol 2 agents): the boot a
    /// task sent now is compared with.
    pub current_boot_id: Option<String>,
    /// The agent's protocol version (absent: 1, no cancel, no boot id).
    pub protocol: Option<i64>,
    /// The agent's `at` of the newest heartbeat applied (internal).
    #[serde(skip)]
    pub hb_at: Option<i64>,
}

const COLUMNS: &str = "id, labels, model, layout, version, agent_version, slot, slot_primary, \
    slot_fallback, slot_good, boot_id, boot_version, boot_at, services, last_seen, outages, \
    failures, registered_at, hb_at, current_boot_id, protocol";

fn from_row(r: &Row, cfg: &Config, now: i64) -> Device {
    let last_seen = r.opt_i64(14);
    Device {
        id: r.str(0),
        labels: serde_json::from_str(&r.str(1)).unwrap_or_default(),
        model: r.opt_str(2),
        layout: Layout::parse(&r.str(3)).unwrap_or(Layout::Legacy),
        version: r.opt_str(4),
        agent_version: r.opt_str(5),
        slot: r.opt_str(6),
        slot_primary: r.opt_str(7),
        slot_fallback: r.opt_i64(8).map(|v| v != 0),
        slot_good: r.opt_i64(9).map(|v| v != 0),
        boot_id: r.opt_str(10),
        boot_version: r.opt_str(11),
        boot_at: r.opt_i64(12),
        services: serde_json::from_str(&r.str(13)).unwrap_or(Value::Null),
        last_seen,
        online: is_online(last_seen, cfg, now),
        outages: r.i64(15),
        failures: r.i64(16),
        registered_at: r.i64(17),
        hb_at: r.opt_i64(18),
        current_boot_id: r.opt_str(19),
        protocol: r.opt_i64(20),
    }
}

/// Online while a heartbeat came within the last 3 intervals: a broker
/// disconnect and quick reconnect in between never shows as an outage.
pub fn is_online(last_seen: Option<i64>, cfg: &Config, now: i64) -> bool {
    last_seen.is_some_and(|t| now - t <= cfg.offline_after_ms())
}

pub fn get(tx: &mut Tx, cfg: &Config, now: i64, id: &str) -> Result<Option<Device>> {
    Ok(tx
        .query_opt(
            &format!("SELECT {COLUMNS} FROM devices WHERE id = $1"),
            params![id],
        )?
        .map(|r| from_row(&r, cfg, now)))
}

/// [`get`], holding the device's row until the transaction ends (PostgreSQL;
/// see [`Tx::lock_device`]) — one round trip for both.
pub fn get_locked(tx: &mut Tx, cfg: &Config, now: i64, id: &str) -> Result<Option<Device>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM devices WHERE id = $1{}",
        tx.for_update()
    );
    Ok(tx
        .query_opt(&sql, params![id])?
        .map(|r| from_row(&r, cfg, now)))
}

/// One page of devices in id order: up to `limit` after the id `after`
/// (the previous page's last id, the API's `cursor`).
pub fn page(
    tx: &mut Tx,
    cfg: &Config,
    now: i64,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Device>> {
    Ok(tx
        .query(
            &format!(
                "SELECT {COLUMNS} FROM devices WHERE (CAST($1 AS TEXT) IS NULL OR id > $1) \
                 ORDER BY id LIMIT $2"
            ),
            params![after, limit],
        )?
        .iter()
        .map(|r| from_row(r, cfg, now))
        .collect())
}

/// Devices whose selector facts changed at or after `since` (all with
/// `None`) that are not members of `rollout` yet: a rollout's new members.
pub fn changed_since(
    tx: &mut Tx,
    cfg: &Config,
    now: i64,
    since: Option<i64>,
    rollout: &str,
) -> Result<Vec<Device>> {
    let cols = COLUMNS
        .split(", ")
        .map(|c| format!("d.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ");
    // two statements, so the one that runs every turn uses the index (and
    // no ORDER BY, which would make SQLite walk the primary key instead: the
    // caller orders new members itself)
    let changed = if since.is_some() {
        "d.changed_at >= $1"
    } else {
        "CAST($1 AS BIGINT) IS NULL"
    };
    Ok(tx
        .query(
            &format!(
                "SELECT {cols} FROM devices d WHERE {changed} \
                 AND NOT EXISTS (SELECT 1 FROM rollout_devices rd \
                                 WHERE rd.rollout_id = $2 AND rd.device_id = d.id)"
            ),
            params![since, rollout],
        )?
        .iter()
        .map(|r| from_row(r, cfg, now))
        .collect())
}

pub fn list(tx: &mut Tx, cfg: &Config, now: i64) -> Result<Vec<Device>> {
    Ok(tx
        .query(&format!("SELECT {COLUMNS} FROM devices ORDER BY id"), &[])?
        .iter()
        .map(|r| from_row(r, cfg, now))
        .collect())
}

/// The answer to `/register` and `/token/refresh`, as the agent reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Issued {
    pub device_id: String,
    pub device_token: String,
    pub expires_in: i64,
}

/// Device tokens are kept as their sha256: a copy of the database does not
/// hand out working tokens.
fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for a device id or token")?;
    Ok(hex::encode(b))
}

/// `POST /register`: a known register token → a new device id and token.
/// The hardware facts are kept; `model` comes from `hardware.model` (or the
/// DMI product name) when the agent sends one.
pub fn register(
    tx: &mut Tx,
    cfg: &Config,
    now: i64,
    register_token: &str,
    hardware: &Value,
) -> Result<Option<Issued>> {
    let Some(labels) = cfg.register_tokens.get(register_token) else {
        return Ok(None);
    };
    let n = tx.next_id("device")?;
    let id = format!("va-{n}-{}", random_hex(4)?);
    let token = random_hex(24)?;
    let model = ["model", "productName", "product_name"]
        .iter()
        .find_map(|k| hardware.get(*k).and_then(Value::as_str))
        .map(str::to_string);
    tx.exec(
        "INSERT INTO devices (id, token, token_expires_at, registered_at, hardware, labels, model, \
         layout, services, outages, failures, changed_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'legacy', '[]', 0, 0, $4)",
        params![
            &id,
            token_hash(&token),
            now + cfg.token_lifetime_s * 1000,
            now,
            hardware.to_string(),
            serde_json::to_string(labels)?,
            model
        ],
    )?;
    Ok(Some(Issued {
        device_id: id,
        device_token: token,
        expires_in: cfg.token_lifetime_s,
    }))
}

/// Bench helper (`dualroot-fleet seed`): `n` registered devices that have
/// never answered, with labels, their next heartbeat task spread over one
/// interval as in a fleet that has been running. Ids `seed-<i>`.
pub fn seed(
    tx: &mut Tx,
    cfg: &Config,
    now: i64,
    first: usize,
    n: usize,
    labels: &BTreeMap<String, String>,
) -> Result<()> {
    let labels = serde_json::to_string(labels)?;
    for i in first..first + n {
        let spread = (i as i64 * 7919) % cfg.heartbeat_interval_ms.max(1);
        tx.exec(
            "INSERT INTO devices (id, token, token_expires_at, registered_at, hardware, labels, model, \
             layout, services, outages, failures, hb_sent_at, changed_at) \
             VALUES ($1, $2, $3, $3, '{}', $4, 'va-seed', 'dualroot', '[]', 0, 0, $5, $3)",
            params![
                format!("seed-{i}"),
                token_hash(&format!("seed-token-{i}")),
                now,
                &labels,
                now - spread
            ],
        )?;
    }
    Ok(())
}

/// `POST /token/refresh`: a valid device token → a new one for the same id;
/// `None` (401) for an unknown or expired token, and the agent registers again.
pub fn refresh(tx: &mut Tx, cfg: &Config, now: i64, token: &str) -> Result<Option<Issued>> {
    let Some(r) = tx.query_opt(
        "SELECT id FROM devices WHERE token = $1 AND token_expires_at > $2",
        params![token_hash(token), now],
    )?
    else {
        return Ok(None);
    };
    let id = r.str(0);
    let new = random_hex(24)?;
    tx.exec(
        "UPDATE devices SET token = $1, token_expires_at = $2 WHERE id = $3",
        params![token_hash(&new), now + cfg.token_lifetime_s * 1000, &id],
    )?;
    Ok(Some(Issued {
        device_id: id,
        device_token: new,
        expires_in: cfg.token_lifetime_s,
    }))
}

/// Sets a device's labels (operator).
pub fn set_labels(
    tx: &mut Tx,
    now: i64,
    id: &str,
    labels: &BTreeMap<String, String>,
) -> Result<()> {
    if tx.exec(
        "UPDATE devices SET labels = $1, changed_at = $2 WHERE id = $3",
        params![serde_json::to_string(labels)?, now, id],
    )? == 0
    {
        bail!("no device {id}; nothing was changed");
    }
    Ok(())
}

/// Records a heartbeat answer sent at `at` (the agent's clock) from
/// `prev` (read in this transaction), in one statement. One older than the
/// newest applied, or unreadable, only counts as a sign of life (`None`). Returns the
/// answer as read (`dualroot_api::wire::Heartbeat`, what the agent sends).
pub fn heartbeat(
    tx: &mut Tx,
    cfg: &Config,
    now: i64,
    prev: &Device,
    answer: &Value,
    at: Option<i64>,
) -> Result<Option<Heartbeat>> {
    let id = &prev.id;
    let hb: Heartbeat = match serde_json::from_value(answer.clone()) {
        Ok(hb) => hb,
        Err(e) => {
            // acked and dropped: the agent would send the same bytes forever
            log::warn!(
                "heartbeat answer of {id} unreadable ({e}): {answer}; only its arrival counts"
            );
            seen(tx, cfg, now, prev)?;
            return Ok(None);
        }
    };
    if let (Some(at), Some(newest)) = (at, prev.hb_at) {
        if at < newest {
            seen(tx, cfg, now, prev)?;
            return Ok(None);
        }
    }
    let ab = hb.ab();
    let layout = match (ab, prev.layout) {
        (true, _) => Layout::Dualroot,
        // a migration armed on this device stays "migrating" until the new
        // system answers
        (false, Layout::Migrating) => Layout::Migrating,
        (false, _) => Layout::Legacy,
    };
    tx.exec(
        "UPDATE devices SET version = $1, agent_version = $2, slot = $3, slot_primary = $4, \
         slot_fallback = $5, slot_good = $6, services = $7, layout = $8, last_seen = $9, \
         hb_at = COALESCE($10, hb_at), outages = outages + $11, current_boot_id = $12, \
         protocol = $13, changed_at = COALESCE($14, changed_at) WHERE id = $15",
        params![
            hb.firmware_version.clone(),
            hb.agent_version.clone(),
            hb.slot.booted.clone().filter(|_| ab),
            hb.slot.primary.filter(|_| ab).map(|s| s.name().to_string()),
            hb.slot.fallback.as_bool(),
            hb.slot.booted_good,
            serde_json::to_string(&hb.services)?,
            layout.name(),
            now,
            at,
            came_back(cfg, now, prev) as i64,
            hb.boot_id.clone(),
            hb.protocol.map(i64::from),
            // a rollout looks at a device again when what its selector and
            // floors read changed
            (prev.version != hb.firmware_version || prev.layout != layout).then_some(now),
            id.as_str()
        ],
    )?;
    Ok(Some(hb))
}

/// It was offline and answers again: one outage.
fn came_back(cfg: &Config, now: i64, prev: &Device) -> bool {
    prev.last_seen
        .is_some_and(|t| now - t > cfg.offline_after_ms())
}

/// Any message from the device shows it is alive (a result, an event).
pub fn seen(tx: &mut Tx, cfg: &Config, now: i64, prev: &Device) -> Result<()> {
    tx.exec(
        "UPDATE devices SET outages = outages + $1, last_seen = $2 WHERE id = $3",
        params![came_back(cfg, now, prev) as i64, now, prev.id.as_str()],
    )?;
    Ok(())
}

/// A `bootConfirmed` event: this boot (its id from the ackKey
/// `boot-confirmed-<boot id>`) runs `version` on a slot confirmed good.
pub fn boot_confirmed(
    tx: &mut Tx,
    now: i64,
    id: &str,
    boot_id: &str,
    result: &Value,
) -> Result<()> {
    let version = result
        .get("version")
        .and_then(Value::as_str)
        .or_else(|| result.get("firmwareVersion").and_then(Value::as_str));
    let slot = result.get("slot").and_then(Value::as_str);
    tx.exec(
        "UPDATE devices SET boot_id = $1, boot_version = $2, boot_at = $3, slot = $4, slot_good = 1, \
         layout = 'dualroot', version = COALESCE($2, version), changed_at = $3 WHERE id = $5",
        params![boot_id, version, now, slot, id],
    )?;
    Ok(())
}

pub fn set_layout(tx: &mut Tx, now: i64, id: &str, layout: Layout) -> Result<()> {
    tx.exec(
        "UPDATE devices SET layout = $1, changed_at = $2 WHERE id = $3",
        params![layout.name(), now, id],
    )?;
    Ok(())
}

/// Failures in a row: counted on each failed attempt, cleared on success.
pub fn count_failure(tx: &mut Tx, id: &str, failed: bool) -> Result<()> {
    if failed {
        tx.exec(
            "UPDATE devices SET failures = failures + 1 WHERE id = $1",
            params![id],
        )?;
    } else {
        tx.exec("UPDATE devices SET failures = 0 WHERE id = $1", params![id])?;
    }
    Ok(())
}
