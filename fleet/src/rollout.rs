//! Rollouts: a bundle (migration or A/B image) to the devices a selector
//! picks, in waves. Membership is decided when a device first matches (a
//! hash of rollout and device id; canary-labelled devices in wave 0) and
//! stored, so it never changes and devices that join later are picked up.
//! Each turn of [`tick`] checks the current wave's gate and starts devices
//! of the waves reached so far, under the in-flight cap and the windows.

use crate::config::Config;
use crate::devices::{self, Device, Layout};
use crate::gate::{self, Budget, Verdict, WaveStats};
use crate::params;
use crate::store::Tx;
use crate::tasks::{self, CancelMode, Canceling, NewTask, TaskState};
use crate::window::Window;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleKind {
    /// A legacy system's migration to the A/B layout (`migrate` task).
    Migrate,
    /// An A/B image (`upgrade` task).
    Image,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// Every label must match.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Any of these models (empty: any).
    #[serde(default)]
    pub models: Vec<String>,
    /// Any of these current versions (empty: any).
    #[serde(default)]
    pub versions: Vec<String>,
    /// Any of these layouts (empty: any; the floors apply anyway).
    #[serde(default)]
    pub layouts: Vec<Layout>,
}

impl Selector {
    pub fn matches(&self, d: &Device) -> bool {
        self.labels.iter().all(|(k, v)| d.labels.get(k) == Some(v))
            && (self.models.is_empty() || d.model.as_ref().is_some_and(|m| self.models.contains(m)))
            && (self.versions.is_empty()
                || d.version
                    .as_ref()
                    .is_some_and(|v| self.versions.contains(v)))
            && (self.layouts.is_empty() || self.layouts.contains(&d.layout))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Wave {
    /// This many devices ...
    #[serde(default)]
    pub count: Option<i64>,
    /// ... or devices whose hash falls below this cumulative percent.
    #[serde(default)]
    pub percent: Option<i64>,
    /// Successes the gate needs (default: every member that did not fail;
    /// failures within the budget do not hold the wave).
    #[serde(default)]
    pub min_successes: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    pub id: String,
    pub kind: BundleKind,
    /// The version the bundle installs (what success is checked against).
    pub version: String,
    pub url: String,
    pub sha256: String,
    #[serde(default)]
    pub size: Option<u64>,
    /// Migration plan (TOML text); required for `migrate`.
    #[serde(default)]
    pub plan: Option<String>,
    /// The vendor's signature of the plan's exact bytes (`dualroot plan
    /// sign`, base64); required for `migrate` (the agent refuses a plan
    /// without one).
    #[serde(default)]
    pub plan_signature: Option<String>,
    #[serde(default)]
    pub selector: Selector,
    pub waves: Vec<Wave>,
    #[serde(default = "default_canary")]
    pub canary_label: String,
    pub soak_ms: i64,
    pub max_failures: i64,
    pub max_failure_pct: i64,
    pub in_flight_cap: i64,
    #[serde(default)]
    pub download_window: Option<Window>,
    #[serde(default)]
    pub install_window: Option<Window>,
}

fn default_canary() -> String {
    "canary".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    Draft,
    Running,
    /// No new starts; retries wait.
    Frozen,
    /// The failure budget broke: no new starts until an operator acts.
    Halted,
    /// Everything not past the point of no return was canceled.
    Aborted,
    Completed,
}

impl RolloutState {
    pub fn name(self) -> &'static str {
        match self {
            RolloutState::Draft => "draft",
            RolloutState::Running => "running",
            RolloutState::Frozen => "frozen",
            RolloutState::Halted => "halted",
            RolloutState::Aborted => "aborted",
            RolloutState::Completed => "completed",
        }
    }
    pub fn parse(s: &str) -> Option<RolloutState> {
        use RolloutState::*;
        [Draft, Running, Frozen, Halted, Aborted, Completed]
            .into_iter()
            .find(|r| r.name() == s)
    }
}

impl Spec {
    /// `now`: a cron window must open within 5 years of it.
    pub fn validate(&self, cfg: &Config, now: i64) -> Result<()> {
        let bad = |why: String| -> Result<()> {
            bail!("rollout {}: {why}; nothing was created", self.id)
        };
        if self.id.is_empty() || self.id.len() > 64 || self.id.contains(['/', ' ']) {
            return bad("the id must be 1..64 characters without '/' or spaces".into());
        }
        if self.waves.is_empty() {
            return bad("it needs at least one wave".into());
        }
        for (i, w) in self.waves.iter().enumerate() {
            match (w.count, w.percent) {
                (Some(c), None) if c > 0 => {}
                (None, Some(p)) if (1..=100).contains(&p) => {}
                _ => {
                    return bad(format!(
                        "wave {} needs either count > 0 or percent 1..100",
                        i + 1
                    ))
                }
            }
        }
        let floor = 3 * cfg.heartbeat_interval_ms;
        if self.soak_ms < floor {
            return bad(format!(
                "soakMs {} is shorter than 3 heartbeat intervals ({floor} ms)",
                self.soak_ms
            ));
        }
        if self.in_flight_cap < 1
            || self.max_failures < 0
            || !(0..=100).contains(&self.max_failure_pct)
        {
            return bad("inFlightCap >= 1, maxFailures >= 0, maxFailurePct 0..100".into());
        }
        if self.kind == BundleKind::Migrate
            && (self.plan.is_none() || self.plan_signature.is_none())
        {
            return bad(
                "a migration needs its plan and planSignature (the agent refuses a migrate task without either)"
                    .into(),
            );
        }
        for (name, w) in [
            ("downloadWindow", &self.download_window),
            ("installWindow", &self.install_window),
        ] {
            if let Some(Err(e)) = w.as_ref().map(|w| w.validate(now)) {
                return bad(format!("{name}: {e:#}"));
            }
        }
        Ok(())
    }

