//! The master's control shell: one task per unit (an edge location), each owning the
//! unit's [`MasterSide`] machine behind a bounded queue. A unit's task feeds its machine
//! link events, reports, acknowledgements, model changes and the time, and carries out
//! its actions in order: issue grants (a compare-and-set on the stored grant; what follows
//! a grant the store did not take is not carried out, and the machine tries again), audit,
//! start or stop the unit's modules here (a stop completes, devices disconnected, before
//! anything after it), send decisions. The machines measure time on the monotonic clock.
//!
//! One task per unit, so that a module slow to stop (up to its stop deadline) delays only
//! its own unit's handover, never another site's failover; a unit waits only for its own
//! modules' stops. A small coordinating task follows the model: it makes and ends the
//! unit tasks and reconciles the modules of no edge.
//!
//! Link events carry the link's generation, so that a unit ignores what a replaced link
//! says (its late link-down, report or acknowledgement) whatever order they arrive in.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;
use tether_common::api::audit_entry_json;
use tether_common::control::clock::wall_now_ms;
use tether_common::control::placement::rendezvous_pick;
use tether_common::control::{
    AuditRecord, ControlState, EdgeId, EdgeSettings, Epoch, Lease, MasterAction, MasterEvent,
    MasterId, MasterSide, Mono, Now, Owner, PeerView, RestoreRefused, UnitId, Window, owner_name,
};
use tether_common::link::LinkError;
use tether_common::model::{EdgeRecord, Model, Standby};
use tether_common::protocol::{ErrorCode, Request, Response};
use tether_common::report::printable;
use tether_common::runtime::{ReloadRefused, Runtime};
use tether_common::store::{AuditSource, Claims, Grants, Held, PairGrants, Store};
use tokio::sync::{mpsc, oneshot, watch};

use crate::edges::EdgeRegistry;

mod witness;
pub use witness::NodeLinkEvent;

/// How long an edge may take to act on a decision (stop or start its modules).
const DECISION_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest a unit's task sleeps between polls of its machine.
const MAX_POLL: Duration = Duration::from_secs(1);
/// Commands a unit's queue holds. Each is a few words (an edge's report is three fields),
/// so the queue's bytes are bounded with its count; a full queue holds back the edge's
/// own link (its requests wait), never another unit.
const UNIT_QUEUE: usize = 64;
/// The master's own audit records kept.
pub const AUDIT_KEEP: u64 = 100_000;
/// Audit records kept per edge location of those it can cause (its reports, refusals of
/// its requests), apart from the master's own.
pub const EDGE_AUDIT_KEEP: u64 = 1_000;

/// Unix time in milliseconds, for what people read (never for an interval).
pub fn now_ms() -> u64 {
    wall_now_ms()
}

/// Why a restore did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// No such edge location.
    #[error("no edge {0}")]
    NotFound(String),
    /// The machine refused.
    #[error(transparent)]
    Refused(#[from] RestoreRefused),
    /// The new grant could not be stored, so nothing changed.
    #[error("the restore was not done: {0}")]
    NotStored(String),
    /// The control task has stopped (shutdown).
    #[error("the master is shutting down")]
    Stopped,
}

/// What the cluster tells this master's control (from its mirror of etcd and its lease);
/// a master alone has none.
#[derive(Debug, Clone, Default)]
pub struct ClusterInputs {
    /// This master's id.
    pub me: MasterId,
    /// Until when this master may run units.
    pub lease: Lease,
    /// The masters present.
    pub live: Vec<MasterId>,
    /// Edge to the master holding its link.
    pub links: BTreeMap<EdgeId, MasterId>,
    /// Edge to when its link key last went.
    pub link_ended: BTreeMap<EdgeId, Mono>,
    /// Unit to the master claiming to run it.
    pub runners: BTreeMap<UnitId, MasterId>,
    /// Unit to its stored grant and, for a master's grant, the master it names.
    pub grants: BTreeMap<UnitId, (ControlState, Option<MasterId>)>,
    /// What each present master said of itself (its API and link addresses).
    pub info: BTreeMap<MasterId, serde_json::Value>,
    /// Each present master's presence lease.
    pub leases: BTreeMap<MasterId, i64>,
    /// The hashes of every master's admin token.
    pub admins: Vec<String>,
    /// Each site pair's stored grant.
    pub pair_grants: BTreeMap<UnitId, tether_common::control::pair::PairGrant>,
}

impl ClusterInputs {
    /// What this master knows of the others, for `unit`.
    pub fn peers(&self, unit: &UnitId) -> PeerView {
        let other = |master: Option<&MasterId>| master.is_some_and(|m| *m != self.me);
        PeerView {
            fails_over: rendezvous_pick(unit, &self.live) == Some(&self.me),
            linked_elsewhere: other(self.links.get(unit.as_str())),
            link_ended: self.link_ended.get(unit.as_str()).copied(),
            running_elsewhere: other(self.runners.get(unit)),
        }
    }

    /// `unit`'s stored grant as this master sees it.
    pub fn held(&self, unit: &UnitId) -> Option<Held> {
        self.grants.get(unit).map(|(grant, master)| Held {
            grant: *grant,
            here: master.as_ref() == Some(&self.me),
        })
    }

    /// Whether this master's claim of `unit` stands.
    pub fn claimed_here(&self, unit: &UnitId) -> bool {
        self.runners.get(unit) == Some(&self.me)
    }

