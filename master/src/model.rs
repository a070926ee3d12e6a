//! The master's data model: the records in memory for reads, redb for durability, one
//! writer at a time. A write is validated against the model as it would be after it, is
//! committed durably, and only then becomes visible and is pushed to the edges.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, RwLock};

use tether_common::model::sync::{ReplicaPosition, batch_for_edge};
use tether_common::model::{Model, ModelError};
use tether_common::protocol::{EntityKind, ModelBatch, ModelChange};
use tether_common::store::{
    CommitError, Fed, LoadedModel, ModelStore, RecordVersions, RedbModel, Store, StoreError, Write,
};
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
    /// Every edge asks on every change, so the start is found by bisection (the changes
    /// are in version order) rather than by a scan of all those kept: with 10,000 edges
    /// the scan was a seventh of the master's time while a change went out.
    fn since(&self, since: u64, version: u64) -> Option<Vec<ModelChange>> {
        self.after(since, version)
            .map(|changes| changes.cloned().collect())
    }

    /// Whether a change after `since`, up to `version`, was to a record of one of
    /// `kinds`; `None` when memory no longer holds them all.
    fn touch_any_of(&self, since: u64, version: u64, kinds: &[EntityKind]) -> Option<bool> {
        self.after(since, version)
            .map(|mut changes| changes.any(|c| kinds.contains(&c.kind)))
    }

    /// The changes after `since` up to `version`, if memory holds all of them.
    fn after(&self, since: u64, version: u64) -> Option<impl Iterator<Item = &ModelChange>> {
        (since >= self.complete_after).then(|| {
            let start = self.changes.partition_point(|c| c.version <= since);
            self.changes
                .range(start..)
                .take_while(move |c| c.version <= version)
        })
    }
}

/// How many times a write is planned again because another master wrote first, before
/// it gives up (503): each time it lost a race that someone else won.
const WRITE_TRIES: u32 = 50;

/// The model, its store, and a watch of its version for the edges' sync tasks.
pub struct ModelService {
    /// The master's own database: control states, audit log and code (and, for a single
    /// master, the model too).
    store: Arc<Store>,
    /// Where the model's records and change log live: this master's redb, or etcd.
    records: Arc<dyn ModelStore>,
    /// The model and its version, replaced together.
    model: RwLock<(Arc<Model>, u64)>,
    /// Each record's version, updated before the model that has it is visible.
    record_versions: RwLock<RecordVersions>,
    /// The newest changes, written before the model they lead to is visible.
    recent: RwLock<RecentChanges>,
    model_id: u64,
    log_limit: u64,
    /// This master's writes, one at a time.
    writer: Mutex<()>,
    /// Changes become visible one batch at a time, in version order (this master's own
    /// writes and those the feed brings from other masters).
    applying: std::sync::Mutex<()>,
    version: watch::Sender<u64>,
    /// Whether writes are taken now (none: always).
    gate: std::sync::OnceLock<WriteGate>,
}

impl ModelService {
    /// Opens the database in `data_dir`, which holds the model (blocking).
    pub fn open(data_dir: &Path, log_limit: u64) -> Result<Self, StoreError> {
        let store = Arc::new(Store::open(&data_dir.join("model.redb"))?);
        let records = Arc::new(RedbModel::open(store.clone())?);
        let (model, state) = store.load()?;
        let record_versions = store.record_versions()?;
        let loaded = LoadedModel {
            model,
            state,
            record_versions,
        };
        Ok(Self::new(store, records, loaded, log_limit))
    }

    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    /// The model `records` holds (a cluster's, in etcd), beside this master's own
    /// database in `data_dir`; follows the changes other masters write.
    pub async fn open_shared(
        data_dir: &Path,
        records: Arc<dyn ModelStore>,
        log_limit: u64,
    ) -> Result<Arc<Self>, StoreError> {
        let path = data_dir.join("model.redb");
        let store = tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .map_err(|err| StoreError::Stopped(err.to_string()))??;
        let loaded = records.clone().load().await?;
        let service = Arc::new(Self::new(
            Arc::new(store),
            records.clone(),
            loaded,
            log_limit,
        ));
        if let Some(feed) = records.follow() {
            tokio::spawn(follow(Arc::downgrade(&service), feed));
        }
        Ok(service)
    }

