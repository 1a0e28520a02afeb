//! A wave's gate: a pure function over counts. It says why it is not met,
//! so a stalled rollout explains itself.

use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaveStats {
    pub index: usize,
    pub members: i64,
    pub not_started: i64,
    /// Of those not started, how many are offline (never started while so).
    pub not_started_offline: i64,
    /// Of those not started, how many run another task of the same type
    /// (a manual one, or another rollout's).
    pub not_started_busy: i64,
    pub in_flight: i64,
    pub succeeded: i64,
    pub failed: i64,
}

/// Failures over the whole rollout so far. The budget is the larger of the
/// absolute number (the tolerance while few devices have run) and the
/// percent of the devices that acknowledged their task (a device that never
/// got it is not a failure of the bundle), which takes over at scale.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    pub failed: i64,
    pub acked: i64,
    pub max_failures: i64,
    pub max_failure_pct: i64,
}

impl Budget {
    pub fn allowed(&self) -> i64 {
        self.max_failures
            .max(self.max_failure_pct * self.acked / 100)
    }

    pub fn broken(&self) -> Option<String> {
        let allowed = self.allowed();
        (self.failed > allowed).then(|| {
            format!(
                "failure budget broken: {} failed, at most {allowed} allowed (the larger of {} and {}% of the {} devices that acknowledged)",
                self.failed, self.max_failures, self.max_failure_pct, self.acked
            )
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", tag = "verdict", content = "why")]
pub enum Verdict {
    Met,
    Waiting(Vec<String>),
    Broken(String),
}

#[derive(Debug, Clone)]
pub struct Input {
    pub wave: WaveStats,
    /// `None`: every member that did not fail (failures within the budget do
    /// not hold the wave; the budget decides about them).
    pub min_successes: Option<i64>,
    pub budget: Budget,
    pub soak_ms: i64,
    /// When the wave first had its successes (the soak runs from there).
    pub successes_since: Option<i64>,
    pub now: i64,
}

/// The verdict, and whether the wave has its successes now (the caller
/// records when that first held: the soak starts there).
pub fn evaluate(i: &Input) -> (Verdict, bool) {
    if let Some(why) = i.budget.broken() {
        return (Verdict::Broken(why), false);
    }
    let w = &i.wave;
    let need = i.min_successes.unwrap_or(w.members - w.failed);
    let have = w.succeeded >= need;
    let mut why = Vec::new();
    if !have {
        let mut parts = vec![format!("{} in flight", w.in_flight)];
        if w.not_started > 0 {
            let mut why = format!("{} of them offline", w.not_started_offline);
            if w.not_started_busy > 0 {
                why.push_str(&format!(
                    ", {} busy with another task of this type",
                    w.not_started_busy
                ));
            }
            parts.push(format!("{} not started ({why})", w.not_started));
        }
        if w.failed > 0 {
            parts.push(format!("{} failed", w.failed));
        }
        let mut line = format!(
            "wave {}: {} of {} successes needed ({})",
            // people count waves from 1 (the CLI's summary too); `index` is 0-based
            w.index + 1,
            w.succeeded,
            need,
            parts.join(", ")
        );
        if need > w.members - w.failed {
            line.push_str(&format!(
                "; cannot be met: only {} members, {} failed (lower minSuccesses or wait for devices that join)",
                w.members, w.failed
            ));
        }
        why.push(line);
    } else {
        let since = i.successes_since.unwrap_or(i.now);
        let soaked = i.now - since;
        if soaked < i.soak_ms {
            why.push(format!(
                "wave {}: soaking, {} s of {} s since its successes",
                w.index + 1,
                soaked / 1000,
                i.soak_ms / 1000
            ));
        }
    }
    if why.is_empty() {
        (Verdict::Met, true)
    } else {
        (Verdict::Waiting(why), have)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(succeeded: i64, failed: i64, since: Option<i64>, now: i64) -> Input {
        Input {
            wave: WaveStats {
                index: 1,
                members: 4,
                not_started: 0,
                not_started_offline: 0,
                not_started_busy: 0,
                in_flight: 4 - succeeded - failed,
                succeeded,
                failed,
            },
            min_successes: Some(3),
            budget: Budget {
                failed,
                acked: 4,
                max_failures: 1,
                max_failure_pct: 50,
            },
            soak_ms: 1000,
            successes_since: since,
            now,
        }
    }

    #[test]
    fn waits_for_successes_then_soak_then_met() {
        let (v, have) = evaluate(&input(2, 0, None, 0));
        assert!(!have);
        let Verdict::Waiting(why) = v else { panic!() };
        assert!(why[0].contains("2 of 3 successes"), "{why:?}");
        let (v, have) = evaluate(&input(3, 0, Some(100), 500));
        assert!(have);
        let Verdict::Waiting(why) = v else { panic!() };
        assert!(why[0].contains("soaking"), "{why:?}");
        assert_eq!(evaluate(&input(3, 0, Some(100), 1100)).0, Verdict::Met);
    }

    #[test]
    fn budget_is_the_larger_of_absolute_and_percent() {
        let mut i = input(2, 2, None, 0);
        i.budget.max_failure_pct = 0;
        let (v, _) = evaluate(&i);
        assert!(
            matches!(v, Verdict::Broken(ref w) if w.contains("2 failed, at most 1 allowed")),
            "{v:?}"
        );
        let b = |failed, acked| Budget {
            failed,
            acked,
            max_failures: 2,
            max_failure_pct: 10,
        };
        // few devices: the absolute number decides
        assert_eq!(b(2, 5).broken(), None);
        assert!(b(3, 5).broken().is_some());
        // many: the percent decides
        assert_eq!(b(30, 300).broken(), None);
        let w = b(31, 300).broken().unwrap();
        assert!(
            w.contains("at most 30 allowed") && w.contains("10% of the 300"),
            "{w}"
        );
        // nobody acknowledged and no tolerance: nothing failed, nothing broken
        let z = Budget::default();
        assert_eq!(z.broken(), None);
    }

    #[test]
    fn an_impossible_gate_says_so() {
        let mut i = input(1, 1, None, 0);
        i.budget.max_failures = 5;
        i.min_successes = Some(4);
        let Verdict::Waiting(why) = evaluate(&i).0 else {
            panic!()
        };
        assert!(why[0].contains("cannot be met"), "{why:?}");
    }
}
