//! Task life cycles on both stores, driven by the agent's own messages and a
//! manual clock.

mod common;

use common::*;
use dualroot_api::wire::Status;
use dualroot_fleet::store::Val;
use dualroot_fleet::tasks::intake::Intake;
use dualroot_fleet::tasks::{self, TaskState as S};
use serde_json::json;

fn upgrade_body(v: &str) -> serde_json::Value {
    json!({"version": v, "url": "https://files.example/b.bundle", "sha256": "ab".repeat(32)})
}

#[test]
fn upgrade_succeeds_only_on_a_new_boot_of_the_target() {
    each_store("upgrade_success", |h| {
        let d = h.ab_device("1.0", "boot-1");
        let t = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
        assert_eq!(t.state, S::Queued);
        assert_eq!(t.start_boot_id.as_deref(), Some("boot-1"));
        assert_eq!(t.from_version.as_deref(), Some("1.0"));
        // the task went to the outbox, in the agent's format
        let sent = h.sent_tasks(&d);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["taskId"], t.wire_id.as_str());
        assert_eq!(sent[0]["taskType"], "upgrade");
        assert_eq!(sent[0]["body"]["version"], "2.0");
        // a re-sent copy answered in_progress: the device has it
        let w = t.wire_id.as_str();
        h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::InProgress,
            json!({"state": "queued"}),
            None,
        );
        assert_eq!(h.task(&t.id).state, S::Acked);
        h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::InProgress,
            json!({"state": "running"}),
            None,
        );
        assert_eq!(h.task(&t.id).state, S::Downloading);
        // in_progress is neither recorded nor acked
        assert!(h.acks(&d).iter().all(|k| k != w));
        // the agent's done (after its own reboot check) is not success yet
        let r = h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::Done,
            json!({"status": "upgraded", "slot": "b", "version": "2.0", "previousVersion": "1.0"}),
            None,
        );
        assert_eq!(r, Intake::Applied(Some(S::Verifying)));
        assert!(h.acks(&d).iter().any(|k| k == w), "done is acked");
        // a confirmation of the old boot again proves nothing
        h.boot_confirmed(&d, "boot-1", "a", "1.0");
        assert_eq!(h.task(&t.id).state, S::Verifying);
        // the new boot on the target version commits it
        let r = h.boot_confirmed(&d, "boot-2", "b", "2.0");
        assert_eq!(r, Intake::Applied(Some(S::Succeeded)));
        let t = h.task(&t.id);
        assert_eq!(t.state, S::Succeeded);
        let states: Vec<String> = h.history(&t.id).into_iter().map(|e| e.2).collect();
        assert_eq!(
            states,
            [
                "pending",
                "queued",
                "acked",
                "downloading",
                "verifying",
                "succeeded"
            ]
        );
        let dev = h.device(&d);
        assert_eq!(dev.boot_id.as_deref(), Some("boot-2"));
        assert_eq!(dev.version.as_deref(), Some("2.0"));
        assert_eq!(dev.slot.as_deref(), Some("b"));
    });
}

#[test]
fn rollback_from_the_agent_result_and_from_a_boot_on_the_old_version() {
    each_store("rollback", |h| {
        // the agent says it fell back
        let d = h.ab_device("1.0", "b1");
        let t = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
        let w = t.wire_id.as_str();
        let r = h.send(&d, w, Some(w), "upgrade", Status::Failed,
            json!({"status": "rolled back", "runningSlot": "a", "runningVersion": "1.0",
                   "wantedVersion": "2.0", "wantedSlot": "b", "fallbackFrom": "b", "fallbackTriesUsed": 3}),
            Some("rolled back: running slot a version 1.0 instead of slot b version 2.0"));
        assert_eq!(r, Intake::Applied(Some(S::RolledBack)));
        assert_eq!(h.task(&t.id).attempt, 1, "a rollback is not retried");
        assert_eq!(h.device(&d).failures, 1);

        // a migration armed, then the device confirms a new boot of another version
        let d2 = h.register();
        h.heartbeat(&d2, "el7-1", None);
        let m = h.create(
            &d2,
            "migrate",
            json!({"url": "https://x/m", "sha256": "00", "plan": "p", "reboot": true}),
            Some("el9-1"),
        );
        let w = m.wire_id.as_str();
        h.send(
            &d2,
            w,
            Some(w),
            "migrate",
            Status::Done,
            json!({"staged": true, "output": ""}),
            None,
        );
        assert_eq!(h.task(&m.id).state, S::Rebooting);
        let r = h.boot_confirmed(&d2, "nb1", "a", "el9-0");
        assert_eq!(r, Intake::Applied(Some(S::RolledBack)));

        // a reboot before the switch was armed is not a rollback
        let d3 = h.ab_device("1.0", "c1");
        let t3 = h.create(&d3, "upgrade", upgrade_body("2.0"), Some("2.0"));
        let w = t3.wire_id.as_str();
        h.send(
            &d3,
            w,
            Some(w),
            "upgrade",
            Status::InProgress,
            json!({"state": "running"}),
            None,
        );
        h.boot_confirmed(&d3, "c2", "a", "1.0");
        assert_eq!(h.task(&t3.id).state, S::Downloading);
    });
}

