//! Downloads, registration, service install, upgrade, migrate and log upload
//! against a real HTTP server on loopback, with shell-script doubles of
//! `kubectl` and `dualroot` at the process boundary (they record their
//! arguments in a file).

mod common;

use agent_lib::agent::Agent;
use agent_lib::config::Config;
use agent_lib::download::{self, Request};
use agent_lib::engine::DualrootCli;
use agent_lib::journal::{State, TaskRow};
use agent_lib::registration;
use agent_lib::services::KubectlAdapter;
use agent_lib::tasks::{self, Outcome};
use common::http::{Resp, Server};
use common::script;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn req<'a>(url: &'a str, sha256: &'a str, dest: &'a Path, attempts: u32) -> Request<'a> {
    Request {
        url,
        sha256,
        dest,
        bearer: None,
        attempts,
        retry_delay: Duration::from_millis(10),
        ca_file: None,
    }
}

#[test]
fn download_interrupted_midway_resumes_from_offset_and_checks_hash() {
    let s = Server::start();
    let data = payload(300_000);
    s.add_file("/b.bin", data.clone(), "\"v1\"");
    s.cut("/b.bin", 100_000, 1);
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("b.bin");
    let url = s.url("/b.bin");
    let got = download::fetch(&req(&url, &sha(&data), &dest, 3)).unwrap();
    assert_eq!(std::fs::read(got).unwrap(), data);
    let reqs = s.requests_to("/b.bin");
    assert_eq!(reqs.len(), 2, "one cut request, one resumed");
    assert!(!reqs[0].headers.contains_key("range"));
    assert_eq!(reqs[1].headers["range"], "bytes=100000-");
    assert_eq!(reqs[1].headers["if-range"], "\"v1\"");
    assert!(
        !reqs[1].headers.contains_key("accept-encoding"),
        "no gzip with ranges"
    );
}

#[test]
fn download_restarts_when_etag_changed() {
    let s = Server::start();
    let old = payload(50_000);
    s.add_file("/c.bin", old, "\"old\"");
    s.cut("/c.bin", 20_000, 1);
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("c.bin");
    let url = s.url("/c.bin");
    let new: Vec<u8> = payload(60_000).into_iter().rev().collect();
    // first attempt gets 20 000 bytes of the old file, then the file changes
    assert!(download::fetch(&req(&url, &sha(&new), &dest, 1)).is_err());
    s.add_file("/c.bin", new.clone(), "\"new\"");
    let got = download::fetch(&req(&url, &sha(&new), &dest, 2)).unwrap();
    assert_eq!(std::fs::read(got).unwrap(), new);
    let reqs = s.requests_to("/c.bin");
    assert_eq!(reqs[1].headers["if-range"], "\"old\"");
}

#[test]
fn tampered_download_is_refused_with_cause() {
    let s = Server::start();
    let mut data = payload(10_000);
    let good = sha(&data);
    data[5000] ^= 0xff;
    s.add_file("/t.bin", data, "\"t\"");
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("t.bin");
    let url = s.url("/t.bin");
    let err = download::fetch(&req(&url, &good, &dest, 3)).unwrap_err();
    assert!(format!("{err:#}").contains("sha256 mismatch"), "{err:#}");
    assert!(!dest.exists());
    assert!(
        !d.path().join("t.bin.part").exists(),
        "tampered data removed"
    );
    assert_eq!(
        s.requests_to("/t.bin").len(),
        1,
        "a bad hash is not retried"
    );
}

#[test]
fn download_failure_reports_cause() {
    let s = Server::start();
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("x");
    let url = s.url("/missing");
    let err = download::fetch(&req(&url, &"0".repeat(64), &dest, 3)).unwrap_err();
    assert!(format!("{err:#}").contains("HTTP 404"), "{err:#}");
}

fn cfg_for(dir: &Path, extra: &str) -> Config {
    Config::parse(&format!(
        "device_id = \"dev-x\"\nfirmware_version = \"1.0\"\ndata_dir = \"{}\"\n{extra}\n\
         [logs]\npaths = []\njournalctl_lines = 0\n",
        dir.join("data").display()
    ))
    .unwrap()
}

