//! The simulator against a real mosquitto and an in-process controller
//! (SQLite, the real clock): a clean 4-wave rollout completes, each device
//! counted only after its reboot; with injected install failures the rollout
//! halts at the first wave whose budget breaks, with failures within budget
//! plus in-flight cap.

mod common;

use common::{free_port, REGISTER_TOKEN};
use dualroot_fleet::clock::SystemClock;
use dualroot_fleet::mqtt::{Mqtt, Options};
use dualroot_fleet::rollout::{self, BundleKind, RolloutState, Spec, Wave};
use dualroot_fleet::sim::{self, Faults};
use dualroot_fleet::store::Store;
use dualroot_fleet::tasks::{self, TaskState};
use dualroot_fleet::{http, Fleet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mosquitto(dir: &Path) -> (u16, Kill) {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 10000\n"),
    )
    .unwrap();
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "mosquitto did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (port, Kill(child))
}

fn spec(id: &str, group: &str, cap: i64, max_failures: i64) -> Spec {
    Spec {
        id: id.into(),
        kind: BundleKind::Image,
        version: "2.0".into(),
        url: "https://files.example/b".into(),
        sha256: "00".into(),
        size: None,
        plan: None,
        plan_signature: None,
        selector: rollout::Selector {
            labels: [("group".to_string(), group.to_string())].into(),
            ..Default::default()
        },
        waves: vec![
            Wave {
                count: Some(2),
                percent: None,
                min_successes: None,
            },
            Wave {
                count: None,
                percent: Some(25),
                min_successes: None,
            },
            Wave {
                count: None,
                percent: Some(60),
                min_successes: None,
            },
            Wave {
                count: None,
                percent: Some(100),
                min_successes: None,
            },
        ],
        canary_label: "canary".into(),
        soak_ms: 1500,
        max_failures,
        max_failure_pct: 0,
        in_flight_cap: cap,
        download_window: None,
        install_window: None,
    }
}

