//! The typed, versioned JSON contract between the `dualroot` engine and whoever
//! drives it (the agent, the QEMU harness, an operator's script).
//!
//! The engine prints these types (`slot status --json`, `slot install --json`, the
//! migration result it leaves on the old root); the agent decodes them with
//! [`decode`], which refuses a document of another `api_version` with a sentence
//! that says so. Unknown fields are errors: a drift between engine and agent shows
//! up as a failing test, never as a silently wrong guess.

pub mod wire;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt;

/// Bumped on every incompatible change of any type below.
pub const API_VERSION: u32 = 2;

/// Exit codes of `dualroot migrate` (the dracut hook acts on them).
pub mod exit {
    /// Migration finished: reboot into the new OS.
    pub const DONE: u8 = 0;
    /// Refused or failed before the point of no return: the old system boots untouched.
    pub const REFUSED: u8 = 2;
    /// Failed after the point of no return: reboot; the recovery entry resumes.
    pub const RETRY: u8 = 3;
    /// A step failed too often, or the stash is incomplete: stop and say so (the hook powers off).
    pub const GAVE_UP: u8 = 4;
    /// A step inside the unrecoverable window kept failing and the old disk was
    /// put back from the undo record: the old system boots (the hook reboots).
    pub const UNDONE: u8 = 5;
}

/// One of the two root slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The name used on the kernel command line, in grubenv and in `/boot/<name>`.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The logical volume holding the slot's root.
    pub fn lv(self) -> &'static str {
        match self {
            Slot::A => "root",
            Slot::B => "back",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `a`/`b` (any case).
    pub fn parse(s: &str) -> Option<Slot> {
        match s.to_ascii_lowercase().as_str() {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A slot's state in the GRUB environment block. Only `Trying` and `Good` are
/// bootable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// No complete OS: never installed, or being overwritten.
    Empty,
    /// Complete, never booted; `switch` makes it primary.
    Installed,
    /// Primary and unconfirmed: GRUB counts its tries down.
    Trying,
    /// Confirmed by its health check.
    Good,
    /// GRUB gave up on it.
    Bad,
}

impl SlotState {
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Empty => "empty",
            SlotState::Installed => "installed",
            SlotState::Trying => "trying",
            SlotState::Good => "good",
            SlotState::Bad => "bad",
        }
    }

    /// The grubenv spelling; anything unknown reads as `Empty` (never booted).
    pub fn from_env(s: &str) -> SlotState {
        match s {
            "installed" => SlotState::Installed,
            "trying" => SlotState::Trying,
            "good" => SlotState::Good,
            "bad" => SlotState::Bad,
            _ => SlotState::Empty,
        }
    }

    pub fn bootable(self) -> bool {
        matches!(self, SlotState::Trying | SlotState::Good)
    }
}

impl fmt::Display for SlotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One slot in `dualroot slot status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotInfo {
    pub slot: Slot,
    pub lv: String,
    pub state: SlotState,
    /// Tries left before GRUB falls back (only while `trying`).
    pub tries_left: Option<usize>,
    pub os_id: Option<String>,
    pub version: Option<String>,
    /// The kernel version the slot boots (since version 2).
    pub kernel: Option<String>,
    /// The slot's last kernel update did not come up and GRUB went back to
    /// the slot's previous kernel (omitted when false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kernel_fell_back: bool,
}

/// `dualroot slot status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotStatus {
    pub api_version: u32,
    /// The slot this system booted from (`None` when the boot did not come from a
    /// dualroot slot entry).
    pub booted: Option<Slot>,
    pub primary: Slot,
    /// The slot GRUB gave up on, when the last boots fell back.
    pub fallback_from: Option<Slot>,
    pub last_boot_was_fallback: bool,
    /// How many tries the failed slot used before GRUB fell back.
    pub fallback_tries_used: Option<usize>,
    /// The booted slot's OS version.
    pub version: Option<String>,
    /// A migration is still in progress (recovery entry armed).
    pub migrating: bool,
    pub slots: Vec<SlotInfo>,
}

impl SlotStatus {
    pub fn slot(&self, s: Slot) -> Option<&SlotInfo> {
        self.slots.iter().find(|i| i.slot == s)
    }

    /// The booted slot is confirmed good.
    pub fn booted_good(&self) -> bool {
        self.booted
            .and_then(|b| self.slot(b))
            .is_some_and(|i| i.state == SlotState::Good)
    }
}

