//! Opening a bundle: outer structure, manifest, signature, then the payload stream.
//! Nothing hands out payload bytes before the signature and manifest are checked.

use super::manifest::{Manifest, MAX_MANIFEST_BYTES, PAYLOAD_NAME};
use super::outer;
use super::tarstream::TarReader;
use crate::keys::Keyring;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Take};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Memory liblzma may use to decode a payload, threads included:
/// 64 MiB per decoder thread plus 64 MiB, at least 256 MiB and at most 1 GiB. A
/// single-threaded decoder of the largest standard preset (`xz -9`, 64 MiB
/// dictionary) needs about 65 MiB and each thread decoding our 24 MiB blocks about
/// 60 MiB; with fewer threads' worth of memory liblzma decodes on fewer threads. A
/// stream that asks for more than the limit in one block (a crafted dictionary of
/// up to 4 GiB) is refused instead of allocated.
pub fn xz_memlimit(threads: u32) -> u64 {
    ((64 << 20) * (threads.max(1) as u64 + 1)).clamp(XZ_MEMLIMIT_MIN, XZ_MEMLIMIT_MAX)
}
const XZ_MEMLIMIT_MIN: u64 = 256 << 20;
const XZ_MEMLIMIT_MAX: u64 = 1 << 30;

/// What may follow the payload: the end-of-archive marker (two zero blocks),
/// padded with zeros to at most a 64 KiB record by tools that write records.
const MAX_OUTER_TAIL: u64 = 64 << 10;

pub struct OpenBundle {
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    /// Whether the signature was checked against a keyring (`inspect` reads unverified).
    pub verified: bool,
    /// The payload, positioned at its first byte, limited to its stored size.
    pub payload: Take<BufReader<File>>,
    pub payload_stored_size: u64,
    /// The bundle file, for messages.
    pub path: PathBuf,
    /// Offset of the payload's first byte in the bundle file.
    pub payload_offset: u64,
    /// Set once [`OpenBundle::verify_payload`] hashed the whole payload and it matched.
    pub payload_checked: bool,
}

impl OpenBundle {
    /// Hashes the whole payload, checks it against the manifest and rewinds to the
    /// payload's first byte, so nothing of a payload that does not match is ever
    /// decompressed or written. Unpack does this first when the caller has not.
    pub fn verify_payload(&mut self, progress: Option<crate::progress::Progress>) -> Result<()> {
        let mut hr = HashingReader::new(&mut self.payload, progress);
        io::copy(&mut hr, &mut io::sink())
            .with_context(|| format!("reading the payload of bundle {}", self.path.display()))?;
        let (count, hash) = (hr.count, hr.hash.clone());
        if let Some(p) = &mut hr.progress {
            p.finish(count);
        }
        finish_payload_check(&self.manifest, count, hash)
            .with_context(|| format!("bundle {}", self.path.display()))?;
        self.payload
            .get_mut()
            .seek(SeekFrom::Start(self.payload_offset))
            .with_context(|| format!("rewinding bundle {}", self.path.display()))?;
        self.payload.set_limit(self.payload_stored_size);
        self.payload_checked = true;
        Ok(())
    }
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
    check_tail(r.get_ref(), path, offset + size, file_len)?;
    Ok(OpenBundle {
        manifest,
        manifest_bytes,
        verified: keyring.is_some(),
        payload: r.take(size),
        payload_stored_size: size,
        path: path.to_path_buf(),
        payload_offset: offset,
        payload_checked: false,
    })
}

