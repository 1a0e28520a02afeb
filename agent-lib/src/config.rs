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
    /// Firmware version string; when absent, see [`Config::firmware_version_with`].
    #[serde(default)]
    pub firmware_version: Option<String>,
    /// A file the OS image ships with its version. When absent: the booted
    /// slot's bundle version on an A/B appliance, else [`LEGACY_VERSION_FILE`].
    #[serde(default)]
    pub firmware_version_file: Option<PathBuf>,
    /// Journal, outbox, downloads, token file. Default: `/data/dualroot-agent`
    /// when `/data` (the shared `data` LV of an A/B appliance) is a mount
    /// point, so both slots see the same identity and journal; else
    /// `/var/lib/dualroot-agent`.
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
    pub downloads: DownloadsConfig,
    #[serde(default)]
    pub debug: DebugConfig,
    /// Labs only: allow a plain-text or unauthenticated broker and a plain
    /// `http` backend. Without it the agent refuses to start on such a
    /// configuration ([`Config::check_transport`]).
    #[serde(default)]
    pub insecure: bool,
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
    /// PEM client certificate (chain, leaf first) for brokers that require
    /// one (AWS IoT Core, mosquitto `require_certificate true`). Needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert` (PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<PathBuf>,
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
            client_cert: None,
            client_key: None,
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
    /// Directory of trusted vendor keys (`*.pub`, the format of the engine's
    /// bundle keyring); a service package must carry a signature by one of them.
    pub keyring: PathBuf,
    /// Kinds a package may create, as `group/Kind` (`Kind` alone for the
    /// core group, e.g. `ConfigMap`, `apps/Deployment`). All are namespaced.
    pub allowed_kinds: Vec<String>,
}

/// Namespaced kinds a service package may hold by default: workloads and
/// their configuration. No cluster-scoped kind, no RBAC.
pub const DEFAULT_ALLOWED_KINDS: &[&str] = &[
    "ConfigMap",
    "Secret",
    "Service",
    "ServiceAccount",
    "PersistentVolumeClaim",
    "Pod",
    "apps/Deployment",
    "apps/StatefulSet",
    "apps/DaemonSet",
    "batch/Job",
    "batch/CronJob",
    "networking.k8s.io/Ingress",
    "networking.k8s.io/NetworkPolicy",
    "autoscaling/HorizontalPodAutoscaler",
    "policy/PodDisruptionBudget",
];

