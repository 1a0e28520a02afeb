//! A strict, streaming reader for the payload tar (and carried-file tars).
//!
//! It reads the subset of PAX/ustar that `bundle create` writes, and refuses every
//! construct that GNU tar (the reference reader named in the README) could read
//! differently: a PAX `size` that disagrees with the header, a GNU long name together
//! with a PAX path, the ustar prefix field, global headers, unknown PAX records,
//! sparse files, non-directories named with a trailing `/`, data on entries that
//! have none, and anything but zeros after the end-of-archive marker. Extension
//! headers are capped before they are read, so a huge PAX record or long name cannot
//! make the reader allocate more than [`MAX_EXTENSION`].

use anyhow::{bail, Context, Result};
use std::io::{self, Read};

const BLOCK: u64 = 512;
/// Largest PAX extended header or GNU long name/link read into memory.
pub const MAX_EXTENSION: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    HardLink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

/// One entry's metadata, after its extension headers were applied.
#[derive(Debug, Clone)]
pub struct Header {
    pub kind: Kind,
    pub name: Vec<u8>,
    pub link: Vec<u8>,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

pub struct TarReader<R> {
    inner: R,
    /// Data bytes of the current entry not yet read, and its padding.
    left: u64,
    pad: u64,
    ended: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader {
            inner,
            left: 0,
            pad: 0,
            ended: false,
        }
    }

    /// Reads the current entry's data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (buf.len() as u64).min(self.left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the tar ends inside this entry's data (truncated or damaged)",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        if copied != n {
            bail!("the tar ends inside an entry (truncated or damaged)");
        }
        Ok(())
    }

    fn read_block(&mut self, h: &mut [u8; 512]) -> Result<()> {
        let mut got = 0;
        while got < h.len() {
            let n = self.inner.read(&mut h[got..])?;
            if n == 0 {
                bail!("the tar ends without its end-of-archive marker (truncated or damaged)");
            }
            got += n;
        }
        Ok(())
    }

    fn read_extension(&mut self, size: u64, what: &str) -> Result<Vec<u8>> {
        if size > MAX_EXTENSION {
            bail!(
                "its {what} is {size} bytes, more than the {} KiB limit",
                MAX_EXTENSION >> 10
            );
        }
        let mut v = vec![0u8; size as usize];
        let mut got = 0;
        while got < v.len() {
            let n = self.inner.read(&mut v[got..])?;
            if n == 0 {
                bail!("the tar ends inside a {what} (truncated or damaged)");
            }
            got += n;
        }
        self.skip(padding(size))?;
        Ok(v)
    }

    /// The next entry, or `None` at the end-of-archive marker. Whatever the caller
    /// left unread of the previous entry is skipped.
    pub fn next_entry(&mut self) -> Result<Option<Header>> {
        if self.ended {
            return Ok(None);
        }
        self.skip(self.left + self.pad)?;
        self.left = 0;
        self.pad = 0;
        let mut pax: Option<Vec<u8>> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let mut h = [0u8; 512];
            self.read_block(&mut h)?;
            if h.iter().all(|&b| b == 0) {
                if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    bail!("an extension header at the end of the tar describes no entry");
                }
                self.ended = true;
                return Ok(None);
            }
            check_checksum(&h)?;
            let size = parse_num(&h[124..136]).context("size field")?;
            match h[156] {
                b'x' => {
                    if pax.is_some() {
                        bail!("two PAX extended headers describe one entry");
                    }
                    pax = Some(self.read_extension(size, "PAX extended header")?);
                }
                b'L' => {
                    if long_name.is_some() {
                        bail!("two GNU long names describe one entry");
                    }
                    long_name = Some(self.read_extension(size, "GNU long name")?);
                }
                b'K' => {
                    if long_link.is_some() {
                        bail!("two GNU long link names describe one entry");
                    }
                    long_link = Some(self.read_extension(size, "GNU long link name")?);
                }
                b'g' => bail!("global PAX headers (type g) are not supported"),
                _ => {
                    let hdr = build(&h, size, pax.as_deref(), long_name, long_link)?;
                    self.left = hdr.size;
                    self.pad = padding(hdr.size);
                    return Ok(Some(hdr));
                }
            }
        }
    }

    /// After the end-of-archive marker: reads what follows, which must be zeros, and
    /// hands back the inner reader.
    pub fn finish(mut self) -> Result<R> {
        while self.next_entry()?.is_some() {}
        let mut buf = [0u8; 8192];
        loop {
            let n = self.inner.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                bail!("the tar holds data after its end-of-archive marker");
            }
        }
        Ok(self.inner)
    }
}

