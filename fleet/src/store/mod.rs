//! The database: SQLite (one file, WAL) by default, PostgreSQL when a
//! `postgres://` URL is given. One schema (`migrations/`), one set of queries
//! written once against [`Tx`]; the two backends only differ in how a
//! statement is run. Parameters are written `$1`, `$2`, ... (PostgreSQL's
//! spelling; SQLite gets `?1`, `?2`).

mod postgres;
mod sqlite;

use anyhow::{bail, Context, Result};
use std::sync::Mutex;

/// Versioned migrations, applied in order; `schema_version` records the last.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/0001_init.sql")),
    (2, include_str!("migrations/0002_leases.sql")),
    (3, include_str!("migrations/0003_protocol2.sql")),
    (4, include_str!("migrations/0004_rollout_turns.sql")),
    (5, include_str!("migrations/0005_services.sql")),
];

/// A statement parameter or a column value: the schema has only BIGINT and
/// TEXT columns, and a NULL keeps its type (PostgreSQL checks it).
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Int(Option<i64>),
    Text(Option<String>),
}

impl From<i64> for Val {
    fn from(v: i64) -> Val {
        Val::Int(Some(v))
    }
}
impl From<Option<i64>> for Val {
    fn from(v: Option<i64>) -> Val {
        Val::Int(v)
    }
}
impl From<bool> for Val {
    fn from(v: bool) -> Val {
        Val::Int(Some(v as i64))
    }
}
impl From<Option<bool>> for Val {
    fn from(v: Option<bool>) -> Val {
        Val::Int(v.map(|b| b as i64))
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val::Text(Some(v.to_string()))
    }
}
impl From<String> for Val {
    fn from(v: String) -> Val {
        Val::Text(Some(v))
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Val {
        Val::Text(Some(v.clone()))
    }
}
impl From<Option<String>> for Val {
    fn from(v: Option<String>) -> Val {
        Val::Text(v)
    }
}
impl From<Option<&str>> for Val {
    fn from(v: Option<&str>) -> Val {
        Val::Text(v.map(str::to_string))
    }
}

/// Builds a parameter list: `params![a, b, c]`.
#[macro_export]
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::store::Val::from($v)),*][..] };
}

/// One result row, columns in SELECT order.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Val>);

impl Row {
    pub fn opt_i64(&self, i: usize) -> Option<i64> {
        match self.0.get(i) {
            Some(Val::Int(v)) => *v,
            _ => None,
        }
    }
    pub fn i64(&self, i: usize) -> i64 {
        self.opt_i64(i).unwrap_or(0)
    }
    pub fn opt_str(&self, i: usize) -> Option<String> {
        match self.0.get(i) {
            Some(Val::Text(v)) => v.clone(),
            _ => None,
        }
    }
    pub fn str(&self, i: usize) -> String {
        self.opt_str(i).unwrap_or_default()
    }
}

enum Conn {
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres(Mutex<Box<PgConn>>),
}

/// A PostgreSQL connection and its prepared statements (a query prepared
/// once runs in one round trip afterwards, not two).
struct PgConn {
    client: ::postgres::Client,
    cache: std::collections::HashMap<String, ::postgres::Statement>,
}

/// The store. One connection behind a lock: the controller's writers are
/// few (MQTT intake, publisher, ticks, HTTP) and each transaction is short.
pub struct Store {
    conn: Conn,
    /// What was opened, for error messages (a URL without its password).
    pub what: String,
}

/// An open transaction; committed by [`Store::tx`] when the closure returns Ok.
pub enum Tx<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres(
        ::postgres::Transaction<'a>,
        &'a mut std::collections::HashMap<String, ::postgres::Statement>,
    ),
}

impl Tx<'_> {
    /// Runs a statement; returns the number of rows changed.
    pub fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        match self {
            Tx::Sqlite(t) => sqlite::exec(t, sql, params),
            Tx::Postgres(t, cache) => postgres::exec(t, cache, sql, params),
        }
        .with_context(|| format!("running {}", first_line(sql)))
    }

    pub fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>> {
        match self {
            Tx::Sqlite(t) => sqlite::query(t, sql, params),
            Tx::Postgres(t, cache) => postgres::query(t, cache, sql, params),
        }
        .with_context(|| format!("running {}", first_line(sql)))
    }

    pub fn query_opt(&mut self, sql: &str, params: &[Val]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Serializes everything that touches one device across controllers
    /// sharing a PostgreSQL (a row lock until commit). Callers take it before
    /// any task row of the device, so locks are always taken device first.
    /// SQLite needs nothing: its write transactions are exclusive.
    pub fn lock_device(&mut self, id: &str) -> Result<()> {
        if let Tx::Postgres(..) = self {
            self.query(
                "SELECT id FROM devices WHERE id = $1 FOR UPDATE",
                params![id],
            )?;
        }
        Ok(())
    }

    /// ` FOR UPDATE` on PostgreSQL, nothing on SQLite (see `lock_device`).
    pub fn for_update(&self) -> &'static str {
        match self {
            Tx::Postgres(..) => " FOR UPDATE",
            Tx::Sqlite(_) => "",
        }
    }

    /// `FOR UPDATE SKIP LOCKED` where the backend has it (PostgreSQL): two
    /// publishers never claim the same outbox rows.
    pub fn skip_locked(&self) -> &'static str {
        match self {
            Tx::Postgres(..) => " FOR UPDATE SKIP LOCKED",
            Tx::Sqlite(_) => "",
        }
    }

    /// Next value of a named counter (ids that are the same on both backends).
    pub fn next_id(&mut self, counter: &str) -> Result<i64> {
        let r = self.query_opt(
            "UPDATE counters SET value = value + 1 WHERE name = $1 RETURNING value",
            params![counter],
        )?;
        match r {
            Some(r) => Ok(r.i64(0)),
            None => bail!("counter {counter} is missing from the schema"),
        }
    }
}