    fn new(
        store: Arc<Store>,
        records: Arc<dyn ModelStore>,
        loaded: LoadedModel,
        log_limit: u64,
    ) -> Self {
        let version = loaded.state.version;
        ModelService {
            store,
            model_id: records.model_id(),
            records,
            model: RwLock::new((Arc::new(loaded.model), version)),
            record_versions: RwLock::new(loaded.record_versions),
            recent: RwLock::new(RecentChanges {
                changes: VecDeque::new(),
                complete_after: version,
            }),
            log_limit,
            writer: Mutex::new(()),
            applying: std::sync::Mutex::new(()),
            version: watch::channel(version).0,
            gate: std::sync::OnceLock::new(),
        }
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
    /// out, so a write that changes nothing does not raise the version. `plan` runs again
    /// on the newer model when another master wrote first.
    pub async fn write(
        &self,
        plan: impl FnMut(&Model) -> Result<Vec<Write>, ModelError>,
    ) -> Result<Vec<ModelChange>, WriteError> {
        self.write_if(None, plan).await
    }

    /// [`write`](Self::write), refused when `condition`'s record has changed since the
    /// version it names, or is gone (checked on the model the write is committed over,
    /// so of two writes from the same version exactly one lands, on any masters).
    pub async fn write_if(
        &self,
        condition: Option<IfMatch>,
        mut plan: impl FnMut(&Model) -> Result<Vec<Write>, ModelError>,
    ) -> Result<Vec<ModelChange>, WriteError> {
        if let Some(gate) = self.gate.get() {
            gate().map_err(WriteError::Unavailable)?;
        }
        let _writer = self.writer.lock().await;
        for _ in 0..WRITE_TRIES {
            let (current, base) = self.snapshot();
            if let Some(condition) = &condition {
                self.check(&current, condition)?;
            }
            let (next, writes) = planned(&current, &mut plan)?;
            if writes.is_empty() {
                return Ok(Vec::new());
            }
            match self
                .records
                .clone()
                .commit(base, writes, self.log_limit)
                .await
            {
                Ok(changes) => {
                    // Another master's write landed between the runs of a large write:
                    // read them in order. The write is committed whatever happens here
                    // (the feed brings it later), so it is answered as done.
                    if !self.install(base, next, &changes)
                        && let Err(err) = self.catch_up().await
                    {
                        tracing::warn!("a committed write is not visible here yet: {err}");
                    }
                    return Ok(changes);
                }
                Err(CommitError::Behind { .. }) => self.catch_up().await?,
                Err(CommitError::Store(err)) => return Err(err.into()),
            }
        }
        Err(WriteError::Unavailable(format!(
            "the model changed under this write {WRITE_TRIES} times (other masters write fast): try again"
        )))
    }

    /// Makes a commit of this master visible: `next` when the model is still at `base`,
    /// else the changes over whatever the feed has applied meanwhile. False when a gap
    /// remains (the caller reads the log).
    fn install(&self, base: u64, next: Model, changes: &[ModelChange]) -> bool {
        let _turn = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let (_, version) = self.snapshot();
        let contiguous = changes
            .iter()
            .zip(base + 1..)
            .all(|(change, expected)| change.version == expected);
        if version == base && contiguous {
            self.publish(Arc::new(next), changes);
            return true;
        }
        self.apply_in_turn(changes)
    }

    /// Applies changes committed elsewhere (or already by this master: skipped), in
    /// version order. False when they do not follow on from the model's version.
    fn apply(&self, changes: &[ModelChange]) -> bool {
        let _turn = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        self.apply_in_turn(changes)
    }

    fn apply_in_turn(&self, changes: &[ModelChange]) -> bool {
        let (current, version) = self.snapshot();
        let fresh: Vec<ModelChange> = changes
            .iter()
            .filter(|c| c.version > version)
            .cloned()
            .collect();
        let Some(first) = fresh.first() else {
            return true;
        };
        if first.version != version + 1 {
            return false;
        }
        let mut next = (*current).clone();
        let mut applied = Vec::with_capacity(fresh.len());
        for (change, expected) in fresh.into_iter().zip(version + 1..) {
            if change.version != expected {
                break;
            }
            let json = change.record.as_ref().map(|json| json.0.as_str());
            if let Err(err) = next.set_json(change.kind, &change.id, json) {
                // Another master checked it; a record this one cannot read is logged and
                // counted as applied, so that the versions stay in step.
                tracing::error!(
                    version = change.version,
                    kind = tether_common::model::kind_singular(change.kind),
                    id = %change.id,
                    "a committed change does not apply to this master's model: {err}"
                );
            }
            applied.push(change);
        }
        let whole = applied.len() == changes.iter().filter(|c| c.version > version).count();
        self.publish(Arc::new(next), &applied);
        whole
    }

    /// Makes `model`, the result of `changes`, the current model (in the apply turn).
    fn publish(&self, model: Arc<Model>, changes: &[ModelChange]) {
        let Some(version) = changes.last().map(|c| c.version) else {
            return;
        };
        {
            let mut versions = self
                .record_versions
                .write()
                .unwrap_or_else(|p| p.into_inner());
            for change in changes {
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
            .push(changes, self.log_limit);
        *self.model.write().unwrap_or_else(|p| p.into_inner()) = (model, version);
        self.version.send_replace(version);
    }

    /// Brings the model up to the store's: the changes since its version from the log,
    /// or the whole model when the log no longer reaches back (or does not follow on).
    async fn catch_up(&self) -> Result<(), StoreError> {
        let (_, version) = self.snapshot();
        if let Some(changes) = self.records.clone().changes_since(version).await? {
            let reached = changes.last().map_or(version, |c| c.version);
            // Applied, or the feed applied as far meanwhile.
            if self.apply(&changes) || self.snapshot().1 >= reached {
                return Ok(());
            }
        }
        let loaded = self.records.clone().load().await?;
        let _turn = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let (_, now) = self.snapshot();
        if loaded.state.version > now {
            tracing::warn!(
                from = now,
                to = loaded.state.version,
                "the change log does not reach back to this master's model: read it whole"
            );
            *self
                .record_versions
                .write()
                .unwrap_or_else(|p| p.into_inner()) = loaded.record_versions;
            *self.recent.write().unwrap_or_else(|p| p.into_inner()) = RecentChanges {
                changes: VecDeque::new(),
                complete_after: loaded.state.version,
            };
            *self.model.write().unwrap_or_else(|p| p.into_inner()) =
                (Arc::new(loaded.model), loaded.state.version);
            self.version.send_replace(loaded.state.version);
        }
        Ok(())
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

    /// Whether a record of one of `kinds` changed after version `since`, up to `version`:
    /// true also when that is no longer known (memory keeps the newest changes only), so
    /// that a caller who skips work on `false` never skips it wrongly.
    pub fn changed_any_of(&self, since: u64, version: u64, kinds: &[EntityKind]) -> bool {
        self.recent
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .touch_any_of(since, version, kinds)
            .unwrap_or(true)
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
            None => self.records.clone().changes_since(since).await?,
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

/// The model after `plan`, and the records to store: as the model has them (defaults
/// filled in), only those that change, each checked.
fn planned(
    current: &Model,
    plan: &mut impl FnMut(&Model) -> Result<Vec<Write>, ModelError>,
) -> Result<(Model, Vec<Write>), ModelError> {
    let planned = plan(current)?;
    let mut next = current.clone();
    for (kind, id, json) in &planned {
        next.set_json(*kind, id, json.as_deref())?;
    }
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
                )));
            }
        }
    }
    Ok((next, writes))
}

