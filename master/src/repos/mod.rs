//! Driver repositories on the master: reading a folder or a git working copy into a
//! commit ([`scan`]), keeping every commit read (blobs by content hash, manifests, the
//! head) in the model's database, checking that a new commit's drivers compile before
//! anything runs it, and telling the edges ([`push`]).
//!
//! A new commit is refused when one of the repository's drivers does not compile: the
//! old commit keeps running everywhere, and the refusal is in the API's answer and the
//! audit log. A repository's first commit is taken as it is (there is nothing older to
//! keep); a driver of it that does not compile faults its modules.

mod push;
pub mod root;
pub mod scan;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tether_common::code::{Hash, RepoCode, short};
use tether_common::model::{EdgeRecord, Model, ModelError, RepositoryRecord};
use tether_common::protocol::{AuditRecord, CodeAudit, ControlOwner, EntityKind, RepositoryAction};
use tether_common::runtime::Runtime;
use tether_common::store::{CommitCode, SharedCode};
use tokio::sync::watch;

use crate::model::{ModelService, WriteError};
pub use push::push_code;
pub use root::RepositoriesRoot;
use scan::Scanned;

/// Why a pull or reset did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// No such repository, or no such commit (404).
    #[error("{0}")]
    NotFound(String),
    /// The repository cannot be read: a missing folder, a git error (422).
    #[error("{0}")]
    Unreadable(String),
    /// A driver of the new commit does not compile; the old commit keeps running (422).
    #[error("{0}")]
    Refused(String),
    /// The database failed (500).
    #[error("{0}")]
    Internal(String),
}

impl From<WriteError> for RepoError {
    fn from(err: WriteError) -> Self {
        RepoError::Internal(err.to_string())
    }
}

/// What a pull or reset did.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    /// Repository id.
    pub repository: String,
    /// The commit it is at now.
    pub commit: String,
    /// The commit before.
    pub previous: Option<String>,
    /// Whether the commit changed.
    pub changed: bool,
    /// Files added, changed or removed.
    pub files: Vec<String>,
    /// Drivers whose script changed (their modules reload in place).
    pub drivers: Vec<String>,
}

/// The repositories, their code, and the edges' view of it.
pub struct Repositories {
    model: Arc<ModelService>,
    runtime: Runtime,
    /// Where repositories may be.
    root: RepositoriesRoot,
    /// One pull or reset at a time.
    updating: tokio::sync::Mutex<()>,
    /// Why each repository last moved, for the updates sent to edges.
    actions: Mutex<HashMap<String, RepositoryAction>>,
    /// Raised whenever a repository moves; each edge's push task follows it.
    generation: watch::Sender<u64>,
    /// In a cluster: the code every master shares (each commit is put there before its
    /// repository's record names it).
    shared: Option<Arc<dyn SharedCode>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|err| Err(format!("the task failed: {err}")))
}

impl Repositories {
    /// Loads the code of every repository's head into `runtime`, then reads each
    /// repository that has none yet (a new data dir, an import).
    pub async fn open(
        model: Arc<ModelService>,
        runtime: Runtime,
        root: RepositoriesRoot,
        shared: Option<Arc<dyn SharedCode>>,
    ) -> anyhow::Result<Arc<Repositories>> {
        tracing::info!(root = %root.path().display(), "driver repositories are read from inside this folder only");
        let store = model.store();
        let code = tokio::task::spawn_blocking(move || store.load_code()).await??;
        runtime.set_code(Arc::new(code));
        let repos = Arc::new(Repositories {
            model,
            runtime,
            root,
            updating: tokio::sync::Mutex::new(()),
            actions: Mutex::default(),
            generation: watch::channel(0).0,
            shared,
        });
        let (model, _) = repos.model.snapshot();
        for id in model.repositories.keys() {
            if let Err(err) = repos.ensure(id).await {
                tracing::error!(repository = %id, "the repository's code is not loaded: {err}");
            }
        }
        Ok(repos)
    }

