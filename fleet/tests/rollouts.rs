//! Rollouts on both stores: waves, gates with soak and budget, in-flight cap,
//! freeze/resume, abort, floors, late joiners, windows.

mod common;

use common::*;
use dualroot_api::wire::Status;
use dualroot_fleet::devices::Device;
use dualroot_fleet::gate::Verdict;
use dualroot_fleet::rollout::{self, BundleKind, RolloutState, Spec, Wave};
use dualroot_fleet::tasks::{self, Task, TaskState as S};
use dualroot_fleet::window::Window;
use serde_json::json;
use std::sync::atomic::{AtomicU32, Ordering};

fn spec(id: &str, kind: BundleKind, waves: Vec<Wave>) -> Spec {
    Spec {
        id: id.into(),
        kind,
        version: if kind == BundleKind::Image {
            "2.0".into()
        } else {
            "el9-1".into()
        },
        url: "https://files.example/bundle".into(),
        sha256: "ab".repeat(32),
        size: Some(1000),
        plan: (kind == BundleKind::Migrate).then(|| "[plan]".to_string()),
        plan_signature: (kind == BundleKind::Migrate).then(|| "c2lnbmF0dXJl".to_string()),
        selector: Default::default(),
        waves,
        canary_label: "canary".into(),
        soak_ms: 3 * MIN,
        max_failures: 10,
        max_failure_pct: 0,
        in_flight_cap: 100,
        download_window: None,
        install_window: None,
    }
}

fn count(n: i64) -> Wave {
    Wave {
        count: Some(n),
        percent: None,
        min_successes: None,
    }
}
fn pct(p: i64) -> Wave {
    Wave {
        count: None,
        percent: Some(p),
        min_successes: None,
    }
}

fn create_start(h: &H, s: &Spec) {
    let now = h.now();
    let cfg = h.fleet.cfg.clone();
    h.fleet
        .store
        .tx(|tx| rollout::create(tx, &cfg, now, s))
        .unwrap();
    h.fleet
        .store
        .tx(|tx| rollout::start(tx, now, &s.id))
        .unwrap();
}

fn status(h: &H, id: &str) -> rollout::Status {
    let now = h.now();
    let cfg = h.fleet.cfg.clone();
    h.fleet
        .store
        .tx(|tx| rollout::status(tx, &cfg, now, id))
        .unwrap()
}

fn rtasks(h: &H, id: &str) -> Vec<Task> {
    h.fleet
        .store
        .tx(|tx| tasks::list(tx, None, Some(id), 10_000))
        .unwrap()
}

fn rtask(h: &H, dev: &str, id: &str) -> Option<Task> {
    h.fleet
        .store
        .tx(|tx| tasks::list(tx, Some(dev), Some(id), 10))
        .unwrap()
        .into_iter()
        .next()
}

static BOOT: AtomicU32 = AtomicU32::new(0);

/// The device reboots into the target and confirms it.
fn succeed(h: &H, t: &Task) {
    let w = t.wire_id.as_str();
    let v = t.target_version.clone().unwrap();
    h.send(
        &t.device_id,
        w,
        Some(w),
        &t.task_type,
        Status::Done,
        json!({"status": "upgraded", "version": v}),
        None,
    );
    let boot = format!("boot-{}", BOOT.fetch_add(1, Ordering::SeqCst));
    h.boot_confirmed(&t.device_id, &boot, "b", &v);
    assert_eq!(h.task(&t.id).state, S::Succeeded);
}

/// The device falls back to its old slot.
fn roll_back(h: &H, t: &Task) {
    let w = t.wire_id.as_str();
    h.send(
        &t.device_id,
        w,
        Some(w),
        &t.task_type,
        Status::Failed,
        json!({"status": "rolled back", "runningSlot": "a"}),
        Some("rolled back: running slot a version 1.0 instead of slot b version 2.0"),
    );
    assert_eq!(h.task(&t.id).state, S::RolledBack);
}

fn waiting(v: &Verdict) -> String {
    match v {
        Verdict::Waiting(w) => w.join("; "),
        other => panic!("gate not waiting: {other:?}"),
    }
}

