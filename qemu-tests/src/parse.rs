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
