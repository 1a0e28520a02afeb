//! The daemon: MQTT transport ([`mqtt`]), journal-first task intake
//! ([`intake`]), per-type workers ([`workers`]), persistent outbox
//! ([`outbox`]), first-boot confirmation ([`boot`]), reconnect [`backoff`].

mod boot;
mod intake;
mod mqtt;
mod outbox;
mod workers;

pub use crate::backoff::{transport_limit, Backoff};

use crate::config::Config;
use crate::engine::{DualrootCli, Engine};
use crate::failpoint;
use crate::journal::Journal;
use crate::protocol::{Topics, TASK_TYPES, TEST_TASK};
use crate::services::{KubectlAdapter, ServiceAdapter};
use anyhow::{Context, Result};
use rumqttc::Client;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

pub struct Agent {
    pub cfg: Config,
    pub device_id: String,
    pub topics: Topics,
    pub journal: Arc<Journal>,
    pub engine: Arc<dyn Engine>,
    pub services: Arc<dyn ServiceAdapter>,
    client: Mutex<Option<Client>>,
    connected: AtomicBool,
    wakers: Mutex<HashMap<String, mpsc::Sender<()>>>,
    outbox_wake: Mutex<Option<mpsc::Sender<()>>>,
    /// One download at a time.
    pub download_lock: Mutex<()>,
    /// Orders a cancel against a task passing its point of no return
    /// (`tasks::cancel`).
    pub cancel_lock: Mutex<()>,
    /// Set on SIGTERM: workers take no new task.
    stopping: Arc<AtomicBool>,
    /// Workers currently running a task.
    busy: std::sync::atomic::AtomicUsize,
}

impl Agent {
    pub fn new(cfg: Config) -> Result<Arc<Agent>> {
        crate::config::data_dir_ready(
            &cfg.data_dir,
            &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        )?;
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let device_id = crate::registration::device_id(&cfg)?;
        let engine = Arc::new(DualrootCli {
            bin: cfg.dualroot_bin.clone(),
            reboot_command: cfg.upgrade.reboot_command.clone(),
        });
        let services = Arc::new(KubectlAdapter {
            kubectl: cfg.services.kubectl.clone(),
            image_import: cfg.services.image_import.clone(),
        });
        Agent::with_parts(cfg, device_id, engine, services)
    }

    pub fn with_parts(
        cfg: Config,
        device_id: String,
        engine: Arc<dyn Engine>,
        services: Arc<dyn ServiceAdapter>,
    ) -> Result<Arc<Agent>> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        crate::registration::check_device_id(&device_id)?;
        let journal = Arc::new(Journal::open(&cfg.journal_path())?);
        Ok(Arc::new(Agent {
            topics: Topics::new(&cfg.mqtt.topic_prefix, &device_id),
            device_id,
            cfg,
            journal,
            engine,
            services,
            client: Mutex::new(None),
            connected: AtomicBool::new(false),
            wakers: Mutex::new(HashMap::new()),
            outbox_wake: Mutex::new(None),
            download_lock: Mutex::new(()),
            cancel_lock: Mutex::new(()),
            stopping: Arc::new(AtomicBool::new(false)),
            busy: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    pub fn task_types(&self) -> Vec<&'static str> {
        let mut v = TASK_TYPES.to_vec();
        if self.cfg.debug.test_tasks {
            v.push(TEST_TASK);
        }
        v
    }

    fn failpoint(&self, name: &str) {
        failpoint::hit(name, &self.cfg.data_dir);
    }

    fn wake(&self, task_type: &str) {
        if let Some(tx) = self
            .wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(task_type)
        {
            let _ = tx.send(());
        }
    }

    pub fn wake_outbox(&self) {
        if let Some(tx) = &*self.outbox_wake.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = tx.send(());
        }
    }

    fn client(&self) -> Option<Client> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs the agent until the MQTT request channel closes (never, in the daemon).
    pub fn run(self: &Arc<Self>) -> Result<()> {
        self.recover()?;
        self.purge();
        for t in self.task_types() {
            let (tx, rx) = mpsc::channel();
            self.wakers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(t.to_string(), tx);
            let me = self.clone();
            std::thread::Builder::new()
                .name(format!("worker-{t}"))
                .spawn(move || me.worker(t, rx))
                .context("spawning worker")?;
        }
        let (otx, orx) = mpsc::channel();
        *self.outbox_wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(otx);
        let me = self.clone();
        std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || me.outbox_loop(orx))
            .context("spawning outbox")?;
        if self.cfg.backend.url.is_some() {
            let me = self.clone();
            std::thread::Builder::new()
                .name("token".into())
                .spawn(move || crate::registration::refresh_loop(&me.cfg))
                .context("spawning token refresher")?;
        }

        signal_hook::flag::register(signal_hook::consts::SIGTERM, self.stopping.clone())
            .context("installing the SIGTERM handler")?;
        signal_hook::flag::register(signal_hook::consts::SIGINT, self.stopping.clone())
            .context("installing the SIGINT handler")?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("stop".into())
            .spawn(move || me.stop_watch())
            .context("spawning stop watcher")?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("confirm-boot".into())
            .spawn(move || me.confirm_boot())
            .context("spawning boot confirmation")?;
        self.mqtt_loop()
    }
}
