//! Opening a bundle: outer structure, manifest, signature, then the payload stream.
//! Nothing hands out payload bytes before the signature and manifest are checked.

use super::manifest::{Manifest, MAX_MANIFEST_BYTES, PAYLOAD_NAME};
use super::outer;
use crate::keys::Keyring;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufReader, Read, Take};
use std::path::Path;

pub struct OpenBundle {
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    /// Whether the signature was checked against a keyring (`inspect` reads unverified).
    pub verified: bool,
    /// The payload, positioned at its first byte, limited to its stored size.
    pub payload: Take<BufReader<File>>,
    pub payload_stored_size: u64,
}

/// Reads the manifest and signature; with a keyring, checks the signature over the
/// exact manifest bytes before the manifest is even parsed strictly.
pub fn open(path: &Path, keyring: Option<&Keyring>) -> Result<OpenBundle> {
    let f = File::open(path).with_context(|| format!("opening bundle {}", path.display()))?;
    let file_len = f
        .metadata()
        .with_context(|| format!("reading size of {}", path.display()))?
        .len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let manifest_bytes = outer::read_small(&mut r, "manifest.toml", MAX_MANIFEST_BYTES)
        .with_context(|| format!("reading bundle {}", path.display()))?;
    let (name, sig_len) = outer::read_header(&mut r, "manifest.sig")
        .with_context(|| format!("reading bundle {}", path.display()))?;
    if name != "manifest.sig" {
        bail!(
            "bundle {} is unsigned: member {name:?} follows manifest.toml where manifest.sig must be",
            path.display()
        );
    }
    if sig_len == 0 {
        bail!(
            "bundle {} is unsigned: manifest.sig is empty",
            path.display()
        );
    }
    if sig_len > 4096 {
        bail!(
            "manifest.sig in {} is {sig_len} bytes; an ed25519 signature is 64",
            path.display()
        );
    }
    let mut sig = vec![0u8; sig_len as usize];
    r.read_exact(&mut sig)
        .context("the bundle ends inside manifest.sig")?;
    outer::skip(&mut r, outer::padding(sig_len) as u64)
        .context("the bundle ends after manifest.sig")?;

    if let Some(keyring) = keyring {
        let key_id = lenient_key_id(&manifest_bytes)?;
        keyring
            .verify(&key_id, &manifest_bytes, &sig)
            .with_context(|| format!("bundle {}", path.display()))?;
    }
    let manifest =
        Manifest::parse(&manifest_bytes).with_context(|| format!("bundle {}", path.display()))?;

    let (name, size) = outer::read_header(&mut r, "the payload")
        .with_context(|| format!("bundle {}", path.display()))?;
    if name != PAYLOAD_NAME {
        bail!(
            "bundle {} holds {name:?} where the payload {PAYLOAD_NAME} must be",
            path.display()
        );
    }
    if size != manifest.payload.compressed_size {
        bail!(
            "payload in {} is {size} bytes but the manifest says {}: the bundle was altered or truncated",
            path.display(),
            manifest.payload.compressed_size
        );
    }
    // Position of the payload: three headers plus the two small members, padded.
    let offset = 3 * 512
        + manifest_bytes.len() as u64
        + outer::padding(manifest_bytes.len() as u64) as u64
        + sig_len
        + outer::padding(sig_len) as u64;
    if file_len < offset + size {
        bail!(
            "bundle {} is truncated: the payload should be {size} bytes but only {} are present",
            path.display(),
            file_len.saturating_sub(offset)
        );
    }
    Ok(OpenBundle {
        manifest,
        manifest_bytes,
        verified: keyring.is_some(),
        payload: r.take(size),
        payload_stored_size: size,
    })
}

/// The signer's key id, read before the manifest is trusted or strictly parsed.
fn lenient_key_id(bytes: &[u8]) -> Result<String> {
    let text = std::str::from_utf8(bytes).context("manifest.toml is not UTF-8")?;
    let t: toml::Table = toml::from_str(text).context("manifest.toml is not valid TOML")?;
    match t.get("key_id") {
        Some(toml::Value::String(s)) => Ok(s.clone()),
        _ => bail!("manifest.toml names no signing key (key_id)"),
    }
}

/// A reader that hashes and counts what passes through and reports progress.
pub struct HashingReader<R> {
    pub inner: R,
    pub hash: Sha256,
    pub count: u64,
    pub progress: Option<crate::progress::Progress>,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, progress: Option<crate::progress::Progress>) -> Self {
        HashingReader {
            inner,
            hash: Sha256::new(),
            count: 0,
            progress,
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        if let Some(p) = &mut self.progress {
            p.update(self.count);
        }
        Ok(n)
    }
}

/// Reads the whole payload and checks its size and sha256 against the manifest.
pub fn check_payload(
    b: OpenBundle,
    progress: Option<crate::progress::Progress>,
) -> Result<Manifest> {
    let mut hr = HashingReader::new(b.payload, progress);
    io::copy(&mut hr, &mut io::sink()).context("reading the payload")?;
    finish_payload_check(&b.manifest, hr.count, hr.hash)?;
    if let Some(p) = &mut hr.progress {
        p.finish(hr.count);
    }
    Ok(b.manifest)
}

pub fn finish_payload_check(m: &Manifest, count: u64, hash: Sha256) -> Result<()> {
    if count != m.payload.compressed_size {
        bail!(
            "payload is truncated: {count} of {} bytes present",
            m.payload.compressed_size
        );
    }
    let got = hex::encode(hash.finalize());
    if got != m.payload.sha256 {
        bail!(
            "payload sha256 mismatch: manifest says {}, payload hashes to {got}",
            m.payload.sha256
        );
    }
    Ok(())
}

/// Reads the named regular files (archive names like `etc/passwd`) out of a verified
/// bundle's payload, stopping as soon as all were found. Used for dry runs (account
/// merge) before anything is written.
pub fn read_members(
    b: OpenBundle,
    names: &[&str],
) -> Result<std::collections::BTreeMap<String, Vec<u8>>> {
    if !b.verified {
        bail!("internal error: reading members of a bundle whose signature was not checked");
    }
    let stream = liblzma::stream::Stream::new_stream_decoder(u64::MAX, 0)
        .context("setting up the xz decoder")?;
    let xz = liblzma::read::XzDecoder::new_stream(b.payload, stream);
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, xz));
    let mut found = std::collections::BTreeMap::new();
    for entry in archive.entries().context("reading the payload tar")? {
        let mut e = entry.context("reading the payload tar")?;
        let raw = e.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw);
        let name = name.trim_start_matches("./");
        if names.contains(&name) && e.header().entry_type().is_file() {
            let mut v = Vec::new();
            e.read_to_end(&mut v)
                .with_context(|| format!("reading {name} from the payload"))?;
            found.insert(name.to_string(), v);
            if found.len() == names.len() {
                break;
            }
        }
    }
    Ok(found)
}
