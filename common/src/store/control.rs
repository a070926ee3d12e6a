//! Control state on disk, beside the model in the same database: each edge location's
//! owner and epoch, and the audit log of changes of owner. Both sides keep their own.

use std::collections::BTreeMap;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{META, Store, StoreError};
use crate::control::{AuditRecord, ControlState};

/// Edge location id to its postcard [`ControlState`].
const CONTROL: TableDefinition<&str, &[u8]> = TableDefinition::new("control");
/// Sequence number to a postcard [`AuditRecord`], oldest first.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// The newest audit sequence number the master has acknowledged (on an edge).
const AUDIT_REPORTED: &str = "audit_reported";

impl Store {
    /// Every edge location's persisted owner and epoch.
    pub fn control_states(&self) -> Result<BTreeMap<String, ControlState>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = match txn.open_table(CONTROL) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(err) => return Err(self.db_error(err)),
        };
        let mut states = BTreeMap::new();
        for entry in table.iter().map_err(|e| self.db_error(e))? {
            let (id, bytes) = entry.map_err(|e| self.db_error(e))?;
            let state = postcard::from_bytes(bytes.value()).map_err(|err| {
                self.corrupt(format!(
                    "control state of {} does not decode: {err}",
                    id.value()
                ))
            })?;
            states.insert(id.value().to_string(), state);
        }
        Ok(states)
    }

    /// Stores an edge location's owner and epoch durably.
    pub fn set_control_state(&self, edge: &str, state: ControlState) -> Result<(), StoreError> {
        // A ControlState always encodes: an enum and an integer.
        let bytes = postcard::to_stdvec(&state).unwrap_or_default();
        self.write_txn(|txn| {
            txn.open_table(CONTROL)?.insert(edge, bytes.as_slice())?;
            Ok(())
        })
    }

    /// Appends to the audit log, which then keeps its newest `keep` records. Returns the
    /// record's sequence number.
    pub fn append_audit(&self, record: &AuditRecord, keep: u64) -> Result<u64, StoreError> {
        self.append_audits(std::slice::from_ref(record), keep)
    }

    /// Appends records to the audit log in one transaction, as
    /// [`append_audit`](Self::append_audit) does one; returns the last sequence number.
    pub fn append_audits(&self, records: &[AuditRecord], keep: u64) -> Result<u64, StoreError> {
        let last = self.write_txn(|txn| {
            let mut audit = txn.open_table(AUDIT)?;
            let mut seq = audit.last()?.map(|(k, _)| k.value()).unwrap_or(0);
            for record in records {
                seq += 1;
                let bytes = postcard::to_stdvec(record).unwrap_or_default();
                audit.insert(seq, bytes.as_slice())?;
            }
            if audit.len()? > keep {
                let floor = seq.saturating_sub(keep);
                audit.retain_in(..=floor, |_, _| false)?;
            }
            Ok(seq)
        })?;
        let first = last + 1 - records.len() as u64;
        for (seq, record) in (first..).zip(records) {
            // No one listening is fine.
            let _ = self.audit_appended.send((seq, record.clone()));
        }
        Ok(last)
    }

    /// Every audit record appended from now on, with its sequence number; a receiver that
    /// lags reads the missed ones with [`audit_after`](Self::audit_after).
    pub fn subscribe_audit(&self) -> tokio::sync::broadcast::Receiver<(u64, AuditRecord)> {
        self.audit_appended.subscribe()
    }

    /// Appends audit records from async code; a failure is logged (an audit record never
    /// holds up the decision it records).
    pub async fn record_audits(self: &std::sync::Arc<Self>, records: Vec<AuditRecord>, keep: u64) {
        let store = self.clone();
        let stored = tokio::task::spawn_blocking(move || store.append_audits(&records, keep)).await;
        if !matches!(stored, Ok(Ok(_))) {
            tracing::error!("cannot store an audit record: {stored:?}");
        }
    }

    /// The audit records after sequence number `after`, oldest first.
    pub fn audit_after(&self, after: u64) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let audit = match txn.open_table(AUDIT) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(err) => return Err(self.db_error(err)),
        };
        let mut records = Vec::new();
        for entry in audit.range(after + 1..).map_err(|e| self.db_error(e))? {
            let (seq, bytes) = entry.map_err(|e| self.db_error(e))?;
            let record = decode_audit(bytes.value()).map_err(|err| {
                self.corrupt(format!(
                    "audit record {} does not decode: {err}",
                    seq.value()
                ))
            })?;
            records.push((seq.value(), record));
        }
        Ok(records)
    }

    /// The newest audit sequence number the master has acknowledged.
    pub fn audit_reported(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let meta = txn.open_table(META).map_err(|e| self.db_error(e))?;
        Ok(meta
            .get(AUDIT_REPORTED)
            .map_err(|e| self.db_error(e))?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Records that the master has the audit records up to `seq`.
    pub fn set_audit_reported(&self, seq: u64) -> Result<(), StoreError> {
        self.write_txn(|txn| {
            txn.open_table(META)?.insert(AUDIT_REPORTED, seq)?;
            Ok(())
        })
    }
}

/// An audit record as stored before code changes were audited.
#[derive(serde::Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct AuditRecordV1 {
    time_ms: u64,
    edge: String,
    from: crate::control::Owner,
    to: crate::control::Owner,
    epoch: u64,
    reason: String,
}