    /// The master that should serve a client's call for `unit`, when not this one: the
    /// one holding the edge's link (it reaches the edge, or runs the unit itself), else
    /// the one running the unit. `None`: this master holds it, or nobody does.
    pub fn serving_master(&self, unit: &UnitId) -> Option<&MasterId> {
        let linked = self.links.get(unit.as_str());
        let running = self.runners.get(unit);
        let here = |master: Option<&MasterId>| master == Some(&self.me);
        if here(linked) || here(running) {
            return None;
        }
        linked.or(running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_common::store::{Pending, StoreError};

    #[test]
    fn a_call_goes_to_the_link_holder_then_to_the_runner_and_stays_where_either_is_here() {
        let mut inputs = ClusterInputs {
            me: "m1".into(),
            ..ClusterInputs::default()
        };
        let unit = UnitId::new("e1");
        let serving = |inputs: &ClusterInputs| inputs.serving_master(&unit).cloned();
        assert_eq!(serving(&inputs), None, "nobody holds it");
        inputs.runners.insert(unit.clone(), "m3".into());
        assert_eq!(serving(&inputs), Some("m3".into()));
        inputs.links.insert("e1".into(), "m2".into());
        assert_eq!(serving(&inputs), Some("m2".into()), "the link first");
        inputs.runners.insert(unit.clone(), "m1".into());
        assert_eq!(serving(&inputs), None, "run here");
        inputs.runners.clear();
        inputs.links.insert("e1".into(), "m1".into());
        assert_eq!(serving(&inputs), None, "linked here");
    }

    /// Claims and link keys always taken: this test is about what the unit publishes.
    struct Granting;

    impl Claims for Granting {
        fn claim(self: Arc<Self>, _: UnitId, _: Epoch) -> Pending<Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }
        fn release(self: Arc<Self>, _: UnitId) -> Pending<Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }
        fn link(self: Arc<Self>, _: EdgeId, _: u64) -> Pending<Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }
        fn unlink(self: Arc<Self>, _: EdgeId, _: u64) -> Pending<Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }
        fn unlink_stale(self: Arc<Self>, _: EdgeId) -> Pending<Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// No site pair in this test.
    struct NoPairs;

    impl PairGrants for NoPairs {
        fn load_pair(
            self: Arc<Self>,
            _: UnitId,
        ) -> Pending<Result<Option<tether_common::control::pair::PairGrant>, StoreError>> {
            Box::pin(async { Ok(None) })
        }
        fn issue_pair(
            self: Arc<Self>,
            _: UnitId,
            _: Option<tether_common::control::pair::PairGrant>,
            _: tether_common::control::pair::PairGrant,
        ) -> Pending<Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// A grant another master issued reaches this master's machine through the cluster's
    /// inputs, not through an issue of its own: what the API, the proxy's hints and the
    /// runtime's fence read must follow it all the same.
    #[tokio::test]
    async fn a_grant_learned_from_another_master_is_published_as_the_units_grant() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("master.redb")).unwrap());
        let runtime = Runtime::new(
            tether_common::runtime::Executor::Master(Some("m1".into())),
            tether_common::runtime::ScriptLimits::default(),
        );
        let (publish, inputs) = watch::channel(Arc::new(ClusterInputs {
            me: "m1".into(),
            lease: Lease::Lost,
            ..ClusterInputs::default()
        }));
        let control = Control::start(
            store.clone(),
            store,
            runtime,
            EdgeRegistry::new(dir.path().to_path_buf()),
            Some(ClusterHooks {
                claims: Arc::new(Granting),
                inputs,
                pair_grants: Arc::new(NoPairs),
            }),
        )
        .await
        .unwrap();
        let mut model = Model::default();
        model
            .set_json(
                tether_common::protocol::EntityKind::Edge,
                "e1",
                Some(r#"{"id":"e1","failover":true,"timeout_ms":60000}"#),
            )
            .unwrap();
        control.model_changed(Arc::new(model), true);
        control.booted();
        assert_eq!(control.state("e1"), Some(ControlState::default()));

        let theirs = ControlState {
            owner: Owner::Master,
            epoch: Epoch(4),
        };
        let unit = UnitId::new("e1");
        publish.send_replace(Arc::new(ClusterInputs {
            me: "m1".into(),
            lease: Lease::Until(tether_common::control::clock::mono_now().plus(60_000)),
            live: vec!["m1".into(), "m2".into()],
            runners: [(unit.clone(), "m2".into())].into(),
            grants: [(unit, (theirs, Some("m2".into())))].into(),
            ..ClusterInputs::default()
        }));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while control.state("e1") != Some(theirs) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            control.state("e1"),
            Some(theirs),
            "m2's grant, as m1 shows it"
        );
        assert!(control.running_here().is_empty(), "m1 runs nothing of m2's");
    }
}

/// How the control reaches the cluster: claims and link keys, and the inputs.
#[derive(Clone)]
pub struct ClusterHooks {
    /// Claims of units run, link keys.
    pub claims: Arc<dyn Claims>,
    /// The inputs, as they change.
    pub inputs: watch::Receiver<Arc<ClusterInputs>>,
    /// Site pairs' grants (compare-and-set, with the claim of a master's).
    pub pair_grants: Arc<dyn PairGrants>,
}

/// A unit of modules of no edge in a cluster: no edge to wait for, so the master the hash
/// picks takes it at once, and another when that one is gone (its claim with its lease).
const LOCAL_UNIT: EdgeSettings = EdgeSettings {
    failover: true,
    timeout_ms: 0,
    window: None,
};

/// What the coordinating task hears: from the server itself, rarely.
enum Coordination {
    /// The model changed: reconcile the modules of no edge (and whatever else changed).
    Model,
}

/// What a unit's task hears.
enum UnitCommand {
    /// Something happened on the edge's link of this generation.
    Link {
        generation: u64,
        event: MasterEvent,
    },
    Restore(oneshot::Sender<Result<ControlState, RestoreError>>),
    /// Something happened on a site pair's node's link of this generation.
    Node {
        node: tether_common::control::NodeId,
        generation: u64,
        event: NodeLinkEvent,
    },
}