impl Default for ServicesConfig {
    fn default() -> Self {
        ServicesConfig {
            keyring: "/etc/dualroot/keyring".into(),
            allowed_kinds: DEFAULT_ALLOWED_KINDS
                .iter()
                .map(|k| k.to_string())
                .collect(),
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
    /// Where a refused migration leaves its reason on the old system (the
    /// engine's `migration-result.json`); reported once as `migrationRefused`.
    pub migration_result_file: PathBuf,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        UpgradeConfig {
            reboot_command: vec!["systemctl".into(), "reboot".into()],
            boot_id_file: "/proc/sys/kernel/random/boot_id".into(),
            health_timeout_secs: 600,
            migration_result_file: "/var/lib/dualroot/migration-result.json".into(),
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadsConfig {
    /// Largest download accepted, in bytes (a task's `size` lowers it).
    pub max_bytes: u64,
    /// An attempt that receives no byte for this long fails; the next resumes.
    pub stall_timeout_secs: u64,
    /// Limit for one attempt, request and body (0 = none).
    pub attempt_timeout_secs: u64,
    /// `http://` download and upload URLs are refused unless set (labs: the
    /// payload is still hash- and signature-checked, but neither the transfer
    /// nor an uploaded log bundle is private).
    pub allow_http: bool,
    /// URLs naming a loopback, link-local or unspecified address (or
    /// `localhost`) are refused unless set: a task must not make the agent talk
    /// to the appliance itself or to a cloud metadata service (169.254.169.254).
    /// Only literal addresses and `localhost` are checked; names are not resolved.
    pub allow_local: bool,
    /// When not empty, the only hosts (names or address literals, exact match)
    /// download and upload URLs may name.
    pub allow_hosts: Vec<String>,
}

impl Default for DownloadsConfig {
    fn default() -> Self {
        DownloadsConfig {
            max_bytes: 16 << 30,
            stall_timeout_secs: 60,
            attempt_timeout_secs: 6 * 3600,
            allow_http: false,
            allow_local: false,
            allow_hosts: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugConfig {
    /// Enables the `test.sleep` task type (tests and benchmark only).
    pub test_tasks: bool,
}

/// The version file of a system without slots (before its migration). Not
/// used on an A/B appliance unless configured: the engine carries
/// `/etc/dualroot` into every new slot, so it would keep the first version.
pub const LEGACY_VERSION_FILE: &str = "/etc/dualroot/version";
/// State directory when the shared data LV is mounted at `/data`.
pub const DATA_LV_STATE_DIR: &str = "/data/dualroot-agent";
/// State directory otherwise (and before this release).
pub const LEGACY_STATE_DIR: &str = "/var/lib/dualroot-agent";

/// Whether `point` is a mount point according to `/proc/self/mountinfo`
/// text (field 5 is the mount point, with spaces escaped as `\040`).
pub fn is_mount_point_in(mountinfo: &str, point: &str) -> bool {
    mountinfo.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| m.replace("\\040", " ") == point)
    })
}

/// Whether an fstab text mounts something at `point`.
pub fn fstab_mounts(fstab: &str, point: &str) -> bool {
    fstab.lines().any(|l| {
        let l = l.trim();
        !l.starts_with('#') && l.split_whitespace().nth(1) == Some(point)
    })
}

/// The default state directory for this machine's mount table and fstab: the
/// data LV's when `/data` is mounted *or* is in fstab (an A/B appliance whose
/// `nofail` data mount is late must not make the agent start on
/// `/var/lib/dualroot-agent` with a second identity and an empty journal:
/// tasks would run twice; [`data_dir_ready`] makes it wait instead).
pub fn default_data_dir_for(mountinfo: &str, fstab: &str) -> PathBuf {
    if is_mount_point_in(mountinfo, "/data") || fstab_mounts(fstab, "/data") {
        DATA_LV_STATE_DIR.into()
    } else {
        LEGACY_STATE_DIR.into()
    }
}

/// Refuses to start on a state directory under `/data` while `/data` is not
/// mounted (its files would land on the root filesystem, under the mount point).
/// systemd starts the agent again (`Restart=always`).
pub fn data_dir_ready(data_dir: &Path, mountinfo: &str) -> Result<()> {
    if data_dir.starts_with("/data") && !is_mount_point_in(mountinfo, "/data") {
        anyhow::bail!(
            "the state directory {} is on the data LV, which is not mounted at /data yet; exiting so systemd starts the agent again once it is (starting elsewhere would make a second identity and run tasks twice)",
            data_dir.display()
        );
    }
    Ok(())
}

/// State files an agent keeps in its data directory that identify the device
/// and hold its task history (downloads and packages are fetched again).
const STATE_FILES: &[&str] = &[
    "journal.sqlite",
    "journal.sqlite-wal",
    "journal.sqlite-shm",
    "token.json",
    "register-token",
];

/// First start with the state directory on the data LV while the state of an
/// earlier agent is still in `from` (the old default on this root): copies
/// it to `to` so the device keeps its id, token and journal. Does nothing
/// when `to` already holds a journal or token, or `from` holds neither.
/// Returns the files copied. Runs before the journal is opened.
pub fn adopt_legacy_state(from: &Path, to: &Path) -> Result<Vec<String>> {
    let has = |d: &Path| {
        ["journal.sqlite", "token.json"]
            .iter()
            .any(|f| d.join(f).exists())
    };
    if has(to) || !has(from) {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut copied = Vec::new();
    for f in STATE_FILES {
        let src = from.join(f);
        if !src.is_file() {
            continue;
        }
        let tmp = to.join(format!("{f}.adopting"));
        std::fs::copy(&src, &tmp)
            .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
        std::fs::File::open(&tmp)
            .and_then(|t| t.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
        copied.push(f.to_string());
    }
    // the renames come last, so a crash before them leaves `to` without a
    // journal and the copy is simply done again
    for f in &copied {
        let tmp = to.join(format!("{f}.adopting"));
        std::fs::rename(&tmp, to.join(f))
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
    }
    Ok(copied)
}

impl Config {
    /// At start, when the state directory is the data LV default: take over
    /// the state an earlier agent left in the old default directory.
    pub fn adopt_legacy_state(&self) -> Result<()> {
        if self.data_dir != Path::new(DATA_LV_STATE_DIR) {
            return Ok(());
        }
        let from = Path::new(LEGACY_STATE_DIR);
        let copied = adopt_legacy_state(from, &self.data_dir).with_context(|| {
            format!(
                "taking over the agent state in {} (the device would otherwise register again)",
                from.display()
            )
        })?;
        if !copied.is_empty() {
            log::info!(
                "state directory is now {} (the data LV, shared by both slots): copied {} from {}",
                self.data_dir.display(),
                copied.join(", "),
                from.display()
            );
        }
        Ok(())
    }
}

fn d_data_dir() -> PathBuf {
    default_data_dir_for(
        &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        &std::fs::read_to_string("/etc/fstab").unwrap_or_default(),
    )
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
        match (&self.mqtt.client_cert, &self.mqtt.client_key) {
            (Some(_), None) | (None, Some(_)) => bail!(
                "mqtt.client_cert and mqtt.client_key go together: set both (PEM files) or neither"
            ),
            (Some(_), Some(_)) if !self.mqtt.tls => {
                bail!("mqtt.client_cert needs mqtt.tls = true")
            }
            _ => {}
        }
        if self.downloads.max_bytes == 0 || self.downloads.stall_timeout_secs == 0 {
            bail!("downloads.max_bytes and downloads.stall_timeout_secs must be > 0");
        }
        Ok(())
    }

    /// The broker and the backend must be reached over TLS and the broker must
    /// authenticate the device (client certificate, or device id and token):
    /// otherwise anyone on the path, or any other device, could send this one
    /// tasks. `insecure = true` allows it for labs; the returned lines say what
    /// is insecure, for the log.
    pub fn check_transport(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        if !self.mqtt.tls {
            problems.push(format!(
                "mqtt.tls is false: the connection to {}:{} would be plain text (set mqtt.tls = true and mqtt.ca_file)",
                self.mqtt.host, self.mqtt.port
            ));
        }
        if self.mqtt.client_cert.is_none() && !self.mqtt.use_device_token {
            problems.push(
                "the broker does not authenticate this device: set mqtt.client_cert and mqtt.client_key, or mqtt.use_device_token = true (device id and token as MQTT user and password)".to_string(),
            );
        }
        if let Some(url) = &self.backend.url {
            if !url.starts_with("https://") {
                problems.push(format!(
                    "backend.url {} is not https: registration and tokens would travel in plain text",
                    crate::redact::url(url)
                ));
            }
        }
        if problems.is_empty() || self.insecure {
            return Ok(problems);
        }
        bail!(
            "refusing to start with an insecure transport: {}. Set insecure = true only for a lab; the agent stops here and connects to nothing",
            problems.join("; ")
        )
    }

    pub fn token_file(&self) -> PathBuf {
        self.backend
            .token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("token.json"))
    }

    /// The client certificate pair for MQTT over TLS, when configured.
    pub fn mqtt_client_cert(&self) -> Option<crate::tls::ClientCert<'_>> {
        Some(crate::tls::ClientCert {
            cert: self.mqtt.client_cert.as_deref()?,
            key: self.mqtt.client_key.as_deref()?,
        })
    }

    pub fn journal_path(&self) -> PathBuf {
        self.data_dir.join("journal.sqlite")
    }

    /// The firmware version without the engine's view (registration, an old
    /// system): see [`Config::firmware_version_with`].
    pub fn firmware_version(&self) -> String {
        self.firmware_version_with(None)
    }

    /// The firmware version the backend sees: `firmware_version` if set, else
    /// the configured `firmware_version_file`, else `slot_version` (the booted
    /// slot's bundle version from `dualroot slot status`), else
    /// [`LEGACY_VERSION_FILE`], else "unknown".
    pub fn firmware_version_with(&self, slot_version: Option<&str>) -> String {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .ok()
                .filter(|s| !s.is_empty())
        };
        if let Some(v) = &self.firmware_version {
            return v.clone();
        }
        if let Some(f) = &self.firmware_version_file {
            return read(f).unwrap_or_else(|| "unknown".into());
        }
        slot_version
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .or_else(|| read(Path::new(LEGACY_VERSION_FILE)))
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
        let here = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let fstab = std::fs::read_to_string("/etc/fstab").unwrap_or_default();
        assert_eq!(
            c.token_file(),
            default_data_dir_for(&here, &fstab).join("token.json")
        );
        assert_eq!(c.services.keyring, PathBuf::from("/etc/dualroot/keyring"));
    }

    #[test]
    fn firmware_version_prefers_config_then_its_file_then_the_booted_slot() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("os-release-version");
        std::fs::write(&f, "13.2\n").unwrap();
        let c = Config::parse("firmware_version = \"9.4.1\"\n").unwrap();
        assert_eq!(c.firmware_version_with(Some("13.1")), "9.4.1");
        let c = Config::parse(&format!("firmware_version_file = \"{}\"\n", f.display())).unwrap();
        assert_eq!(c.firmware_version_with(Some("13.1")), "13.2");
        // a configured file that is missing is "unknown", not another source
        let c = Config::parse("firmware_version_file = \"/nonexistent/v\"\n").unwrap();
        assert_eq!(c.firmware_version_with(Some("13.1")), "unknown");
        // nothing configured: the booted slot's bundle version (after an A/B
        // upgrade the carried /etc/dualroot/version would still be the old one)
        let c = Config::parse("").unwrap();
        assert_eq!(c.firmware_version_with(Some("13.1")), "13.1");
        let fallback = std::fs::read_to_string(LEGACY_VERSION_FILE)
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into());
        assert_eq!(c.firmware_version_with(None), fallback);
        assert_eq!(c.firmware_version_with(Some("")), fallback);
    }

