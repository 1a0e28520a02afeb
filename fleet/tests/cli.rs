//! The `dualroot-fleet` binary's client commands against the HTTP API of a
//! controller (SQLite, manual clock, no broker needed for these).

mod common;

use common::*;
use dualroot_fleet::http;
use serde_json::{json, Value};
use std::process::Command;
use std::sync::Arc;

fn fleet_cli(port: u16, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dualroot-fleet"));
    c.arg("--api").arg(format!("http://127.0.0.1:{port}"));
    if let Some(t) = token {
        c.env("DUALROOT_FLEET_TOKEN", t);
    }
    let out = c.args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_out(port: u16, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (ok, out, err) = fleet_cli(port, Some("op-secret"), &a);
    assert!(ok, "dualroot-fleet {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn rollout_devices_and_tasks_commands() {
    let mut cfg = config();
    cfg.operator_token = Some("op-secret".into());
    let h = sqlite_harness(cfg);
    let fleet = Arc::new(h.fleet);
    let hh = H2 {
        fleet: fleet.clone(),
    };
    let a = hh.ab_device("1.0", "b0");
    let server = http::Server::start(fleet.clone(), "127.0.0.1:0", 2).unwrap();
    let port = server.port;

    // the operator token is required
    let (ok, _, err) = fleet_cli(port, None, &["devices", "list"]);
    assert!(!ok);
    assert!(
        err.contains("401") && err.contains("operator token"),
        "{err}"
    );

    let list = json_out(port, &["devices", "list"]);
    assert_eq!(list[0]["id"], a.as_str());
    assert_eq!(list[0]["layout"], "dualroot");
    let show = json_out(port, &["devices", "show", &a]);
    assert_eq!(show["device"]["bootId"], "b0");
    json_out(port, &["devices", "label", &a, "site=lab", "canary=yes"]);
    let show = json_out(port, &["devices", "show", &a]);
    assert_eq!(
        show["device"]["labels"],
        json!({"site": "lab", "canary": "yes"})
    );
    let (ok, _, err) = fleet_cli(port, Some("op-secret"), &["devices", "label", &a, "oops"]);
    assert!(!ok && err.contains("not key=value"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("r.json");
    std::fs::write(
        &spec,
        json!({"id": "r1", "kind": "image", "version": "2.0", "url": "https://f/x", "sha256": "00",
               "waves": [{"percent": 100}], "soakMs": 180000, "maxFailures": 1, "maxFailurePct": 50,
               "inFlightCap": 5})
        .to_string(),
    )
    .unwrap();
    let created = json_out(port, &["rollout", "create", spec.to_str().unwrap()]);
    assert_eq!(created["state"], "draft");
    let started = json_out(port, &["rollout", "start", "r1"]);
    assert_eq!(started["state"], "running");
    fleet.tick().unwrap();
    let st = json_out(port, &["rollout", "status", "r1"]);
    assert_eq!(st["inFlight"], 1);
    assert_eq!(st["gate"]["verdict"], "waiting");
    // the summary says why the gate is not met
    let (ok, out, _) = fleet_cli(port, Some("op-secret"), &["rollout", "status", "r1"]);
    assert!(ok);
    assert!(
        out.contains("gate not met: wave 1: 0 of 1 successes needed (1 in flight)"),
        "{out}"
    );
    let tasks = json_out(port, &["tasks", "list", "--rollout", "r1"]);
    assert_eq!(tasks[0]["taskType"], "upgrade");
    assert_eq!(tasks[0]["state"], "queued");
    let frozen = json_out(port, &["rollout", "freeze", "r1"]);
    assert_eq!(frozen["state"], "frozen");
    let (ok, _, err) = fleet_cli(port, Some("op-secret"), &["rollout", "freeze", "r1"]);
    assert!(
        !ok && err.contains("409") && err.contains("only a running one can be frozen"),
        "{err}"
    );
    assert_eq!(
        json_out(port, &["rollout", "resume", "r1"])["state"],
        "running"
    );
    let aborted = json_out(port, &["rollout", "abort", "r1"]);
    // the queued task was sent: its device is asked to cancel it
    assert_eq!(
        (
            aborted["state"].as_str(),
            aborted["canceled"].as_i64(),
            aborted["canceling"].as_i64()
        ),
        (Some("aborted"), Some(0), Some(1))
    );
    let listed = json_out(port, &["rollout", "list"]);
    assert_eq!(listed, json!([{"id": "r1", "state": "aborted"}]));
    // a bad spec is refused with its reason
    std::fs::write(&spec, json!({"id": "r2", "kind": "image"}).to_string()).unwrap();
    let (ok, _, err) = fleet_cli(
        port,
        Some("op-secret"),
        &["rollout", "create", spec.to_str().unwrap()],
    );
    assert!(
        !ok && err.contains("400") && err.contains("missing field"),
        "{err}"
    );
    let (ok, _, err) = fleet_cli(port, Some("op-secret"), &["devices", "show", "nope"]);
    assert!(!ok && err.contains("404"), "{err}");
    server.stop();
}

/// The harness's helpers on a shared fleet (the server holds it too).
struct H2 {
    fleet: Arc<dualroot_fleet::Fleet>,
}

impl H2 {
    fn ab_device(&self, v: &str, boot: &str) -> String {
        let now = self.fleet.now();
        let cfg = self.fleet.cfg.clone();
        let id = self
            .fleet
            .store
            .tx(|tx| dualroot_fleet::devices::register(tx, &cfg, now, REGISTER_TOKEN, &json!({})))
            .unwrap()
            .unwrap()
            .device_id;
        let hb = common::result_message(
            &id,
            "hb-1",
            Some("hb-1"),
            "heartbeat",
            dualroot_api::wire::Status::Done,
            common::heartbeat_json(&id, v, Some(("a", true)), None, &[]),
            None,
            1,
        );
        self.fleet
            .ingest(&format!("{PREFIX}/{id}/heartbeat"), hb.as_bytes())
            .unwrap();
        let bc = common::result_message(
            &id,
            &format!("boot-confirmed-{boot}"),
            None,
            "bootConfirmed",
            dualroot_api::wire::Status::Done,
            json!({"slot": "a", "version": v}),
            None,
            1,
        );
        self.fleet
            .ingest(&format!("{PREFIX}/{id}/results"), bc.as_bytes())
            .unwrap();
        id
    }
}

/// `GET /api/v1/devices` pages by `limit` and `cursor` (the last id of the
/// previous page) on both stores; `devices list` follows every page.
#[test]
fn devices_are_listed_in_pages() {
    each_store("paging", |h| {
        let mut ids: Vec<String> = (0..5).map(|_| h.register()).collect();
        ids.sort();
        let get = |q: &[(&str, &str)]| {
            let r = http::Request {
                method: "GET",
                path: "/api/v1/devices",
                query: q
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                bearer: None,
                body: b"",
            };
            http::route(&h.fleet, &r)
        };
        let mut seen = Vec::new();
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            let (code, v) = get(&[("limit", "2"), ("cursor", &cursor)]);
            assert_eq!(code, 200, "{v}");
            let page = v["devices"].as_array().unwrap();
            assert!(page.len() <= 2);
            seen.extend(page.iter().map(|d| d["id"].as_str().unwrap().to_string()));
            pages += 1;
            match v["nextCursor"].as_str() {
                Some(c) => cursor = c.to_string(),
                None => break,
            }
        }
        assert_eq!((seen, pages), (ids.clone(), 3));
        // the default page holds them all; a bad limit is refused
        let (_, v) = get(&[]);
        assert_eq!(v["devices"].as_array().unwrap().len(), 5);
        assert_eq!(v["nextCursor"], Value::Null);
        for bad in ["0", "-1", "x", "999999"] {
            let (code, v) = get(&[("limit", bad)]);
            assert_eq!(code, 400, "limit {bad}: {v}");
        }
    });
}

/// `POST /api/v1/tasks/{id}/cancel`: a sent task gets a cancel for its
/// device; one past the point of no return is refused with 409.
#[test]
fn an_operator_cancels_one_task() {
    each_store("task_cancel", |h| {
        let d = h.ab_device("1.0", "b0");
        let t = h.create(
            &d,
            "upgrade",
            json!({"version": "2.0", "url": "https://f/b", "sha256": "00"}),
            Some("2.0"),
        );
        let call = |method: &'static str, path: &str| {
            http::route(
                &h.fleet,
                &http::Request {
                    method,
                    path,
                    query: Default::default(),
                    bearer: None,
                    body: b"",
                },
            )
        };
        let post = |id: &str| call("POST", &format!("/api/v1/tasks/{id}/cancel"));
        let (code, v) = post(&t.id);
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["cancel"], "asked: the device answers");
        assert_eq!(v["task"]["cancel"], "abort");
        assert!(h
            .sent_tasks(&d)
            .iter()
            .any(|m| m["taskType"] == "cancel" && m["body"]["taskId"] == t.wire_id.as_str()));
        // the device had started installing: refused, it runs to its end
        let w = t.wire_id.as_str();
        h.send(
            &d,
            &dualroot_api::wire::Progress::Installing.ack_key(w),
            Some(w),
            "upgrade",
            dualroot_api::wire::Status::Progress,
            json!({"state": "installing"}),
            None,
        );
        let (code, v) = post(&t.id);
        assert_eq!(code, 409, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("past the point of no return"),
            "{v}"
        );
        let (code, _) = post("nope");
        assert_eq!(code, 404);
        // the task's own page: its state changes in order, with times
        let get = |id: &str| call("GET", &format!("/api/v1/tasks/{id}"));
        let (code, v) = get(&t.id);
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["task"]["state"], "installing", "{v}");
        let to: Vec<&str> = v["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["to"].as_str().unwrap())
            .collect();
        assert_eq!(to.last(), Some(&"installing"), "{v}");
        assert!(to.contains(&"queued"), "{v}");
        assert!(v["history"][0]["at"].as_i64().unwrap() > 0, "{v}");
        assert_eq!(get("nope").0, 404);
    });
}
