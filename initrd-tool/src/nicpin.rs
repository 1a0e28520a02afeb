//! `dualroot nic-pin FILE`: give interfaces the names pinned by MAC at migration,
//! before networking starts. Swaps (eth0 <-> eth1) go through temporary names
//! because the kernel refuses a rename onto a name in use.

use crate::cmd::{cmd, CommandExt};
use anyhow::{Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

#[derive(Debug, Deserialize)]
struct Pins {
    #[serde(default)]
    nic: Vec<Pin>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct Pin {
    pub name: String,
    pub mac: String,
}

pub fn parse(text: &str) -> Result<Vec<Pin>> {
    Ok(toml::from_str::<Pins>(text)
        .context("parsing NIC pins")?
        .nic)
}

/// Renames needed: (current name, wanted name), from the current `name -> mac`.
pub fn plan_renames(current: &BTreeMap<String, String>, pins: &[Pin]) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for p in pins {
        let mac = p.mac.to_ascii_lowercase();
        if let Some((cur, _)) = current.iter().find(|(_, m)| m.to_ascii_lowercase() == mac) {
            if *cur != p.name {
                v.push((cur.clone(), p.name.clone()));
            }
        }
    }
    v
}

pub fn run(path: &Path, class_net: &Path) -> Result<()> {
    let pins =
        parse(&fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)?;
    let mut current = BTreeMap::new();
    for e in fs::read_dir(class_net)? {
        let e = e?;
        let mac = fs::read_to_string(e.path().join("address"))
            .unwrap_or_default()
            .trim()
            .to_string();
        current.insert(e.file_name().to_string_lossy().into_owned(), mac);
    }
    for p in &pins {
        if !current.values().any(|m| m.eq_ignore_ascii_case(&p.mac)) {
            log::warn!(
                "nic-pin: no interface has MAC {} (pinned as {}); left alone",
                p.mac,
                p.name
            );
        }
    }
    let renames = plan_renames(&current, &pins);
    if renames.is_empty() {
        log::info!("nic-pin: every pinned interface already has its name");
        return Ok(());
    }
    for (i, (cur, _)) in renames.iter().enumerate() {
        cmd("ip", ["link", "set", "dev", cur, "down"]).run()?;
        cmd(
            "ip",
            ["link", "set", "dev", cur, "name", &format!("drtmp{i}")],
        )
        .run()?;
    }
    for (i, (cur, want)) in renames.iter().enumerate() {
        cmd(
            "ip",
            ["link", "set", "dev", &format!("drtmp{i}"), "name", want],
        )
        .run()?;
        log::info!("nic-pin: {cur} -> {want}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_detected() {
        let cur: BTreeMap<String, String> = [
            ("eth0".into(), "52:54:00:00:00:02".into()),
            ("eth1".into(), "52:54:00:00:00:01".into()),
        ]
        .into();
        let pins = parse("[[nic]]\nname = \"eth0\"\nmac = \"52:54:00:00:00:01\"\n[[nic]]\nname = \"eth1\"\nmac = \"52:54:00:00:00:02\"\n").unwrap();
        assert_eq!(
            plan_renames(&cur, &pins),
            vec![
                ("eth1".to_string(), "eth0".to_string()),
                ("eth0".to_string(), "eth1".to_string())
            ]
        );
        let ok: BTreeMap<String, String> = [
            ("eth0".into(), "52:54:00:00:00:01".into()),
            ("eth1".into(), "52:54:00:00:00:02".into()),
        ]
        .into();
        assert!(plan_renames(&ok, &pins).is_empty());
    }
}