    fn task_type(&self) -> &'static str {
        match self.kind {
            BundleKind::Migrate => "migrate",
            BundleKind::Image => "upgrade",
        }
    }

    /// The floor: a migration only to a legacy system, an image only to an
    /// A/B one (a legacy device gets the migration first).
    pub fn floor_allows(&self, d: &Device) -> bool {
        match self.kind {
            BundleKind::Migrate => d.layout == Layout::Legacy,
            BundleKind::Image => d.layout == Layout::Dualroot,
        }
    }

    /// The agent's task body; windows become `window` (pre-download) and
    /// `switchAt` (the install window's next opening) in unix seconds.
    fn body(&self, now: i64) -> Value {
        let mut b = json!({"url": self.url, "sha256": self.sha256});
        if let Some(s) = self.size {
            b["size"] = json!(s);
        }
        match self.kind {
            BundleKind::Migrate => {
                b["plan"] = json!(self.plan);
                b["planSignature"] = json!(self.plan_signature);
                b["reboot"] = json!(true);
                // not read by the agent (unknown fields are ignored): the
                // version the new system will report, for logs and simulators
                b["version"] = json!(self.version);
            }
            BundleKind::Image => {
                b["version"] = json!(self.version);
                if let Some(w) = &self.download_window {
                    let (_, close) = w.opening(now);
                    b["window"] = json!({"start": now / 1000, "end": close / 1000});
                }
                if let Some(w) = &self.install_window {
                    if !w.contains(now) {
                        b["switchAt"] = json!(w.opening(now).0 / 1000);
                    }
                }
            }
        }
        b
    }
}

/// A number in [0, 10000) from rollout and device id: the same device lands
/// in the same percent bucket every time, different rollouts shuffle.
pub fn bucket(rollout: &str, device: &str) -> i64 {
    let h = Sha256::digest(format!("{rollout}\0{device}").as_bytes());
    (u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) % 10_000) as i64
}

/// The wave a new member goes to. Canary devices: wave 0. Percent waves
/// are cumulative thresholds on the bucket; a count wave takes devices until
/// it is full. A device no wave takes goes to the last.
pub fn wave_for(spec: &Spec, d: &Device, counts: &[i64]) -> usize {
    if d.labels.contains_key(&spec.canary_label) {
        return 0;
    }
    let b = bucket(&spec.id, &d.id);
    for (i, w) in spec.waves.iter().enumerate() {
        match (w.count, w.percent) {
            (Some(c), _) if counts.get(i).copied().unwrap_or(0) < c => return i,
            (_, Some(p)) if b < p * 100 => return i,
            _ => {}
        }
    }
    spec.waves.len() - 1
}