    /// Makes sure a repository has code and that its record names the head: reads it
    /// when it has no head yet, or its record names no commit (a new repository, a
    /// seeded or imported one).
    pub async fn ensure(&self, id: &str) -> Result<(), RepoError> {
        let head = self.runtime.code().repo(id).map(|r| r.commit.clone());
        let named = self.record(id)?.commit;
        match (head, named) {
            // In a cluster the record names the commit every master runs.
            (_, Some(named)) if self.shared.is_some() => match self.follow(id, &named).await {
                Ok(()) => Ok(()),
                Err(RepoError::NotFound(_)) => self.pull(id).await.map(|_| ()),
                Err(err) => Err(err),
            },
            (Some(head), Some(_)) => self.record_commit(id, &head).await,
            _ => self.pull(id).await.map(|_| ()),
        }
    }

    /// Among several masters: runs the commit each repository's record names, fetched
    /// from the shared code, whenever another master moves a repository. Until the
    /// model goes.
    pub async fn follow_cluster(self: Arc<Self>) {
        let mut version = self.model.watch_version();
        loop {
            let (model, _) = self.model.snapshot();
            let mut behind = false;
            for (id, record) in &model.repositories {
                let Some(named) = &record.commit else {
                    continue;
                };
                if let Err(err) = self.follow(id, named).await {
                    tracing::warn!(repository = %id, "cannot run the commit another master read: {err}");
                    behind = true;
                }
            }
            let changed = match behind {
                true => tokio::time::timeout(Duration::from_secs(2), version.changed())
                    .await
                    .unwrap_or(Ok(())),
                false => version.changed().await,
            };
            if changed.is_err() {
                return;
            }
        }
    }

    /// Runs `commit` of repository `id` from the shared code, unless it runs already.
    async fn follow(&self, id: &str, commit: &str) -> Result<(), RepoError> {
        if self.runtime.code().repo(id).map(|r| r.commit.as_str()) == Some(commit) {
            return Ok(());
        }
        let _one = self.updating.lock().await;
        // A pull here may have moved the repository while this waited: follow only what
        // the record still names.
        if self.runtime.code().repo(id).map(|r| r.commit.as_str()) == Some(commit)
            || self.record(id)?.commit.as_deref() != Some(commit)
        {
            return Ok(());
        }
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let fetched = shared
            .clone()
            .get(id.to_string(), commit.to_string())
            .await
            .map_err(|err| RepoError::Internal(err.to_string()))?
            .ok_or_else(|| {
                RepoError::NotFound(format!(
                    "repository {id}: no master has shared commit {}",
                    short(commit)
                ))
            })?;
        let new = RepoCode::new(commit.to_string(), fetched.files.clone(), |h| {
            fetched.blobs.get(h).cloned()
        })
        .map_err(RepoError::Internal)?;
        self.keep(id, &new, fetched.blobs).await?;
        let code = self.runtime.code();
        self.runtime.set_code(Arc::new(code.with(id, new)));
        tracing::info!(repository = %id, commit = short(commit), "running the commit another master read");
        self.moved(id, RepositoryAction::Pull);
        Ok(())
    }

