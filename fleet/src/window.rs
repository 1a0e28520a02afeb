//! Download and install windows (issue 24), in one of two forms:
//!
//! - daily: `{"start": "02:00", "end": "05:00"}` is open while the local
//!   clock reads 02:00..05:00; an end before the start runs over midnight.
//! - cron: `{"cron": "0 2 * * 1-5", "durationMinutes": 120}` opens at each
//!   fire time t of a standard 5-field cron expression and stays open until
//!   t + the duration (overlapping openings merge).
//!
//! The local time is that of `timeZone` (an IANA name, with its DST rules,
//! from the time zone database built into the binary: a controller without
//! /usr/share/zoneinfo gives the same answers) or of a fixed
//! `utcOffsetMinutes`; neither is UTC.
//!
//! Across DST changes: a daily window opens at the first moment the clock
//! reads its start and closes at the first moment after that it reads its
//! end. When the clock jumps over the start (spring forward) it opens at the
//! jump; a repeated hour (fall back) does not open it twice. A cron fire time
//! in a skipped hour is moved forward by the jump (jiff's `compatible`, as
//! RFC 5545 and Temporal do), and one in a repeated hour fires once, at its
//! first occurrence.

use anyhow::{bail, Context, Result};
use jiff::civil::{Date, DateTime};
use jiff::tz::{AmbiguousOffset, Offset, TimeZone, TimeZoneDatabase};
use jiff::{SignedDuration, Span, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

const MIN_MS: i64 = 60_000;
/// How far ahead a cron's next fire time is looked for.
const SEARCH_YEARS: i64 = 5;
/// The longest opening of a cron window (31 days).
const MAX_DURATION_MIN: i64 = 31 * 24 * 60;
/// Overlapping cron openings merge into one, up to this many fire times.
const MERGE_MAX: usize = 1440;
/// "Not within the search": far enough to never come, small enough that
/// adding a timeout to it (or seconds → ms) cannot overflow.
const NEVER: i64 = i64::MAX / 4;

/// A window as specs give it and the database stores it. Exactly one of
/// (`start` + `end`) or (`cron` + `durationMinutes`); at most one of
/// `timeZone` and `utcOffsetMinutes`. `validate` says what is wrong.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Window {
    /// Daily: local "HH:MM" when it opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// Daily: local "HH:MM" when it closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    /// Cron: "minute hour day-of-month month day-of-week", local time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Cron: how long each opening lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_minutes: Option<i64>,
    /// IANA time zone name ("Europe/Berlin").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Local time = UTC + this many minutes, all year.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utc_offset_minutes: Option<i64>,
}

impl Window {
    /// A daily window, "HH:MM" to "HH:MM", in UTC until a zone is given.
    pub fn daily(start: &str, end: &str) -> Window {
        Window {
            start: Some(start.into()),
            end: Some(end.into()),
            ..Window::default()
        }
    }

    /// A cron window whose openings last `minutes`, in UTC until a zone is
    /// given.
    pub fn cron(expr: &str, minutes: i64) -> Window {
        Window {
            cron: Some(expr.into()),
            duration_minutes: Some(minutes),
            ..Window::default()
        }
    }

    /// In an IANA time zone.
    pub fn in_zone(self, name: &str) -> Window {
        Window {
            time_zone: Some(name.into()),
            ..self
        }
    }

    /// In a fixed offset from UTC.
    pub fn utc_offset(self, minutes: i64) -> Window {
        Window {
            utc_offset_minutes: Some(minutes),
            ..self
        }
    }

    /// Refuses a window that is not exactly one form, an unknown zone, a bad
    /// time or cron, or a cron with no opening in the 5 years after `now`.
    pub fn validate(&self, now: i64) -> Result<()> {
        let c = self.compile()?;
        if let Rule::Cron { cron, .. } = &c.rule {
            if c.next_fire_after(cron, now).is_none() {
                bail!(
                    "cron {:?} never fires (no fire time in the {SEARCH_YEARS} years from now)",
                    cron.text
                );
            }
        }
        Ok(())
    }