#[test]
fn waves_start_in_order_gated_by_successes_and_soak() {
    each_store("waves", |h| {
        let devs: Vec<String> = (0..8)
            .map(|i| h.ab_device("1.0", &format!("b{i}")))
            .collect();
        h.label(&devs[5], "canary", "yes");
        let s = spec("r1", BundleKind::Image, vec![count(1), pct(50), pct(100)]);
        create_start(h, &s);
        h.tick();
        // wave 0 is the canary alone
        let t = rtasks(h, "r1");
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].device_id, devs[5]);
        let st = status(h, "r1");
        assert_eq!(st.waves.iter().map(|w| w.members).sum::<i64>(), 8);
        assert!(
            waiting(&st.gate).contains("wave 1: 0 of 1 successes needed (1 in flight)"),
            "{:?}",
            st.gate
        );
        succeed(h, &t[0]);
        h.tick();
        let st = status(h, "r1");
        assert!(
            waiting(&st.gate).contains("soaking, 0 s of 180 s"),
            "{:?}",
            st.gate
        );
        assert_eq!(
            rtasks(h, "r1").len(),
            1,
            "nothing more starts while soaking"
        );
        h.advance_alive(3 * MIN);
        h.tick();
        let st = status(h, "r1");
        assert_eq!(st.wave, 1);
        let w1 = st.waves[1].members;
        assert_eq!(
            rtasks(h, "r1").len() as i64,
            1 + w1,
            "wave 1 started in the same turn"
        );
        // finish wave 1, then wave 2
        for wave in [1usize, 2] {
            for t in rtasks(h, "r1").iter().filter(|t| t.state != S::Succeeded) {
                succeed(h, t);
            }
            h.tick();
            h.advance_alive(3 * MIN);
            h.tick();
            if wave == 1 {
                assert_eq!(status(h, "r1").wave, 2);
            }
        }
        assert_eq!(rtasks(h, "r1").len(), 8);
        // the last gate met and nothing in flight: completed
        h.tick();
        assert_eq!(status(h, "r1").state, RolloutState::Completed);
    });
}

#[test]
fn a_broken_budget_halts_and_failures_stay_within_budget_plus_cap() {
    each_store("budget", |h| {
        for i in 0..10 {
            h.ab_device("1.0", &format!("b{i}"));
        }
        let mut s = spec("r2", BundleKind::Image, vec![pct(100)]);
        s.in_flight_cap = 3;
        s.max_failures = 1;
        create_start(h, &s);
        h.tick();
        let started = rtasks(h, "r2");
        assert_eq!(started.len(), 3, "the in-flight cap");
        roll_back(h, &started[0]);
        h.tick();
        assert_eq!(
            status(h, "r2").state,
            RolloutState::Running,
            "one failure is within budget"
        );
        assert_eq!(rtasks(h, "r2").len(), 4, "a slot freed, one more started");
        roll_back(h, &started[1]);
        h.tick();
        let st = status(h, "r2");
        assert_eq!(st.state, RolloutState::Halted);
        assert!(
            st.reason
                .as_deref()
                .unwrap()
                .contains("2 failed, at most 1 allowed"),
            "{:?}",
            st.reason
        );
        h.advance_alive(10 * MIN);
        h.tick();
        assert_eq!(rtasks(h, "r2").len(), 4, "nothing starts after the halt");
        assert!(st.budget.failed <= s.max_failures + s.in_flight_cap);
        // resume with the budget still broken halts again
        let now = h.now();
        h.fleet
            .store
            .tx(|tx| rollout::resume(tx, now, "r2"))
            .unwrap();
        h.tick();
        assert_eq!(status(h, "r2").state, RolloutState::Halted);
    });
}

#[test]
fn the_percent_budget_counts_only_devices_that_acknowledged() {
    each_store("budget_pct", |h| {
        for i in 0..6 {
            h.ab_device("1.0", &format!("b{i}"));
        }
        let mut s = spec("r3", BundleKind::Image, vec![pct(100)]);
        s.max_failures = 0;
        s.max_failure_pct = 40;
        create_start(h, &s);
        h.tick();
        let t = rtasks(h, "r3");
        // two devices acknowledge and one of them fails: 50% of the acknowledged
        let w = t[0].wire_id.as_str();
        h.send(
            &t[0].device_id,
            w,
            Some(w),
            "upgrade",
            Status::InProgress,
            json!({"state": "queued"}),
            None,
        );
        h.tick();
        assert_eq!(status(h, "r3").budget.acked, 1);
        roll_back(h, &t[1]);
        h.tick();
        let st = status(h, "r3");
        assert_eq!((st.budget.failed, st.budget.acked), (1, 2));
        assert_eq!(st.state, RolloutState::Halted, "{:?}", st.reason);
        let why = st.reason.unwrap();
        assert!(
            why.contains("1 failed, at most 0 allowed (the larger of 0 and 40% of the 2 devices that acknowledged)"),
            "{why}"
        );
    });
}

