//! The task state machine: a pure function from (state, event) to the next
//! state. Nothing here reads the clock or the database; `tasks/mod.rs` turns
//! result messages, heartbeats and deadlines into [`Event`]s and stores what
//! [`step`] decides.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Recorded, not sent yet: waiting for a window, the in-flight cap, or a
    /// retry's backoff. No deadline runs here.
    Pending,
    /// In the outbox or sent; the device has not answered about it yet.
    Queued,
    /// The device has it in its journal (it answered `in_progress`).
    Acked,
    Downloading,
    Staged,
    Installing,
    /// The device armed the new slot or the migration and reboots.
    Rebooting,
    /// Came back on the target; waiting for proof of the commit (a new boot
    /// confirmed good on the target version).
    Verifying,
    Succeeded,
    /// Ended by an error; a retryable one goes back to `Pending` with a
    /// backoff before it is ended.
    Failed,
    Rejected,
    TimedOut,
    RolledBack,
    Canceled,
    Superseded,
}

impl TaskState {
    pub const ALL: [TaskState; 15] = [
        TaskState::Pending,
        TaskState::Queued,
        TaskState::Acked,
        TaskState::Downloading,
        TaskState::Staged,
        TaskState::Installing,
        TaskState::Rebooting,
        TaskState::Verifying,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Rejected,
        TaskState::TimedOut,
        TaskState::RolledBack,
        TaskState::Canceled,
        TaskState::Superseded,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Queued => "queued",
            TaskState::Acked => "acked",
            TaskState::Downloading => "downloading",
            TaskState::Staged => "staged",
            TaskState::Installing => "installing",
            TaskState::Rebooting => "rebooting",
            TaskState::Verifying => "verifying",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Rejected => "rejected",
            TaskState::TimedOut => "timed_out",
            TaskState::RolledBack => "rolled_back",
            TaskState::Canceled => "canceled",
            TaskState::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.name() == s)
    }

    pub fn terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded
                | TaskState::Failed
                | TaskState::Rejected
                | TaskState::TimedOut
                | TaskState::RolledBack
                | TaskState::Canceled
                | TaskState::Superseded
        )
    }

    /// Order of the forward phases; a report of an earlier phase arriving
    /// late (reordered) never moves a task back.
    fn rank(self) -> u8 {
        match self {
            TaskState::Pending => 0,
            TaskState::Queued => 1,
            TaskState::Acked => 2,
            TaskState::Downloading => 3,
            TaskState::Staged => 4,
            TaskState::Installing => 5,
            TaskState::Rebooting => 6,
            TaskState::Verifying => 7,
            _ => 8,
        }
    }

    /// The device may already be past the irreversible step (installing into
    /// or booting the new slot): abort no longer cancels it.
    pub fn past_point_of_no_return(self) -> bool {
        self.rank() >= TaskState::Installing.rank() && !self.terminal()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The task was written to the outbox.
    Published,
    /// The device reported this phase (or one is inferred from a heartbeat).
    Progress(TaskState),
    /// The device booted and confirmed good: `new_boot` when its boot id
    /// differs from the one when the task was sent; `target` when the
    /// confirmed version is the task's target.
    BootConfirmed {
        new_boot: bool,
        target: bool,
    },
    /// The agent said the task itself finished (`done`). For tasks that
    /// change the OS this is not success yet: `rebooted` when the agent sends
    /// it from the new system (upgrade), else the reboot is still ahead
    /// (a migration is only armed).
    DeviceDone {
        rebooted: bool,
    },
    /// `failed` from the agent; `retry` when another attempt may help.
    DeviceFailed {
        retry: bool,
        rolled_back: bool,
    },
    /// `rejected`: the agent refused the message itself.
    DeviceRejected,
    /// The current phase's deadline passed.
    Deadline,
    /// A retry's backoff ran out (the task may be sent again).
    RetryDue,
    /// Cancel in the controller alone: a task the device never got.
    Cancel,
    /// The device ended the task `canceled` (protocol 2) after a cancel:
    /// `hold` when the cancel only held it (a frozen rollout), so it goes
    /// back to `Pending` to be sent again once the rollout runs.
    DeviceCanceled {
        hold: bool,
    },
    Supersede,
}

/// What [`step`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Move to this state.
    To(TaskState),
    /// Failed with a retryable error: back to `Pending` for a new attempt.
    Retry,
    /// Held (canceled on the device by a freeze): back to `Pending` for a new
    /// attempt, no failure counted.
    Requeue,
    /// Nothing changes (duplicate, reordered or late report); why.
    Ignore(&'static str),
}

/// Does the task's kind need a reboot to prove success? (`upgrade`,
/// `migrate`); other tasks succeed when the agent says done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Reboots,
    Plain,
}

