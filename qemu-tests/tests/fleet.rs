//! The fleet controller drives a real appliance (issue 24): `dualroot-fleet
//! serve` (the real controller, `$DUALROOT_FLEET_BIN`, default
//! `target/release/dualroot-fleet`; `run-scenarios.sh` builds it) with its
//! SQLite store, a real mosquitto, and `dualroot-fleet simulate` appliances
//! next to one real legacy VM running the static `dualroot-agent`:
//! - rollout 1 (a migration, 2 waves: the VM is the canary of wave 1, the
//!   simulated legacy appliances wave 2) migrates the VM; its task counts as
//!   succeeded only after the new OS booted (a heartbeat from a boot id other
//!   than the one the task was sent in, newer than the new kernel's start);
//!   wave 2 starts only after the VM's success and its soak;
//! - rollout 2 (the v2 A/B image, same waves) upgrades the VM into slot b,
//!   counted the same way, and the simulated appliances after it.
//!
//! Only the bundle files come from the harness (a plain HTTP file server);
//! registration, tasks, results and heartbeats are the controller's.
//! `qemu-tests/run-scenarios.sh fleet`

mod common;

use common::agent::*;
use common::*;
use qemu_tests::backend::{agent_toml, Broker, Server, PREFIX};
use qemu_tests::disk::overlay_on;
use qemu_tests::images;
use qemu_tests::qemu::{free_port, GuestFwd, Vm, VmConfig, GUESTFWD_ADDR};
use qemu_tests::scenario::{self, Scenario};
use qemu_tests::{cmd, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Register tokens: the VM's devices are canaries (wave 1 first).
const VM_TOKEN: &str = "fleet-e2e-vm";
const SIM_TOKEN: &str = "fleet-e2e-sim";
/// Heartbeat interval of this lab fleet (the field's is 5 min); the soak of
/// each wave is the floor, 3 intervals.
const HB_MS: i64 = 15_000;
const SIMULATED: usize = 8;
/// Guest-side ports on [`GUESTFWD_ADDR`]: broker, controller, bundle files.
const MQTT_GUEST_PORT: u16 = 1883;
const FLEET_GUEST_PORT: u16 = 8080;
const FILES_GUEST_PORT: u16 = 8081;

fn fleet_bin() -> Result<PathBuf> {
    let p = std::env::var_os("DUALROOT_FLEET_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| images::workspace_dir().join("target/release/dualroot-fleet"));
    if !p.is_file() {
        qemu_tests::bail!(
            "no controller binary at {} (cargo build --release -p dualroot-fleet, or set DUALROOT_FLEET_BIN)",
            p.display()
        );
    }
    Ok(p)
}

/// A child process killed (and reaped) on drop.
struct Proc(Child);

/// `bin` run under `setpriv --pdeathsig KILL` (as the VMs are): killed with
/// the test when the test is killed and no drop runs.
fn long_running(bin: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--pdeathsig", "KILL", "--"]).arg(bin);
    c
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first: the simulator writes its report, the controller stops cleanly
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The controller, its broker, the simulator and the file server. Fields drop
/// in order: simulator and controller stop before the broker.
struct Lab {
    sim: Option<Proc>,
    _controller: Proc,
    bin: PathBuf,
    api: String,
    broker: Broker,
    files: Server,
    dir: PathBuf,
}

impl Lab {
    fn start(dir: &Path) -> Result<Lab> {
        let bin = fleet_bin()?;
        let broker = Broker::start(dir);
        let files = Server::start();
        let port = free_port()?;
        let config = dir.join("fleet.toml");
        std::fs::write(
            &config,
            format!(
                "topic_prefix = \"{PREFIX}\"\nheartbeat_interval_ms = {HB_MS}\n\
                 # an appliance away for its migration is probed every 2 intervals, not 12\n\
                 offline_probe_intervals = 2\nresend_interval_ms = 60000\n\n\
                 [register_tokens.{VM_TOKEN}]\nsite = \"lab\"\ncanary = \"yes\"\n\n\
                 [register_tokens.{SIM_TOKEN}]\nsite = \"lab\"\n"
            ),
        )?;
        let log = std::fs::File::create(dir.join("fleet.log"))?;
        let child = long_running(&bin)
            .arg("serve")
            .arg("--db")
            .arg(dir.join("fleet.sqlite"))
            .arg("--config")
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--mqtt-port", &broker.port.to_string(), "--tick-ms", "500"])
            .env("DUALROOT_FLEET_LOG", "debug")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let fleet = Proc(child);
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if t0.elapsed() > Duration::from_secs(20) {
                qemu_tests::bail!("dualroot-fleet serve did not listen on {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "[fleet] controller on 127.0.0.1:{port}, mosquitto on {}, files on {}",
            broker.port, files.port
        );
        Ok(Lab {
            bin,
            api: format!("http://127.0.0.1:{port}"),
            broker,
            files,
            _controller: fleet,
            sim: None,
            dir: dir.to_path_buf(),
        })
    }

    /// `dualroot-fleet --json ARGS` against the controller, its JSON answer.
    fn cli(&self, args: &[&str]) -> Result<Value> {
        let out = cmd::run(
            Command::new(&self.bin)
                .args(["--api", &self.api, "--json"])
                .args(args),
        )?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("dualroot-fleet {args:?} printed no JSON"))
    }

    /// Legacy appliances simulated over the real broker, registered with the
    /// controller (`simulate`), until dropped.
    fn simulate(&mut self, version: &str) -> Result<()> {
        let log = std::fs::File::create(self.dir.join("simulate.log"))?;
        let child = long_running(&self.bin)
            .args([
                "--api",
                &self.api,
                "simulate",
                "--register-token",
                SIM_TOKEN,
            ])
            .args(["--devices", &SIMULATED.to_string(), "--legacy"])
            .args(["--mqtt-port", &self.broker.port.to_string()])
            .args(["--prefix", PREFIX, "--version", version])
            .args(["--download-ms", "20000", "--reboot-ms", "20000"])
            .arg("--report")
            .arg(self.dir.join("simulate-report.json"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dualroot-fleet simulate")?;
        self.sim = Some(Proc(child));
        Ok(())
    }

    /// Serves `file` to the guest; (url, sha256, size).
    fn serve(&self, path: &str, file: &Path) -> Result<(String, String, u64)> {
        let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let sha = hex::encode(Sha256::digest(&data));
        let size = data.len() as u64;
        self.files
            .add_file(path, data, &format!("\"{}\"", &sha[..16]));
        Ok((
            format!("http://{GUESTFWD_ADDR}:{FILES_GUEST_PORT}{path}"),
            sha,
            size,
        ))
    }

    fn guestfwd(&self) -> Vec<GuestFwd> {
        let port = |api: &str| api.rsplit(':').next().unwrap_or("0").to_string();
        let cmd = |p: String| format!("'{RELAY}' {p}");
        vec![
            GuestFwd {
                guest_port: MQTT_GUEST_PORT,
                cmd: cmd(self.broker.port.to_string()),
            },
            GuestFwd {
                guest_port: FLEET_GUEST_PORT,
                cmd: cmd(port(&self.api)),
            },
            GuestFwd {
                guest_port: FILES_GUEST_PORT,
                cmd: cmd(self.files.port.to_string()),
            },
        ]
    }

    fn devices(&self) -> Result<Vec<Value>> {
        // the CLI pages through the API and prints one array
        let v = self.cli(&["devices", "list"])?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Polls `f` over the controller's answers every 2 s.
    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Lab) -> Result<Option<T>>,
    ) -> Result<T> {
        let t0 = Instant::now();
        loop {
            if let Some(v) = f(self)? {
                println!("[fleet] {what} after {:.0} s", t0.elapsed().as_secs_f64());
                return Ok(v);
            }
            if t0.elapsed() > timeout {
                qemu_tests::bail!(
                    "{what}: not within {} s; the controller's last log lines:\n{}",
                    timeout.as_secs(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("fleet.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn rollout(&self, spec: &Value) -> Result<()> {
        let id = spec["id"].as_str().unwrap_or("?").to_string();
        let path = self.dir.join(format!("rollout-{id}.json"));
        std::fs::write(&path, spec.to_string())?;
        self.cli(&["rollout", "create", &path.display().to_string()])?;
        self.cli(&["rollout", "start", &id])?;
        println!("[fleet] rollout {id} started");
        Ok(())
    }

    /// Waits (15 min) until the device's task of this rollout ended:
    /// succeeded, failed, rolled back or timed out.
    fn task_ended(&self, rollout: &str, device: &str) -> Result<Value> {
        self.wait(
            &format!("{rollout}: the task of {device} ended"),
            Duration::from_secs(900),
            |l| {
                let t = l.task_of(rollout, device)?;
                Ok(t.filter(|t| {
                    let s = t["task"]["state"].as_str().unwrap_or("");
                    s == "succeeded" || s == "failed" || s == "rolled_back" || s == "timed_out"
                }))
            },
        )
    }

    /// The device's task of this rollout with its state changes.
    fn task_of(&self, rollout: &str, device: &str) -> Result<Option<Value>> {
        let list = self.cli(&["tasks", "list", "--rollout", rollout, "--device", device])?;
        match list.as_array().and_then(|a| a.first()) {
            Some(t) => {
                let id = t["id"].as_str().unwrap_or("").to_string();
                Ok(Some(self.cli(&["tasks", "show", &id])?))
            }
            None => Ok(None),
        }
    }
}

/// The task's state names in the order it went through them.
fn path_of(task: &Value) -> Vec<String> {
    task["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["to"].as_str().map(str::to_string))
        .collect()
}

/// When the task reached `state` (unix ms), from its history.
fn reached_at(task: &Value, state: &str) -> Option<i64> {
    task["history"]
        .as_array()?
        .iter()
        .find(|h| h["to"] == state)
        .and_then(|h| h["at"].as_i64())
}

/// The guest's kernel start in host time (unix ms) and its boot id. The
/// guests' clocks are not the host's (measured: months apart), so the start
/// (/proc/stat btime) is moved by the offset between the two clocks read
/// together (an ssh round trip, a second or two, against the tens of seconds
/// from kernel start to the agent's first heartbeat).
fn boot_facts(vm: &Vm) -> Result<(i64, String)> {
    let out = vm.ssh_ok(
        "date +%s; awk '/^btime/ {print $2}' /proc/stat; cat /proc/sys/kernel/random/boot_id",
    )?;
    let host_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut l = out.lines();
    let mut num = |what: &str| -> Result<i64> {
        l.next()
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("no {what} in {out:?}"))
    };
    let (guest_now, btime) = (num("date")?, num("btime")?);
    let boot_id = l.next().unwrap_or("").trim().to_string();
    Ok(((btime + host_now - guest_now) * 1000, boot_id))
}

fn spec(id: &str, kind: &str, version: &str, file: &(String, String, u64), extra: Value) -> Value {
    let mut s = json!({
        "id": id, "kind": kind, "version": version,
        "url": file.0, "sha256": file.1, "size": file.2,
        "selector": {"labels": {"site": "lab"}},
        // wave 1: the canary (the VM); wave 2: everyone else
        "waves": [{"count": 1}, {"percent": 100}],
        "soakMs": 3 * HB_MS, "maxFailures": 1, "maxFailurePct": 20,
        "inFlightCap": SIMULATED + 1,
    });
    if let (Some(s), Some(e)) = (s.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    s
}

/// Checks of one rollout's end: the VM's task went through the reboot and
/// succeeded after the new boot; every device succeeded; the wave order held.
fn check_rollout(
    sc: &Scenario,
    lab: &Lab,
    id: &str,
    vm_dev: &str,
    task: &Value,
    new_boot: &(i64, String),
) -> Result<()> {
    let path = path_of(task);
    let succeeded_at = reached_at(task, "succeeded").unwrap_or(0);
    let waited = path
        .iter()
        .position(|s| s == "rebooting" || s == "verifying");
    let done = path.iter().position(|s| s == "succeeded");
    sc.check(
        &format!("{id}: the VM's task went through the reboot before it succeeded"),
        matches!((waited, done), (Some(w), Some(d)) if w < d),
        &path.join(" -> "),
    )?;
    sc.check(
        &format!("{id}: success was recorded after the new kernel started, from its boot"),
        succeeded_at > new_boot.0
            && task["task"]["startBootId"].as_str() != Some(new_boot.1.as_str()),
        &format!(
            "succeeded at {succeeded_at}, kernel start {}, task sent in boot {}, new boot {}",
            new_boot.0, task["task"]["startBootId"], new_boot.1
        ),
    )?;
    sc.note(&format!("{id}_vm_task_path"), &path.join(">"));
    let st = lab.wait(
        &format!("rollout {id} completed"),
        Duration::from_secs(900),
        |l| {
            let v = l.cli(&["rollout", "status", id])?;
            Ok((v["state"] == "completed" || v["state"] == "halted").then_some(v))
        },
    )?;
    let waves = st["waves"].as_array().cloned().unwrap_or_default();
    let ok = waves.len() == 2
        && waves[0]["members"] == 1
        && waves[0]["succeeded"] == 1
        && waves[1]["members"] == SIMULATED as i64
        && waves[1]["succeeded"] == SIMULATED as i64;
    sc.check(
        &format!(
            "{id}: completed, the VM alone in wave 1, every simulated device in wave 2 succeeded"
        ),
        st["state"] == "completed" && ok,
        &st.to_string(),
    )?;
    // wave 2 started only after the canary's success and the soak
    let list = lab.cli(&["tasks", "list", "--rollout", id, "--limit", "100"])?;
    let first_other = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["deviceId"] != vm_dev)
        .filter_map(|t| t["createdAt"].as_i64())
        .min()
        .unwrap_or(0);
    sc.check(
        &format!("{id}: wave 2's first task was created after the VM's success plus the soak"),
        first_other >= succeeded_at + 3 * HB_MS,
        &format!(
            "VM succeeded at {succeeded_at}, first wave-2 task at {first_other} ({} ms later)",
            first_other - succeeded_at
        ),
    )?;
    Ok(())
}

#[test]
#[ignore = "boots a VM (about 40 minutes under TCG)"]
fn fleet_rollouts_migrate_then_upgrade_a_real_appliance() {
    scenario::run("fleet-rollouts-real-appliance", |sc| {
        let mut lab = Lab::start(&sc.dir)?;
        let b = images::bundle()?;
        let v2 = images::bundle_v2()?;
        let version = bundle_version(&b.path)?;
        let version2 = bundle_version(&v2.path)?;
        let mig = lab.serve("/files/os.bundle", &b.path)?;
        let img = lab.serve("/files/os-v2.bundle", &v2.path)?;
        lab.simulate("11-legacy")?;

        let state = prepared_old_on(sc, Old::Partition)?;
        sc.uses_state(&state);
        let (disk, fmt) = overlay_on(&state.disk, "qcow2", &sc.path("disk.qcow2"))?;
        let toml = agent_toml(
            GUESTFWD_ADDR,
            MQTT_GUEST_PORT,
            PREFIX,
            &format!("http://{GUESTFWD_ADDR}:{FLEET_GUEST_PORT}/api"),
            Path::new("/etc/dualroot/register-token"),
        );
        let payload = agent_payload(sc, &toml, VM_TOKEN)?;
        let mut cfg = VmConfig::default().disk(&disk, fmt).disk(&payload, "raw");
        cfg.guestfwd = lab.guestfwd();
        let mut vm = sc.vm("appliance", cfg)?;
        boot_old(sc, &mut vm)?;
        let r = rollouts(sc, &lab, &mut vm, &b.key, &version, &version2, &mig, &img);
        if r.is_err() {
            println!("[{}] agent log:\n{}", sc.name, agent_log(&vm));
            println!("[{}] controller log:\n{}", sc.name, lab.log_tail());
            return r;
        }
        vm.shutdown(Duration::from_secs(120))
    });
}

#[allow(clippy::too_many_arguments)]
fn rollouts(
    sc: &Scenario,
    lab: &Lab,
    vm: &mut Vm,
    vendor_key: &Path,
    version: &str,
    version2: &str,
    mig: &(String, String, u64),
    img: &(String, String, u64),
) -> Result<()> {
    // The old system says which OS it runs in the agent's version file; only
    // the bundle the agent downloads can be staged.
    vm.ssh_ok(
        "rm -f /var/lib/dualroot/stage/os.bundle && echo 11-legacy >/etc/dualroot-test-version",
    )?;
    mount_payload(vm)?;
    vm.ssh_ok(INSTALL_AGENT)?;
    vm.ssh_ok("systemctl start dualroot-agent.service")?;
    let vm_dev = lab.wait(
        "the VM registered and online as a legacy canary",
        Duration::from_secs(300),
        |l| {
            Ok(l.devices()?
                .into_iter()
                .find(|d| d["labels"]["canary"] == "yes" && d["online"] == true)
                .map(|d| (d["id"].as_str().unwrap_or("").to_string(), d)))
        },
    )?;
    let (vm_dev, d) = vm_dev;
    sc.check(
        "the VM is a legacy device on the old version",
        d["layout"] == "legacy" && d["version"] == "11-legacy",
        &d.to_string(),
    )?;
    lab.wait(
        "every simulated appliance online",
        Duration::from_secs(120),
        |l| {
            let n = l
                .devices()?
                .iter()
                .filter(|d| d["online"] == true && d["layout"] == "legacy")
                .count();
            Ok((n == SIMULATED + 1).then_some(()))
        },
    )?;

    // Rollout 1: the migration, with its vendor-signed plan (the agent carries
    // itself into the new root by the plan's carry list).
    let (plan, signature) = signed_agent_plan(vendor_key)?;
    vm.mark_console();
    let t0 = Instant::now();
    lab.rollout(&spec(
        "migrate-1",
        "migrate",
        version,
        mig,
        json!({"plan": plan, "planSignature": signature}),
    ))?;
    vm.wait_for_console_any(
        &[DONE],
        &[REFUSED, RETRY, GAVE_UP],
        Duration::from_secs(3000),
    )?;
    // the migration is done and the machine reboots into the new OS: not a success yet
    let mid = lab.task_of("migrate-1", &vm_dev)?.unwrap_or(Value::Null);
    sc.check(
        "migrate-1: at the end of the migration, before the new OS booted, the task is not succeeded",
        mid["task"]["state"] != "succeeded" && !mid.is_null(),
        &format!("{}", mid["task"]["state"]),
    )?;
    vm.wait_for_console_any(&[BOOTED], &[GAVE_UP], Duration::from_secs(900))?;
    vm.wait_for_ssh(Duration::from_secs(300))?;
    let new_boot = boot_facts(vm)?;
    let task = lab.task_ended("migrate-1", &vm_dev)?;
    sc.note(
        "migration_rollout_to_vm_success_s",
        &format!("{:.0}", t0.elapsed().as_secs_f64()),
    );
    check_rollout(sc, lab, "migrate-1", &vm_dev, &task, &new_boot)?;
    let d = lab.cli(&["devices", "show", &vm_dev])?;
    sc.check(
        "after rollout 1: the VM is a dualroot device on slot a with the new version, same id",
        d["device"]["layout"] == "dualroot"
            && d["device"]["version"] == version
            && d["device"]["currentBootId"] == new_boot.1.as_str(),
        &d["device"].to_string(),
    )?;

    // Rollout 2: the A/B image to the same fleet, now all on dualroot.
    vm.mark_console();
    let t1 = Instant::now();
    lab.rollout(&spec("image-2", "image", version2, img, json!({})))?;
    vm.wait_for_console_any(&[BOOTED], &[GAVE_UP], Duration::from_secs(2700))?;
    vm.wait_for_ssh(Duration::from_secs(300))?;
    let new_boot = boot_facts(vm)?;
    let task = lab.task_ended("image-2", &vm_dev)?;
    sc.note(
        "image_rollout_to_vm_success_s",
        &format!("{:.0}", t1.elapsed().as_secs_f64()),
    );
    check_rollout(sc, lab, "image-2", &vm_dev, &task, &new_boot)?;
    let st = slot_status(vm)?;
    let d = lab.cli(&["devices", "show", &vm_dev])?;
    sc.check(
        "after rollout 2: the VM runs slot b, confirmed, on v2; the controller agrees",
        st["booted"] == "b"
            && slot(&st, "b")["state"] == "good"
            && d["device"]["version"] == version2
            && d["device"]["slot"] == "b",
        &format!("slot status {st}; device {}", d["device"]),
    )?;
    let all = lab.devices()?;
    sc.check(
        "one registration for the VM over both rollouts",
        all.len() == SIMULATED + 1
            && all
                .iter()
                .filter(|d| d["labels"]["canary"] == "yes")
                .count()
                == 1,
        &format!("{} devices", all.len()),
    )
}
