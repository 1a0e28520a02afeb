//! Wire format: the agent <-> backend contract lives in `dualroot_api::wire`
//! (the fleet controller reads the same types); this module adds the
//! agent's own clock to the result builder.

pub use dualroot_api::wire::*;

/// Builds a result message stamped with the agent's clock.
#[allow(clippy::too_many_arguments)]
pub fn result_message(
    device_id: &str,
    ack_key: &str,
    task_id: Option<&str>,
    task_type: &str,
    status: Status,
    result: serde_json::Value,
    error: Option<&str>,
    attempt: u32,
) -> String {
    dualroot_api::wire::result_message(
        device_id,
        ack_key,
        task_id,
        task_type,
        status,
        result,
        error,
        attempt,
        crate::journal::now_ms(),
    )
}