fn first_line(sql: &str) -> String {
    sql.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(80)
        .collect()
}

impl Store {
    /// `postgres://...` or `postgresql://...` opens PostgreSQL; anything else
    /// is a SQLite file path (created when missing). Migrations run here.
    pub fn open(target: &str) -> Result<Store> {
        let store = if target.starts_with("postgres://") || target.starts_with("postgresql://") {
            let what = redact_url(target);
            let client = ::postgres::Client::connect(target, ::postgres::NoTls)
                .with_context(|| format!("connecting to PostgreSQL at {what}"))?;
            Store {
                conn: Conn::Postgres(Mutex::new(Box::new(PgConn {
                    client,
                    cache: Default::default(),
                }))),
                what,
            }
        } else {
            Store {
                conn: Conn::Sqlite(Mutex::new(sqlite::open(target)?)),
                what: target.to_string(),
            }
        };
        store.migrate()?;
        Ok(store)
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.conn, Conn::Postgres(_))
    }

    fn migrate(&self) -> Result<()> {
        self.batch("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
        let current = self.tx(|tx| {
            Ok(tx
                .query_opt("SELECT MAX(version) FROM schema_version", &[])?
                .and_then(|r| r.opt_i64(0))
                .unwrap_or(0))
        })?;
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            self.tx(|tx| {
                match tx {
                    Tx::Sqlite(t) => t.execute_batch(sql)?,
                    Tx::Postgres(t, _) => t.batch_execute(sql)?,
                }
                tx.exec(
                    "INSERT INTO schema_version (version) VALUES ($1)",
                    params![*version],
                )?;
                Ok(())
            })
            .with_context(|| {
                format!(
                    "applying schema migration {version} to {}; the database is left at version {current}",
                    self.what
                )
            })?;
        }
        Ok(())
    }

    fn batch(&self, sql: &str) -> Result<()> {
        match &self.conn {
            Conn::Sqlite(c) => lock(c).execute_batch(sql)?,
            Conn::Postgres(c) => lock(c).client.batch_execute(sql)?,
        }
        Ok(())
    }

    /// Runs `f` in one transaction: committed when it returns Ok, rolled
    /// back otherwise.
    pub fn tx<T>(&self, f: impl FnOnce(&mut Tx) -> Result<T>) -> Result<T> {
        match &self.conn {
            Conn::Sqlite(c) => {
                let mut c = lock(c);
                // IMMEDIATE: take the write lock at the start, so two
                // writers never both read and then collide on commit.
                let t = c
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .with_context(|| format!("starting a transaction on {}", self.what))?;
                let mut tx = Tx::Sqlite(t);
                let v = f(&mut tx)?;
                let Tx::Sqlite(t) = tx else { unreachable!() };
                t.commit()
                    .with_context(|| format!("committing to {}", self.what))?;
                Ok(v)
            }
            Conn::Postgres(c) => {
                let mut g = lock(c);
                let PgConn { client, cache } = &mut **g;
                let t = client
                    .transaction()
                    .with_context(|| format!("starting a transaction on {}", self.what))?;
                let mut tx = Tx::Postgres(t, cache);
                let v = f(&mut tx)?;
                let Tx::Postgres(t, _) = tx else {
                    unreachable!()
                };
                t.commit()
                    .with_context(|| format!("committing to {}", self.what))?;
                Ok(v)
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `postgres://user:secret@host/db` → `postgres://user@host/db`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_not_shown() {
        assert_eq!(
            redact_url("postgres://fleet:s3cret@127.0.0.1:5432/fleet"),
            "postgres://fleet@127.0.0.1:5432/fleet"
        );
        assert_eq!(redact_url("/var/lib/fleet.db"), "/var/lib/fleet.db");
    }
}