    fn compile(&self) -> Result<Compiled> {
        let zone = match (&self.time_zone, self.utc_offset_minutes) {
            (Some(_), Some(_)) => bail!(
                "a window takes timeZone (a name with DST rules) or utcOffsetMinutes (fixed), not both"
            ),
            (Some(name), None) => zone(name)?,
            (None, Some(m)) => {
                if m.abs() > 14 * 60 {
                    bail!("UTC offset {m} min is not a real one");
                }
                TimeZone::fixed(Offset::from_seconds((m * 60) as i32)?)
            }
            (None, None) => TimeZone::UTC,
        };
        let rule = match (
            &self.start,
            &self.end,
            &self.cron,
            self.duration_minutes,
        ) {
            (Some(start), Some(end), None, None) => {
                let (a, b) = (minute_of_day(start)?, minute_of_day(end)?);
                if a == b {
                    bail!("window {start}-{end} is empty");
                }
                Rule::Daily { start: a, end: b }
            }
            (None, None, Some(expr), Some(minutes)) => {
                if !(1..=MAX_DURATION_MIN).contains(&minutes) {
                    bail!(
                        "durationMinutes {minutes} is not 1..{MAX_DURATION_MIN} (31 days)"
                    );
                }
                Rule::Cron {
                    cron: Cron::parse(expr)?,
                    duration: minutes * MIN_MS,
                }
            }
            (None, None, None, None) => {
                bail!("a window needs start and end (daily) or cron and durationMinutes")
            }
            (s, _, None, None) => bail!(
                "a daily window needs both start and end (got only {})",
                if s.is_some() { "start" } else { "end" }
            ),
            (None, None, Some(_), None) => {
                bail!("a cron window needs durationMinutes (how long each opening lasts)")
            }
            (_, _, None, Some(_)) => {
                bail!("durationMinutes goes with cron (a daily window lasts from start to end)")
            }
            _ => bail!(
                "a window is either daily (start and end) or cron (cron and durationMinutes), not both"
            ),
        };
        Ok(Compiled { zone, rule })
    }

    /// The opening that contains `now`, or else the next one: (open, close)
    /// in unix ms. A window that cannot be read (not validated) never opens.
    pub fn opening(&self, now: i64) -> (i64, i64) {
        match self.compile() {
            Ok(c) => c.opening(now).unwrap_or((NEVER, NEVER)),
            Err(e) => {
                log::warn!("window {self:?} does not open: {e:#}");
                (NEVER, NEVER)
            }
        }
    }

    pub fn contains(&self, now: i64) -> bool {
        let (open, _) = self.opening(now);
        open <= now
    }

    /// `ms` as the window's local time: "2027-01-18 02:00 CET (Europe/Berlin)",
    /// "2027-01-18 02:00 +01:00", "2027-01-18 02:00 UTC".
    pub fn local_time(&self, ms: i64) -> String {
        let Ok(t) = Timestamp::from_millisecond(ms) else {
            return "never".into();
        };
        let Ok(c) = self.compile() else {
            return t.strftime("%Y-%m-%d %H:%M UTC").to_string();
        };
        let z = t.to_zoned_datetime(c.zone.clone());
        match (c.zone.iana_name(), self.utc_offset_minutes) {
            (Some("UTC"), _) | (None, None) => z.strftime("%Y-%m-%d %H:%M UTC").to_string(),
            (Some(name), _) => format!("{} ({name})", z.strftime("%Y-%m-%d %H:%M %Z")),
            (None, Some(_)) => z.strftime("%Y-%m-%d %H:%M %:z").to_string(),
        }
    }
}

/// The zone of an IANA name, from the bundled database (never the host's).
fn zone(name: &str) -> Result<TimeZone> {
    match TimeZoneDatabase::bundled().get(name) {
        Ok(z) if !z.is_unknown() => Ok(z),
        _ => bail!(
            "unknown time zone {name:?} (an IANA name such as \"Europe/Berlin\" or \"America/New_York\")"
        ),
    }
}

fn minute_of_day(s: &str) -> Result<i64> {
    let (h, m) = s
        .split_once(':')
        .with_context(|| format!("window time {s:?} is not HH:MM"))?;
    let (h, m): (i64, i64) = (
        h.parse().with_context(|| format!("hour in {s:?}"))?,
        m.parse().with_context(|| format!("minute in {s:?}"))?,
    );
    if !(0..24).contains(&h) || !(0..60).contains(&m) {
        bail!("window time {s:?} is not a time of day");
    }
    Ok(h * 60 + m)
}

struct Compiled {
    zone: TimeZone,
    rule: Rule,
}

enum Rule {
    /// Minutes from local midnight; `end <= start` runs over midnight.
    Daily { start: i64, end: i64 },
    /// `duration` in ms.
    Cron { cron: Cron, duration: i64 },
}

fn at(d: Date, minute_of_day: i64) -> DateTime {
    d.at((minute_of_day / 60) as i8, (minute_of_day % 60) as i8, 0, 0)
}

