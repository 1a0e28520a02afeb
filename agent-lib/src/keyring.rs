//! Trusted vendor keys, in the engine's format (initrd-tool `keys.rs`): a
//! directory whose every `*.pub` file is one line
//! `dualroot-ed25519 <base64 public key> <comment>`. The key id is the first
//! 16 hex digits of the sha256 of the key bytes.

use anyhow::{bail, Context, Result};
use base64::Engine;
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const PUBLIC_TAG: &str = "dualroot-ed25519";

pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

pub fn parse_public(text: &str) -> Result<VerifyingKey> {
    let mut parts = text.split_whitespace();
    if parts.next() != Some(PUBLIC_TAG) {
        bail!("expected a line starting with {PUBLIC_TAG:?}");
    }
    let data = parts.next().context("key data missing after the tag")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .context("key data is not base64")?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|v: Vec<u8>| anyhow::anyhow!("key is {} bytes, expected 32", v.len()))?;
    VerifyingKey::from_bytes(&bytes).context("public key bytes are not a valid ed25519 point")
}

pub struct Keyring {
    pub dir: PathBuf,
    pub keys: Vec<(String, VerifyingKey)>,
}

impl Keyring {
    pub fn load(dir: &Path) -> Result<Keyring> {
        let rd =
            std::fs::read_dir(dir).with_context(|| format!("reading keyring {}", dir.display()))?;
        let mut keys = Vec::new();
        for ent in rd {
            let p = ent
                .with_context(|| format!("reading keyring {}", dir.display()))?
                .path();
            if p.extension().is_some_and(|e| e == "pub") {
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?;
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
            self.keys
                .iter()
                .map(|k| k.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// What a service package's signature covers: its sha256, with a prefix so
/// it can never be taken for another kind of signed text.
pub fn package_message(sha256_hex: &str) -> Vec<u8> {
    format!(
        "dualroot-service-package sha256:{}",
        sha256_hex.to_ascii_lowercase()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

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
        let msg = package_message(&"ab".repeat(32));
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
