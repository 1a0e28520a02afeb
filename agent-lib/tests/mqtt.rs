//! The agent binary against a real mosquitto (started per test on a free
//! loopback port, persistence on) and a test backend playing the cloud.
//! Side effects are counted with the `test.sleep` task type (enabled by
//! `debug.test_tasks`), which appends its taskId to a marker file.

mod common;

use agent_lib::journal::State;
use common::*;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn setup(dev: &str) -> (tempfile::TempDir, Broker, Backend, AgentProc) {
    setup_with(dev, AgentOpts::default())
}

fn setup_with(dev: &str, o: AgentOpts) -> (tempfile::TempDir, Broker, Backend, AgentProc) {
    let d = tempfile::tempdir().unwrap();
    let (broker, backend, agent) = start_at(d.path(), dev, o);
    (d, broker, backend, agent)
}

/// Broker, backend and an agent (not started yet) with its files under `dir`,
/// for tests that put engine doubles or result files there first.
fn start_at(dir: &std::path::Path, dev: &str, o: AgentOpts) -> (Broker, Backend, AgentProc) {
    let broker = Broker::start(dir);
    let backend = Backend::start(broker.port);
    let agent = AgentProc::new(dir, dev, broker.port, o);
    (broker, backend, agent)
}

fn runs(results: &[serde_json::Value]) -> HashSet<String> {
    results
        .iter()
        .map(|r| r["run"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn duplicate_task_id_new_packet_ids_runs_once() {
    let (d, _broker, backend, mut agent) = setup("dev-dup");
    agent.start("");
    let marker = d.path().join("marker");
    let body = json!({"ms": 1500, "marker": marker});
    // three publishes → three packet ids, one taskId; the 2nd and 3rd arrive while it runs
    for _ in 0..3 {
        backend.publish_task("dev-dup", "t-dup", "test.sleep", body.clone());
    }
    let res = backend.wait_result("t-dup", 1, T);
    assert_eq!(res[0]["status"], "done");
    // a duplicate after it finished gets the stored result again
    backend.publish_task("dev-dup", "t-dup", "test.sleep", body);
    let res = backend.wait_result("t-dup", 2, T);
    assert_eq!(runs(&res).len(), 1, "same stored result: {res:?}");
    assert_eq!(marker_lines(&marker), vec!["t-dup"]);
    let progress = backend
        .all()
        .iter()
        .filter(|v| v["taskId"] == "t-dup" && v["status"] == "in_progress")
        .count();
    assert!(
        progress >= 1,
        "duplicates while running answered in progress"
    );
    assert_eq!(agent.journal().get("t-dup").unwrap().unwrap().0.attempts, 1);
}

/// Issue 23 item 12: a journal write that fails leaves the task unacked; it
/// used to wait for a reconnect that never came (the connection stayed up), so
/// the task was lost. Now it is journaled again and runs, once.
#[test]
fn task_whose_journal_write_failed_runs_once_when_the_write_works_again() {
    let (d, _broker, backend, mut agent) = setup("dev-jfail");
    agent.start("intake_journal=fail(3)");
    let marker = d.path().join("marker");
    backend.publish_task(
        "dev-jfail",
        "t-jf",
        "test.sleep",
        json!({"ms": 10, "marker": marker}),
    );
    let res = backend.wait_result("t-jf", 1, T);
    assert_eq!(res[0]["status"], "done", "{res:?}");
    assert_eq!(marker_lines(&marker), vec!["t-jf"]);
    assert_eq!(agent.journal().get("t-jf").unwrap().unwrap().0.attempts, 1);
}

#[test]
fn duplicate_after_agent_restart_runs_once() {
    let (d, _broker, backend, mut agent) = setup("dev-restart");
    agent.start("");
    let marker = d.path().join("marker");
    let body = json!({"ms": 10, "marker": marker});
    backend.publish_task("dev-restart", "t-r", "test.sleep", body.clone());
    backend.wait_result("t-r", 1, T);
    agent.kill9();
    agent.start("");
    backend.publish_task("dev-restart", "t-r", "test.sleep", body);
    let res = backend.wait_result("t-r", 2, T);
    assert_eq!(runs(&res).len(), 1, "{res:?}");
    assert_eq!(marker_lines(&marker), vec!["t-r"]);
}

#[test]
fn kill9_in_received_state_broker_redelivers_same_packet_runs_once() {
    let (d, _broker, backend, mut agent) = setup("dev-k1");
    // journaled as received, not acked, worker never claims it
    agent.start("after_journal=pause");
    let marker = d.path().join("marker");
    backend.publish_task(
        "dev-k1",
        "t-k1",
        "test.sleep",
        json!({"ms": 10, "marker": marker}),
    );
    agent.wait_failpoint("after_journal");
    assert_eq!(
        agent.journal().get("t-k1").unwrap().unwrap().0.state,
        State::Received
    );
    agent.kill9();
    agent.start("");
    let res = backend.wait_result("t-k1", 1, T);
    assert_eq!(res[0]["status"], "done");
    // the unacked message came back from the broker (same packet id) and was deduplicated
    wait_until("redelivery to be seen as a duplicate", T, || {
        agent.count_log("task t-k1: duplicate") >= 1
    });
    assert_eq!(marker_lines(&marker), vec!["t-k1"]);
    assert_eq!(agent.journal().get("t-k1").unwrap().unwrap().0.attempts, 1);
}

#[test]
fn kill9_in_running_state_is_not_rerun_and_reports_interrupted() {
    let (d, _broker, backend, mut agent) = setup("dev-k2");
    agent.start("in_task=pause");
    let marker = d.path().join("marker");
    let body = json!({"ms": 10, "marker": marker});
    backend.publish_task("dev-k2", "t-k2", "test.sleep", body.clone());
    agent.wait_failpoint("in_task");
    assert_eq!(
        agent.journal().get("t-k2").unwrap().unwrap().0.state,
        State::Running
    );
    agent.kill9();
    agent.start("");
    let res = backend.wait_result("t-k2", 1, T);
    assert_eq!(res[0]["status"], "failed");
    assert!(
        res[0]["error"].as_str().unwrap().contains("interrupted"),
        "{res:?}"
    );
    backend.publish_task("dev-k2", "t-k2", "test.sleep", body);
    backend.wait_result("t-k2", 2, T);
    assert_eq!(marker_lines(&marker), vec!["t-k2"], "never run twice");
}

#[test]
fn kill9_after_done_before_publish_result_is_not_lost() {
    let (d, _broker, backend, mut agent) = setup("dev-k3");
    agent.start("after_finish=pause");
    let marker = d.path().join("marker");
    backend.publish_task(
        "dev-k3",
        "t-k3",
        "test.sleep",
        json!({"ms": 10, "marker": marker}),
    );
    agent.wait_failpoint("after_finish");
    assert_eq!(
        agent.journal().get("t-k3").unwrap().unwrap().0.state,
        State::Done
    );
    agent.kill9();
    assert!(backend.results_for("t-k3").is_empty());
    agent.start("");
    let res = backend.wait_result("t-k3", 1, T);
    assert_eq!(res[0]["status"], "done");
    assert_eq!(marker_lines(&marker), vec!["t-k3"]);
}

#[test]
fn kill9_after_publish_before_backend_ack_republishes() {
    let (d, _broker, backend, mut agent) = setup("dev-k4");
    backend
        .auto_ack
        .store(false, std::sync::atomic::Ordering::SeqCst);
    agent.start("");
    let marker = d.path().join("marker");
    backend.publish_task(
        "dev-k4",
        "t-k4",
        "test.sleep",
        json!({"ms": 10, "marker": marker}),
    );
    backend.wait_result("t-k4", 1, T);
    agent.kill9();
    backend
        .auto_ack
        .store(true, std::sync::atomic::Ordering::SeqCst);
    agent.start("");
    let res = backend.wait_result("t-k4", 2, T);
    assert_eq!(runs(&res).len(), 1, "the stored result, republished");
    let j = agent.journal();
    wait_until("outbox to drain after ack", T, || {
        j.outbox_len().unwrap() == 0
    });
    assert_eq!(marker_lines(&marker), vec!["t-k4"]);
}

#[test]
fn outbox_retries_until_acked() {
    let (_d, _broker, backend, mut agent) = setup("dev-retry");
    backend
        .auto_ack
        .store(false, std::sync::atomic::Ordering::SeqCst);
    agent.start("");
    backend.publish_task("dev-retry", "hb-1", "heartbeat", json!({}));
    // outbox_retry_secs = 2: without an ack it is sent again
    backend.wait_result("hb-1", 2, T);
    backend
        .auto_ack
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let j = agent.journal();
    wait_until("outbox to drain after ack", T, || {
        j.outbox_len().unwrap() == 0
    });
}

#[test]
fn broker_restart_mid_task_results_arrive() {
    let (d, mut broker, backend, mut agent) = setup("dev-br");
    agent.start("");
    let marker = d.path().join("marker");
    backend.publish_task(
        "dev-br",
        "t-br",
        "test.sleep",
        json!({"ms": 2500, "marker": marker}),
    );
    wait_until("task to start", T, || !marker_lines(&marker).is_empty());
    broker.restart(Duration::from_millis(1500));
    let res = backend.wait_result("t-br", 1, Duration::from_secs(60));
    assert_eq!(res[0]["status"], "done");
    // and the agent still takes new tasks after the restart (resubscribed)
    backend.publish_task(
        "dev-br",
        "t-br2",
        "test.sleep",
        json!({"ms": 1, "marker": marker}),
    );
    backend.wait_result("t-br2", 1, Duration::from_secs(60));
    assert_eq!(marker_lines(&marker), vec!["t-br", "t-br2"]);
    assert!(agent.count_log("reconnecting in") >= 1);
    assert!(
        agent.count_log("subscribed to") >= 2,
        "resubscribed on the new CONNACK"
    );
}

#[test]
fn broker_losing_all_sessions_agent_resubscribes_and_resends_outbox() {
    let (d, mut broker, backend, mut agent) = setup("dev-lost");
    broker.persistence = false;
    broker.restart(Duration::from_millis(100)); // now running without persistence
    agent.start("");
    let marker = d.path().join("marker");
    backend.publish_task(
        "dev-lost",
        "t-lost",
        "test.sleep",
        json!({"ms": 2000, "marker": marker}),
    );
    wait_until("task to start", T, || !marker_lines(&marker).is_empty());
    // sessions, subscriptions and queued messages are gone after this restart
    broker.restart(Duration::from_millis(500));
    let res = backend.wait_result("t-lost", 1, Duration::from_secs(60));
    assert_eq!(res[0]["status"], "done");
    assert!(
        agent.count_log("session present: false") >= 2,
        "the first connect and the one after the session was lost"
    );
    backend.publish_task(
        "dev-lost",
        "t-lost2",
        "test.sleep",
        json!({"ms": 1, "marker": marker}),
    );
    backend.wait_result("t-lost2", 1, Duration::from_secs(60));
    assert_eq!(marker_lines(&marker), vec!["t-lost", "t-lost2"]);
}

#[test]
fn invalid_messages_get_error_results_and_agent_keeps_running() {
    let (_d, _broker, backend, mut agent) = setup_with(
        "dev-bad",
        AgentOpts {
            max_payload: 1024,
            ..Default::default()
        },
    );
    agent.start("");
    backend.publish_raw("dev-bad", b"{this is not json".to_vec());
    backend.publish_task("dev-bad", "t-unknown", "formatDisk", json!({}));
    let big =
        json!({"taskId": "t-big", "taskType": "heartbeat", "body": {"pad": "x".repeat(4096)}});
    backend.publish_raw("dev-bad", big.to_string().into_bytes());
    backend.publish_task("dev-bad", "hb-after", "heartbeat", json!({}));

    let hb = backend.wait_result("hb-after", 1, T);
    assert_eq!(hb[0]["status"], "done");
    let unknown = backend.wait_result("t-unknown", 1, T);
    assert_eq!(unknown[0]["status"], "rejected");
    assert!(unknown[0]["error"]
        .as_str()
        .unwrap()
        .contains("unknown task type"));
    let big = backend.wait_result("t-big", 1, T);
    assert!(
        big[0]["error"].as_str().unwrap().contains("too large"),
        "{big:?}"
    );
    wait_until("malformed result", T, || {
        backend.all().iter().any(|v| {
            v["status"] == "rejected" && v["error"].as_str().unwrap_or("").contains("malformed")
        })
    });
    let log = agent.log_text();
    assert!(log.contains("rejected task message"), "{log}");
    assert!(log.contains("payload too large"), "{log}");
    assert!(log.contains("unknown task type"), "{log}");
    assert!(log.contains("malformed task message"), "{log}");
    assert!(agent.is_running());
}

#[test]
fn heartbeat_reports_unknown_slot_without_engine() {
    let (_d, _broker, backend, mut agent) = setup("dev-hb");
    agent.start("");
    backend.publish_task("dev-hb", "hb-1", "heartbeat", json!({}));
    let r = backend.wait_result("hb-1", 1, T);
    assert_eq!(r[0]["_topic"], format!("{PREFIX}/dev-hb/heartbeat"));
    let h = &r[0]["result"];
    assert_eq!(h["deviceId"], "dev-hb");
    assert_eq!(h["firmwareVersion"], "9.9.9-test");
    assert_eq!(h["slot"]["booted"], "unknown");
    assert_eq!(h["slot"]["fallback"], "unknown");
    assert!(h["slot"]["reason"]
        .as_str()
        .unwrap()
        .contains("not installed"));
}

#[test]
fn heartbeat_reports_slot_from_dualroot_slot_status() {
    let d = tempfile::tempdir().unwrap();
    // test double of the engine at the process boundary
    let dr = d.path().join("dualroot");
    script(
        &dr,
        &format!(
            "[ \"$1 $2 $3\" = \"slot status --json\" ] || exit 2\necho '{}'",
            common::slot_status_json("b", "good", true, "11.7")
        ),
    );
    std::fs::write(d.path().join("boot_id"), "boot-hb-7\n").unwrap();
    let (_broker, backend, mut agent) = start_at(
        d.path(),
        "dev-hb2",
        AgentOpts {
            dualroot_bin: dr.display().to_string(),
            extra: format!(
                "[upgrade]\nboot_id_file = \"{}\"\n",
                d.path().join("boot_id").display()
            ),
            ..Default::default()
        },
    );
    agent.start("");
    backend.publish_task("dev-hb2", "hb-2", "heartbeat", json!({}));
    let r = backend.wait_result("hb-2", 1, T);
    let slot = &r[0]["result"]["slot"];
    assert_eq!(slot["booted"], "b");
    assert_eq!(slot["fallback"], true);
    assert_eq!(slot["version"], "11.7");
    // protocol 2: the boot id (the backend tells a reboot by it) and the version
    let hb: dualroot_api::wire::Heartbeat = serde_json::from_value(r[0]["result"].clone()).unwrap();
    assert_eq!(hb.boot_id.as_deref(), Some("boot-hb-7"));
    assert_eq!(hb.protocol, Some(dualroot_api::wire::PROTOCOL_VERSION));
    assert!(hb.ab());
}

#[test]
fn long_task_does_not_delay_heartbeat() {
    let (d, _broker, backend, mut agent) = setup("dev-q");
    agent.start("");
    let marker = d.path().join("marker");
    backend.publish_task(
        "dev-q",
        "slow",
        "test.sleep",
        json!({"ms": 8000, "marker": marker}),
    );
    wait_until("slow task to start", T, || {
        !marker_lines(&marker).is_empty()
    });
    let start = std::time::Instant::now();
    backend.publish_task("dev-q", "hb-q", "heartbeat", json!({}));
    backend.wait_result("hb-q", 1, T);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "heartbeat waited for the slow task"
    );
    assert!(backend.results_for("slow").is_empty());
}

#[test]
fn tls_connection_with_ring_rustls() {
    let d = tempfile::tempdir().unwrap();
    let broker = Broker::start_tls(d.path());
    let (tls_port, ca) = broker.tls.clone().unwrap();
    let backend = Backend::start(broker.port); // the backend uses the plain listener
    let mut agent = AgentProc::new(
        d.path(),
        "dev-tls",
        tls_port,
        AgentOpts {
            mqtt_extra: format!("tls = true\nca_file = \"{}\"", ca.display()),
            ..Default::default()
        },
    );
    agent.start("");
    backend.publish_task("dev-tls", "hb-tls", "heartbeat", json!({}));
    let r = backend.wait_result("hb-tls", 1, T);
    assert_eq!(r[0]["status"], "done");
}

#[test]
fn upgrade_over_mqtt_survives_reboot_and_reports_confirmed_slot() {
    use sha2::Digest;
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    // doubles at the process boundary: `dualroot` reads its slot state from a
    // file and records its arguments; the reboot command only leaves a mark
    let calls = dp.join("calls.log");
    let dr = dp.join("dualroot");
    script(
        &dr,
        &format!(
            r#"echo "dualroot $*" >> {calls}
case "$1 $2" in
  "slot status") cat {d}/slot-status.json ;;
  "slot install") echo '{install}' ;;
esac
exit 0"#,
            calls = calls.display(),
            d = dp.display(),
            install = common::install_report_json("b", "13"),
        ),
    );
    let reboot = dp.join("reboot");
    script(&reboot, &format!("touch {}/rebooted", dp.display()));
    std::fs::write(dp.join("boot_id"), "boot-1").unwrap();
    std::fs::write(
        dp.join("slot-status.json"),
        common::slot_status_json("a", "good", false, "11"),
    )
    .unwrap();
    let http = common::http::Server::start();
    let bundle: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    http.add_file("/os.bundle", bundle.clone(), "\"e1\"");

    let (_broker, backend, mut agent) = start_at(
        dp,
        "dev-up",
        AgentOpts {
            dualroot_bin: dr.display().to_string(),
            extra: format!(
                "[upgrade]\nreboot_command = [\"{}\"]\nboot_id_file = \"{}\"\n",
                reboot.display(),
                dp.join("boot_id").display()
            ),
            ..Default::default()
        },
    );
    agent.start("");
    backend.publish_task(
        "dev-up",
        "up-1",
        "upgrade",
        json!({"version": "13", "url": http.url("/os.bundle"), "sha256": hex::encode(sha2::Sha256::digest(&bundle))}),
    );
    wait_until("reboot to be requested", T, || dp.join("rebooted").exists());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        backend.results_for("up-1").is_empty(),
        "no result before the new slot is confirmed"
    );
    // "reboot": the agent dies, the machine comes back on slot B
    agent.kill9();
    std::fs::write(dp.join("boot_id"), "boot-2").unwrap();
    // slot b came up and the engine's health check confirmed it
    std::fs::write(
        dp.join("slot-status.json"),
        common::slot_status_json("b", "good", false, "13"),
    )
    .unwrap();
    agent.start("");
    let r = backend.wait_result("up-1", 1, T);
    assert_eq!(r[0]["status"], "done", "{r:?}");
    assert_eq!(r[0]["result"]["status"], "upgraded");
    assert_eq!(r[0]["result"]["version"], "13");
    let log = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(log.matches("dualroot slot install").count(), 1, "{log}");
    assert_eq!(log.matches("dualroot slot switch b").count(), 1, "{log}");
    assert!(
        !log.contains("slot confirm"),
        "the agent never confirms a slot: {log}"
    );
}