#[test]
fn migration_succeeds_on_the_new_system_and_a_refusal_fails_it() {
    each_store("migration", |h| {
        let d = h.register();
        h.heartbeat(&d, "el7-1", None);
        assert_eq!(h.device(&d).layout.name(), "legacy");
        let m = h.create(
            &d,
            "migrate",
            json!({"url": "https://x/m", "sha256": "00", "plan": "p", "reboot": true}),
            Some("el9-1"),
        );
        let w = m.wire_id.as_str();
        h.send(
            &d,
            w,
            Some(w),
            "migrate",
            Status::Done,
            json!({"staged": true, "output": "armed"}),
            None,
        );
        assert_eq!(h.task(&m.id).state, S::Rebooting);
        assert_eq!(h.device(&d).layout.name(), "migrating");
        // the old system's last heartbeat does not undo "migrating"
        h.heartbeat(&d, "el7-1", None);
        assert_eq!(h.device(&d).layout.name(), "migrating");
        // the new OS confirms its first boot
        assert_eq!(
            h.boot_confirmed(&d, "first", "a", "el9-1"),
            Intake::Applied(Some(S::Succeeded))
        );
        h.heartbeat(&d, "el9-1", Some(("a", true)));
        let dev = h.device(&d);
        assert_eq!(dev.layout.name(), "dualroot");
        assert_eq!(dev.version.as_deref(), Some("el9-1"));

        let d2 = h.register();
        h.heartbeat(&d2, "el7-1", None);
        let m2 = h.create(
            &d2,
            "migrate",
            json!({"url": "https://x/m", "sha256": "00", "plan": "p", "reboot": true}),
            Some("el9-1"),
        );
        let w = m2.wire_id.as_str();
        h.send(
            &d2,
            w,
            Some(w),
            "migrate",
            Status::Done,
            json!({"staged": true, "output": ""}),
            None,
        );
        let r = h.send(&d2, "migration-refused-1800000000", None, "migrationRefused", Status::Failed,
            json!({"reason": "not enough memory", "next": "old system", "timeUnix": 1.8e9, "firmwareVersion": "el7-1"}),
            Some("migration refused: not enough memory"));
        assert_eq!(r, Intake::Applied(Some(S::Failed)));
        let t = h.task(&m2.id);
        assert!(t.error.unwrap().contains("not enough memory"));
        assert_eq!(h.device(&d2).layout.name(), "legacy");

        // undone inside the window: the old disk was put back (agent's migrationUndone)
        let d3 = h.register();
        h.heartbeat(&d3, "el7-1", None);
        let m3 = h.create(&d3, "migrate", json!({"url": "https://x/m", "sha256": "00", "plan": "p", "planSignature": "s", "reboot": true}), Some("el9-1"));
        let w = m3.wire_id.as_str();
        h.send(
            &d3,
            w,
            Some(w),
            "migrate",
            Status::Done,
            json!({"staged": true, "output": ""}),
            None,
        );
        let r = h.send(&d3, "migration-undone-1800000100", None, "migrationUndone", Status::Failed,
            json!({"reason": "volumes failed", "next": "old system", "step": "volumes", "timeUnix": 1.8e9, "firmwareVersion": "el7-1"}),
            Some("migration undone: volumes failed"));
        assert_eq!(r, Intake::Applied(Some(S::Failed)));
        assert!(h.task(&m3.id).error.unwrap().contains("migration undone"));
        assert_eq!(h.device(&d3).layout.name(), "legacy");
    });
}

#[test]
fn duplicate_and_reordered_results() {
    each_store("dup_reorder", |h| {
        let d = h.ab_device("1.0", "b1");
        let t = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
        let w = t.wire_id.as_str();
        // the boot confirmation overtakes the agent's done
        assert_eq!(
            h.boot_confirmed(&d, "b2", "b", "2.0"),
            Intake::Applied(None)
        );
        assert_eq!(
            h.task(&t.id).state,
            S::Queued,
            "a boot before the device reported anything"
        );
        let done =
            json!({"status": "upgraded", "slot": "b", "version": "2.0", "previousVersion": "1.0"});
        assert_eq!(
            h.send(&d, w, Some(w), "upgrade", Status::Done, done.clone(), None),
            Intake::Applied(Some(S::Succeeded))
        );
        // the same result again (the agent republishes until acked)
        assert_eq!(
            h.send(&d, w, Some(w), "upgrade", Status::Done, done, None),
            Intake::Duplicate
        );
        assert_eq!(
            h.acks(&d).iter().filter(|k| *k == w).count(),
            2,
            "acked each time"
        );
        // a stale in_progress after the end changes nothing
        h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::InProgress,
            json!({"state": "running"}),
            None,
        );
        assert_eq!(h.task(&t.id).state, S::Succeeded);
        assert_eq!(
            h.history(&t.id).len(),
            4,
            "pending, queued, verifying, succeeded"
        );
        // the boot event repeated: one apply only
        assert_eq!(h.boot_confirmed(&d, "b2", "b", "2.0"), Intake::Duplicate);

        // plain task: done → succeeded, a duplicate heartbeat answer is applied once
        let c = h.create(&d, "collectLogs", json!({"uploadUrl": "https://x/u"}), None);
        let w = c.wire_id.as_str();
        h.send(
            &d,
            w,
            Some(w),
            "collectLogs",
            Status::Done,
            json!({"bytes": 1}),
            None,
        );
        assert_eq!(h.task(&c.id).state, S::Succeeded);
        // a message naming another device than its topic is refused
        let msg = common::result_message(
            "other",
            "k",
            Some("k"),
            "upgrade",
            Status::Done,
            json!({}),
            None,
            1,
        );
        let r = h
            .fleet
            .ingest(&format!("{PREFIX}/{d}/results"), msg.as_bytes())
            .unwrap();
        assert!(
            matches!(r, Intake::Ignored(ref w) if w.contains("names device other")),
            "{r:?}"
        );
    });
}

