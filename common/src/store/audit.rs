//! The audit log on disk, beside the model in the same database: changes of owner and of
//! code, this server's own and those about each edge. Both sides keep their own.

use crate::identity::Epoch;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{META, Store, StoreError};
use crate::control::AuditRecord;

/// Where an audit record comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AuditSource {
    /// This server's own decision or observation.
    Own,
    /// An edge's report about itself (its takeovers while the master was out of reach,
    /// its refused reloads).
    Edge,
    /// A request over an edge's link that the master refused.
    Refusal,
}

/// An audit record with its place in the log and its source.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Sequence number, growing over every kind of record.
    pub seq: u64,
    /// Where it comes from.
    pub source: AuditSource,
    /// The record.
    pub record: AuditRecord,
}

/// The last sequence number given out: the counter, or for a log written before it
/// existed, its newest record.
fn last_audit_seq(
    audit: &impl ReadableTable<u64, &'static [u8]>,
    meta: &impl ReadableTable<&'static str, u64>,
) -> Result<u64, redb::Error> {
    let counted = meta.get(AUDIT_SEQ)?.map(|v| v.value()).unwrap_or(0);
    let newest = audit.last()?.map(|(k, _)| k.value()).unwrap_or(0);
    Ok(counted.max(newest))
}

/// Sequence number to a postcard [`AuditRecord`], oldest first: this server's own records.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// (Edge location, sequence number) to a postcard ([`AuditSource`], [`AuditRecord`]):
/// records an edge could cause, kept per edge location.
const EDGE_AUDIT: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("edge_audit");
/// Sequence number to the edge location of an [`EDGE_AUDIT`] record, to read them in order.
const EDGE_AUDIT_SEQ: TableDefinition<u64, &str> = TableDefinition::new("edge_audit_seq");
/// The last audit sequence number given out, over both kinds of record.
const AUDIT_SEQ: &str = "audit_seq";
/// The newest audit sequence number the master has acknowledged (on an edge).
const AUDIT_REPORTED: &str = "audit_reported";
/// Meta key: the newest audit sequence number shared with the cluster.
const AUDIT_SHARED: &str = "audit_shared";

impl Store {
    /// Appends to the audit log, which then keeps its newest `keep` records of this
    /// server's own. Returns the record's sequence number.
    pub fn append_audit(&self, record: &AuditRecord, keep: u64) -> Result<u64, StoreError> {
        self.append_audits(std::slice::from_ref(record), keep)
    }

    /// Appends this server's own records to the audit log in one transaction, as
    /// [`append_audit`](Self::append_audit) does one; returns the last sequence number.
    pub fn append_audits(&self, records: &[AuditRecord], keep: u64) -> Result<u64, StoreError> {
        let last = self.write_txn(|txn| {
            let mut audit = txn.open_table(AUDIT)?;
            let mut meta = txn.open_table(META)?;
            let mut seq = last_audit_seq(&audit, &meta)?;
            for record in records {
                seq += 1;
                let bytes = postcard::to_stdvec(record).unwrap_or_default();
                audit.insert(seq, bytes.as_slice())?;
            }
            meta.insert(AUDIT_SEQ, seq)?;
            while audit.len()? > keep {
                audit.pop_first()?;
            }
            Ok(seq)
        })?;
        self.announce_audits(last, records, AuditSource::Own);
        Ok(last)
    }