/// After the payload come its padding and the end-of-archive marker, all zeros, and
/// nothing else: GNU tar would extract a 4th member, so a bundle holding one (or any
/// other bytes there) is refused.
fn check_tail(f: &File, path: &Path, payload_end: u64, file_len: u64) -> Result<()> {
    let tail = file_len - payload_end;
    let needed = outer::padding(payload_end) as u64 + 1024;
    if tail > MAX_OUTER_TAIL {
        bail!(
            "bundle {} holds {tail} bytes after the payload (a 4th member or trailing bytes); a bundle holds exactly three members, so it is refused",
            path.display()
        );
    }
    let mut buf = vec![0u8; tail as usize];
    f.read_exact_at(&mut buf, payload_end)
        .with_context(|| format!("reading the end of bundle {}", path.display()))?;
    if buf.iter().any(|&b| b != 0) {
        bail!(
            "bundle {} holds data after the payload (a 4th member or trailing bytes); a bundle holds exactly three members, so it is refused",
            path.display()
        );
    }
    if tail < needed {
        bail!(
            "bundle {} ends without the tar end-of-archive marker after the payload: it is truncated",
            path.display()
        );
    }
    Ok(())
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

/// The payload as a tar stream: compressed bytes → sha256 → xz (memory-limited) →
/// a counter that stops at the manifest's `uncompressed_size` → read-ahead
/// thread → strict tar reader.
pub(crate) type PayloadTar<R> =
    TarReader<BufReader<ReadAhead<Limited<liblzma::read::XzDecoder<R>>>>>;

/// `threads` <= 1: liblzma's single-threaded decoder, whose memory is the
/// dictionary (8 MiB at `bundle create`'s preset 6), on a thread of its own
/// ([`ReadAhead`]), so decoding and writing files overlap on two cores as in
/// `xz -dc | tar -x`. More: liblzma's multi-threaded decoder, which holds a
/// 24 MiB block's input and output per thread (issue 25: the migration's peak
/// memory was bundle + 158 MiB with it).
pub(crate) fn payload_tar<R: Read + Send + 'static>(
    compressed: R,
    manifest: &Manifest,
    threads: u32,
) -> Result<PayloadTar<R>> {
    let memlimit = xz_memlimit(threads);
    let stream = if threads <= 1 {
        liblzma::stream::Stream::new_stream_decoder(memlimit, 0)
            .context("setting up the xz decoder")?
    } else {
        liblzma::stream::MtStreamBuilder::new()
            .threads(threads)
            .memlimit_threading(memlimit)
            .memlimit_stop(memlimit)
            .decoder()
            .context("setting up the multi-threaded xz decoder")?
    };
    let xz = liblzma::read::XzDecoder::new_stream(compressed, stream);
    let limited = Limited {
        inner: xz,
        count: 0,
        limit: manifest.payload.uncompressed_size,
        memlimit,
    };
    Ok(TarReader::new(BufReader::with_capacity(
        64 << 10,
        ReadAhead::spawn(limited)?,
    )))
}

/// Chunks of decoded bytes queued between the decoder thread and the reader.
const READ_AHEAD_CHUNK: usize = 1 << 20;
const READ_AHEAD_DEPTH: usize = 4;

/// Reads `inner` to its end on a thread of its own, at most
/// [`READ_AHEAD_DEPTH`] chunks of [`READ_AHEAD_CHUNK`] ahead of the consumer;
/// an error is handed over in order and ends the stream. [`ReadAhead::into_inner`]
/// gives the inner reader back once it reached its end.
pub(crate) struct ReadAhead<T> {
    rx: Option<std::sync::mpsc::Receiver<io::Result<Vec<u8>>>>,
    cur: Vec<u8>,
    pos: usize,
    handle: Option<std::thread::JoinHandle<T>>,
}

impl<T: Read + Send + 'static> ReadAhead<T> {
    pub(crate) fn spawn(mut inner: T) -> Result<ReadAhead<T>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD_DEPTH);
        let handle = std::thread::Builder::new()
            .name("payload-decoder".into())
            .spawn(move || {
                loop {
                    let mut buf = vec![0u8; READ_AHEAD_CHUNK];
                    let mut n = 0;
                    let res = loop {
                        match inner.read(&mut buf[n..]) {
                            Ok(0) => break Ok(()),
                            Ok(k) => {
                                n += k;
                                if n == buf.len() {
                                    break Ok(());
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => break Err(e),
                        }
                    };
                    buf.truncate(n);
                    let end = n == 0;
                    if n > 0 && tx.send(Ok(buf)).is_err() {
                        break; // the reader stopped
                    }
                    if let Err(e) = res {
                        let _ = tx.send(Err(e));
                        break;
                    }
                    if end {
                        break;
                    }
                }
                inner
            })
            .context("starting the payload decoder thread")?;
        Ok(ReadAhead {
            rx: Some(rx),
            cur: Vec::new(),
            pos: 0,
            handle: Some(handle),
        })
    }

    /// The inner reader, after the decoder thread stopped (at the stream's end,
    /// at an error, or because this side stopped reading).
    pub(crate) fn into_inner(mut self) -> io::Result<T> {
        self.rx = None; // a thread blocked on a full queue sees the reader gone
        self.handle
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| io::Error::other("the payload decoder thread panicked"))
    }
}

