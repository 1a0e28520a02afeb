//! Two controllers on one PostgreSQL: one ticks under the lease, both take
//! device traffic (each message reaching both, as with two plain
//! subscriptions), the ticking one stops mid-rollout and the other takes
//! over once the lease ran out. No task is created or applied twice, no
//! state is lost.

mod common;

use common::result_message;
use common::*;
use dualroot_api::wire::Status;
use dualroot_fleet::clock::ManualClock;
use dualroot_fleet::rollout::{self, BundleKind, RolloutState, Spec, Wave};
use dualroot_fleet::tasks::intake::Intake;
use dualroot_fleet::tasks::{self, TaskState};
use dualroot_fleet::{lease, Fleet};
use serde_json::json;
use std::sync::Arc;

fn spec() -> Spec {
    Spec {
        id: "two".into(),
        kind: BundleKind::Image,
        version: "2.0".into(),
        url: "https://files.example/b".into(),
        sha256: "00".into(),
        size: None,
        plan: None,
        plan_signature: None,
        selector: Default::default(),
        waves: vec![
            Wave {
                count: Some(2),
                percent: None,
                min_successes: None,
            },
            Wave {
                count: None,
                percent: Some(100),
                min_successes: None,
            },
        ],
        canary_label: "canary".into(),
        soak_ms: 3 * MIN,
        max_failures: 0,
        max_failure_pct: 0,
        in_flight_cap: 3,
        download_window: None,
        install_window: None,
    }
}

/// One message to `a` and another to `b` at the same time.
fn at_once(a: &Fleet, ma: &str, b: &Fleet, mb: &str, dev: &str) -> (Intake, Intake) {
    let topic = format!("{PREFIX}/{dev}/results");
    std::thread::scope(|s| {
        let x = s.spawn(|| a.ingest(&topic, ma.as_bytes()).unwrap());
        let y = s.spawn(|| b.ingest(&topic, mb.as_bytes()).unwrap());
        (x.join().unwrap(), y.join().unwrap())
    })
}