    /// Appends records about edge location `edge` that it could cause (its own reports,
    /// the master's refusals of its requests) in one transaction. They are kept apart
    /// from the server's own records, `keep_per_edge` per edge location, so that no edge
    /// can push anyone else's records out of the log. Returns the last sequence number.
    pub fn append_edge_audits(
        &self,
        edge: &str,
        records: &[AuditRecord],
        source: AuditSource,
        keep_per_edge: u64,
    ) -> Result<u64, StoreError> {
        let last = self.write_txn(|txn| {
            let audit = txn.open_table(AUDIT)?;
            let mut meta = txn.open_table(META)?;
            let mut by_edge = txn.open_table(EDGE_AUDIT)?;
            let mut by_seq = txn.open_table(EDGE_AUDIT_SEQ)?;
            let mut seq = last_audit_seq(&audit, &meta)?;
            for record in records {
                seq += 1;
                let bytes = postcard::to_stdvec(&(source, record)).unwrap_or_default();
                by_edge.insert((edge, seq), bytes.as_slice())?;
                by_seq.insert(seq, edge)?;
            }
            meta.insert(AUDIT_SEQ, seq)?;
            let held = by_edge.range((edge, 0)..=(edge, u64::MAX))?.count() as u64;
            if held > keep_per_edge {
                let dropped: Vec<u64> = by_edge
                    .range((edge, 0)..=(edge, u64::MAX))?
                    .take((held - keep_per_edge) as usize)
                    .map(|entry| entry.map(|(key, _)| key.value().1))
                    .collect::<Result<_, _>>()?;
                for old in dropped {
                    by_edge.remove((edge, old))?;
                    by_seq.remove(old)?;
                }
            }
            Ok(seq)
        })?;
        self.announce_audits(last, records, source);
        Ok(last)
    }

    /// Tells live views of records just stored, the last of which has sequence `last`.
    fn announce_audits(&self, last: u64, records: &[AuditRecord], source: AuditSource) {
        let first = last + 1 - records.len() as u64;
        for (seq, record) in (first..).zip(records) {
            // No one listening is fine.
            let _ = self.audit_appended.send(AuditEntry {
                seq,
                source,
                record: record.clone(),
            });
        }
    }

    /// Every audit record appended from now on; a receiver that lags reads the missed
    /// ones with [`audit_after`](Self::audit_after).
    pub fn subscribe_audit(&self) -> tokio::sync::broadcast::Receiver<AuditEntry> {
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

    /// The audit records after sequence number `after`, this server's own and those
    /// about edges, oldest first.
    pub fn audit_after(&self, after: u64) -> Result<Vec<AuditEntry>, StoreError> {
        Ok(self.audit_page(after, usize::MAX)?.0)
    }

    /// The oldest `limit` audit records after sequence number `after`, and how many there
    /// are after it in all: a reader far behind decodes one page at a time, not the log.
    pub fn audit_page(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<AuditEntry>, u64), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        // The oldest `limit` sequence numbers of each kind, and the counts.
        let mut own_seqs = Vec::new();
        let mut total = 0u64;
        let audit = match txn.open_table(AUDIT) {
            Ok(audit) => {
                for entry in audit.range(after + 1..).map_err(|e| self.db_error(e))? {
                    let (seq, _) = entry.map_err(|e| self.db_error(e))?;
                    if own_seqs.len() < limit {
                        own_seqs.push(seq.value());
                    }
                    total += 1;
                }
                Some(audit)
            }
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(err) => return Err(self.db_error(err)),
        };
        let edges = match (txn.open_table(EDGE_AUDIT_SEQ), txn.open_table(EDGE_AUDIT)) {
            (Ok(by_seq), Ok(by_edge)) => Some((by_seq, by_edge)),
            (Err(redb::TableError::TableDoesNotExist(_)), _)
            | (_, Err(redb::TableError::TableDoesNotExist(_))) => None,
            (Err(err), _) | (_, Err(err)) => return Err(self.db_error(err)),
        };
        let mut edge_seqs = Vec::new();
        if let Some((by_seq, _)) = &edges {
            for entry in by_seq.range(after + 1..).map_err(|e| self.db_error(e))? {
                let (seq, edge) = entry.map_err(|e| self.db_error(e))?;
                if edge_seqs.len() < limit {
                    edge_seqs.push((seq.value(), edge.value().to_string()));
                }
                total += 1;
            }
        }
        // The page: the oldest `limit` of both, decoded.
        let mut page: Vec<(u64, Option<String>)> = own_seqs
            .into_iter()
            .map(|seq| (seq, None))
            .chain(edge_seqs.into_iter().map(|(seq, edge)| (seq, Some(edge))))
            .collect();
        page.sort_by_key(|(seq, _)| *seq);
        page.truncate(limit);
        let mut entries = Vec::with_capacity(page.len());
        for (seq, edge) in page {
            let entry = match (edge, &audit, &edges) {
                (None, Some(audit), _) => {
                    let bytes = audit
                        .get(seq)
                        .map_err(|e| self.db_error(e))?
                        .ok_or_else(|| self.corrupt(format!("audit record {seq} is missing")))?;
                    let record = decode_audit(bytes.value()).map_err(|err| {
                        self.corrupt(format!("audit record {seq} does not decode: {err}"))
                    })?;
                    AuditEntry {
                        seq,
                        source: AuditSource::Own,
                        record,
                    }
                }
                (Some(edge), _, Some((_, by_edge))) => {
                    let bytes = by_edge
                        .get((edge.as_str(), seq))
                        .map_err(|e| self.db_error(e))?
                        .ok_or_else(|| {
                            self.corrupt(format!("audit record {seq} of {edge} is missing"))
                        })?;
                    let (source, record): (AuditSource, AuditRecord) =
                        postcard::from_bytes(bytes.value()).map_err(|err| {
                            self.corrupt(format!(
                                "audit record {seq} of {edge} does not decode: {err}"
                            ))
                        })?;
                    AuditEntry {
                        seq,
                        source,
                        record,
                    }
                }
                _ => continue,
            };
            entries.push(entry);
        }
        Ok((entries, total))
    }