#[test]
fn simulated_fleet_rollouts_complete_clean_and_halt_on_failures() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _broker) = mosquitto(dir.path());
    let mut cfg = common::config();
    cfg.heartbeat_interval_ms = 500;
    cfg.resend_interval_ms = 10_000;
    // an install failure is retried (3 attempts) before it counts as failed
    cfg.retry_backoff_ms = 200;
    cfg.penalty_ms = 200;
    let fleet = Arc::new(Fleet::new(
        Store::open(dir.path().join("fleet.sqlite").to_str().unwrap()).unwrap(),
        Arc::new(SystemClock),
        cfg.clone(),
    ));
    let server = http::Server::start(fleet.clone(), "127.0.0.1:0", 2).unwrap();
    let mqtt = Mqtt::start(
        fleet.clone(),
        &Options {
            host: "127.0.0.1".into(),
            port,
            client_id: "fleet-sim".into(),
            keep_alive_s: 30,
        },
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (f, s) = (fleet.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                f.tick().unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let sim_opts = |group: &str, n: usize, faults: Faults, legacy: bool| sim::Options {
        api: format!("http://127.0.0.1:{}", server.port),
        register_token: REGISTER_TOKEN.into(),
        broker_host: "127.0.0.1".into(),
        broker_port: port,
        prefix: common::PREFIX.into(),
        devices: n,
        version: "1.0".into(),
        legacy,
        labels: [("group".to_string(), group.to_string())].into(),
        canaries: 2,
        download_ms: 200,
        reboot_ms: 300,
        outbox_retry_ms: 1000,
        faults,
        operator_token: None,
        heartbeat_every_ms: None,
    };
    let sims: Vec<_> = [
        sim_opts(
            "clean",
            24,
            Faults {
                dup_pct: 30,
                ..Default::default()
            },
            false,
        ),
        sim_opts(
            "faulty",
            40,
            Faults {
                install_fail_pct: 30,
                ..Default::default()
            },
            false,
        ),
        // legacy appliances: a heartbeat task waiting in a rebooting device's
        // session (interval 500 ms, reboot 300 ms) is answered by the new
        // system, so none of them is taken for rolled back
        sim_opts("legacy", 8, Faults::default(), true),
    ]
    .into_iter()
    .map(|o| {
        let s = stop.clone();
        std::thread::spawn(move || sim::run(o, s).unwrap())
    })
    .collect();
    // wait until all 72 are registered and online
    let t0 = Instant::now();
    loop {
        let now = fleet.now();
        let online = fleet
            .store
            .tx(|tx| dualroot_fleet::devices::list(tx, &cfg, now))
            .unwrap()
            .iter()
            .filter(|d| d.online)
            .count();
        if online == 72 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "only {online} of 72 simulated devices online"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let now = fleet.now();
    let migrate = Spec {
        kind: BundleKind::Migrate,
        plan: Some("[disk]\n".into()),
        plan_signature: Some("c2lnbmVk".into()),
        ..spec("migrate", "legacy", 8, 0)
    };
    for s in [
        spec("clean", "clean", 5, 0),
        spec("faulty", "faulty", 4, 2),
        migrate,
    ] {
        fleet
            .store
            .tx(|tx| rollout::create(tx, &cfg, now, &s))
            .unwrap();
        fleet.store.tx(|tx| rollout::start(tx, now, &s.id)).unwrap();
    }
    let status = |id: &str| {
        fleet
            .store
            .tx(|tx| rollout::status(tx, &cfg, fleet.now(), id))
            .unwrap()
    };
    let t0 = Instant::now();
    loop {
        let (c, f, m) = (status("clean"), status("faulty"), status("migrate"));
        if c.state == RolloutState::Completed
            && f.state == RolloutState::Halted
            && m.state == RolloutState::Completed
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            for t in fleet
                .store
                .tx(|tx| tasks::list(tx, None, Some("faulty"), 1000))
                .unwrap()
            {
                println!(
                    "{} {} attempt {} {:?}",
                    t.id,
                    t.state.name(),
                    t.attempt,
                    t.error
                );
            }
            panic!("clean: {c:?}\nfaulty: {f:?}\nmigrate: {m:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let clean_secs = t0.elapsed().as_secs_f64();
    let f = status("faulty");
    println!(
        "faulty rollout: {:?}; failed {} (budget {} + cap {})",
        f.reason, f.budget.failed, 2, 4
    );
    assert!(f
        .reason
        .as_deref()
        .unwrap()
        .contains("failure budget broken"));
    assert!(
        f.budget.failed <= 2 + 4,
        "failed {} > budget 2 + cap 4",
        f.budget.failed
    );
    // Which wave breaks the budget is random (30% of installs fail at random,
    // 40 devices): usually wave 1 or 2, now and then the last one (seen once in
    // four runs on a loaded machine); what must hold is that it halts, within
    // budget + cap, instead of completing.
    assert_eq!(f.state, RolloutState::Halted);
    // clean: every device succeeded, each after a new boot on 2.0
    let all = fleet
        .store
        .tx(|tx| tasks::list(tx, None, Some("clean"), 1000))
        .unwrap();
    assert_eq!(all.len(), 24);
    for t in &all {
        assert_eq!(t.state, TaskState::Succeeded, "{}", t.id);
        let d = fleet
            .store
            .tx(|tx| dualroot_fleet::devices::get(tx, &cfg, fleet.now(), &t.device_id))
            .unwrap()
            .unwrap();
        assert_eq!(
            (d.version.as_deref(), d.boot_version.as_deref()),
            (Some("2.0"), Some("2.0"))
        );
        assert_ne!(d.boot_id, t.start_boot_id);
    }
    // migrate: every legacy device succeeded on the new system after its reboot
    let all = fleet
        .store
        .tx(|tx| tasks::list(tx, None, Some("migrate"), 1000))
        .unwrap();
    assert_eq!(all.len(), 8);
    assert!(
        all.iter().all(|t| t.state == TaskState::Succeeded),
        "{:?}",
        all.iter()
            .map(|t| (t.state.name(), t.error.clone()))
            .collect::<Vec<_>>()
    );
    // 4 waves with 3 soaks of 1.5 s at least
    assert!(
        clean_secs >= 4.5,
        "the clean rollout took {clean_secs} s, under its soak floor"
    );
    stop.store(true, Ordering::SeqCst);
    let reports: Vec<sim::Report> = sims.into_iter().map(|h| h.join().unwrap()).collect();
    println!(
        "clean rollout {clean_secs:.1} s; simulator reports: {}",
        serde_json::to_string(&reports).unwrap()
    );
    assert_eq!(reports[0].upgraded, 24);
    assert!(reports[1].install_failed >= f.budget.failed as u64);
    assert!(reports.iter().all(|r| r.heartbeats_acked > 0));
    ticker.join().unwrap();
    mqtt.stop();
    server.stop();
}

/// Protocol 2 over a real broker: freeze asks devices that are downloading
/// to drop their task (held, sent again on resume), abort cancels them; the
/// devices' answers, not the controller alone, end the tasks.
#[test]
fn freeze_and_abort_reach_devices_that_hold_a_task() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _broker) = mosquitto(dir.path());
    let mut cfg = common::config();
    cfg.heartbeat_interval_ms = 500;
    cfg.resend_interval_ms = 10_000;
    let fleet = Arc::new(Fleet::new(
        Store::open(dir.path().join("fleet.sqlite").to_str().unwrap()).unwrap(),
        Arc::new(SystemClock),
        cfg.clone(),
    ));
    let server = http::Server::start(fleet.clone(), "127.0.0.1:0", 2).unwrap();
    let mqtt = Mqtt::start(
        fleet.clone(),
        &Options {
            host: "127.0.0.1".into(),
            port,
            client_id: "fleet-cancel".into(),
            keep_alive_s: 30,
        },
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (f, s) = (fleet.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                f.tick().unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let o = sim::Options {
        api: format!("http://127.0.0.1:{}", server.port),
        register_token: REGISTER_TOKEN.into(),
        broker_host: "127.0.0.1".into(),
        broker_port: port,
        prefix: common::PREFIX.into(),
        devices: 6,
        version: "1.0".into(),
        legacy: false,
        labels: [("group".to_string(), "c".to_string())].into(),
        canaries: 0,
        // long enough to be caught downloading
        download_ms: 20_000,
        reboot_ms: 300,
        outbox_retry_ms: 1000,
        faults: Faults::default(),
        operator_token: None,
        heartbeat_every_ms: None,
    };
    let sim = {
        let s = stop.clone();
        std::thread::spawn(move || sim::run(o, s).unwrap())
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(30), "waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let online = || {
        let now = fleet.now();
        fleet
            .store
            .tx(|tx| dualroot_fleet::devices::list(tx, &cfg, now))
            .unwrap()
            .iter()
            .filter(|d| d.online)
            .count()
    };
    wait("6 devices online", &|| online() == 6);
    let mut s = spec("cx", "c", 6, 0);
    s.waves = vec![Wave {
        count: None,
        percent: Some(100),
        min_successes: None,
    }];
    let now = fleet.now();
    fleet
        .store
        .tx(|tx| rollout::create(tx, &cfg, now, &s))
        .unwrap();
    fleet.store.tx(|tx| rollout::start(tx, now, "cx")).unwrap();
    let rtasks = || {
        fleet
            .store
            .tx(|tx| tasks::list(tx, None, Some("cx"), 100))
            .unwrap()
    };
    wait("6 tasks sent", &|| {
        rtasks()
            .iter()
            .filter(|t| t.state == TaskState::Queued)
            .count()
            == 6
    });
    // the devices have them (their download runs 20 s)
    std::thread::sleep(Duration::from_millis(700));
    let holding = fleet
        .store
        .tx(|tx| rollout::freeze(tx, &cfg, fleet.now(), "cx"))
        .unwrap();
    assert_eq!(holding, 6);
    wait("every device to drop its task (held)", &|| {
        rtasks()
            .iter()
            .all(|t| t.state == TaskState::Pending && t.attempt == 2)
    });
    fleet
        .store
        .tx(|tx| rollout::resume(tx, fleet.now(), "cx"))
        .unwrap();
    wait("the held tasks to be sent again", &|| {
        rtasks().iter().all(|t| t.state == TaskState::Queued)
    });
    std::thread::sleep(Duration::from_millis(700));
    let a = fleet
        .store
        .tx(|tx| rollout::abort(tx, &cfg, fleet.now(), "cx"))
        .unwrap();
    assert_eq!((a.canceled, a.canceling, a.finishing), (0, 6, 0), "{a:?}");
    wait("every task canceled by its device", &|| {
        rtasks().iter().all(|t| t.state == TaskState::Canceled)
    });
    for t in rtasks() {
        let h = fleet.store.tx(|tx| tasks::history(tx, &t.id)).unwrap();
        assert!(
            h.iter().any(|e| e.3.contains("the device canceled it")),
            "{}: {h:?}",
            t.id
        );
    }
    stop.store(true, Ordering::SeqCst);
    let report = sim.join().unwrap();
    assert_eq!(report.canceled, 12, "{report:?}");
    assert_eq!(report.upgraded, 0);
    ticker.join().unwrap();
    mqtt.stop();
    server.stop();
}
