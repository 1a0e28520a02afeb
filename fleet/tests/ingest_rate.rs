//! Heartbeat intake rate straight into the store, no broker (ignored by
//! default: `cargo test -p dualroot-fleet --release --test ingest_rate -- --ignored --nocapture`).

mod common;

use common::*;

#[test]
#[ignore]
fn heartbeat_intake_rate() {
    each_store("rate", |h| {
        let devs: Vec<String> = (0..500).map(|_| h.register()).collect();
        let msgs: Vec<(String, String)> = (0..5000)
            .map(|i| {
                let d = &devs[i % devs.len()];
                let key = format!("hb-rate-{i}");
                (
                    format!("{PREFIX}/{d}/heartbeat"),
                    common::result_message(
                        d,
                        &key,
                        Some(&key),
                        "heartbeat",
                        dualroot_api::wire::Status::Done,
                        common::heartbeat_json(d, "1.0", Some(("a", true)), None, &[]),
                        None,
                        1,
                    ),
                )
            })
            .collect();
        let t0 = std::time::Instant::now();
        for chunk in msgs.chunks(250) {
            let refs: Vec<(&str, &[u8])> = chunk
                .iter()
                .map(|(t, p)| (t.as_str(), p.as_bytes()))
                .collect();
            for r in h.fleet.ingest_batch(&refs) {
                r.unwrap();
            }
        }
        let s = t0.elapsed().as_secs_f64();
        println!(
            "{}: {} heartbeats in {s:.2} s = {:.0}/s",
            h.name,
            msgs.len(),
            msgs.len() as f64 / s
        );
    });
}

/// What one rollout turn costs with 50,000 devices in the store and 5,000 in
/// the rollout (ignored by default: `cargo test -p dualroot-fleet --release
/// --test ingest_rate -- --ignored --nocapture rollout_turn`).
#[test]
#[ignore]
fn rollout_turn_cost() {
    use dualroot_fleet::rollout::{self, BundleKind, Spec, Wave};
    each_store("turn", |h| {
        let now = h.now();
        let cfg = h.fleet.cfg.clone();
        let other: std::collections::BTreeMap<String, String> =
            [("group".to_string(), "other".to_string())].into();
        let sim: std::collections::BTreeMap<String, String> =
            [("group".to_string(), "sim".to_string())].into();
        for (first, n, labels) in [(0, 45_000, &other), (45_000, 5_000, &sim)] {
            let mut done = 0;
            while done < n {
                let k = (n - done).min(5000);
                h.fleet
                    .store
                    .tx(|tx| dualroot_fleet::devices::seed(tx, &cfg, now, first + done, k, labels))
                    .unwrap();
                done += k;
            }
        }
        let spec = Spec {
            id: "turn".into(),
            kind: BundleKind::Image,
            version: "2.0".into(),
            url: "https://f/b".into(),
            sha256: "00".into(),
            size: None,
            plan: None,
            plan_signature: None,
            selector: rollout::Selector {
                labels: sim.clone(),
                ..Default::default()
            },
            waves: [1, 10, 50, 100]
                .iter()
                .map(|p| Wave {
                    count: None,
                    percent: Some(*p),
                    min_successes: None,
                })
                .collect(),
            canary_label: "canary".into(),
            soak_ms: 3 * cfg.heartbeat_interval_ms,
            max_failures: 10,
            max_failure_pct: 2,
            in_flight_cap: 100,
            download_window: None,
            install_window: None,
        };
        h.fleet
            .store
            .tx(|tx| rollout::create(tx, &cfg, now, &spec))
            .unwrap();
        h.fleet
            .store
            .tx(|tx| rollout::start(tx, now, "turn"))
            .unwrap();
        let mut times = Vec::new();
        for i in 0..6 {
            if i == 1 {
                h.advance(2 * MIN); // past the scan overlap
            }
            let now = h.now();
            let t0 = std::time::Instant::now();
            let turn = h
                .fleet
                .store
                .tx(|tx| rollout::tick(tx, &cfg, now, "turn"))
                .unwrap();
            times.push((t0.elapsed().as_secs_f64() * 1000.0, turn));
        }
        for (i, (ms, turn)) in times.iter().enumerate() {
            println!("{}: turn {i}: {ms:.1} ms, {turn:?}", h.name);
        }
    });
}