#[test]
fn journal_entries_expire_after_ttl() {
    let (d, _broker, backend, mut agent) = setup_with(
        "dev-ttl",
        AgentOpts {
            session_expiry_secs: 1,
            ttl_secs: 2,
            ..Default::default()
        },
    );
    agent.start("");
    let marker = d.path().join("marker");
    let body = json!({"ms": 1, "marker": marker});
    backend.publish_task("dev-ttl", "t-ttl", "test.sleep", body.clone());
    backend.wait_result("t-ttl", 1, T);
    let j = agent.journal();
    wait_until("result acked", T, || j.outbox_len().unwrap() == 0);
    std::thread::sleep(Duration::from_millis(2500));
    // The TTL counts the agent's running time (saved at stop and every
    // minute), so stop it as systemd does; the purge runs at start (and every
    // 10 minutes).
    assert_eq!(agent.term(T), Some(0));
    agent.start("");
    wait_until("entry purged", T, || j.get("t-ttl").unwrap().is_none());
    assert!(agent.count_log("older than the TTL") >= 1);
}

#[test]
fn install_service_over_mqtt_with_kubectl_double() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    // kubectl and image-import doubles at the process boundary, recording their arguments
    let calls = dp.join("calls.log");
    script(
        &dp.join("kubectl"),
        &format!(
            r#"echo "kubectl $*" >> {calls}
{render}
[ "$1 $2" = "get namespace" ] && {{ [ -f {d}/ns ] || exit 1; }}
[ "$1 $2" = "create namespace" ] && touch {d}/ns
exit 0"#,
            calls = calls.display(),
            d = dp.display(),
            render = KUBECTL_RENDER,
        ),
    );
    script(
        &dp.join("import"),
        &format!("echo \"import $*\" >> {}", calls.display()),
    );
    let pkg = package(&[
        ("images/a.tar", "A"),
        (
            "manifests/app.yaml",
            r#"{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "proxy"}}"#,
        ),
    ]);
    let (keyring, key) = vendor_keyring(dp);
    let http = common::http::Server::start();
    http.add_file("/svc.tgz", pkg.clone(), "\"p\"");
    let (_broker, backend, mut agent) = start_at(
        dp,
        "dev-svc",
        AgentOpts {
            extra: format!(
                "[services]\nkubectl = [\"{}\"]\nimage_import = [\"{}\"]\nkeyring = \"{}\"\n",
                dp.join("kubectl").display(),
                dp.join("import").display(),
                keyring.display()
            ),
            ..Default::default()
        },
    );
    agent.start("");
    use sha2::Digest;
    let sum = hex::encode(sha2::Sha256::digest(&pkg));
    let body = json!({"serviceCode": "edge-proxy", "version": "1.0", "url": http.url("/svc.tgz"),
                      "sha256": sum, "signature": sign_package(&key, "edge-proxy", "1.0", &sum)});
    backend.publish_task("dev-svc", "svc-1", "installService", body.clone());
    let r = backend.wait_result("svc-1", 1, T);
    assert_eq!(r[0]["status"], "done", "{r:?}");
    assert_eq!(r[0]["result"]["changed"], true);
    backend.publish_task("dev-svc", "svc-2", "installService", body);
    let r = backend.wait_result("svc-2", 1, T);
    assert_eq!(
        r[0]["result"]["changed"], false,
        "second install is a no-op"
    );
    let log = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(
        log.matches("kubectl create namespace edge-proxy").count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("kubectl apply -n edge-proxy -f ").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("import ").count(), 1, "{log}");
}

