//! The outer container of a bundle: an uncompressed ustar archive with exactly three
//! members in a fixed order (`manifest.toml`, `manifest.sig`, payload). It is read and
//! written here by hand so a reader can check the signature before it touches the
//! payload, streaming, and so damage gets a precise error instead of a generic one.

use anyhow::{bail, Context, Result};
use std::io::{self, Read, Write};

const BLOCK: usize = 512;

/// Writes a ustar header for a regular file. Sizes past the 11-octal-digit limit
/// (8 GiB) use the GNU base-256 form, which GNU tar reads.
pub fn write_header<W: Write>(w: &mut W, name: &str, size: u64, mtime: u64) -> io::Result<()> {
    assert!(name.len() < 100, "outer member names are short constants");
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    if size < 0o77777777777 {
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    } else {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..148].copy_from_slice(format!("{:011o}\0", mtime.min(0o77777777777)).as_bytes());
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    w.write_all(&h)
}

pub fn padding(size: u64) -> usize {
    (BLOCK - (size % BLOCK as u64) as usize) % BLOCK
}

pub fn write_member<W: Write>(w: &mut W, name: &str, data: &[u8], mtime: u64) -> io::Result<()> {
    write_header(w, name, data.len() as u64, mtime)?;
    w.write_all(data)?;
    w.write_all(&[0u8; BLOCK][..padding(data.len() as u64)])
}

pub fn write_end<W: Write>(w: &mut W) -> io::Result<()> {
    w.write_all(&[0u8; 2 * BLOCK])
}

/// Reads one header; returns the member's name and size. `what` names the member
/// the caller expects, for errors.
pub fn read_header<R: Read>(r: &mut R, what: &str) -> Result<(String, u64)> {
    let mut h = [0u8; BLOCK];
    r.read_exact(&mut h).with_context(|| {
        format!("the bundle ends before the header of {what}: not a dualroot bundle or truncated")
    })?;
    if h.iter().all(|&b| b == 0) {
        bail!("the bundle ends (tar end marker) where {what} was expected");
    }
    let stored = parse_octal(&h[148..156]).with_context(|| {
        format!("the header where {what} was expected is not a tar header: the file is not a dualroot bundle or it is damaged")
    })?;
    let mut sum: u64 = h.iter().map(|&b| b as u64).sum();
    sum = sum - h[148..156].iter().map(|&b| b as u64).sum::<u64>() + 8 * b' ' as u64;
    if stored != sum {
        bail!("the header where {what} was expected has a bad checksum: the file is not a dualroot bundle (not a tar archive) or it is damaged");
    }
    if h[156] != b'0' && h[156] != 0 {
        bail!(
            "member where {what} was expected is not a regular file (type {:?})",
            h[156] as char
        );
    }
    // GNU tar joins a POSIX header's prefix field to its name: the name read here
    // must be the whole name.
    if &h[257..263] == b"ustar\0" && h[345] != 0 {
        bail!("the header where {what} was expected uses the ustar prefix field, so GNU tar reads another name there; the bundle is refused");
    }
    let end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
    let name = String::from_utf8_lossy(&h[..end]).into_owned();
    let size = if h[124] & 0x80 != 0 {
        // GNU tar reads a base-256 number from all 12 bytes.
        if h[124] != 0x80 || h[125..128] != [0, 0, 0] {
            bail!("the size field of {name:?} (where {what} was expected) is a base-256 number past 64 bits or negative; the bundle is refused");
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[128..136]);
        u64::from_be_bytes(b)
    } else {
        parse_octal(&h[124..136]).with_context(|| format!("size field of {name:?} is not octal"))?
    };
    Ok((name, size))
}

fn parse_octal(field: &[u8]) -> Result<u64> {
    let s: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let s = s.trim();
    if s.is_empty() {
        return Ok(0);
    }
    Ok(u64::from_str_radix(s, 8)?)
}

/// Reads a small member fully (with its padding), refusing sizes above `limit`.
pub fn read_small<R: Read>(r: &mut R, expect: &str, limit: u64) -> Result<Vec<u8>> {
    let (name, size) = read_header(r, expect)?;
    if name != expect {
        bail!("bundle member {name:?} found where {expect} was expected");
    }
    if size > limit {
        bail!("{expect} is {size} bytes, more than the {limit}-byte limit: refusing to read it");
    }
    let mut data = vec![0u8; size as usize];
    r.read_exact(&mut data)
        .with_context(|| format!("the bundle ends inside {expect}"))?;
    skip(r, padding(size) as u64).with_context(|| format!("the bundle ends after {expect}"))?;
    Ok(data)
}

pub fn skip<R: Read>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied != n {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_round_trip_and_gnu_tar_compatible_header() {
        let mut v = Vec::new();
        write_member(&mut v, "manifest.toml", b"hello", 1_700_000_000).unwrap();
        write_end(&mut v).unwrap();
        assert_eq!(v.len(), 512 * 4);
        let mut r = &v[..];
        assert_eq!(read_small(&mut r, "manifest.toml", 100).unwrap(), b"hello");
        // The tar crate (an independent reader) agrees with our header.
        let mut a = tar::Archive::new(&v[..]);
        let e = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str(), Some("manifest.toml"));
        assert_eq!(e.header().size().unwrap(), 5);
    }

    #[test]
    fn garbage_is_named() {
        let garbage = vec![0x5au8; 2048];
        let e = format!(
            "{:#}",
            read_small(&mut &garbage[..], "manifest.toml", 100).unwrap_err()
        );
        assert!(e.contains("not a dualroot bundle"), "{e}");
        let e = format!(
            "{:#}",
            read_small(&mut &garbage[..10], "manifest.toml", 100).unwrap_err()
        );
        assert!(e.contains("ends before the header"), "{e}");
    }

    #[test]
    fn huge_size_uses_base256() {
        let mut v = Vec::new();
        write_header(&mut v, "rootfs.tar.xz", 10 << 30, 0).unwrap();
        let (n, s) = read_header(&mut &v[..], "payload").unwrap();
        assert_eq!((n.as_str(), s), ("rootfs.tar.xz", 10 << 30));
    }
}