/// `dualroot slot install --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallReport {
    pub api_version: u32,
    pub slot: Slot,
    pub lv: String,
    pub state: SlotState,
    pub os_id: String,
    pub version: String,
    pub entries: u64,
    pub unpack_seconds: f64,
    pub seconds: f64,
    /// What to run next, in words.
    pub next: String,
}

/// How a migration ended, as left for the old system (refusal) or the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationOutcome {
    /// Refused before the point of no return: the old system boots unchanged.
    Refused,
    /// A step inside the unrecoverable window kept failing; the old disk was put
    /// back from the undo record and the old system boots.
    Undone,
    Done,
}

/// `var/lib/dualroot/migration-result.json` on the old root after a refusal or an undo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationResult {
    pub api_version: u32,
    pub outcome: MigrationOutcome,
    /// The step that failed (an undo; a refusal names it in `reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// One sentence: what was found.
    pub reason: String,
    /// What the machine does next.
    pub next: String,
    pub time_unix: f64,
    /// The migration journal at the time (engine-defined, for people).
    pub journal: serde_json::Value,
}

/// Decodes one contract document, refusing another `api_version` with a sentence.
pub fn decode<T: DeserializeOwned>(what: &str, text: &str) -> Result<T, String> {
    #[derive(Deserialize)]
    struct Version {
        api_version: Option<u32>,
    }
    let v: Version = serde_json::from_str(text)
        .map_err(|e| format!("{what}: not a JSON object from dualroot: {e}"))?;
    match v.api_version {
        Some(API_VERSION) => {}
        Some(n) => {
            return Err(format!(
                "{what}: dualroot speaks contract version {n}, this program version {API_VERSION}; update the agent and the engine together"
            ))
        }
        None => {
            return Err(format!(
                "{what}: the JSON has no api_version: it was not printed by a dualroot that speaks contract version {API_VERSION}"
            ))
        }
    }
    serde_json::from_str(text).map_err(|e| format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> SlotStatus {
        SlotStatus {
            api_version: API_VERSION,
            booted: Some(Slot::B),
            primary: Slot::B,
            fallback_from: None,
            last_boot_was_fallback: false,
            fallback_tries_used: None,
            version: Some("13.2".into()),
            migrating: false,
            slots: vec![
                SlotInfo {
                    slot: Slot::A,
                    lv: "root".into(),
                    state: SlotState::Good,
                    tries_left: None,
                    os_id: Some("debian".into()),
                    version: Some("13".into()),
                    kernel: Some("6.12.117+deb13-amd64".into()),
                    kernel_fell_back: false,
                },
                SlotInfo {
                    slot: Slot::B,
                    lv: "back".into(),
                    state: SlotState::Trying,
                    tries_left: Some(2),
                    os_id: Some("debian".into()),
                    version: Some("13.2".into()),
                    kernel: None,
                    kernel_fell_back: false,
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_spellings() {
        let s = status();
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains(r#""booted":"b""#), "{text}");
        assert!(text.contains(r#""state":"trying""#), "{text}");
        let back: SlotStatus = decode("slot status", &text).unwrap();
        assert_eq!(back, s);
        assert!(!back.booted_good());
    }

    #[test]
    fn other_versions_and_guessed_shapes_are_refused() {
        let text = serde_json::to_string(&status())
            .unwrap()
            .replace(r#""api_version":2"#, r#""api_version":7"#);
        let e = decode::<SlotStatus>("slot status", &text).unwrap_err();
        assert!(e.contains("contract version 7"), "{e}");
        let e = decode::<SlotStatus>(
            "slot status",
            r#"{"booted":"B","slots":{"B":{"good":true}}}"#,
        )
        .unwrap_err();
        assert!(e.contains("no api_version"), "{e}");
        let e = decode::<SlotStatus>(
            "slot status",
            r#"{"api_version":2,"booted":"B","primary":"a","slots":[]}"#,
        )
        .unwrap_err();
        assert!(e.contains("slot status"), "{e}");
    }

    #[test]
    fn slot_names() {
        assert_eq!(Slot::parse("B"), Some(Slot::B));
        assert_eq!(Slot::parse("c"), None);
        assert_eq!(Slot::A.other().lv(), "back");
        assert!(SlotState::from_env("good").bootable());
        assert_eq!(SlotState::from_env("garbage"), SlotState::Empty);
    }
}