    #[test]
    fn state_goes_to_the_data_lv_when_it_is_mounted() {
        // captured from a migrated appliance and from a plain host
        let ab = "22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/VA-root rw\n\
                  23 22 8:2 / /boot rw,relatime shared:2 - ext4 /dev/sda2 rw\n\
                  24 22 253:2 / /data rw,relatime shared:3 - ext4 /dev/mapper/VA-data rw\n";
        let plain = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                     30 22 8:1 /srv/data /srv/data rw - ext4 /dev/sda1 rw\n";
        assert_eq!(
            default_data_dir_for(ab, ""),
            PathBuf::from(DATA_LV_STATE_DIR)
        );
        assert_eq!(
            default_data_dir_for(plain, ""),
            PathBuf::from(LEGACY_STATE_DIR)
        );
        assert_eq!(
            default_data_dir_for("", ""),
            PathBuf::from(LEGACY_STATE_DIR)
        );
        // Issue 23 item 10: a slot whose nofail /data is not mounted yet still
        // keeps its identity on the data LV, and the agent waits for it.
        let slot_fstab = "# Written by dualroot.\n/dev/mapper/VA-root / ext4 errors=remount-ro 0 1\nLABEL=boot /boot ext4 defaults 0 2\n/dev/mapper/VA-data /data ext4 defaults,nofail 0 2\n";
        let early = "22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/VA-root rw\n";
        let dir = default_data_dir_for(early, slot_fstab);
        assert_eq!(dir, PathBuf::from(DATA_LV_STATE_DIR));
        let e = data_dir_ready(&dir, early).unwrap_err().to_string();
        assert!(e.contains("not mounted at /data yet"), "{e}");
        data_dir_ready(&dir, ab).unwrap();
        data_dir_ready(Path::new(LEGACY_STATE_DIR), early).unwrap();
        assert!(!fstab_mounts("# /dev/x /data ext4\n", "/data"));
        // the config still overrides it
        let c = Config::parse("data_dir = \"/srv/agent\"\n").unwrap();
        assert_eq!(c.journal_path(), PathBuf::from("/srv/agent/journal.sqlite"));
    }