#[test]
fn a_new_generation_supersedes_and_old_copies_are_not_taken_for_it() {
    each_store("supersede", |h| {
        let d = h.ab_device("1.0", "b1");
        let g1 = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
        let g2 = h.create(&d, "upgrade", upgrade_body("2.1"), Some("2.1"));
        assert_eq!(h.task(&g1.id).state, S::Superseded);
        assert_eq!((g1.generation, g2.generation), (1, 2));
        assert_ne!(g1.wire_id, g2.wire_id);
        // a late result of generation 1 is not taken for generation 2
        let w = g1.wire_id.as_str();
        let r = h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::Failed,
            json!({}),
            Some("download failed"),
        );
        assert!(matches!(r, Intake::Ignored(_)), "{r:?}");
        assert_eq!(h.task(&g2.id).state, S::Queued);
        // the database itself refuses a second active task of a type
        let e = h.sql(
            "INSERT INTO tasks (id, wire_id, device_id, task_type, generation, attempt, body, state, active, acked, \
             device_done, phase_since, resends, created_at, updated_at) \
             VALUES ('x', 'x.1', $1, 'upgrade', 9, 1, '{}', 'queued', 1, 0, 0, 0, 0, 0, 0)",
            &[Val::from(d.as_str())],
        );
        assert!(e.is_err(), "two active upgrade tasks were accepted");
    });
}

#[test]
fn each_phase_has_its_deadline_and_waiting_for_a_window_does_not_count() {
    each_store("deadlines", |h| {
        let cfg = h.fleet.cfg.clone();
        let d = h.ab_device("1.0", "b1");
        // queued: re-sent (same taskId) max_resends times, then timed out
        let t = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
        for n in 1..=cfg.max_resends {
            h.advance(cfg.resend_interval_ms);
            h.tick();
            let copies = h
                .sent_tasks(&d)
                .iter()
                .filter(|m| m["taskId"] == t.wire_id.as_str())
                .count();
            assert_eq!(copies as i64, n + 1);
            assert_eq!(h.task(&t.id).state, S::Queued);
        }
        h.advance(cfg.resend_interval_ms);
        h.tick();
        let tt = h.task(&t.id);
        assert_eq!(tt.state, S::TimedOut);
        assert!(tt.error.unwrap().contains("phase queued"));

        // downloading: its own deadline
        let t = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
        let w = t.wire_id.as_str();
        h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::InProgress,
            json!({"state": "running"}),
            None,
        );
        h.advance(cfg.download_timeout_ms - 1);
        h.tick();
        assert_eq!(h.task(&t.id).state, S::Downloading);
        h.advance(1);
        h.tick();
        assert_eq!(h.task(&t.id).state, S::TimedOut);

        // verifying: the agent said upgraded, no boot confirmation follows
        let t = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
        let w = t.wire_id.as_str();
        h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::Done,
            json!({"status": "upgraded", "version": "2.0"}),
            None,
        );
        h.advance(cfg.verify_timeout_ms);
        h.tick();
        assert_eq!(h.task(&t.id).state, S::TimedOut);

        // acked: the device has it queued and never starts it
        let t = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
        let w = t.wire_id.as_str();
        h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::InProgress,
            json!({"state": "queued"}),
            None,
        );
        h.advance(cfg.acked_timeout_ms);
        h.tick();
        assert_eq!(h.task(&t.id).state, S::TimedOut);

        // a download window 10 h ahead: the deadline counts from its end
        let now_s = h.now() / 1000;
        let mut body = upgrade_body("2.0");
        body["window"] = json!({"start": now_s + 9 * 3600, "end": now_s + 10 * 3600});
        let t = h.create(&d, "upgrade", body, Some("2.0"));
        let w = t.wire_id.as_str();
        h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::InProgress,
            json!({"state": "running"}),
            None,
        );
        h.advance(cfg.download_timeout_ms + 3_600_000);
        h.tick();
        assert_eq!(
            h.task(&t.id).state,
            S::Downloading,
            "waiting for the window counted"
        );
        h.advance(10 * 3_600_000);
        h.tick();
        assert_eq!(h.task(&t.id).state, S::TimedOut);

        // rebooting: a migration that never comes back
        let d2 = h.register();
        h.heartbeat(&d2, "el7", None);
        let m = h.create(
            &d2,
            "migrate",
            json!({"url": "https://x", "sha256": "0", "plan": "p"}),
            Some("el9"),
        );
        let w = m.wire_id.as_str();
        h.send(
            &d2,
            w,
            Some(w),
            "migrate",
            Status::Done,
            json!({"staged": true}),
            None,
        );
        h.advance(cfg.reboot_timeout_ms + 1);
        h.tick();
        let m = h.task(&m.id);
        assert_eq!(m.state, S::TimedOut);
        assert!(m.error.unwrap().contains("phase rebooting"));
        assert_eq!(
            h.device(&d2).layout.name(),
            "legacy",
            "the silent device is shown as its old system"
        );
    });
}

