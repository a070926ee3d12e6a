//! Every request, answer and notice of the edge link (DESIGN.md, "Edge link").
//!
//! One enum for each kind of payload serves both directions; each variant's doc says who
//! sends it. A side that receives a request it does not handle answers
//! [`ErrorCode::Unsupported`](super::ErrorCode::Unsupported).

use serde::{Deserialize, Serialize};

use super::Json;
use crate::identity::{Epoch, UnitId};

/// Who runs an edge location's modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlOwner {
    /// The edge server.
    Edge,
    /// The master server (failover).
    Master,
}

/// A module addressed the way clients do: by control system, module name and index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRef {
    /// Control system id.
    pub system: String,
    /// Module name within the system (`Display`).
    pub name: String,
    /// 1-based index among the system's modules of that name.
    pub index: u32,
    /// The module's id, when the sender has resolved the address: the receiver runs that
    /// module, even if its replica does not hold the system (a master system may list an
    /// edge's module).
    pub id: Option<String>,
}

impl ModuleRef {
    /// A client's address, not yet resolved.
    pub fn new(system: impl Into<String>, name: impl Into<String>, index: u32) -> Self {
        ModuleRef {
            system: system.into(),
            name: name.into(),
            index,
            id: None,
        }
    }
}

/// The kinds of data-model entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EntityKind {
    /// Edge location.
    Edge,
    /// Driver repository.
    Repository,
    /// Driver.
    Driver,
    /// Module.
    Module,
    /// Control system.
    System,
    /// User.
    User,
}

/// One change of the data model: an entity written (with its record) or deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelChange {
    /// The model version this change produced.
    pub version: u64,
    /// Entity kind.
    pub kind: EntityKind,
    /// Entity id.
    pub id: String,
    /// The new record, or `None` when deleted.
    pub record: Option<Json>,
}

/// Data-model changes for one edge, or a full snapshot of its slice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelBatch {
    /// The master model these belong to; a replica from another model gets a snapshot.
    pub model_id: u64,
    /// The version the changes start from (0 for a snapshot).
    pub from_version: u64,
    /// The version after applying them.
    pub to_version: u64,
    /// Whether `changes` replaces the whole slice.
    pub snapshot: bool,
    /// The records written or deleted, each as of `to_version`.
    pub changes: Vec<ModelChange>,
}

/// A file of a driver repository, named by its content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path inside the repository.
    pub path: String,
    /// SHA-256 of the content.
    pub hash: [u8; 32],
    /// Size in bytes.
    pub size: u64,
}

/// Why a repository update is sent (the edge logs it; the update is the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RepositoryAction {
    /// An operator reset the repository to a commit (perhaps an older one).
    Reset,
    /// An operator pulled the repository's newest commit.
    Pull,
    /// The edge is not on the master's commit (it was away, or is new): catch up.
    CatchUp,
}

/// A change of owner or another auditable event, as the edge reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// The unit: the edge location's id (or, for a master's own record in a cluster,
    /// `system:ID` of a system of no edge).
    pub edge: UnitId,
    /// Owner before.
    pub from: ControlOwner,
    /// Owner after.
    pub to: ControlOwner,
    /// Epoch after.
    pub epoch: Epoch,
    /// Why.
    pub reason: String,
    /// For a change of driver code rather than of owner: what changed (`from`, `to` and
    /// `epoch` then hold the owner of the moment).
    pub code: Option<CodeAudit>,
}

/// A change of driver code, for the audit log: applied, or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeAudit {
    /// Repository id.
    pub repository: String,
    /// The commit before.
    pub from: Option<String>,
    /// The commit asked for.
    pub to: String,
    /// The driver and module a refused reload concerns (none: the whole update).
    pub module: Option<(String, String)>,
    /// Whether the change was refused (the old code keeps running).
    pub refused: bool,
}