/// A stored audit record, in the current layout or the one before it.
fn decode_audit(bytes: &[u8]) -> Result<AuditRecord, postcard::Error> {
    postcard::from_bytes(bytes).or_else(|err| {
        let old: AuditRecordV1 = postcard::from_bytes(bytes).map_err(|_| err)?;
        Ok(AuditRecord {
            time_ms: old.time_ms,
            edge: old.edge,
            from: old.from,
            to: old.to,
            epoch: old.epoch,
            reason: old.reason,
            code: None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Owner;

    fn record(epoch: u64) -> AuditRecord {
        AuditRecord {
            time_ms: 1,
            edge: "site-1".into(),
            from: Owner::Edge,
            to: Owner::Master,
            epoch,
            reason: "test".into(),
            code: None,
        }
    }

    #[test]
    fn control_states_and_audit_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        {
            let store = Store::open(&path).unwrap();
            assert!(store.control_states().unwrap().is_empty());
            let state = ControlState {
                owner: Owner::Master,
                epoch: 4,
            };
            store.set_control_state("site-1", state).unwrap();
            for epoch in 1..=5 {
                store.append_audit(&record(epoch), 3).unwrap();
            }
            store.set_audit_reported(4).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.control_states().unwrap()["site-1"].epoch, 4);
        let kept: Vec<u64> = store
            .audit_after(0)
            .unwrap()
            .iter()
            .map(|(_, r)| r.epoch)
            .collect();
        assert_eq!(kept, vec![3, 4, 5], "the newest three are kept, in order");
        assert_eq!(store.audit_reported().unwrap(), 4);
        assert_eq!(store.audit_after(4).unwrap().len(), 1);
    }

    #[test]
    fn audit_records_of_the_layout_before_code_audits_still_read() {
        let old = AuditRecordV1 {
            time_ms: 7,
            edge: "site-1".into(),
            from: Owner::Edge,
            to: Owner::Master,
            epoch: 3,
            reason: "edge link down".into(),
        };
        let bytes = postcard::to_stdvec(&old).unwrap();
        let read = decode_audit(&bytes).unwrap();
        assert_eq!((read.epoch, read.code), (3, None));
        assert_eq!(read.reason, "edge link down");
        let current = record(9);
        let bytes = postcard::to_stdvec(&current).unwrap();
        assert_eq!(decode_audit(&bytes).unwrap(), current);
        assert!(decode_audit(&[1, 2]).is_err());
    }
}