#[test]
fn first_boot_of_unconfirmed_slot_is_confirmed_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let calls = dp.join("calls.log");
    let dr = dp.join("dualroot");
    // engine double: slot A booted, confirmed by the engine's health check
    // (first boot after migration)
    script(
        &dr,
        &format!(
            r#"echo "dualroot $*" >> {calls}
[ "$1 $2" = "slot status" ] && echo '{status}'
exit 0"#,
            calls = calls.display(),
            status = slot_status_json("a", "good", false, "13.0"),
        ),
    );
    let (_broker, backend, mut agent) = start_at(
        dp,
        "dev-first",
        AgentOpts {
            dualroot_bin: dr.display().to_string(),
            extra: format!(
                "[upgrade]\nboot_id_file = \"{}\"\n",
                dp.join("boot_id").display()
            ),
            ..Default::default()
        },
    );
    std::fs::write(dp.join("boot_id"), "b1").unwrap();
    agent.start("");
    let r = backend.wait_result("boot-confirmed-b1", 1, T);
    assert_eq!(r[0]["taskType"], "bootConfirmed");
    assert_eq!(r[0]["result"]["version"], "13.0");
    assert!(!std::fs::read_to_string(&calls)
        .unwrap()
        .contains("slot confirm"));
}

#[test]
fn refused_migration_is_reported_once_across_restarts() {
    migration_outcome_is_reported_once(dualroot_api::MigrationOutcome::Refused);
}

