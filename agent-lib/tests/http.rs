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
        max_bytes: u64::MAX,
        stall_timeout: Some(Duration::from_secs(30)),
        attempt_timeout: None,
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
         [logs]\npaths = []\njournalctl_lines = 0\n\
         [downloads]\nallow_http = true\nallow_local = true\n",
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
{render}
case "$1 $2" in
  "get namespace") [ -f {d}/ns-$3 ] || exit 1 ;;
  "create namespace") touch {d}/ns-$3 ;;
  "get deployments,statefulsets,daemonsets") r=1; [ -f {d}/unhealthy ] && r=0
     echo "{{\"items\":[{{\"kind\":\"Deployment\",\"spec\":{{\"replicas\":1}},\"status\":{{\"readyReplicas\":$r}}}}]}}" ;;
esac
exit 0"#,
            calls = calls.display(),
            d = d.display(),
            render = common::KUBECTL_RENDER,
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
    let (keyring, _) = common::vendor_keyring(d);
    let cfg = cfg_for(
        d,
        &format!(
            "[upgrade]\nreboot_command = [\"{}\"]\nboot_id_file = \"{}\"\nhealth_timeout_secs = 1\n\
             [services]\nkeyring = \"{}\"\n",
            reboot.display(),
            d.join("boot_id").display(),
            keyring.display()
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
        Outcome::Canceled(p) => panic!("canceled while {p}"),
    }
}

fn calls(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

const DEPLOYMENT: &str = r#"{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
  "spec": {"template": {"spec": {"containers": [{"name": "web", "image": "web:1"}]}}}}"#;
const SERVICE: &str = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}"#;

fn service_package() -> Vec<u8> {
    common::package(&[
        ("images/web.tar", "image-bytes"),
        ("manifests/01-deploy.yaml", DEPLOYMENT),
        ("manifests/02-svc.yaml", SERVICE),
    ])
}

/// An installService body for `pkg` served at `url`, signed with the test vendor key.
fn signed_install(d: &Path, code: &str, version: &str, url: &str, pkg: &[u8]) -> Value {
    let (_, key) = common::vendor_keyring(d);
    let sum = sha(pkg);
    json!({"serviceCode": code, "version": version, "url": url, "sha256": sum,
           "signature": common::sign_package(&key, code, version, &sum)})
}

#[test]
fn install_service_uses_namespace_images_manifests_and_is_idempotent() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start();
    let pkg = service_package();
    s.add_file("/svc.tar.gz", pkg.clone(), "\"s1\"");
    let (agent, calls_log) = agent_with_doubles(d.path());
    let body = signed_install(d.path(), "Billing", "2.1", &s.url("/svc.tar.gz"), &pkg);
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
    // the checked JSON rendering is applied, in manifest order
    assert!(
        applies[0].ends_with("checked/01-deploy.yaml.json")
            && applies[1].ends_with("checked/02-svc.yaml.json"),
        "{applies:?}"
    );

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
    // after the reboot: booted B, not a fallback, confirmed by the engine's
    // health check (dualroot-confirm.service) → success
    std::fs::write(&boot, "boot-2").unwrap();
    set_status(d.path(), "b", "good", false, "13");
    let v = done(tasks::run(&agent, &t, true));
    assert_eq!(v["status"], "upgraded");
    assert_eq!(v["version"], "13");
    assert_eq!(v["previousVersion"], "11");
    assert!(
        !calls(&calls_log).iter().any(|l| l.contains("slot confirm")),
        "the engine's health check confirms a slot, never the agent"
    );
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
            assert_eq!(v["runningSlot"], "a");
            assert_eq!(v["wantedSlot"], "b");
            // GRUB's facts from the engine's status: which slot failed, tries spent
            assert_eq!(v["fallbackFrom"], "b");
            assert_eq!(v["fallbackTriesUsed"], 3);
        }
        _ => panic!("expected rolled back"),
    }
    assert!(!calls(&calls_log).iter().any(|l| l.contains("slot confirm")));
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
    let plan = "[target]\nvg = \"VA\"\n";
    let (_, key) = common::vendor_keyring(d.path());
    body["plan"] = json!(plan);
    body["planSignature"] = json!(dualroot_keys::sign_plan(&key, plan.as_bytes()));
    done(tasks::run(&agent, &row("m1", "migrate", body), false));
    let c = calls(&calls_log);
    let stage = c
        .iter()
        .find(|l| l.starts_with("dualroot stage "))
        .expect("stage called");
    assert!(
        stage.contains("--plan")
            && stage.contains("plan-m1.toml")
            && stage.contains("--require-signed-plan"),
        "{stage}"
    );
    let sig = std::fs::read_to_string(d.path().join("data/plan-m1.toml.sig")).unwrap();
    assert!(
        !sig.trim().is_empty(),
        "the signature is left beside the plan for stage"
    );
    assert!(
        c.iter()
            .position(|l| l.starts_with("dualroot bundle verify"))
            < c.iter().position(|l| l.starts_with("dualroot stage"))
    );
}

