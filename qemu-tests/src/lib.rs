//! QEMU guest harness (see issue 4).
//!
//! - [`images`]: cached guest images built by the recipes in `images/`.
//! - [`disk`]: per-scenario qcow2 overlays and the payload disk.
//! - [`qemu`]: one guest: start, console markers, SSH, power cut, shutdown.
//! - [`scenario`]: a test's run directory, checks and result line.
//! - [`parse`]: pure parsers of guest output.
//! - [`backend`]: mosquitto, MQTT backend and HTTP server for the agent_e2e scenarios.

pub mod backend;
pub mod cmd;
pub mod disk;
pub mod error;
pub mod images;
pub mod parse;
pub mod qemu;
pub mod scenario;
pub mod states;

pub use error::{Context, Error, Result};