pub fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn check_checksum(h: &[u8; 512]) -> Result<()> {
    let stored = parse_num(&h[148..156]).context("checksum field")?;
    let sum: u64 = h[..148]
        .iter()
        .chain(&h[156..])
        .map(|&b| b as u64)
        .sum::<u64>()
        + 8 * b' ' as u64;
    if stored != sum {
        bail!("a tar header has a bad checksum (damaged)");
    }
    Ok(())
}

/// A numeric header field as GNU tar reads it: octal (leading spaces, ended by NUL
/// or space) or positive base-256. Anything else is refused.
pub fn parse_num(field: &[u8]) -> Result<u64> {
    if field[0] == 0x80 {
        let mut v: u64 = 0;
        for &b in &field[1..] {
            if v >> 56 != 0 {
                bail!("base-256 number does not fit 64 bits");
            }
            v = (v << 8) | b as u64;
        }
        return Ok(v);
    }
    if field[0] & 0x80 != 0 {
        bail!("negative or unknown base-256 number");
    }
    let mut i = 0;
    while i < field.len() && field[i] == b' ' {
        i += 1;
    }
    let start = i;
    let mut v: u64 = 0;
    while i < field.len() && (b'0'..=b'7').contains(&field[i]) {
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add((field[i] - b'0') as u64))
            .context("octal number does not fit 64 bits")?;
        i += 1;
    }
    if i == start {
        if field[i..].iter().all(|&b| b == 0 || b == b' ') {
            return Ok(0);
        }
        bail!("not an octal number");
    }
    if i < field.len() && field[i] != 0 && field[i] != b' ' {
        bail!("not an octal number");
    }
    Ok(v)
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// A GNU long name's data: the name and its terminating NUL(s), nothing after.
fn long_name_value(mut v: Vec<u8>, what: &str) -> Result<Vec<u8>> {
    while v.last() == Some(&0) {
        v.pop();
    }
    if v.is_empty() || v.contains(&0) {
        bail!("its {what} is empty or holds a NUL byte");
    }
    Ok(v)
}

/// Splits PAX extended header data into (key, value) records, strictly.
pub fn parse_pax(mut data: &[u8]) -> Result<Vec<(&[u8], &[u8])>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let sp = data
            .iter()
            .take(21)
            .position(|&b| b == b' ')
            .context("malformed PAX record (no length)")?;
        let digits = &data[..sp];
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            bail!("malformed PAX record length");
        }
        let len: usize = std::str::from_utf8(digits)?
            .parse()
            .context("malformed PAX record length")?;
        if len < sp + 4 || len > data.len() {
            bail!("malformed PAX record length {len}");
        }
        let rec = &data[sp + 1..len];
        let Some((&b'\n', kv)) = rec.split_last() else {
            bail!("malformed PAX record (no newline at its end)");
        };
        let eq = kv
            .iter()
            .position(|&b| b == b'=')
            .context("malformed PAX record (no '=')")?;
        if eq == 0 {
            bail!("malformed PAX record (empty key)");
        }
        out.push((&kv[..eq], &kv[eq + 1..]));
        data = &data[len..];
    }
    Ok(out)
}

fn decimal(v: &[u8], what: &str) -> Result<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        bail!(
            "PAX {what} record {:?} is not a number",
            String::from_utf8_lossy(v)
        );
    }
    std::str::from_utf8(v)?
        .parse()
        .with_context(|| format!("PAX {what} record is too large"))
}