#[test]
fn undone_migration_is_reported_once_with_its_step() {
    migration_outcome_is_reported_once(dualroot_api::MigrationOutcome::Undone);
}

fn migration_outcome_is_reported_once(outcome: dualroot_api::MigrationOutcome) {
    let undone = outcome == dualroot_api::MigrationOutcome::Undone;
    let dev = if undone { "dev-undone" } else { "dev-refused" };
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    // engine double: the old system has no slots (slot status fails)
    let dr = dp.join("dualroot");
    script(&dr, "echo 'not an A/B appliance' >&2; exit 1");
    // what the engine's migration initramfs leaves on the old root on a refusal
    let result = dp.join("migration-result.json");
    std::fs::write(
        &result,
        serde_json::to_string(&dualroot_api::MigrationResult {
            api_version: dualroot_api::API_VERSION,
            outcome,
            step: undone.then(|| "volumes".to_string()),
            reason: "the bundle needs 900 MiB of RAM and 600 MiB are free".into(),
            next: "the old system boots unchanged".into(),
            time_unix: 1_790_000_000.5,
            journal: json!({}),
        })
        .unwrap(),
    )
    .unwrap();
    let (_broker, backend, mut agent) = start_at(
        dp,
        dev,
        AgentOpts {
            dualroot_bin: dr.display().to_string(),
            extra: format!(
                "[upgrade]\nmigration_result_file = \"{}\"\n",
                result.display()
            ),
            ..Default::default()
        },
    );
    agent.start("");
    let (key, event, logged) = if undone {
        (
            "migration-undone-1790000000",
            "migrationUndone",
            "the migration was undone",
        )
    } else {
        (
            "migration-refused-1790000000",
            "migrationRefused",
            "the migration was refused",
        )
    };
    let r = backend.wait_result(key, 1, T);
    assert_eq!(r[0]["taskType"], event);
    assert_eq!(r[0]["status"], "failed");
    if undone {
        assert_eq!(r[0]["result"]["step"], "volumes");
    }
    assert!(r[0]["error"].as_str().unwrap().contains("600 MiB are free"));
    assert_eq!(r[0]["result"]["next"], "the old system boots unchanged");
    // a restart of the agent does not report the same refusal again
    agent.term(T);
    agent.start("");
    backend.publish_task(dev, "hb-after-restart", "heartbeat", json!({}));
    backend.wait_result("hb-after-restart", 1, T);
    // (the outbox may deliver the one queued message twice if the restart came
    // before the backend's ack: at-least-once, same message, same key)
    assert_eq!(agent.count_log(logged), 1, "{}", agent.log_text());
    let r = backend.results_for(key);
    assert!(r.iter().all(|m| m == &r[0]), "{r:?}");
}

