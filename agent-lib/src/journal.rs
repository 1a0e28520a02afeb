//! Crash-safe task journal and outbox (SQLite, WAL, synchronous=FULL).
//!
//! A task is inserted (state `received`) before its MQTT message is acked;
//! a worker moves it to `running`, then `done`/`failed` together with its
//! result message in the outbox, in one transaction, so a result is never
//! lost and a task is never claimed twice.

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The row state of a task rejected before it ran (not a [`State`]: it never
/// runs, and a valid task with its id replaces it).
const REJECTED: &str = "rejected";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Received,
    Running,
    Done,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Received => "received",
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "received" => State::Received,
            "running" => State::Running,
            "done" => State::Done,
            "failed" => State::Failed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct TaskRow {
    pub task_id: String,
    pub task_type: String,
    pub body: String,
    pub state: State,
    pub attempts: u32,
    pub received_at_ms: i64,
}

/// What `receive` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Receive {
    /// First time this taskId is seen; now journaled as `received`.
    New,
    /// Seen before and finished: the stored result message was queued again.
    DuplicateFinished,
    /// Seen before, not finished yet.
    DuplicateInProgress(State),
}

/// One incoming task for [`Journal::receive_batch`].
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    pub task_id: &'a str,
    pub task_type: &'a str,
    pub body: &'a str,
    pub received_at_ms: i64,
    pub result_topic: &'a str,
}

#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub key: String,
    pub topic: String,
    pub payload: String,
    pub sends: u32,
}

pub struct Journal {
    conn: Mutex<Connection>,
    /// Intake (journal-then-ack) waiting for the connection: background
    /// work (workers, outbox) lets it go first.
    intake_waiting: AtomicUsize,
    /// The agent clock (see [`Journal::clock_ms`]): persisted running time at
    /// open, the monotonic start of this process, and a test offset.
    clock_base_ms: i64,
    clock_started: std::time::Instant,
    clock_extra_ms: std::sync::atomic::AtomicI64,
}