/// A unit's queue, and the nodes its location had when it was made (a location that
/// becomes a pair, or changes its nodes, gets a new unit).
struct UnitHandle {
    commands: mpsc::Sender<UnitCommand>,
    /// Its location's record (none for a unit of no edge), told to the unit only when it
    /// changes: a change elsewhere in the model wakes none of the thousands of units.
    /// Dropped with the handle, which ends the unit's task.
    record: watch::Sender<Option<EdgeRecord>>,
    nodes: Vec<String>,
    /// Its task: a unit made again for the location waits for it to end.
    task: tokio::task::JoinHandle<()>,
}

/// What every unit's task shares.
struct Shared {
    runtime: Runtime,
    store: Arc<Store>,
    grants: Arc<dyn Grants>,
    /// Where site pairs' grants are stored.
    pair_grants: Arc<dyn PairGrants>,
    registry: Arc<EdgeRegistry>,
    /// The model the coordinator follows.
    model: watch::Receiver<Arc<Model>>,
    /// Edge locations whose modules the master runs now.
    running: Mutex<HashSet<String>>,
    /// The grants stored last, for a unit whose task is made (again) later.
    persisted: Mutex<BTreeMap<UnitId, Held>>,
    /// The cluster this master belongs to, if any.
    cluster: Option<ClusterHooks>,
    states: Arc<RwLock<HashMap<String, ControlState>>>,
}

/// A handle on the control tasks.
#[derive(Clone)]
pub struct Control {
    coordinator: mpsc::UnboundedSender<Coordination>,
    units: Arc<RwLock<HashMap<UnitId, UnitHandle>>>,
    shared: Arc<Shared>,
    /// The model the unit tasks follow.
    model: Arc<watch::Sender<Arc<Model>>>,
    booted: Arc<watch::Sender<bool>>,
    states: Arc<RwLock<HashMap<String, ControlState>>>,
    store: Arc<Store>,
    runtime: Runtime,
}

impl Control {
    /// Starts the control tasks over the grants stored in `grants`, with the audit log in
    /// `store`; the master is booting until [`booted`](Self::booted).
    pub async fn start(
        store: Arc<Store>,
        grants: Arc<dyn Grants>,
        runtime: Runtime,
        registry: Arc<EdgeRegistry>,
        cluster: Option<ClusterHooks>,
    ) -> anyhow::Result<Control> {
        let persisted = grants.clone().grants().await?;
        let (coordinator, receiver) = mpsc::unbounded_channel();
        let (model_tx, model) = watch::channel(Arc::new(Model::default()));
        let states = Arc::new(RwLock::new(HashMap::new()));
        let units = Arc::new(RwLock::new(HashMap::new()));
        let pair_grants: Arc<dyn PairGrants> = match &cluster {
            Some(cluster) => cluster.pair_grants.clone(),
            None => store.clone(),
        };
        let shared = Arc::new(Shared {
            runtime: runtime.clone(),
            store: store.clone(),
            grants,
            pair_grants,
            registry,
            model,
            running: Mutex::default(),
            persisted: Mutex::new(persisted),
            cluster,
            states: states.clone(),
        });
        let coordinating = Coordinator {
            shared: shared.clone(),
        };
        tokio::spawn(coordinating.run(receiver));
        Ok(Control {
            coordinator,
            units,
            shared,
            model: Arc::new(model_tx),
            booted: Arc::new(watch::channel(false).0),
            states,
            store,
            runtime,
        })
    }

    fn coordinate(&self, what: Coordination) {
        // The coordinator ends only with the process.
        let _ = self.coordinator.send(what);
    }

    /// The model changed: edges added, removed or edited, modules moved. Each new edge
    /// location's unit exists when this returns (so that none of its link's events can
    /// come first); the modules follow in the coordinating task.
    /// `placement_changed` is false when no edge record, system or module changed since
    /// the last call (a user, say): then no unit can be added, removed or remade and no
    /// unit's record changed, and thousands of units are not looked at again.
    pub fn model_changed(&self, model: Arc<Model>, placement_changed: bool) {
        self.model.send_replace(model.clone());
        if !placement_changed {
            self.forget_gone_units(&self.units.read().unwrap_or_else(|p| p.into_inner()));
            self.coordinate(Coordination::Model);
            return;
        }
        let mut units = self.units.write().unwrap_or_else(|p| p.into_inner());
        // In a cluster the modules of no edge run in units of their own (a system),
        // placed on one master: each is a unit with no link, failed over at once.
        let local = match self.shared.cluster {
            Some(_) => model.local_units(),
            None => Default::default(),
        };
        let keeps = |id: &UnitId, handle: &UnitHandle| match model.edges.get(id.as_str()) {
            Some(record) => record.nodes == handle.nodes,
            None => local.contains(id),
        };
        // Most changes (a user, a system, a schedule) neither add, remove nor remake a
        // unit: then the table stays as it is.
        let remade = units.iter().any(|(id, handle)| !keeps(id, handle))
            || model
                .edges
                .keys()
                .any(|id| !units.contains_key(id.as_str()))
            || local.iter().any(|id| !units.contains_key(id));
        if remade {
            // A removed edge's task ends when its handle goes (its record's watch closes).
            // A unit replaced (its location became a pair, or one edge, or changed its
            // nodes) ends before its successor begins.
            let mut retired_tasks: HashMap<UnitId, tokio::task::JoinHandle<()>> = HashMap::new();
            for (id, handle) in std::mem::take(&mut *units) {
                if keeps(&id, &handle) {
                    units.insert(id, handle);
                } else {
                    retired_tasks.insert(id, handle.task);
                }
            }
            for (id, record) in &model.edges {
                if units.contains_key(id.as_str()) {
                    continue;
                }
                let unit = UnitId::from(EdgeId::new(id.as_str()));
                let after = retired_tasks.remove(&unit);
                let handle = match record.is_pair() {
                    false => self.start_unit(unit.clone(), Some(record), after),
                    true => self.start_witness(record, after),
                };
                units.insert(unit, handle);
            }
            for id in &local {
                if !units.contains_key(id) {
                    let handle = self.start_unit(id.clone(), None, retired_tasks.remove(id));
                    units.insert(id.clone(), handle);
                }
            }
        }
        self.forget_gone_units(&units);
        // Each unit whose own record changed (its failover, timeout or restore window).
        for (id, handle) in units.iter() {
            if let Some(record) = model.edges.get(id.as_str()) {
                handle.record.send_if_modified(|held| {
                    let changed = held.as_ref() != Some(record);
                    if changed {
                        *held = Some(record.clone());
                    }
                    changed
                });
            }
        }
        drop(units);
        self.coordinate(Coordination::Model);
    }

