//! Grants on disk: who runs each edge location's modules, under which epoch.
//!
//! [`Grants`] is what the control shells need of a store; redb implements it here (one
//! master, or an edge recording what it was granted), etcd in a cluster. A master issues a
//! grant only by [`Grants::issue`], a compare-and-set on the stored one that also demands a
//! higher epoch, so however many deciders race, no two grants of a location share an epoch.

use crate::identity::{EdgeId, Epoch, UnitId};
use std::collections::BTreeMap;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Store, StoreError};
use crate::control::ControlState;

/// Edge location id to its postcard [`ControlState`].
const CONTROL: TableDefinition<&str, &[u8]> = TableDefinition::new("control");
/// A site pair's grant, per location: on the master the witness's last issue, on a node
/// the last it took.
const PAIR_GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("pair_grants");
/// On a node: the witness's proofs of the grant it stored (passed on to its peer with it,
/// also after a restart).
const PAIR_PROOFS: TableDefinition<&str, &[u8]> = TableDefinition::new("pair_proofs");

/// Why a grant was not issued. Either way it must not be acted on.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The stored grant is not the one the decider based its decision on (another decider
    /// issued one meanwhile), or the new grant does not raise its epoch.
    #[error(
        "grant {grant:?} of {unit} not issued: the stored grant is {stored:?}, not {expected:?}"
    )]
    Conflict {
        /// The edge location.
        unit: UnitId,
        /// The grant the decider expected to replace.
        expected: ControlState,
        /// The grant it tried to issue.
        grant: ControlState,
        /// What is stored.
        stored: ControlState,
        /// For a master's grant stored: whether it names this master.
        stored_here: bool,
    },
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IssueError {
    /// The stored grant, when the store said what it holds.
    pub fn stored(&self) -> Option<ControlState> {
        self.stored_held().map(|held| held.grant)
    }

    /// The stored grant and whether it names this master, when the store said.
    pub fn stored_held(&self) -> Option<Held> {
        match self {
            IssueError::Conflict {
                stored,
                stored_here,
                ..
            } => Some(Held {
                grant: *stored,
                here: *stored_here,
            }),
            IssueError::Store(_) => None,
        }
    }
}

/// An answer of a [`Grants`] store, later.
pub type Pending<T> = futures::future::BoxFuture<'static, T>;

pub use crate::control::Held;

/// What the control shells need of a store of grants. Asynchronous, because the stores
/// are a file (redb, written on a blocking thread) or a network service (etcd).
pub trait Grants: Send + Sync {
    /// Every edge location's stored grant (a location never granted is absent: it is the
    /// edge's, at epoch 0).
    fn grants(self: Arc<Self>) -> Pending<Result<BTreeMap<UnitId, Held>, StoreError>>;

    /// Stores `grant` for `unit` if the stored grant is `expected` (absent counts as the
    /// default) and `grant`'s epoch is above it; durable when it answers `Ok`. A master's
    /// grant names this master when `here`, else the master the expected grant names.
    fn issue(
        self: Arc<Self>,
        unit: UnitId,
        expected: ControlState,
        grant: ControlState,
        here: bool,
    ) -> Pending<Result<(), IssueError>>;

    /// Whether `grant` is still the one stored for `unit` (a conflict naming what is, if
    /// not). A master alone wrote it and nobody else: it is.
    fn confirm(
        self: Arc<Self>,
        _unit: UnitId,
        _grant: ControlState,
    ) -> Pending<Result<(), IssueError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Where a site pair's witness stores its grants: a master's redb file, or etcd among
/// several masters (where a compare-and-set keeps two witnesses from both deciding).
pub trait PairGrants: Send + Sync {
    /// The grant stored last for `location`, if any.
    fn load_pair(
        self: Arc<Self>,
        location: UnitId,
    ) -> Pending<Result<Option<PairGrant>, StoreError>>;

    /// Stores `grant` for `location` if the stored one is still `expected` (none: none
    /// stored), with this master's claim of the modules when it names the master
    /// (`running`) and without it otherwise; durable when it answers `Ok`.
    fn issue_pair(
        self: Arc<Self>,
        location: UnitId,
        expected: Option<PairGrant>,
        grant: PairGrant,
    ) -> Pending<Result<(), StoreError>>;
}

use crate::control::pair::PairGrant;

impl PairGrants for Store {
    fn load_pair(
        self: Arc<Self>,
        location: UnitId,
    ) -> Pending<Result<Option<PairGrant>, StoreError>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || self.pair_grant(location.as_str()))
                .await
                .map_err(|err| StoreError::Stopped(err.to_string()))?
        })
    }

    /// A master alone is the only witness: what it stored is what it expects.
    fn issue_pair(
        self: Arc<Self>,
        location: UnitId,
        _expected: Option<PairGrant>,
        grant: PairGrant,
    ) -> Pending<Result<(), StoreError>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || self.set_pair_grant(location.as_str(), &grant))
                .await
                .map_err(|err| StoreError::Stopped(err.to_string()))?
        })
    }
}