pub fn create(tx: &mut Tx, cfg: &Config, now: i64, spec: &Spec) -> Result<()> {
    spec.validate(cfg, now)?;
    let n = tx.exec(
        "INSERT INTO rollouts (id, spec, state, wave, created_at, updated_at) VALUES ($1, $2, 'draft', 0, $3, $3) \
         ON CONFLICT (id) DO NOTHING",
        params![&spec.id, serde_json::to_string(spec)?, now],
    )?;
    if n == 0 {
        bail!("rollout {} exists already; nothing was created", spec.id);
    }
    Ok(())
}

struct Loaded {
    spec: Spec,
    state: RolloutState,
    wave: usize,
    successes_since: Option<i64>,
    reason: Option<String>,
    /// When the rollout last looked for new members.
    scanned_at: Option<i64>,
}

fn load(tx: &mut Tx, id: &str) -> Result<Loaded> {
    let Some(r) = tx.query_opt(
        "SELECT spec, state, wave, gate_met_since, reason, scanned_at FROM rollouts WHERE id = $1",
        params![id],
    )?
    else {
        bail!("no rollout {id}");
    };
    Ok(Loaded {
        spec: serde_json::from_str(&r.str(0)).with_context(|| format!("reading rollout {id}"))?,
        state: RolloutState::parse(&r.str(1))
            .with_context(|| format!("rollout {id} has unknown state {}", r.str(1)))?,
        wave: r.i64(2) as usize,
        successes_since: r.opt_i64(3),
        reason: r.opt_str(4),
        scanned_at: r.opt_i64(5),
    })
}

fn set_state(tx: &mut Tx, now: i64, id: &str, s: RolloutState, reason: Option<&str>) -> Result<()> {
    tx.exec(
        "UPDATE rollouts SET state = $1, reason = $2, updated_at = $3 WHERE id = $4",
        params![s.name(), reason, now, id],
    )?;
    log::info!(
        "rollout {id}: {}{}",
        s.name(),
        reason.map(|r| format!(": {r}")).unwrap_or_default()
    );
    Ok(())
}

/// Operator actions. Each says what was refused and why.
pub fn start(tx: &mut Tx, now: i64, id: &str) -> Result<()> {
    let r = load(tx, id)?;
    if r.state != RolloutState::Draft {
        bail!(
            "rollout {id} is {}, only a draft can be started",
            r.state.name()
        );
    }
    tx.exec(
        "UPDATE rollouts SET wave_started_at = $1 WHERE id = $2",
        params![now, id],
    )?;
    set_state(tx, now, id, RolloutState::Running, None)
}

/// No new starts, retries held, and every device holding a task before its
/// point of no return gets a cancel (hold): it drops the task, which goes
/// back to pending and is sent again on resume. Returns the cancels sent.
pub fn freeze(tx: &mut Tx, cfg: &Config, now: i64, id: &str) -> Result<usize> {
    let r = load(tx, id)?;
    if r.state != RolloutState::Running {
        bail!(
            "rollout {id} is {}, only a running one can be frozen",
            r.state.name()
        );
    }
    set_state(
        tx,
        now,
        id,
        RolloutState::Frozen,
        Some("frozen by the operator"),
    )?;
    let mut asked = 0;
    for t in active_tasks(tx, id)? {
        let why = format!("rollout {id} frozen");
        if tasks::cancel(tx, cfg, now, &t, &why, CancelMode::Hold)? == Canceling::Asked {
            asked += 1;
        }
    }
    Ok(asked)
}

/// Ids of the rollout's active tasks (the `tasks_rollout` index).
fn active_tasks(tx: &mut Tx, id: &str) -> Result<Vec<String>> {
    Ok(tx
        .query(
            "SELECT id FROM tasks WHERE rollout_id = $1 AND active = 1 ORDER BY id",
            params![id],
        )?
        .iter()
        .map(|r| r.str(0))
        .collect())
}

/// What an abort did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Aborted {
    /// Ended at once (never sent).
    pub canceled: usize,
    /// A cancel went to the device; its answer decides.
    pub canceling: usize,
    /// Past the point of no return: they finish and are recorded.
    pub finishing: usize,
}