/// Issue 23 item 1: the backend cannot stage a plan of its own: unsigned, or
/// signed and then changed (a carry into root's authorized_keys), or signed
/// by a key the vendor keyring does not hold.
#[test]
fn migrate_with_an_unsigned_or_changed_plan_is_refused_before_stage() {
    let d = tempfile::tempdir().unwrap();
    let (agent, calls_log) = agent_with_doubles(d.path());
    let (_s, body) = upgrade_fixture(d.path());
    let (_, key) = common::vendor_keyring(d.path());
    let plan = "[bundle]\npath = \"/b\"\nkeyring = \"/k\"\n";
    let evil =
        format!("{plan}[[carry]]\npath = \"/var/lib/x\"\ndest = \"/root/.ssh/authorized_keys\"\n");
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let cases = [
        (json!(plan), None, "planSignature"),
        (
            json!(evil),
            Some(dualroot_keys::sign_plan(&key, plan.as_bytes())),
            "changed after signing",
        ),
        (
            json!(plan),
            Some(dualroot_keys::sign_plan(&stranger, plan.as_bytes())),
            "does not verify",
        ),
    ];
    for (i, (p, sig, why)) in cases.into_iter().enumerate() {
        let mut b = body.clone();
        b["plan"] = p;
        if let Some(s) = sig {
            b["planSignature"] = json!(s);
        }
        let (e, _) = failed(tasks::run(
            &agent,
            &row(&format!("mp{i}"), "migrate", b),
            false,
        ));
        assert!(
            e.contains(why) && e.contains("nothing was staged"),
            "case {i}: {e}"
        );
    }
    assert!(
        !calls(&calls_log)
            .iter()
            .any(|l| l.starts_with("dualroot stage")),
        "stage ran with a plan the vendor did not sign"
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
            "insecure = true\ndata_dir = \"{}\"\n[backend]\nurl = \"{}\"\n",
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
                stall_ms: 0,
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
    let svc = signed_install(d.path(), "web", "1", &s.url("/svc.tar.gz"), &pkg);
    done(tasks::run(&agent, &row("i1", "installService", svc), false));
    let (_s2, body) = upgrade_fixture(d.path());
    std::fs::write(d.path().join("boot_id"), "boot-1").unwrap();
    let t = row("up5", "upgrade", body);
    assert!(matches!(tasks::run(&agent, &t, false), Outcome::Suspended));
    std::fs::write(d.path().join("boot_id"), "boot-2").unwrap();
    set_status(d.path(), "b", "trying", false, "13");
    std::fs::write(d.path().join("unhealthy"), "").unwrap();
    // the engine's health check (which runs `check-services`) never confirms b
    match tasks::run(&agent, &t, true) {
        Outcome::Failed(e, v) => {
            assert!(e.contains("did not confirm it") && e.contains("web"), "{e}");
            assert_eq!(v["status"], "unconfirmed");
            assert_eq!(
                v["unhealthyServices"][0]
                    .as_str()
                    .map(|s| s.starts_with("web")),
                Some(true)
            );
        }
        _ => panic!("expected failure"),
    }
    assert!(!calls(&calls_log).iter().any(|l| l.contains("slot confirm")));
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

// ------------------------------------------------------------ security review (issue 16)

fn failed(o: Outcome) -> (String, Value) {
    match o {
        Outcome::Failed(e, v) => (e, v),
        Outcome::Done(v) => panic!("expected a failure, got done: {v}"),
        Outcome::Suspended => panic!("expected a failure, got suspended"),
        Outcome::Canceled(p) => panic!("expected a failure, got canceled while {p}"),
    }
}

/// F1: `start + rand(0..=end-start)` wrapped and panicked (and with
/// `panic = "abort"` took the agent down at every start).
#[test]
fn upgrade_window_that_overflows_fails_the_task_instead_of_panicking() {
    let d = tempfile::tempdir().unwrap();
    let (agent, calls_log) = agent_with_doubles(d.path());
    let (s, mut body) = upgrade_fixture(d.path());
    body["window"] =
        json!({"start": -9_000_000_000_000_000_000i64, "end": 9_000_000_000_000_000_000i64});
    let (e, _) = failed(tasks::run(&agent, &row("upw", "upgrade", body), false));
    assert!(e.contains("window") && e.contains("refused"), "{e}");
    assert!(
        s.requests_to("/os-13.bundle").is_empty(),
        "nothing downloaded"
    );
    assert!(calls(&calls_log).is_empty(), "no engine call");
    // a window far in the future is refused too (it would wait for ever)
    let (_s2, mut body) = upgrade_fixture(d.path());
    body["window"] = json!({"start": 0, "end": 9_000_000_000_000_000_000i64});
    let (e, _) = failed(tasks::run(&agent, &row("upw2", "upgrade", body), false));
    assert!(e.contains("window"), "{e}");
}

/// F8: version ".." made the package directory `services/<ns>/..`, and
/// unpacking cleared it: every other service's files were deleted.
#[test]
fn install_service_refuses_dot_dot_version_and_keeps_other_services() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start();
    let pkg = service_package();
    s.add_file("/svc.tar.gz", pkg.clone(), "\"s1\"");
    let (agent, calls_log) = agent_with_doubles(d.path());
    let url = s.url("/svc.tar.gz");
    done(tasks::run(
        &agent,
        &row(
            "i1",
            "installService",
            signed_install(d.path(), "web", "1", &url, &pkg),
        ),
        false,
    ));
    let web1 = d
        .path()
        .join("data/services/web/1/manifests/01-deploy.yaml");
    assert!(web1.exists());
    let before = calls(&calls_log).len();
    for (i, v) in ["..", ".", "", "../../etc", "a/b"].iter().enumerate() {
        let (e, _) = failed(tasks::run(
            &agent,
            &row(
                &format!("bad{i}"),
                "installService",
                signed_install(d.path(), "web", v, &url, &pkg),
            ),
            false,
        ));
        assert!(
            e.contains("version") && e.contains("nothing was installed"),
            "{v:?}: {e}"
        );
    }
    assert!(web1.exists(), "another version's files were deleted");
    assert_eq!(
        calls(&calls_log).len(),
        before,
        "nothing was run for the refused tasks"
    );
    assert_eq!(s.requests_to("/svc.tar.gz").len(), 1, "nothing downloaded");
}

/// F7: service packages carried only a backend-supplied sha256.
#[test]
fn unsigned_or_wrongly_signed_service_package_is_refused_before_download() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start();
    let pkg = service_package();
    s.add_file("/svc.tar.gz", pkg.clone(), "\"s1\"");
    let (agent, calls_log) = agent_with_doubles(d.path());
    let url = s.url("/svc.tar.gz");
    let unsigned = json!({"serviceCode": "web", "version": "1", "url": url, "sha256": sha(&pkg)});
    let (e, _) = failed(tasks::run(
        &agent,
        &row("u1", "installService", unsigned),
        false,
    ));
    assert!(
        e.contains("signature") && e.contains("nothing was installed"),
        "{e}"
    );
    // signed, but by a key that is not in the vendor keyring
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let mut body = signed_install(d.path(), "web", "1", &url, &pkg);
    body["signature"] = json!(common::sign_package(&stranger, "web", "1", &sha(&pkg)));
    let (e, _) = failed(tasks::run(
        &agent,
        &row("u2", "installService", body),
        false,
    ));
    assert!(e.contains("matches no key"), "{e}");
    // a good signature over another package's hash
    let mut body = signed_install(d.path(), "web", "1", &url, &pkg);
    body["sha256"] = json!(sha(b"another package"));
    let (e, _) = failed(tasks::run(
        &agent,
        &row("u3", "installService", body),
        false,
    ));
    assert!(e.contains("matches no key"), "{e}");
    assert!(
        s.requests_to("/svc.tar.gz").is_empty(),
        "nothing downloaded"
    );
    assert!(calls(&calls_log).is_empty(), "no kubectl or import call");
}

