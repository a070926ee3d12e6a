//! The data model on disk (redb): records by kind and id, the model version, and on the
//! master the change log that edges catch up from.
//!
//! Every call blocks on file I/O; async callers use `spawn_blocking`. A commit is durable
//! when it returns (redb's default, immediate durability), so a 2xx answer sent after it
//! survives a SIGKILL.

use std::path::{Path, PathBuf};

mod audit;
mod code;
#[cfg(feature = "etcd")]
pub mod etcd;
mod grants;
mod model_store;

pub use audit::{AuditEntry, AuditSource, SharedAudit, SharedAuditEntry};
pub use code::{CommitCode, SharedCode};
pub use grants::{Claims, Grants, Held, IssueError, PairGrants, Pending};
pub use model_store::{CommitError, Fed, LoadedModel, ModelStore, RedbModel};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::model::{KINDS, Model, ModelError, kind_name};
use crate::protocol::{EntityKind, ModelChange};

/// Records: (kind name, id) to the record's JSON.
const RECORDS: TableDefinition<(&str, &str), &str> = TableDefinition::new("records");
/// The master's change log: version to a postcard [`ModelChange`].
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("change_log");
/// On the master: (kind name, id) to the model version that last wrote the record, for
/// conditional writes (`If-Match`). A record written before versions were kept has none.
const RECORD_VERSIONS: TableDefinition<(&str, &str), u64> = TableDefinition::new("record_versions");
/// Counters: `version`, `log_floor`, `model_id`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Creates a server's data folder, readable by its owner only (0700 on Unix): it holds the
/// admin token, the model with its users' token hashes, and the audit log. A folder that
/// exists keeps its mode; if others may read it, a warning says so.
pub fn create_data_dir(path: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "data_dir {} has mode {mode:o}: others may read the admin token and the model (chmod 700 it)",
                path.display()
            );
        }
    }
    Ok(())
}

/// One record to write: its kind, id and JSON, or `None` to delete it.
pub type Write = (EntityKind, String, Option<String>);

/// What a store holds besides its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreState {
    /// Tells one master's model history from another's (a reseeded data dir starts anew).
    /// On an edge, the id of the master model its replica came from; 0 for none yet.
    pub model_id: u64,
    /// The model version: the number of changes ever committed.
    pub version: u64,
    /// The log holds every change with a version above this.
    pub log_floor: u64,
}

/// A store error, naming the database file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed.
    #[error("database {path}: {source}")]
    Db {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: Box<redb::Error>,
    },
    /// The store's own task or thread ended (shutdown).
    #[error("the store stopped: {0}")]
    Stopped(String),
    /// The cluster's shared store (etcd) did not answer, or refused.
    #[error("etcd ({endpoints}): {what}")]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// What failed.
        what: String,
    },
    /// A stored record or log entry does not decode.
    #[error("database {path}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// Each record's version: (kind, id) to the model version that last wrote it.
pub type RecordVersions = std::collections::HashMap<(EntityKind, String), u64>;