#[test]
fn the_second_controller_takes_over_mid_rollout_and_nothing_runs_twice() {
    let Some(url) = pg_url("two_controllers") else {
        eprintln!("SKIPPING two_controllers: PostgreSQL is not installed");
        return;
    };
    let clock = Arc::new(ManualClock::new(T0));
    let mut cfg = config();
    // the test moves the clock a heartbeat interval per round
    cfg.lease_ttl_ms = 5 * MIN;
    let ha = harness_on(&url, cfg.clone(), clock.clone(), "controller-a");
    let hb = harness_on(&url, cfg.clone(), clock.clone(), "controller-b");
    let (a, b) = (&ha.fleet, &hb.fleet);
    let devs: Vec<String> = (0..9)
        .map(|i| ha.ab_device("1.0", &format!("s{i}")))
        .collect();
    let now = ha.now();
    a.store
        .tx(|tx| rollout::create(tx, &cfg, now, &spec()))
        .unwrap();
    a.store.tx(|tx| rollout::start(tx, now, "two")).unwrap();

    // a starts first and takes the lease
    assert!(a.tick().unwrap());
    let mut boot = 0;
    let mut a_alive = true;
    for round in 0..40 {
        // both tick at the same time; only the lease holder works
        let (ta, tb) = std::thread::scope(|s| {
            let x = s.spawn(|| if a_alive { a.tick().unwrap() } else { false });
            let y = s.spawn(|| b.tick().unwrap());
            (x.join().unwrap(), y.join().unwrap())
        });
        assert!(!(ta && tb), "round {round}: both controllers ticked");
        let holder = a
            .store
            .tx(|tx| lease::holder(tx, lease::TICKER))
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(
            holder,
            if a_alive {
                "controller-a"
            } else {
                "controller-b"
            },
            "round {round}"
        );
        // devices answer every task sent so far, through both controllers
        let open: Vec<tasks::Task> = b
            .store
            .tx(|tx| tasks::list(tx, None, Some("two"), 100))
            .unwrap()
            .into_iter()
            .filter(|t| t.state == TaskState::Queued)
            .collect();
        for t in &open {
            boot += 1;
            let (d, w) = (t.device_id.as_str(), t.wire_id.as_str());
            let done = result_message(
                d,
                w,
                Some(w),
                "upgrade",
                Status::Done,
                json!({"status": "upgraded", "version": "2.0"}),
                None,
                1,
            );
            let confirmed = result_message(
                d,
                &format!("boot-confirmed-n{boot}"),
                None,
                "bootConfirmed",
                Status::Done,
                json!({"slot": "b", "version": "2.0"}),
                None,
                1,
            );
            // the agent's two messages reach different controllers at once ...
            let (ra, rb) = at_once(a, &done, b, &confirmed, d);
            assert!(
                matches!(ra, Intake::Applied(_)) && matches!(rb, Intake::Applied(_)),
                "{ra:?} {rb:?}"
            );
            // ... and then each copy reaches the other one too (both subscribed)
            let (ra, rb) = at_once(a, &confirmed, b, &done, d);
            assert_eq!((ra, rb), (Intake::Duplicate, Intake::Duplicate));
            assert_eq!(
                hb.task(&t.id).state,
                TaskState::Succeeded,
                "{}: success lost in the race",
                t.id
            );
        }
        let done = b
            .store
            .tx(|tx| tasks::list(tx, None, Some("two"), 100))
            .unwrap()
            .iter()
            .filter(|t| t.state == TaskState::Succeeded)
            .count();
        if a_alive && done >= 4 {
            // controller a dies mid-rollout (it stops ticking; its lease runs out)
            a_alive = false;
            assert!(!b.tick().unwrap(), "b took the lease before it ran out");
            clock.advance(cfg.lease_ttl_ms + 1);
        }
        let st = b
            .store
            .tx(|tx| rollout::status(tx, &cfg, b.now(), "two"))
            .unwrap();
        if st.state == RolloutState::Completed {
            assert!(!a_alive, "the rollout completed before the takeover");
            break;
        }
        hb.advance_alive(MIN);
    }
    let st = b
        .store
        .tx(|tx| rollout::status(tx, &cfg, b.now(), "two"))
        .unwrap();
    assert_eq!(st.state, RolloutState::Completed, "{st:?}");
    // one task per device, one attempt, succeeded; each applied once
    let all = b
        .store
        .tx(|tx| tasks::list(tx, None, Some("two"), 100))
        .unwrap();
    assert_eq!(all.len(), devs.len());
    for t in &all {
        assert_eq!(
            (t.generation, t.attempt, t.state),
            (1, 1, TaskState::Succeeded),
            "{}",
            t.id
        );
        let hist = b.store.tx(|tx| tasks::history(tx, &t.id)).unwrap();
        let states: Vec<&str> = hist.iter().map(|e| e.2.as_str()).collect();
        assert_eq!(
            states,
            ["pending", "queued", "verifying", "succeeded"],
            "{}",
            t.id
        );
    }
    for d in &devs {
        assert_eq!(hb.device(d).version.as_deref(), Some("2.0"));
    }
}

/// What serializes two controllers on one device: applying a message waits
/// for another transaction that holds the device (without the lock, two
/// messages of one device applied at once can each miss the other's write:
/// a `done` that does not see the boot confirmation and the other way round).
#[test]
fn a_message_for_a_device_waits_for_the_other_controllers_transaction_on_it() {
    let Some(url) = pg_url("device_lock") else {
        eprintln!("SKIPPING device_lock: PostgreSQL is not installed");
        return;
    };
    let clock = Arc::new(ManualClock::new(T0));
    let ha = harness_on(&url, config(), clock.clone(), "controller-a");
    let hb = harness_on(&url, config(), clock, "controller-b");
    let d = ha.ab_device("1.0", "b0");
    let (tx_locked, rx_locked) = std::sync::mpsc::channel();
    let hold = std::time::Duration::from_millis(400);
    let waited = std::thread::scope(|s| {
        s.spawn(|| {
            ha.fleet
                .store
                .tx(|tx| {
                    tx.lock_device(&d)?;
                    tx_locked.send(()).unwrap();
                    std::thread::sleep(hold);
                    Ok(())
                })
                .unwrap()
        });
        rx_locked.recv().unwrap();
        let t0 = std::time::Instant::now();
        let msg = result_message(
            &d,
            "boot-confirmed-x",
            None,
            "bootConfirmed",
            Status::Done,
            json!({"slot": "a", "version": "1.0"}),
            None,
            1,
        );
        hb.fleet
            .ingest(&format!("{PREFIX}/{d}/results"), msg.as_bytes())
            .unwrap();
        t0.elapsed()
    });
    assert!(
        waited >= hold / 2,
        "the message was applied while another transaction held the device ({waited:?})"
    );
}
