//! Grants on disk: who runs each edge location's modules, under which epoch.
//!
//! [`Grants`] is what the control shells need of a store; redb implements it here (one
//! master, or an edge recording what it was granted), etcd in a cluster. A master issues a
//! grant only by [`Grants::issue`], a compare-and-set on the stored one that also demands a
//! higher epoch, so however many deciders race, no two grants of a location share an epoch.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Store, StoreError};
use crate::control::ControlState;

/// Edge location id to its postcard [`ControlState`].
const CONTROL: TableDefinition<&str, &[u8]> = TableDefinition::new("control");

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
        unit: String,
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
    fn grants(self: Arc<Self>) -> Pending<Result<BTreeMap<String, Held>, StoreError>>;

    /// Stores `grant` for `unit` if the stored grant is `expected` (absent counts as the
    /// default) and `grant`'s epoch is above it; durable when it answers `Ok`. A master's
    /// grant names this master when `here`, else the master the expected grant names.
    fn issue(
        self: Arc<Self>,
        unit: String,
        expected: ControlState,
        grant: ControlState,
        here: bool,
    ) -> Pending<Result<(), IssueError>>;

    /// Whether `grant` is still the one stored for `unit` (a conflict naming what is, if
    /// not). A master alone wrote it and nobody else: it is.
    fn confirm(
        self: Arc<Self>,
        _unit: String,
        _grant: ControlState,
    ) -> Pending<Result<(), IssueError>> {
        Box::pin(async { Ok(()) })
    }
}

impl Grants for Store {
    fn grants(self: Arc<Self>) -> Pending<Result<BTreeMap<String, Held>, StoreError>> {
        Box::pin(async move {
            let states = tokio::task::spawn_blocking(move || self.control_states())
                .await
                .map_err(|err| StoreError::Stopped(err.to_string()))??;
            Ok(states
                .into_iter()
                .map(|(unit, grant)| (unit, Held { grant, here: true }))
                .collect())
        })
    }

    /// A master alone holds every master's grant: `here` changes nothing.
    fn issue(
        self: Arc<Self>,
        unit: String,
        expected: ControlState,
        grant: ControlState,
        _here: bool,
    ) -> Pending<Result<(), IssueError>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || self.issue_grant(&unit, expected, grant))
                .await
                .map_err(|err| IssueError::Store(StoreError::Stopped(err.to_string())))?
        })
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
        let bytes = encode(grant);
        let stored = self.write_txn(|txn| {
            let mut table = txn.open_table(CONTROL)?;
            let stored = match table.get(unit)? {
                Some(bytes) => postcard::from_bytes(bytes.value()).ok(),
                None => Some(ControlState::default()),
            };
            if stored == Some(expected) && grant.epoch > expected.epoch {
                table.insert(unit, bytes.as_slice())?;
                return Ok(None);
            }
            Ok(Some(stored))
        })?;
        match stored {
            None => Ok(()),
            Some(Some(stored)) => Err(IssueError::Conflict {
                unit: unit.to_string(),
                expected,
                grant,
                stored,
                stored_here: true,
            }),
            Some(None) => Err(IssueError::Store(
                self.corrupt(format!("control state of {unit} does not decode")),
            )),
        }
    }
}

/// What a master of a cluster says in the shared store beside grants: that it runs a
/// unit (a claim, on its lease, which others wait to see gone before they start it), and
/// that it holds an edge's link (so that no other master fails the edge over).
pub trait Claims: Send + Sync {
    /// Claims `unit` under this master's grant of `epoch`; refused when the grant is not
    /// that, or another master's claim stands, or the lease is gone.
    fn claim(self: Arc<Self>, unit: String, epoch: u64) -> Pending<Result<(), StoreError>>;

    /// Withdraws this master's claim of `unit`, if it has one.
    fn release(self: Arc<Self>, unit: String) -> Pending<Result<(), StoreError>>;

    /// Says this master holds `edge`'s link, the one of `generation` (refused when the
    /// lease is gone).
    fn link(self: Arc<Self>, edge: String, generation: u64) -> Pending<Result<(), StoreError>>;

    /// Withdraws that, if the link key is still that link's (a newer link of the same edge
    /// keeps its own).
    fn unlink(self: Arc<Self>, edge: String, generation: u64) -> Pending<Result<(), StoreError>>;

    /// Withdraws a link key of this master's for `edge`, whatever its link (one an unlink
    /// that failed left while the master holds no link of the edge).
    fn unlink_stale(self: Arc<Self>, edge: String) -> Pending<Result<(), StoreError>>;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Owner;

    fn grant(owner: Owner, epoch: u64) -> ControlState {
        ControlState { owner, epoch }
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
                        let next = grant(owner, read.epoch + 1);
                        if store.issue_grant("e", read, next).is_ok() {
                            issued.lock().unwrap().push(next);
                        }
                    }
                });
            }
        });
        let mut epochs: Vec<u64> = issued
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
