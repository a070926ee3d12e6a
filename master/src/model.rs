//! The master's data model: the records in memory for reads, redb for durability, one
//! writer at a time. A write is validated against the model as it would be after it, is
//! committed durably, and only then becomes visible and is pushed to the edges.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, RwLock};

use tether_common::model::sync::{ReplicaPosition, batch_for_edge};
use tether_common::model::{Model, ModelError};
use tether_common::protocol::{EntityKind, ModelBatch, ModelChange};
use tether_common::store::{RecordVersions, Store, StoreError, Write};
use tokio::sync::{Mutex, watch};

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The write breaks a rule of the model (422, 404 or 409).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The database failed; nothing was written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A conditional write (`If-Match`) whose record has changed since, or is gone (412).
    #[error("{0}")]
    Changed(String),
    /// Writes are not taken now (a master of a cluster that cannot reach etcd) (503).
    #[error("{0}")]
    Unavailable(String),
}

/// Says whether writes may be taken now, and why not.
pub type WriteGate = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A conditional write's condition: the record is still at the version the writer read
/// (`If-Match`), as Kubernetes' `resourceVersion`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfMatch {
    /// The record's kind.
    pub kind: EntityKind,
    /// Its id.
    pub id: String,
    /// The version the writer read (`None`: any, as long as the record exists: `*`).
    pub version: Option<u64>,
}

/// Changes kept in memory for the edges' batches, newest last.
const RECENT_KEEP: usize = 4096;

/// The newest changes of the log, so that pushing one change to thousands of edges reads
/// memory rather than the database once per edge.
#[derive(Default)]
struct RecentChanges {
    changes: VecDeque<ModelChange>,
    /// Every change after this version is in `changes` (up to the model's version).
    complete_after: u64,
}

impl RecentChanges {
    /// Adds a write's changes; keeps no more than the database's log does, so an edge
    /// gets the same answer from either.
    fn push(&mut self, changes: &[ModelChange], log_limit: u64) {
        let keep = RECENT_KEEP.min(usize::try_from(log_limit).unwrap_or(usize::MAX));
        self.changes.extend(changes.iter().cloned());
        while self.changes.len() > keep {
            if let Some(gone) = self.changes.pop_front() {
                self.complete_after = self.complete_after.max(gone.version);
            }
        }
    }

    /// The changes after `since` up to `version`, if memory still holds all of them.
    fn since(&self, since: u64, version: u64) -> Option<Vec<ModelChange>> {
        (since >= self.complete_after).then(|| {
            self.changes
                .iter()
                .filter(|c| c.version > since && c.version <= version)
                .cloned()
                .collect()
        })
    }
}

/// The model, its store, and a watch of its version for the edges' sync tasks.
pub struct ModelService {
    store: Arc<Store>,
    /// The model and its version, replaced together.
    model: RwLock<(Arc<Model>, u64)>,
    /// Each record's version, updated before the model that has it is visible.
    record_versions: RwLock<RecordVersions>,
    /// The newest changes, written before the model they lead to is visible.
    recent: RwLock<RecentChanges>,
    model_id: u64,
    log_limit: u64,
    writer: Mutex<()>,
    version: watch::Sender<u64>,
    /// Whether writes are taken now (none: always).
    gate: std::sync::OnceLock<WriteGate>,
}

impl ModelService {
    /// Opens the database in `data_dir` (blocking).
    pub fn open(data_dir: &Path, log_limit: u64) -> Result<Self, StoreError> {
        let store = Store::open(&data_dir.join("model.redb"))?;
        let model_id = store.ensure_model_id(rand::random())?;
        let (model, state) = store.load()?;
        let record_versions = store.record_versions()?;
        Ok(ModelService {
            store: Arc::new(store),
            model: RwLock::new((Arc::new(model), state.version)),
            record_versions: RwLock::new(record_versions),
            recent: RwLock::new(RecentChanges {
                changes: VecDeque::new(),
                complete_after: state.version,
            }),
            model_id,
            log_limit,
            writer: Mutex::new(()),
            version: watch::channel(state.version).0,
            gate: std::sync::OnceLock::new(),
        })
    }