    #[test]
    fn earlier_state_is_taken_over_once_and_never_over_existing_state() {
        let d = tempfile::tempdir().unwrap();
        let (old, new) = (d.path().join("var-lib"), d.path().join("data"));
        std::fs::create_dir_all(&old).unwrap();
        // nothing to take over
        assert!(adopt_legacy_state(&old, &new).unwrap().is_empty());
        std::fs::write(old.join("journal.sqlite"), "J").unwrap();
        std::fs::write(old.join("token.json"), "T").unwrap();
        std::fs::write(old.join("journal.sqlite.part"), "junk").unwrap();
        let copied = adopt_legacy_state(&old, &new).unwrap();
        assert_eq!(copied, vec!["journal.sqlite", "token.json"]);
        assert_eq!(
            std::fs::read_to_string(new.join("token.json")).unwrap(),
            "T"
        );
        assert!(old.join("token.json").exists(), "copied, not moved");
        assert!(!new.join("token.json.adopting").exists());
        // the new directory has state now: never overwritten
        std::fs::write(old.join("token.json"), "OLDER").unwrap();
        assert!(adopt_legacy_state(&old, &new).unwrap().is_empty());
        assert_eq!(
            std::fs::read_to_string(new.join("token.json")).unwrap(),
            "T"
        );
    }

