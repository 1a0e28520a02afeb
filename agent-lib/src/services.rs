//! Service packages: container images + Kubernetes manifests, installed into
//! a namespace named after the service code, through an adapter trait.
//!
//! Manifests are not applied as shipped: `kubectl create --dry-run=client -o
//! json` turns each into JSON objects, [`check_objects`] checks those against
//! the policy (allow-listed namespaced kinds, this namespace only, no
//! privileged containers, no host namespaces or host paths), and exactly the
//! checked JSON is applied, so no YAML reading can differ between the check
//! and kubectl.

use crate::cmd;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub trait ServiceAdapter: Send + Sync {
    /// The objects of a manifest file as kubectl reads them (JSON text: one
    /// object, a `List`, or several objects in a row). Changes nothing.
    fn render(&self, ns: &str, manifest: &Path) -> Result<String>;
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
    fn render(&self, ns: &str, manifest: &Path) -> Result<String> {
        let mut c = self.kubectl(["create", "--dry-run=client", "-o", "json", "-n", ns, "-f"]);
        c.arg(manifest);
        Ok(cmd::run(&mut c)?.stdout)
    }

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

/// The objects in kubectl's JSON output: one object, a `List` (flattened),
/// or several objects one after another.
pub fn objects_from_json(text: &str) -> Result<Vec<Value>> {
    fn flatten(v: Value, out: &mut Vec<Value>) {
        if v.get("kind").and_then(Value::as_str) == Some("List") {
            if let Some(Value::Array(items)) = v.get("items") {
                for i in items.clone() {
                    flatten(i, out);
                }
            }
        } else {
            out.push(v);
        }
    }
    let mut out = Vec::new();
    for v in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
        flatten(v.context("reading kubectl's JSON rendering")?, &mut out);
    }
    Ok(out)
}

/// `group/Kind` of an object (`Kind` alone for the core group).
fn kind_key(obj: &Value) -> Option<String> {
    let kind = obj.get("kind")?.as_str()?;
    let api = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    Some(match api.split_once('/') {
        Some((group, _)) => format!("{group}/{kind}"),
        None => kind.to_string(),
    })
}

/// Path of the pod spec inside a workload object, if it has one.
fn pod_spec_path(kind_key: &str) -> Option<&'static [&'static str]> {
    Some(match kind_key {
        "Pod" => &["spec"],
        "batch/CronJob" => &["spec", "jobTemplate", "spec", "template", "spec"],
        "apps/Deployment"
        | "apps/StatefulSet"
        | "apps/DaemonSet"
        | "apps/ReplicaSet"
        | "batch/Job"
        | "ReplicationController" => &["spec", "template", "spec"],
        _ => return None,
    })
}

/// The first forbidden setting in a pod spec, as (field path, why).
fn pod_spec_violation(spec: &Value, at: &str) -> Option<(String, &'static str)> {
    for (field, why) in [
        ("hostNetwork", "host networking"),
        ("hostPID", "the host's process namespace"),
        ("hostIPC", "the host's IPC namespace"),
    ] {
        if spec.get(field).and_then(Value::as_bool) == Some(true) {
            return Some((format!("{at}.{field}"), why));
        }
    }
    for (i, v) in spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if v.get("hostPath").is_some() {
            return Some((format!("{at}.volumes[{i}].hostPath"), "a host path volume"));
        }
    }
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        for (i, c) in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let sc = c.get("securityContext");
            let field = format!("{at}.{list}[{i}].securityContext");
            if sc
                .and_then(|s| s.get("privileged"))
                .and_then(Value::as_bool)
                == Some(true)
            {
                return Some((format!("{field}.privileged"), "a privileged container"));
            }
            let adds = sc
                .and_then(|s| s.get("capabilities"))
                .and_then(|c| c.get("add"))
                .and_then(Value::as_array);
            if adds.into_iter().flatten().any(|c| {
                matches!(
                    c.as_str().map(|s| s.trim_start_matches("CAP_").to_ascii_uppercase()),
                    Some(ref s) if s == "ALL" || s == "SYS_ADMIN"
                )
            }) {
                return Some((
                    format!("{field}.capabilities.add"),
                    "the ALL or SYS_ADMIN capability",
                ));
            }
        }
    }
    None
}