    /// Forgets the states and the running marks of units no longer in `units`. On every
    /// change, not only when units go: a unit retired while it was storing a grant may
    /// publish its state after it left the table.
    fn forget_gone_units(&self, units: &HashMap<UnitId, UnitHandle>) {
        self.shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id| units.contains_key(id.as_str()));
        self.states
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| units.contains_key(id.as_str()));
    }

    /// Makes an edge location's unit: its machine from the grant stored last, its task
    /// (begun once the location's previous unit, `after`, has ended).
    fn start_unit(
        &self,
        id: UnitId,
        record: Option<&EdgeRecord>,
        after: Option<tokio::task::JoinHandle<()>>,
    ) -> UnitHandle {
        let settings = record.map_or(LOCAL_UNIT, settings);
        let persisted = self
            .shared
            .persisted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied()
            .unwrap_or(Held {
                grant: ControlState::default(),
                here: true,
            });
        let (commands, receiver) = mpsc::channel(UNIT_QUEUE);
        // In a cluster nothing runs, and nothing is failed over, before the cluster's
        // inputs say so; a master alone needs none.
        let machine = match self.shared.cluster {
            Some(_) => MasterSide::in_cluster(
                id.clone(),
                settings,
                (persisted.grant, persisted.here),
                Now::system(),
            ),
            None => MasterSide::new(id.clone(), settings, persisted.grant, Now::system()),
        };
        self.shared.runtime.set_grant(&id, persisted.grant);
        self.shared.publish(&id, persisted.grant);
        let unit = Unit {
            unit: id,
            machine,
            shared: self.shared.clone(),
            me: commands.downgrade(),
            link: None,
            newest_link: 0,
            told: Told::default(),
            relinked: None,
        };
        let booted = self.booted.subscribe();
        let (record_tx, record_rx) = watch::channel(record.cloned());
        let task = tokio::spawn(async move {
            if let Some(previous) = after {
                let _ = previous.await;
            }
            unit.run(receiver, record_rx, booted).await
        });
        UnitHandle {
            commands,
            record: record_tx,
            nodes: record.map(|r| r.nodes.clone()).unwrap_or_default(),
            task,
        }
    }

    /// Makes a site pair location's witness and its task (begun once the location's
    /// previous unit, `after`, has ended).
    fn start_witness(
        &self,
        record: &EdgeRecord,
        after: Option<tokio::task::JoinHandle<()>>,
    ) -> UnitHandle {
        let (commands, receiver) = mpsc::channel(UNIT_QUEUE);
        let (record_tx, record_rx) = watch::channel(Some(record.clone()));
        let witness = witness::Witness::new(self.shared.clone(), record);
        let booted = self.booted.subscribe();
        let task = tokio::spawn(witness.run(receiver, record_rx, booted, after));
        UnitHandle {
            commands,
            record: record_tx,
            nodes: record.nodes.clone(),
            task,
        }
    }

    /// Something happened on site pair node `node`'s link of `generation`, for its
    /// `location`. Waits while the unit's queue is full.
    pub async fn node_event(
        &self,
        location: &str,
        node: &str,
        generation: u64,
        event: NodeLinkEvent,
    ) {
        if let Some(unit) = self.unit(location) {
            let node = tether_common::control::NodeId::new(node);
            let command = UnitCommand::Node {
                node,
                generation,
                event,
            };
            let _ = unit.send(command).await;
        }
    }

    /// The boot wait is over.
    pub fn booted(&self) {
        self.booted.send_replace(true);
    }

    fn unit(&self, edge: &str) -> Option<mpsc::Sender<UnitCommand>> {
        self.units
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(edge)
            .map(|handle| handle.commands.clone())
    }

    /// Something happened on the edge's link of `generation` (the registry's). Waits while
    /// the unit's queue is full: only that edge's link waits.
    pub async fn event(&self, edge: &str, generation: u64, event: MasterEvent) {
        if let Some(unit) = self.unit(edge) {
            let _ = unit.send(UnitCommand::Link { generation, event }).await;
        }
    }

    /// A status change the edge streamed (runtime-state sync): taken only from the edge
    /// that controls, under the current epoch, and kept only for modules the runtime keeps
    /// warm (standby = "warm"). Handled here, not by the unit's task, so that a chatty
    /// edge cannot fill its queue.
    pub fn status(&self, edge: &str, module_id: &str, key: &str, value: Value, epoch: Epoch) {
        let current = self.state(edge);
        // Only an edge kept warm: the runtime keeps values for modules it does not know
        // yet (bounded), which an edge not kept warm would fill for nothing.
        let warm = self
            .model
            .borrow()
            .edges
            .get(edge)
            .is_some_and(|e| e.standby == Standby::Warm);
        if warm && current.is_some_and(|s| s.owner == Owner::Edge && epoch >= s.epoch) {
            self.runtime.standby_status(module_id, key, value);
        }
    }

    /// A manual restore; answers the new state once the decision is sent.
    pub async fn restore(&self, edge: &str) -> Result<ControlState, RestoreError> {
        let unit = self
            .unit(edge)
            .ok_or_else(|| RestoreError::NotFound(edge.to_string()))?;
        let (reply, answer) = oneshot::channel();
        unit.send(UnitCommand::Restore(reply))
            .await
            .map_err(|_| RestoreError::NotFound(edge.to_string()))?;
        answer.await.unwrap_or(Err(RestoreError::Stopped))
    }

    /// The cluster's inputs now, in a cluster.
    pub fn cluster(&self) -> Option<Arc<ClusterInputs>> {
        self.shared
            .cluster
            .as_ref()
            .map(|c| c.inputs.borrow().clone())
    }

    /// The lease lapsed: stops every unit's modules here at once, whatever each unit's
    /// task is waiting for (its machine, told of the lapse, stops them too).
    pub async fn fence(&self) {
        let stopped: Vec<String> = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        if stopped.is_empty() {
            return;
        }
        tracing::warn!(units = ?stopped, "the lease lapsed: stopping every unit here");
        self.shared.reconcile(|_| true).await;
    }

    /// The edge locations whose modules this master runs now.
    pub fn running_here(&self) -> Vec<String> {
        let mut edges: Vec<String> = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        edges.sort();
        edges
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<tether_common::metrics::Metrics> {
        self.runtime.metrics()
    }

    /// An edge location's owner and epoch.
    pub fn state(&self, edge: &str) -> Option<ControlState> {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(edge)
            .copied()
    }

    /// Records audit events edge `edge` reports about itself: its own takeovers while the
    /// master was out of reach, its refused reloads. They are kept with the edge's
    /// records, marked as reported by it.
    pub async fn record_edge_audits(
        &self,
        edge: &str,
        events: Vec<AuditRecord>,
    ) -> anyhow::Result<()> {
        let store = self.store.clone();
        let edge = edge.to_string();
        tokio::task::spawn_blocking(move || {
            // What an edge says is written escaped: it can neither forge log lines nor
            // colour a terminal.
            for event in &events {
                let reason = printable(&event.reason, 1024);
                match &event.code {
                    Some(code) => tracing::warn!(
                        edge = %event.edge,
                        repository = %printable(&code.repository, 128),
                        refused = code.refused,
                        "the edge reports a change of driver code: {reason}"
                    ),
                    None => tracing::warn!(
                        edge = %event.edge,
                        from = owner_name(event.from),
                        to = owner_name(event.to),
                        epoch = %event.epoch,
                        "the edge reports a change of owner: {reason}"
                    ),
                }
            }
            store.append_edge_audits(&edge, &events, AuditSource::Edge, EDGE_AUDIT_KEEP)?;
            Ok(())
        })
        .await?
    }

    /// Records that a request over edge `edge`'s link was refused, and why, with the
    /// edge's records.
    pub async fn record_refusal(&self, edge: &str, reason: String) {
        let state = self.state(edge).unwrap_or_default();
        let record = AuditRecord {
            time_ms: now_ms(),
            edge: UnitId::new(edge),
            from: state.owner,
            to: state.owner,
            epoch: state.epoch,
            reason,
            code: None,
        };
        let store = self.store.clone();
        let edge = edge.to_string();
        let stored = tokio::task::spawn_blocking(move || {
            store.append_edge_audits(&edge, &[record], AuditSource::Refusal, EDGE_AUDIT_KEEP)
        })
        .await;
        if !matches!(stored, Ok(Ok(_))) {
            tracing::error!("cannot store an audit record: {stored:?}");
        }
    }

    /// The audit log, oldest first, optionally of one edge.
    pub async fn audit(&self, edge: Option<String>) -> anyhow::Result<Vec<Value>> {
        let store = self.store.clone();
        let records = tokio::task::spawn_blocking(move || store.audit_after(0)).await??;
        Ok(records
            .iter()
            .filter(|entry| {
                edge.as_ref()
                    .is_none_or(|e| entry.record.edge.as_str() == e)
            })
            .map(audit_entry_json)
            .collect())
    }
}