impl Grants for Store {
    fn grants(self: Arc<Self>) -> Pending<Result<BTreeMap<UnitId, Held>, StoreError>> {
        Box::pin(async move {
            let states = tokio::task::spawn_blocking(move || self.control_states())
                .await
                .map_err(|err| StoreError::Stopped(err.to_string()))??;
            Ok(states
                .into_iter()
                .map(|(unit, grant)| (UnitId::new(unit), Held { grant, here: true }))
                .collect())
        })
    }

    /// A master alone holds every master's grant: `here` changes nothing. Grants asked
    /// for at once are stored in one transaction (one write to disk for a thousand edges
    /// linking together), each compared as if alone.
    fn issue(
        self: Arc<Self>,
        unit: UnitId,
        expected: ControlState,
        grant: ControlState,
        _here: bool,
    ) -> Pending<Result<(), IssueError>> {
        Box::pin(async move {
            let queue = self
                .grant_batches
                .get_or_init(|| GrantQueue::start(Arc::downgrade(&self)))
                .clone();
            let (answer, answered) = tokio::sync::oneshot::channel();
            let job = GrantJob {
                unit,
                expected,
                grant,
                answer,
            };
            let stopped = || IssueError::Store(StoreError::Stopped("the grant writer".into()));
            queue.0.send(job).await.map_err(|_| stopped())?;
            answered.await.map_err(|_| stopped())?
        })
    }
}

/// A grant waiting to be stored, and who waits for it.
pub(super) struct GrantJob {
    unit: UnitId,
    expected: ControlState,
    grant: ControlState,
    answer: tokio::sync::oneshot::Sender<Result<(), IssueError>>,
}

/// The queue of a store's grant writer.
#[derive(Clone)]
pub(super) struct GrantQueue(tokio::sync::mpsc::Sender<GrantJob>);

/// Grants one transaction stores at most.
const GRANTS_PER_TXN: usize = 1024;

impl GrantQueue {
    /// Starts the writer: it takes every grant waiting, stores them in one transaction,
    /// and answers each. It ends with the store.
    fn start(store: std::sync::Weak<Store>) -> GrantQueue {
        let (queue, mut jobs) = tokio::sync::mpsc::channel::<GrantJob>(GRANTS_PER_TXN);
        tokio::spawn(async move {
            while let Some(first) = jobs.recv().await {
                let mut batch = vec![first];
                while batch.len() < GRANTS_PER_TXN
                    && let Ok(job) = jobs.try_recv()
                {
                    batch.push(job);
                }
                let Some(store) = store.upgrade() else {
                    return;
                };
                let asked: Vec<(UnitId, ControlState, ControlState)> = batch
                    .iter()
                    .map(|job| (job.unit.clone(), job.expected, job.grant))
                    .collect();
                let stored = tokio::task::spawn_blocking(move || store.issue_grants(&asked))
                    .await
                    .map_err(|err| StoreError::Stopped(err.to_string()))
                    .and_then(|stored| stored);
                match stored {
                    Ok(answers) => {
                        for (job, answer) in batch.into_iter().zip(answers) {
                            let _ = job.answer.send(answer);
                        }
                    }
                    Err(err) => {
                        let text = err.to_string();
                        for job in batch {
                            let _ = job
                                .answer
                                .send(Err(IssueError::Store(StoreError::Stopped(text.clone()))));
                        }
                    }
                }
            }
        });
        GrantQueue(queue)
    }
}

impl Store {
    /// [`Grants::issue`], on this thread (it blocks on the file).
    pub fn issue_grant(
        &self,
        unit: &str,
        expected: ControlState,
        grant: ControlState,
    ) -> Result<(), IssueError> {
        let mut answers = self.issue_grants(&[(UnitId::new(unit), expected, grant)])?;
        answers.pop().unwrap_or(Ok(()))
    }