/// F7: `kubectl apply -f` applied any manifest, cluster-scoped kinds and
/// privileged pods included.
#[test]
fn service_package_with_cluster_scoped_or_privileged_objects_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start();
    let (agent, calls_log) = agent_with_doubles(d.path());
    let cases = [
        (
            r#"{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": "own-the-cluster"}}"#,
            "rbac.authorization.k8s.io/ClusterRoleBinding",
        ),
        (
            r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root"},
                "spec": {"containers": [{"name": "c", "securityContext": {"privileged": true}}]}}"#,
            "spec.containers[0].securityContext.privileged",
        ),
        (
            r#"{"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "ds"},
                "spec": {"template": {"spec": {"hostPID": true, "containers": []}}}}"#,
            "spec.template.spec.hostPID",
        ),
        (
            r#"{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w"},
                "spec": {"template": {"spec": {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}}}"#,
            "spec.template.spec.volumes[0].hostPath",
        ),
        (
            r#"{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w"},
                "spec": {"template": {"spec": {"hostNetwork": true}}}}"#,
            "spec.template.spec.hostNetwork",
        ),
    ];
    for (i, (manifest, what)) in cases.iter().enumerate() {
        let pkg = common::package(&[
            ("manifests/01-deploy.yaml", DEPLOYMENT),
            ("manifests/20-extra.yaml", manifest),
        ]);
        let path = format!("/bad-{i}.tar.gz");
        s.add_file(&path, pkg.clone(), "\"b\"");
        let body = signed_install(d.path(), "web", &format!("{i}"), &s.url(&path), &pkg);
        let (e, _) = failed(tasks::run(
            &agent,
            &row(&format!("p{i}"), "installService", body),
            false,
        ));
        assert!(
            e.contains("manifest 20-extra.yaml")
                && e.contains(what)
                && e.contains("nothing was applied"),
            "{e}"
        );
    }
    let c = calls(&calls_log);
    assert!(
        !c.iter().any(|l| l.contains(" apply ")
            || l.contains("create namespace")
            || l.starts_with("import ")),
        "nothing may be changed for a refused package: {c:?}"
    );
    assert!(agent.journal.kv_get("service:web").unwrap().is_none());
}