#[test]
fn retries_back_off_then_fail_and_permanent_errors_do_not_retry() {
    each_store("retries", |h| {
        let cfg = h.fleet.cfg.clone();
        let d = h.ab_device("1.0", "b1");
        let t = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
        let w1 = t.wire_id.clone();
        h.send(
            &d,
            &w1,
            Some(&w1),
            "upgrade",
            Status::Failed,
            json!(null),
            Some("GET https://files.example/b.bundle: connection reset after 10 bytes"),
        );
        let t2 = h.task(&t.id);
        assert_eq!((t2.state, t2.attempt), (S::Pending, 2));
        assert_ne!(t2.wire_id, w1);
        // not sent again before the backoff
        h.advance(cfg.retry_backoff_ms - 1);
        h.tick();
        assert_eq!(h.task(&t.id).state, S::Pending);
        // a late copy of attempt 1's failure is not applied to attempt 2
        h.send(
            &d,
            &w1,
            Some(&w1),
            "upgrade",
            Status::Failed,
            json!(null),
            Some("other"),
        );
        h.advance(1);
        h.tick();
        let t2 = h.task(&t.id);
        assert_eq!(t2.state, S::Queued);
        assert_eq!(
            h.sent_tasks(&d).last().unwrap()["taskId"],
            t2.wire_id.as_str()
        );
        // attempt 2 fails: backoff doubles
        let w2 = t2.wire_id.clone();
        h.send(
            &d,
            &w2,
            Some(&w2),
            "upgrade",
            Status::Failed,
            json!(null),
            Some("interrupted"),
        );
        let t3 = h.task(&t.id);
        assert_eq!(t3.attempt, 3);
        assert_eq!(t3.not_before.unwrap() - h.now(), 2 * cfg.retry_backoff_ms);
        h.advance(2 * cfg.retry_backoff_ms);
        h.tick();
        // attempt 3 (the last) fails: failed for good
        let w3 = h.task(&t.id).wire_id;
        h.send(
            &d,
            &w3,
            Some(&w3),
            "upgrade",
            Status::Failed,
            json!(null),
            Some("interrupted"),
        );
        let t4 = h.task(&t.id);
        assert_eq!(t4.state, S::Failed);
        assert!(t4.error.unwrap().contains("3 attempts used"));

        // the device now has 3 failures in a row: a retry carries the penalty
        assert!(h.device(&d).failures >= cfg.penalty_after);
        let t = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
        let w = t.wire_id.as_str();
        h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::Failed,
            json!(null),
            Some("interrupted"),
        );
        assert_eq!(
            h.task(&t.id).not_before.unwrap() - h.now(),
            cfg.retry_backoff_ms + cfg.penalty_ms
        );

        // refusals are permanent, a rejected message is rejected
        let d2 = h.ab_device("1.0", "x1");
        let t = h.create(&d2, "upgrade", upgrade_body("2.0"), Some("2.0"));
        let w = t.wire_id.as_str();
        h.send(&d2, w, Some(w), "upgrade", Status::Failed, json!(null),
            Some("upgrade window 1..2 lies more than a year after now (3); refused, nothing was downloaded"));
        assert_eq!(h.task(&t.id).state, S::Failed);
        let t = h.create(&d2, "collectLogs", json!({}), None);
        let w = t.wire_id.as_str();
        h.send(
            &d2,
            w,
            Some(w),
            "collectLogs",
            Status::Rejected,
            json!(null),
            Some("malformed task message"),
        );
        assert_eq!(h.task(&t.id).state, S::Rejected);
        // success clears the failure count
        let t = h.create(&d2, "collectLogs", json!({}), None);
        let w = t.wire_id.as_str();
        h.send(
            &d2,
            w,
            Some(w),
            "collectLogs",
            Status::Done,
            json!({}),
            None,
        );
        assert_eq!(h.device(&d2).failures, 0);
    });
}

#[test]
fn offline_after_three_missed_heartbeats_and_a_quick_reconnect_is_no_outage() {
    each_store("offline", |h| {
        let iv = h.fleet.cfg.heartbeat_interval_ms;
        let d = h.register();
        assert!(!h.device(&d).online, "never heard from");
        h.heartbeat(&d, "1.0", Some(("a", true)));
        assert!(h.device(&d).online);
        h.advance(3 * iv);
        assert!(
            h.device(&d).online,
            "three intervals is not yet three missed"
        );
        h.heartbeat(&d, "1.0", Some(("a", true)));
        assert_eq!(
            h.device(&d).outages,
            0,
            "a reconnect within 3 intervals is no outage"
        );
        h.advance(3 * iv + 1);
        assert!(!h.device(&d).online);
        h.heartbeat(&d, "1.0", Some(("a", true)));
        let dev = h.device(&d);
        assert!(dev.online);
        assert_eq!(dev.outages, 1);
    });
}