/// A PAX time: `[-]seconds[.fraction]`, as (seconds, nanoseconds) rounded down.
pub fn pax_time(v: &[u8]) -> Result<(i64, u32)> {
    let bad = || anyhow::anyhow!("PAX mtime {:?} is not a time", String::from_utf8_lossy(v));
    let (neg, rest) = match v.split_first() {
        Some((b'-', r)) => (true, r),
        _ => (false, v),
    };
    let (int, frac) = match rest.iter().position(|&b| b == b'.') {
        Some(p) => (&rest[..p], &rest[p + 1..]),
        None => (rest, &b""[..]),
    };
    if int.is_empty() || !int.iter().chain(frac).all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let secs: i64 = std::str::from_utf8(int)?.parse().map_err(|_| bad())?;
    let mut nsec: u32 = 0;
    for i in 0..9 {
        nsec = nsec * 10 + frac.get(i).map(|d| (d - b'0') as u32).unwrap_or(0);
    }
    let extra = frac.iter().skip(9).any(|&d| d != b'0');
    if !neg {
        return Ok((secs, nsec));
    }
    if nsec == 0 && !extra {
        return Ok((-secs, 0));
    }
    let nsec = if extra { nsec + 1 } else { nsec };
    Ok((-secs - 1, 1_000_000_000 - nsec))
}

