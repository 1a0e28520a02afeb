//! Running external programs (dualroot, kubectl, ctr, journalctl): the `runcmd`
//! crate the engine and the QEMU harness use too. The whole command line and the
//! tail of stderr go into the error, stderr is shown only when it failed, and a
//! timeout kills the program and what it started.

pub use runcmd::{command, is_not_found, run, run_json_timeout, run_timeout, Output};