    /// The newest audit sequence number the master has acknowledged.
    pub fn audit_reported(&self) -> Result<u64, StoreError> {
        Ok(self.audit_mark(AUDIT_REPORTED)?.unwrap_or(0))
    }

    /// Records that the master has the audit records up to `seq`.
    pub fn set_audit_reported(&self, seq: u64) -> Result<(), StoreError> {
        self.set_audit_mark(AUDIT_REPORTED, seq)
    }

    /// The newest audit sequence number a master of a cluster has shared in etcd.
    pub fn audit_shared(&self) -> Result<u64, StoreError> {
        Ok(self.audit_mark(AUDIT_SHARED)?.unwrap_or(0))
    }

    /// Records that the audit records up to `seq` are shared.
    pub fn set_audit_shared(&self, seq: u64) -> Result<(), StoreError> {
        self.set_audit_mark(AUDIT_SHARED, seq)
    }

    /// How far a reader of the audit log (named `name`) has taken it, if it has begun.
    pub fn audit_mark(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(err) => return Err(self.db_error(err)),
        };
        Ok(meta
            .get(name)
            .map_err(|e| self.db_error(e))?
            .map(|v| v.value()))
    }

    /// Records that reader `name` has taken the audit log up to `seq`.
    pub fn set_audit_mark(&self, name: &str, seq: u64) -> Result<(), StoreError> {
        self.write_txn(|txn| {
            txn.open_table(META)?.insert(name, seq)?;
            Ok(())
        })
    }

    /// The names of the marks that begin with `prefix`.
    pub fn audit_marks(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(err) => return Err(self.db_error(err)),
        };
        let mut names = Vec::new();
        for entry in meta.range(prefix..).map_err(|e| self.db_error(e))? {
            let (name, _) = entry.map_err(|e| self.db_error(e))?;
            if !name.value().starts_with(prefix) {
                break;
            }
            names.push(name.value().to_string());
        }
        Ok(names)
    }

    /// Forgets reader `name`'s mark.
    pub fn remove_audit_mark(&self, name: &str) -> Result<(), StoreError> {
        self.write_txn(|txn| {
            txn.open_table(META)?.remove(name)?;
            Ok(())
        })
    }

    /// The newest audit sequence number given out (0: none yet).
    pub fn newest_audit_seq(&self) -> Result<u64, StoreError> {
        let counted = self.audit_mark(AUDIT_SEQ)?.unwrap_or(0);
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let newest = match txn.open_table(AUDIT) {
            Ok(audit) => audit
                .last()
                .map_err(|e| self.db_error(e))?
                .map_or(0, |(seq, _)| seq.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(err) => return Err(self.db_error(err)),
        };
        Ok(counted.max(newest))
    }
}

/// An audit record of the cluster's shared log: which master stored it, and its entry
/// there.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedAuditEntry {
    /// The master that stored it.
    pub master: crate::identity::MasterId,
    /// The entry, with that master's sequence number.
    pub entry: AuditEntry,
}