pub fn step(state: TaskState, kind: Kind, event: &Event) -> Step {
    use TaskState as S;
    if state.terminal() {
        return Step::Ignore("the task has ended");
    }
    match event {
        Event::Published => match state {
            S::Pending => Step::To(S::Queued),
            _ => Step::Ignore("already sent"),
        },
        Event::Progress(p) => {
            if p.terminal() || *p == S::Pending || *p == S::Queued {
                Step::Ignore("not a progress phase")
            } else if state == S::Pending {
                // A report for an attempt that is waiting to be re-sent (a late
                // answer for the previous copy) does not start it.
                Step::Ignore("the task waits to be sent")
            } else if p.rank() > state.rank() {
                Step::To(*p)
            } else {
                Step::Ignore("an earlier or the same phase (duplicate or reordered)")
            }
        }
        Event::BootConfirmed { new_boot, target } => match (kind, state) {
            (Kind::Plain, _) => Step::Ignore("this task does not reboot"),
            (_, S::Pending | S::Queued) => Step::Ignore("the task has not started on the device"),
            (_, _) if !new_boot => Step::Ignore("the same boot as when the task was sent"),
            (_, _) if *target => Step::To(S::Succeeded),
            // A new boot on another version after the device armed the switch:
            // it fell back.
            (_, S::Rebooting | S::Verifying) => Step::To(S::RolledBack),
            (_, _) => Step::Ignore("a reboot before the device armed the switch"),
        },
        Event::DeviceDone { rebooted } => {
            // For a task that reboots, the boot confirmation decides, never
            // the agent's `done` alone.
            let next = match kind {
                Kind::Plain => S::Succeeded,
                Kind::Reboots if *rebooted => S::Verifying,
                Kind::Reboots => S::Rebooting,
            };
            if state == S::Pending {
                Step::Ignore("the task waits to be sent")
            } else if next.rank() > state.rank() {
                Step::To(next)
            } else {
                Step::Ignore("waiting for the boot confirmation")
            }
        }
        Event::DeviceFailed { rolled_back, retry } => {
            if state == S::Pending {
                Step::Ignore("the task waits to be sent")
            } else if *rolled_back {
                Step::To(S::RolledBack)
            } else if *retry && !state.past_point_of_no_return() {
                Step::Retry
            } else {
                Step::To(S::Failed)
            }
        }
        Event::DeviceRejected => match state {
            S::Pending => Step::Ignore("the task waits to be sent"),
            _ => Step::To(S::Rejected),
        },
        Event::Deadline => match state {
            S::Pending => Step::Ignore("waiting to be sent has no deadline"),
            _ => Step::To(S::TimedOut),
        },
        Event::RetryDue => Step::Ignore("only a failed attempt is retried"),
        Event::DeviceCanceled { hold } => match state {
            S::Pending => Step::Ignore("the task waits to be sent"),
            // the device decides: it cancels only before its point of no
            // return, whatever phase a lost report left here
            _ if *hold => Step::Requeue,
            _ => Step::To(S::Canceled),
        },
        Event::Cancel => {
            if state.past_point_of_no_return() {
                Step::Ignore("the device is past the point of no return")
            } else {
                Step::To(S::Canceled)
            }
        }
        // The device cannot be stopped any more: a newer task would only
        // collide with it (the agent refuses a second armed switch).
        Event::Supersede if state.past_point_of_no_return() => {
            Step::Ignore("the device is past the point of no return")
        }
        Event::Supersede => Step::To(S::Superseded),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskState as S;

    fn all_events() -> Vec<Event> {
        let mut v = vec![
            Event::Published,
            Event::DeviceDone { rebooted: false },
            Event::DeviceDone { rebooted: true },
            Event::DeviceRejected,
            Event::Deadline,
            Event::RetryDue,
            Event::Cancel,
            Event::DeviceCanceled { hold: false },
            Event::DeviceCanceled { hold: true },
            Event::Supersede,
        ];
        for p in S::ALL {
            v.push(Event::Progress(p));
        }
        for (a, b) in [(false, false), (false, true), (true, false), (true, true)] {
            v.push(Event::BootConfirmed {
                new_boot: a,
                target: b,
            });
            v.push(Event::DeviceFailed {
                retry: a,
                rolled_back: b,
            });
        }
        v
    }

    #[test]
    fn names_round_trip() {
        for s in S::ALL {
            assert_eq!(S::parse(s.name()), Some(s));
        }
    }

    /// Every event in every state: terminal states never move, nothing ever
    /// goes back to an earlier forward phase, success of a rebooting task
    /// comes only from a new boot on the target.
    #[test]
    fn every_event_in_every_state() {
        for kind in [Kind::Reboots, Kind::Plain] {
            for s in S::ALL {
                for e in all_events() {
                    let r = step(s, kind, &e);
                    if s.terminal() {
                        assert!(matches!(r, Step::Ignore(_)), "{s:?} {e:?} → {r:?}");
                        continue;
                    }
                    match r {
                        Step::To(n) => {
                            assert!(
                                n.terminal() || n.rank() > s.rank(),
                                "{s:?} {e:?} went back to {n:?}"
                            );
                            if n == S::Succeeded && kind == Kind::Reboots {
                                assert_eq!(
                                    e,
                                    Event::BootConfirmed {
                                        new_boot: true,
                                        target: true
                                    },
                                    "{s:?}: success without a new boot on the target"
                                );
                            }
                            if s == S::Pending {
                                assert!(
                                    matches!(
                                        e,
                                        Event::Published | Event::Cancel | Event::Supersede
                                    ),
                                    "pending moved by {e:?}"
                                );
                            }
                        }
                        Step::Retry => {
                            assert!(matches!(e, Event::DeviceFailed { retry: true, .. }));
                            assert!(!s.past_point_of_no_return());
                        }
                        Step::Requeue => {
                            assert_eq!(e, Event::DeviceCanceled { hold: true });
                            assert_ne!(s, S::Pending);
                        }
                        Step::Ignore(why) => assert!(!why.is_empty()),
                    }
                }
            }
        }
    }

    #[test]
    fn upgrade_path_to_success() {
        let k = Kind::Reboots;
        let mut s = S::Pending;
        for e in [
            Event::Published,
            Event::Progress(S::Acked),
            Event::Progress(S::Downloading),
            Event::Progress(S::Staged),
            Event::Progress(S::Installing),
            Event::Progress(S::Rebooting),
            Event::Progress(S::Verifying),
            Event::BootConfirmed {
                new_boot: true,
                target: true,
            },
        ] {
            match step(s, k, &e) {
                Step::To(n) => s = n,
                other => panic!("{s:?} {e:?} → {other:?}"),
            }
        }
        assert_eq!(s, S::Succeeded);
    }

    #[test]
    fn same_boot_is_never_success_and_old_version_is_rollback() {
        let k = Kind::Reboots;
        let same = Event::BootConfirmed {
            new_boot: false,
            target: true,
        };
        assert!(matches!(step(S::Verifying, k, &same), Step::Ignore(_)));
        let old = Event::BootConfirmed {
            new_boot: true,
            target: false,
        };
        assert_eq!(step(S::Rebooting, k, &old), Step::To(S::RolledBack));
        assert_eq!(step(S::Verifying, k, &old), Step::To(S::RolledBack));
        // a reboot for another reason before the switch was armed
        assert!(matches!(step(S::Downloading, k, &old), Step::Ignore(_)));
    }

    #[test]
    fn reordered_progress_is_ignored() {
        assert!(matches!(
            step(
                S::Rebooting,
                Kind::Reboots,
                &Event::Progress(S::Downloading)
            ),
            Step::Ignore(_)
        ));
    }

    #[test]
    fn cancel_stops_before_the_point_of_no_return_only() {
        for s in [S::Pending, S::Queued, S::Acked, S::Downloading, S::Staged] {
            assert_eq!(
                step(s, Kind::Reboots, &Event::Cancel),
                Step::To(S::Canceled)
            );
        }
        for s in [S::Installing, S::Rebooting, S::Verifying] {
            assert!(matches!(
                step(s, Kind::Reboots, &Event::Cancel),
                Step::Ignore(_)
            ));
        }
    }

    #[test]
    fn a_device_cancel_ends_or_holds_a_sent_task() {
        for s in [S::Queued, S::Acked, S::Downloading, S::Staged] {
            assert_eq!(
                step(s, Kind::Reboots, &Event::DeviceCanceled { hold: false }),
                Step::To(S::Canceled)
            );
            assert_eq!(
                step(s, Kind::Reboots, &Event::DeviceCanceled { hold: true }),
                Step::Requeue
            );
        }
        assert!(matches!(
            step(
                S::Pending,
                Kind::Reboots,
                &Event::DeviceCanceled { hold: true }
            ),
            Step::Ignore(_)
        ));
    }

    #[test]
    fn supersede_only_before_the_point_of_no_return() {
        assert_eq!(
            step(S::Downloading, Kind::Reboots, &Event::Supersede),
            Step::To(S::Superseded)
        );
        assert!(matches!(
            step(S::Rebooting, Kind::Reboots, &Event::Supersede),
            Step::Ignore(_)
        ));
    }

    #[test]
    fn retry_only_before_the_point_of_no_return() {
        let f = Event::DeviceFailed {
            retry: true,
            rolled_back: false,
        };
        assert_eq!(step(S::Downloading, Kind::Reboots, &f), Step::Retry);
        assert_eq!(step(S::Installing, Kind::Reboots, &f), Step::To(S::Failed));
    }
}
