//! A daily time range in a fixed UTC offset ("02:00"-"05:00", +60 min), for
//! download and install windows. A range whose end is before its start runs
//! over midnight. (Cron expressions and named time zones with DST are not
//! supported yet.)

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

const DAY_MS: i64 = 86_400_000;
const MIN_MS: i64 = 60_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Window {
    /// Local "HH:MM" when it opens.
    pub start: String,
    /// Local "HH:MM" when it closes.
    pub end: String,
    /// Local time = UTC + this many minutes.
    #[serde(default)]
    pub utc_offset_minutes: i64,
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

impl Window {
    pub fn validate(&self) -> Result<()> {
        let (a, b) = (minute_of_day(&self.start)?, minute_of_day(&self.end)?);
        if a == b {
            bail!("window {}-{} is empty", self.start, self.end);
        }
        if self.utc_offset_minutes.abs() > 14 * 60 {
            bail!(
                "UTC offset {} min is not a real one",
                self.utc_offset_minutes
            );
        }
        Ok(())
    }

    /// (start, end) in ms from local midnight; end > start (may pass 24 h).
    fn span(&self) -> (i64, i64) {
        let a = minute_of_day(&self.start).unwrap_or(0) * MIN_MS;
        let mut b = minute_of_day(&self.end).unwrap_or(0) * MIN_MS;
        if b <= a {
            b += DAY_MS;
        }
        (a, b)
    }

    /// The opening that contains `now`, or else the next one: (open, close) in
    /// unix ms.
    pub fn opening(&self, now: i64) -> (i64, i64) {
        let off = self.utc_offset_minutes * MIN_MS;
        let local = now + off;
        let midnight = local.div_euclid(DAY_MS) * DAY_MS;
        let (a, b) = self.span();
        // the opening that started yesterday may still run (over midnight)
        for day in [-DAY_MS, 0, DAY_MS] {
            let (open, close) = (midnight + day + a, midnight + day + b);
            if local < close {
                return (open - off, close - off);
            }
        }
        unreachable!("an opening ends within two days")
    }

    pub fn contains(&self, now: i64) -> bool {
        let (open, _) = self.opening(now);
        open <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(a: &str, b: &str, off: i64) -> Window {
        Window {
            start: a.into(),
            end: b.into(),
            utc_offset_minutes: off,
        }
    }
    const H: i64 = 3_600_000;

    #[test]
    fn inside_and_outside() {
        let x = w("02:00", "05:00", 0);
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
    fn over_midnight_and_offset() {
        let x = w("22:00", "02:00", 60); // UTC+1
        let day = 20 * DAY_MS;
        // 22:30 local = 21:30 UTC
        assert!(x.contains(day + 21 * H + H / 2));
        // 01:00 local = 00:00 UTC
        assert!(x.contains(day));
        assert_eq!(x.opening(day).1, day + H);
        assert!(!x.contains(day + 2 * H));
    }

    #[test]
    fn bad_windows_are_refused() {
        assert!(w("25:00", "01:00", 0).validate().is_err());
        assert!(w("01:00", "01:00", 0).validate().is_err());
        assert!(w("1", "2:00", 0).validate().is_err());
        assert!(w("01:00", "02:00", 2000).validate().is_err());
        assert!(w("23:00", "01:00", -300).validate().is_ok());
    }
}