    #[test]
    fn transport_needs_tls_and_device_authentication_unless_insecure() {
        let plain = Config::parse("").unwrap();
        let e = format!("{:#}", plain.check_transport().unwrap_err());
        assert!(e.contains("mqtt.tls is false"), "{e}");
        assert!(e.contains("does not authenticate this device"), "{e}");
        assert!(e.contains("connects to nothing"), "{e}");

        let token = Config::parse("[mqtt]\ntls = true\nuse_device_token = true\n[backend]\nurl = \"https://b.example/api\"\n").unwrap();
        assert!(token.check_transport().unwrap().is_empty());
        let cert = Config::parse(
            "[mqtt]\ntls = true\nclient_cert = \"/c.pem\"\nclient_key = \"/k.pem\"\n",
        )
        .unwrap();
        assert!(cert.check_transport().unwrap().is_empty());

        let http = Config::parse("[mqtt]\ntls = true\nuse_device_token = true\n[backend]\nurl = \"http://b.example/api?k=secret\"\n").unwrap();
        let e = format!("{:#}", http.check_transport().unwrap_err());
        assert!(e.contains("is not https"), "{e}");
        assert!(!e.contains("secret"), "URLs are redacted: {e}");

        let lab = Config::parse("insecure = true\n").unwrap();
        let lines = lab.check_transport().unwrap();
        assert_eq!(lines.len(), 2, "{lines:?}");
    }

    #[test]
    fn client_cert_needs_key_and_tls() {
        let e = Config::parse("[mqtt]\ntls = true\nclient_cert = \"/c.pem\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("client_key"), "{e:#}");
        let e = Config::parse("[mqtt]\nclient_cert = \"/c.pem\"\nclient_key = \"/k.pem\"\n")
            .unwrap_err();
        assert!(format!("{e:#}").contains("tls"), "{e:#}");
        let c = Config::parse(
            "[mqtt]\ntls = true\nclient_cert = \"/c.pem\"\nclient_key = \"/k.pem\"\n",
        )
        .unwrap();
        assert!(c.mqtt_client_cert().is_some());
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