#[test]
fn register_refresh_before_expiry_and_reregister_on_401() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start();
    let n = Arc::new(AtomicU32::new(0));
    let refresh_401 = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (n, refresh_401) = (n.clone(), refresh_401.clone());
        s.set_handler(move |r| {
            let auth = r.headers.get("authorization").cloned().unwrap_or_default();
            match r.path.as_str() {
                "/api/register" if auth == "Bearer REG-JWT" => {
                    let k = n.fetch_add(1, Ordering::SeqCst);
                    Some(Resp::json(200, &json!({"deviceId": "dev-42", "deviceToken": format!("tok{k}"), "expiresIn": 4})))
                }
                "/api/register" => Some(Resp::json(401, &json!({}))),
                "/api/token/refresh" if refresh_401.load(Ordering::SeqCst) => Some(Resp::json(401, &json!({}))),
                "/api/token/refresh" => {
                    let k = n.fetch_add(1, Ordering::SeqCst);
                    Some(Resp::json(200, &json!({"deviceId": "dev-42", "deviceToken": format!("tok{k}"), "expiresIn": 4})))
                }
                _ => None,
            }
        });
    }
    let d = tempfile::tempdir().unwrap();
    let mut cfg = cfg_for(
        d.path(),
        &format!(
            "[backend]\nurl = \"{}\"\nrefresh_fraction = 0.5",
            s.url("/api")
        ),
    );
    cfg.device_id = None;
    let t = registration::register(&cfg, "REG-JWT").unwrap();
    assert_eq!(t.device_id, "dev-42");
    assert_eq!(registration::device_id(&cfg).unwrap(), "dev-42");
    let mode = std::fs::metadata(cfg.token_file())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "token file mode");
    let reg = s.requests_to("/api/register");
    let hw: Value = serde_json::from_slice(&reg[0].body).unwrap();
    assert!(hw["hardware"]["memKiB"].as_u64().unwrap() > 0);

    // the refresh loop refreshes at half the lifetime (2 s), before the 4 s expiry
    let c2 = cfg.clone();
    std::thread::spawn(move || registration::refresh_loop(&c2));
    common::wait_until("token refresh", Duration::from_secs(10), || {
        !s.requests_to("/api/token/refresh").is_empty()
    });
    let refreshed = registration::load_token(&cfg.token_file())
        .unwrap()
        .unwrap();
    assert!(
        refreshed.obtained_at < t.expires_at.unwrap(),
        "refreshed before expiry"
    );
    assert_eq!(
        s.requests_to("/api/token/refresh")[0].headers["authorization"],
        "Bearer tok0"
    );

    // the device token is refused: register again with the stored register token
    refresh_401.store(true, Ordering::SeqCst);
    let t3 = registration::refresh(&cfg).unwrap();
    assert_eq!(s.requests_to("/api/register").len(), 2);
    assert_eq!(
        registration::load_token(&cfg.token_file())
            .unwrap()
            .unwrap(),
        t3
    );
}

fn agent_with_doubles(d: &Path) -> (Arc<Agent>, std::path::PathBuf) {
    let calls = d.join("calls.log");
    let kubectl = d.join("kubectl");
    // kubectl double: records its arguments; `get namespace` fails until created
    script(
        &kubectl,
        &format!(
            r#"echo "kubectl $*" >> {calls}
case "$1 $2" in
  "get namespace") [ -f {d}/ns-$3 ] || exit 1 ;;
  "create namespace") touch {d}/ns-$3 ;;
  "get deployments,statefulsets,daemonsets") r=1; [ -f {d}/unhealthy ] && r=0
     echo "{{\"items\":[{{\"kind\":\"Deployment\",\"spec\":{{\"replicas\":1}},\"status\":{{\"readyReplicas\":$r}}}}]}}" ;;