impl Compiled {
    fn opening(&self, now: i64) -> Option<(i64, i64)> {
        match &self.rule {
            Rule::Daily { start, end } => self.daily_opening(*start, *end, now),
            Rule::Cron { cron, duration } => {
                // the first fire time after now - duration is the earliest
                // opening still open at now, or else the next one
                let mut fires = self.fires_after(cron, now.checked_sub(*duration)?)?;
                let open = fires.next()?;
                let mut close = open + duration;
                for f in fires.take(MERGE_MAX) {
                    if f > close {
                        break;
                    }
                    close = f + duration;
                }
                Some((open, close))
            }
        }
    }

    /// The first instant at which the local clock reads `dt` or later: `dt`
    /// itself, its first occurrence in a repeated hour, the jump over it in
    /// a skipped one.
    fn reach(&self, dt: DateTime) -> Option<i64> {
        let amb = self.zone.to_ambiguous_timestamp(dt);
        let t = match amb.offset() {
            AmbiguousOffset::Gap { .. } => {
                let before = amb.earlier().ok()?;
                self.zone.following(before).next()?.timestamp()
            }
            _ => amb.compatible().ok()?,
        };
        Some(t.as_millisecond())
    }

    fn daily_opening(&self, start: i64, end: i64, now: i64) -> Option<(i64, i64)> {
        let today = self
            .zone
            .to_datetime(Timestamp::from_millisecond(now).ok()?)
            .date();
        // a day's opening ends before the next day's begins; the one that
        // began yesterday may still run (over midnight), and one a day may be
        // empty (a skipped hour)
        for k in -2..=7 {
            let d = today.checked_add(Span::new().days(k)).ok()?;
            let close_day = if end <= start { d.tomorrow().ok()? } else { d };
            let open = self.reach(at(d, start))?;
            let close = self.reach(at(close_day, end))?;
            if open < close && now < close {
                return Some((open, close));
            }
        }
        None
    }

    /// The fire times after `x` (unix ms), in order, each instant once,
    /// within the search bound.
    fn fires_after<'a>(&'a self, cron: &'a Cron, x: i64) -> Option<Fires<'a>> {
        let ts = Timestamp::from_millisecond(x).ok()?;
        // A local time in a skipped hour fires after the jump: within a day
        // after a spring-forward, a local time before x's can still fire
        // after x. Start that much earlier.
        let now_off = self.zone.to_offset(ts).seconds();
        let day_off = self
            .zone
            .to_offset(ts.checked_sub(SignedDuration::from_hours(26)).ok()?)
            .seconds();
        let from = self
            .zone
            .to_datetime(ts)
            .checked_sub(SignedDuration::from_secs(i64::from(
                (now_off - day_off).max(0),
            )))
            .ok()?;
        let day = from.date();
        Some(Fires {
            c: self,
            cron,
            after: x,
            day,
            last_day: day.checked_add(Span::new().years(SEARCH_YEARS)).ok()?,
            from: Some((from.hour(), from.minute())),
            found: BTreeSet::new(),
            later: None,
        })
    }

    fn next_fire_after(&self, cron: &Cron, x: i64) -> Option<i64> {
        self.fires_after(cron, x)?.next()
    }
}

/// Fire times in order. A day's local times are turned into instants a day
/// at a time; they come out once no later day can give an earlier one (a
/// local time in a skipped hour moves forward, past later local times).
struct Fires<'a> {
    c: &'a Compiled,
    cron: &'a Cron,
    after: i64,
    /// The next day to look at.
    day: Date,
    last_day: Date,
    /// On the first day: from this (hour, minute) on.
    from: Option<(i8, i8)>,
    found: BTreeSet<i64>,
    /// Cached: the first moment the clock reads `day` 00:00.
    later: Option<Option<i64>>,
}

impl Iterator for Fires<'_> {
    type Item = i64;

    fn next(&mut self) -> Option<i64> {
        loop {
            if let Some(&first) = self.found.first() {
                // every fire time of `day` or later comes at or after the
                // first moment the clock reads `day` 00:00
                let later = match self.later {
                    Some(l) => l,
                    None if self.day > self.last_day => None,
                    None => {
                        let l = self.c.reach(self.day.at(0, 0, 0, 0));
                        self.later = Some(l);
                        l
                    }
                };
                if later.is_none_or(|l| first < l) {
                    return self.found.pop_first();
                }
            }
            if self.day > self.last_day {
                return None;
            }
            let (fh, fm) = self.from.take().unwrap_or((0, 0));
            if self.cron.day_matches(self.day) {
                for h in (fh..24).filter(|h| self.cron.hours >> h & 1 == 1) {
                    let m0 = if h == fh { fm } else { 0 };
                    for m in (m0..60).filter(|m| self.cron.minutes >> m & 1 == 1) {
                        let local = self.day.at(h, m, 0, 0);
                        let t = self
                            .c
                            .zone
                            .to_ambiguous_timestamp(local)
                            .compatible()
                            .ok()?
                            .as_millisecond();
                        if t > self.after {
                            self.found.insert(t);
                        }
                    }
                }
            }
            self.day = self.day.tomorrow().ok()?;
            self.later = None;
        }
    }
}