#[test]
fn sigterm_lets_the_running_task_finish() {
    let (d, _broker, backend, mut agent) = setup("dev-term");
    agent.start("");
    let marker = d.path().join("marker");
    backend.publish_task(
        "dev-term",
        "t-term",
        "test.sleep",
        json!({"ms": 1500, "marker": marker}),
    );
    wait_until("task to start", T, || !marker_lines(&marker).is_empty());
    assert_eq!(agent.term(Duration::from_secs(20)), Some(0));
    assert!(
        agent.count_log("stopped (0 task(s) still running)") == 1,
        "{}",
        agent.log_text()
    );
    let (row, _) = agent.journal().get("t-term").unwrap().unwrap();
    assert_eq!(row.state, State::Done, "finished, not interrupted");
    agent.start("");
    let r = backend.wait_result("t-term", 1, T);
    assert_eq!(r[0]["status"], "done");
}

/// TLS with a client certificate (AWS IoT Core style): the broker refuses
/// clients without one.
#[test]
fn tls_client_certificate_required_by_the_broker() {
    let d = tempfile::tempdir().unwrap();
    let broker = Broker::start_tls_client_auth(d.path());
    let (tls_port, ca) = broker.tls.clone().unwrap();
    let (cert, key) = broker.client_pair();
    let backend = Backend::start(broker.port); // the backend uses the plain listener
    let mut agent = AgentProc::new(
        d.path(),
        "dev-mtls",
        tls_port,
        AgentOpts {
            mqtt_extra: format!(
                "tls = true\nca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
                ca.display(),
                cert.display(),
                key.display()
            ),
            ..Default::default()
        },
    );
    agent.start("");
    backend.publish_task("dev-mtls", "hb-mtls", "heartbeat", json!({}));
    let r = backend.wait_result("hb-mtls", 1, T);
    assert_eq!(r[0]["status"], "done");

    // the same broker does not let an agent without a certificate in
    let mut anon = AgentProc::new(
        d.path(),
        "dev-nocert",
        tls_port,
        AgentOpts {
            mqtt_extra: format!("tls = true\nca_file = \"{}\"", ca.display()),
            ..Default::default()
        },
    );
    anon.start_nowait("");
    std::thread::sleep(Duration::from_secs(3));
    assert!(anon.is_running(), "{}", anon.log_text());
    assert_eq!(anon.count_log("subscribed to"), 0, "{}", anon.log_text());
    assert!(
        anon.count_log("mqtt connection") >= 1,
        "{}",
        anon.log_text()
    );
}

