//! SQLite backend: WAL, `synchronous=FULL` (a committed task survives a
//! power cut), `$N` parameters rewritten to `?N`.

use super::{Row, Val};
use anyhow::{Context, Result};
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use std::time::Duration;

pub(super) fn open(path: &str) -> Result<rusqlite::Connection> {
    let c = rusqlite::Connection::open(path).with_context(|| format!("opening SQLite {path}"))?;
    c.busy_timeout(Duration::from_secs(10))?;
    c.pragma_update(None, "journal_mode", "WAL")
        .with_context(|| format!("turning on WAL for {path}"))?;
    c.pragma_update(None, "synchronous", "FULL")?;
    Ok(c)
}

/// `$1` → `?1`. The queries never put a `$` inside a string literal.
fn dialect(sql: &str) -> String {
    sql.replace('$', "?")
}

fn bind(params: &[Val]) -> Vec<ToSqlOutput<'static>> {
    params
        .iter()
        .map(|p| {
            ToSqlOutput::Owned(match p {
                Val::Int(Some(v)) => SqlValue::Integer(*v),
                Val::Text(Some(s)) => SqlValue::Text(s.clone()),
                Val::Int(None) | Val::Text(None) => SqlValue::Null,
            })
        })
        .collect()
}

pub(super) fn exec(t: &rusqlite::Transaction, sql: &str, params: &[Val]) -> Result<u64> {
    let mut st = t.prepare_cached(&dialect(sql))?;
    let n = st.execute(rusqlite::params_from_iter(bind(params)))?;
    Ok(n as u64)
}

pub(super) fn query(t: &rusqlite::Transaction, sql: &str, params: &[Val]) -> Result<Vec<Row>> {
    let mut st = t.prepare_cached(&dialect(sql))?;
    let n = st.column_count();
    let mut rows = st.query(rusqlite::params_from_iter(bind(params)))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut vals = Vec::with_capacity(n);
        for i in 0..n {
            vals.push(match r.get_ref(i)? {
                ValueRef::Integer(v) => Val::Int(Some(v)),
                ValueRef::Text(s) => Val::Text(Some(String::from_utf8_lossy(s).into_owned())),
                ValueRef::Null => Val::Int(None),
                ValueRef::Real(f) => Val::Int(Some(f as i64)),
                ValueRef::Blob(b) => Val::Text(Some(String::from_utf8_lossy(b).into_owned())),
            });
        }
        out.push(Row(vals));
    }
    Ok(out)
}
