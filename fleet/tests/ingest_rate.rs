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
                    common::result_message(d, &key, Some(&key), "heartbeat", dualroot_api::wire::Status::Done,
                        serde_json::json!({"deviceId": d, "firmwareVersion": "1.0", "slot": {"booted": "a", "primary": "a", "fallback": false, "bootedGood": true}, "services": []}),
                        None, 1),
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
