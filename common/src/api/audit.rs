//! How both servers show times and audit records on the API.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::control::{AuditRecord, owner_name};
use crate::store::{AuditEntry, AuditSource};

/// An RFC 3339 time (UTC, milliseconds) from unix milliseconds.
pub fn rfc3339(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// An audit record as the API shows it: [`audit_json`], with `"reported_by": "edge"` on
/// what an edge reported about itself, or `{time, event: "refused", edge, reason}` for a
/// request over an edge's link that the master refused.
pub fn audit_entry_json(entry: &AuditEntry) -> Value {
    let record = &entry.record;
    match entry.source {
        AuditSource::Own => audit_json(record),
        AuditSource::Edge => {
            let mut view = audit_json(record);
            view["reported_by"] = "edge".into();
            view
        }
        AuditSource::Refusal => json!({
            "time": rfc3339(record.time_ms),
            "event": "refused",
            "edge": record.edge,
            "reason": record.reason,
        }),
    }
}

/// An audit record: `{time, event: "owner", edge, from, to, epoch, reason}` for a change
/// of owner; `{time, event: "code", edge, repository, from, to, driver, module, refused,
/// reason}` for a change of driver code (`from` and `to` are commits then).
pub fn audit_json(record: &AuditRecord) -> Value {
    if let Some(code) = &record.code {
        let (driver, module) = match &code.module {
            Some((driver, module)) => (Some(driver), Some(module)),
            None => (None, None),
        };
        return json!({
            "time": rfc3339(record.time_ms),
            "event": "code",
            "edge": (!record.edge.is_empty()).then_some(&record.edge),
            "repository": code.repository,
            "from": code.from,
            "to": code.to,
            "driver": driver,
            "module": module,
            "refused": code.refused,
            "reason": record.reason,
        });
    }
    json!({
        "event": "owner",
        "time": rfc3339(record.time_ms),
        "edge": record.edge,
        "from": owner_name(record.from),
        "to": owner_name(record.to),
        "epoch": record.epoch,
        "reason": record.reason,
    })
}