#[test]
fn heartbeat_tasks_go_out_every_interval() {
    each_store("hb_tasks", |h| {
        let iv = h.fleet.cfg.heartbeat_interval_ms;
        let d = h.register();
        h.heartbeat(&d, "1.0", None); // online
        let hbs = |h: &H| {
            h.outbox()
                .into_iter()
                .filter(|(t, p)| {
                    *t == format!("{PREFIX}/{d}/tasks") && p["taskType"] == "heartbeat"
                })
                .count()
        };
        h.tick();
        assert_eq!(hbs(h), 1);
        h.advance(iv - 1);
        h.tick();
        assert_eq!(hbs(h), 1);
        h.advance(1);
        h.tick();
        assert_eq!(hbs(h), 2);
    });
}

#[test]
fn an_offline_device_is_probed_less_often() {
    each_store("hb_offline", |h| {
        let cfg = h.fleet.cfg.clone();
        let iv = cfg.heartbeat_interval_ms;
        let on = h.register();
        let off = h.register();
        h.heartbeat(&on, "1.0", None);
        h.heartbeat(&off, "1.0", None);
        h.tick(); // both get their first heartbeat task
        let count = |h: &H, d: &str| {
            h.outbox()
                .into_iter()
                .filter(|(t, p)| {
                    *t == format!("{PREFIX}/{d}/tasks") && p["taskType"] == "heartbeat"
                })
                .count() as i64
        };
        let k = cfg.offline_probe_intervals;
        for _ in 0..2 * k {
            h.advance(iv);
            h.heartbeat(&on, "1.0", None); // `off` stays silent
            h.tick();
        }
        assert_eq!(count(h, &on), 1 + 2 * k);
        // online for 3 intervals, then one probe every k intervals
        let off_count = count(h, &off);
        assert!(
            (3..=5).contains(&off_count),
            "offline device got {off_count} heartbeat tasks in {} intervals",
            2 * k
        );
    });
}

#[test]
fn an_older_heartbeat_arriving_late_does_not_roll_facts_back() {
    each_store("hb_order", |h| {
        let d = h.register();
        let old = common::result_message(
            &d,
            "hb-old",
            Some("hb-old"),
            "heartbeat",
            Status::Done,
            json!({"deviceId": d, "firmwareVersion": "1.0", "slot": {"booted": "a", "primary": "a", "fallback": false, "bootedGood": true}}),
            None,
            1,
        );
        std::thread::sleep(std::time::Duration::from_millis(5)); // the agent's `at` is its wall clock
        h.heartbeat(&d, "2.0", Some(("b", true)));
        let r = h
            .fleet
            .ingest(&format!("{PREFIX}/{d}/heartbeat"), old.as_bytes())
            .unwrap();
        assert!(
            matches!(r, Intake::Ignored(ref w) if w.contains("older")),
            "{r:?}"
        );
        let dev = h.device(&d);
        assert_eq!(
            (dev.version.as_deref(), dev.slot.as_deref()),
            (Some("2.0"), Some("b"))
        );
        assert!(h.acks(&d).contains(&"hb-old".to_string()), "still acked");
    });
}

#[test]
fn dedup_keys_and_sent_rows_are_pruned_after_their_time() {
    each_store("prune", |h| {
        let d = h.register();
        h.heartbeat(&d, "1.0", None);
        let count = |h: &H, table: &str| {
            h.fleet
                .store
                .tx(|tx| {
                    Ok(tx
                        .query_opt(&format!("SELECT COUNT(*) FROM {table}"), &[])?
                        .unwrap()
                        .i64(0))
                })
                .unwrap()
        };
        assert_eq!(count(h, "results_seen"), 1);
        let now = h.now();
        h.sql("UPDATE outbox SET sent_at = $1", &[now.into()])
            .unwrap();
        h.advance(h.fleet.cfg.dedup_keep_ms + 1);
        h.tick();
        assert_eq!(count(h, "results_seen"), 0);
        // the rows sent long ago are gone; the heartbeat task of this tick is not sent yet
        assert_eq!(count(h, "outbox"), 1);
    });
}

