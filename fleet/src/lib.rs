//! dualroot-fleet: the backend the agents talk to. The database is the
//! truth; MQTT and HTTP are thin rooms over it (see README.md).

pub mod cli;
pub mod clock;
pub mod config;
pub mod devices;
pub mod fleet;
pub mod gate;
pub mod http;
pub mod lease;
pub mod mqtt;
pub mod outbox;
pub mod rollout;
pub mod services;
pub mod sim;
pub mod store;
pub mod tasks;
pub mod window;

pub use fleet::Fleet;
