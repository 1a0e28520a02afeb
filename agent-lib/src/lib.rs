//! dualroot agent library: MQTT task messaging with a crash-safe journal,
//! persistent outbox, heartbeats, registration, resumable downloads, A/B
//! upgrades, migration trigger, service install and log collection.
//! See `DESIGN.md` (Agent) and issue 6.

pub mod agent;
pub mod backoff;
pub mod clock;
pub mod cmd;
pub mod config;
pub mod download;
pub mod engine;
pub mod failpoint;
pub mod journal;
pub mod keyring;
pub mod logger;
pub mod protocol;
pub mod redact;
pub mod registration;
pub mod services;
pub mod tasks;
pub mod tls;
