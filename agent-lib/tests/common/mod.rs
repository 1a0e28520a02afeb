//! Test harness: a real mosquitto per test, the agent binary as a child
//! process, a backend that plays the cloud over MQTT, and a tiny HTTP server.
#![allow(dead_code)]

pub mod broker;
pub mod http;

pub use broker::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The agent binary as a child process; SIGKILLed on drop.
pub struct AgentProc {
    pub dir: PathBuf,
    pub device_id: String,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    starts: u32,
    pub log_level: String,
}

pub struct AgentOpts {
    pub max_payload: usize,
    pub dualroot_bin: String,
    pub extra: String,
    /// Extra lines for the `[mqtt]` table.
    pub mqtt_extra: String,
    pub session_expiry_secs: u64,
    pub ttl_secs: u64,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            max_payload: 64 * 1024,
            dualroot_bin: "/nonexistent/dualroot".into(),
            extra: String::new(),
            mqtt_extra: String::new(),
            session_expiry_secs: 86400,
            ttl_secs: 172800,
        }
    }
}

impl AgentProc {
    pub fn new(dir: &Path, device_id: &str, port: u16, o: AgentOpts) -> AgentProc {
        let dir = dir.join(format!("agent-{device_id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "insecure = true\ndevice_id = \"{device_id}\"\nfirmware_version = \"9.9.9-test\"\n\
                 data_dir = \"{data}\"\ndualroot_bin = \"{dr}\"\n{extra}\n\
                 [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\ntopic_prefix = \"{PREFIX}\"\n\
                 keep_alive_secs = 5\nmax_payload_bytes = {max}\nbackoff_initial_ms = 100\n\
                 backoff_max_ms = 1000\noutbox_retry_secs = 2\nsession_expiry_secs = {sess}\n{mqtt_extra}\n\
                 [journal]\nttl_secs = {ttl}\n[logs]\npaths = []\njournalctl_lines = 0\n\
                 [downloads]\nallow_http = true\nallow_local = true\n\
                 [debug]\ntest_tasks = true\n",
                data = dir.join("data").display(),
                dr = o.dualroot_bin,
                max = o.max_payload,
                extra = o.extra,
                mqtt_extra = o.mqtt_extra,
                sess = o.session_expiry_secs,
                ttl = o.ttl_secs,
            ),
        )
        .unwrap();
        AgentProc {
            log: dir.join("agent.log"),
            dir,
            device_id: device_id.into(),
            config,
            child: None,
            starts: 0,
            log_level: std::env::var("AGENT_TEST_LOG").unwrap_or_else(|_| "info".into()),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the agent; `failpoints` as in `DUALROOT_AGENT_FAILPOINTS`.
    /// Waits until it is subscribed to its task topic.
    pub fn start(&mut self, failpoints: &str) {
        let before = self.count_log("subscribed to");
        self.start_nowait(failpoints);
        wait_until("agent to subscribe", Duration::from_secs(20), || {
            self.count_log("subscribed to") > before
        });
    }

    /// Starts the agent without waiting for anything.
    pub fn start_nowait(&mut self, failpoints: &str) {
        self.starts += 1;
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dualroot-agent"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("DUALROOT_AGENT_FAILPOINTS", failpoints)
            .env("DUALROOT_AGENT_LOG", &self.log_level)
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Waits until the agent process has exited; its exit code (None: signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take().expect("agent running");
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                panic!("agent did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
        for fp in [
            "after_journal",
            "after_claim",
            "in_task",
            "after_finish",
            "after_publish",
        ] {
            let _ = std::fs::remove_file(self.data_dir().join(format!("failpoint-{fp}")));
        }
    }

    /// SIGTERM (what systemd sends) and wait for the exit; returns its status code.
    pub fn term(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        sigterm(c.id());
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                panic!("agent did not stop within {timeout:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    pub fn wait_failpoint(&self, name: &str) {
        let p = self.data_dir().join(format!("failpoint-{name}"));
        wait_until(
            &format!("failpoint {name}"),
            Duration::from_secs(20),
            || p.exists(),
        );
    }

    pub fn journal(&self) -> agent_lib::journal::Journal {
        agent_lib::journal::Journal::open(&self.data_dir().join("journal.sqlite")).unwrap()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- agent {} log (last 60 lines) ---", self.device_id);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Lines of a marker file written by `test.sleep` tasks.
pub fn marker_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Writes an executable shell script (test doubles of external programs).
pub fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A vendor key for service packages: the keyring directory (with the
/// public key in the engine's `*.pub` format) and the signing key.
pub fn vendor_keyring(dir: &Path) -> (PathBuf, ed25519_dalek::SigningKey) {
    use base64::Engine;
    let ring = dir.join("keyring");
    std::fs::create_dir_all(&ring).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    std::fs::write(
        ring.join("vendor.pub"),
        format!(
            "dualroot-ed25519 {} vendor test key\n",
            base64::engine::general_purpose::STANDARD.encode(key.verifying_key().as_bytes())
        ),
    )
    .unwrap();
    (ring, key)
}

/// The `signature` field of an installService task for this service code,
/// version and package sha256.
pub fn sign_package(
    key: &ed25519_dalek::SigningKey,
    code: &str,
    version: &str,
    sha256_hex: &str,
) -> String {
    use base64::Engine;
    use ed25519_dalek::Signer;
    let msg = agent_lib::keyring::package_message(code, version, sha256_hex);
    base64::engine::general_purpose::STANDARD.encode(key.sign(&msg).to_bytes())
}

/// A service package (`tar.gz`) with these files.
pub fn package(files: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let enc = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
        let mut b = tar::Builder::new(enc);
        for (name, data) in files {
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

/// Shell for a kubectl double: `create --dry-run=client -o json ... -f FILE`
/// prints FILE (test manifests are JSON, which is YAML too), as kubectl
/// would print the objects it read.
pub const KUBECTL_RENDER: &str = r#"if [ "$1 $2" = "create --dry-run=client" ]; then
  for a; do last=$a; done; cat "$last"; exit 0
fi"#;

/// What the real `dualroot slot status --json` prints for this state, made from
/// the contract types (the doubles at the process boundary cannot drift from
/// the engine: initrd-tool's tests/contract.rs checks the real binary's output
/// against the same types).
pub fn slot_status_json(booted: &str, booted_state: &str, fallback: bool, version: &str) -> String {
    use dualroot_api::{Slot, SlotInfo, SlotState, SlotStatus, API_VERSION};
    let b = Slot::parse(booted).expect("slot a or b");
    let state = SlotState::from_env(booted_state);
    let info = |s: Slot| SlotInfo {
        slot: s,
        lv: s.lv().into(),
        state: if s == b {
            state
        } else if fallback {
            SlotState::Bad
        } else {
            SlotState::Good
        },
        tries_left: (s == b && state == SlotState::Trying).then_some(2),
        os_id: Some("debian".into()),
        version: Some(if s == b { version.into() } else { "0".into() }),
        kernel: Some("6.12.117+deb13-amd64".into()),
        kernel_fell_back: false,
    };
    serde_json::to_string(&SlotStatus {
        api_version: API_VERSION,
        booted: Some(b),
        primary: b,
        fallback_from: fallback.then(|| b.other()),
        last_boot_was_fallback: fallback,
        fallback_tries_used: fallback.then_some(3),
        version: Some(version.into()),
        migrating: false,
        slots: vec![info(Slot::A), info(Slot::B)],
    })
    .unwrap()
}

/// What the real `dualroot slot install --json` prints after installing into `slot`.
pub fn install_report_json(slot: &str, version: &str) -> String {
    use dualroot_api::{InstallReport, Slot, SlotState, API_VERSION};
    let s = Slot::parse(slot).expect("slot a or b");
    serde_json::to_string(&InstallReport {
        api_version: API_VERSION,
        slot: s,
        lv: s.lv().into(),
        state: SlotState::Installed,
        os_id: "debian".into(),
        version: version.into(),
        entries: 1,
        unpack_seconds: 0.1,
        seconds: 0.2,
        next: format!("run `dualroot slot switch` to boot slot {s} next"),
    })
    .unwrap()
}