esac
exit 0"#,
            calls = calls.display(),
            d = d.display()
        ),
    );
    let import = d.join("ctr");
    script(
        &import,
        &format!("echo \"import $*\" >> {}", calls.display()),
    );
    let dualroot = d.join("dualroot");
    // dualroot double: state in files; records arguments
    script(
        &dualroot,
        &format!(
            r#"echo "dualroot $*" >> {calls}
case "$1 $2" in
  "slot status") cat {d}/slot-status.json ;;
  "slot install") cat {d}/install.json ;;
  "bundle verify") [ -f {d}/bad-signature ] && {{ echo "bad signature" >&2; exit 1; }} ; exit 0 ;;
esac
exit 0"#,
            calls = calls.display(),
            d = d.display()
        ),
    );
    let reboot = d.join("reboot");
    script(&reboot, &format!("echo reboot >> {}", calls.display()));
    let cfg = cfg_for(
        d,
        &format!(
            "[upgrade]\nreboot_command = [\"{}\"]\nboot_id_file = \"{}\"\nhealth_timeout_secs = 1",
            reboot.display(),
            d.join("boot_id").display()
        ),
    );
    let engine = Arc::new(DualrootCli {
        bin: dualroot.display().to_string(),
        reboot_command: cfg.upgrade.reboot_command.clone(),
    });
    let services = Arc::new(KubectlAdapter {
        kubectl: vec![kubectl.display().to_string()],
        image_import: vec![import.display().to_string()],
    });
    let a = Agent::with_parts(cfg, "dev-x".into(), engine, services).unwrap();
    (a, calls)
}

fn row(id: &str, ty: &str, body: Value) -> TaskRow {
    TaskRow {
        task_id: id.into(),
        task_type: ty.into(),
        body: body.to_string(),
        state: State::Running,
        attempts: 1,
        received_at_ms: 0,
    }
}

fn done(o: Outcome) -> Value {
    match o {
        Outcome::Done(v) => v,
        Outcome::Failed(e, v) => panic!("failed: {e} {v}"),
        Outcome::Suspended => panic!("suspended"),
    }
}