/// A frozen or halted rollout runs again (a halted one halts again at once
/// while its budget stays broken).
pub fn resume(tx: &mut Tx, now: i64, id: &str) -> Result<()> {
    let r = load(tx, id)?;
    if !matches!(r.state, RolloutState::Frozen | RolloutState::Halted) {
        bail!(
            "rollout {id} is {}, only a frozen or halted one can be resumed",
            r.state.name()
        );
    }
    set_state(tx, now, id, RolloutState::Running, None)
}

/// Cancels every task of the rollout not past the point of no return: at
/// once when never sent, else by a cancel to the device (whose answer ends
/// it); those past it finish and are recorded.
pub fn abort(tx: &mut Tx, cfg: &Config, now: i64, id: &str) -> Result<Aborted> {
    let r = load(tx, id)?;
    if matches!(r.state, RolloutState::Aborted | RolloutState::Completed) {
        bail!("rollout {id} is {} already", r.state.name());
    }
    set_state(
        tx,
        now,
        id,
        RolloutState::Aborted,
        Some("aborted by the operator"),
    )?;
    let mut a = Aborted::default();
    for t in active_tasks(tx, id)? {
        let why = format!("rollout {id} aborted");
        match tasks::cancel(tx, cfg, now, &t, &why, CancelMode::Abort)? {
            Canceling::Canceled => a.canceled += 1,
            Canceling::Asked => a.canceling += 1,
            Canceling::TooLate => a.finishing += 1,
            Canceling::Nothing => {}
        }
    }
    Ok(a)
}

/// Per-device view of a rollout: wave and the state of its task.
struct Member {
    device: String,
    wave: usize,
    task: Option<TaskState>,
    acked: bool,
}

fn members(tx: &mut Tx, id: &str) -> Result<Vec<Member>> {
    Ok(tx
        .query(
            "SELECT rd.device_id, rd.wave, t.state, t.acked FROM rollout_devices rd \
             LEFT JOIN tasks t ON t.rollout_id = rd.rollout_id AND t.device_id = rd.device_id \
             WHERE rd.rollout_id = $1 ORDER BY rd.device_id",
            params![id],
        )?
        .iter()
        .map(|r| Member {
            device: r.str(0),
            wave: r.i64(1) as usize,
            task: r.opt_str(2).and_then(|s| TaskState::parse(&s)),
            acked: r.i64(3) == 1,
        })
        .collect())
}

fn failed(s: TaskState) -> bool {
    matches!(
        s,
        TaskState::Failed | TaskState::Rejected | TaskState::TimedOut | TaskState::RolledBack
    )
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub id: String,
    pub kind: BundleKind,
    pub version: String,
    pub state: RolloutState,
    pub reason: Option<String>,
    /// Current wave (0-based) of `waveCount`.
    pub wave: usize,
    pub wave_count: usize,
    pub waves: Vec<WaveStats>,
    pub budget: Budget,
    pub in_flight: i64,
    pub in_flight_cap: i64,
    pub gate: Verdict,
    /// Devices the selector matches that a floor holds back (why, count).
    pub held_by_floor: i64,
    pub floor_note: Option<String>,
    /// Devices of the rollout still running on the device after an abort.
    pub finishing: i64,
    /// Why nothing starts now although the gate allows it (a closed window).
    pub window_note: Option<String>,
}

/// Devices running an active task of the rollout's type that is not the
/// rollout's own: they are not started until it ends.
fn busy(tx: &mut Tx, spec: &Spec) -> Result<HashSet<String>> {
    Ok(tx
        .query(
            "SELECT device_id FROM tasks WHERE active = 1 AND task_type = $1 \
             AND (rollout_id IS NULL OR rollout_id <> $2)",
            params![spec.task_type(), &spec.id],
        )?
        .iter()
        .map(|r| r.str(0))
        .collect())
}

fn stats(
    spec: &Spec,
    members: &[Member],
    online: &HashMap<String, bool>,
    busy: &HashSet<String>,
) -> (Vec<WaveStats>, Budget, i64) {
    let mut waves: Vec<WaveStats> = (0..spec.waves.len())
        .map(|i| WaveStats {
            index: i,
            ..Default::default()
        })
        .collect();
    let mut budget = Budget {
        max_failures: spec.max_failures,
        max_failure_pct: spec.max_failure_pct,
        ..Default::default()
    };
    let mut in_flight = 0;
    for m in members {
        let w = &mut waves[m.wave.min(spec.waves.len() - 1)];
        w.members += 1;
        match m.task {
            None => {
                w.not_started += 1;
                if !online.get(&m.device).copied().unwrap_or(false) {
                    w.not_started_offline += 1;
                }
                if busy.contains(&m.device) {
                    w.not_started_busy += 1;
                }
            }
            Some(TaskState::Succeeded) => w.succeeded += 1,
            Some(s) if failed(s) => {
                w.failed += 1;
                budget.failed += 1;
            }
            Some(s) if !s.terminal() => {
                w.in_flight += 1;
                in_flight += 1;
            }
            Some(_) => {}
        }
        if m.acked {
            budget.acked += 1;
        }
    }
    (waves, budget, in_flight)
}

