//! Agent configuration (TOML).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Device id; when absent, taken from the token file written by registration.
    #[serde(default)]
    pub device_id: Option<String>,
    /// Firmware version string; when absent, read from `firmware_version_file`.
    #[serde(default)]
    pub firmware_version: Option<String>,
    #[serde(default = "d_fw_file")]
    pub firmware_version_file: PathBuf,
    /// Journal, outbox, downloads, token file.
    #[serde(default = "d_data_dir")]
    pub data_dir: PathBuf,
    /// The engine binary (`dualroot`), for `slot status/install/switch/confirm` and `stage`.
    #[serde(default = "d_dualroot")]
    pub dualroot_bin: String,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub journal: JournalConfig,
    #[serde(default)]
    pub backend: BackendConfig,
    #[serde(default)]
    pub services: ServicesConfig,
    #[serde(default)]
    pub upgrade: UpgradeConfig,
    #[serde(default)]
    pub logs: LogsConfig,
    #[serde(default)]
    pub debug: DebugConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub topic_prefix: String,
    pub tls: bool,
    /// PEM CA bundle for TLS; system roots are not loaded.
    pub ca_file: Option<PathBuf>,
    pub keep_alive_secs: u64,
    /// The broker's persistent session expiry (mosquitto `persistent_client_expiration`).
    pub session_expiry_secs: u64,
    /// Largest task payload accepted; bigger ones get an error result.
    pub max_payload_bytes: usize,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Unacknowledged outbox messages are published again after this long.
    pub outbox_retry_secs: u64,
    /// Use device id / device token as MQTT username / password when registered.
    pub use_device_token: bool,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            topic_prefix: "dualroot".into(),
            tls: false,
            ca_file: None,
            keep_alive_secs: 30,
            session_expiry_secs: 7 * 86400,
            max_payload_bytes: 256 * 1024,
            backoff_initial_ms: 500,
            backoff_max_ms: 60_000,
            outbox_retry_secs: 15,
            use_device_token: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Finished entries are forgotten after this long; must exceed the session expiry.
    pub ttl_secs: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            ttl_secs: 14 * 86400,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// Base URL of the backend API (`/register`, `/token/refresh`).
    pub url: Option<String>,
    /// Where registration stores device id and token (mode 0600). Default `<data_dir>/token.json`.
    pub token_file: Option<PathBuf>,
    /// File holding the register token (JWT), used to re-register on 401.
    pub register_token_file: Option<PathBuf>,
    /// Refresh when this fraction of the token lifetime is left (0..1).
    pub refresh_fraction: f64,
    /// PEM CA bundle for HTTPS to the backend and downloads (default: Mozilla roots).
    pub ca_file: Option<PathBuf>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            url: None,
            token_file: None,
            register_token_file: None,
            refresh_fraction: 0.25,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    pub kubectl: Vec<String>,
    /// Command that imports an image tarball (path appended).
    pub image_import: Vec<String>,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        ServicesConfig {
            kubectl: vec!["kubectl".into()],
            image_import: vec![
                "ctr".into(),
                "-n".into(),
                "k8s.io".into(),
                "images".into(),
                "import".into(),
            ],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpgradeConfig {
    pub reboot_command: Vec<String>,
    /// Changes on every boot; tells "rebooted" from "agent restarted".
    pub boot_id_file: PathBuf,
    /// After the reboot into the new slot, wait this long for services to be
    /// healthy before giving up (the slot is then not confirmed).
    pub health_timeout_secs: u64,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        UpgradeConfig {
            reboot_command: vec!["systemctl".into(), "reboot".into()],
            boot_id_file: "/proc/sys/kernel/random/boot_id".into(),
            health_timeout_secs: 600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// Files and directories put into the collectLogs archive.
    pub paths: Vec<PathBuf>,
    /// Also add `journalctl` output (last N lines, 0 = none).
    pub journalctl_lines: u32,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            paths: vec![
                "/var/log/dualroot-agent.log".into(),
                "/var/log/dualroot".into(),
            ],
            journalctl_lines: 5000,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugConfig {
    /// Enables the `test.sleep` task type (tests and benchmark only).
    pub test_tasks: bool,
}

fn d_fw_file() -> PathBuf {
    "/etc/dualroot/version".into()
}
fn d_data_dir() -> PathBuf {
    "/var/lib/dualroot-agent".into()
}
fn d_dualroot() -> String {
    "dualroot".into()
}

impl Config {
    pub fn parse(text: &str) -> Result<Config> {
        let c: Config = toml::from_str(text).context("parsing agent config")?;
        c.validate()?;
        Ok(c)
    }

    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn validate(&self) -> Result<()> {
        if self.journal.ttl_secs <= self.mqtt.session_expiry_secs {
            bail!(
                "journal.ttl_secs ({}) must be longer than mqtt.session_expiry_secs ({}): \
                 a redelivered task must still be found in the journal",
                self.journal.ttl_secs,
                self.mqtt.session_expiry_secs
            );
        }
        if self.mqtt.max_payload_bytes == 0 {
            bail!("mqtt.max_payload_bytes must be > 0");
        }
        if self.mqtt.topic_prefix.is_empty() || self.mqtt.topic_prefix.contains(['+', '#']) {
            bail!("mqtt.topic_prefix must be non-empty and without wildcards");
        }
        if !(0.0..1.0).contains(&self.backend.refresh_fraction) {
            bail!("backend.refresh_fraction must be in [0, 1)");
        }
        Ok(())
    }

    pub fn token_file(&self) -> PathBuf {
        self.backend
            .token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("token.json"))
    }

    pub fn journal_path(&self) -> PathBuf {
        self.data_dir.join("journal.sqlite")
    }

    pub fn firmware_version(&self) -> String {
        if let Some(v) = &self.firmware_version {
            return v.clone();
        }
        std::fs::read_to_string(&self.firmware_version_file)
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../dualroot-agent.example.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.mqtt.topic_prefix, "dualroot");
        assert!(c.journal.ttl_secs > c.mqtt.session_expiry_secs);
    }

    #[test]
    fn minimal_config_uses_defaults() {
        let c = Config::parse("device_id = \"d1\"\n").unwrap();
        assert_eq!(c.mqtt.port, 1883);
        assert_eq!(
            c.token_file(),
            PathBuf::from("/var/lib/dualroot-agent/token.json")
        );
    }

    #[test]
    fn ttl_shorter_than_session_is_rejected() {
        let err = Config::parse("[mqtt]\nsession_expiry_secs = 100\n[journal]\nttl_secs = 50\n")
            .unwrap_err();
        assert!(format!("{err:#}").contains("ttl_secs"));
    }

    #[test]
    fn unknown_key_is_rejected() {
        assert!(Config::parse("nonsense = 1\n").is_err());
    }
}
