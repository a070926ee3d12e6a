//! The master's data model: the records in memory for reads, redb for durability, one
//! writer at a time. A write is validated against the model as it would be after it, is
//! committed durably, and only then becomes visible and is pushed to the edges.

use std::path::Path;
use std::sync::{Arc, RwLock};

use tether_common::model::sync::{ReplicaPosition, batch_for_edge};
use tether_common::model::{Model, ModelError};
use tether_common::protocol::{ModelBatch, ModelChange};
use tether_common::store::{Store, StoreError, Write};
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
}

/// The model, its store, and a watch of its version for the edges' sync tasks.
pub struct ModelService {
    store: Arc<Store>,
    /// The model and its version, replaced together.
    model: RwLock<(Arc<Model>, u64)>,
    model_id: u64,
    log_limit: u64,
    writer: Mutex<()>,
    version: watch::Sender<u64>,
}

impl ModelService {
    /// Opens the database in `data_dir` (blocking).
    pub fn open(data_dir: &Path, log_limit: u64) -> Result<Self, StoreError> {
        let store = Store::open(&data_dir.join("model.redb"))?;
        let model_id = store.ensure_model_id(rand::random())?;
        let (model, state) = store.load()?;
        Ok(ModelService {
            store: Arc::new(store),
            model: RwLock::new((Arc::new(model), state.version)),
            model_id,
            log_limit,
            writer: Mutex::new(()),
            version: watch::channel(state.version).0,
        })
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

    /// The changes `plan` asks for, checked and committed. `plan` sees the current model
    /// and returns the records to write; records identical to the current ones are left
    /// out, so a write that changes nothing does not raise the version.
    pub async fn write(
        &self,
        plan: impl FnOnce(&Model) -> Result<Vec<Write>, ModelError>,
    ) -> Result<Vec<ModelChange>, WriteError> {
        let _writer = self.writer.lock().await;
        let (current, _) = self.snapshot();
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
        *self.model.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(next), version);
        self.version.send_replace(version);
        Ok(changes)
    }

    /// The batch that brings an edge's replica at `at` up to date.
    pub async fn batch_for(
        &self,
        edge_id: &str,
        at: ReplicaPosition,
    ) -> Result<ModelBatch, StoreError> {
        let (model, version) = self.snapshot();
        let store = self.store.clone();
        let since = at.version;
        // The log read may run ahead of `model`; that is harmless, because each record is
        // sent as `model` has it and a later push brings the rest.
        let log = tokio::task::spawn_blocking(move || store.changes_since(since))
            .await
            .expect("the store's read task does not panic")?;
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
