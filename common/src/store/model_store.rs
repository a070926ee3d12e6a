//! The master's model in a store: its records, each with the version that last wrote it,
//! and the change log edges (and, in a cluster, other masters) catch up from.
//!
//! [`ModelStore`] is what the master's model service needs of a store: redb implements it
//! here (one master, the only writer), etcd in a cluster (several writers, each commit a
//! compare-and-set on the model version, so two masters' concurrent writes both land, one
//! after the other, with distinct versions).

use std::sync::Arc;

use super::grants::Pending;
use super::{RecordVersions, StoreError, StoreState, Write};
use crate::model::Model;
use crate::protocol::ModelChange;

/// A model as loaded from a store.
#[derive(Debug, Default)]
pub struct LoadedModel {
    /// The records.
    pub model: Model,
    /// The model id, version and log floor.
    pub state: StoreState,
    /// Each record's version.
    pub record_versions: RecordVersions,
}

/// Why a commit did not happen. Either way nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The stored model is no longer at the version the write was planned on (another
    /// master wrote meanwhile): catch up, plan again.
    #[error("the model moved on from version {base}")]
    Behind {
        /// The version the write was planned on.
        base: u64,
    },
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a store's feed says.
#[derive(Debug)]
pub enum Fed {
    /// Changes another writer committed (or this one: the feed does not tell), oldest
    /// first, each write's changes whole.
    Changes(Vec<ModelChange>),
    /// The feed (re)started and may have missed changes: catch up from the log.
    Resync,
}

/// What the master's model service needs of a store. Asynchronous, because the stores
/// are a file (redb, written on a blocking thread) or a network service (etcd).
pub trait ModelStore: Send + Sync {
    /// Tells this model's history from another's (one for a whole cluster).
    fn model_id(&self) -> u64;

    /// Every record, with the state and each record's version.
    fn load(self: Arc<Self>) -> Pending<Result<LoadedModel, StoreError>>;

    /// Commits `writes` if the stored model is at version `base`: each write raises the
    /// version by one and is appended to the change log, which then keeps at most
    /// `log_limit` changes. Durable when it answers `Ok`; returns the changes with their
    /// versions.
    fn commit(
        self: Arc<Self>,
        base: u64,
        writes: Vec<Write>,
        log_limit: u64,
    ) -> Pending<Result<Vec<ModelChange>, CommitError>>;

    /// The changes after `since`, oldest first, or `None` when the log no longer reaches
    /// back that far (or `since` is ahead of the model).
    fn changes_since(
        self: Arc<Self>,
        since: u64,
    ) -> Pending<Result<Option<Vec<ModelChange>>, StoreError>>;

    /// The changes other writers commit, as they land; `None` for a store this process
    /// alone writes.
    fn follow(self: Arc<Self>) -> Option<tokio::sync::mpsc::Receiver<Fed>> {
        None
    }
}

/// A redb file with one master writing it.
pub struct RedbModel {
    store: Arc<super::Store>,
    model_id: u64,
}

impl RedbModel {
    /// The model in `store`, given a fresh model id if it has none yet (blocking).
    pub fn open(store: Arc<super::Store>) -> Result<Self, StoreError> {
        let model_id = store.ensure_model_id(rand::random())?;
        Ok(RedbModel { store, model_id })
    }
}

/// Runs a blocking store call on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| StoreError::Stopped(err.to_string()))?
}

impl ModelStore for RedbModel {
    fn model_id(&self) -> u64 {
        self.model_id
    }

    fn load(self: Arc<Self>) -> Pending<Result<LoadedModel, StoreError>> {
        Box::pin(blocking(move || {
            let (model, state) = self.store.load()?;
            let record_versions = self.store.record_versions()?;
            Ok(LoadedModel {
                model,
                state,
                record_versions,
            })
        }))
    }

    fn commit(
        self: Arc<Self>,
        base: u64,
        writes: Vec<Write>,
        log_limit: u64,
    ) -> Pending<Result<Vec<ModelChange>, CommitError>> {
        Box::pin(async move {
            blocking(move || Ok(self.store.commit_at(base, &writes, log_limit))).await?
        })
    }

    fn changes_since(
        self: Arc<Self>,
        since: u64,
    ) -> Pending<Result<Option<Vec<ModelChange>>, StoreError>> {
        Box::pin(blocking(move || self.store.changes_since(since)))
    }
}