#[test]
fn freeze_stops_starts_and_retries_and_resume_continues() {
    each_store("freeze", |h| {
        for i in 0..4 {
            h.ab_device("1.0", &format!("b{i}"));
        }
        let mut s = spec("r4", BundleKind::Image, vec![pct(100)]);
        s.in_flight_cap = 2;
        create_start(h, &s);
        h.tick();
        let t = rtasks(h, "r4");
        assert_eq!(t.len(), 2);
        let now = h.now();
        let cfg = h.fleet.cfg.clone();
        let holding = h
            .fleet
            .store
            .tx(|tx| rollout::freeze(tx, &cfg, now, "r4"))
            .unwrap();
        assert_eq!(holding, 2, "both devices are asked to hold their task");
        // a retryable failure waits; a success frees a slot nobody takes
        let w = t[0].wire_id.as_str();
        h.send(
            &t[0].device_id,
            w,
            Some(w),
            "upgrade",
            Status::Failed,
            json!(null),
            Some("connection reset"),
        );
        succeed(h, &t[1]);
        h.advance_alive(h.fleet.cfg.retry_backoff_ms * 2);
        h.tick();
        assert_eq!(
            h.task(&t[0].id).state,
            S::Pending,
            "a retry is held while frozen"
        );
        assert_eq!(rtasks(h, "r4").len(), 2, "no new start while frozen");
        assert_eq!(status(h, "r4").state, RolloutState::Frozen);
        // freeze twice is refused and says why
        let e = h
            .fleet
            .store
            .tx(|tx| rollout::freeze(tx, &cfg, now, "r4"))
            .unwrap_err();
        assert!(format!("{e:#}").contains("only a running one can be frozen"));
        let now = h.now();
        h.fleet
            .store
            .tx(|tx| rollout::resume(tx, now, "r4"))
            .unwrap();
        h.tick();
        assert_eq!(h.task(&t[0].id).state, S::Queued, "the retry went out");
        assert_eq!(
            rtasks(h, "r4").len(),
            3,
            "one new start: cap 2, the retry holds one slot"
        );
    });
}

/// The cancel task the controller sent for a task (protocol 2), if any.
fn cancel_sent(h: &H, t: &Task) -> bool {
    h.sent_tasks(&t.device_id).iter().any(|m| {
        m["taskType"] == "cancel"
            && m["taskId"] == dualroot_api::wire::cancel_task_id(&t.wire_id)
            && m["body"]["taskId"] == t.wire_id.as_str()
    })
}

/// The device answers a cancel task (`done` with its report, as the agent does).
fn answer_cancel(h: &H, t: &Task, canceled: bool, phase: &str) {
    let c = dualroot_api::wire::cancel_task_id(&t.wire_id);
    let report = dualroot_api::wire::CancelReport {
        task_id: t.wire_id.clone(),
        canceled,
        phase: phase.into(),
        reason: (!canceled).then(|| "past the point of no return".into()),
    };
    h.send(
        &t.device_id,
        &c,
        Some(&c),
        "cancel",
        Status::Done,
        serde_json::to_value(report).unwrap(),
        None,
    );
}

/// The task ends `canceled` on the device.
fn device_canceled(h: &H, t: &Task, phase: &str) {
    let w = t.wire_id.as_str();
    h.send(
        &t.device_id,
        w,
        Some(w),
        &t.task_type,
        Status::Canceled,
        json!({"status": "canceled", "phase": phase}),
        Some("canceled by the backend"),
    );
}