    /// Stores a commit in this master's database and makes it the head there.
    async fn keep(
        &self,
        id: &str,
        new: &RepoCode,
        blobs: HashMap<Hash, Vec<u8>>,
    ) -> Result<(), RepoError> {
        let store = self.model.store();
        let (repo, commit, files) = (id.to_string(), new.commit.clone(), new.files.clone());
        blocking(move || {
            let hashes: Vec<Hash> = blobs.keys().copied().collect();
            let missing = store.missing_blobs(&hashes).map_err(|e| e.to_string())?;
            let fresh: Vec<(Hash, Vec<u8>)> = blobs
                .into_iter()
                .filter(|(h, _)| missing.contains(h))
                .collect();
            store.put_blobs(&fresh).map_err(|e| e.to_string())?;
            store
                .put_commit(&repo, &commit, &files, true)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(RepoError::Internal)
    }

    /// Tells the edges' push tasks that repository `id` moved, and why.
    fn moved(&self, id: &str, action: RepositoryAction) {
        self.actions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), action);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Raised whenever a repository moves.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Why a repository last moved (`CatchUp` when it has not moved since boot).
    pub fn last_action(&self, id: &str) -> RepositoryAction {
        self.actions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .unwrap_or(RepositoryAction::CatchUp)
    }

    /// The model service (for the push tasks).
    pub fn model(&self) -> &Arc<ModelService> {
        &self.model
    }

    /// The code the master serves.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    fn record(&self, id: &str) -> Result<RepositoryRecord, RepoError> {
        let (model, _) = self.model.snapshot();
        model
            .repositories
            .get(id)
            .cloned()
            .ok_or_else(|| RepoError::NotFound(format!("no repository {id}")))
    }

    /// Where repositories may be.
    pub fn root(&self) -> &RepositoriesRoot {
        &self.root
    }

    /// The folder of a repository, if its path is inside the root.
    fn folder(&self, id: &str, path: &str) -> Result<PathBuf, RepoError> {
        self.root
            .folder(path)
            .map_err(|err| RepoError::Unreadable(format!("repository {id}: {err}")))
    }

    /// Reads the repository's newest commit (a git working copy is pulled from its
    /// upstream first, when it has one) and runs it.
    pub async fn pull(&self, id: &str) -> Result<Moved, RepoError> {
        let _one = self.updating.lock().await;
        let record = self.record(id)?;
        let folder = self.folder(id, &record.path)?;
        let max = self.root.max_bytes;
        let scanned = blocking(move || {
            if scan::is_git(&folder) {
                scan::git_pull(&folder)?;
            }
            scan::scan(&folder, None, max)
        })
        .await
        .map_err(|err| RepoError::Unreadable(format!("repository {id}: {err}")))?;
        self.apply(id, scanned, RepositoryAction::Pull, true).await
    }

    /// Reads a repository that is being created, or moved to another folder, before its
    /// record is written: the answer is the commit the record should name.
    pub async fn adopt(&self, id: &str, path: &str) -> Result<String, RepoError> {
        let _one = self.updating.lock().await;
        let folder = self.folder(id, path)?;
        let max = self.root.max_bytes;
        let scanned = blocking(move || scan::scan(&folder, None, max))
            .await
            .map_err(|err| RepoError::Unreadable(format!("repository {id}: {err}")))?;
        let moved = self
            .apply(id, scanned, RepositoryAction::Pull, false)
            .await?;
        Ok(moved.commit)
    }

    /// Runs the repository at `commit`: any commit of a git working copy (read from git,
    /// the working copy is left alone), or a commit of a folder the master read before.
    pub async fn reset(&self, id: &str, commit: &str) -> Result<Moved, RepoError> {
        let _one = self.updating.lock().await;
        let record = self.record(id)?;
        let folder = self.folder(id, &record.path)?;
        if scan::is_git(&folder) {
            let at = commit.to_string();
            let max = self.root.max_bytes;
            let scanned = blocking(move || scan::scan(&folder, Some(&at), max))
                .await
                .map_err(|err| RepoError::NotFound(format!("repository {id}: {err}")))?;
            return self.apply(id, scanned, RepositoryAction::Reset, true).await;
        }
        let store = self.model.store();
        let (repo, at) = (id.to_string(), commit.to_string());
        let stored = blocking(move || {
            let Some(files) = store.manifest(&repo, &at).map_err(|e| e.to_string())? else {
                return Ok(None);
            };
            let hashes: Vec<Hash> = files.iter().map(|f| f.hash).collect();
            let blobs = store.blobs(&hashes).map_err(|e| e.to_string())?;
            Ok(Some(Scanned {
                commit: at,
                files,
                blobs: blobs.into_iter().collect(),
            }))
        })
        .await
        .map_err(RepoError::Internal)?;
        let scanned = stored.ok_or_else(|| {
            RepoError::NotFound(format!(
                "repository {id} is a folder, and the master has never read it at commit {commit}"
            ))
        })?;
        self.apply(id, scanned, RepositoryAction::Reset, true).await
    }