fn verdict(l: &Loaded, wave: &WaveStats, budget: &Budget, now: i64) -> (Verdict, bool) {
    gate::evaluate(&gate::Input {
        wave: wave.clone(),
        min_successes: l.spec.waves[l.wave].min_successes,
        budget: budget.clone(),
        soak_ms: l.spec.soak_ms,
        successes_since: l.successes_since,
        now,
    })
}

pub fn status(tx: &mut Tx, cfg: &Config, now: i64, id: &str) -> Result<Status> {
    let l = load(tx, id)?;
    let devs = devices::list(tx, cfg, now)?;
    let online: HashMap<String, bool> = devs.iter().map(|d| (d.id.clone(), d.online)).collect();
    let ms = members(tx, id)?;
    let joined: HashSet<&str> = ms.iter().map(|m| m.device.as_str()).collect();
    let held = devs
        .iter()
        .filter(|d| {
            !joined.contains(d.id.as_str())
                && l.spec.selector.matches(d)
                && !l.spec.floor_allows(d)
                && d.version.as_deref() != Some(&l.spec.version)
        })
        .count() as i64;
    let busy = busy(tx, &l.spec)?;
    let (waves, budget, in_flight) = stats(&l.spec, &ms, &online, &busy);
    let (gate, _) = verdict(&l, &waves[l.wave], &budget, now);
    let finishing = if l.state == RolloutState::Aborted {
        in_flight
    } else {
        0
    };
    Ok(Status {
        id: id.into(),
        kind: l.spec.kind,
        version: l.spec.version.clone(),
        state: l.state,
        reason: l.reason.clone(),
        wave: l.wave,
        wave_count: l.spec.waves.len(),
        waves,
        budget,
        in_flight,
        in_flight_cap: l.spec.in_flight_cap,
        gate,
        held_by_floor: held,
        floor_note: (held > 0).then(|| match l.spec.kind {
            BundleKind::Image => format!("{held} matching devices are legacy: they get the migration first and join when it is done"),
            BundleKind::Migrate => format!("{held} matching devices are not legacy systems: a migration is not for them"),
        }),
        finishing,
        window_note: l
            .spec
            .download_window
            .as_ref()
            .filter(|w| !w.contains(now))
            .map(|w| {
                let open = w.opening(now).0;
                format!(
                    "download window closed: no device starts before it opens in {} min ({})",
                    (open - now) / 60_000,
                    w.local_time(open)
                )
            }),
    })
}

pub fn list(tx: &mut Tx) -> Result<Vec<(String, String)>> {
    Ok(tx
        .query(
            "SELECT id, state FROM rollouts ORDER BY created_at, id",
            &[],
        )?
        .iter()
        .map(|r| (r.str(0), r.str(1)))
        .collect())
}

/// Overlap of successive membership scans: a device changed by a
/// transaction that committed just after a scan, with a `changed_at` before
/// it (another controller on PostgreSQL), is still seen by the next.
const SCAN_OVERLAP_MS: i64 = 60_000;