/// A standard 5-field cron expression as bit sets.
#[derive(Debug, Clone, PartialEq)]
struct Cron {
    text: String,
    /// bits 0..59
    minutes: u64,
    /// bits 0..23
    hours: u64,
    /// bits 1..31
    doms: u64,
    /// bits 1..12
    months: u64,
    /// bits 0..6, Sunday 0
    dows: u64,
    /// The field starts with `*` (also `*/n`): as in Vixie cron, a day then
    /// has to match both day fields, otherwise either.
    dom_star: bool,
    dow_star: bool,
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

impl Cron {
    fn parse(text: &str) -> Result<Cron> {
        let f: Vec<&str> = text.split_whitespace().collect();
        if f.len() != 5 {
            bail!(
                "cron {text:?} needs 5 fields (minute hour day-of-month month day-of-week), not {}",
                f.len()
            );
        }
        let ctx = || format!("cron {text:?}");
        let mut dows = field(f[4], 0, 7, &DAYS, 0, "day of week").with_context(ctx)?;
        if dows & 1 << 7 != 0 {
            dows = (dows | 1) & !(1 << 7); // 7 is Sunday too
        }
        Ok(Cron {
            text: text.into(),
            minutes: field(f[0], 0, 59, &[], 0, "minute").with_context(ctx)?,
            hours: field(f[1], 0, 23, &[], 0, "hour").with_context(ctx)?,
            doms: field(f[2], 1, 31, &[], 0, "day of month").with_context(ctx)?,
            months: field(f[3], 1, 12, &MONTHS, 1, "month").with_context(ctx)?,
            dows,
            dom_star: f[2].starts_with('*'),
            dow_star: f[4].starts_with('*'),
        })
    }

    fn day_matches(&self, d: Date) -> bool {
        if self.months >> d.month() & 1 == 0 {
            return false;
        }
        let dom = self.doms >> d.day() & 1 == 1;
        let dow = self.dows >> d.weekday().to_sunday_zero_offset() & 1 == 1;
        if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        }
    }
}