    /// Checks a new commit, stores it, makes it the head, and lets everything run it;
    /// with `write_record`, the repository's record is set to name it (else the caller
    /// writes the record).
    async fn apply(
        &self,
        id: &str,
        scanned: Scanned,
        action: RepositoryAction,
        write_record: bool,
    ) -> Result<Moved, RepoError> {
        let code = self.runtime.code();
        let old = code.repo(id).cloned();
        let blobs: HashMap<Hash, Vec<u8>> = scanned.blobs.into_iter().collect();
        let new = RepoCode::new(scanned.commit.clone(), scanned.files.clone(), |h| {
            blobs.get(h).cloned()
        })
        .map_err(RepoError::Internal)?;
        let previous = old.as_ref().map(|o| o.commit.clone());
        let (model, _) = self.model.snapshot();
        let moved = Moved {
            repository: id.to_string(),
            commit: new.commit.clone(),
            previous: previous.clone(),
            changed: previous.as_deref() != Some(new.commit.as_str()),
            files: changed_files(old.as_ref(), &new),
            drivers: changed_drivers(&model, id, old.as_ref(), &new),
        };
        if !moved.changed {
            if write_record {
                self.record_commit(id, &new.commit).await?;
            }
            return Ok(moved);
        }
        if old.is_some()
            && let Err(errors) = self.check_drivers(&model, id, &new).await
        {
            let reason = format!(
                "repository {id}: commit {} refused, {} keeps running: {errors}",
                short(&new.commit),
                previous.as_deref().map(short).unwrap_or("nothing")
            );
            tracing::warn!("{reason}");
            self.audit(id, previous, &new.commit, true, reason.clone())
                .await;
            return Err(RepoError::Refused(reason));
        }
        if let Some(shared) = &self.shared {
            // The other masters fetch it once the record names it.
            let code = CommitCode {
                files: new.files.clone(),
                blobs: blobs.clone(),
            };
            shared
                .clone()
                .put(id.to_string(), new.commit.clone(), code)
                .await
                .map_err(|err| {
                    RepoError::Internal(format!(
                        "repository {id}: commit {} not shared with the other masters, so not run: {err}",
                        short(&new.commit)
                    ))
                })?;
        }
        self.keep(id, &new, blobs).await?;
        self.runtime.set_code(Arc::new(code.with(id, new)));
        // The model's commit changes: control reconciles, and the modules using a changed
        // driver reload.
        if write_record {
            self.record_commit(id, &moved.commit).await?;
        }
        let reason = format!(
            "repository {id}: {} {} -> {} ({} file(s) changed; drivers changed: {})",
            match action {
                RepositoryAction::Reset => "reset",
                _ => "pulled",
            },
            previous.as_deref().map(short).unwrap_or("nothing"),
            short(&moved.commit),
            moved.files.len(),
            if moved.drivers.is_empty() {
                "none".to_string()
            } else {
                moved.drivers.join(", ")
            }
        );
        tracing::info!("{reason}");
        // A repository's first read changes no running code: only moves are audited.
        if previous.is_some() {
            self.audit(id, previous, &moved.commit, false, reason).await;
        }
        self.moved(id, action);
        Ok(moved)
    }