/// A tiny deterministic PRNG (xorshift64*) for shuffles.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// The messages of one upgrade, as the agent may deliver them: in any order,
/// some twice. Whatever the order, the task ends where the story ends, and
/// its history only moves forward.
#[test]
fn any_order_of_an_upgrades_messages_ends_in_the_same_state() {
    each_store("model", |h| {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..24 {
            let d = h.ab_device("1.0", &format!("start-{round}"));
            let t = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
            let w = t.wire_id.clone();
            let boot = format!("new-{round}");
            // (ackKey, taskId, type, status, result, error)
            type Msg = (
                String,
                Option<String>,
                &'static str,
                Status,
                serde_json::Value,
                Option<&'static str>,
            );
            let progress: Vec<Msg> = vec![
                (
                    w.clone(),
                    Some(w.clone()),
                    "upgrade",
                    Status::InProgress,
                    json!({"state": "queued"}),
                    None,
                ),
                (
                    w.clone(),
                    Some(w.clone()),
                    "upgrade",
                    Status::InProgress,
                    json!({"state": "running"}),
                    None,
                ),
            ];
            let (mut msgs, want): (Vec<Msg>, S) = match round % 3 {
                0 => (
                    vec![
                        (w.clone(), Some(w.clone()), "upgrade", Status::Done, json!({"status": "upgraded", "version": "2.0"}), None),
                        (format!("boot-confirmed-{boot}"), None, "bootConfirmed", Status::Done, json!({"slot": "b", "version": "2.0"}), None),
                    ],
                    S::Succeeded,
                ),
                1 => (
                    vec![
                        (w.clone(), Some(w.clone()), "upgrade", Status::Failed, json!({"status": "rolled back"}), Some("rolled back: running slot a version 1.0 instead of slot b version 2.0")),
                        (format!("boot-confirmed-{boot}"), None, "bootConfirmed", Status::Done, json!({"slot": "a", "version": "1.0"}), None),
                    ],
                    S::RolledBack,
                ),
                _ => (
                    vec![(w.clone(), Some(w.clone()), "upgrade", Status::Failed, json!({"status": "unconfirmed"}),
                          Some("new slot b is up but its health check did not confirm it within 600 s"))],
                    S::Failed,
                ),
            };
            msgs.extend(progress);
            let dups: Vec<Msg> = msgs
                .iter()
                .filter(|_| rng.next().is_multiple_of(2))
                .cloned()
                .collect();
            msgs.extend(dups);
            rng.shuffle(&mut msgs);
            for (key, tid, ty, st, res, err) in &msgs {
                h.send(&d, key, tid.as_deref(), ty, *st, res.clone(), *err);
            }
            let got = h.task(&t.id);
            let order: Vec<&str> = msgs.iter().map(|m| m.3.as_str()).collect();
            assert_eq!(got.state, want, "round {round}, order {order:?}");
            // the history never goes back and never repeats a state
            let hist = h.history(&t.id);
            let rank = |s: &str| S::ALL.iter().position(|x| x.name() == s).unwrap();
            for pair in hist.windows(2) {
                assert!(
                    rank(&pair[1].2) > rank(&pair[0].2),
                    "round {round}: {hist:?}"
                );
            }
            // every final message was acked, once per copy; in_progress never
            // (it shares the taskId as ackKey with the final result)
            let acks = h.acks(&d);
            for (key, _, _, _, _, _) in &msgs {
                let finals = msgs
                    .iter()
                    .filter(|m| m.0 == *key && m.3 != Status::InProgress)
                    .count();
                assert_eq!(
                    acks.iter().filter(|k| *k == key).count(),
                    finals,
                    "round {round}: acks of {key}"
                );
            }
        }
    });
}

#[test]
fn a_burst_is_applied_in_one_transaction_in_order_per_device() {
    each_store("batch", |h| {
        let (d1, d2) = (h.register(), h.register());
        let hb = |d: &str, key: &str, v: &str| {
            std::thread::sleep(std::time::Duration::from_millis(2)); // the agent's `at` moves on
            (
                format!("{PREFIX}/{d}/heartbeat"),
                common::result_message(
                    d,
                    key,
                    Some(key),
                    "heartbeat",
                    Status::Done,
                    json!({"deviceId": d, "firmwareVersion": v, "slot": {"booted": "a", "primary": "a", "fallback": false, "bootedGood": true}}),
                    None,
                    1,
                ),
            )
        };
        let msgs = [
            hb(&d2, "k1", "1.0"),
            hb(&d1, "k2", "1.0"),
            hb(&d2, "k3", "1.1"),
            hb(&d1, "k4", "1.1"),
            hb(&d1, "k4", "1.1"),
        ];
        let refs: Vec<(&str, &[u8])> = msgs
            .iter()
            .map(|(t, p)| (t.as_str(), p.as_bytes()))
            .collect();
        let out: Vec<Intake> = h
            .fleet
            .ingest_batch(&refs)
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(out[4], Intake::Duplicate, "{out:?}");
        assert!(
            out[..4].iter().all(|r| *r == Intake::Applied(None)),
            "{out:?}"
        );
        for d in [&d1, &d2] {
            assert_eq!(
                h.device(d).version.as_deref(),
                Some("1.1"),
                "the newer heartbeat of {d} wins"
            );
        }
    });
}

#[test]
fn an_unreadable_heartbeat_answer_is_acked_and_only_counts_as_a_sign_of_life() {
    each_store("hb_bad", |h| {
        let d = h.register();
        let r = h.send(
            &d,
            "hb-bad",
            Some("hb-bad"),
            "heartbeat",
            Status::Done,
            json!({"slot": 5}),
            None,
        );
        assert!(matches!(r, Intake::Ignored(_)), "{r:?}");
        assert!(
            h.acks(&d).contains(&"hb-bad".to_string()),
            "not acked: the agent would resend it forever"
        );
        let dev = h.device(&d);
        assert!(dev.online);
        assert_eq!(dev.version, None);
    });
}