fn settings(record: &EdgeRecord) -> EdgeSettings {
    EdgeSettings {
        failover: record.failover,
        timeout_ms: record.timeout_ms,
        window: record.restore_window.as_ref().and_then(|w| {
            Window::new(w, record.time_zone.as_deref())
                .map_err(|err| tracing::error!(edge = %record.id, "restore window ignored: {err}"))
                .ok()
        }),
    }
}

/// A grant the store did not take, and why.
struct NotIssued(String);

/// Reconciles the modules after a model change, off the caller's path.
struct Coordinator {
    shared: Arc<Shared>,
}

impl Coordinator {
    async fn run(self, mut commands: mpsc::UnboundedReceiver<Coordination>) {
        while let Some(Coordination::Model) = commands.recv().await {
            // Changes that came meanwhile are in the model already: one reconcile.
            while let Ok(Coordination::Model) = commands.try_recv() {}
            // Waits for no stop: a unit waits for its own.
            self.shared.reconcile(|_| false).await;
        }
    }
}

impl Shared {
    /// Marks `unit`'s modules as run here, or not.
    fn set_running(&self, unit: &str, running: bool) {
        let mut set = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running {
            set.insert(unit.to_string());
        } else {
            set.remove(unit);
        }
    }

    /// Stops `unit`'s modules here (it is no longer marked running), answering once their
    /// stops have completed, devices disconnected.
    async fn stop_unit_modules(self: &Arc<Self>, unit: &str) {
        let model = self.model.borrow().clone();
        let own: HashSet<String> = model
            .modules
            .values()
            .filter(|m| {
                model.module_edge(m).as_deref() == Some(unit)
                    || model.local_unit(m).as_deref() == Some(unit)
            })
            .map(|m| m.id.clone())
            .collect();
        self.reconcile(|id| own.contains(id)).await;
    }

    fn publish(&self, edge: &str, state: ControlState) {
        self.states
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(edge.to_string(), state);
    }

    fn published_epoch(&self, edge: &str) -> Epoch {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(edge)
            .map(|s| s.epoch)
            .unwrap_or_default()
    }