    /// From now on a write is taken only when `gate` allows (once; later calls are
    /// ignored).
    pub fn set_write_gate(&self, gate: WriteGate) {
        let _ = self.gate.set(gate);
    }

    /// The model as of now, and its version.
    pub fn snapshot(&self) -> (Arc<Model>, u64) {
        let guard = self.model.read().unwrap_or_else(|p| p.into_inner());
        (guard.0.clone(), guard.1)
    }

    /// The database, which also holds the control states and the audit log.
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Tells this model's history from another's.
    pub fn model_id(&self) -> u64 {
        self.model_id
    }

    /// The model version; changes whenever a write commits.
    pub fn watch_version(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The version that last wrote a record (0 for one written before versions were
    /// kept, or none).
    pub fn record_version(&self, kind: EntityKind, id: &str) -> u64 {
        self.record_versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(kind, id.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// The changes `plan` asks for, checked and committed. `plan` sees the current model
    /// and returns the records to write; records identical to the current ones are left
    /// out, so a write that changes nothing does not raise the version.
    pub async fn write(
        &self,
        plan: impl FnOnce(&Model) -> Result<Vec<Write>, ModelError>,
    ) -> Result<Vec<ModelChange>, WriteError> {
        self.write_if(None, plan).await
    }

    /// [`write`](Self::write), refused when `condition`'s record has changed since the
    /// version it names, or is gone (checked in the writer's turn, so of two writes from
    /// the same version exactly one lands).
    pub async fn write_if(
        &self,
        condition: Option<IfMatch>,
        plan: impl FnOnce(&Model) -> Result<Vec<Write>, ModelError>,
    ) -> Result<Vec<ModelChange>, WriteError> {
        if let Some(gate) = self.gate.get() {
            gate().map_err(WriteError::Unavailable)?;
        }
        let _writer = self.writer.lock().await;
        let (current, _) = self.snapshot();
        if let Some(condition) = condition {
            self.check(&current, &condition)?;
        }
        let planned = plan(&current)?;
        let mut next = (*current).clone();
        for (kind, id, json) in &planned {
            next.set_json(*kind, id, json.as_deref())?;
        }
        // Store the records as the model has them (defaults filled in), and only those
        // that change.
        // A set, not a scan of `writes`: an import may plan thousands of records.
        let mut seen = std::collections::BTreeSet::new();
        let mut writes: Vec<Write> = Vec::new();
        for (kind, id, _) in planned {
            if !seen.insert((kind, id.clone())) {
                continue;
            }
            let new = next.get_json(kind, &id);
            if new != current.get_json(kind, &id) {
                writes.push((kind, id, new));
            }
        }
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        for (kind, id, json) in &writes {
            if json.is_some() {
                next.check_record(*kind, id)?;
            } else {
                let referrers = next.referrers(*kind, id);
                if !referrers.is_empty() {
                    return Err(ModelError::Conflict(format!(
                        "{} {id} is still used by {}",
                        tether_common::model::kind_singular(*kind),
                        referrers.join(", ")
                    ))
                    .into());
                }
            }
        }
        let store = self.store.clone();
        let limit = self.log_limit;
        let changes = tokio::task::spawn_blocking(move || store.commit(&writes, limit))
            .await
            .expect("the store's commit task does not panic")?;
        let version = changes.last().map(|c| c.version).unwrap_or_default();
        {
            let mut versions = self
                .record_versions
                .write()
                .unwrap_or_else(|p| p.into_inner());
            for change in &changes {
                let key = (change.kind, change.id.clone());
                match change.record {
                    Some(_) => versions.insert(key, change.version),
                    None => versions.remove(&key),
                };
            }
        }
        self.recent
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(&changes, self.log_limit);
        *self.model.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(next), version);
        self.version.send_replace(version);
        Ok(changes)
    }

    /// Whether a conditional write may go ahead on `model`.
    fn check(&self, model: &Model, condition: &IfMatch) -> Result<(), WriteError> {
        let what = format!(
            "{} {}",
            tether_common::model::kind_singular(condition.kind),
            condition.id
        );
        if !model.contains(condition.kind, &condition.id) {
            return Err(WriteError::Changed(format!(
                "{what} is gone (If-Match needs the record to exist)"
            )));
        }
        let now = self.record_version(condition.kind, &condition.id);
        match condition.version {
            Some(read) if read != now => Err(WriteError::Changed(format!(
                "{what} changed since version {read}: it is at version {now} (read it again, then write)"
            ))),
            _ => Ok(()),
        }
    }

    /// The batch that brings an edge's replica at `at` up to date.
    pub async fn batch_for(
        &self,
        edge_id: &str,
        at: ReplicaPosition,
    ) -> Result<ModelBatch, StoreError> {
        let (model, version) = self.snapshot();
        let since = at.version;
        let recent = self
            .recent
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .since(since, version);
        let incremental = at.model_id == self.model_id && since <= version;
        let log = match recent {
            Some(changes) => Some(changes),
            // A replica of another model, or from the future, gets a snapshot: no log.
            None if !incremental => None,
            // The log read may run ahead of `model`; that is harmless, because each
            // record is sent as `model` has it and a later push brings the rest.
            None => {
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || store.changes_since(since))
                    .await
                    .expect("the store's read task does not panic")?
            }
        };
        let log = log.map(|changes| {
            changes
                .into_iter()
                .filter(|c| c.version <= version)
                .collect::<Vec<_>>()
        });
        Ok(batch_for_edge(
            &model,
            self.model_id,
            version,
            edge_id,
            at,
            log.as_deref(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_common::protocol::EntityKind;

    fn change(version: u64, id: &str) -> ModelChange {
        ModelChange {
            version,
            kind: EntityKind::User,
            id: id.to_string(),
            record: None,
        }
    }

    #[test]
    fn recent_changes_answer_only_what_they_hold_whole() {
        let mut recent = RecentChanges {
            changes: VecDeque::new(),
            complete_after: 10,
        };
        // Nothing before the model was opened at version 10.
        assert_eq!(recent.since(9, 10), None);
        assert_eq!(recent.since(10, 10), Some(vec![]));
        // Version 11 wrote two records, 12 and 13 one each; memory keeps three changes.
        recent.push(&[change(11, "a"), change(11, "b")], 100);
        recent.push(&[change(12, "c")], 100);
        recent.push(&[change(13, "d")], 3);
        // Half of version 11 is gone: a replica at 10 needs the database.
        assert_eq!(recent.since(10, 13), None);
        let ids = |changes: Option<Vec<ModelChange>>| {
            changes.map(|c| c.into_iter().map(|c| c.id).collect::<Vec<_>>())
        };
        assert_eq!(
            ids(recent.since(11, 13)),
            Some(vec!["c".into(), "d".into()])
        );
        // Only up to the version the caller's model has.
        assert_eq!(ids(recent.since(11, 12)), Some(vec!["c".into()]));
        // A replica that claims a future version gets nothing here; the batch makes it a
        // snapshot.
        assert_eq!(ids(recent.since(20, 13)), Some(vec![]));
    }

    #[test]
    fn memory_never_holds_more_than_the_database_log() {
        let mut recent = RecentChanges::default();
        for version in 1..=10 {
            recent.push(&[change(version, "u")], 4);
        }
        assert_eq!(recent.changes.len(), 4);
        assert_eq!(recent.since(5, 10), None);
        assert_eq!(recent.since(6, 10).map(|c| c.len()), Some(4));
    }
}