/// Applies what the store's feed brings (other masters' writes) until the service goes.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
async fn follow(
    service: std::sync::Weak<ModelService>,
    mut feed: tokio::sync::mpsc::Receiver<Fed>,
) {
    while let Some(fed) = feed.recv().await {
        let Some(service) = service.upgrade() else {
            return;
        };
        let whole = match &fed {
            Fed::Changes(changes) => service.apply(changes),
            Fed::Resync => false,
        };
        if whole {
            continue;
        }
        // Until the log is read, the next feed entries cannot apply either: try until
        // it answers.
        while let Err(err) = service.catch_up().await {
            tracing::warn!("cannot catch up with the cluster's model: {err}");
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
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
    fn recent_changes_tell_which_kinds_changed_and_not_knowing_is_not_no() {
        let mut recent = RecentChanges {
            changes: VecDeque::new(),
            complete_after: 10,
        };
        let mut module = change(12, "m");
        module.kind = EntityKind::Module;
        recent.push(&[change(11, "u")], 3);
        recent.push(&[module], 3);
        recent.push(&[change(13, "v")], 3);
        let code = [EntityKind::Module, EntityKind::Driver];
        assert_eq!(recent.touch_any_of(10, 11, &code), Some(false));
        assert_eq!(recent.touch_any_of(11, 12, &code), Some(true));
        assert_eq!(recent.touch_any_of(10, 13, &code), Some(true));
        assert_eq!(recent.touch_any_of(12, 13, &code), Some(false));
        // Memory keeps three changes: before version 10 is not known.
        recent.push(&[change(14, "w")], 3);
        assert_eq!(recent.touch_any_of(10, 14, &code), None);
        assert_eq!(recent.touch_any_of(12, 14, &code), Some(false));
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