    /// Every driver of the repository must be in the new commit and compile there.
    async fn check_drivers(&self, model: &Model, id: &str, new: &RepoCode) -> Result<(), String> {
        let mut scripts = Vec::new();
        let mut errors = Vec::new();
        for driver in model.drivers.values().filter(|d| d.repository == id) {
            match new.text(&driver.file) {
                Ok(source) => scripts.push((driver.id.clone(), driver.file.clone(), source)),
                Err(err) => errors.push(format!("driver {}: {err}", driver.id)),
            }
        }
        let runtime = self.runtime.clone();
        let compiled = blocking(move || {
            Ok(scripts
                .into_iter()
                .filter_map(|(driver, file, source)| {
                    runtime
                        .check_script(&source)
                        .err()
                        .map(|err| format!("driver {driver} ({file}): {err}"))
                })
                .collect::<Vec<_>>())
        })
        .await?;
        errors.extend(compiled);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    async fn audit(&self, id: &str, from: Option<String>, to: &str, refused: bool, reason: String) {
        let record = AuditRecord {
            time_ms: now_ms(),
            edge: Default::default(),
            from: ControlOwner::Master,
            to: ControlOwner::Master,
            epoch: Default::default(),
            reason,
            code: Some(CodeAudit {
                repository: id.to_string(),
                from,
                to: to.to_string(),
                module: None,
                refused,
            }),
        };
        self.model
            .store()
            .record_audits(vec![record], crate::control::AUDIT_KEEP)
            .await;
    }

    /// Sets the repository record's commit, if it differs.
    async fn record_commit(&self, id: &str, commit: &str) -> Result<(), RepoError> {
        let commit = commit.to_string();
        let id = id.to_string();
        self.model
            .write(|model| {
                let Some(record) = model.repositories.get(&id) else {
                    return Ok(Vec::new());
                };
                let record = RepositoryRecord {
                    commit: Some(commit.clone()),
                    ..record.clone()
                };
                Ok(vec![write(EntityKind::Repository, &id, &record)?])
            })
            .await?;
        Ok(())
    }

    /// Records the code an edge reported running, in its edge record.
    pub async fn record_edge_commit(&self, edge: &str, commit: Option<String>) {
        // Most links come up on the commit already recorded: no write at all, not even
        // the model copy a write makes (a storm of thousands of edges would queue on it).
        let (model, _) = self.model.snapshot();
        if model
            .edges
            .get(edge)
            .is_none_or(|record| record.commit == commit)
        {
            return;
        }
        let edge = edge.to_string();
        let written = self
            .model
            .write(|model| {
                let Some(record) = model.edges.get(&edge) else {
                    return Ok(Vec::new());
                };
                let record = EdgeRecord {
                    commit: commit.clone(),
                    ..record.clone()
                };
                Ok(vec![write(EntityKind::Edge, &edge, &record)?])
            })
            .await;
        if let Err(err) = written {
            tracing::error!(edge = %edge, "cannot record the edge's commit: {err}");
        }
    }
}

fn write<R: Serialize>(
    kind: EntityKind,
    id: &str,
    record: &R,
) -> Result<tether_common::store::Write, ModelError> {
    let json = serde_json::to_string(record).map_err(|err| ModelError::Invalid(err.to_string()))?;
    Ok((kind, id.to_string(), Some(json)))
}

/// The paths whose content differs between two commits.
fn changed_files(old: Option<&RepoCode>, new: &RepoCode) -> Vec<String> {
    let old_files: HashMap<&str, Hash> = old
        .map(|o| o.files.iter().map(|f| (f.path.as_str(), f.hash)).collect())
        .unwrap_or_default();
    let mut changed: Vec<String> = new
        .files
        .iter()
        .filter(|f| old_files.get(f.path.as_str()) != Some(&f.hash))
        .map(|f| f.path.clone())
        .collect();
    changed.extend(
        old_files
            .keys()
            .filter(|path| new.hash(path).is_none())
            .map(|path| path.to_string()),
    );
    changed.sort();
    changed
}

/// The drivers of repository `id` whose script differs between two commits.
fn changed_drivers(model: &Model, id: &str, old: Option<&RepoCode>, new: &RepoCode) -> Vec<String> {
    model
        .drivers
        .values()
        .filter(|d| d.repository == id)
        .filter(|d| old.and_then(|o| o.hash(&d.file)) != new.hash(&d.file))
        .map(|d| d.id.clone())
        .collect()
}