/// Adds devices the selector now matches and the floor allows (late joiners
/// included), looking only at devices whose selector facts changed since the
/// last scan (all of them on the first). Devices already on the target
/// version are left out. Returns the devices read.
fn join(tx: &mut Tx, cfg: &Config, now: i64, spec: &Spec, since: Option<i64>) -> Result<usize> {
    let since = since.map(|s| s - SCAN_OVERLAP_MS);
    let devs = devices::changed_since(tx, cfg, now, since, &spec.id)?;
    let read = devs.len();
    let mut new: Vec<&Device> = devs
        .iter()
        .filter(|d| {
            spec.selector.matches(d)
                && spec.floor_allows(d)
                && d.version.as_deref() != Some(&spec.version)
        })
        .collect();
    tx.exec(
        "UPDATE rollouts SET scanned_at = $1 WHERE id = $2",
        params![now, &spec.id],
    )?;
    if new.is_empty() {
        return Ok(read);
    }
    let mut counts = vec![0i64; spec.waves.len()];
    for r in tx.query(
        "SELECT wave, COUNT(*) FROM rollout_devices WHERE rollout_id = $1 GROUP BY wave",
        params![&spec.id],
    )? {
        counts[(r.i64(0) as usize).min(spec.waves.len() - 1)] += r.i64(1);
    }
    // canaries first, then hash order: the same fleet gives the same waves
    new.sort_by_key(|d| {
        (
            !d.labels.contains_key(&spec.canary_label),
            bucket(&spec.id, &d.id),
            d.id.clone(),
        )
    });
    for d in new {
        let w = wave_for(spec, d, &counts);
        counts[w] += 1;
        tx.exec(
            "INSERT INTO rollout_devices (rollout_id, device_id, wave, joined_at, started) \
             VALUES ($1, $2, $3, $4, 0)",
            params![&spec.id, &d.id, w as i64, now],
        )?;
    }
    Ok(read)
}

/// The current wave's numbers, from its members only.
fn wave_stats(tx: &mut Tx, cfg: &Config, now: i64, spec: &Spec, wave: usize) -> Result<WaveStats> {
    let mut w = WaveStats {
        index: wave,
        ..Default::default()
    };
    if let Some(r) = tx.query_opt(
        "SELECT COUNT(*), \
         COALESCE(SUM(CASE WHEN rd.started = 0 THEN 1 ELSE 0 END), 0), \
         COALESCE(SUM(CASE WHEN rd.started = 0 AND (d.last_seen IS NULL OR d.last_seen < $3) \
                  THEN 1 ELSE 0 END), 0), \
         COALESCE(SUM(CASE WHEN rd.started = 0 AND EXISTS (SELECT 1 FROM tasks t \
                  WHERE t.device_id = rd.device_id AND t.task_type = $4 AND t.active = 1 \
                  AND (t.rollout_id IS NULL OR t.rollout_id <> $1)) THEN 1 ELSE 0 END), 0) \
         FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id \
         WHERE rd.rollout_id = $1 AND rd.wave = $2",
        params![
            &spec.id,
            wave as i64,
            now - cfg.offline_after_ms(),
            spec.task_type()
        ],
    )? {
        w.members = r.i64(0);
        w.not_started = r.i64(1);
        w.not_started_offline = r.i64(2);
        w.not_started_busy = r.i64(3);
    }
    for r in tx.query(
        "SELECT t.state, COUNT(*) FROM rollout_devices rd \
         JOIN tasks t ON t.device_id = rd.device_id AND t.rollout_id = rd.rollout_id \
         WHERE rd.rollout_id = $1 AND rd.wave = $2 AND rd.started = 1 GROUP BY t.state",
        params![&spec.id, wave as i64],
    )? {
        let (Some(s), n) = (TaskState::parse(&r.str(0)), r.i64(1)) else {
            continue;
        };
        match s {
            TaskState::Succeeded => w.succeeded += n,
            s if failed(s) => w.failed += n,
            s if !s.terminal() => w.in_flight += n,
            _ => {}
        }
    }
    Ok(w)
}

/// The failure budget and the devices in flight, over the rollout's tasks
/// (started devices only).
fn budget(tx: &mut Tx, spec: &Spec) -> Result<(Budget, i64)> {
    let mut b = Budget {
        max_failures: spec.max_failures,
        max_failure_pct: spec.max_failure_pct,
        ..Default::default()
    };
    let mut in_flight = 0;
    for r in tx.query(
        "SELECT state, acked, COUNT(*) FROM tasks WHERE rollout_id = $1 GROUP BY state, acked",
        params![&spec.id],
    )? {
        let n = r.i64(2);
        if r.i64(1) == 1 {
            b.acked += n;
        }
        match TaskState::parse(&r.str(0)) {
            Some(s) if failed(s) => b.failed += n,
            Some(s) if !s.terminal() => in_flight += n,
            _ => {}
        }
    }
    Ok((b, in_flight))
}