    /// Several [`issue_grant`](Self::issue_grant)s in one durable transaction, in order
    /// (a later one of the same unit compares with what an earlier one stored); each
    /// answered on its own. An error of the file fails them all (nothing stored).
    pub fn issue_grants(
        &self,
        asked: &[(UnitId, ControlState, ControlState)],
    ) -> Result<Vec<Result<(), IssueError>>, StoreError> {
        let outcomes = self.write_txn(|txn| {
            let mut table = txn.open_table(CONTROL)?;
            let mut outcomes = Vec::with_capacity(asked.len());
            for (unit, expected, grant) in asked {
                let stored = match table.get(unit.as_str())? {
                    Some(bytes) => postcard::from_bytes(bytes.value()).ok(),
                    None => Some(ControlState::default()),
                };
                if stored == Some(*expected) && grant.epoch > expected.epoch {
                    table.insert(unit.as_str(), encode(*grant).as_slice())?;
                    outcomes.push(None);
                } else {
                    outcomes.push(Some(stored));
                }
            }
            Ok(outcomes)
        })?;
        Ok(asked
            .iter()
            .zip(outcomes)
            .map(|((unit, expected, grant), outcome)| match outcome {
                None => Ok(()),
                Some(Some(stored)) => Err(IssueError::Conflict {
                    unit: unit.clone(),
                    expected: *expected,
                    grant: *grant,
                    stored,
                    stored_here: true,
                }),
                Some(None) => Err(IssueError::Store(
                    self.corrupt(format!("control state of {unit} does not decode")),
                )),
            })
            .collect())
    }
}

/// What a master of a cluster says in the shared store beside grants: that it runs a
/// unit (a claim, on its lease, which others wait to see gone before they start it), and
/// that it holds an edge's link (so that no other master fails the edge over).
pub trait Claims: Send + Sync {
    /// Claims `unit` under this master's grant of `epoch`; refused when the grant is not
    /// that, or another master's claim stands, or the lease is gone.
    fn claim(self: Arc<Self>, unit: UnitId, epoch: Epoch) -> Pending<Result<(), StoreError>>;

    /// Withdraws this master's claim of `unit`, if it has one.
    fn release(self: Arc<Self>, unit: UnitId) -> Pending<Result<(), StoreError>>;

    /// Says this master holds `edge`'s link, the one of `generation` (refused when the
    /// lease is gone).
    fn link(self: Arc<Self>, edge: EdgeId, generation: u64) -> Pending<Result<(), StoreError>>;

    /// Withdraws that, if the link key is still that link's (a newer link of the same edge
    /// keeps its own).
    fn unlink(self: Arc<Self>, edge: EdgeId, generation: u64) -> Pending<Result<(), StoreError>>;

    /// Withdraws a link key of this master's for `edge`, whatever its link (one an unlink
    /// that failed left while the master holds no link of the edge).
    fn unlink_stale(self: Arc<Self>, edge: EdgeId) -> Pending<Result<(), StoreError>>;
}

fn encode(state: ControlState) -> Vec<u8> {
    // A ControlState always encodes: an enum and an integer.
    postcard::to_stdvec(&state).unwrap_or_default()
}

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

    /// Stores what an edge was granted, or claimed itself, durably. (An edge records;
    /// only a master issues, by [`Grants::issue`].)
    pub fn set_control_state(&self, edge: &str, state: ControlState) -> Result<(), StoreError> {
        let bytes = encode(state);
        self.write_txn(|txn| {
            txn.open_table(CONTROL)?.insert(edge, bytes.as_slice())?;
            Ok(())
        })
    }
}