impl<T> Read for ReadAhead<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            let Some(rx) = &self.rx else { return Ok(0) };
            match rx.recv() {
                Ok(Ok(chunk)) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0), // the decoder reached the end
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl<T> Drop for ReadAhead<T> {
    fn drop(&mut self) {
        // Unblock and reap the thread when the reader is dropped early (an
        // error in the tar): it sees the queue closed and ends.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// After the tar's end: checks that the payload decompressed to exactly
/// `uncompressed_size` bytes, that its sha256 and size match the manifest and that
/// nothing follows its xz stream. Returns the compressed reader, drained.
pub(crate) fn finish_payload_tar(
    tar: PayloadTar<HashingReader<Take<BufReader<File>>>>,
    manifest: &Manifest,
) -> Result<HashingReader<Take<BufReader<File>>>> {
    let limited = tar
        .finish()?
        .into_inner()
        .into_inner()
        .context("reading the end of the payload")?;
    if limited.count != manifest.payload.uncompressed_size {
        bail!(
            "the payload unpacks to {} bytes but its manifest declares {} (uncompressed_size); it is refused",
            limited.count,
            manifest.payload.uncompressed_size
        );
    }
    let xz = limited.inner;
    let decoded_from = xz.total_in();
    let mut hashing = xz.into_inner();
    io::copy(&mut hashing, &mut io::sink()).context("reading the end of the payload")?;
    finish_payload_check(manifest, hashing.count, hashing.hash.clone())?;
    if decoded_from != hashing.count {
        bail!(
            "the payload holds {} bytes after the end of its xz stream (a second stream or trailing data) that GNU tar's pipeline would read differently; it is refused",
            hashing.count - decoded_from
        );
    }
    Ok(hashing)
}

/// Counts decompressed bytes and fails as soon as they pass the manifest's
/// `uncompressed_size`; names liblzma's memory-limit error for people.
pub(crate) struct Limited<R> {
    inner: R,
    pub count: u64,
    limit: u64,
    memlimit: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| {
            let memlimit = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<liblzma::stream::Error>())
                .is_some_and(|i| matches!(i, liblzma::stream::Error::MemLimit));
            if memlimit {
                io::Error::other(format!(
                    "the payload's xz stream needs more than the {} MiB of memory dualroot allows for decoding (dictionary too large)",
                    self.memlimit >> 20
                ))
            } else {
                e
            }
        })?;
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::other(format!(
                "the payload unpacks to more than the {} bytes its manifest declares (uncompressed_size)",
                self.limit
            )));
        }
        Ok(n)
    }
}

/// Reads the named regular files (archive names like `etc/passwd`) out of a verified
/// bundle's payload for dry runs (account merge) before anything is written. The
/// whole payload is read with unpack's rules (see [`super::scan::scan`]): the LAST
/// entry of a name wins, as in unpack and GNU tar, and the contents are returned only
/// once the payload's hash, sizes and entry count matched.
pub fn read_members(b: OpenBundle, names: &[&str]) -> Result<BTreeMap<String, Vec<u8>>> {
    Ok(super::scan::scan(b, names)?.members)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out `data`, then fails (when `fail`), counting reads.
    struct Source {
        data: io::Cursor<Vec<u8>>,
        fail: bool,
    }

    impl Read for Source {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let len = buf.len().min(70_000);
            let n = self.data.read(&mut buf[..len])?;
            if n == 0 && self.fail {
                return Err(io::Error::other("broken stream"));
            }
            Ok(n)
        }
    }

    #[test]
    fn read_ahead_passes_every_byte_in_order_then_the_error_then_the_reader() {
        let data: Vec<u8> = (0..5 * READ_AHEAD_CHUNK + 123)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut ra = ReadAhead::spawn(Source {
            data: io::Cursor::new(data.clone()),
            fail: false,
        })
        .unwrap();
        let mut out = Vec::new();
        ra.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        let inner = ra.into_inner().unwrap();
        assert_eq!(inner.data.position(), data.len() as u64);

        let mut ra = ReadAhead::spawn(Source {
            data: io::Cursor::new(vec![7u8; 3 * READ_AHEAD_CHUNK / 2]),
            fail: true,
        })
        .unwrap();
        let mut out = Vec::new();
        let e = ra.read_to_end(&mut out).unwrap_err();
        assert_eq!(e.to_string(), "broken stream");
        assert_eq!(
            out.len(),
            3 * READ_AHEAD_CHUNK / 2,
            "the data before the error"
        );
    }

    #[test]
    fn read_ahead_dropped_early_stops_its_thread() {
        // More than the queue holds: the thread blocks until the reader goes.
        let mut ra = ReadAhead::spawn(Source {
            data: io::Cursor::new(vec![1u8; (READ_AHEAD_DEPTH + 4) * READ_AHEAD_CHUNK]),
            fail: false,
        })
        .unwrap();
        let mut b = [0u8; 10];
        ra.read_exact(&mut b).unwrap();
        let t = std::time::Instant::now();
        drop(ra);
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn xz_memory_limit_grows_with_threads_within_bounds() {
        assert_eq!(xz_memlimit(0), 256 << 20);
        assert_eq!(xz_memlimit(2), 256 << 20);
        assert_eq!(xz_memlimit(8), 576 << 20);
        assert_eq!(xz_memlimit(64), 1 << 30);
    }
}