/// A redb database holding a model.
pub struct Store {
    db: Database,
    path: PathBuf,
    /// Each audit record once it is durable, with its sequence number, for live views.
    audit_appended: tokio::sync::broadcast::Sender<AuditEntry>,
    /// Grants waiting to be stored together (started with the first).
    grant_batches: std::sync::OnceLock<grants::GrantQueue>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn kind_from_name(name: &str) -> Option<EntityKind> {
    KINDS.into_iter().find(|&kind| kind_name(kind) == name)
}

/// Audit records a live view may fall behind by before it must read the log again.
const AUDIT_LIVE: usize = 1024;

impl Store {
    /// Opens (or creates) the database at `path`. A second process opening the same file
    /// gets an error saying it is in use.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let fail = |err: redb::Error| StoreError::Db {
            path: path.to_path_buf(),
            source: Box::new(err),
        };
        let db = Database::create(path).map_err(|e| fail(e.into()))?;
        let store = Store {
            db,
            path: path.to_path_buf(),
            audit_appended: tokio::sync::broadcast::channel(AUDIT_LIVE).0,
            grant_batches: std::sync::OnceLock::new(),
        };
        // Create the tables, so that readers find them in a new file.
        store.write_txn(|txn| {
            txn.open_table(RECORDS)?;
            txn.open_table(LOG)?;
            txn.open_table(META)?;
            Ok(())
        })?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_error(&self, err: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source: Box::new(err.into()),
        }
    }

    fn corrupt(&self, what: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    /// Runs `f` in one write transaction and commits it durably; an error aborts it.
    fn write_txn<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_error(e))?;
        let value = f(&txn).map_err(|e| self.db_error(e))?;
        txn.commit().map_err(|e| self.db_error(e))?;
        Ok(value)
    }

    /// The model id, version and log floor.
    pub fn state(&self) -> Result<StoreState, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let meta = txn.open_table(META).map_err(|e| self.db_error(e))?;
        read_state(&meta).map_err(|e| self.db_error(e))
    }

    /// Gives a new master database its model id; an existing one keeps its own.
    pub fn ensure_model_id(&self, fresh: u64) -> Result<u64, StoreError> {
        self.write_txn(|txn| {
            let mut meta = txn.open_table(META)?;
            let existing = meta.get("model_id")?.map(|v| v.value());
            match existing {
                Some(id) if id != 0 => Ok(id),
                _ => {
                    let id = fresh.max(1);
                    meta.insert("model_id", id)?;
                    Ok(id)
                }
            }
        })
    }

    /// Every record, parsed into a model, and the state.
    pub fn load(&self) -> Result<(Model, StoreState), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let meta = txn.open_table(META).map_err(|e| self.db_error(e))?;
        let state = read_state(&meta).map_err(|e| self.db_error(e))?;
        let records = txn.open_table(RECORDS).map_err(|e| self.db_error(e))?;
        let mut model = Model::default();
        for entry in records.iter().map_err(|e| self.db_error(e))? {
            let (key, value) = entry.map_err(|e| self.db_error(e))?;
            let (kind, id) = key.value();
            let kind = kind_from_name(kind)
                .ok_or_else(|| self.corrupt(format!("unknown record kind {kind:?}")))?;
            model
                .set_json(kind, id, Some(value.value()))
                .map_err(|err: ModelError| {
                    self.corrupt(format!("{} {id}: {err}", kind_name(kind)))
                })?;
        }
        Ok((model, state))
    }

    /// Commits writes as changes of the master's model: each raises the version by one and
    /// is appended to the change log, which then keeps at most `log_limit` changes.
    /// Returns the changes with their versions.
    pub fn commit(&self, writes: &[Write], log_limit: u64) -> Result<Vec<ModelChange>, StoreError> {
        let base = self.state()?.version;
        self.commit_at(base, writes, log_limit)
            .map_err(|err| match err {
                CommitError::Store(err) => err,
                behind => StoreError::Stopped(behind.to_string()),
            })
    }

    /// [`commit`](Self::commit) if the model is at version `base` (checked in the write
    /// transaction), else [`CommitError::Behind`] and nothing written.
    pub fn commit_at(
        &self,
        base: u64,
        writes: &[Write],
        log_limit: u64,
    ) -> Result<Vec<ModelChange>, CommitError> {
        self.write_txn(|txn| {
            let mut records = txn.open_table(RECORDS)?;
            let mut versions = txn.open_table(RECORD_VERSIONS)?;
            let mut log = txn.open_table(LOG)?;
            let mut meta = txn.open_table(META)?;
            let mut state = read_state(&meta)?;
            if state.version != base {
                return Ok(Err(CommitError::Behind { base }));
            }
            let mut changes = Vec::with_capacity(writes.len());
            for (kind, id, json) in writes {
                state.version += 1;
                put_record(&mut records, *kind, id, json.as_deref())?;
                let key = (kind_name(*kind), id.as_str());
                match json {
                    Some(_) => versions.insert(key, state.version).map(|_| ())?,
                    None => versions.remove(key).map(|_| ())?,
                }
                let change = ModelChange {
                    version: state.version,
                    kind: *kind,
                    id: id.clone(),
                    record: json.clone().map(crate::protocol::Json),
                };
                // A ModelChange always encodes: it holds only strings and integers.
                let bytes = postcard::to_stdvec(&change).unwrap_or_default();
                log.insert(state.version, bytes.as_slice())?;
                changes.push(change);
            }
            let floor = state.version.saturating_sub(log_limit.max(1));
            if floor > state.log_floor {
                log.retain_in(..=floor, |_, _| false)?;
                state.log_floor = floor;
            }
            meta.insert("version", state.version)?;
            meta.insert("log_floor", state.log_floor)?;
            Ok(Ok(changes))
        })?
    }

    /// Each record's version (the model version that last wrote it), where one is kept.
    pub fn record_versions(&self) -> Result<RecordVersions, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = match txn.open_table(RECORD_VERSIONS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(RecordVersions::new()),
            Err(err) => return Err(self.db_error(err)),
        };
        let mut versions = RecordVersions::new();
        for entry in table.iter().map_err(|e| self.db_error(e))? {
            let (key, version) = entry.map_err(|e| self.db_error(e))?;
            let (kind, id) = key.value();
            if let Some(kind) = kind_from_name(kind) {
                versions.insert((kind, id.to_string()), version.value());
            }
        }
        Ok(versions)
    }

    /// The changes after `since`, oldest first, or `None` when the log no longer reaches
    /// back that far (or `since` is ahead of this model).
    pub fn changes_since(&self, since: u64) -> Result<Option<Vec<ModelChange>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let meta = txn.open_table(META).map_err(|e| self.db_error(e))?;
        let state = read_state(&meta).map_err(|e| self.db_error(e))?;
        if since < state.log_floor || since > state.version {
            return Ok(None);
        }
        let log = txn.open_table(LOG).map_err(|e| self.db_error(e))?;
        let mut changes = Vec::new();
        for entry in log.range(since + 1..).map_err(|e| self.db_error(e))? {
            let (version, bytes) = entry.map_err(|e| self.db_error(e))?;
            let change: ModelChange = postcard::from_bytes(bytes.value()).map_err(|err| {
                self.corrupt(format!("change {} does not decode: {err}", version.value()))
            })?;
            changes.push(change);
        }
        Ok(Some(changes))
    }

    /// The number of changes the log holds.
    pub fn log_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let log = txn.open_table(LOG).map_err(|e| self.db_error(e))?;
        log.len().map_err(|e| self.db_error(e))
    }

    /// Applies a batch from the master to a replica in one transaction: optionally clears
    /// every record first (a snapshot), writes the records, and sets the version and the
    /// master's model id.
    pub fn apply_replica(
        &self,
        model_id: u64,
        version: u64,
        clear: bool,
        writes: &[Write],
    ) -> Result<(), StoreError> {
        self.write_txn(|txn| {
            let mut records = txn.open_table(RECORDS)?;
            if clear {
                records.retain(|_, _| false)?;
            }
            for (kind, id, json) in writes {
                put_record(&mut records, *kind, id, json.as_deref())?;
            }
            let mut meta = txn.open_table(META)?;
            meta.insert("model_id", model_id)?;
            meta.insert("version", version)?;
            Ok(())
        })
    }
}