/// F1: a task whose input made a handler panic stopped the agent. Now the
/// task fails with the reason and the agent goes on.
#[test]
fn absurd_upgrade_window_and_panicking_task_fail_and_the_agent_keeps_running() {
    let (d, _broker, backend, mut agent) = setup("dev-f1");
    agent.start("");
    backend.publish_task(
        "dev-f1",
        "up-absurd",
        "upgrade",
        json!({"version": "13", "url": "http://127.0.0.1:1/os.bundle", "sha256": "0".repeat(64),
               "window": {"start": -9_000_000_000_000_000_000i64, "end": 9_000_000_000_000_000_000i64}}),
    );
    let r = backend.wait_result("up-absurd", 1, T);
    assert_eq!(r[0]["status"], "failed", "{r:?}");
    assert!(r[0]["error"].as_str().unwrap().contains("window"), "{r:?}");
    backend.publish_task(
        "dev-f1",
        "t-panic",
        "test.sleep",
        json!({"panic": true, "marker": d.path().join("m")}),
    );
    let r = backend.wait_result("t-panic", 1, T);
    assert_eq!(r[0]["status"], "failed", "{r:?}");
    assert!(
        r[0]["error"]
            .as_str()
            .unwrap()
            .contains("failed unexpectedly"),
        "{r:?}"
    );
    backend.publish_task("dev-f1", "hb-after", "heartbeat", json!({}));
    assert_eq!(backend.wait_result("hb-after", 1, T)[0]["status"], "done");
    backend.publish_task("dev-f1", "t-after", "test.sleep", json!({"ms": 1}));
    assert_eq!(backend.wait_result("t-after", 1, T)[0]["status"], "done");
    assert!(agent.is_running());
}