/// Requests; each expects a [`Response`] (or, where noted, a stream of [`StreamItem`]s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Master to edge: who owns this edge's modules now, under which epoch.
    /// Answer: [`Response::ControlAck`] once the edge has acted on it.
    ControlDecision {
        /// The owner.
        owner: ControlOwner,
        /// The epoch of this decision.
        epoch: Epoch,
        /// Why, for the audit log.
        reason: String,
    },
    /// Master to edge: the master has booted and serves requests.
    MasterReady,
    /// Either way: run a method on a module the receiver runs. Answer: [`Response::Value`].
    Execute {
        /// The module.
        module: ModuleRef,
        /// Method name.
        method: String,
        /// Arguments, a JSON array.
        args: Json,
        /// The sender's view of the target edge location's grant (its epoch, and the
        /// holder where the sender knows it); a claim the receiver does not admit (an
        /// older epoch, or the same epoch with another holder) is refused.
        epoch: Option<Epoch>,
        /// The holder the sender claims for that epoch.
        holder: Option<ControlOwner>,
    },
    /// Either way: a module's status map. Answer: [`Response::Status`].
    StatusRequest {
        /// The module.
        module: ModuleRef,
    },
    /// Either way: stream a module's debug log, its recent lines first. Answer: a stream
    /// of [`StreamItem::Debug`] until cancelled, or until the module stops there.
    DebugSubscribe {
        /// The module.
        module: ModuleRef,
    },
    /// Master to edge: stop a debug stream (cancelling the stream's request does the
    /// same; kept for older peers).
    DebugUnsubscribe {
        /// The module.
        module: ModuleRef,
    },
    /// Master to edge: data-model changes pushed live, or a full snapshot of the edge's
    /// slice. Answer: [`Response::Ack`] once applied.
    ModelChanges(ModelBatch),
    /// Master to edge: run a driver repository at `commit`, whose files are `files`. The
    /// edge fetches the blobs it lacks ([`Request::FetchBlobs`]), then reloads the modules
    /// whose script changed. Answer: [`Response::Ack`] once it runs that commit.
    RepositoryUpdate {
        /// Repository id.
        repository: String,
        /// The commit.
        commit: String,
        /// Why.
        action: RepositoryAction,
        /// The files after the update, by content hash.
        files: Vec<FileEntry>,
    },
    /// Master to edge: reload the modules of a driver in place.
    LiveReload {
        /// Driver id.
        driver: String,
    },
    /// Either way: drop cached data of a control system. Answer: [`Response::DoneBy`].
    ExpireSystemCache {
        /// System id.
        system: String,
    },
    /// Either way: start a control system's modules. Answer: [`Response::DoneBy`].
    StartSystem {
        /// System id.
        system: String,
    },
    /// Either way: stop a control system's modules. Answer: [`Response::DoneBy`].
    StopSystem {
        /// System id.
        system: String,
    },
    /// Edge to master: data-model changes since `since_version`.
    /// Answer: [`Response::ModelChanges`].
    SyncRequest {
        /// The master model the edge's replica came from (0 for none).
        model_id: u64,
        /// The edge's model version.
        since_version: u64,
    },
    /// Edge to master: fetch blobs by content hash. Answer: a stream of [`StreamItem::Blob`].
    FetchBlobs {
        /// Hashes wanted.
        hashes: Vec<[u8; 32]>,
    },
    /// Edge to master: audit events to record. Answer: [`Response::Ack`].
    AuditEvents {
        /// The events.
        events: Vec<AuditRecord>,
    },
    /// Edge to master, first on every link: where the edge stands, for the negotiation
    /// rules. Answer: [`Response::Ack`]; the master's [`Request::ControlDecision`] follows.
    ControlReport {
        /// The edge's persisted owner.
        owner: ControlOwner,
        /// The edge's persisted epoch.
        epoch: Epoch,
        /// Whether its modules are loaded and running now.
        controlling: bool,
    },
    /// Either way, on every link: where the sender serves its client API, for the
    /// `Tether-Preferred-Server` hints the receiver gives. Answer: [`Response::Ack`].
    Hello {
        /// The sender's client API, as clients should reach it (`https://host:port`).
        api_url: String,
    },
    /// Either way: a module's status map and then every change, for a client's binding.
    /// Answer: a stream of [`StreamItem::StatusMap`] (first, and again after a gap) and
    /// [`StreamItem::StatusValue`], ended when the module stops running on the receiver.
    StatusSubscribe {
        /// The module.
        module: ModuleRef,
    },
    /// Either way: a module's recent debug lines. Answer: [`Response::DebugLines`].
    DebugRead {
        /// The module.
        module: ModuleRef,
    },
    /// Master (the witness) to a site pair's node: who holds the location's modules, under
    /// which epoch. Answer: [`Response::Ack`] once the node has taken it.
    PairGrant {
        /// The grant.
        grant: crate::control::pair::PairGrant,
        /// Its proof for each node of the location.
        proofs: Vec<crate::control::pair::GrantProof>,
    },
    /// A site pair's node to master: where it stands (on every link, and on every
    /// change). Answer: [`Response::Ack`].
    NodeReport(crate::control::pair::NodeReport),
    /// A site pair's node to master: its turn in its location's collector arrays, as
    /// `(rank, of)` among the nodes polling (none: it does not poll). Answer:
    /// [`Response::Ack`].
    ArraySlot {
        /// The slot.
        slot: Option<(u64, u64)>,
    },
}

/// Answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Done, nothing to return.
    Ack,
    /// A control decision was acted on: the modules are stopped or started.
    ControlAck {
        /// The epoch acted on.
        epoch: Epoch,
    },
    /// A method's result.
    Value {
        /// The result.
        value: Json,
        /// Who ran it: `edge:ID` or `master`.
        executed_by: String,
    },
    /// A status map.
    Status {
        /// Key to value.
        entries: Vec<(String, Json)>,
    },
    /// Data-model changes for a [`Request::SyncRequest`].
    ModelChanges(ModelBatch),
    /// Debug lines, oldest first, as (Unix milliseconds, text).
    DebugLines {
        /// The lines.
        lines: Vec<(u64, String)>,
    },
    /// Who carried out a request for a control system: `edge:ID` or `master`.
    DoneBy {
        /// The side.
        side: String,
    },
}

/// Items of a streamed answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StreamItem {
    /// A debug log line.
    Debug {
        /// Unix time in milliseconds.
        time_ms: u64,
        /// The line.
        line: String,
    },
    /// A repository file's content.
    Blob {
        /// SHA-256 of `data`, as claimed by the sender.
        hash: [u8; 32],
        /// The content.
        data: Vec<u8>,
    },
    /// A module's whole status map (a binding's start, or after changes were missed).
    StatusMap {
        /// Key to value.
        entries: Vec<(String, Json)>,
    },
    /// One status value changed.
    StatusValue {
        /// Status key.
        key: String,
        /// New value.
        value: Json,
    },
}

/// One-way messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Notice {
    /// Edge to master: a module's status value changed (runtime-state sync).
    StatusChanged {
        /// Module id.
        module_id: String,
        /// Status key.
        key: String,
        /// New value.
        value: Json,
        /// The epoch under which the edge ran the module.
        epoch: Epoch,
    },
    /// A site pair's node to its peer: the grant it holds to, and whether it runs.
    PeerNote(crate::control::pair::PeerNote),
    /// A site pair's node to its peer: a grant it took from the witness, passed on with
    /// the witness's proofs (the peer may not reach the witness).
    PeerGrant {
        /// The grant.
        grant: crate::control::pair::PairGrant,
        /// Its proof for each node of the location.
        proofs: Vec<crate::control::pair::GrantProof>,
    },
    /// A site pair's node to its peer: whether it polls its location's collector arrays
    /// (its modules of `shared_polling` drivers run and reach their devices), so that the
    /// peer counts it among the array's live nodes only then.
    PeerPolling {
        /// Whether it polls.
        polling: bool,
    },
}
