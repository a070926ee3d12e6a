//! The cluster's shared audit log in etcd: `audit/MASTER/SEQ` (the master's own sequence
//! number, zero-padded) to `{"source": ..., "record": {...}}`. Each master writes only its
//! own folder, so no two masters contend; a reader merges them by time.

use std::sync::Arc;

use etcd_client::{DeleteOptions, Txn, TxnOp};

use super::Etcd;
use super::model::prefix_end;
use crate::control::AuditRecord;
use crate::identity::MasterId;
use crate::store::grants::Pending;
use crate::store::{AuditEntry, AuditSource, SharedAudit, SharedAuditEntry, StoreError};

/// Records one transaction writes at most (etcd takes 128 operations).
const PER_TXN: usize = 100;

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredEntry {
    source: AuditSource,
    record: AuditRecord,
}

/// One master's hand on the shared audit log.
#[derive(Debug, Clone)]
pub struct EtcdAudit {
    etcd: Etcd,
    master_id: MasterId,
}

impl EtcdAudit {
    /// Master `master_id`'s hand.
    pub fn new(etcd: Etcd, master_id: &MasterId) -> Self {
        EtcdAudit {
            etcd,
            master_id: master_id.clone(),
        }
    }

    fn key(&self, seq: u64) -> String {
        self.etcd
            .key(&format!("audit/{}/{seq:020}", self.master_id))
    }
}

impl SharedAudit for EtcdAudit {
    fn share(
        self: Arc<Self>,
        entries: Vec<AuditEntry>,
        keep: u64,
    ) -> Pending<Result<(), StoreError>> {
        Box::pin(async move {
            for chunk in entries.chunks(PER_TXN) {
                let Some(last) = chunk.last().map(|e| e.seq) else {
                    continue;
                };
                let mut then: Vec<TxnOp> = chunk
                    .iter()
                    .map(|entry| {
                        let stored = StoredEntry {
                            source: entry.source,
                            record: entry.record.clone(),
                        };
                        // An audit record always encodes: strings, numbers and enums.
                        let value = serde_json::to_vec(&stored).unwrap_or_default();
                        TxnOp::put(self.key(entry.seq), value, None)
                    })
                    .collect();
                let floor = last.saturating_sub(keep.max(1));
                if floor > 0 {
                    then.push(TxnOp::delete(
                        self.key(0),
                        Some(DeleteOptions::new().with_range(self.key(floor + 1))),
                    ));
                }
                self.etcd
                    .txn("cannot share audit records", Txn::new().and_then(then))
                    .await?;
            }
            Ok(())
        })
    }

    fn read(self: Arc<Self>) -> Pending<Result<Vec<SharedAuditEntry>, StoreError>> {
        Box::pin(async move {
            let prefix = self.etcd.key("audit/");
            let (kvs, _) = self
                .etcd
                .read_range(prefix.clone(), prefix_end(&prefix), None)
                .await?;
            let mut entries = Vec::with_capacity(kvs.len());
            for kv in &kvs {
                let key = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                let Some((master, seq)) = key
                    .split_once('/')
                    .and_then(|(master, seq)| Some((MasterId::new(master), seq.parse().ok()?)))
                else {
                    continue;
                };
                match serde_json::from_slice::<StoredEntry>(kv.value()) {
                    Ok(stored) => entries.push(SharedAuditEntry {
                        master,
                        entry: AuditEntry {
                            seq,
                            source: stored.source,
                            record: stored.record,
                        },
                    }),
                    Err(err) => {
                        tracing::warn!(key = %key, "a shared audit record does not decode: {err}")
                    }
                }
            }
            entries.sort_by(|a, b| {
                (a.entry.record.time_ms, &a.master, a.entry.seq).cmp(&(
                    b.entry.record.time_ms,
                    &b.master,
                    b.entry.seq,
                ))
            });
            Ok(entries)
        })
    }
}