/// Protocol 2: the heartbeat's boot id. A task sent now is compared with the
/// boot the device runs now (its last heartbeat), not its last confirmed one;
/// a heartbeat from another boot on the target with the slot confirmed is
/// the commit, the same boot never is.
#[test]
fn a_heartbeat_from_a_new_boot_on_the_target_commits_an_upgrade_and_the_same_boot_never_does() {
    each_store("hb_boot", |h| {
        let d = h.register();
        h.heartbeat_boot(&d, "1.0", Some(("a", true)), Some("boot-A"));
        assert_eq!(h.device(&d).current_boot_id.as_deref(), Some("boot-A"));
        assert_eq!(h.device(&d).protocol, Some(2));
        let t = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
        assert_eq!(t.start_boot_id.as_deref(), Some("boot-A"));
        let w = t.wire_id.as_str();
        h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::Done,
            json!({"status": "upgraded", "slot": "b", "version": "2.0"}),
            None,
        );
        assert_eq!(h.task(&t.id).state, S::Verifying);
        // the same boot on the target version (no reboot happened): nothing
        h.heartbeat_boot(&d, "2.0", Some(("b", true)), Some("boot-A"));
        assert_eq!(h.task(&t.id).state, S::Verifying);
        // a new boot on the target, slot not confirmed yet: not yet
        h.heartbeat_boot(&d, "2.0", Some(("b", false)), Some("boot-B"));
        assert_eq!(h.task(&t.id).state, S::Verifying);
        // confirmed: committed after a reboot
        let r = h.heartbeat_boot(&d, "2.0", Some(("b", true)), Some("boot-B"));
        assert_eq!(r, Intake::Applied(Some(S::Succeeded)));
        // a protocol-1 agent's heartbeat (no boot id) clears what is known
        h.heartbeat(&d, "2.0", Some(("b", true)));
        assert_eq!(h.device(&d).current_boot_id, None);
    });
}

/// A migration armed on the device, then a heartbeat from a new boot of the
/// old system: the migration did not happen (`rolled_back`), found without
/// waiting for the reboot deadline.
#[test]
fn a_new_boot_on_the_old_version_after_the_reboot_is_a_rollback() {
    each_store("hb_rollback", |h| {
        let d = h.register();
        h.heartbeat_boot(&d, "el7-1", None, Some("old-1"));
        let m = h.create(
            &d,
            "migrate",
            json!({"url": "https://x/m", "sha256": "00", "plan": "p", "reboot": true}),
            Some("el9-1"),
        );
        let w = m.wire_id.as_str();
        // the old system's heartbeat before it reboots proves nothing
        h.heartbeat_boot(&d, "el7-1", None, Some("old-1"));
        h.send(
            &d,
            w,
            Some(w),
            "migrate",
            Status::Done,
            json!({"staged": true, "output": "armed"}),
            None,
        );
        assert_eq!(h.task(&m.id).state, S::Rebooting);
        h.heartbeat_boot(&d, "el7-1", None, Some("old-1"));
        assert_eq!(h.task(&m.id).state, S::Rebooting);
        let r = h.heartbeat_boot(&d, "el7-1", None, Some("old-2"));
        assert_eq!(r, Intake::Applied(Some(S::RolledBack)));
        assert_eq!(h.device(&d).layout.name(), "legacy");
        // an A/B upgrade the same way: back on the old slot after the reboot
        let a = h.register();
        h.heartbeat_boot(&a, "1.0", Some(("a", true)), Some("a-1"));
        let t = h.create(&a, "upgrade", upgrade_body("2.0"), Some("2.0"));
        let w = t.wire_id.as_str();
        h.send(
            &a,
            w,
            Some(w),
            "upgrade",
            Status::Done,
            json!({"status": "upgraded", "slot": "b", "version": "2.0"}),
            None,
        );
        h.heartbeat_boot(&a, "1.0", Some(("a", true)), Some("a-2"));
        assert_eq!(h.task(&t.id).state, S::RolledBack);
    });
}

/// Protocol 2 progress: `staged` and `installing` move the task and give each
/// phase its own deadline; they are recorded once and acked.
#[test]
fn progress_reports_move_a_task_through_staged_and_installing_with_their_deadlines() {
    each_store("progress", |h| {
        use dualroot_api::wire::Progress;
        let d = h.ab_device("1.0", "boot-1");
        let switch_at = (h.now() + 2 * 60 * MIN) / 1000;
        let mut body = upgrade_body("2.0");
        body["switchAt"] = json!(switch_at);
        let t = h.create(&d, "upgrade", body, Some("2.0"));
        let w = t.wire_id.as_str();
        let progress = |p: Progress| {
            h.send(
                &d,
                &p.ack_key(w),
                Some(w),
                "upgrade",
                Status::Progress,
                json!({ "state": p }),
                None,
            )
        };
        assert_eq!(progress(Progress::Staged), Intake::Applied(Some(S::Staged)));
        let cfg = h.fleet.cfg.clone();
        assert_eq!(
            h.task(&t.id).deadline,
            Some(switch_at * 1000 + cfg.download_timeout_ms)
        );
        assert!(h.acks(&d).contains(&format!("{w}#staged")));
        assert_eq!(progress(Progress::Staged), Intake::Duplicate);
        assert_eq!(
            progress(Progress::Installing),
            Intake::Applied(Some(S::Installing))
        );
        assert_eq!(
            h.task(&t.id).deadline,
            Some(switch_at * 1000 + cfg.install_timeout_ms)
        );
        // the point of no return: a cancel is no longer sent
        let now = h.now();
        let c = h
            .fleet
            .store
            .tx(|tx| tasks::cancel(tx, &cfg, now, &t.id, "operator", tasks::CancelMode::Abort))
            .unwrap();
        assert_eq!(c, tasks::Canceling::TooLate);
        assert!(h.sent_tasks(&d).iter().all(|m| m["taskType"] != "cancel"));
        // the result is not overwritten by progress
        assert_eq!(h.task(&t.id).result, json!(null));
    });
}