/// What one turn read and did (the bench and the tests look at it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Turn {
    /// Devices read to find new members (changed since the last scan).
    pub scanned: usize,
    /// Members read as start candidates (not started, online, not busy).
    pub candidates: usize,
    pub started: usize,
}

/// One turn for one rollout: join, gate, starts. Reads the devices that
/// changed since the last turn, the current wave's members, the rollout's
/// tasks, and at most `inFlightCap` start candidates; never every device.
pub fn tick(tx: &mut Tx, cfg: &Config, now: i64, id: &str) -> Result<Turn> {
    let mut l = load(tx, id)?;
    let mut turn = Turn::default();
    if l.state != RolloutState::Running {
        return Ok(turn);
    }
    turn.scanned = join(tx, cfg, now, &l.spec, l.scanned_at)?;
    let wave = wave_stats(tx, cfg, now, &l.spec, l.wave)?;
    let (budget, in_flight) = budget(tx, &l.spec)?;
    let (v, have) = verdict(&l, &wave, &budget, now);
    match v {
        Verdict::Broken(why) => {
            set_state(tx, now, id, RolloutState::Halted, Some(&why))?;
            return Ok(turn);
        }
        Verdict::Met if l.wave + 1 >= l.spec.waves.len() => {
            if in_flight == 0
                && tx
                    .query_opt(
                        "SELECT COUNT(*) FROM rollout_devices WHERE rollout_id = $1 AND started = 0",
                        params![id],
                    )?
                    .map_or(0, |r| r.i64(0))
                    == 0
            {
                set_state(tx, now, id, RolloutState::Completed, None)?;
                return Ok(turn);
            }
        }
        Verdict::Met => {
            l.wave += 1;
            l.successes_since = None;
            tx.exec(
                "UPDATE rollouts SET wave = $1, wave_started_at = $2, gate_met_since = NULL, updated_at = $2 WHERE id = $3",
                params![l.wave as i64, now, id],
            )?;
            log::info!("rollout {id}: gate met, wave {} starts", l.wave + 1);
        }
        Verdict::Waiting(_) => {
            if have && l.successes_since.is_none() {
                tx.exec(
                    "UPDATE rollouts SET gate_met_since = $1 WHERE id = $2",
                    params![now, id],
                )?;
            } else if !have && l.successes_since.is_some() {
                // a success turned out a failure? the soak starts over
                tx.exec(
                    "UPDATE rollouts SET gate_met_since = NULL WHERE id = $1",
                    params![id],
                )?;
            }
        }
    }
    if let Some(w) = &l.spec.download_window {
        if !w.contains(now) {
            return Ok(turn);
        }
    }
    let room = l.spec.in_flight_cap - in_flight;
    if room <= 0 {
        return Ok(turn);
    }
    // online members of the waves reached, with no other task of the type
    // (the others start when they answer heartbeats again, or it ends)
    let candidates: Vec<String> = tx
        .query(
            "SELECT rd.device_id FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id \
             WHERE rd.rollout_id = $1 AND rd.started = 0 AND rd.wave <= $2 AND d.last_seen >= $3 \
             AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.device_id = rd.device_id \
                             AND t.task_type = $4 AND t.active = 1) \
             ORDER BY rd.device_id LIMIT $5",
            params![
                id,
                l.wave as i64,
                now - cfg.offline_after_ms(),
                l.spec.task_type(),
                room
            ],
        )?
        .iter()
        .map(|r| r.str(0))
        .collect();
    turn.candidates = candidates.len();
    for device in candidates {
        let new = NewTask {
            device_id: device.clone(),
            task_type: l.spec.task_type().into(),
            body: l.spec.body(now),
            target_version: Some(l.spec.version.clone()),
            rollout_id: Some(id.into()),
        };
        tasks::create(tx, cfg, now, &new, true)?;
        tx.exec(
            "UPDATE rollout_devices SET started = 1 WHERE rollout_id = $1 AND device_id = $2",
            params![id, &device],
        )?;
        turn.started += 1;
    }
    Ok(turn)
}

/// Ticks every rollout that runs.
pub fn tick_all(tx: &mut Tx, cfg: &Config, now: i64) -> Result<()> {
    for (id, state) in list(tx)? {
        if state == RolloutState::Running.name() {
            tick(tx, cfg, now, &id).with_context(|| format!("rollout {id}"))?;
        }
    }
    Ok(())
}