/// F1: a resumable task that kills the agent (release builds abort on
/// panic) was resumed, and killed it, at every start. After a few unclean
/// stops it is ended as failed.
#[test]
fn upgrade_that_kills_the_agent_at_every_start_ends_failed() {
    let (_d, _broker, backend, mut agent) = setup("dev-loop");
    agent.start("");
    let now = agent_lib::registration::now_secs();
    backend.publish_task(
        "dev-loop",
        "up-loop",
        "upgrade",
        json!({"version": "13", "url": "http://127.0.0.1:1/os.bundle", "sha256": "0".repeat(64),
               "window": {"start": now + 3600, "end": now + 7200}}),
    );
    let j = agent.journal();
    wait_until("upgrade scheduled", T, || {
        j.kv_get("upgrade:up-loop").unwrap().is_some()
    });
    agent.kill9(); // unclean stop 1
                   // each start resumes the upgrade and dies in it: unclean stops 2 and 3
    for _ in 0..2 {
        agent.start_nowait("after_claim=abort");
        assert_ne!(agent.wait_exit(T), Some(0));
    }
    agent.start("");
    let r = backend.wait_result("up-loop", 1, T);
    assert_eq!(r[0]["status"], "failed", "{r:?}");
    let e = r[0]["error"].as_str().unwrap();
    assert!(
        e.contains("stopped 3 times") && e.contains("not resumed again"),
        "{e}"
    );
    backend.publish_task("dev-loop", "hb-loop", "heartbeat", json!({}));
    assert_eq!(backend.wait_result("hb-loop", 1, T)[0]["status"], "done");
}