/// F9: no size cap.
#[test]
fn download_over_the_size_cap_is_refused_and_deleted() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start();
    let pkg = service_package();
    s.add_file("/svc.tar.gz", pkg.clone(), "\"s1\"");
    let (agent, _calls) = agent_with_doubles(d.path());
    let mut body = signed_install(d.path(), "web", "1", &s.url("/svc.tar.gz"), &pkg);
    body["size"] = json!(100);
    let (e, _) = failed(tasks::run(
        &agent,
        &row("big", "installService", body),
        false,
    ));
    assert!(e.contains("limit of 100 bytes"), "{e}");
    assert_eq!(
        s.requests_to("/svc.tar.gz").len(),
        1,
        "a size refusal is not retried"
    );
    let dl = d.path().join("data/downloads");
    let left: Vec<_> = std::fs::read_dir(&dl)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "partial data kept: {left:?}");

    // the config's cap, on the download itself
    let data = payload(50_000);
    s.add_file("/b.bin", data.clone(), "\"b\"");
    let url = s.url("/b.bin");
    let dest = d.path().join("b.bin");
    let sum = sha(&data);
    let mut r = req(&url, &sum, &dest, 2);
    r.max_bytes = 49_999;
    let e = download::fetch(&r).unwrap_err();
    assert!(format!("{e:#}").contains("more than the limit"), "{e:#}");
    r.max_bytes = 50_000;
    assert_eq!(std::fs::read(download::fetch(&r).unwrap()).unwrap(), data);
}

/// F9: no stall timeout (a server that stops sending held the download for ever).
#[test]
fn stalled_download_times_out_and_the_next_attempt_resumes() {
    let s = Server::start();
    let data = payload(200_000);
    s.add_file("/s.bin", data.clone(), "\"s\"");
    s.cut("/s.bin", 80_000, 1);
    s.stall("/s.bin", 15_000);
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("s.bin");
    let url = s.url("/s.bin");
    let sum = sha(&data);
    let mut r = req(&url, &sum, &dest, 3);
    r.stall_timeout = Some(Duration::from_secs(1));
    let start = std::time::Instant::now();
    assert_eq!(std::fs::read(download::fetch(&r).unwrap()).unwrap(), data);
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "waited {:?} for a stalled server",
        start.elapsed()
    );
    let reqs = s.requests_to("/s.bin");
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].headers["range"], "bytes=80000-");
}

/// F9: a partial file was resumed for any download of the same URL, even
/// one expecting other content.
#[test]
fn partial_download_is_resumed_only_for_the_same_url_and_sha256() {
    let s = Server::start();
    let old = payload(60_000);
    s.add_file("/p.bin", old.clone(), "\"same\"");
    s.cut("/p.bin", 25_000, 1);
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("p.bin");
    let url = s.url("/p.bin");
    assert!(download::fetch(&req(&url, &sha(&old), &dest, 1)).is_err());
    // new content behind the same URL and the same (stale) validator
    let new: Vec<u8> = old.iter().map(|b| b ^ 0x5a).collect();
    s.add_file("/p.bin", new.clone(), "\"same\"");
    let got = download::fetch(&req(&url, &sha(&new), &dest, 1)).unwrap();
    assert_eq!(std::fs::read(got).unwrap(), new);
    let reqs = s.requests_to("/p.bin");
    assert!(
        !reqs[1].headers.contains_key("range"),
        "the old part was resumed for another sha256"
    );
}