/// Checks the objects of one manifest against the policy; the error names
/// the manifest, the object and the kind or field, and says nothing was applied.
pub fn check_objects(
    ns: &str,
    manifest: &str,
    objects: &[Value],
    allowed: &[String],
) -> Result<()> {
    if objects.is_empty() {
        bail!("manifest {manifest} holds no object; nothing was applied");
    }
    for obj in objects {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("(unnamed)");
        let Some(key) = kind_key(obj) else {
            bail!("manifest {manifest}: object {name} has no kind; nothing was applied");
        };
        if !allowed.contains(&key) {
            bail!(
                "manifest {manifest}: kind {key} ({name}) is not allowed in a service package \
                 (only namespaced kinds from services.allowed_kinds: {}); nothing was applied",
                allowed.join(", ")
            );
        }
        if let Some(other) = obj.pointer("/metadata/namespace").and_then(Value::as_str) {
            if other != ns {
                bail!(
                    "manifest {manifest}: {key} {name} names namespace {other:?}, but this \
                     service installs only into {ns:?}; nothing was applied"
                );
            }
        }
        if let Some(path) = pod_spec_path(&key) {
            let mut spec = Some(obj);
            for p in path {
                spec = spec.and_then(|s| s.get(*p));
            }
            if let Some(spec) = spec {
                if let Some((field, why)) = pod_spec_violation(spec, &path.join(".")) {
                    bail!(
                        "manifest {manifest}: {key} {name} sets {field}: {why} is not allowed \
                         in a service package; nothing was applied"
                    );
                }
            }
        }
    }
    Ok(())
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

    fn allowed() -> Vec<String> {
        crate::config::DEFAULT_ALLOWED_KINDS
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn policy_allows_a_plain_workload() {
        let objs = objects_from_json(
            r#"{"kind":"List","items":[
                {"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web","namespace":"billing"},
                 "spec":{"template":{"spec":{"containers":[{"name":"c","image":"x",
                   "securityContext":{"privileged":false}}],"volumes":[{"name":"d","emptyDir":{}}]}}}},
                {"apiVersion":"v1","kind":"Service","metadata":{"name":"web"}}]}
               {"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"cfg"}}"#,
        )
        .unwrap();
        assert_eq!(objs.len(), 3);
        check_objects("billing", "01.yaml", &objs, &allowed()).unwrap();
    }

    #[test]
    fn policy_refusals_name_manifest_kind_and_field() {
        let refuse = |json: &str| {
            let objs = objects_from_json(json).unwrap();
            format!(
                "{:#}",
                check_objects("billing", "10-x.yaml", &objs, &allowed()).unwrap_err()
            )
        };
        let e = refuse(
            r#"{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding","metadata":{"name":"own"}}"#,
        );
        assert!(
            e.contains("10-x.yaml") && e.contains("rbac.authorization.k8s.io/ClusterRoleBinding"),
            "{e}"
        );
        let e =
            refuse(r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"kube-system"}}"#);
        assert!(e.contains("kind Namespace"), "{e}");
        // a CRD kind that shares a name with an allowed one
        let e = refuse(
            r#"{"apiVersion":"evil.example/v1","kind":"Deployment","metadata":{"name":"d"}}"#,
        );
        assert!(e.contains("evil.example/Deployment"), "{e}");
        let e = refuse(
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c","securityContext":{"privileged":true}}]}}"#,
        );
        assert!(
            e.contains("spec.containers[0].securityContext.privileged"),
            "{e}"
        );
        let e = refuse(
            r#"{"apiVersion":"apps/v1","kind":"DaemonSet","metadata":{"name":"d"},"spec":{"template":{"spec":{"hostNetwork":true,"containers":[]}}}}"#,
        );
        assert!(e.contains("spec.template.spec.hostNetwork"), "{e}");
        let e = refuse(
            r#"{"apiVersion":"batch/v1","kind":"CronJob","metadata":{"name":"j"},"spec":{"jobTemplate":{"spec":{"template":{"spec":{"hostPID":true}}}}}}"#,
        );
        assert!(
            e.contains("spec.jobTemplate.spec.template.spec.hostPID"),
            "{e}"
        );
        let e = refuse(
            r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"w"},"spec":{"template":{"spec":{"volumes":[{"name":"r","hostPath":{"path":"/"}}]}}}}"#,
        );
        assert!(e.contains("volumes[0].hostPath"), "{e}");
        let e = refuse(
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"initContainers":[{"name":"i","securityContext":{"capabilities":{"add":["SYS_ADMIN"]}}}]}}"#,
        );
        assert!(
            e.contains("initContainers[0].securityContext.capabilities.add"),
            "{e}"
        );
        let e = refuse(
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c","namespace":"kube-system"}}"#,
        );
        assert!(e.contains("kube-system"), "{e}");
        assert!(e.contains("nothing was applied"), "{e}");
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
