//! The bundle manifest: what the payload is, who signed it, what it needs.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The manifest format this build reads and writes.
pub const FORMAT: i64 = 1;
/// A manifest is a few hundred bytes; anything near this limit is not ours.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
pub const PAYLOAD_NAME: &str = "rootfs.tar.xz";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: i64,
    pub os_id: String,
    pub version: String,
    /// Appliance model this image is for; `any` when it fits every model.
    pub model: String,
    pub requires_cpu: CpuLevel,
    pub created_unix: u64,
    pub key_id: String,
    pub payload: Payload,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    pub name: String,
    pub compression: String,
    pub sha256: String,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub entries: u64,
}

/// x86-64 micro-architecture levels, as named by the psABI.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuLevel {
    #[serde(rename = "x86-64")]
    V1,
    #[serde(rename = "x86-64-v2")]
    V2,
    #[serde(rename = "x86-64-v3")]
    V3,
}

impl CpuLevel {
    pub fn parse(s: &str) -> Result<CpuLevel> {
        Ok(match s {
            "x86-64" | "x86-64-v1" => CpuLevel::V1,
            "x86-64-v2" => CpuLevel::V2,
            "x86-64-v3" => CpuLevel::V3,
            _ => bail!("unknown CPU level {s:?} (known: x86-64, x86-64-v2, x86-64-v3)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            CpuLevel::V1 => "x86-64",
            CpuLevel::V2 => "x86-64-v2",
            CpuLevel::V3 => "x86-64-v3",
        }
    }

    /// `/proc/cpuinfo` flags a CPU needs for this level (in addition to the lower levels').
    pub fn flags(self) -> &'static [&'static str] {
        match self {
            CpuLevel::V1 => &["lm", "cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse2"],
            CpuLevel::V2 => &["cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"],
            CpuLevel::V3 => &[
                "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
            ],
        }
    }
}

impl Manifest {
    /// Parses and checks a manifest. The format version is read first, so a newer
    /// format gets a precise error instead of a list of unknown fields.
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        let text = std::str::from_utf8(bytes).context("manifest.toml is not UTF-8")?;
        let table: toml::Table = toml::from_str(text).context("manifest.toml is not valid TOML")?;
        match table.get("format") {
            Some(toml::Value::Integer(FORMAT)) => {}
            Some(toml::Value::Integer(n)) => bail!(
                "unknown manifest format version {n}: this dualroot reads format {FORMAT}; use a newer dualroot to read this bundle"
            ),
            Some(_) => bail!("manifest field `format` is not an integer"),
            None => bail!("manifest has no `format` field"),
        }
        let m: Manifest = toml::from_str(text).context("manifest.toml does not match format 1")?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<()> {
        if self.payload.name != PAYLOAD_NAME {
            bail!(
                "manifest names payload {:?}, expected {PAYLOAD_NAME:?}",
                self.payload.name
            );
        }
        if self.payload.compression != "xz" {
            bail!(
                "payload compression {:?} is not supported (supported: xz)",
                self.payload.compression
            );
        }
        if self.payload.sha256.len() != 64 || hex::decode(&self.payload.sha256).is_err() {
            bail!(
                "manifest payload sha256 {:?} is not 64 hex digits",
                self.payload.sha256
            );
        }
        for (what, v) in [
            ("os_id", &self.os_id),
            ("version", &self.version),
            ("key_id", &self.key_id),
        ] {
            if v.is_empty() || v.chars().any(|c| c.is_control()) {
                bail!("manifest field {what} is empty or holds control characters");
            }
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: 1,
            os_id: "debian".into(),
            version: "13".into(),
            model: "any".into(),
            requires_cpu: CpuLevel::V2,
            created_unix: 1,
            key_id: "00112233".into(),
            payload: Payload {
                name: PAYLOAD_NAME.into(),
                compression: "xz".into(),
                sha256: "a".repeat(64),
                compressed_size: 10,
                uncompressed_size: 20,
                entries: 3,
            },
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(Manifest::parse(m.to_toml().as_bytes()).unwrap(), m);
        assert!(m.to_toml().contains("requires_cpu = \"x86-64-v2\""));
    }

    #[test]
    fn newer_format_is_named() {
        let t = sample().to_toml().replace("format = 1", "format = 2");
        let e = format!("{:#}", Manifest::parse(t.as_bytes()).unwrap_err());
        assert!(e.contains("unknown manifest format version 2"), "{e}");
    }

    #[test]
    fn unknown_field_rejected() {
        let t = sample()
            .to_toml()
            .replace("format = 1", "format = 1\nsurprise = 3");
        let e = format!("{:#}", Manifest::parse(t.as_bytes()).unwrap_err());
        assert!(e.contains("surprise"), "{e}");
    }

    #[test]
    fn bad_hash_rejected() {
        let mut m = sample();
        m.payload.sha256 = "xyz".into();
        let e = format!("{:#}", Manifest::parse(m.to_toml().as_bytes()).unwrap_err());
        assert!(e.contains("not 64 hex digits"), "{e}");
    }

    #[test]
    fn cpu_levels_order() {
        assert!(CpuLevel::parse("x86-64-v2").unwrap() > CpuLevel::V1);
        assert!(CpuLevel::parse("pentium").is_err());
    }
}
