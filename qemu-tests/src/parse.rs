//! Pure parsers of guest and host output, tested on captured text.

/// What the kernel prints when it dies.
pub const KERNEL_PANIC: &str = "Kernel panic - not syncing";

/// Serial console text without `\r`, ANSI/VT100 escape sequences and other
/// control characters (GRUB and systemd paint with them).
pub fn clean_console(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ params final-byte; other escapes: ESC + one char
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&p) = chars.peek() {
                        chars.next();
                        if ('@'..='~').contains(&p) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// First of `needles` found in `hay` (earliest position); returns its index
/// and the byte offset just past it.
pub fn find_first(hay: &str, needles: &[&str]) -> Option<(usize, usize)> {
    needles
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.is_empty())
        .filter_map(|(i, n)| hay.find(n).map(|p| (p, i, p + n.len())))
        .min()
        .map(|(_, i, end)| (i, end))
}

/// MemTotal - MemAvailable from /proc/meminfo, KiB.
pub fn meminfo_used_kib(text: &str) -> Option<u64> {
    let total = proc_status_kib(text, "MemTotal")?;
    let avail = proc_status_kib(text, "MemAvailable")?;
    Some(total.saturating_sub(avail))
}

/// Value of a `Key:   1234 kB` line (/proc/meminfo, /proc/PID/status).
pub fn proc_status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        v.split_whitespace().next()?.parse().ok()
    })
}

/// One line of `ip -br link`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub state: String,
    pub mac: String,
}

/// `ip -br link` output: `eth0@if3   UP   52:54:00:d0:00:01 <BROADCAST,...>`.
pub fn ip_br_link(text: &str) -> Vec<Link> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?.split('@').next()?.to_string();
            let state = f.next()?.to_string();
            let mac = f
                .next()
                .filter(|m| m.contains(':'))
                .unwrap_or("")
                .to_string();
            Some(Link { name, state, mac })
        })
        .collect()
}

/// `id NAME`: `uid=1000(admin) gid=1000(admin) groups=1000(admin),27(sudo)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Id {
    pub uid: u32,
    pub user: String,
    pub gid: u32,
    pub group: String,
    /// (gid, name) of every group, primary included.
    pub groups: Vec<(u32, String)>,
}

pub fn id_output(text: &str) -> Option<Id> {
    fn num_name(s: &str) -> Option<(u32, String)> {
        let (n, rest) = s.split_once('(')?;
        Some((n.parse().ok()?, rest.strip_suffix(')')?.to_string()))
    }
    let mut uid = None;
    let mut gid = None;
    let mut groups = Vec::new();
    for field in text.split_whitespace() {
        let (k, v) = field.split_once('=')?;
        match k {
            "uid" => uid = num_name(v),
            "gid" => gid = num_name(v),
            "groups" => {
                groups = v.split(',').map(num_name).collect::<Option<Vec<_>>>()?;
            }
            _ => {}
        }
    }
    let (uid, user) = uid?;
    let (gid, group) = gid?;
    Some(Id {
        uid,
        user,
        gid,
        group,
        groups,
    })
}

/// Result line of one scenario, as appended to `$DUALROOT_RESULTS`:
/// tab-separated `key=value` fields.
pub fn format_result_line(fields: &[(&str, String)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(['\t', '\n'], " ")))
        .collect::<Vec<_>>()
        .join("\t")
}

pub fn parse_result_line(line: &str) -> Vec<(String, String)> {
    line.split('\t')
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A plain text table: columns padded to the widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < width.len() {
                width[i] = width[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = width.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    out.push_str(&line(
        width
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    ));
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Where one partition lies, from `sfdisk -J`: first sector, sectors, sector size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartExtent {
    pub start: u64,
    pub sectors: u64,
    pub sector_size: u64,
}

impl PartExtent {
    pub fn offset_bytes(&self) -> u64 {
        self.start * self.sector_size
    }

    pub fn size_bytes(&self) -> u64 {
        self.sectors * self.sector_size
    }
}

/// Partition `number` (1-based) of `sfdisk -J DEVICE` output, found by its node
/// name (`DEVICE` + number, or + `p` + number as for nvme), not by its place in
/// the list: a table may have holes.
pub fn sfdisk_partition(json: &str, number: u32) -> Option<PartExtent> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let t = &v["partitiontable"];
    let dev = t["device"].as_str()?;
    let sector_size = t["sectorsize"].as_u64().unwrap_or(512);
    let want = number.to_string();
    t["partitions"].as_array()?.iter().find_map(|p| {
        let rest = p["node"].as_str()?.strip_prefix(dev)?;
        let n = rest.strip_prefix('p').unwrap_or(rest);
        (n == want).then(|| PartExtent {
            start: p["start"].as_u64().unwrap_or(0),
            sectors: p["size"].as_u64().unwrap_or(0),
            sector_size,
        })
    })
}

/// How many recovery boots a console log shows: kernel command lines carrying
/// `rd.dualroot.resume=1` (the recovery entry's), or, when the kernel prints
/// none (a `quiet` command line), the dracut hook's own "resuming the migration"
/// lines (its /dev/console copy; the /dev/kmsg copy carries a timestamp).
pub fn recovery_boots(console: &str) -> usize {
    let kernel = console
        .lines()
        .filter(|l| l.contains("Kernel command line:") && l.contains("rd.dualroot.resume=1"))
        .count();
    let hook = console
        .lines()
        .filter(|l| {
            l.trim_start()
                .starts_with("dualroot-hook: resuming the migration")
        })
        .count();
    kernel.max(hook)
}

/// `sha256sum` output: (path, lowercase hex digest) per line, text (`  `) or
/// binary (` *`) mode. Lines that are not a digest and a name are skipped.
pub fn sha256_list(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (hash, rest) = l.split_at_checked(64)?;
            if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let path = rest
                .strip_prefix("  ")
                .or_else(|| rest.strip_prefix(" *"))?;
            (!path.is_empty()).then(|| (path.to_string(), hash.to_ascii_lowercase()))
        })
        .collect()
}

/// The PVIDs an LVM devices file (`/etc/lvm/devices/system.devices`) names:
/// the `PVID=` field of each entry line (comments and `VERSION=` skipped).
pub fn devices_file_pvids(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|f| f.strip_prefix("PVID="))
        .filter(|p| !p.is_empty() && *p != ".")
        .map(str::to_string)
        .collect()
}
