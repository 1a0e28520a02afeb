//! `installService` / `uninstallService`: a signed package of images and
//! manifests, checked against the policy, installed into the namespace named
//! after the service code.

use super::heartbeat::InstalledService;
use super::{fetch_to, safe_name, Source};
use crate::agent::Agent;
use crate::keyring::{self, Keyring};
use crate::registration::now_secs;
use crate::services;
use anyhow::{bail, Context, Result};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct InstallBody {
    service_code: String,
    version: String,
    #[serde(flatten)]
    source: Source,
    /// base64 ed25519 signature by a vendor key over
    /// `keyring::package_message(namespace, version, sha256)`.
    #[serde(default)]
    signature: Option<String>,
    /// Install a version lower than the installed one (refused otherwise).
    #[serde(default)]
    allow_downgrade: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct UninstallBody {
    service_code: String,
}

/// A version names a directory: refuse what would name another one.
pub fn check_version(code: &str, v: &str) -> Result<()> {
    let bad = v.is_empty()
        || v == "."
        || v == ".."
        || v.len() > 128
        || v.contains(['/', '\\'])
        || v.chars().any(char::is_control);
    if bad {
        bail!(
            "service {code}: version {v:?} is not usable (empty, \".\", \"..\", a slash, \
             control characters or over 128 bytes); nothing was installed"
        );
    }
    Ok(())
}

/// Orders two versions by their dot/dash-separated parts, numerically where both
/// parts are numbers (`1.10` > `1.9`), else as text.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let parts =
        |v: &str| -> Vec<String> { v.split(['.', '-', '_', '+']).map(str::to_string).collect() };
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(m), Ok(n)) => m.cmp(&n),
            _ => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// The package's signature must verify with a key of the vendor keyring, over
/// this namespace, version and sha256 together.
fn check_signature(agent: &Agent, ns: &str, version: &str, body: &InstallBody) -> Result<()> {
    let code = ns;
    let refuse = |why: String| {
        anyhow::anyhow!(
            "service {code} {version}: {why}; the package was not downloaded, nothing was installed"
        )
    };
    let sig = body.signature.as_deref().ok_or_else(|| {
        refuse(
            "the task carries no `signature` (service packages must be signed with the vendor \
             keyring, like OS bundles)"
                .into(),
        )
    })?;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(sig.trim())
        .map_err(|e| refuse(format!("`signature` is not base64 ({e})")))?;
    let ring = Keyring::load(&agent.cfg.services.keyring).map_err(|e| refuse(format!("{e:#}")))?;
    let key = ring
        .verify_any(
            &keyring::package_message(ns, version, &body.source.sha256),
            &sig,
        )
        .map_err(|e| {
            refuse(format!(
                "signature over service {ns}, version {version} and sha256 {}: {e:#}",
                body.source.sha256
            ))
        })?;
    log::info!("service {code} {version}: package signed by key {key}");
    Ok(())
}