/// The audit log the masters of a cluster share: each master copies its own log there
/// (after storing each record durably at home, so that none is lost while the shared
/// store is out of reach), and any master reads every master's.
pub trait SharedAudit: Send + Sync {
    /// Adds this master's `entries` (oldest first), keeping its newest `keep`.
    fn share(
        self: std::sync::Arc<Self>,
        entries: Vec<AuditEntry>,
        keep: u64,
    ) -> super::Pending<Result<(), StoreError>>;

    /// Every master's records, oldest first.
    fn read(
        self: std::sync::Arc<Self>,
    ) -> super::Pending<Result<Vec<SharedAuditEntry>, StoreError>>;
}

/// An audit record as stored before code changes were audited.
#[derive(serde::Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct AuditRecordV1 {
    time_ms: u64,
    edge: crate::identity::UnitId,
    from: crate::control::Owner,
    to: crate::control::Owner,
    epoch: Epoch,
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
    use crate::control::{ControlState, Owner};

    fn record(epoch: u64) -> AuditRecord {
        AuditRecord {
            time_ms: 1,
            edge: "site-1".into(),
            from: Owner::Edge,
            to: Owner::Master,
            epoch: Epoch(epoch),
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
                epoch: Epoch(4),
            };
            store.set_control_state("site-1", state).unwrap();
            for epoch in 1..=5 {
                store.append_audit(&record(epoch), 3).unwrap();
            }
            store.set_audit_reported(4).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.control_states().unwrap()["site-1"].epoch, Epoch(4));
        let kept: Vec<u64> = store
            .audit_after(0)
            .unwrap()
            .iter()
            .map(|entry| entry.record.epoch.get())
            .collect();
        assert_eq!(kept, vec![3, 4, 5], "the newest three are kept, in order");
        assert_eq!(store.audit_reported().unwrap(), 4);
        assert_eq!(store.audit_after(4).unwrap().len(), 1);
    }

    #[test]
    fn an_edge_flooding_the_audit_log_pushes_out_only_its_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.redb")).unwrap();
        store.append_audit(&record(1), 3).unwrap();
        let other = AuditRecord {
            edge: "site-2".into(),
            ..record(2)
        };
        store
            .append_edge_audits("site-2", &[other], AuditSource::Edge, 5)
            .unwrap();
        let flood: Vec<AuditRecord> = (10..1010).map(record).collect();
        store
            .append_edge_audits("site-1", &flood, AuditSource::Edge, 5)
            .unwrap();
        store
            .append_edge_audits("site-1", &[record(2000)], AuditSource::Refusal, 5)
            .unwrap();
        store.append_audit(&record(3000), 3).unwrap();
        let entries = store.audit_after(0).unwrap();
        let seen: Vec<(u64, AuditSource, &str)> = entries
            .iter()
            .map(|e| (e.record.epoch.get(), e.source, e.record.edge.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                (1, AuditSource::Own, "site-1"),
                (2, AuditSource::Edge, "site-2"),
                (1006, AuditSource::Edge, "site-1"),
                (1007, AuditSource::Edge, "site-1"),
                (1008, AuditSource::Edge, "site-1"),
                (1009, AuditSource::Edge, "site-1"),
                (2000, AuditSource::Refusal, "site-1"),
                (3000, AuditSource::Own, "site-1"),
            ],
            "the master's own record and the other edge's survive, in order"
        );
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        let after = store.audit_after(seqs[5]).unwrap();
        assert_eq!(after.len(), 2, "read on from a sequence number");
    }

    #[test]
    fn audit_records_of_the_layout_before_code_audits_still_read() {
        let old = AuditRecordV1 {
            time_ms: 7,
            edge: "site-1".into(),
            from: Owner::Edge,
            to: Owner::Master,
            epoch: Epoch(3),
            reason: "edge link down".into(),
        };
        let bytes = postcard::to_stdvec(&old).unwrap();
        let read = decode_audit(&bytes).unwrap();
        assert_eq!((read.epoch, read.code), (Epoch(3), None));
        assert_eq!(read.reason, "edge link down");
        let current = record(9);
        let bytes = postcard::to_stdvec(&current).unwrap();
        assert_eq!(decode_audit(&bytes).unwrap(), current);
        assert!(decode_audit(&[1, 2]).is_err());
    }
}
