//! The edge's replica of its slice of the model: in redb, so that the edge boots and runs
//! its modules with no master, and in memory for reads. A batch and the version it brings
//! are committed in one transaction; the in-memory model changes only after that.
//!
//! Beside the model it holds the driver code the master sent: each repository's commit,
//! its manifest and blobs. A commit becomes the one the edge runs only once every blob
//! is stored.

use std::path::Path;
use std::sync::{Arc, RwLock};

use tether_common::code::{Code, RepoCode};
use tether_common::model::Model;
use tether_common::model::sync::{BatchError, ReplicaPosition, apply_batch};
use tether_common::protocol::FileEntry;
use tether_common::protocol::ModelBatch;
use tether_common::store::{Store, StoreError};
use tokio::sync::{Mutex, watch};

/// Why a batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// It does not follow from the replica's version, or a record is malformed.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// The database failed; the replica is unchanged.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The replica.
pub struct Replica {
    edge_id: String,
    store: Arc<Store>,
    state: RwLock<(Arc<Model>, ReplicaPosition)>,
    code: RwLock<Arc<Code>>,
    writer: Mutex<()>,
    /// One repository update at a time.
    code_writer: Mutex<()>,
    changed: watch::Sender<ReplicaPosition>,
}

impl Replica {
    /// Opens (or creates) the replica in `data_dir` (blocking).
    pub fn open(data_dir: &Path, edge_id: &str) -> Result<Self, StoreError> {
        let store = Store::open(&data_dir.join("replica.redb"))?;
        let (model, state) = store.load()?;
        let code = store.load_code()?;
        let position = ReplicaPosition {
            model_id: state.model_id,
            version: state.version,
        };
        Ok(Replica {
            edge_id: edge_id.to_string(),
            store: Arc::new(store),
            state: RwLock::new((Arc::new(model), position)),
            code: RwLock::new(Arc::new(code)),
            writer: Mutex::new(()),
            code_writer: Mutex::new(()),
            changed: watch::channel(position).0,
        })
    }

    /// The database, which also holds this edge's control state and audit log.
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// The replica's model and where it stands.
    pub fn snapshot(&self) -> (Arc<Model>, ReplicaPosition) {
        let guard = self.state.read().unwrap_or_else(|p| p.into_inner());
        (guard.0.clone(), guard.1)
    }

    /// The driver code the edge runs.
    pub fn code(&self) -> Arc<Code> {
        self.code.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Holds repository updates off while one runs.
    pub async fn lock_code(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.code_writer.lock().await
    }

    /// Makes `commit` the one the edge runs for `repository`; every blob of `files` must
    /// be stored already. Durable before it returns; then the watch fires.
    pub async fn set_commit(
        &self,
        repository: &str,
        commit: &str,
        files: Vec<FileEntry>,
    ) -> Result<(), String> {
        let store = self.store.clone();
        let (repo, at) = (repository.to_string(), commit.to_string());
        let code = tokio::task::spawn_blocking(move || {
            // The head moves only once the whole commit reads back.
            store
                .put_commit(&repo, &at, &files, false)
                .map_err(|e| e.to_string())?;
            let code = store
                .repo_code(&repo, &at)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("the manifest of {repo} at {at} was not stored"))?;
            store
                .put_commit(&repo, &at, &files, true)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(code)
        })
        .await
        .map_err(|err| format!("the store task failed: {err}"))??;
        let next: RepoCode = code;
        {
            let mut current = self.code.write().unwrap_or_else(|p| p.into_inner());
            *current = Arc::new(current.with(repository, next));
        }
        self.changed.send_modify(|_| {});
        Ok(())
    }

    /// Changes whenever a batch is applied or the code changes.
    pub fn watch(&self) -> watch::Receiver<ReplicaPosition> {
        self.changed.subscribe()
    }

    /// Applies a batch from the master. `Ok(false)`: the replica already had it.
    pub async fn apply(&self, batch: &ModelBatch) -> Result<bool, ApplyError> {
        let _writer = self.writer.lock().await;
        let (model, at) = self.snapshot();
        let Some(applied) = apply_batch(&model, &self.edge_id, at, batch)? else {
            return Ok(false);
        };
        let position = ReplicaPosition {
            model_id: batch.model_id,
            version: batch.to_version,
        };
        let store = self.store.clone();
        let writes = applied.writes;
        let clear = batch.snapshot;
        tokio::task::spawn_blocking(move || {
            store.apply_replica(position.model_id, position.version, clear, &writes)
        })
        .await
        .expect("the replica's commit task does not panic")?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) =
            (Arc::new(applied.model), position);
        self.changed.send_replace(position);
        Ok(true)
    }
}