    /// Runs the modules of no edge and of the edges the master controls, and keeps the
    /// others of warm-standby edges compiled; answers once the stops of the modules
    /// `awaited` picks (by id) have completed. The model and who runs what are read when
    /// the runtime's turn comes; reloads go on meanwhile, and those refused are audited.
    async fn reconcile(self: &Arc<Self>, awaited: impl Fn(&str) -> bool) {
        let running = |edge: &str| {
            self.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(edge)
        };
        // The model the runtime's turn reads, for deciding what is wanted in it.
        let read = std::sync::OnceLock::new();
        let reloads = self
            .runtime
            .reconcile_waiting_for(
                || read.get_or_init(|| self.model.borrow().clone()).clone(),
                |module| {
                    let Some(model) = read.get() else {
                        return false;
                    };
                    match model.module_edge(module) {
                        // Alone, a master runs every module of no edge; in a cluster,
                        // those of the units it holds.
                        None if self.cluster.is_none() => true,
                        None => model.local_unit(module).is_some_and(|unit| running(&unit)),
                        Some(edge) => running(&edge),
                    }
                },
                awaited,
            )
            .await;
        let shared = self.clone();
        tokio::spawn(async move {
            if let Ok(refused) = reloads.await {
                let model = shared.model.borrow().clone();
                shared.audit_refused_reloads(&model, refused).await;
            }
        });
        let model = self.model.borrow().clone();
        self.runtime
            .keep_warm(&model, |module| {
                model.module_edge(module).is_some_and(|edge| {
                    !running(&edge)
                        && model
                            .edges
                            .get(edge.as_str())
                            .is_some_and(|e| e.standby == Standby::Warm)
                })
            })
            .await;
    }

    /// Reloads the master refused (a new script whose `on_load` failed) go to the audit
    /// log, under the module's edge location.
    async fn audit_refused_reloads(&self, model: &Model, refused: Vec<ReloadRefused>) {
        if refused.is_empty() {
            return;
        }
        let code = self.runtime.code();
        let records: Vec<AuditRecord> = refused
            .iter()
            .map(|r| {
                let edge = model
                    .modules
                    .get(&r.module)
                    .and_then(|m| model.module_edge(m))
                    .map_or_else(|| UnitId::new(""), UnitId::from);
                let epoch = self.published_epoch(&edge);
                r.audit(model, &code, (edge, Owner::Master, epoch), now_ms())
            })
            .collect();
        self.store.record_audits(records, AUDIT_KEEP).await;
    }
}

/// One edge location's control: its machine, fed by its own queue.
struct Unit {
    unit: UnitId,
    machine: MasterSide,
    shared: Arc<Shared>,
    /// The unit's own queue, for the acknowledgements of the decisions it sends (weak, so
    /// that the task ends when the coordinator drops the unit).
    me: mpsc::WeakSender<UnitCommand>,
    /// The generation of the link the machine was last told is up.
    link: Option<u64>,
    /// The newest generation heard of.
    newest_link: u64,
    /// What the machine was last told of the cluster.
    told: Told,
    /// When this master last wrote the edge's link key again.
    relinked: Option<std::time::Instant>,
}

/// A link key is written again at most this often (see [`Unit::cluster_changed`]).
const RELINK_EVERY: Duration = Duration::from_secs(1);

/// The cluster's inputs a unit last passed on to its machine.
#[derive(Debug, Default)]
struct Told {
    peers: Option<PeerView>,
    lease: Option<Lease>,
    held: Option<Held>,
}

