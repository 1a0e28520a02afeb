//! Benchmark (not part of the normal test run): N tasks with D % duplicates
//! through a real mosquitto into the agent binary. Run with
//! `agent-lib/bench/tasks.sh` (or `cargo test -p agent-lib --release --test
//! bench -- --ignored --nocapture`). Env: BENCH_TASKS (10000), BENCH_DUP_PCT (10).

mod common;

use common::*;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

fn env_num(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[test]
#[ignore]
fn bench_tasks_through_mosquitto() {
    let n = env_num("BENCH_TASKS", 10_000);
    let dup_pct = env_num("BENCH_DUP_PCT", 10);
    let d = tempfile::tempdir().unwrap();
    let broker = Broker::start(d.path());
    let backend = Backend::start(broker.port);
    let mut agent = AgentProc::new(d.path(), "bench-dev", broker.port, AgentOpts::default());
    agent.log_level = "debug".into();
    agent.start("");
    let marker = d.path().join("marker");
    let ids: Vec<String> = (0..n).map(|i| format!("b-{i:06}")).collect();
    let mut order: Vec<usize> = (0..n).collect();
    let dups = n * dup_pct / 100;
    for _ in 0..dups {
        // a duplicate of an earlier task, published later
        let at = fastrand::usize(1..=order.len());
        let of = order[fastrand::usize(0..at)];
        order.insert(at, of);
    }
    let start = Instant::now();
    for &i in &order {
        backend.publish_task(
            "bench-dev",
            &ids[i],
            "test.sleep",
            json!({"marker": marker}),
        );
    }
    let published = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    let want: HashSet<&str> = ids.iter().map(String::as_str).collect();
    loop {
        let got: HashSet<String> = backend
            .all()
            .iter()
            .filter(|v| v["status"] == "done")
            .filter_map(|v| v["taskId"].as_str().map(str::to_string))
            .collect();
        if want.iter().all(|id| got.contains(*id)) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = start.elapsed();
    // let late duplicates and acks settle
    std::thread::sleep(Duration::from_secs(2));

    let mut runs: HashMap<String, usize> = HashMap::new();
    for l in marker_lines(&marker) {
        *runs.entry(l).or_default() += 1;
    }
    let double_runs = runs.values().filter(|&&c| c > 1).count();
    let results: HashSet<String> = backend
        .all()
        .iter()
        .filter(|v| v["status"] == "done")
        .filter_map(|v| v["taskId"].as_str().map(str::to_string))
        .collect();
    let lost = ids.iter().filter(|id| !results.contains(*id)).count();
    let mut lat: Vec<u64> = agent
        .log_text()
        .lines()
        .filter_map(|l| {
            let rest = l.split(" journaled ").nth(1)?;
            rest.split(' ').next()?.parse().ok()
        })
        .collect();
    lat.sort_unstable();
    println!(
        "tasks: {n} unique + {dups} duplicates = {} messages",
        order.len()
    );
    println!("published in {:.2} s", published.as_secs_f64());
    println!("double runs: {double_runs}");
    println!("lost results: {lost}");
    println!(
        "receipt->journal latency (us, commit incl. fsync): p50 {} p99 {} max {} (n={})",
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or(0),
        lat.len()
    );
    println!(
        "throughput: {:.0} tasks/s ({} unique tasks, all results in {:.2} s)",
        n as f64 / elapsed.as_secs_f64(),
        n,
        elapsed.as_secs_f64()
    );
    assert_eq!(double_runs, 0);
    assert_eq!(lost, 0);
}