#[test]
fn abort_cancels_what_has_not_reached_the_point_of_no_return() {
    each_store("abort", |h| {
        for i in 0..5 {
            h.ab_device("1.0", &format!("b{i}"));
        }
        let mut s = spec("r5", BundleKind::Image, vec![pct(100)]);
        s.in_flight_cap = 4;
        create_start(h, &s);
        h.tick();
        let t = rtasks(h, "r5");
        assert_eq!(t.len(), 4);
        let w = t[0].wire_id.as_str();
        h.send(
            &t[0].device_id,
            w,
            Some(w),
            "upgrade",
            Status::InProgress,
            json!({"state": "running"}),
            None,
        );
        let w = t[1].wire_id.as_str();
        h.send(
            &t[1].device_id,
            w,
            Some(w),
            "upgrade",
            Status::Done,
            json!({"status": "upgraded", "version": "2.0"}),
            None,
        );
        assert_eq!(h.task(&t[1].id).state, S::Verifying);
        let now = h.now();
        let cfg = h.fleet.cfg.clone();
        let a = h
            .fleet
            .store
            .tx(|tx| rollout::abort(tx, &cfg, now, "r5"))
            .unwrap();
        // the devices that hold a task get a cancel; none is counted
        // canceled before its device says so
        assert_eq!((a.canceled, a.canceling, a.finishing), (0, 3, 1), "{a:?}");
        for i in [0, 2, 3] {
            assert!(cancel_sent(h, &t[i]), "task {i}: no cancel sent");
            assert_eq!(h.task(&t[i].id).cancel.as_deref(), Some("abort"));
            assert!(!h.task(&t[i].id).state.terminal());
        }
        assert!(!cancel_sent(h, &t[1]), "past the point of no return");
        // device 0 takes it: its task ends canceled
        answer_cancel(h, &t[0], true, "downloading");
        assert_eq!(h.task(&t[0].id).state, S::Downloading);
        device_canceled(h, &t[0], "downloading");
        assert_eq!(h.task(&t[0].id).state, S::Canceled);
        // device 2 runs an agent that predates cancel: it rejects the message,
        // that is recorded and the task runs on
        let c = dualroot_api::wire::cancel_task_id(&t[2].wire_id);
        h.send(
            &t[2].device_id,
            &c,
            Some(&c),
            "cancel",
            Status::Rejected,
            json!(null),
            Some("unknown task type \"cancel\""),
        );
        let t2 = h.task(&t[2].id);
        assert_eq!((t2.state, t2.cancel.as_deref()), (S::Queued, None));
        assert!(
            h.history(&t[2].id)
                .iter()
                .any(|e| e.3.contains("does not take cancel tasks")),
            "{:?}",
            h.history(&t[2].id)
        );
        // device 3 never answers: at the phase deadline it counts canceled
        h.advance(h.fleet.cfg.resend_interval_ms + 1);
        h.tick();
        assert_eq!(h.task(&t[3].id).state, S::Canceled);
        let st = status(h, "r5");
        assert_eq!(st.state, RolloutState::Aborted);
        assert!(rtasks(h, "r5").len() == 4, "no new start after an abort");
        // the device past the point of no return still finishes and is recorded
        h.boot_confirmed(&t[1].device_id, "nb", "b", "2.0");
        assert_eq!(h.task(&t[1].id).state, S::Succeeded);
        // a late result of a canceled task changes nothing
        let w = t[0].wire_id.as_str();
        h.send(
            &t[0].device_id,
            w,
            Some(w),
            "upgrade",
            Status::Failed,
            json!(null),
            Some("x"),
        );
        assert_eq!(h.task(&t[0].id).state, S::Canceled);
        let e = h
            .fleet
            .store
            .tx(|tx| rollout::start(tx, now, "r5"))
            .unwrap_err();
        assert!(format!("{e:#}").contains("only a draft can be started"));
    });
}

#[test]
fn freeze_holds_staged_devices_before_installing_and_resume_sends_them_again() {
    each_store("freeze_hold", |h| {
        for i in 0..3 {
            h.ab_device("1.0", &format!("b{i}"));
        }
        let s = spec("r9", BundleKind::Image, vec![pct(100)]);
        create_start(h, &s);
        h.tick();
        let t = rtasks(h, "r9");
        assert_eq!(t.len(), 3);
        // 0 has downloaded (staged), 1 is installing, 2 has it queued
        let progress = |t: &Task, p: dualroot_api::wire::Progress| {
            let w = t.wire_id.as_str();
            h.send(
                &t.device_id,
                &p.ack_key(w),
                Some(w),
                "upgrade",
                Status::Progress,
                json!({ "state": p }),
                None,
            )
        };
        progress(&t[0], dualroot_api::wire::Progress::Staged);
        progress(&t[1], dualroot_api::wire::Progress::Staged);
        progress(&t[1], dualroot_api::wire::Progress::Installing);
        assert_eq!(h.task(&t[0].id).state, S::Staged);
        assert_eq!(h.task(&t[1].id).state, S::Installing);
        let now = h.now();
        let cfg = h.fleet.cfg.clone();
        let holding = h
            .fleet
            .store
            .tx(|tx| rollout::freeze(tx, &cfg, now, "r9"))
            .unwrap();
        assert_eq!(holding, 2, "the installing device is past holding");
        assert!(cancel_sent(h, &t[0]) && cancel_sent(h, &t[2]));
        assert!(!cancel_sent(h, &t[1]));
        // 0 drops its staged task: back to pending, not a failure
        answer_cancel(h, &t[0], true, "staged");
        device_canceled(h, &t[0], "staged");
        let t0 = h.task(&t[0].id);
        assert_eq!((t0.state, t0.attempt), (S::Pending, 2));
        assert_eq!(h.device(&t[0].device_id).failures, 0);
        // 2 had just started installing when the cancel came: recorded, it runs on
        answer_cancel(h, &t[2], false, "installing");
        let t2 = h.task(&t[2].id);
        assert_eq!((t2.state, t2.cancel.as_deref()), (S::Installing, None));
        assert!(h
            .history(&t[2].id)
            .iter()
            .any(|e| e.3.contains("cannot cancel")));
        // held while frozen
        h.advance_alive(h.fleet.cfg.resend_interval_ms);
        h.tick();
        assert_eq!(h.task(&t[0].id).state, S::Pending);
        let now = h.now();
        h.fleet
            .store
            .tx(|tx| rollout::resume(tx, now, "r9"))
            .unwrap();
        h.tick();
        let t0 = h.task(&t[0].id);
        assert_eq!(t0.state, S::Queued, "sent again on resume");
        assert_eq!(t0.wire_id, format!("{}.2", t[0].id));
        assert!(h
            .sent_tasks(&t[0].device_id)
            .iter()
            .any(|m| m["taskId"] == t0.wire_id.as_str() && m["taskType"] == "upgrade"));
    });
}

