//! Service packages: container images + Kubernetes manifests, installed into
//! a namespace named after the service code, through an adapter trait.

use crate::cmd;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub trait ServiceAdapter: Send + Sync {
    fn ensure_namespace(&self, ns: &str) -> Result<()>;
    fn import_image(&self, image_tar: &Path) -> Result<()>;
    fn apply(&self, ns: &str, manifest: &Path) -> Result<()>;
    fn delete_namespace(&self, ns: &str) -> Result<()>;
    /// "healthy" / "degraded" / "missing" / "unknown: ..." for a namespace.
    fn health(&self, ns: &str) -> String;
}

/// The real adapter: `kubectl` (or `microk8s kubectl`, `k3s kubectl`) and an
/// image import command (`ctr -n k8s.io images import`, `microk8s ctr image import`).
pub struct KubectlAdapter {
    pub kubectl: Vec<String>,
    pub image_import: Vec<String>,
}

impl KubectlAdapter {
    fn kubectl<I, S>(&self, args: I) -> std::process::Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let (prog, pre) = self
            .kubectl
            .split_first()
            .map(|(p, r)| (p.as_str(), r))
            .unwrap_or(("kubectl", &[]));
        let mut c = cmd::command(prog, pre);
        c.args(args);
        c
    }
}

impl ServiceAdapter for KubectlAdapter {
    fn ensure_namespace(&self, ns: &str) -> Result<()> {
        if cmd::run(&mut self.kubectl(["get", "namespace", ns, "-o", "name"])).is_ok() {
            return Ok(());
        }
        cmd::run(&mut self.kubectl(["create", "namespace", ns])).map(|_| ())
    }

    fn import_image(&self, image_tar: &Path) -> Result<()> {
        let (prog, pre) = self
            .image_import
            .split_first()
            .context("services.image_import is empty")?;
        let mut c = cmd::command(prog, pre);
        c.arg(image_tar);
        cmd::run(&mut c).map(|_| ())
    }

    fn apply(&self, ns: &str, manifest: &Path) -> Result<()> {
        let mut c = self.kubectl(["apply", "-n", ns, "-f"]);
        c.arg(manifest);
        cmd::run(&mut c).map(|_| ())
    }

    fn delete_namespace(&self, ns: &str) -> Result<()> {
        cmd::run(&mut self.kubectl([
            "delete",
            "namespace",
            ns,
            "--ignore-not-found=true",
            "--wait=true",
        ]))
        .map(|_| ())
    }

    fn health(&self, ns: &str) -> String {
        match cmd::run_json_timeout::<serde_json::Value>(
            &mut self.kubectl([
                "get",
                "deployments,statefulsets,daemonsets",
                "-n",
                ns,
                "-o",
                "json",
            ]),
            std::time::Duration::from_secs(60),
        ) {
            Ok(v) => health_from_json(&v),
            Err(e) => format!(
                "unknown: {}",
                format!("{e:#}").chars().take(200).collect::<String>()
            ),
        }
    }
}

/// Health of workloads from `kubectl get ... -o json`: healthy when every
/// workload has all its replicas ready.
pub fn health_from_json(v: &serde_json::Value) -> String {
    let items = v
        .get("items")
        .and_then(|i| i.as_array())
        .cloned()
        .unwrap_or_default();
    if items.is_empty() {
        return "missing".into();
    }
    let n = |x: Option<&serde_json::Value>| x.and_then(|v| v.as_i64()).unwrap_or(0);
    let all_ready = items.iter().all(|it| {
        let st = it.get("status");
        let kind = it.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind == "DaemonSet" {
            let want = n(st.and_then(|s| s.get("desiredNumberScheduled")));
            n(st.and_then(|s| s.get("numberReady"))) >= want
        } else {
            let want = n(it.get("spec").and_then(|s| s.get("replicas")));
            n(st.and_then(|s| s.get("readyReplicas"))) >= want
        }
    });
    if all_ready { "healthy" } else { "degraded" }.into()
}

/// Layout of an unpacked service package: `images/*.tar` and
/// `manifests/*.yaml|*.yml|*.json` (applied in name order).
#[derive(Debug, PartialEq)]
pub struct Package {
    pub images: Vec<PathBuf>,
    pub manifests: Vec<PathBuf>,
}

fn sorted_files(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    if !dir.exists() {
        return Ok(v);
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        let ok = p
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| exts.contains(&x));
        if ok && p.is_file() {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

/// Unpacks a package `tar.gz` into `dest` (refusing paths outside it) and lists it.
pub fn unpack_package(archive: &Path, dest: &Path) -> Result<Package> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).with_context(|| format!("clearing {}", dest.display()))?;
    }
    std::fs::create_dir_all(dest)?;
    let f =
        std::fs::File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    for entry in ar.entries().context("reading package archive")? {
        let mut entry = entry.context("reading package entry")?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            continue; // no links or devices from a package
        }
        // unpack_in refuses `..` and absolute paths
        if !entry.unpack_in(dest).context("unpacking package entry")? {
            bail!("package entry escapes the target directory");
        }
    }
    let pkg = Package {
        images: sorted_files(&dest.join("images"), &["tar"])?,
        manifests: sorted_files(&dest.join("manifests"), &["yaml", "yml", "json"])?,
    };
    if pkg.manifests.is_empty() {
        bail!("package has no manifests/*.yaml");
    }
    Ok(pkg)
}

/// Service codes become namespace names: DNS-1123 labels.
pub fn namespace_for(code: &str) -> Result<String> {
    let ns = code.to_ascii_lowercase();
    let valid = !ns.is_empty()
        && ns.len() <= 63
        && ns.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if !valid {
        bail!("service code {code:?} is not a valid namespace name (a-z, 0-9, '-', at most 63)");
    }
    Ok(ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn namespace_rules() {
        assert_eq!(namespace_for("Billing-2").unwrap(), "billing-2");
        assert!(namespace_for("a/b").is_err());
        assert!(namespace_for("").is_err());
        assert!(namespace_for("-x").is_err());
    }

    #[test]
    fn health_rules() {
        assert_eq!(health_from_json(&json!({"items": []})), "missing");
        let ok = json!({"items":[{"kind":"Deployment","spec":{"replicas":2},"status":{"readyReplicas":2}}]});
        assert_eq!(health_from_json(&ok), "healthy");
        let bad = json!({"items":[{"kind":"Deployment","spec":{"replicas":2},"status":{"readyReplicas":1}},
                                  {"kind":"DaemonSet","status":{"desiredNumberScheduled":1,"numberReady":1}}]});
        assert_eq!(health_from_json(&bad), "degraded");
    }

    #[test]
    fn unpack_lists_images_and_manifests() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("pkg.tar.gz");
        let enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&src).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(enc);
        for (name, data) in [
            ("manifests/20-svc.yaml", "kind: Service"),
            ("manifests/10-dep.yaml", "kind: Deployment"),
            ("images/app.tar", "img"),
            ("README", "x"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_bytes()).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        let pkg = unpack_package(&src, &d.path().join("out")).unwrap();
        assert_eq!(pkg.images.len(), 1);
        let names: Vec<_> = pkg
            .manifests
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, vec!["10-dep.yaml", "20-svc.yaml"]);
    }
}
