//! The one way dualroot runs system tools (the `runcmd` crate, shared with the
//! agent and the QEMU harness): never through a shell, the whole command line and
//! the tail of stderr in the error, a timeout, JSON parsing for tools that speak it.

pub use runcmd::{
    command as cmd, find_tool, run_timeout, run_unchecked, run_with_input, tail_lines, CommandExt,
};