#[test]
fn floors_keep_images_off_legacy_devices_and_late_joiners_are_picked_up() {
    each_store("floors", |h| {
        let ab = h.ab_device("1.0", "b0");
        let legacy = h.register();
        h.heartbeat(&legacy, "el7-1", None);
        create_start(h, &spec("img", BundleKind::Image, vec![pct(100)]));
        create_start(h, &spec("mig", BundleKind::Migrate, vec![pct(100)]));
        h.tick();
        assert!(
            rtask(h, &legacy, "img").is_none(),
            "an image went to a legacy device"
        );
        assert!(
            rtask(h, &ab, "mig").is_none(),
            "a migration went to an A/B device"
        );
        let st = status(h, "img");
        assert_eq!(st.held_by_floor, 1);
        assert!(st.floor_note.unwrap().contains("get the migration first"));
        assert!(h
            .sent_tasks(&legacy)
            .iter()
            .all(|m| m["taskType"] != "upgrade"));
        // the legacy device migrates (wave 1 of "mig") ...
        let m = rtask(h, &legacy, "mig").expect("the migration started");
        assert_eq!(m.body["plan"], "[plan]");
        assert_eq!(m.body["planSignature"], "c2lnbmF0dXJl");
        let w = m.wire_id.as_str();
        h.send(
            &legacy,
            w,
            Some(w),
            "migrate",
            Status::Done,
            json!({"staged": true}),
            None,
        );
        h.boot_confirmed(&legacy, "new-os", "a", "el9-1");
        assert_eq!(h.task(&m.id).state, S::Succeeded);
        // ... and joins the image rollout on the next turn
        h.tick();
        let t = rtask(h, &legacy, "img").expect("the migrated device joined the image rollout");
        assert_eq!(t.task_type, "upgrade");
        // a device registered while the rollout runs is picked up too
        let late = h.ab_device("1.0", "late");
        h.tick();
        assert!(rtask(h, &late, "img").is_some());
        // a device that is offline joins but is not started, and the gate says so
        let off = h.ab_device("1.0", "off");
        h.sql(
            "UPDATE devices SET last_seen = 0 WHERE id = $1",
            &[off.as_str().into()],
        )
        .unwrap();
        h.tick();
        assert!(rtask(h, &off, "img").is_none());
        let why = waiting(&status(h, "img").gate);
        assert!(why.contains("1 not started (1 of them offline)"), "{why}");
    });
}

