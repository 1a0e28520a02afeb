//! Ed25519 signing keys and keyrings, shared by the engine (bundles) and the
//! agent (service packages), so both read the vendor's keys the same way.
//!
//! Key files are one line of text so they can be read, copied and diffed by people:
//! `dualroot-ed25519-secret <base64 seed>` for a secret key and
//! `dualroot-ed25519 <base64 public key> <comment>` for a public key. A keyring is a
//! directory; every `*.pub` file in it is a trusted key.

use anyhow::{bail, Context, Result};
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const SECRET_TAG: &str = "dualroot-ed25519-secret";
const PUBLIC_TAG: &str = "dualroot-ed25519";

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Short, stable identifier of a public key: the first 16 hex digits of its sha256.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Generates a key pair and writes `<out>` (secret, mode 0600) and `<out>.pub`.
pub fn generate(out: &Path, comment: &str) -> Result<(PathBuf, String)> {
    let mut seed = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("reading 32 random bytes from /dev/urandom")?;
    let secret = SigningKey::from_bytes(&seed);
    let public = secret.verifying_key();
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    for p in [out, pub_path.as_path()] {
        if p.exists() {
            bail!(
                "{} already exists; refusing to overwrite a key",
                p.display()
            );
        }
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating secret key file {}", out.display()))?;
    std::io::Write::write_all(
        &mut f,
        format!("{SECRET_TAG} {}\n", b64().encode(seed)).as_bytes(),
    )
    .with_context(|| format!("writing {}", out.display()))?;
    fs::write(
        &pub_path,
        format!(
            "{PUBLIC_TAG} {} {comment}\n",
            b64().encode(public.as_bytes())
        ),
    )
    .with_context(|| format!("writing {}", pub_path.display()))?;
    Ok((pub_path, key_id(&public)))
}

pub fn load_secret(path: &Path) -> Result<SigningKey> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading secret key {}", path.display()))?;
    let b = parse_line(&text, SECRET_TAG)
        .with_context(|| format!("secret key {} is not a dualroot secret key", path.display()))?;
    Ok(SigningKey::from_bytes(&b))
}

pub fn parse_public(text: &str) -> Result<VerifyingKey> {
    let b = parse_line(text, PUBLIC_TAG)?;
    VerifyingKey::from_bytes(&b).context("public key bytes are not a valid ed25519 point")
}

fn parse_line(text: &str, tag: &str) -> Result<[u8; 32]> {
    let mut parts = text.split_whitespace();
    if parts.next() != Some(tag) {
        bail!("expected a line starting with {tag:?}");
    }
    let data = parts.next().context("key data missing after the tag")?;
    let bytes = b64().decode(data).context("key data is not base64")?;
    bytes
        .try_into()
        .map_err(|v: Vec<u8>| anyhow::anyhow!("key is {} bytes, expected 32", v.len()))
}

/// The trusted public keys of a keyring directory, by key id.
pub struct Keyring {
    pub dir: PathBuf,
    pub keys: Vec<(String, VerifyingKey)>,
}

