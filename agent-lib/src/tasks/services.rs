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
    /// `dualroot-service-package sha256:<sha256>`.
    #[serde(default)]
    signature: Option<String>,
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

/// The package's signature must verify with a key of the vendor keyring.
fn check_signature(agent: &Agent, code: &str, version: &str, body: &InstallBody) -> Result<()> {
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
        .verify_any(&keyring::package_message(&body.source.sha256), &sig)
        .map_err(|e| {
            refuse(format!(
                "signature over sha256 {}: {e:#}",
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
    check_signature(agent, code, version, body)?;
    let key = format!("service:{ns}");
    if let Some(cur) = agent.journal.kv_get(&key)? {
        if let Ok(cur) = serde_json::from_str::<InstalledService>(&cur) {
            if cur.version == version {
                log::info!("service {ns} {version} already installed: nothing to do");
                return Ok(json!({"namespace": ns, "version": version, "changed": false}));
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
    let was = agent.journal.kv_get(&key)?.is_some();
    agent
        .services
        .delete_namespace(&ns)
        .context("deleting namespace")?;
    agent.journal.kv_delete(&key)?;
    let dir = agent.cfg.data_dir.join("services").join(&ns);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(json!({"namespace": ns, "changed": was}))
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
}