/// Engine doubles for upgrade tests: `dualroot` reads its slot state from
/// `slot-status.json`, logs its calls, and `slot install` takes
/// `install_secs`; the reboot command leaves a mark. Returns the agent
/// options and the calls log.
fn upgrade_doubles(dp: &std::path::Path, install_secs: u32) -> (AgentOpts, std::path::PathBuf) {
    let calls = dp.join("calls.log");
    let dr = dp.join("dualroot");
    script(
        &dr,
        &format!(
            r#"echo "dualroot $*" >> {calls}
case "$1 $2" in
  "slot status") cat {d}/slot-status.json ;;
  "slot install") sleep {install_secs}; echo '{install}' ;;
esac
exit 0"#,
            calls = calls.display(),
            d = dp.display(),
            install = common::install_report_json("b", "13"),
        ),
    );
    let reboot = dp.join("reboot");
    script(&reboot, &format!("touch {}/rebooted", dp.display()));
    std::fs::write(dp.join("boot_id"), "boot-1").unwrap();
    std::fs::write(
        dp.join("slot-status.json"),
        common::slot_status_json("a", "good", false, "11"),
    )
    .unwrap();
    let opts = AgentOpts {
        dualroot_bin: dr.display().to_string(),
        extra: format!(
            "[upgrade]\nreboot_command = [\"{}\"]\nboot_id_file = \"{}\"\n",
            reboot.display(),
            dp.join("boot_id").display()
        ),
        ..Default::default()
    };
    (opts, calls)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn cancel_of_a_queued_task_ends_it_canceled_and_it_never_runs() {
    let (d, _broker, backend, mut agent) = setup("dev-cq");
    agent.start("");
    let marker = d.path().join("marker");
    backend.publish_task(
        "dev-cq",
        "long",
        "test.sleep",
        json!({"ms": 4000, "marker": marker}),
    );
    wait_until("long task to start", T, || {
        !marker_lines(&marker).is_empty()
    });
    // queued behind the running one (one worker per type)
    backend.publish_task(
        "dev-cq",
        "second",
        "test.sleep",
        json!({"ms": 10, "marker": marker}),
    );
    let cancel_id = dualroot_api::wire::cancel_task_id("second");
    backend.publish_task("dev-cq", &cancel_id, "cancel", json!({"taskId": "second"}));
    let c = backend.wait_result(&cancel_id, 1, T);
    assert_eq!(c[0]["status"], "done", "{c:?}");
    let rep: dualroot_api::wire::CancelReport =
        serde_json::from_value(c[0]["result"].clone()).unwrap();
    assert!(rep.canceled, "{rep:?}");
    assert_eq!(rep.phase, "queued");
    let r = backend.wait_result("second", 1, T);
    assert_eq!(r[0]["status"], "canceled", "{r:?}");
    backend.wait_result("long", 1, T);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(marker_lines(&marker), vec!["long"], "the canceled task ran");
    // cancelling a finished task says so
    let again = dualroot_api::wire::cancel_task_id("long");
    backend.publish_task("dev-cq", &again, "cancel", json!({"taskId": "long"}));
    let c = backend.wait_result(&again, 1, T);
    assert_eq!(c[0]["result"]["canceled"], false, "{c:?}");
    assert_eq!(c[0]["result"]["phase"], "finished");
}

#[test]
fn cancel_of_an_upgrade_waiting_for_its_window_ends_it_before_the_download() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (opts, calls) = upgrade_doubles(dp, 0);
    let (_broker, backend, mut agent) = start_at(dp, "dev-cw", opts);
    agent.start("");
    let now = unix_now();
    backend.publish_task(
        "dev-cw",
        "up-w",
        "upgrade",
        json!({"version": "13", "url": "http://127.0.0.1:9/os.bundle", "sha256": "00",
               "window": {"start": now + 3600, "end": now + 7200}}),
    );
    wait_until("the upgrade to wait for its window", T, || {
        agent.count_log("pre-download at") > 0
    });
    backend.publish_task("dev-cw", "cancel-up-w", "cancel", json!({"taskId": "up-w"}));
    let r = backend.wait_result("up-w", 1, T);
    assert_eq!(r[0]["status"], "canceled", "{r:?}");
    assert_eq!(r[0]["result"]["phase"], "scheduled");
    let c = backend.wait_result("cancel-up-w", 1, T);
    assert_eq!(c[0]["result"]["canceled"], true, "{c:?}");
    let log = std::fs::read_to_string(&calls).unwrap_or_default();
    assert!(!log.contains("slot install"), "{log}");
    assert!(!dp.join("rebooted").exists());
}

#[test]
fn upgrade_reports_staged_and_installing_and_refuses_a_cancel_once_installing() {
    use sha2::Digest;
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (opts, calls) = upgrade_doubles(dp, 3);
    let http = common::http::Server::start();
    let bundle: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    http.add_file("/os.bundle", bundle.clone(), "\"e1\"");
    let (_broker, backend, mut agent) = start_at(dp, "dev-ci", opts);
    agent.start("");
    backend.publish_task(
        "dev-ci",
        "up-i",
        "upgrade",
        json!({"version": "13", "url": http.url("/os.bundle"), "sha256": hex::encode(sha2::Sha256::digest(&bundle))}),
    );
    let staged = backend.wait_result("up-i#staged", 1, T);
    assert_eq!(staged[0]["status"], "progress", "{staged:?}");
    assert_eq!(staged[0]["taskId"], "up-i");
    assert_eq!(staged[0]["result"]["state"], "staged");
    let inst = backend.wait_result("up-i#installing", 1, T);
    assert_eq!(inst[0]["result"]["state"], "installing");
    // the engine is writing (slot install takes 3 s): too late to cancel
    backend.publish_task("dev-ci", "cancel-up-i", "cancel", json!({"taskId": "up-i"}));
    let c = backend.wait_result("cancel-up-i", 1, T);
    assert_eq!(c[0]["result"]["canceled"], false, "{c:?}");
    assert_eq!(c[0]["result"]["phase"], "installing");
    wait_until("reboot to be requested", T, || dp.join("rebooted").exists());
    let log = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(log.matches("dualroot slot switch b").count(), 1, "{log}");
    assert!(
        backend.results_for("up-i").is_empty(),
        "no result before the reboot"
    );
}