impl Unit {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<UnitCommand>,
        mut record: watch::Receiver<Option<EdgeRecord>>,
        mut booted: watch::Receiver<bool>,
    ) {
        let mut told_booted = false;
        let mut inputs = self.shared.cluster.as_ref().map(|c| c.inputs.clone());
        if let Some(inputs) = &mut inputs {
            self.cluster_changed(inputs).await;
        }
        loop {
            if !told_booted && *booted.borrow_and_update() {
                told_booted = true;
                let actions = self.machine.handle(Now::system(), MasterEvent::Booted);
                let _ = self.carry_out(actions).await;
            }
            let now = Now::system();
            let next = self
                .machine
                .next_poll(now)
                .map(|at| Duration::from_millis(at.since(now.mono)))
                .unwrap_or(MAX_POLL)
                .min(MAX_POLL);
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => return,
                },
                // Only the unit's own record changing wakes it (see `UnitHandle`); its
                // watch closes when the coordinator drops the unit.
                changed = record.changed() => {
                    if changed.is_err() {
                        // Retired: its location was deleted, or remade (a pair now, or
                        // other nodes), and a new unit waits for this one to end. What is
                        // queued is not acted on here; a restore waiting is told why.
                        commands.close();
                        while let Some(command) = commands.recv().await {
                            if let UnitCommand::Restore(answer) = command {
                                let _ = answer.send(Err(RestoreError::NotFound(self.unit.to_string())));
                            }
                        }
                        return;
                    }
                    let now = record.borrow_and_update().as_ref().map(settings);
                    if let Some(now) = now {
                        self.machine.set_settings(now);
                    }
                }
                changed = booted.changed(), if !told_booted => {
                    if changed.is_err() {
                        return;
                    }
                }
                changed = async { inputs.as_mut().map(|i| i.changed()).unwrap().await }, if inputs.is_some() => {
                    match (changed, inputs.as_mut()) {
                        (Ok(()), Some(inputs)) => self.cluster_changed(inputs).await,
                        _ => return,
                    }
                }
                _ = tokio::time::sleep(next) => {
                    let actions = self.machine.poll(Now::system());
                    if !actions.is_empty() {
                        let _ = self.carry_out(actions).await;
                    }
                }
            }
        }
    }

    /// Passes on what changed in the cluster's inputs for this unit, and withdraws a
    /// claim of this master's that stands while it runs nothing (one it could not
    /// withdraw while cut off from etcd).
    async fn cluster_changed(&mut self, inputs: &mut watch::Receiver<Arc<ClusterInputs>>) {
        // What this unit needs, copied out: the inputs (megabytes with thousands of
        // edges) are not held across the awaits below, by thousands of units at once.
        let (lease, peers, held, claimed_here, link_holder) = {
            let now = inputs.borrow_and_update();
            (
                now.lease,
                now.peers(&self.unit),
                now.held(&self.unit),
                now.claimed_here(&self.unit),
                now.links
                    .get(self.unit.as_str())
                    .map(|holder| (holder == &now.me, holder.clone(), now.live.contains(holder))),
            )
        };
        let mut events = Vec::new();
        if self.told.lease != Some(lease) {
            self.told.lease = Some(lease);
            events.push(MasterEvent::Lease(lease));
        }
        if self.told.peers != Some(peers) {
            self.told.peers = Some(peers);
            events.push(MasterEvent::Peers(peers));
        }
        if let Some(held) = held
            && self.told.held != Some(held)
        {
            self.told.held = Some(held);
            events.push(MasterEvent::Granted {
                grant: held.grant,
                here: held.here,
            });
        }
        for event in events {
            let actions = self.machine.handle(Now::system(), event);
            let _ = self.carry_out(actions).await;
        }
        let Some(cluster) = self.shared.cluster.clone() else {
            return;
        };
        if claimed_here
            && !self.machine.is_running()
            && let Err(err) = cluster.claims.clone().release(self.unit.clone()).await
        {
            tracing::warn!(edge = %self.unit, "cannot withdraw a stale claim: {err}");
        }
        // Link keys are an edge's; a unit of no edge has none.
        let Some(edge) = self.unit.edge() else {
            return;
        };
        let linked_here = link_holder.as_ref().is_some_and(|(here, ..)| *here);
        // Another live master's key stands: it may hold a newer link (this one may be
        // half-open), and the two would write over each other.
        let held_by_live_other = link_holder
            .as_ref()
            .is_some_and(|(here, _, live)| !*here && *live);
        let live_link = self
            .shared
            .registry
            .current(&self.unit)
            .filter(|(_, link)| !link.is_closed());
        match live_link {
            // A link key of this master's while it holds no link of the edge (an unlink
            // that failed): it would keep the others from failing the edge over.
            None if linked_here => {
                if let Err(err) = cluster.claims.clone().unlink_stale(edge).await {
                    tracing::warn!(edge = %self.unit, "cannot withdraw a stale link key: {err}");
                }
            }
            // A live link whose key is gone or names a master no longer present (a master
            // whose own link had died wrote its key late, then withdrew it): written
            // again, so that no master fails over an edge that is linked. Once a second
            // at most.
            Some((generation, _))
                if !linked_here
                    && !held_by_live_other
                    && self.relinked.is_none_or(|at| at.elapsed() >= RELINK_EVERY) =>
            {
                self.relinked = Some(std::time::Instant::now());
                tracing::info!(
                    edge = %self.unit,
                    key_names = ?link_holder.map(|(_, holder, _)| holder),
                    "the edge's link key does not name this master, which holds its link: writing it again"
                );
                if let Err(err) = cluster.claims.clone().link(edge, generation).await {
                    tracing::warn!(edge = %self.unit, "cannot write the link key again: {err}");
                }
            }
            _ => {}
        }
    }

    async fn command(&mut self, command: UnitCommand) {
        match command {
            UnitCommand::Link { generation, event } => {
                for event in self.admit(generation, event) {
                    let actions = self.machine.handle(Now::system(), event);
                    let _ = self.carry_out(actions).await;
                }
            }
            UnitCommand::Restore(reply) => {
                let answer = match self.machine.restore(Now::system()) {
                    Err(refused) => Err(RestoreError::from(refused)),
                    Ok(actions) => match self.carry_out(actions).await {
                        Ok(()) => Ok(self.machine.state()),
                        Err(NotIssued(why)) => Err(RestoreError::NotStored(why)),
                    },
                };
                let _ = reply.send(answer);
            }
            UnitCommand::Node { node, .. } => {
                tracing::warn!(edge = %self.unit, %node, "a node's event for a location of one node is ignored");
            }
        }
    }

    /// The events of link `generation` the machine should hear: none of a link replaced
    /// since, and the end of the link it knew before a newer one's start (whose own
    /// link-down may come late, or never: a replaced link's is not sent).
    fn admit(&mut self, generation: u64, event: MasterEvent) -> Vec<MasterEvent> {
        match event {
            MasterEvent::LinkUp if generation > self.newest_link => {
                self.newest_link = generation;
                let mut events = Vec::new();
                if self.link.replace(generation).is_some() {
                    events.push(MasterEvent::LinkDown {
                        last_heard: Now::system().mono,
                    });
                }
                events.push(MasterEvent::LinkUp);
                events
            }
            MasterEvent::LinkDown { .. } if self.link == Some(generation) => {
                self.link = None;
                vec![event]
            }
            MasterEvent::Report(_) | MasterEvent::Acked { .. } if self.link == Some(generation) => {
                vec![event]
            }
            other => {
                tracing::debug!(edge = %self.unit, generation, ?other, "event of a replaced link ignored");
                Vec::new()
            }
        }
    }

    /// Carries out the machine's actions in order. A grant the store did not take stops
    /// the batch there: the machine is told, and tries again later.
    /// Carries out the machine's actions, then publishes the grant it holds.
    async fn carry_out(&mut self, actions: Vec<MasterAction>) -> Result<(), NotIssued> {
        let done = self.carry_out_actions(actions).await;
        self.settle();
        done
    }

    /// Publishes the grant the machine holds when it moved without issuing one here (it
    /// took in another master's grant, or confirmed one): the API, the proxy's hints and
    /// the runtime's fence read the published one, which would otherwise stay at this
    /// master's last own grant.
    fn settle(&self) {
        let state = self.machine.state();
        let published = self
            .shared
            .states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(self.unit.as_str())
            .copied();
        if published != Some(state) {
            self.shared.runtime.set_grant(&self.unit, state);
            self.shared.publish(&self.unit, state);
        }
    }

    async fn carry_out_actions(&mut self, actions: Vec<MasterAction>) -> Result<(), NotIssued> {
        let edge = self.unit.clone();
        let edge = edge.as_str();
        for action in actions {
            match action {
                MasterAction::Issue {
                    expected,
                    grant,
                    here,
                } => {
                    let issued = self
                        .shared
                        .grants
                        .clone()
                        .issue(self.unit.clone(), expected, grant, here)
                        .await;
                    let stored = match issued {
                        Ok(()) => {
                            self.shared.runtime.set_grant(edge, grant);
                            self.shared.publish(edge, grant);
                            // A unit made again later (the edge removed and added back)
                            // starts from what is stored, not from what was at start.
                            self.shared
                                .persisted
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(self.unit.clone(), Held { grant, here });
                            continue;
                        }
                        Err(err) => {
                            tracing::error!(
                                edge,
                                ?grant,
                                "grant not issued, so not acted on (tried again in {} ms): {err}",
                                tether_common::control::master::ISSUE_RETRY_MS
                            );
                            (err.stored_held(), err.to_string())
                        }
                    };
                    self.shared.runtime.metrics().grant_store_failed(edge);
                    self.machine.issue_failed(Now::system(), stored.0);
                    let state = self.machine.state();
                    self.shared.runtime.set_grant(edge, state);
                    self.shared.publish(edge, state);
                    return Err(NotIssued(stored.1));
                }
                MasterAction::Audit(record) => {
                    tracing::warn!(
                        edge,
                        from = owner_name(record.from),
                        to = owner_name(record.to),
                        epoch = %record.epoch,
                        "change of owner: {}",
                        record.reason
                    );
                    self.shared
                        .store
                        .record_audits(vec![record], AUDIT_KEEP)
                        .await;
                }
                MasterAction::Confirm { grant } => {
                    if let Err(err) = self
                        .shared
                        .grants
                        .clone()
                        .confirm(self.unit.clone(), grant)
                        .await
                    {
                        tracing::warn!(edge, ?grant, "the grant changed meanwhile: {err}");
                        self.machine.issue_failed(Now::system(), err.stored_held());
                        return Err(NotIssued(err.to_string()));
                    }
                }
                // A master alone has no lease, so nothing to claim on it.
                MasterAction::ClaimRunning => {
                    let Some(cluster) = &self.shared.cluster else {
                        continue;
                    };
                    let epoch = self.machine.state().epoch;
                    if let Err(err) = cluster.claims.clone().claim(self.unit.clone(), epoch).await {
                        tracing::error!(edge, %epoch, "not started, the claim was refused: {err}");
                        self.shared.runtime.metrics().grant_store_failed(edge);
                        self.machine.issue_failed(Now::system(), None);
                        return Err(NotIssued(err.to_string()));
                    }
                }
                MasterAction::ReleaseRunning => {
                    if let Some(cluster) = &self.shared.cluster
                        && let Err(err) = cluster.claims.clone().release(self.unit.clone()).await
                    {
                        // It goes with the lease, or when etcd is back (cluster_changed).
                        tracing::warn!(edge, "cannot withdraw the claim yet: {err}");
                    }
                }
                MasterAction::StartModules { epoch } => {
                    // The claim may have taken a while: start only on a lease that still
                    // allows (the machine, told it lapsed, stops what it thinks it runs).
                    if let Some(cluster) = &self.shared.cluster
                        && !cluster.inputs.borrow().lease.allows(Now::system().mono)
                    {
                        tracing::warn!(edge, %epoch, "not started: the lease lapsed meanwhile");
                        continue;
                    }
                    tracing::info!(edge, %epoch, "the master starts the edge's modules");
                    self.set_running(true);
                    self.shared.reconcile(|_| false).await;
                }
                MasterAction::StopModules => {
                    tracing::info!(edge, "the master stops the edge's modules");
                    self.set_running(false);
                    self.shared.stop_unit_modules(edge).await;
                }
                MasterAction::SendDecision {
                    owner,
                    epoch,
                    reason,
                } => self.send_decision(owner, epoch, reason),
                MasterAction::SendReady => {
                    if let Some((_, link)) = self.shared.registry.current(edge) {
                        tokio::spawn(async move {
                            let _ = link.request(Request::MasterReady, DECISION_TIMEOUT).await;
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn set_running(&self, running: bool) {
        self.shared.set_running(&self.unit, running);
    }

    /// Sends a decision without waiting: the acknowledgement comes back as an event. An
    /// edge that refuses it (a stale epoch) or does not answer loses its link, and the
    /// next link negotiates afresh.
    fn send_decision(&self, owner: Owner, epoch: Epoch, reason: String) {
        let Some((generation, link)) = self.shared.registry.current(&self.unit) else {
            return;
        };
        let me = self.me.clone();
        let edge = self.unit.clone();
        tokio::spawn(async move {
            let request = Request::ControlDecision {
                owner,
                epoch,
                reason,
            };
            match link.request(request, DECISION_TIMEOUT).await {
                Ok(Response::ControlAck { epoch }) => {
                    if let Some(unit) = me.upgrade() {
                        let event = MasterEvent::Acked { epoch };
                        let _ = unit.send(UnitCommand::Link { generation, event }).await;
                    }
                }
                Ok(other) => {
                    tracing::error!(%edge, "the edge answered a decision with {other:?}");
                    link.close("unexpected answer to a control decision");
                }
                Err(LinkError::Remote(err)) if err.code == ErrorCode::StaleEpoch => {
                    tracing::warn!(%edge, "the edge refused a decision: {}", err.message);
                    link.close(format!("control decision refused: {}", err.message));
                }
                Err(err) => {
                    if !link.is_closed() {
                        tracing::warn!(%edge, "control decision failed: {err}");
                        link.close(format!("control decision failed: {err}"));
                    }
                }
            }
        });
    }
}
