//! Whether a signed bundle is meant for this appliance: its `model` must match
//! the appliance's (unless the bundle says `any`), and `slot install` does not go
//! back to an older version unless asked to. Versions compare the way dpkg and
//! rpm compare them (epoch, then runs of digits as numbers and of other
//! characters as text, `~` sorting before anything, even the end).

use anyhow::{bail, Result};
use std::cmp::Ordering;
use std::path::Path;

/// Where an appliance names its model (carried by the migration with /etc/dualroot).
pub const MODEL_FILE: &str = "etc/dualroot/model";

/// The appliance's model: `<root>/etc/dualroot/model`, else the plan's `model`.
pub fn appliance_model(root: &Path, plan_model: Option<&str>) -> Option<String> {
    std::fs::read_to_string(root.join(MODEL_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| plan_model.map(str::to_string))
}

/// One sentence when a bundle for `bundle_model` does not fit this appliance.
pub fn check_model(bundle_model: &str, appliance: Option<&str>) -> Result<()> {
    if bundle_model == "any" {
        return Ok(());
    }
    match appliance {
        Some(m) if m == bundle_model => Ok(()),
        Some(m) => bail!(
            "the bundle is for model {bundle_model}, but this appliance is model {m} ({MODEL_FILE} or the plan's `model`)"
        ),
        None => bail!(
            "the bundle is for model {bundle_model}, but this appliance does not say which model it is: set `model` in the plan or write it to /{MODEL_FILE}"
        ),
    }
}

/// dpkg's comparison of two version strings (`[epoch:]upstream[-revision]`).
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let split = |v: &str| -> (u64, String, String) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if e.chars().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((u, r)) => (epoch, u.to_string(), r.to_string()),
            None => (epoch, rest.to_string(), String::new()),
        }
    };
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrev_cmp(&ua, &ub))
        .then_with(|| verrev_cmp(&ra, &rb))
}

fn order(c: Option<char>) -> i32 {
    match c {
        None => 0,
        Some('~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => c as i32,
        Some(c) => c as i32 + 256,
    }
}

fn verrev_cmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        // Non-digit prefix, compared character by character.
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let ca = a.get(i).map(|&c| c as char).filter(|c| !c.is_ascii_digit());
            let cb = b.get(j).map(|&c| c as char).filter(|c| !c.is_ascii_digit());
            let (oa, ob) = (order(ca), order(cb));
            if oa != ob {
                return oa.cmp(&ob);
            }
            if ca.is_some() {
                i += 1;
            }
            if cb.is_some() {
                j += 1;
            }
        }
        // Digit run, compared as a number.
        let num = |s: &[u8], k: &mut usize| -> u128 {
            let mut n: u128 = 0;
            while *k < s.len() && s[*k].is_ascii_digit() {
                n = n.saturating_mul(10).saturating_add((s[*k] - b'0') as u128);
                *k += 1;
            }
            n
        };
        let (na, nb) = (num(a, &mut i), num(b, &mut j));
        if na != nb {
            return na.cmp(&nb);
        }
    }
    Ordering::Equal
}

/// `slot install` of `new` while `running` runs: refused when older, unless allowed.
pub fn check_not_older(new: &str, running: Option<&str>, allow_downgrade: bool) -> Result<()> {
    let Some(running) = running else {
        return Ok(());
    };
    if !allow_downgrade && version_cmp(new, running) == Ordering::Less {
        bail!(
            "the bundle's version {new} is older than the running slot's {running}; pass --allow-downgrade to install it anyway"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_like_dpkg() {
        use Ordering::*;
        for (a, b, want) in [
            ("13", "13.2", Less),
            ("13.10", "13.9", Greater),
            ("13.0-test.1", "13.0-test.1.2", Less),
            ("1.0~rc1", "1.0", Less),
            ("1.0", "1.0+deb13u1", Less),
            ("1:1.0", "2.0", Greater),
            ("9.4", "9.4", Equal),
            ("5.14.0-427.el9", "5.14.0-503.el9", Less),
            ("1.0a", "1.0b", Less),
            ("1.0", "1.0a", Less),
        ] {
            assert_eq!(version_cmp(a, b), want, "{a} vs {b}");
            assert_eq!(version_cmp(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn model_and_downgrade_refusals() {
        assert!(check_model("any", None).is_ok());
        assert!(check_model("va-7", Some("va-7")).is_ok());
        let e = check_model("va-7", Some("va-9")).unwrap_err().to_string();
        assert!(
            e.contains("for model va-7") && e.contains("model va-9"),
            "{e}"
        );
        assert!(check_model("va-7", None).is_err());
        assert!(check_not_older("13.2", Some("13"), false).is_ok());
        let e = check_not_older("12", Some("13"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("older than the running slot's 13"), "{e}");
        assert!(check_not_older("12", Some("13"), true).is_ok());
        assert!(check_not_older("12", None, false).is_ok());
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            appliance_model(d.path(), Some("va-7")).as_deref(),
            Some("va-7")
        );
        std::fs::create_dir_all(d.path().join("etc/dualroot")).unwrap();
        std::fs::write(d.path().join(MODEL_FILE), "va-9\n").unwrap();
        assert_eq!(
            appliance_model(d.path(), Some("va-7")).as_deref(),
            Some("va-9")
        );
    }
}