/// The name an entry most likely has, for messages about an entry that is refused.
fn shown_name(h: &[u8; 512], pax: Option<&[u8]>, long_name: Option<&[u8]>) -> String {
    let from_pax = pax
        .and_then(|p| parse_pax(p).ok())
        .and_then(|r| r.into_iter().rev().find(|(k, _)| *k == b"path"))
        .map(|(_, v)| v.to_vec());
    let name = from_pax
        .or_else(|| long_name.map(|l| cstr(l).to_vec()))
        .unwrap_or_else(|| {
            let prefix = cstr(&h[345..500]);
            let name = cstr(&h[..100]);
            if &h[257..263] == b"ustar\0" && !prefix.is_empty() {
                [prefix, b"/", name].concat()
            } else {
                name.to_vec()
            }
        });
    let mut s = String::from_utf8_lossy(&name).into_owned();
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

fn build(
    h: &[u8; 512],
    size: u64,
    pax: Option<&[u8]>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
) -> Result<Header> {
    let shown = shown_name(h, pax, long_name.as_deref());
    build_inner(h, size, pax, long_name, long_link).with_context(|| format!("entry {shown:?}"))
}

fn build_inner(
    h: &[u8; 512],
    size: u64,
    pax: Option<&[u8]>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
) -> Result<Header> {
    let kind = match h[156] {
        b'0' | 0 | b'7' => Kind::File,
        b'1' => Kind::HardLink,
        b'2' => Kind::Symlink,
        b'3' => Kind::Char,
        b'4' => Kind::Block,
        b'5' => Kind::Dir,
        b'6' => Kind::Fifo,
        b'S' => bail!("sparse entries are not supported"),
        t => bail!("entry type {:?} is not supported", t as char),
    };
    let posix = &h[257..263] == b"ustar\0";
    let mut name = cstr(&h[..100]).to_vec();
    let prefix = cstr(&h[345..500]);
    let mut link = cstr(&h[157..257]).to_vec();
    let mut uid = parse_num(&h[108..116]).context("uid field")?;
    let mut gid = parse_num(&h[116..124]).context("gid field")?;
    let mut mtime = parse_num(&h[136..148]).context("mtime field")? as i64;
    let mut mtime_nsec = 0;
    let mut xattrs = Vec::new();
    let mut pax_path = None;
    let mut pax_link = None;
    for (k, v) in pax.map(parse_pax).transpose()?.unwrap_or_default() {
        match k {
            b"path" | b"linkpath" => {
                if v.is_empty() || v.contains(&0) {
                    bail!(
                        "its PAX {} record is empty or holds a NUL byte",
                        String::from_utf8_lossy(k)
                    );
                }
                if k == b"path" {
                    pax_path = Some(v.to_vec());
                } else {
                    pax_link = Some(v.to_vec());
                }
            }
            b"size" => {
                let s = decimal(v, "size")?;
                if s != size {
                    bail!(
                        "its PAX size record ({s}) disagrees with its header size ({size}); GNU tar would read other bytes"
                    );
                }
            }
            b"uid" => uid = decimal(v, "uid")?,
            b"gid" => gid = decimal(v, "gid")?,
            b"mtime" => (mtime, mtime_nsec) = pax_time(v)?,
            b"atime" | b"ctime" | b"uname" | b"gname" | b"comment" | b"charset" | b"hdrcharset"
            | b"SCHILY.dev" | b"SCHILY.ino" | b"SCHILY.nlink" => {}
            _ => match k.strip_prefix(b"SCHILY.xattr.") {
                Some(x) if !x.is_empty() => xattrs.push((x.to_vec(), v.to_vec())),
                _ => bail!(
                    "its PAX record {:?} is not supported",
                    String::from_utf8_lossy(k)
                ),
            },
        }
    }
    match (pax_path, long_name) {
        (Some(_), Some(_)) => bail!("it has both a GNU long name and a PAX path"),
        (Some(p), None) => name = p,
        (None, Some(l)) => name = long_name_value(l, "GNU long name")?,
        (None, None) => {
            if posix && !prefix.is_empty() {
                bail!("it uses the ustar prefix field, which dualroot does not read");
            }
        }
    }
    match (pax_link, long_link) {
        (Some(_), Some(_)) => bail!("it has both a GNU long link name and a PAX linkpath"),
        (Some(p), None) => link = p,
        (None, Some(l)) => link = long_name_value(l, "GNU long link name")?,
        (None, None) => {}
    }
    if name.is_empty() {
        bail!("an entry has no name");
    }
    if kind != Kind::Dir && name.ends_with(b"/") {
        bail!("a non-directory entry whose name ends in '/' is refused (GNU tar would make a directory of it)");
    }
    if kind != Kind::File && size != 0 {
        bail!("a {kind:?} entry carries {size} bytes of data; only regular files have data");
    }
    let (dev_major, dev_minor) = if matches!(kind, Kind::Char | Kind::Block) {
        (
            parse_num(&h[329..337]).context("device major field")?,
            parse_num(&h[337..345]).context("device minor field")?,
        )
    } else {
        (0, 0)
    };
    let id = |v: u64, what: &str| -> Result<u32> {
        u32::try_from(v).with_context(|| format!("{what} {v} does not fit 32 bits"))
    };
    Ok(Header {
        kind,
        name,
        link,
        size,
        mode: (parse_num(&h[100..108]).context("mode field")? & 0o7777) as u32,
        uid: id(uid, "uid")?,
        gid: id(gid, "gid")?,
        mtime,
        mtime_nsec,
        dev_major: id(dev_major, "device major")?,
        dev_minor: id(dev_minor, "device minor")?,
        xattrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_num(b"0000644\0").unwrap(), 0o644);
        assert_eq!(parse_num(b"  644 \0\0").unwrap(), 0o644);
        assert_eq!(parse_num(b"\0\0\0\0\0\0\0\0").unwrap(), 0);
        assert!(parse_num(b"0000698\0").is_err());
        assert!(parse_num(b"\xff\xff\xff\xff\xff\xff\xff\xfe").is_err());
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[4..].copy_from_slice(&(10u64 << 30).to_be_bytes());
        assert_eq!(parse_num(&f).unwrap(), 10 << 30);
        f[1] = 1;
        assert!(parse_num(&f).is_err());
    }

    #[test]
    fn pax_records() {
        let r = parse_pax(b"11 path=ab\n19 SCHILY.xattr.a=\n").unwrap();
        assert_eq!(
            r,
            vec![
                (&b"path"[..], &b"ab"[..]),
                (&b"SCHILY.xattr.a"[..], &b""[..])
            ]
        );
        assert!(parse_pax(b"12 path=ab\n").is_err());
        assert!(parse_pax(b"11 path=abX").is_err());
        assert!(parse_pax(b"99999999999999999999999 x=y\n").is_err());
        assert!(parse_pax(b"5 =\n").is_err());
    }

    #[test]
    fn pax_times() {
        assert_eq!(pax_time(b"1700000000").unwrap(), (1_700_000_000, 0));
        assert_eq!(pax_time(b"-86400").unwrap(), (-86_400, 0));
        assert_eq!(pax_time(b"1.5").unwrap(), (1, 500_000_000));
        assert_eq!(pax_time(b"-1.5").unwrap(), (-2, 500_000_000));
        assert_eq!(pax_time(b"-0.0000000001").unwrap(), (-1, 999_999_999));
        assert!(pax_time(b"").is_err());
        assert!(pax_time(b"-").is_err());
        assert!(pax_time(b"1e9").is_err());
        assert!(pax_time(b"99999999999999999999").is_err());
    }
}