pub(super) fn install(agent: &Agent, body: &InstallBody) -> Result<Value> {
    let code = body.service_code.as_str();
    let version = body.version.as_str();
    let ns = services::namespace_for(code)?;
    check_version(code, version)?;
    check_signature(agent, &ns, version, body)?;
    let key = format!("service:{ns}");
    if let Some(cur) = agent.journal.kv_get(&key)? {
        if let Ok(cur) = serde_json::from_str::<InstalledService>(&cur) {
            if cur.version == version {
                log::info!("service {ns} {version} already installed: nothing to do");
                return Ok(json!({"namespace": ns, "version": version, "changed": false}));
            }
            // A replayed older package is signed too: only the task can ask for it.
            if compare_versions(version, &cur.version).is_lt() && !body.allow_downgrade {
                bail!(
                    "service {ns}: version {version} is older than the installed {}; a downgrade needs `allowDowngrade: true` in the task. Nothing was downloaded or changed",
                    cur.version
                );
            }
        }
    }
    let dl = agent
        .cfg
        .data_dir
        .join("downloads")
        .join(format!("service-{ns}-{}.tar.gz", safe_name(version)));
    let archive = fetch_to(agent, &body.source, &dl)?;
    let dir = agent
        .cfg
        .data_dir
        .join("services")
        .join(&ns)
        .join(safe_name(version));
    let pkg = services::unpack_package(&archive, &dir)?;

    // every manifest is checked before anything is changed
    let checked_dir = dir.join("checked");
    std::fs::create_dir_all(&checked_dir)
        .with_context(|| format!("creating {}", checked_dir.display()))?;
    let mut checked = Vec::with_capacity(pkg.manifests.len());
    for m in &pkg.manifests {
        let name = m
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = agent.services.render(&ns, m).with_context(|| {
            format!("service {ns} {version}: reading manifest {name}; nothing was applied")
        })?;
        let objects = services::objects_from_json(&text)
            .with_context(|| format!("service {ns} {version}: manifest {name}"))?;
        services::check_objects(&ns, &name, &objects, &agent.cfg.services.allowed_kinds)
            .with_context(|| format!("service {ns} {version} refused"))?;
        let out = checked_dir.join(format!("{name}.json"));
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        std::fs::write(&out, serde_json::to_vec_pretty(&list)?)
            .with_context(|| format!("writing {}", out.display()))?;
        checked.push(out);
    }

    agent
        .services
        .ensure_namespace(&ns)
        .context("creating namespace")?;
    for img in &pkg.images {
        agent
            .services
            .import_image(img)
            .with_context(|| format!("importing image {}", img.display()))?;
    }
    for m in &checked {
        agent
            .services
            .apply(&ns, m)
            .with_context(|| format!("applying {}", m.display()))?;
    }
    let rec = InstalledService {
        version: version.to_string(),
        installed_at: now_secs(),
    };
    agent.journal.kv_set(&key, &serde_json::to_string(&rec)?)?;
    let _ = std::fs::remove_file(&archive);
    Ok(json!({
        "namespace": ns,
        "version": version,
        "changed": true,
        "images": pkg.images.len(),
        "manifests": pkg.manifests.len(),
    }))
}

pub(super) fn uninstall(agent: &Agent, body: &UninstallBody) -> Result<Value> {
    let ns = services::namespace_for(&body.service_code)?;
    let key = format!("service:{ns}");
    // Only what this agent installed (its journal says so): never another
    // namespace of the cluster (`kube-system`, another vendor's), whatever the
    // task names. An uninstall repeated after it finished lands here too.
    if agent.journal.kv_get(&key)?.is_none() {
        log::warn!(
            "uninstallService {ns}: not a service this agent installed; nothing was deleted"
        );
        return Ok(json!({"namespace": ns, "changed": false,
                         "note": "not installed by this agent; nothing was deleted"}));
    }
    agent
        .services
        .delete_namespace(&ns)
        .context("deleting namespace")?;
    agent.journal.kv_delete(&key)?;
    let dir = agent.cfg.data_dir.join("services").join(&ns);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(json!({"namespace": ns, "changed": true}))
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_that_name_other_directories_are_refused() {
        for v in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\\b",
            "x\n",
            &"9".repeat(129),
        ] {
            let e = super::check_version("web", v).unwrap_err();
            assert!(format!("{e}").contains("nothing was installed"), "{v:?}");
        }
        for v in ["1.0", "2.1.0-rc1", "...", "v1_2+build.7"] {
            super::check_version("web", v).unwrap();
        }
    }

    #[test]
    fn versions_order_numerically() {
        use std::cmp::Ordering::*;
        assert_eq!(super::compare_versions("1.10", "1.9"), Greater);
        assert_eq!(super::compare_versions("2.0", "2.0.1"), Less);
        assert_eq!(super::compare_versions("3.1", "3.1"), Equal);
        assert_eq!(super::compare_versions("1.0-rc2", "1.0-rc1"), Greater);
    }
}