fn calls(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn service_package() -> Vec<u8> {
    let mut out = Vec::new();
    {
        let enc = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
        let mut b = tar::Builder::new(enc);
        for (name, data) in [
            ("images/web.tar", "image-bytes"),
            ("manifests/01-deploy.yaml", "kind: Deployment"),
            ("manifests/02-svc.yaml", "kind: Service"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_bytes()).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
    }
    out
}

#[test]
fn install_service_uses_namespace_images_manifests_and_is_idempotent() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start();
    let pkg = service_package();
    s.add_file("/svc.tar.gz", pkg.clone(), "\"s1\"");
    let (agent, calls_log) = agent_with_doubles(d.path());
    let body = json!({"serviceCode": "Billing", "version": "2.1", "url": s.url("/svc.tar.gz"), "sha256": sha(&pkg)});
    let v = done(tasks::run(
        &agent,
        &row("i1", "installService", body.clone()),
        false,
    ));
    assert_eq!(v["namespace"], "billing");
    assert_eq!(v["changed"], true);
    let c = calls(&calls_log);
    assert!(
        c.contains(&"kubectl get namespace billing -o name".to_string()),
        "{c:?}"
    );
    assert!(
        c.contains(&"kubectl create namespace billing".to_string()),
        "{c:?}"
    );
    assert!(
        c.iter()
            .any(|l| l.starts_with("import ") && l.ends_with("images/web.tar")),
        "{c:?}"
    );
    let applies: Vec<_> = c
        .iter()
        .filter(|l| l.starts_with("kubectl apply -n billing -f "))
        .collect();
    assert_eq!(applies.len(), 2);
    assert!(applies[0].ends_with("01-deploy.yaml") && applies[1].ends_with("02-svc.yaml"));

    // second install of the same version: no-op success, no adapter call
    let n = calls(&calls_log).len();
    let v = done(tasks::run(
        &agent,
        &row("i2", "installService", body),
        false,
    ));
    assert_eq!(v["changed"], false);
    assert_eq!(calls(&calls_log).len(), n);
    assert_eq!(
        s.requests_to("/svc.tar.gz").len(),
        1,
        "not downloaded again"
    );

    // heartbeat carries per-service health
    let hb = tasks::heartbeat(&agent);
    assert_eq!(hb["services"][0]["code"], "billing");
    assert_eq!(hb["services"][0]["health"], "healthy");

    let v = done(tasks::run(
        &agent,
        &row("u1", "uninstallService", json!({"serviceCode": "Billing"})),
        false,
    ));
    assert_eq!(v["changed"], true);
    assert!(calls(&calls_log)
        .iter()
        .any(|l| l.starts_with("kubectl delete namespace billing --ignore-not-found")));
    let v = done(tasks::run(
        &agent,
        &row("u2", "uninstallService", json!({"serviceCode": "Billing"})),
        false,
    ));
    assert_eq!(v["changed"], false, "uninstall is idempotent");
}

/// The double's `slot status` (and `slot install`) answers, in the contract's shape.
fn set_status(d: &Path, booted: &str, state: &str, fallback: bool, version: &str) {
    std::fs::write(
        d.join("slot-status.json"),
        common::slot_status_json(booted, state, fallback, version),
    )
    .unwrap();
    std::fs::write(
        d.join("install.json"),
        common::install_report_json("b", "13"),
    )
    .unwrap();
}

fn upgrade_fixture(d: &Path) -> (Server, Value) {
    let s = Server::start();
    let bundle = payload(20_000);
    s.add_file("/os-13.bundle", bundle.clone(), "\"b\"");
    set_status(d, "a", "good", false, "11");
    let body = json!({"version": "13", "url": s.url("/os-13.bundle"), "sha256": sha(&bundle)});
    (s, body)
}

#[test]
fn upgrade_reports_success_only_after_new_slot_confirmed() {
    let d = tempfile::tempdir().unwrap();
    let (agent, calls_log) = agent_with_doubles(d.path());
    let (_s, body) = upgrade_fixture(d.path());
    let boot = d.path().join("boot_id");
    std::fs::write(&boot, "boot-1").unwrap();
    let t = row("up1", "upgrade", body);
    assert!(matches!(tasks::run(&agent, &t, false), Outcome::Suspended));
    let c = calls(&calls_log);
    let order: Vec<_> = c
        .iter()
        .filter(|l| !l.contains("slot status"))
        .cloned()
        .collect();
    assert!(order[0].starts_with("dualroot bundle verify"), "{order:?}");
    assert!(order[1].starts_with("dualroot slot install"), "{order:?}");
    assert_eq!(order[2], "dualroot slot switch b");
    assert_eq!(order[3], "reboot");
    // the agent restarts in the same boot (no reboot happened yet): reboot again
    assert!(matches!(tasks::run(&agent, &t, true), Outcome::Suspended));
    // after the reboot: booted B, not a fallback → confirm, then success
    std::fs::write(&boot, "boot-2").unwrap();
    set_status(d.path(), "b", "trying", false, "13");
    let v = done(tasks::run(&agent, &t, true));
    assert_eq!(v["status"], "upgraded");
    assert_eq!(v["version"], "13");
    assert_eq!(v["previousVersion"], "11");
    assert!(calls(&calls_log).contains(&"dualroot slot confirm".to_string()));
}

#[test]
fn upgrade_reports_rolled_back_with_running_version() {
    let d = tempfile::tempdir().unwrap();
    let (agent, calls_log) = agent_with_doubles(d.path());
    let (_s, body) = upgrade_fixture(d.path());
    let t = row("up2", "upgrade", body);
    assert!(matches!(tasks::run(&agent, &t, false), Outcome::Suspended));
    // pretend a reboot happened (different boot id) and GRUB fell back to A
    let mut st: tasks::UpgradeState =
        serde_json::from_str(&agent.journal.kv_get("upgrade:up2").unwrap().unwrap()).unwrap();
    st.boot_id = Some("an-earlier-boot".into());
    agent
        .journal
        .kv_set("upgrade:up2", &serde_json::to_string(&st).unwrap())
        .unwrap();
    set_status(d.path(), "a", "good", true, "11");
    match tasks::run(&agent, &t, true) {
        Outcome::Failed(e, v) => {
            assert!(e.contains("rolled back"), "{e}");
            assert_eq!(v["status"], "rolled back");
            assert_eq!(v["runningVersion"], "11");
        }
        _ => panic!("expected rolled back"),
    }
    assert!(!calls(&calls_log).contains(&"dualroot slot confirm".to_string()));
}

#[test]
fn second_upgrade_refused_while_a_switch_waits_for_reboot() {
    let d = tempfile::tempdir().unwrap();
    let (agent, _calls) = agent_with_doubles(d.path());
    let (_s, body) = upgrade_fixture(d.path());
    assert!(matches!(
        tasks::run(&agent, &row("upA", "upgrade", body.clone()), false),
        Outcome::Suspended
    ));
    match tasks::run(&agent, &row("upB", "upgrade", body), false) {
        Outcome::Failed(e, _) => assert!(e.contains("another upgrade (upA)"), "{e}"),
        _ => panic!("second upgrade must be refused"),
    }
}

#[test]
fn upgrade_bad_bundle_signature_fails_before_install() {
    let d = tempfile::tempdir().unwrap();
    let (agent, calls_log) = agent_with_doubles(d.path());
    let (_s, body) = upgrade_fixture(d.path());
    std::fs::write(d.path().join("bad-signature"), "").unwrap();
    match tasks::run(&agent, &row("up3", "upgrade", body), false) {
        Outcome::Failed(e, _) => assert!(e.contains("bad signature"), "{e}"),
        _ => panic!("expected failure"),
    }
    assert!(!calls(&calls_log).iter().any(|l| l.contains("slot install")));
}

#[test]
fn upgrade_predownload_time_is_drawn_in_window_and_persisted() {
    let d = tempfile::tempdir().unwrap();
    let (agent, _calls) = agent_with_doubles(d.path());
    let (_s, mut body) = upgrade_fixture(d.path());
    let now = registration::now_secs();
    body["window"] = json!({"start": now + 2, "end": now + 3});
    let t = row("up4", "upgrade", body);
    let a2 = agent.clone();
    let t2 = t.clone();
    let h = std::thread::spawn(move || tasks::run(&a2, &t2, false));
    common::wait_until("state persisted", Duration::from_secs(5), || {
        agent.journal.kv_get("upgrade:up4").unwrap().is_some()
    });
    let st: tasks::UpgradeState =
        serde_json::from_str(&agent.journal.kv_get("upgrade:up4").unwrap().unwrap()).unwrap();
    assert!((now + 2..=now + 3).contains(&st.predownload_at));
    assert!(matches!(h.join().unwrap(), Outcome::Suspended));
    assert!(
        registration::now_secs() >= st.predownload_at,
        "waited for the drawn time"
    );
    let st2: tasks::UpgradeState =
        serde_json::from_str(&agent.journal.kv_get("upgrade:up4").unwrap().unwrap()).unwrap();
    assert_eq!(st2.predownload_at, st.predownload_at, "kept across phases");
}

#[test]
fn migrate_downloads_verifies_and_stages() {
    let d = tempfile::tempdir().unwrap();
    let (agent, calls_log) = agent_with_doubles(d.path());
    let (_s, mut body) = upgrade_fixture(d.path());
    body["plan"] = json!("[target]\nvg = \"VA\"\n");
    done(tasks::run(&agent, &row("m1", "migrate", body), false));
    let c = calls(&calls_log);
    let stage = c
        .iter()
        .find(|l| l.starts_with("dualroot stage "))
        .expect("stage called");
    assert!(
        stage.contains("--plan") && stage.contains("plan-m1.toml"),
        "{stage}"
    );
    assert!(
        c.iter()
            .position(|l| l.starts_with("dualroot bundle verify"))
            < c.iter().position(|l| l.starts_with("dualroot stage"))
    );
}

#[test]
fn migrate_without_plan_is_refused_before_stage() {
    let d = tempfile::tempdir().unwrap();
    let (agent, calls_log) = agent_with_doubles(d.path());
    let (_s, body) = upgrade_fixture(d.path());
    let out = tasks::run(&agent, &row("m2", "migrate", body), false);
    let msg = match out {
        Outcome::Failed(m, _) => m,
        _ => panic!("expected the task to fail"),
    };
    assert!(msg.contains("needs `plan`"), "{msg}");
    assert!(
        !calls(&calls_log)
            .iter()
            .any(|l| l.starts_with("dualroot stage")),
        "stage must not run without a plan (it would always fail)"
    );
}

#[test]
fn collect_logs_uploads_archive() {
    let d = tempfile::tempdir().unwrap();
    let (agent, _calls) = agent_with_doubles(d.path());
    let s = Server::start();
    s.set_handler(|r| (r.method == "PUT").then(|| Resp::json(201, &json!({}))));
    let v = done(tasks::run(
        &agent,
        &row("l1", "collectLogs", json!({"uploadUrl": s.url("/up/l1")})),
        false,
    ));
    let up = s.requests_to("/up/l1");
    assert_eq!(up.len(), 1);
    assert_eq!(
        up[0].headers["x-content-sha256"],
        v["sha256"].as_str().unwrap()
    );
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&up[0].body[..]));
    let names: Vec<String> = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(
        names.contains(&"agent-status.json".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"agent-tasks.json".to_string()), "{names:?}");
}