#[test]
fn windows_hold_starts_and_shape_the_task() {
    each_store("windows", |h| {
        let d = h.ab_device("1.0", "b0");
        // T0 is 2027-01-15 08:00 UTC; download 10:00-12:00, install 02:00-04:00
        let mut s = spec("w", BundleKind::Image, vec![pct(100)]);
        s.download_window = Some(Window::daily("10:00", "12:00").utc_offset(0));
        s.install_window = Some(Window::daily("02:00", "04:00"));
        create_start(h, &s);
        h.tick();
        assert!(
            rtask(h, &d, "w").is_none(),
            "started outside the download window"
        );
        let note = status(h, "w").window_note.unwrap();
        assert!(
            note.contains("opens in 120 min (2027-01-15 10:00 UTC)"),
            "{note}"
        );
        h.advance_alive(2 * 60 * MIN);
        h.tick();
        let t = rtask(h, &d, "w").expect("started in the window");
        let now_s = h.now() / 1000;
        assert_eq!(t.body["window"]["start"], now_s);
        assert_eq!(t.body["window"]["end"], now_s + 2 * 3600);
        assert_eq!(
            t.body["switchAt"],
            now_s + 16 * 3600,
            "the next install window opening"
        );
    });
}

#[test]
fn cron_windows_in_named_zones_shape_the_task() {
    each_store("cronwin", |h| {
        let d = h.ab_device("1.0", "b0");
        // T0 is Friday 2027-01-15 08:00 UTC: 03:00 in New York (EST), 09:00
        // in Berlin (CET). Downloads from 04:00 New York time for an hour,
        // installs on weekdays from 02:00 Berlin time.
        let mut s = spec("cw", BundleKind::Image, vec![pct(100)]);
        s.download_window = Some(Window::cron("0 4 * * *", 60).in_zone("America/New_York"));
        s.install_window = Some(Window::cron("0 2 * * MON-FRI", 120).in_zone("Europe/Berlin"));
        create_start(h, &s);
        h.tick();
        assert!(rtask(h, &d, "cw").is_none(), "started before 04:00 EST");
        let note = status(h, "cw").window_note.unwrap();
        assert!(
            note.contains("opens in 60 min (2027-01-15 04:00 EST (America/New_York))"),
            "{note}"
        );
        h.advance_alive(60 * MIN);
        h.tick();
        let t = rtask(h, &d, "cw").expect("started in the download window");
        let now_s = h.now() / 1000;
        assert_eq!(t.body["window"]["start"], now_s);
        assert_eq!(t.body["window"]["end"], now_s + 3600);
        // Friday's install window (02:00-04:00 CET) has passed: Monday
        // 2027-01-18 02:00 CET = 01:00 UTC
        assert_eq!(t.body["switchAt"], 1_800_234_000);

        // an unknown zone or a cron that never fires: nothing is created
        let cfg = h.fleet.cfg.clone();
        let now = h.now();
        let mut bad = spec("cw-bad", BundleKind::Image, vec![pct(100)]);
        bad.install_window = Some(Window::cron("0 2 * * 1-5", 120).in_zone("Europe/Berln"));
        let e = h
            .fleet
            .store
            .tx(|tx| rollout::create(tx, &cfg, now, &bad))
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("installWindow: unknown time zone \"Europe/Berln\""),
            "{e:#}"
        );
        bad.install_window = None;
        bad.download_window = Some(Window::cron("0 0 31 2 *", 60));
        let e = h
            .fleet
            .store
            .tx(|tx| rollout::create(tx, &cfg, now, &bad))
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("downloadWindow: cron \"0 0 31 2 *\" never fires"),
            "{e:#}"
        );
    });
}

#[test]
fn invalid_specs_are_refused_with_the_reason() {
    each_store("spec", |h| {
        let cfg = h.fleet.cfg.clone();
        let now = h.now();
        let mut s = spec("bad", BundleKind::Image, vec![pct(100)]);
        s.soak_ms = MIN;
        let e = h
            .fleet
            .store
            .tx(|tx| rollout::create(tx, &cfg, now, &s))
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("shorter than 3 heartbeat intervals"),
            "{e:#}"
        );
        let mut s = spec("bad", BundleKind::Migrate, vec![pct(100)]);
        s.plan = None;
        let e = h
            .fleet
            .store
            .tx(|tx| rollout::create(tx, &cfg, now, &s))
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("needs its plan and planSignature"),
            "{e:#}"
        );
        let mut s = spec("bad", BundleKind::Migrate, vec![pct(100)]);
        s.plan_signature = None;
        let e = h
            .fleet
            .store
            .tx(|tx| rollout::create(tx, &cfg, now, &s))
            .unwrap_err();
        assert!(format!("{e:#}").contains("planSignature"), "{e:#}");
        let s = spec("ok", BundleKind::Image, vec![pct(10), count(0)]);
        let e = h
            .fleet
            .store
            .tx(|tx| rollout::create(tx, &cfg, now, &s))
            .unwrap_err();
        assert!(format!("{e:#}").contains("wave 2 needs"), "{e:#}");
        let s = spec("ok", BundleKind::Image, vec![pct(100)]);
        h.fleet
            .store
            .tx(|tx| rollout::create(tx, &cfg, now, &s))
            .unwrap();
        let e = h
            .fleet
            .store
            .tx(|tx| rollout::create(tx, &cfg, now, &s))
            .unwrap_err();
        assert!(format!("{e:#}").contains("exists already"));
    });
}