/// One field: `*`, `a`, `a-b`, `*/n`, `a-b/n`, lists of those; `names[i]`
/// stands for `first + i`.
fn field(text: &str, lo: u32, hi: u32, names: &[&str], first: u32, what: &str) -> Result<u64> {
    let value = |s: &str| -> Result<u32> {
        let v = match names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            Some(i) => i as u32 + first,
            None => s
                .parse()
                .ok()
                .with_context(|| format!("{what} {s:?} is not a number"))?,
        };
        if !(lo..=hi).contains(&v) {
            bail!("{what} {v} is not in {lo}..{hi}");
        }
        Ok(v)
    };
    let mut bits = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let n: u32 = s.parse().ok().filter(|n| *n > 0).with_context(|| {
                    format!("step {s:?} in {what} {item:?} is not a number > 0")
                })?;
                (r, Some(n))
            }
            None => (item, None),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else if step.is_some() {
            bail!("{what} {item:?}: a step goes with * or a range (*/n, a-b/n)");
        } else if range.is_empty() {
            bail!("{what} field {text:?} has an empty item");
        } else {
            let v = value(range)?;
            (v, v)
        };
        if a > b {
            bail!("{what} range {item:?} runs backwards");
        }
        for v in (a..=b).step_by(step.unwrap_or(1) as usize) {
            bits |= 1 << v;
        }
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 86_400_000;
    const H: i64 = 3_600_000;

    /// Unix ms of a UTC time, "2026-03-29T01:00:00Z".
    fn t(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn show(ms: i64) -> String {
        Timestamp::from_millisecond(ms).unwrap().to_string()
    }

    /// The opening at `now`, as UTC text.
    fn opening(w: &Window, now: &str) -> (String, String) {
        let (a, b) = w.opening(t(now));
        (show(a), show(b))
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.into(), b.into())
    }

    /// Validated at 2026-01-01.
    fn ok(w: Window) -> Window {
        w.validate(t("2026-01-01T00:00:00Z")).unwrap();
        w
    }

    fn refused(w: &Window) -> String {
        format!(
            "{:#}",
            w.validate(t("2026-01-01T00:00:00Z"))
                .expect_err("should be refused")
        )
    }

    /// The next `n` fire times of a cron window after `from`, UTC text.
    fn fires(w: &Window, from: &str, n: usize) -> Vec<String> {
        let c = w.compile().unwrap();
        let Rule::Cron { cron, .. } = &c.rule else {
            panic!("not a cron window")
        };
        let mut at = t(from);
        (0..n)
            .map(|_| {
                at = c.next_fire_after(cron, at).unwrap();
                show(at)
            })
            .collect()
    }

    #[test]
    fn fixed_offset_daily_inside_and_outside() {
        let x = ok(Window::daily("02:00", "05:00"));
        let day = 20 * DAY_MS;
        assert!(!x.contains(day + H));
        assert!(x.contains(day + 2 * H));
        assert!(x.contains(day + 4 * H));
        assert!(!x.contains(day + 5 * H));
        assert_eq!(x.opening(day + H), (day + 2 * H, day + 5 * H));
        assert_eq!(
            x.opening(day + 6 * H),
            (day + DAY_MS + 2 * H, day + DAY_MS + 5 * H)
        );
    }

    #[test]
    fn fixed_offset_daily_over_midnight() {
        let x = ok(Window::daily("22:00", "02:00").utc_offset(60)); // UTC+1
        let day = 20 * DAY_MS;
        // 22:30 local = 21:30 UTC
        assert!(x.contains(day + 21 * H + H / 2));
        // 01:00 local = 00:00 UTC
        assert!(x.contains(day));
        assert_eq!(x.opening(day).1, day + H);
        assert!(!x.contains(day + 2 * H));
        assert_eq!(x.local_time(day), "1970-01-21 01:00 +01:00");
    }

    #[test]
    fn stored_json_of_the_old_form_means_the_same() {
        let old = r#"{"start":"02:00","end":"05:00","utcOffsetMinutes":60}"#;
        let w: Window = serde_json::from_str(old).unwrap();
        assert_eq!(w, Window::daily("02:00", "05:00").utc_offset(60));
        assert_eq!(serde_json::to_string(&w).unwrap(), old);
        let w = ok(w);
        // 02:00-05:00 at UTC+1 = 01:00-04:00 UTC, every day
        assert_eq!(
            opening(&w, "2027-01-15T00:00:00Z"),
            pair("2027-01-15T01:00:00Z", "2027-01-15T04:00:00Z")
        );
        assert_eq!(
            opening(&w, "2027-07-15T05:00:00Z"),
            pair("2027-07-16T01:00:00Z", "2027-07-16T04:00:00Z")
        );
        // the old serializer always wrote the offset; without one it is UTC
        let utc: Window =
            serde_json::from_str(r#"{"start":"02:00","end":"05:00","utcOffsetMinutes":0}"#)
                .unwrap();
        let bare: Window = serde_json::from_str(r#"{"start":"02:00","end":"05:00"}"#).unwrap();
        for w in [utc, bare] {
            assert_eq!(
                opening(&ok(w), "2027-01-15T00:00:00Z"),
                pair("2027-01-15T02:00:00Z", "2027-01-15T05:00:00Z")
            );
        }
        // the new forms round-trip, without the fields they do not use
        let cron = Window::cron("0 2 * * 1-5", 90).in_zone("Europe/Berlin");
        let text = serde_json::to_string(&cron).unwrap();
        assert_eq!(
            text,
            r#"{"cron":"0 2 * * 1-5","durationMinutes":90,"timeZone":"Europe/Berlin"}"#
        );
        assert_eq!(serde_json::from_str::<Window>(&text).unwrap(), cron);
        assert!(serde_json::from_str::<Window>(
            r#"{"start":"02:00","end":"03:00","zone":"Europe/Berlin"}"#
        )
        .is_err());
    }

    #[test]
    fn daily_in_berlin_across_both_dst_changes_of_2026() {
        let w = ok(Window::daily("02:30", "03:30").in_zone("Europe/Berlin"));
        // Saturday 28 March, CET (UTC+1)
        assert_eq!(
            opening(&w, "2026-03-28T00:00:00Z"),
            pair("2026-03-28T01:30:00Z", "2026-03-28T02:30:00Z")
        );
        // Sunday 29 March the clock jumps from 02:00 CET to 03:00 CEST: the
        // window opens at the jump (03:00 CEST) and closes at 03:30 CEST
        assert_eq!(
            opening(&w, "2026-03-28T03:00:00Z"),
            pair("2026-03-29T01:00:00Z", "2026-03-29T01:30:00Z")
        );
        assert!(!w.contains(t("2026-03-29T00:59:00Z")));
        assert!(w.contains(t("2026-03-29T01:15:00Z")));
        assert_eq!(
            w.local_time(t("2026-03-29T01:00:00Z")),
            "2026-03-29 03:00 CEST (Europe/Berlin)"
        );
        // Monday, CEST (UTC+2)
        assert_eq!(
            opening(&w, "2026-03-29T02:00:00Z"),
            pair("2026-03-30T00:30:00Z", "2026-03-30T01:30:00Z")
        );
        // Sunday 25 October 03:00 CEST goes back to 02:00 CET: open from the
        // first 02:30 (CEST) to 03:30 CET, once, through the repeated hour
        assert_eq!(
            opening(&w, "2026-10-24T12:00:00Z"),
            pair("2026-10-25T00:30:00Z", "2026-10-25T02:30:00Z")
        );
        assert!(w.contains(t("2026-10-25T01:10:00Z"))); // 02:10 CET
        assert_eq!(
            opening(&w, "2026-10-25T03:00:00Z"),
            pair("2026-10-26T01:30:00Z", "2026-10-26T02:30:00Z")
        );
        // an hour that does not exist that day: no opening on the 29th
        let skipped = ok(Window::daily("02:00", "03:00").in_zone("Europe/Berlin"));
        assert_eq!(
            opening(&skipped, "2026-03-28T03:00:00Z"),
            pair("2026-03-30T00:00:00Z", "2026-03-30T01:00:00Z")
        );
    }

    #[test]
    fn daily_over_midnight_in_new_york() {
        let w = ok(Window::daily("22:00", "02:00").in_zone("America/New_York"));
        // summer, EDT (UTC-4): 4 h
        assert_eq!(
            opening(&w, "2026-07-10T12:00:00Z"),
            pair("2026-07-11T02:00:00Z", "2026-07-11T06:00:00Z")
        );
        assert!(w.contains(t("2026-07-11T05:59:00Z")));
        assert!(!w.contains(t("2026-07-11T06:00:00Z")));
        // 31 October 22:00 EDT to 1 November 02:00 EST: the clock goes back
        // from 02:00 EDT to 01:00 EST on the way, 5 h
        assert!(!w.contains(t("2026-11-01T01:00:00Z")));
        assert_eq!(
            opening(&w, "2026-10-31T12:00:00Z"),
            pair("2026-11-01T02:00:00Z", "2026-11-01T07:00:00Z")
        );
        assert!(w.contains(t("2026-11-01T06:30:00Z"))); // 01:30 EST
                                                        // 7 March 22:00 EST to the jump from 02:00 EST to 03:00 EDT, 4 h
        assert_eq!(
            opening(&w, "2026-03-07T12:00:00Z"),
            pair("2026-03-08T03:00:00Z", "2026-03-08T07:00:00Z")
        );
        assert_eq!(
            opening(&w, "2026-03-08T07:00:00Z"),
            pair("2026-03-09T02:00:00Z", "2026-03-09T06:00:00Z")
        );
    }

    #[test]
    fn cron_on_weekdays_skips_the_weekend() {
        for expr in ["0 2 * * 1-5", "0 2 * * MON-FRI", "0 2 * * 1,2,3,4,5"] {
            let w = ok(Window::cron(expr, 120).in_zone("Europe/Berlin"));
            // Friday 12 June 2026 20:00 CEST: next Monday 02:00 CEST
            assert!(!w.contains(t("2026-06-12T18:00:00Z")), "{expr}");
            assert_eq!(
                opening(&w, "2026-06-12T18:00:00Z"),
                pair("2026-06-15T00:00:00Z", "2026-06-15T02:00:00Z"),
                "{expr}"
            );
            // Friday 03:00 CEST: inside Friday's opening
            assert!(w.contains(t("2026-06-12T01:00:00Z")), "{expr}");
            assert_eq!(
                opening(&w, "2026-06-12T01:00:00Z"),
                pair("2026-06-12T00:00:00Z", "2026-06-12T02:00:00Z"),
                "{expr}"
            );
            assert_eq!(
                w.local_time(w.opening(t("2026-06-12T18:00:00Z")).0),
                "2026-06-15 02:00 CEST (Europe/Berlin)"
            );
        }
    }

    #[test]
    fn cron_with_day_of_month_and_day_of_week_matches_either() {
        // the 13th or a Friday: from Wednesday 1 April 2026
        let w = ok(Window::cron("0 12 13 * 5", 60));
        assert_eq!(
            fires(&w, "2026-04-01T00:00:00Z", 5),
            [
                "2026-04-03T12:00:00Z",
                "2026-04-10T12:00:00Z",
                "2026-04-13T12:00:00Z", // a Monday
                "2026-04-17T12:00:00Z",
                "2026-04-24T12:00:00Z",
            ]
        );
        // only the day of month restricted: the 13th
        let w = ok(Window::cron("0 12 13 * *", 60));
        assert_eq!(
            fires(&w, "2026-04-01T00:00:00Z", 2),
            ["2026-04-13T12:00:00Z", "2026-05-13T12:00:00Z"]
        );
        // a field that starts with * counts as unrestricted (Vixie cron):
        // odd days that are Fridays
        let w = ok(Window::cron("0 12 */2 * FRI", 60));
        assert_eq!(
            fires(&w, "2026-04-01T00:00:00Z", 3),
            [
                "2026-04-03T12:00:00Z",
                "2026-04-17T12:00:00Z",
                "2026-05-01T12:00:00Z"
            ]
        );
    }

    #[test]
    fn cron_steps_lists_ranges_and_names() {
        let w = ok(Window::cron("15,45 */6 * * *", 5));
        assert_eq!(
            fires(&w, "2026-01-01T00:00:00Z", 5),
            [
                "2026-01-01T00:15:00Z",
                "2026-01-01T00:45:00Z",
                "2026-01-01T06:15:00Z",
                "2026-01-01T06:45:00Z",
                "2026-01-01T12:15:00Z",
            ]
        );
        let w = ok(Window::cron("0 8-18/4 * * *", 5));
        assert_eq!(
            fires(&w, "2026-01-01T09:00:00Z", 4),
            [
                "2026-01-01T12:00:00Z",
                "2026-01-01T16:00:00Z",
                "2026-01-02T08:00:00Z",
                "2026-01-02T12:00:00Z",
            ]
        );
        let w = ok(Window::cron("30 9 1 jan,JUL *", 5));
        assert_eq!(
            fires(&w, "2026-01-01T10:00:00Z", 2),
            ["2026-07-01T09:30:00Z", "2027-01-01T09:30:00Z"]
        );
        // 0 and 7 are Sunday; 5-7 is Friday to Sunday
        for expr in ["0 0 * * 0", "0 0 * * 7", "0 0 * * sun"] {
            assert_eq!(
                fires(&ok(Window::cron(expr, 5)), "2026-01-01T00:00:00Z", 1),
                ["2026-01-04T00:00:00Z"],
                "{expr}"
            );
        }
        assert_eq!(
            fires(
                &ok(Window::cron("0 0 * * 5-7", 5)),
                "2026-01-01T00:00:00Z",
                4
            ),
            [
                "2026-01-02T00:00:00Z",
                "2026-01-03T00:00:00Z",
                "2026-01-04T00:00:00Z",
                "2026-01-09T00:00:00Z",
            ]
        );
        // February 29th: the next leap year
        assert_eq!(
            fires(
                &ok(Window::cron("0 0 29 2 *", 5)),
                "2026-01-01T00:00:00Z",
                1
            ),
            ["2028-02-29T00:00:00Z"]
        );
    }

    #[test]
    fn cron_across_dst_in_berlin() {
        let w = ok(Window::cron("30 2 * * *", 60).in_zone("Europe/Berlin"));
        // 02:30 does not exist on 29 March: it fires at 03:30 CEST
        assert_eq!(
            opening(&w, "2026-03-28T12:00:00Z"),
            pair("2026-03-29T01:30:00Z", "2026-03-29T02:30:00Z")
        );
        // also when asked after the jump, before that fire time
        assert_eq!(
            opening(&w, "2026-03-29T01:05:00Z"),
            pair("2026-03-29T01:30:00Z", "2026-03-29T02:30:00Z")
        );
        // 02:30 happens twice on 25 October: it fires at the first one only
        assert_eq!(
            opening(&w, "2026-10-24T12:00:00Z"),
            pair("2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z")
        );
        assert!(!w.contains(t("2026-10-25T01:35:00Z"))); // 02:35 CET
        assert_eq!(
            opening(&w, "2026-10-25T01:35:00Z"),
            pair("2026-10-26T01:30:00Z", "2026-10-26T02:30:00Z")
        );
        // moved fire times that meet others fire once, earliest first
        let w = ok(Window::cron("0,30 2,3 * * *", 1).in_zone("Europe/Berlin"));
        assert_eq!(
            fires(&w, "2026-03-28T23:00:00Z", 3),
            [
                "2026-03-29T01:00:00Z", // 02:00 and 03:00 -> 03:00 CEST
                "2026-03-29T01:30:00Z", // 02:30 and 03:30 -> 03:30 CEST
                "2026-03-30T00:00:00Z",
            ]
        );
        let w = ok(Window::cron("*/30 2 * * *", 1).in_zone("Europe/Berlin"));
        assert_eq!(
            fires(&w, "2026-10-24T23:00:00Z", 3),
            [
                "2026-10-25T00:00:00Z",
                "2026-10-25T00:30:00Z",
                "2026-10-26T01:00:00Z",
            ]
        );
    }

    #[test]
    fn overlapping_cron_openings_merge() {
        let w = ok(Window::cron("*/30 * * * *", 45));
        let now = t("2026-01-01T00:10:00Z");
        let (open, close) = w.opening(now);
        // the earliest fire time still open: 23:30 + 45 min
        assert_eq!(show(open), "2025-12-31T23:30:00Z");
        assert!(close > now + DAY_MS, "{}", show(close));
        // touching openings merge too; separate ones do not
        let w = ok(Window::cron("0 1,2,4 * * *", 60));
        assert_eq!(
            opening(&w, "2026-01-01T00:00:00Z"),
            pair("2026-01-01T01:00:00Z", "2026-01-01T03:00:00Z")
        );
    }

    #[test]
    fn bad_windows_are_refused_with_the_reason() {
        let has = |w: Window, what: &str| {
            let e = refused(&w);
            assert!(e.contains(what), "{w:?}: {e}");
        };
        // daily
        has(Window::daily("25:00", "01:00"), "not a time of day");
        has(Window::daily("01:00", "01:00"), "is empty");
        has(Window::daily("1", "2:00"), "is not HH:MM");
        has(
            Window::daily("01:00", "02:00").utc_offset(2000),
            "not a real one",
        );
        assert!(Window::daily("23:00", "01:00")
            .utc_offset(-300)
            .validate(0)
            .is_ok());
        // zones
        has(
            Window::daily("01:00", "02:00").in_zone("Europe/Berln"),
            "unknown time zone \"Europe/Berln\"",
        );
        has(
            Window::daily("01:00", "02:00").in_zone("Etc/Unknown"),
            "unknown time zone",
        );
        has(
            Window::daily("01:00", "02:00")
                .in_zone("Europe/Berlin")
                .utc_offset(60),
            "timeZone (a name with DST rules) or utcOffsetMinutes (fixed), not both",
        );
        // forms
        has(Window::default(), "needs start and end (daily) or cron");
        has(
            Window {
                start: Some("01:00".into()),
                ..Window::default()
            },
            "needs both start and end (got only start)",
        );
        has(
            Window {
                cron: Some("0 2 * * *".into()),
                ..Window::default()
            },
            "a cron window needs durationMinutes",
        );
        has(
            Window {
                duration_minutes: Some(60),
                ..Window::daily("01:00", "02:00")
            },
            "durationMinutes goes with cron",
        );
        has(
            Window {
                cron: Some("0 2 * * *".into()),
                ..Window::daily("01:00", "02:00")
            },
            "either daily (start and end) or cron (cron and durationMinutes), not both",
        );
        has(
            Window::cron("0 2 * * *", 0),
            "durationMinutes 0 is not 1..44640",
        );
        has(
            Window::cron("0 2 * * *", 44641),
            "durationMinutes 44641 is not",
        );
        // cron expressions
        for (expr, why) in [
            ("0 2 * *", "needs 5 fields"),
            ("0 2 * * * *", "needs 5 fields"),
            ("60 * * * *", "minute 60 is not in 0..59"),
            ("* 24 * * *", "hour 24 is not in 0..23"),
            ("* * 0 * *", "day of month 0 is not in 1..31"),
            ("* * * 13 *", "month 13 is not in 1..12"),
            ("* * * * 8", "day of week 8 is not in 0..7"),
            ("5-1 * * * *", "runs backwards"),
            ("*/0 * * * *", "is not a number > 0"),
            ("x * * * *", "minute \"x\" is not a number"),
            ("5/10 * * * *", "a step goes with * or a range"),
            ("1,,2 * * * *", "has an empty item"),
            ("* * * FOO *", "month \"FOO\" is not a number"),
            ("* * * * MON-", "day of week \"\" is not a number"),
            ("0 0 31 2 *", "never fires"),
            ("0 0 30 2 *", "never fires"),
            ("0 0 31 4,6,9,11 *", "never fires"),
        ] {
            let e = refused(&Window::cron(expr, 60));
            assert!(e.contains(why), "{expr}: {e}");
            assert!(e.contains(&format!("{expr:?}")), "{expr}: {e}");
        }
        // a window that was never validated never opens
        assert!(!Window::default().contains(t("2026-01-01T00:00:00Z")));
    }
}
