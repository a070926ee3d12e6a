//! How both servers show times and audit records on the API.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::control::{AuditRecord, owner_name};

/// An RFC 3339 time (UTC, milliseconds) from unix milliseconds.
pub fn rfc3339(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// An audit record: `{time, edge, from, to, epoch, reason}`.
pub fn audit_json(record: &AuditRecord) -> Value {
    json!({
        "time": rfc3339(record.time_ms),
        "edge": record.edge,
        "from": owner_name(record.from),
        "to": owner_name(record.to),
        "epoch": record.epoch,
        "reason": record.reason,
    })
}