fn device(id: &str, labels: serde_json::Value) -> Device {
    serde_json::from_value(json!({
        "id": id, "labels": labels, "model": "va-1", "layout": "dualroot", "version": "1.0",
        "agentVersion": null, "slot": "a", "slotPrimary": "a", "slotFallback": false, "slotGood": true,
        "bootId": null, "bootVersion": null, "bootAt": null, "services": [], "lastSeen": 0,
        "online": true, "outages": 0, "failures": 0, "registeredAt": 0
    }))
    .unwrap()
}

#[test]
fn wave_membership_is_a_stable_hash_with_canaries_first() {
    let s = spec("m1", BundleKind::Image, vec![pct(10), pct(50), pct(100)]);
    let devs: Vec<Device> = (0..2000)
        .map(|i| device(&format!("va-{i}"), json!({})))
        .collect();
    let waves: Vec<usize> = devs.iter().map(|d| rollout::wave_for(&s, d, &[])).collect();
    let again: Vec<usize> = devs.iter().map(|d| rollout::wave_for(&s, d, &[])).collect();
    assert_eq!(waves, again);
    let n0 = waves.iter().filter(|w| **w == 0).count();
    let n1 = waves.iter().filter(|w| **w == 1).count();
    assert!((140..=260).contains(&n0), "wave 0 (10%) got {n0} of 2000");
    assert!(
        (700..=900).contains(&n1),
        "wave 1 (next 40%) got {n1} of 2000"
    );
    // another rollout shuffles differently
    let s2 = Spec {
        id: "m2".into(),
        ..s.clone()
    };
    let other: Vec<usize> = devs
        .iter()
        .map(|d| rollout::wave_for(&s2, d, &[]))
        .collect();
    assert_ne!(waves, other);
    // a canary is in wave 0 whatever its hash
    let c = device("va-7", json!({"canary": "1"}));
    assert_eq!(rollout::wave_for(&s, &c, &[]), 0);
    // count waves fill up in order
    let sc = spec("m3", BundleKind::Image, vec![count(2), count(3)]);
    assert_eq!(rollout::wave_for(&sc, &devs[0], &[1, 0]), 0);
    assert_eq!(rollout::wave_for(&sc, &devs[0], &[2, 0]), 1);
    assert_eq!(
        rollout::wave_for(&sc, &devs[0], &[2, 3]),
        1,
        "overflow goes to the last wave"
    );
}

#[test]
fn the_selector_picks_by_labels_models_and_versions() {
    each_store("selector", |h| {
        let lab = h.ab_device("1.0", "b0");
        let other_site = h.ab_device("1.0", "b1");
        let old = h.ab_device("0.9", "b2");
        for d in [&lab, &old] {
            h.label(d, "site", "lab");
        }
        h.label(&other_site, "site", "prod");
        let mut s = spec("sel", BundleKind::Image, vec![pct(100)]);
        s.selector.labels.insert("site".into(), "lab".into());
        s.selector.models = vec!["va-1".into()];
        s.selector.versions = vec!["1.0".into()];
        create_start(h, &s);
        h.tick();
        let ids: Vec<String> = rtasks(h, "sel").into_iter().map(|t| t.device_id).collect();
        assert_eq!(ids, vec![lab.clone()]);
        let mut s = spec("sel2", BundleKind::Image, vec![pct(100)]);
        s.selector.models = vec!["va-2".into()];
        create_start(h, &s);
        h.tick();
        assert!(rtasks(h, "sel2").is_empty(), "no device has model va-2");
    });
}

