//! The ticker lease: several controllers may share one PostgreSQL; the one
//! holding the lease runs the periodic work, the others only take MQTT and
//! HTTP traffic (which is safe on every instance: results are deduplicated
//! by ackKey and each device's rows are locked while a message for it is
//! applied). A holder renews the lease on every tick; a controller that
//! died is replaced once its lease ran out.

use crate::params;
use crate::store::Tx;
use anyhow::Result;

pub const TICKER: &str = "ticker";

/// Takes or renews `name` for `holder` until `now + ttl_ms`; false while
/// another holder's lease runs. In PostgreSQL the row stays locked until
/// the transaction ends, so ticks of two instances never overlap.
pub fn hold(tx: &mut Tx, name: &str, holder: &str, now: i64, ttl_ms: i64) -> Result<bool> {
    let n = tx.exec(
        "INSERT INTO leases (name, holder, until_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms \
         WHERE leases.holder = excluded.holder OR leases.until_ms < $4",
        params![name, holder, now + ttl_ms, now],
    )?;
    Ok(n == 1)
}

/// Who holds `name` and until when.
pub fn holder(tx: &mut Tx, name: &str) -> Result<Option<(String, i64)>> {
    Ok(tx
        .query_opt(
            "SELECT holder, until_ms FROM leases WHERE name = $1",
            params![name],
        )?
        .map(|r| (r.str(0), r.i64(1))))
}
