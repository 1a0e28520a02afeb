//! PostgreSQL backend (the sync `postgres` crate: pure Rust, no libpq).

use super::{Row, Val};
use anyhow::{bail, Result};
use postgres::types::{ToSql, Type};
use postgres::Statement;
use std::collections::HashMap;

/// The statement for `sql`, prepared on first use.
fn prepared(
    t: &mut postgres::Transaction,
    cache: &mut HashMap<String, Statement>,
    sql: &str,
) -> Result<Statement> {
    if let Some(s) = cache.get(sql) {
        return Ok(s.clone());
    }
    let s = t.prepare(sql)?;
    cache.insert(sql.to_string(), s.clone());
    Ok(s)
}

fn bind(params: &[Val]) -> Vec<Box<dyn ToSql + Sync>> {
    params
        .iter()
        .map(|p| -> Box<dyn ToSql + Sync> {
            match p {
                Val::Int(v) => Box::new(*v),
                Val::Text(v) => Box::new(v.clone()),
            }
        })
        .collect()
}

pub(super) fn exec(
    t: &mut postgres::Transaction,
    cache: &mut HashMap<String, Statement>,
    sql: &str,
    params: &[Val],
) -> Result<u64> {
    let st = prepared(t, cache, sql)?;
    let b = bind(params);
    let refs: Vec<&(dyn ToSql + Sync)> = b.iter().map(|x| x.as_ref()).collect();
    Ok(t.execute(&st, &refs)?)
}

pub(super) fn query(
    t: &mut postgres::Transaction,
    cache: &mut HashMap<String, Statement>,
    sql: &str,
    params: &[Val],
) -> Result<Vec<Row>> {
    let st = prepared(t, cache, sql)?;
    let b = bind(params);
    let refs: Vec<&(dyn ToSql + Sync)> = b.iter().map(|x| x.as_ref()).collect();
    let mut out = Vec::new();
    for r in t.query(&st, &refs)? {
        let mut vals = Vec::with_capacity(r.len());
        for (i, c) in r.columns().iter().enumerate() {
            vals.push(match *c.type_() {
                Type::INT8 => Val::Int(r.try_get::<_, Option<i64>>(i)?),
                Type::INT4 => Val::Int(r.try_get::<_, Option<i32>>(i)?.map(i64::from)),
                Type::TEXT | Type::VARCHAR => Val::Text(r.try_get::<_, Option<String>>(i)?),
                ref other => bail!(
                    "column {} has type {other}, which the store does not read (BIGINT and TEXT only)",
                    c.name()
                ),
            });
        }
        out.push(Row(vals));
    }
    Ok(out)
}