#[test]
fn a_device_busy_with_another_task_of_the_type_waits_and_the_gate_says_so() {
    each_store("busy", |h| {
        let d = h.ab_device("1.0", "b0");
        let manual = h.create(
            &d,
            "upgrade",
            json!({"version": "1.5", "url": "https://x", "sha256": "0"}),
            Some("1.5"),
        );
        let w = manual.wire_id.as_str();
        // the manual upgrade is past the point of no return: it cannot be superseded either
        h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::Done,
            json!({"status": "upgraded", "version": "1.5"}),
            None,
        );
        let now = h.now();
        let cfg = h.fleet.cfg.clone();
        let new = tasks::NewTask {
            device_id: d.clone(),
            task_type: "upgrade".into(),
            body: json!({}),
            target_version: None,
            rollout_id: None,
        };
        let e = h
            .fleet
            .store
            .tx(|tx| tasks::create(tx, &cfg, now, &new, true))
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("past the point of no return"),
            "{e:#}"
        );
        create_start(h, &spec("busy", BundleKind::Image, vec![pct(100)]));
        h.tick();
        assert!(
            rtask(h, &d, "busy").is_none(),
            "the rollout superseded a running upgrade"
        );
        let why = waiting(&status(h, "busy").gate);
        assert!(
            why.contains("1 busy with another task of this type"),
            "{why}"
        );
        assert_eq!(h.task(&manual.id).state, S::Verifying);
        // once it ends, the rollout starts the device
        h.boot_confirmed(&d, "b1", "b", "1.5");
        h.tick();
        assert!(rtask(h, &d, "busy").is_some());
    });
}

#[test]
fn a_failure_within_budget_does_not_hold_the_wave() {
    each_store("within_budget", |h| {
        for i in 0..3 {
            h.ab_device("1.0", &format!("b{i}"));
        }
        let mut s = spec("wb", BundleKind::Image, vec![pct(100)]);
        s.max_failures = 1;
        create_start(h, &s);
        h.tick();
        let t = rtasks(h, "wb");
        roll_back(h, &t[0]);
        succeed(h, &t[1]);
        h.tick();
        assert!(waiting(&status(h, "wb").gate).contains("1 of 2 successes needed"));
        succeed(h, &t[2]);
        h.tick();
        h.advance_alive(3 * MIN);
        h.tick();
        let st = status(h, "wb");
        assert_eq!(st.state, RolloutState::Completed, "{:?}", st.gate);
        assert_eq!(st.budget.failed, 1);
    });
}

/// A rollout's turn reads the devices whose selector facts changed since its
/// last turn (all of them only on the first) and at most `inFlightCap` start
/// candidates, never the whole fleet each turn.
#[test]
fn a_turn_reads_only_changed_devices_and_the_candidates_it_can_start() {
    each_store("turn_reads", |h| {
        let now = h.now();
        let cfg = h.fleet.cfg.clone();
        let other: std::collections::BTreeMap<String, String> =
            [("site".to_string(), "other".to_string())].into();
        h.fleet
            .store
            .tx(|tx| dualroot_fleet::devices::seed(tx, &cfg, now, 0, 300, &other))
            .unwrap();
        let lab: Vec<String> = (0..4)
            .map(|i| {
                let d = h.ab_device("1.0", &format!("t{i}"));
                h.label(&d, "site", "lab");
                d
            })
            .collect();
        let mut s = spec("r-turn", BundleKind::Image, vec![pct(100)]);
        s.selector.labels.insert("site".into(), "lab".into());
        s.in_flight_cap = 2;
        create_start(h, &s);
        let turn = || {
            let now = h.now();
            h.fleet
                .store
                .tx(|tx| rollout::tick(tx, &cfg, now, "r-turn"))
                .unwrap()
        };
        let t = turn();
        assert_eq!(t.scanned, 304, "the first turn looks at every device once");
        assert_eq!((t.candidates, t.started), (2, 2), "{t:?}");
        assert_eq!(status(h, "r-turn").waves[0].members, 4);
        // nothing changed: once the scan overlap (a change is read again by
        // the turns of the next minute) has passed, nothing is read, and the
        // cap is full
        h.advance_alive(2 * MIN);
        turn();
        let t = turn();
        assert_eq!((t.scanned, t.candidates), (0, 0), "{t:?}");
        // a heartbeat that changes no selector fact does not bring it back
        h.heartbeat(&lab[3], "1.0", Some(("a", true)));
        assert_eq!(turn().scanned, 0);
        // a relabelled device is read again and joins
        h.label("seed-7", "site", "lab");
        let t = turn();
        assert_eq!(t.scanned, 1, "{t:?}");
        h.advance_alive(2 * MIN);
        turn();
        assert_eq!(turn().scanned, 0);
        assert_eq!(status(h, "r-turn").waves[0].members, 5);
        // a success frees one place: one candidate read, one started
        let first = rtasks(h, "r-turn");
        succeed(h, &first[0]);
        let t = turn();
        assert_eq!((t.candidates, t.started), (1, 1), "{t:?}");
    });
}