/// F9: full URLs (pre-signed credentials in the query) were logged and
/// reported.
#[test]
fn urls_in_errors_and_results_have_no_query_string() {
    let s = Server::start();
    let d = tempfile::tempdir().unwrap();
    let secret = "X-Amz-Signature=SECRET123&X-Amz-Credential=AKIAEXAMPLE";
    let url = s.url(&format!("/missing?{secret}"));
    let e = download::fetch(&req(&url, &"0".repeat(64), &d.path().join("x"), 1)).unwrap_err();
    let m = format!("{e:#}");
    assert!(
        m.contains("HTTP 404") && !m.contains("SECRET123") && !m.contains("AKIA"),
        "{m}"
    );

    let (agent, _calls) = agent_with_doubles(d.path());
    s.set_handler(|r| (r.method == "PUT").then(|| Resp::json(403, &json!({}))));
    let up = s.url(&format!("/up/l1?{secret}"));
    let (e, _) = failed(tasks::run(
        &agent,
        &row("l1", "collectLogs", json!({"uploadUrl": up})),
        false,
    ));
    assert!(e.contains("HTTP 403") && !e.contains("SECRET123"), "{e}");
}

/// Issue 23 item 2: a signature covers the service, the version and the hash
/// together. A package signed for one service cannot be installed under
/// another code, an older signed package is not installed over a newer one
/// unless the task asks for the downgrade, and uninstall deletes only what
/// this agent installed.
#[test]
fn signed_packages_cannot_be_replayed_and_uninstall_keeps_foreign_namespaces() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start();
    let pkg = service_package();
    s.add_file("/svc.tar.gz", pkg.clone(), "\"s1\"");
    let (agent, calls_log) = agent_with_doubles(d.path());
    let url = s.url("/svc.tar.gz");

    // Signed for "web", sent as "billing": refused before the download.
    let mut replay = signed_install(d.path(), "web", "2", &url, &pkg);
    replay["serviceCode"] = json!("billing");
    let (e, _) = failed(tasks::run(
        &agent,
        &row("r1", "installService", replay),
        false,
    ));
    assert!(e.contains("matches no key") && e.contains("billing"), "{e}");
    // Signed as version 2, sent as version 3: refused.
    let mut relabel = signed_install(d.path(), "web", "2", &url, &pkg);
    relabel["version"] = json!("3");
    let (e, _) = failed(tasks::run(
        &agent,
        &row("r2", "installService", relabel),
        false,
    ));
    assert!(e.contains("matches no key"), "{e}");
    assert!(
        s.requests_to("/svc.tar.gz").is_empty(),
        "nothing downloaded"
    );

    // Version 2 installed; the genuine, signed version 1 is an older package.
    done(tasks::run(
        &agent,
        &row(
            "i2",
            "installService",
            signed_install(d.path(), "web", "2", &url, &pkg),
        ),
        false,
    ));
    let old = signed_install(d.path(), "web", "1", &url, &pkg);
    let (e, _) = failed(tasks::run(
        &agent,
        &row("i1", "installService", old.clone()),
        false,
    ));
    assert!(
        e.contains("older than the installed 2") && e.contains("allowDowngrade"),
        "{e}"
    );
    let mut asked = old;
    asked["allowDowngrade"] = json!(true);
    let v = done(tasks::run(
        &agent,
        &row("i1b", "installService", asked),
        false,
    ));
    assert_eq!(v["version"], "1");

    // A namespace this agent did not install is never deleted.
    let before = calls(&calls_log).len();
    let v = done(tasks::run(
        &agent,
        &row(
            "u1",
            "uninstallService",
            json!({"serviceCode": "kube-system"}),
        ),
        false,
    ));
    assert_eq!(v["changed"], false);
    let after: Vec<String> = calls(&calls_log)[before..].to_vec();
    assert!(
        !after.iter().any(|l| l.contains("delete namespace")),
        "{after:?}"
    );
    // Its own service is.
    done(tasks::run(
        &agent,
        &row("u2", "uninstallService", json!({"serviceCode": "web"})),
        false,
    ));
    assert!(calls(&calls_log)
        .iter()
        .any(|l| l.starts_with("kubectl delete namespace web")));
}