impl Store {
    /// A site pair's grant stored last for `location`, if any.
    pub fn pair_grant(
        &self,
        location: &str,
    ) -> Result<Option<crate::control::pair::PairGrant>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = match txn.open_table(PAIR_GRANTS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(err) => return Err(self.db_error(err)),
        };
        let Some(bytes) = table.get(location).map_err(|e| self.db_error(e))? else {
            return Ok(None);
        };
        postcard::from_bytes(bytes.value())
            .map(Some)
            .map_err(|err| self.corrupt(format!("pair grant of {location} does not decode: {err}")))
    }

    /// The witness's proofs of the pair grant a node stored for `location`.
    pub fn pair_proofs(
        &self,
        location: &str,
    ) -> Result<Vec<crate::control::pair::GrantProof>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = match txn.open_table(PAIR_PROOFS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(err) => return Err(self.db_error(err)),
        };
        let Some(bytes) = table.get(location).map_err(|e| self.db_error(e))? else {
            return Ok(Vec::new());
        };
        postcard::from_bytes(bytes.value())
            .map_err(|err| self.corrupt(format!("pair proofs of {location} do not decode: {err}")))
    }

    /// Stores, on a node, a pair grant for `location` with the witness's proofs of it, in
    /// one transaction.
    pub fn set_proven_pair_grant(
        &self,
        location: &str,
        grant: &crate::control::pair::PairGrant,
        proofs: &[crate::control::pair::GrantProof],
    ) -> Result<(), StoreError> {
        let grant = postcard::to_stdvec(grant)
            .map_err(|err| self.corrupt(format!("pair grant does not encode: {err}")))?;
        let proofs = postcard::to_stdvec(proofs)
            .map_err(|err| self.corrupt(format!("pair proofs do not encode: {err}")))?;
        self.write_txn(|txn| {
            txn.open_table(PAIR_GRANTS)?
                .insert(location, grant.as_slice())?;
            txn.open_table(PAIR_PROOFS)?
                .insert(location, proofs.as_slice())?;
            Ok(())
        })
    }

    /// Stores a site pair's grant for `location`, durably.
    pub fn set_pair_grant(
        &self,
        location: &str,
        grant: &crate::control::pair::PairGrant,
    ) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(grant)
            .map_err(|err| self.corrupt(format!("pair grant does not encode: {err}")))?;
        self.write_txn(|txn| {
            txn.open_table(PAIR_GRANTS)?
                .insert(location, bytes.as_slice())?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Owner;

    fn grant(owner: Owner, epoch: u64) -> ControlState {
        ControlState {
            owner,
            epoch: Epoch(epoch),
        }
    }

    #[test]
    fn a_grant_is_issued_only_over_the_expected_one_and_with_a_higher_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.redb")).unwrap();
        let start = ControlState::default();
        store
            .issue_grant("e", start, grant(Owner::Master, 1))
            .unwrap();
        // A second decider that read the same starting grant loses.
        let lost = store
            .issue_grant("e", start, grant(Owner::Edge, 1))
            .unwrap_err();
        assert_eq!(lost.stored(), Some(grant(Owner::Master, 1)), "{lost}");
        // An epoch that does not rise is never issued, even over the right grant.
        let same = store
            .issue_grant("e", grant(Owner::Master, 1), grant(Owner::Edge, 1))
            .unwrap_err();
        assert_eq!(same.stored(), Some(grant(Owner::Master, 1)));
        store
            .issue_grant("e", grant(Owner::Master, 1), grant(Owner::Edge, 2))
            .unwrap();
        assert_eq!(store.control_states().unwrap()["e"], grant(Owner::Edge, 2));
    }

    /// Grants asked for at once are stored together, each compared on its own: of two
    /// over the same expected grant exactly one lands, and every other unit's lands.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grants_asked_at_once_are_stored_together_each_compared_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("t.redb")).unwrap());
        let start = ControlState::default();
        let mut asked = Vec::new();
        for unit in 0..300 {
            let store = store.clone();
            asked.push(tokio::spawn(async move {
                store
                    .issue(
                        UnitId::new(format!("u{unit}")),
                        start,
                        grant(Owner::Master, 1),
                        true,
                    )
                    .await
            }));
        }
        let (one, two) = tokio::join!(
            store
                .clone()
                .issue("twice".into(), start, grant(Owner::Master, 1), true),
            store
                .clone()
                .issue("twice".into(), start, grant(Owner::Edge, 1), true),
        );
        for answer in asked {
            answer.await.unwrap().unwrap();
        }
        assert!(one.is_ok() != two.is_ok(), "{one:?} {two:?}");
        let states = store.control_states().unwrap();
        assert_eq!(states.len(), 301);
        let landed = if one.is_ok() {
            Owner::Master
        } else {
            Owner::Edge
        };
        assert_eq!(states["twice"], grant(landed, 1));
    }

    #[test]
    fn racing_deciders_never_share_an_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(&dir.path().join("t.redb")).unwrap());
        let issued = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for decider in 0..4 {
                let (store, issued) = (&store, &issued);
                scope.spawn(move || {
                    let owner = if decider % 2 == 0 {
                        Owner::Master
                    } else {
                        Owner::Edge
                    };
                    for _ in 0..50 {
                        // Each decider decides from what it read, as a shell does.
                        let read = store
                            .control_states()
                            .unwrap()
                            .get("e")
                            .copied()
                            .unwrap_or_default();
                        let next = ControlState {
                            owner,
                            epoch: read.epoch.next(),
                        };
                        if store.issue_grant("e", read, next).is_ok() {
                            issued.lock().unwrap().push(next);
                        }
                    }
                });
            }
        });
        let mut epochs: Vec<Epoch> = issued
            .into_inner()
            .unwrap()
            .iter()
            .map(|g| g.epoch)
            .collect();
        let count = epochs.len();
        epochs.sort_unstable();
        epochs.dedup();
        assert_eq!(epochs.len(), count, "an epoch was issued twice");
        assert_eq!(
            store.control_states().unwrap()["e"].epoch,
            *epochs.last().unwrap()
        );
    }
}