#[test]
fn register_command_of_the_binary_stores_token_0600() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start();
    s.set_handler(|r| {
        (r.path == "/api/register"
            && r.headers.get("authorization").map(String::as_str) == Some("Bearer JWT1"))
        .then(|| {
            Resp::json(
                200,
                &json!({"deviceId": "dev-cli", "deviceToken": "t", "expiresAt": 1767229200}),
            )
        })
    });
    let d = tempfile::tempdir().unwrap();
    let conf = d.path().join("agent.toml");
    std::fs::write(
        &conf,
        format!(
            "data_dir = \"{}\"\n[backend]\nurl = \"{}\"\n",
            d.path().join("data").display(),
            s.url("/api")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dualroot-agent"))
        .args(["register", "--token", "JWT1", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("dev-cli"));
    let tok = d.path().join("data/token.json");
    assert_eq!(
        std::fs::metadata(&tok).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let t = registration::load_token(&tok).unwrap().unwrap();
    // server said: expires 1 h after its Date header (2026-01-01 00:00:00 GMT)
    assert_eq!(t.expires_at.unwrap() - t.obtained_at, 3600);
    assert_eq!(
        std::fs::metadata(d.path().join("data/register-token"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}

#[test]
fn downloads_run_one_at_a_time() {
    use std::sync::atomic::AtomicUsize;
    let s = Server::start();
    let active = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let data = payload(1000);
    {
        let (active, max_seen, data) = (active.clone(), max_seen.clone(), data.clone());
        s.set_handler(move |r| {
            if !r.path.starts_with("/slow-") {
                return None;
            }
            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
            max_seen.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
            active.fetch_sub(1, Ordering::SeqCst);
            Some(Resp {
                status: 200,
                headers: vec![],
                body: data.clone(),
                cut_after: None,
            })
        });
    }
    let d = tempfile::tempdir().unwrap();
    let hash = sha(&data);
    let handles: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|n| {
            let url = s.url(&format!("/slow-{n}"));
            let dest = d.path().join(n);
            let hash = hash.clone();
            std::thread::spawn(move || download::fetch(&req(&url, &hash, &dest, 1)).unwrap())
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(max_seen.load(Ordering::SeqCst), 1, "downloads overlapped");
}

#[test]
fn upgrade_not_confirmed_when_services_stay_unhealthy() {
    let d = tempfile::tempdir().unwrap();
    let (agent, calls_log) = agent_with_doubles(d.path());
    let s = Server::start();
    let pkg = service_package();
    s.add_file("/svc.tar.gz", pkg.clone(), "\"s1\"");
    let svc = json!({"serviceCode": "web", "version": "1", "url": s.url("/svc.tar.gz"), "sha256": sha(&pkg)});
    done(tasks::run(&agent, &row("i1", "installService", svc), false));
    let (_s2, body) = upgrade_fixture(d.path());
    std::fs::write(d.path().join("boot_id"), "boot-1").unwrap();
    let t = row("up5", "upgrade", body);
    assert!(matches!(tasks::run(&agent, &t, false), Outcome::Suspended));
    std::fs::write(d.path().join("boot_id"), "boot-2").unwrap();
    set_status(d.path(), "b", "trying", false, "13");
    std::fs::write(d.path().join("unhealthy"), "").unwrap();
    match tasks::run(&agent, &t, true) {
        Outcome::Failed(e, v) => {
            assert!(e.contains("not healthy"), "{e}");
            assert_eq!(v["status"], "unhealthy");
        }
        _ => panic!("expected failure"),
    }
    assert!(!calls(&calls_log).contains(&"dualroot slot confirm".to_string()));
    // a later upgrade is not blocked by this one
    let (_s3, body) = upgrade_fixture(d.path());
    assert!(matches!(
        tasks::run(&agent, &row("up6", "upgrade", body), false),
        Outcome::Suspended
    ));
}

#[test]
fn unregistered_agent_registers_at_start_with_shipped_register_token() {
    let s = Server::start();
    s.set_handler(|r| {
        (r.path == "/api/register").then(|| {
            Resp::json(
                200,
                &json!({"deviceId": "dev-auto", "deviceToken": "t", "expiresIn": 3600}),
            )
        })
    });
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("reg.jwt"), "JWT\n").unwrap();
    let cfg = Config::parse(&format!(
        "data_dir = \"{}\"\n[backend]\nurl = \"{}\"\nregister_token_file = \"{}\"\n",
        d.path().join("data").display(),
        s.url("/api"),
        d.path().join("reg.jwt").display()
    ))
    .unwrap();
    assert!(registration::device_id(&cfg).is_err());
    registration::ensure_registered(&cfg).unwrap();
    assert_eq!(registration::device_id(&cfg).unwrap(), "dev-auto");
    assert_eq!(
        s.requests_to("/api/register")[0].headers["authorization"],
        "Bearer JWT"
    );
    registration::ensure_registered(&cfg).unwrap();
    assert_eq!(s.requests_to("/api/register").len(), 1, "registered once");
}

#[test]
fn https_download_and_registration_with_private_ca() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let s = Server::start_tls(&cert.pem(), &key.serialize_pem());
    let d = tempfile::tempdir().unwrap();
    let ca_file = d.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let data = payload(200_000);
    s.add_file("/b.bin", data.clone(), "\"v\"");
    s.cut("/b.bin", 70_000, 1);
    let url = s.url("/b.bin");
    assert!(url.starts_with("https://"));
    let dest = d.path().join("b.bin");
    let hash = sha(&data);
    let mut r = req(&url, &hash, &dest, 3);
    // without the private CA the server is not trusted
    assert!(download::fetch(&r).is_err());
    r.ca_file = Some(&ca_file);
    assert_eq!(std::fs::read(download::fetch(&r).unwrap()).unwrap(), data);
    assert_eq!(
        s.requests_to("/b.bin").last().unwrap().headers["range"],
        "bytes=70000-"
    );

    s.set_handler(|r| {
        (r.path == "/api/register").then(|| {
            Resp::json(
                200,
                &json!({"deviceId": "dev-tls", "deviceToken": "t", "expiresIn": 60}),
            )
        })
    });
    let cfg = Config::parse(&format!(
        "data_dir = \"{}\"\n[backend]\nurl = \"{}\"\nca_file = \"{}\"\n",
        d.path().join("data").display(),
        s.url("/api"),
        ca_file.display()
    ))
    .unwrap();
    assert_eq!(
        registration::register(&cfg, "JWT").unwrap().device_id,
        "dev-tls"
    );
}