impl Keyring {
    pub fn load(dir: &Path) -> Result<Keyring> {
        let rd = fs::read_dir(dir).with_context(|| format!("reading keyring {}", dir.display()))?;
        let mut keys = Vec::new();
        for ent in rd {
            let p = ent?.path();
            if p.extension().is_some_and(|e| e == "pub") {
                let text =
                    fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
                let k =
                    parse_public(&text).with_context(|| format!("public key {}", p.display()))?;
                keys.push((key_id(&k), k));
            }
        }
        if keys.is_empty() {
            bail!(
                "keyring {} holds no *.pub key; nothing can be trusted",
                dir.display()
            );
        }
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Keyring {
            dir: dir.to_path_buf(),
            keys,
        })
    }

    /// The ids of the trusted keys, for errors.
    fn trusted_ids(&self) -> String {
        self.keys
            .iter()
            .map(|k| k.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks `sig` over `msg` with the key named `id`. Errors say which of the two failed.
    pub fn verify(&self, id: &str, msg: &[u8], sig: &[u8]) -> Result<()> {
        let Some((_, key)) = self.keys.iter().find(|(k, _)| k == id) else {
            bail!(
                "the manifest is signed by key {id}, which is not in keyring {} (trusted: {})",
                self.dir.display(),
                self.trusted_ids()
            );
        };
        let sig = Signature::from_slice(sig).map_err(|_| {
            anyhow::anyhow!(
                "manifest.sig is {} bytes, not an ed25519 signature",
                sig.len()
            )
        })?;
        key.verify_strict(msg, &sig).map_err(|_| {
            anyhow::anyhow!("manifest signature does not match key {id}: the manifest was changed after signing or the signature is damaged")
        })
    }

    /// Checks an ed25519 signature over `msg` against every trusted key;
    /// returns the id of the key that made it.
    pub fn verify_any(&self, msg: &[u8], sig: &[u8]) -> Result<String> {
        let sig = Signature::from_slice(sig).map_err(|_| {
            anyhow::anyhow!(
                "the signature is {} bytes, not an ed25519 signature (64)",
                sig.len()
            )
        })?;
        for (id, key) in &self.keys {
            if key.verify_strict(msg, &sig).is_ok() {
                return Ok(id.clone());
            }
        }
        bail!(
            "the signature matches no key of keyring {} (trusted: {})",
            self.dir.display(),
            self.trusted_ids()
        )
    }
}

/// What a service package's signature covers: the service (its namespace,
/// the lower-cased service code), the version and the package's sha256, with a
/// prefix so it can never be taken for another kind of signed text. A signed
/// package cannot be replayed under another service code or another version.
pub fn package_message(namespace: &str, version: &str, sha256_hex: &str) -> Vec<u8> {
    format!(
        "dualroot-service-package-v2\nservice:{}\nversion:{version}\nsha256:{}",
        namespace.to_ascii_lowercase(),
        sha256_hex.to_ascii_lowercase()
    )
    .into_bytes()
}

/// What a migration plan's signature covers: the plan file's exact bytes (by
/// their sha256), with a prefix of its own.
pub fn plan_message(plan_text: &[u8]) -> Vec<u8> {
    format!(
        "dualroot-plan-v1\nsha256:{}",
        hex::encode(Sha256::digest(plan_text))
    )
    .into_bytes()
}

/// Where a plan's detached signature lives: `<plan>.sig`, one line of base64.
pub fn plan_signature_path(plan: &Path) -> PathBuf {
    let mut p = plan.as_os_str().to_owned();
    p.push(".sig");
    PathBuf::from(p)
}

/// The `<plan>.sig` text for a plan's bytes.
pub fn sign_plan(key: &SigningKey, plan_text: &[u8]) -> String {
    format!("{}\n", b64().encode(sign(key, &plan_message(plan_text))))
}

/// Checks a plan's bytes against its base64 signature with a keyring; returns
/// the id of the key that signed it.
pub fn verify_plan(ring: &Keyring, plan_text: &[u8], sig_b64: &str) -> Result<String> {
    let sig = b64()
        .decode(sig_b64.trim())
        .context("the plan signature is not base64")?;
    ring.verify_any(&plan_message(plan_text), &sig)
        .context("the plan's signature does not verify (the plan was changed after signing, or signed by a key this keyring does not trust)")
}

pub fn sign(key: &SigningKey, msg: &[u8]) -> Vec<u8> {
    key.sign(msg).to_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_verify_only_unchanged_and_with_a_trusted_key() {
        let d = tempfile::tempdir().unwrap();
        let k = SigningKey::from_bytes(&[4; 32]);
        std::fs::write(
            d.path().join("v.pub"),
            format!(
                "dualroot-ed25519 {} v\n",
                b64().encode(k.verifying_key().as_bytes())
            ),
        )
        .unwrap();
        let ring = Keyring::load(d.path()).unwrap();
        let plan = b"vg = \"VA\"\n";
        let sig = sign_plan(&k, plan);
        assert_eq!(
            verify_plan(&ring, plan, &sig).unwrap(),
            key_id(&k.verifying_key())
        );
        let e = verify_plan(&ring, b"vg = \"VA\"\nmodel = \"any\"\n", &sig).unwrap_err();
        assert!(format!("{e:#}").contains("changed after signing"), "{e:#}");
        let stranger = SigningKey::from_bytes(&[5; 32]);
        assert!(verify_plan(&ring, plan, &sign_plan(&stranger, plan)).is_err());
        // A service-package signature is never a plan signature.
        let pkg = b64().encode(sign(&k, &package_message("web", "1", "ab")));
        assert!(verify_plan(&ring, plan, &pkg).is_err());
        assert_eq!(
            plan_signature_path(Path::new("/x/plan.toml")),
            PathBuf::from("/x/plan.toml.sig")
        );
    }

    #[test]
    fn verifies_with_any_trusted_key_and_names_the_keyring() {
        let d = tempfile::tempdir().unwrap();
        let k1 = SigningKey::from_bytes(&[1; 32]);
        let k2 = SigningKey::from_bytes(&[2; 32]);
        let b64 = |k: &SigningKey| {
            base64::engine::general_purpose::STANDARD.encode(k.verifying_key().as_bytes())
        };
        std::fs::write(
            d.path().join("a.pub"),
            format!("dualroot-ed25519 {} a\n", b64(&k1)),
        )
        .unwrap();
        std::fs::write(
            d.path().join("b.pub"),
            format!("dualroot-ed25519 {} b\n", b64(&k2)),
        )
        .unwrap();
        std::fs::write(d.path().join("README"), "not a key").unwrap();
        let ring = Keyring::load(d.path()).unwrap();
        assert_eq!(ring.keys.len(), 2);
        let msg = package_message("web", "1.0", &"ab".repeat(32));
        assert_ne!(msg, package_message("web", "0.9", &"ab".repeat(32)));
        assert_ne!(msg, package_message("billing", "1.0", &"ab".repeat(32)));
        let id = ring.verify_any(&msg, &k2.sign(&msg).to_bytes()).unwrap();
        assert_eq!(id, key_id(&k2.verifying_key()));
        let other = SigningKey::from_bytes(&[3; 32]);
        let e = ring
            .verify_any(&msg, &other.sign(&msg).to_bytes())
            .unwrap_err();
        assert!(format!("{e}").contains("matches no key"), "{e}");
        assert!(ring.verify_any(&msg, b"short").is_err());
        let empty = tempfile::tempdir().unwrap();
        assert!(Keyring::load(empty.path()).is_err());
    }
}