fn read_state(meta: &impl ReadableTable<&'static str, u64>) -> Result<StoreState, redb::Error> {
    let get = |key: &str| -> Result<u64, redb::Error> {
        Ok(meta.get(key)?.map(|v| v.value()).unwrap_or(0))
    };
    Ok(StoreState {
        model_id: get("model_id")?,
        version: get("version")?,
        log_floor: get("log_floor")?,
    })
}

fn put_record(
    records: &mut redb::Table<(&str, &str), &str>,
    kind: EntityKind,
    id: &str,
    json: Option<&str>,
) -> Result<(), redb::Error> {
    let key = (kind_name(kind), id);
    match json {
        Some(json) => {
            records.insert(key, json)?;
        }
        None => {
            records.remove(key)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(id: &str, name: &str) -> Write {
        (
            EntityKind::Edge,
            id.to_string(),
            Some(format!(r#"{{"id":"{id}","name":"{name}"}}"#)),
        )
    }

    #[test]
    fn every_write_raises_the_version_and_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("model.redb")).unwrap();
        let changes = store
            .commit(&[edge("a", "A"), edge("b", "B")], 100)
            .unwrap();
        assert_eq!(
            changes.iter().map(|c| c.version).collect::<Vec<_>>(),
            [1, 2]
        );
        store
            .commit(&[(EntityKind::Edge, "a".into(), None)], 100)
            .unwrap();
        let since = store.changes_since(1).unwrap().unwrap();
        assert_eq!(
            since
                .iter()
                .map(|c| (c.version, c.id.as_str(), c.record.is_some()))
                .collect::<Vec<_>>(),
            [(2, "b", true), (3, "a", false)]
        );
        let (model, state) = store.load().unwrap();
        assert_eq!(state.version, 3);
        assert_eq!(model.edges.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn a_commit_planned_on_an_older_version_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("model.redb")).unwrap();
        store.commit_at(0, &[edge("a", "A")], 100).unwrap();
        let behind = store.commit_at(0, &[edge("b", "B"), edge("c", "C")], 100);
        assert!(matches!(behind, Err(CommitError::Behind { base: 0 })));
        let (model, state) = store.load().unwrap();
        assert_eq!(state.version, 1);
        assert_eq!(model.edges.keys().collect::<Vec<_>>(), ["a"]);
        let changes = store.commit_at(1, &[edge("b", "B")], 100).unwrap();
        assert_eq!(changes[0].version, 2);
    }

    #[test]
    fn the_log_is_truncated_to_its_limit_and_says_when_it_does_not_reach_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("model.redb")).unwrap();
        for i in 0..10 {
            store.commit(&[edge("a", &format!("A{i}"))], 4).unwrap();
        }
        assert_eq!(store.log_len().unwrap(), 4);
        assert_eq!(store.state().unwrap().log_floor, 6);
        assert!(store.changes_since(5).unwrap().is_none());
        assert_eq!(store.changes_since(6).unwrap().unwrap().len(), 4);
        assert_eq!(store.changes_since(10).unwrap().unwrap().len(), 0);
        assert!(
            store.changes_since(11).unwrap().is_none(),
            "ahead of the model"
        );
    }

    #[test]
    fn a_reopened_store_keeps_records_version_and_model_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.redb");
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.ensure_model_id(42).unwrap(), 42);
            store.commit(&[edge("a", "A")], 10).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.ensure_model_id(7).unwrap(), 42);
        let (model, state) = store.load().unwrap();
        assert_eq!(state.version, 1);
        assert_eq!(model.edges["a"].name, "A");
    }

    #[test]
    fn a_replica_snapshot_replaces_everything_in_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("replica.redb")).unwrap();
        store
            .apply_replica(9, 5, false, &[edge("a", "A"), edge("b", "B")])
            .unwrap();
        store.apply_replica(9, 8, true, &[edge("c", "C")]).unwrap();
        let (model, state) = store.load().unwrap();
        assert_eq!(model.edges.keys().collect::<Vec<_>>(), ["c"]);
        assert_eq!((state.model_id, state.version), (9, 8));
    }
}