/// The kv key holding the agent clock across restarts.
const CLOCK_KEY: &str = "agent_clock_ms";

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Journal {
    pub fn open(path: &Path) -> Result<Journal> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening journal {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .context("setting WAL mode")?;
        conn.pragma_update(None, "synchronous", "FULL")
            .context("setting synchronous=FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS tasks (
                task_id TEXT PRIMARY KEY,
                task_type TEXT NOT NULL,
                body TEXT NOT NULL,
                state TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                result TEXT,
                received_at_ms INTEGER NOT NULL,
                journaled_at_ms INTEGER NOT NULL,
                updated_at_ms INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS tasks_queue ON tasks(task_type, state, received_at_ms);
             CREATE TABLE IF NOT EXISTS outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                key TEXT NOT NULL UNIQUE,
                topic TEXT NOT NULL,
                payload TEXT NOT NULL,
                created_at_ms INTEGER NOT NULL,
                last_sent_ms INTEGER NOT NULL DEFAULT 0,
                sends INTEGER NOT NULL DEFAULT 0,
                -- queued again (duplicate task) and not sent since: an ack
                -- for an earlier send must not remove it
                resend INTEGER NOT NULL DEFAULT 0
             );
             CREATE TABLE IF NOT EXISTS kv (
                key TEXT PRIMARY KEY,
                value TEXT NOT NULL
             );",
        )
        .context("creating journal tables")?;
        // Rows journaled before the agent clock existed have no value: the TTL
        // falls back to their wall-clock receipt time.
        let has_clock: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('tasks') WHERE name = 'received_clock_ms'")?
            .exists([])?;
        if !has_clock {
            conn.execute_batch("ALTER TABLE tasks ADD COLUMN received_clock_ms INTEGER")
                .context("adding received_clock_ms to the journal")?;
        }
        let base: i64 = conn
            .query_row(
                "SELECT value FROM kv WHERE key = ?1",
                params![CLOCK_KEY],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Journal {
            conn: Mutex::new(conn),
            intake_waiting: AtomicUsize::new(0),
            clock_base_ms: base,
            clock_started: std::time::Instant::now(),
            clock_extra_ms: std::sync::atomic::AtomicI64::new(0),
        })
    }

    /// The agent clock: milliseconds the agent has run, summed over restarts
    /// (persisted by [`Journal::save_clock`]), from the monotonic clock. Wall
    /// time can step (an RTC a month fast, then NTP): the journal's TTL counts
    /// on this clock, so a step never drops the rows that deduplicate a task
    /// the broker may still redeliver. Off time does not count, which only
    /// keeps rows longer.
    pub fn clock_ms(&self) -> i64 {
        self.clock_base_ms
            + self.clock_started.elapsed().as_millis() as i64
            + self.clock_extra_ms.load(Ordering::SeqCst)
    }

    pub fn save_clock(&self) -> Result<()> {
        self.kv_set(CLOCK_KEY, &self.clock_ms().to_string())
    }

    /// Tests: lets `ms` of agent running time pass.
    pub fn advance_clock(&self, ms: i64) {
        self.clock_extra_ms.fetch_add(ms, Ordering::SeqCst);
    }

    fn c(&self) -> MutexGuard<'_, Connection> {
        while self.intake_waiting.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection for intake, ahead of background work.
    fn c_intake(&self) -> MutexGuard<'_, Connection> {
        self.intake_waiting.fetch_add(1, Ordering::SeqCst);
        let g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        self.intake_waiting.fetch_sub(1, Ordering::SeqCst);
        g
    }

    /// Runs `f` with synchronous=NORMAL: for bookkeeping whose loss at a
    /// power cut only causes a harmless republish (outbox send marks, acks).
    /// The next FULL commit makes it durable too.
    fn relaxed<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut c = self.c();
        c.pragma_update(None, "synchronous", "NORMAL")?;
        let r = f(&mut c);
        c.pragma_update(None, "synchronous", "FULL")?;
        r
    }

    /// Journals an incoming task, or reports a duplicate. For a finished
    /// duplicate the stored result is queued in the outbox again.
    pub fn receive(
        &self,
        task_id: &str,
        task_type: &str,
        body: &str,
        received_at_ms: i64,
        result_topic: &str,
    ) -> Result<Receive> {
        let r = self.receive_batch(&[Incoming {
            task_id,
            task_type,
            body,
            received_at_ms,
            result_topic,
        }])?;
        Ok(r.into_iter().next().unwrap_or(Receive::New))
    }

    /// Journals a burst of incoming tasks in one transaction (one fsync).
    /// A taskId repeated inside the batch is a duplicate of the first.
    pub fn receive_batch(&self, items: &[Incoming<'_>]) -> Result<Vec<Receive>> {
        let clock = self.clock_ms();
        let mut c = self.c_intake();
        let tx = c.transaction()?;
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            let existing: Option<(String, Option<String>)> = tx
                .query_row(
                    "SELECT state, result FROM tasks WHERE task_id = ?1",
                    params![it.task_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            out.push(match existing {
                None => {
                    tx.execute(
                        "INSERT INTO tasks (task_id, task_type, body, state, received_at_ms, journaled_at_ms, updated_at_ms, received_clock_ms)
                         VALUES (?1, ?2, ?3, 'received', ?4, ?5, ?5, ?6)",
                        params![it.task_id, it.task_type, it.body, it.received_at_ms, now_ms(), clock],
                    )?;
                    Receive::New
                }
                // A message that was rejected (unparseable body, unknown type)
                // never ran: a valid task with the same taskId is new, so a bad
                // message cannot block a later good one.
                Some((state, _)) if state == REJECTED => {
                    tx.execute(
                        "UPDATE tasks SET task_type = ?2, body = ?3, state = 'received', result = NULL, received_at_ms = ?4, journaled_at_ms = ?5, updated_at_ms = ?5, received_clock_ms = ?6 WHERE task_id = ?1",
                        params![it.task_id, it.task_type, it.body, it.received_at_ms, now_ms(), clock],
                    )?;
                    Receive::New
                }
                Some((state, result)) => match State::parse(&state) {
                    Some(s @ (State::Done | State::Failed)) => {
                        if let Some(result) = result {
                            queue_result(&tx, it.task_id, it.result_topic, &result)?;
                            Receive::DuplicateFinished
                        } else {
                            Receive::DuplicateInProgress(s)
                        }
                    }
                    Some(s) => Receive::DuplicateInProgress(s),
                    None => Receive::DuplicateInProgress(State::Received),
                },
            });
        }
        tx.commit().context("committing received tasks")?;
        Ok(out)
    }

    /// Journals a task that is rejected before running (bad payload, unknown
    /// type) as `rejected` with its error result queued (the same bad message
    /// again gets the same answer; a valid task with the id runs, see
    /// [`Journal::receive_batch`]). Returns false when the
    /// key was already journaled (then the stored result is queued again).
    pub fn reject(
        &self,
        key: &str,
        task_type: &str,
        body: &str,
        received_at_ms: i64,
        result_topic: &str,
        result: &str,
    ) -> Result<bool> {
        let clock = self.clock_ms();
        let mut c = self.c_intake();
        let tx = c.transaction()?;
        let existing: Option<Option<String>> = tx
            .query_row(
                "SELECT result FROM tasks WHERE task_id = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()?;
        let fresh = match existing {
            Some(Some(stored)) => {
                queue_result(&tx, key, result_topic, &stored)?;
                false
            }
            Some(None) => false,
            None => {
                let now = now_ms();
                tx.execute(
                    "INSERT INTO tasks (task_id, task_type, body, state, result, received_at_ms, journaled_at_ms, updated_at_ms, received_clock_ms)
                     VALUES (?1, ?2, ?3, 'rejected', ?4, ?5, ?6, ?6, ?7)",
                    params![key, task_type, body, result, received_at_ms, now, clock],
                )?;
                queue_result(&tx, key, result_topic, result)?;
                true
            }
        };
        tx.commit().context("committing rejected task")?;
        Ok(fresh)
    }

    /// Moves the oldest `received` task of `task_type` to `running`.
    pub fn claim_next(&self, task_type: &str) -> Result<Option<TaskRow>> {
        let mut c = self.c();
        let tx = c.transaction()?;
        let row = tx
            .query_row(
                "SELECT task_id, task_type, body, state, attempts, received_at_ms FROM tasks
                 WHERE task_type = ?1 AND state = 'received' ORDER BY received_at_ms, rowid LIMIT 1",
                params![task_type],
                row_to_task,
            )
            .optional()?;
        let Some(mut row) = row else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE tasks SET state = 'running', attempts = attempts + 1, updated_at_ms = ?2 WHERE task_id = ?1",
            params![row.task_id, now_ms()],
        )?;
        tx.commit().context("claiming task")?;
        row.state = State::Running;
        row.attempts += 1;
        Ok(Some(row))
    }

    /// Tasks left `running` (by a crash or a reboot).
    pub fn running(&self) -> Result<Vec<TaskRow>> {
        let c = self.c();
        let mut st = c.prepare(
            "SELECT task_id, task_type, body, state, attempts, received_at_ms FROM tasks
             WHERE state = 'running' ORDER BY received_at_ms",
        )?;
        let rows = st.query_map([], row_to_task)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Distinct task types that have `received` tasks waiting.
    pub fn waiting_types(&self) -> Result<Vec<String>> {
        let c = self.c();
        let mut st = c.prepare("SELECT DISTINCT task_type FROM tasks WHERE state = 'received'")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn get(&self, task_id: &str) -> Result<Option<(TaskRow, Option<String>)>> {
        let c = self.c();
        Ok(c.query_row(
            "SELECT task_id, task_type, body, state, attempts, received_at_ms, result FROM tasks WHERE task_id = ?1",
            params![task_id],
            |r| Ok((row_to_task(r)?, r.get(6)?)),
        )
        .optional()?)
    }

    /// Finishes a task and queues its result, atomically.
    pub fn finish(&self, task_id: &str, ok: bool, topic: &str, result: &str) -> Result<()> {
        let mut c = self.c();
        let tx = c.transaction()?;
        let state = if ok { State::Done } else { State::Failed };
        tx.execute(
            "UPDATE tasks SET state = ?2, result = ?3, updated_at_ms = ?4 WHERE task_id = ?1",
            params![task_id, state.as_str(), result, now_ms()],
        )?;
        queue_result(&tx, task_id, topic, result)?;
        tx.commit().context("committing task result")?;
        Ok(())
    }

    /// Ends a task that is still `received` (not claimed by a worker) as
    /// failed with `result` queued, atomically; false when a worker claimed
    /// it first (or it is gone).
    pub fn finish_received(&self, task_id: &str, topic: &str, result: &str) -> Result<bool> {
        let mut c = self.c();
        let tx = c.transaction()?;
        let n = tx.execute(
            "UPDATE tasks SET state = 'failed', result = ?2, updated_at_ms = ?3 \
             WHERE task_id = ?1 AND state = 'received'",
            params![task_id, result, now_ms()],
        )?;
        if n == 1 {
            queue_result(&tx, task_id, topic, result)?;
        }
        tx.commit().context("committing canceled task")?;
        Ok(n == 1)
    }

    /// Queues a message that is not a task result (e.g. unsolicited status).
    pub fn enqueue(&self, key: &str, topic: &str, payload: &str) -> Result<()> {
        let c = self.c();
        queue_result(&c, key, topic, payload)
    }

    /// Outbox entries not sent within `retry_ms`, oldest first.
    pub fn outbox_due(&self, now: i64, retry_ms: i64, limit: usize) -> Result<Vec<OutboxRow>> {
        let c = self.c();
        let mut st = c.prepare(
            "SELECT id, key, topic, payload, sends FROM outbox
             WHERE last_sent_ms <= ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = st.query_map(params![now - retry_ms, limit as i64], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                key: r.get(1)?,
                topic: r.get(2)?,
                payload: r.get(3)?,
                sends: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn outbox_sent(&self, id: i64, now: i64) -> Result<()> {
        self.outbox_sent_many(&[id], now)
    }

    /// Records a batch of publishes in one transaction.
    pub fn outbox_sent_many(&self, ids: &[i64], now: i64) -> Result<()> {
        self.relaxed(|c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "UPDATE outbox SET last_sent_ms = ?2, sends = sends + 1, resend = 0 WHERE id = ?1",
                )?;
                for id in ids {
                    st.execute(params![id, now])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Makes every pending entry due now (after a reconnect).
    pub fn outbox_reset(&self) -> Result<()> {
        self.c().execute("UPDATE outbox SET last_sent_ms = 0", [])?;
        Ok(())
    }

    /// Removes the outbox entries acked by the backend. Returns rows removed.
    pub fn outbox_ack(&self, key: &str) -> Result<usize> {
        self.outbox_ack_many(&[key.to_string()])
    }

    pub fn outbox_ack_many(&self, keys: &[String]) -> Result<usize> {
        self.relaxed(|c| {
            let tx = c.transaction()?;
            let mut n = 0;
            {
                let mut st =
                    tx.prepare_cached("DELETE FROM outbox WHERE key = ?1 AND resend = 0")?;
                for k in keys {
                    n += st.execute(params![k])?;
                }
            }
            tx.commit()?;
            Ok(n)
        })
    }

    pub fn outbox_len(&self) -> Result<usize> {
        Ok(self
            .c()
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))?
            as usize)
    }

    /// Forgets finished tasks received more than `ttl_ms` ago on the agent
    /// clock (rows from before it: by wall time `now`). Unfinished ones and
    /// unacked results are kept.
    pub fn purge_expired(&self, now: i64, ttl_ms: i64) -> Result<usize> {
        let clock = self.clock_ms();
        Ok(self.c().execute(
            "DELETE FROM tasks WHERE state IN ('done','failed','rejected')
             AND task_id NOT IN (SELECT key FROM outbox)
             AND ((received_clock_ms IS NOT NULL AND received_clock_ms < ?2)
                  OR (received_clock_ms IS NULL AND received_at_ms < ?1))",
            params![now - ttl_ms, clock - ttl_ms],
        )?)
    }

    /// The most recent tasks (newest first) for diagnostics: id, type,
    /// state, attempts, received/updated times. Bodies and results are left out.
    pub fn recent(&self, limit: usize) -> Result<Vec<serde_json::Value>> {
        let c = self.c();
        let mut st = c.prepare(
            "SELECT task_id, task_type, state, attempts, received_at_ms, updated_at_ms FROM tasks
             ORDER BY received_at_ms DESC LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit as i64], |r| {
            Ok(serde_json::json!({
                "taskId": r.get::<_, String>(0)?,
                "taskType": r.get::<_, String>(1)?,
                "state": r.get::<_, String>(2)?,
                "attempts": r.get::<_, i64>(3)?,
                "receivedAtMs": r.get::<_, i64>(4)?,
                "updatedAtMs": r.get::<_, i64>(5)?,
            }))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn kv_get(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .c()
            .query_row("SELECT value FROM kv WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn kv_set(&self, key: &str, value: &str) -> Result<()> {
        self.c().execute(
            "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn kv_delete(&self, key: &str) -> Result<()> {
        self.c()
            .execute("DELETE FROM kv WHERE key = ?1", params![key])?;
        Ok(())
    }

    pub fn kv_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let c = self.c();
        let mut st =
            c.prepare("SELECT key, value FROM kv WHERE substr(key, 1, ?2) = ?1 ORDER BY key")?;
        let rows = st.query_map(params![prefix, prefix.len() as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

fn queue_result(c: &Connection, key: &str, topic: &str, payload: &str) -> Result<()> {
    c.execute(
        "INSERT INTO outbox (key, topic, payload, created_at_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(key) DO UPDATE SET topic = excluded.topic, payload = excluded.payload,
            last_sent_ms = 0, resend = 1",
        params![key, topic, payload, now_ms()],
    )?;
    Ok(())
}

fn row_to_task(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
    let state: String = r.get(3)?;
    Ok(TaskRow {
        task_id: r.get(0)?,
        task_type: r.get(1)?,
        body: r.get(2)?,
        state: State::parse(&state).unwrap_or(State::Failed),
        attempts: r.get(4)?,
        received_at_ms: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j() -> (tempfile::TempDir, Journal) {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(&d.path().join("j.sqlite")).unwrap();
        (d, j)
    }

    #[test]
    fn state_machine_received_running_done() {
        let (_d, j) = j();
        assert_eq!(
            j.receive("t1", "heartbeat", "{}", 1, "r").unwrap(),
            Receive::New
        );
        assert!(j.claim_next("upgrade").unwrap().is_none());
        let t = j.claim_next("heartbeat").unwrap().unwrap();
        assert_eq!(t.task_id, "t1");
        assert_eq!(t.attempts, 1);
        assert!(j.claim_next("heartbeat").unwrap().is_none(), "claimed once");
        assert_eq!(
            j.receive("t1", "heartbeat", "{}", 2, "r").unwrap(),
            Receive::DuplicateInProgress(State::Running)
        );
        j.finish("t1", true, "r", "{\"ok\":1}").unwrap();
        assert_eq!(j.get("t1").unwrap().unwrap().0.state, State::Done);
        assert_eq!(j.outbox_due(now_ms(), 0, 10).unwrap().len(), 1);
    }

    #[test]
    fn dedup_survives_reopen_and_resends_stored_result() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j.sqlite");
        {
            let j = Journal::open(&p).unwrap();
            j.receive("t1", "heartbeat", "{}", 1, "r").unwrap();
            j.claim_next("heartbeat").unwrap().unwrap();
            j.finish("t1", true, "r", "stored").unwrap();
            assert_eq!(j.outbox_ack("t1").unwrap(), 1);
            assert_eq!(j.outbox_len().unwrap(), 0);
        }
        let j = Journal::open(&p).unwrap();
        assert_eq!(
            j.receive("t1", "heartbeat", "{}", 5, "r").unwrap(),
            Receive::DuplicateFinished
        );
        let due = j.outbox_due(now_ms(), 0, 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].payload, "stored");
        assert!(j.claim_next("heartbeat").unwrap().is_none());
    }

    #[test]
    fn batch_dedups_inside_and_across() {
        let (_d, j) = j();
        j.receive("a", "heartbeat", "{}", 1, "r").unwrap();
        let it = |id| Incoming {
            task_id: id,
            task_type: "heartbeat",
            body: "{}",
            received_at_ms: 2,
            result_topic: "r",
        };
        let r = j
            .receive_batch(&[it("a"), it("b"), it("b"), it("c")])
            .unwrap();
        assert_eq!(
            r,
            vec![
                Receive::DuplicateInProgress(State::Received),
                Receive::New,
                Receive::DuplicateInProgress(State::Received),
                Receive::New
            ]
        );
    }

    #[test]
    fn per_type_queues_are_independent_and_fifo() {
        let (_d, j) = j();
        j.receive("u1", "upgrade", "{}", 1, "r").unwrap();
        j.receive("h1", "heartbeat", "{}", 2, "r").unwrap();
        j.receive("h2", "heartbeat", "{}", 3, "r").unwrap();
        let mut types = j.waiting_types().unwrap();
        types.sort();
        assert_eq!(types, vec!["heartbeat", "upgrade"]);
        assert_eq!(j.claim_next("heartbeat").unwrap().unwrap().task_id, "h1");
        assert_eq!(j.claim_next("heartbeat").unwrap().unwrap().task_id, "h2");
        assert_eq!(j.claim_next("upgrade").unwrap().unwrap().task_id, "u1");
    }

    #[test]
    fn ttl_purges_only_finished_and_acked() {
        let (_d, j) = j();
        j.receive("old", "heartbeat", "{}", 1_000, "r").unwrap();
        j.receive("pending", "heartbeat", "{}", 1_000, "r").unwrap();
        j.receive("unacked", "x", "{}", 1_000, "r").unwrap();
        let t = j.claim_next("heartbeat").unwrap().unwrap();
        j.finish(&t.task_id, true, "r", "{}").unwrap();
        j.outbox_ack(&t.task_id).unwrap();
        let u = j.claim_next("x").unwrap().unwrap();
        j.finish(&u.task_id, false, "r", "{}").unwrap();
        let now = 1_000 + 10_000;
        j.advance_clock(10_000);
        assert_eq!(j.purge_expired(now, 20_000).unwrap(), 0, "not expired yet");
        assert_eq!(j.purge_expired(now, 5_000).unwrap(), 1);
        assert!(j.get("old").unwrap().is_none());
        assert!(j.get("pending").unwrap().is_some(), "unfinished kept");
        assert!(
            j.get("unacked").unwrap().is_some(),
            "result not acked: kept"
        );
    }

    /// Issue 23 item 11: the wall clock jumps 40 days ahead (an RTC that was
    /// slow, corrected by NTP): the rows that deduplicate tasks the broker may
    /// still redeliver stay until the agent has really run for the TTL, and the
    /// agent clock survives a restart.
    #[test]
    fn a_wall_clock_step_does_not_purge_deduplication_rows() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j.sqlite");
        let day = 86_400_000i64;
        let received = now_ms();
        {
            let j = Journal::open(&p).unwrap();
            j.receive("t1", "heartbeat", "{}", received, "r").unwrap();
            let t = j.claim_next("heartbeat").unwrap().unwrap();
            j.finish(&t.task_id, true, "r", "{}").unwrap();
            j.outbox_ack(&t.task_id).unwrap();
            assert_eq!(j.purge_expired(received + 40 * day, 14 * day).unwrap(), 0);
            assert!(j.get("t1").unwrap().is_some(), "kept after the step");
            j.advance_clock(10 * day);
            j.save_clock().unwrap();
        }
        let j = Journal::open(&p).unwrap();
        assert!(
            j.clock_ms() >= 10 * day,
            "the agent clock survives a restart"
        );
        assert_eq!(j.purge_expired(received + 40 * day, 14 * day).unwrap(), 0);
        j.advance_clock(5 * day);
        assert_eq!(j.purge_expired(received + 40 * day, 14 * day).unwrap(), 1);
    }

    #[test]
    fn reject_is_journaled_and_deduped() {
        let (_d, j) = j();
        assert!(j.reject("bad", "nope", "x", 1, "r", "err").unwrap());
        assert!(!j.reject("bad", "nope", "x", 1, "r", "err2").unwrap());
        let (_, res) = j.get("bad").unwrap().unwrap();
        assert_eq!(res.as_deref(), Some("err"));
        // Issue 23 item 12: a rejected message does not poison its taskId: a
        // valid task with it is new and runs; after that it dedupes as usual.
        assert_eq!(j.receive("bad", "nope", "x", 2, "r").unwrap(), Receive::New);
        assert_eq!(
            j.receive("bad", "nope", "x", 3, "r").unwrap(),
            Receive::DuplicateInProgress(State::Received)
        );
    }

    #[test]
    fn ack_of_an_earlier_send_keeps_a_requeued_result() {
        let (_d, j) = j();
        j.enqueue("k", "t", "p").unwrap();
        let r = j.outbox_due(10_000, 1_000, 10).unwrap();
        j.outbox_sent(r[0].id, 10_000).unwrap();
        // a duplicate task queues the result again before the first ack arrives
        j.enqueue("k", "t", "p").unwrap();
        assert_eq!(j.outbox_ack("k").unwrap(), 0, "not sent since: kept");
        let r = j.outbox_due(10_001, 1_000, 10).unwrap();
        assert_eq!(r.len(), 1);
        j.outbox_sent(r[0].id, 10_001).unwrap();
        assert_eq!(j.outbox_ack("k").unwrap(), 1);
    }

    #[test]
    fn outbox_retry_timing_and_reset() {
        let (_d, j) = j();
        j.enqueue("k", "t", "p").unwrap();
        let r = j.outbox_due(10_000, 1_000, 10).unwrap();
        j.outbox_sent(r[0].id, 10_000).unwrap();
        assert!(j.outbox_due(10_500, 1_000, 10).unwrap().is_empty());
        assert_eq!(j.outbox_due(11_000, 1_000, 10).unwrap().len(), 1);
        j.outbox_sent(r[0].id, 11_000).unwrap();
        j.outbox_reset().unwrap();
        assert_eq!(j.outbox_due(11_001, 1_000, 10).unwrap()[0].sends, 2);
    }

    #[test]
    fn kv_roundtrip_and_prefix() {
        let (_d, j) = j();
        j.kv_set("svc:a", "1").unwrap();
        j.kv_set("svc:b", "2").unwrap();
        j.kv_set("svc:b", "3").unwrap();
        j.kv_set("other", "x").unwrap();
        assert_eq!(j.kv_get("svc:b").unwrap().as_deref(), Some("3"));
        assert_eq!(j.kv_prefix("svc:").unwrap().len(), 2);
        j.kv_delete("svc:a").unwrap();
        assert_eq!(j.kv_prefix("svc:").unwrap().len(), 1);
    }
}