fn service_body(code: &str, version: &str) -> serde_json::Value {
    json!({"serviceCode": code, "version": version, "url": "https://files.example/s.tgz",
           "sha256": "cd".repeat(32), "signature": "c2ln"})
}

/// The device answers its current installService task as the agent does.
fn answer_service(h: &H, dev: &str, ok: bool) -> tasks::Task {
    let t = h
        .fleet
        .store
        .tx(|tx| tasks::active(tx, dev, "installService"))
        .unwrap()
        .expect("an installService task is active");
    let w = t.wire_id.as_str();
    let ns = t.body["serviceCode"].as_str().unwrap().to_ascii_lowercase();
    if ok {
        h.send(
            dev,
            w,
            Some(w),
            "installService",
            Status::Done,
            json!({"namespace": ns, "version": t.body["version"], "changed": true,
                   "images": 1, "manifests": 2}),
            None,
        );
    } else {
        h.send(
            dev,
            w,
            Some(w),
            "installService",
            Status::Failed,
            json!(null),
            Some("signature of the package does not verify; nothing was installed"),
        );
    }
    h.task(&t.id)
}

/// After an upgrade proven on a new boot, the device's recorded services are
/// sent again, one at a time, and the upgrade counts done only when a
/// heartbeat reports them healthy at their versions.
#[test]
fn an_upgrade_is_done_only_when_its_services_are_reinstalled_and_healthy() {
    each_store("services", |h| {
        let d = h.register();
        h.heartbeat_boot(&d, "1.0", Some(("a", true)), Some("s-1"));
        // the services this device runs, installed by the operator earlier
        for (code, v) in [("Web", "1.2"), ("db", "3")] {
            h.create(&d, "installService", service_body(code, v), None);
            assert_eq!(answer_service(h, &d, true).state, S::Succeeded);
        }
        let t = h.create(&d, "upgrade", upgrade_body("2.0"), Some("2.0"));
        let w = t.wire_id.as_str();
        h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::Done,
            json!({"status": "upgraded", "slot": "b", "version": "2.0"}),
            None,
        );
        let before = h
            .sent_tasks(&d)
            .iter()
            .filter(|m| m["taskType"] == "installService")
            .count();
        // proven on a new boot: not done, the services go out again
        let r = h.heartbeat_boot(&d, "2.0", Some(("b", true)), Some("s-2"));
        assert_eq!(r, Intake::Applied(Some(S::Verifying)));
        let sent: Vec<serde_json::Value> = h
            .sent_tasks(&d)
            .into_iter()
            .filter(|m| m["taskType"] == "installService")
            .skip(before)
            .collect();
        assert_eq!(sent.len(), 1, "one at a time: {sent:?}");
        assert_eq!(sent[0]["body"], service_body("db", "3"));
        // another proof of the boot meanwhile changes nothing
        h.boot_confirmed(&d, "s-2", "b", "2.0");
        assert_eq!(h.task(&t.id).state, S::Verifying);
        answer_service(h, &d, true);
        let sent: Vec<serde_json::Value> = h
            .sent_tasks(&d)
            .into_iter()
            .filter(|m| m["taskType"] == "installService")
            .skip(before)
            .collect();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[1]["body"], service_body("Web", "1.2"));
        answer_service(h, &d, true);
        assert_eq!(h.task(&t.id).state, S::Verifying);
        // a service not healthy yet, then healthy at its version: done
        h.heartbeat_services(
            &d,
            "2.0",
            Some(("b", true)),
            Some("s-2"),
            &[("db", "3", "healthy"), ("web", "1.2", "starting")],
        );
        assert_eq!(h.task(&t.id).state, S::Verifying);
        let r = h.heartbeat_services(
            &d,
            "2.0",
            Some(("b", true)),
            Some("s-2"),
            &[("db", "3", "healthy"), ("web", "1.2", "healthy")],
        );
        assert_eq!(r, Intake::Applied(Some(S::Succeeded)));
        let hist = h.history(&t.id);
        assert!(
            hist.iter()
                .any(|e| e.3.contains("re-installing services db, web")),
            "{hist:?}"
        );

        // a re-install that fails fails the upgrade
        let t = h.create(&d, "upgrade", upgrade_body("3.0"), Some("3.0"));
        let w = t.wire_id.as_str();
        h.send(
            &d,
            w,
            Some(w),
            "upgrade",
            Status::Done,
            json!({"status": "upgraded", "slot": "a", "version": "3.0"}),
            None,
        );
        h.boot_confirmed(&d, "s-3", "a", "3.0");
        assert_eq!(h.task(&t.id).state, S::Verifying);
        answer_service(h, &d, false);
        let t = h.task(&t.id);
        assert_eq!(t.state, S::Failed);
        assert!(
            t.error
                .as_deref()
                .unwrap()
                .contains("re-installing service db"),
            "{:?}",
            t.error
        );
    });
}
