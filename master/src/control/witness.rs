//! The master as a site pair's witness: one task per location with nodes, owning the
//! location's [`WitnessSide`] machine (DESIGN.md, "Site pairs and collector arrays"). It
//! feeds the machine its nodes' links and reports, the model's settings and the time, and
//! carries out its actions in order: a grant is stored before it is sent to the nodes (one
//! the store did not take is not sent, and is tried again on the next poll), and the
//! master's own start or stop of the location's modules completes before what follows.
//!
//! Among several masters one master witnesses a pair at a time: the one the rendezvous
//! hash of the location picks among the live masters, while its lease allows. Only it
//! accepts the pair's node links (the others refuse them in the handshake, so a node moves
//! on to the next master in its list at once, and never counts a refused link as heard),
//! so it sees both nodes as a master alone does. Its grants go to etcd by compare-and-set
//! (a stale witness's grant is refused), a grant naming the master carries its claim of the
//! modules, and it holds the location's link key, so that the other masters send clients'
//! calls for the pair's rooms to it. The others follow the stored grant for their API.
//!
//! Its grants are published like a single edge's (owner `edge` while a node holds, with
//! the grant's epoch), so the API, the runtime's fence and the proxy's hints read them as
//! they read an edge's; the registry learns the holder node, so calls reach it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tether_common::control::pair::{
    GrantProof, NodeReport, PairGrant, PairHolder, PairSettings, WitnessAction, WitnessEvent,
    WitnessSide,
};
use tether_common::control::placement::rendezvous_pick;
use tether_common::control::{AuditRecord, EdgeId, NodeId, Now, UnitId};
use tether_common::model::EdgeRecord;
use tether_common::protocol::Request;
use tokio::sync::{mpsc, watch};

use super::{AUDIT_KEEP, ClusterInputs, RestoreError, Shared, UnitCommand, now_ms};

/// How often the witness looks at the time while a node is off this master (a failover
/// is then a matter of time, and its grant should not wait for a slow poll) ...
const POLL_PENDING: Duration = Duration::from_millis(25);
/// ... and while both are linked (a device hold-down, a lease running out).
const POLL_QUIET: Duration = Duration::from_millis(250);
/// How long a node may take to take a grant.
const GRANT_TIMEOUT: Duration = Duration::from_secs(10);

/// What happened on a node's link.
#[derive(Debug, Clone)]
pub enum NodeLinkEvent {
    /// It came up.
    Up,
    /// It went down; its last frame came then.
    Down {
        /// On the monotonic clock.
        last_heard: tether_common::control::Mono,
    },
    /// The node reported where it stands.
    Report(NodeReport),
}

/// One pair location's witness (or, among several masters, its follower).
pub(super) struct Witness {
    location: UnitId,
    nodes: Vec<String>,
    settings: PairSettings,
    /// While this master witnesses the pair.
    machine: Option<WitnessSide>,
    shared: Arc<Shared>,
    /// The current link generation of each node.
    links: HashMap<NodeId, u64>,
    /// The newest link generation heard of each node (kept after its link went, so that
    /// a late event of an older link is never taken for a live one).
    newest: HashMap<NodeId, u64>,
    /// The grant stored last, as this master knows it (none: none stored).
    sent: Option<PairGrant>,
    /// Whether the location's modules run here (the master holds them, its claim stored).
    running_here: bool,
    /// When it last wrote the location's link key again.
    relinked: Option<std::time::Instant>,
}

impl Witness {
    /// The witness of `record`'s location; it begins witnessing in [`run`](Self::run).
    pub(super) fn new(shared: Arc<Shared>, record: &EdgeRecord) -> Witness {
        Witness {
            location: UnitId::new(record.id.as_str()),
            nodes: record.nodes.clone(),
            settings: PairSettings::of(record),
            machine: None,
            shared,
            links: HashMap::new(),
            newest: HashMap::new(),
            sent: None,
            running_here: false,
            relinked: None,
        }
    }

    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<UnitCommand>,
        mut record: watch::Receiver<Option<EdgeRecord>>,
        mut booted: watch::Receiver<bool>,
        after: Option<tokio::task::JoinHandle<()>>,
    ) {
        // The location's previous unit (other nodes, or one edge) ends first: its end
        // closes links and stops modules that this one may hold.
        if let Some(previous) = after {
            let _ = previous.await;
        }
        let mut inputs = self.shared.cluster.as_ref().map(|c| c.inputs.clone());
        match &mut inputs {
            Some(inputs) => self.cluster_changed(inputs).await,
            None => self.begin().await,
        }
        let mut next_poll = tokio::time::Instant::now();
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => break,
                },
                // Only this location's record changing wakes it (see `UnitHandle`); its
                // watch closes when the coordinator drops the witness.
                changed = record.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let settings = record
                        .borrow_and_update()
                        .as_ref()
                        .filter(|now| now.nodes == self.nodes)
                        .map(PairSettings::of);
                    match settings {
                        Some(settings) => {
                            self.settings = settings;
                            if let Some(machine) = &mut self.machine {
                                machine.set_settings(settings);
                            }
                        }
                        // Other nodes make another unit (the coordinator replaces this one).
                        None => break,
                    }
                }
                changed = async { inputs.as_mut().map(|i| i.changed()).unwrap().await }, if inputs.is_some() => {
                    match (changed, inputs.as_mut()) {
                        (Ok(()), Some(inputs)) => self.cluster_changed(inputs).await,
                        _ => break,
                    }
                }
                _ = tokio::time::sleep_until(next_poll) => {
                    next_poll = tokio::time::Instant::now() + self.poll_period();
                    if let Some(inputs) = &mut inputs {
                        // The lease runs out with time alone.
                        self.cluster_changed(inputs).await;
                    }
                    // Nothing is decided before the boot wait: the nodes have that long to
                    // link, as an edge has.
                    if *booted.borrow_and_update()
                        && let Some(machine) = &mut self.machine
                    {
                        let actions = machine.poll(Now::system().mono);
                        self.carry_out(actions).await;
                    }
                }
            }
            // A node gone meanwhile: look sooner.
            next_poll = next_poll.min(tokio::time::Instant::now() + self.poll_period());
        }
        self.end("the location was removed or changed").await;
    }

    /// How soon to look at the time again: soon while a node is off this master.
    fn poll_period(&self) -> Duration {
        match self.machine.is_some() && self.links.len() < self.nodes.len() {
            true => POLL_PENDING,
            false => POLL_QUIET,
        }
    }

    /// Among several masters: witnesses the pair while this master is the one to, and
    /// follows the stored grant otherwise.
    async fn cluster_changed(&mut self, inputs: &mut watch::Receiver<Arc<ClusterInputs>>) {
        let (should, stored, keyed_here) = {
            let now = inputs.borrow_and_update();
            let picked = rendezvous_pick(self.location.as_str(), &now.live) == Some(&now.me);
            (
                picked && now.lease.allows(Now::system().mono),
                now.pair_grants.get(&self.location).cloned(),
                now.links.get(self.location.as_str()) == Some(&now.me),
            )
        };
        match (self.machine.is_some(), should) {
            (false, true) => self.begin().await,
            (true, false) => {
                self.end("another master witnesses the pair now, or this master's lease is gone")
                    .await
            }
            (false, false) => {
                if let Some(stored) = stored
                    && self.sent.as_ref() != Some(&stored)
                {
                    self.publish(&stored);
                    self.sent = Some(stored);
                }
            }
            // The location's link key names another master (one that witnessed for a
            // moment as the masters joined wrote it last, or withdrew it): written again,
            // once a second at most, so the others send calls here.
            (true, true) => {
                if !keyed_here
                    && self
                        .relinked
                        .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
                    && let Some(cluster) = &self.shared.cluster
                {
                    self.relinked = Some(std::time::Instant::now());
                    let edge = EdgeId::new(self.location.as_str());
                    if let Err(err) = cluster.claims.clone().link(edge, 0).await {
                        tracing::warn!(edge = %self.location, "cannot write the pair's link key again: {err}");
                    }
                }
            }
        }
    }

    /// Starts witnessing: from the grant stored last (a location new to the witnesses
    /// gets its first, naming the preferred node at epoch 1, above the epoch 0 a node
    /// starts from), with no node linked yet; node links are accepted from now on.
    async fn begin(&mut self) {
        let first = PairGrant {
            epoch: PairGrant::initial(&self.nodes).epoch.next(),
            ..PairGrant::initial(&self.nodes)
        };
        let stored = self
            .shared
            .pair_grants
            .clone()
            .load_pair(self.location.clone())
            .await;
        let stored = match stored {
            Ok(stored) => stored,
            Err(err) => {
                // Tried again on the next change or poll.
                tracing::error!(edge = %self.location, "cannot read the stored pair grant, so not witnessing yet: {err}");
                return;
            }
        };
        let grant = stored.clone().unwrap_or(first);
        tracing::info!(edge = %self.location, ?grant, "this master witnesses the site pair");
        self.publish(&grant);
        self.sent = stored;
        self.links.clear();
        self.machine = Some(WitnessSide::new(
            self.nodes.iter().map(NodeId::new).collect(),
            self.settings,
            grant,
            Now::system().mono,
        ));
        self.shared
            .registry
            .set_witnessed(self.location.as_str(), true);
        // Clients' calls for the pair's rooms come here from the other masters.
        if let Some(cluster) = &self.shared.cluster {
            let edge = EdgeId::new(self.location.as_str());
            if let Err(err) = cluster.claims.clone().link(edge, 0).await {
                tracing::warn!(edge = %self.location, "cannot store the pair's link key: {err}");
            }
        }
        // A first grant is stored (and sent) at once.
        self.carry_out(Vec::new()).await;
    }

    /// Stops witnessing: node links closed (they go to the master that witnesses now),
    /// the location's modules stopped here and their claim withdrawn.
    async fn end(&mut self, why: &str) {
        if self.machine.take().is_none() {
            return;
        }
        tracing::warn!(edge = %self.location, "this master no longer witnesses the site pair: {why}");
        self.shared
            .registry
            .set_witnessed(self.location.as_str(), false);
        self.shared
            .registry
            .close_nodes(self.location.as_str(), why);
        self.links.clear();
        if self.running_here {
            self.stop_here().await;
        }
        if let Some(cluster) = &self.shared.cluster {
            let claims = cluster.claims.clone();
            if let Err(err) = claims.clone().release(self.location.clone()).await {
                tracing::warn!(edge = %self.location, "cannot withdraw the claim yet: {err}");
            }
            let edge = EdgeId::new(self.location.as_str());
            if let Err(err) = claims.unlink(edge, 0).await {
                tracing::warn!(edge = %self.location, "cannot withdraw the pair's link key: {err}");
            }
        }
    }

    async fn command(&mut self, command: UnitCommand) {
        match command {
            UnitCommand::Node {
                node,
                generation,
                event,
            } => {
                if self.machine.is_none() {
                    // Linked in the instant this master stopped witnessing: it goes to the
                    // witness (a node must not count as heard a master that never grants).
                    if let NodeLinkEvent::Up = event
                        && let Some(link) = self.shared.registry.link_of_node(&node)
                    {
                        link.close("this master does not witness the node's site pair");
                    }
                    return;
                }
                let event = match event {
                    NodeLinkEvent::Up => {
                        let newer = self.newest.get(&node).is_none_or(|g| generation > *g);
                        if !newer {
                            return;
                        }
                        self.newest.insert(node.clone(), generation);
                        self.links.insert(node.clone(), generation);
                        // It learns the grant at once (once stored), whatever the machine
                        // decides.
                        if let Some(sent) = &self.sent {
                            self.send_grant_to(&node, sent.clone());
                        }
                        WitnessEvent::Up(node)
                    }
                    NodeLinkEvent::Down { last_heard } => {
                        if self.links.get(&node) != Some(&generation) {
                            return;
                        }
                        self.links.remove(&node);
                        WitnessEvent::Down(node, last_heard)
                    }
                    NodeLinkEvent::Report(report) => {
                        if self.links.get(&node) != Some(&generation) {
                            return;
                        }
                        if let Some(machine) = &mut self.machine
                            && report.epoch > machine.grant().epoch
                        {
                            // Grants this witness never stored: its store lost them (a
                            // restored backup, a pair moved onto etcd). It issues above
                            // the node's from now on (stored with its next grant).
                            tracing::warn!(edge = %self.location, %node, node_epoch = %report.epoch, witness_epoch = %machine.grant().epoch, "a node holds a newer pair grant than this witness stored: issuing above it");
                            machine.raise_epoch(report.epoch);
                        }
                        WitnessEvent::Report(node, report)
                    }
                };
                if let Some(machine) = &mut self.machine {
                    let actions = machine.handle(Now::system().mono, event);
                    self.carry_out(actions).await;
                }
            }
            UnitCommand::Restore(reply) => {
                let Some(machine) = &mut self.machine else {
                    let _ = reply.send(Err(RestoreError::NotStored(
                        "another master witnesses this site pair: restore it there".into(),
                    )));
                    return;
                };
                let before = machine.grant().clone();
                let actions = machine.handle(Now::system().mono, WitnessEvent::Restore);
                let moved = machine.grant() != &before;
                self.carry_out(actions).await;
                let answer = match (&self.sent, &self.machine) {
                    _ if !moved => Err(RestoreError::NotStored(match before.holder {
                        PairHolder::Master => "no node of the pair is linked to this master".into(),
                        _ => "a node of the pair holds the modules already".into(),
                    })),
                    (Some(sent), Some(machine)) if sent == machine.grant() => {
                        Ok(sent.control_state())
                    }
                    _ => Err(RestoreError::NotStored(
                        "the grant could not be stored".into(),
                    )),
                };
                let _ = reply.send(answer);
            }
            UnitCommand::Link { .. } => {
                tracing::warn!(edge = %self.location, "a link under a pair location's own id is ignored: its nodes link");
            }
        }
    }

    /// Carries out the machine's actions in order; a grant not stored stops the batch
    /// (the next poll stores and sends it).
    async fn carry_out(&mut self, actions: Vec<WitnessAction>) {
        for action in actions {
            match action {
                WitnessAction::Issue(grant) => {
                    if !self.store_and_send(grant).await {
                        return;
                    }
                }
                WitnessAction::Start { epoch } => {
                    tracing::info!(edge = %self.location, %epoch, "the master starts the pair's modules (no node linked)");
                    self.start_here().await;
                }
                WitnessAction::Stop => {
                    tracing::info!(edge = %self.location, "the master stops the pair's modules");
                    self.stop_here().await;
                }
            }
        }
        let Some(machine) = &self.machine else {
            return;
        };
        // A grant the store refused earlier: again.
        let current = machine.grant().clone();
        let wants_running = machine.is_running();
        if self.sent.as_ref() != Some(&current) && !self.store_and_send(current).await {
            return;
        }
        // A start whose claim was refused: again.
        if wants_running && !self.running_here {
            self.start_here().await;
        }
    }

    /// Runs the location's modules here, once this master's claim is stored (among
    /// several masters: the stored grant written again, which carries the claim).
    async fn start_here(&mut self) {
        if self.running_here {
            return;
        }
        if self.shared.cluster.is_some() {
            let Some(sent) = self.sent.clone() else {
                return;
            };
            let claimed = self
                .shared
                .pair_grants
                .clone()
                .issue_pair(self.location.clone(), Some(sent.clone()), sent)
                .await;
            if let Err(err) = claimed {
                tracing::warn!(edge = %self.location, "not started, the claim was refused (tried again): {err}");
                return;
            }
        }
        self.running_here = true;
        self.shared.set_running(&self.location, true);
        self.shared.reconcile(|_| false).await;
    }

    /// Stops the location's modules here, devices disconnected, before what follows.
    async fn stop_here(&mut self) {
        self.running_here = false;
        self.shared.set_running(&self.location, false);
        self.shared.stop_unit_modules(&self.location).await;
    }

    /// Stores `grant`, then publishes it and sends it to every linked node; false when it
    /// could not be stored (nothing sent). Among several masters a refusal whose stored
    /// grant differs means another witness decided: this one starts again from it.
    async fn store_and_send(&mut self, grant: PairGrant) -> bool {
        let stored = self
            .shared
            .pair_grants
            .clone()
            .issue_pair(self.location.clone(), self.sent.clone(), grant.clone())
            .await;
        if let Err(err) = stored {
            tracing::error!(edge = %self.location, ?grant, "pair grant not stored, so not sent (tried again): {err}");
            self.shared
                .runtime
                .metrics()
                .grant_store_failed(&self.location);
            let reread = self
                .shared
                .pair_grants
                .clone()
                .load_pair(self.location.clone())
                .await;
            if let Ok(Some(stored)) = reread
                && self.sent.as_ref() != Some(&stored)
            {
                tracing::warn!(edge = %self.location, ?stored, "another witness stored a newer pair grant: starting again from it");
                self.sent = Some(stored.clone());
                self.publish(&stored);
                self.machine = Some(WitnessSide::new(
                    self.nodes.iter().map(NodeId::new).collect(),
                    self.settings,
                    stored,
                    Now::system().mono,
                ));
                // The new machine runs nothing yet: neither may this master (it starts
                // again under the stored grant if that names it, with its claim).
                if self.running_here {
                    self.stop_here().await;
                }
            }
            return false;
        }
        let before = self
            .sent
            .replace(grant.clone())
            .map(|g| g.control_state())
            .unwrap_or_default();
        self.publish(&grant);
        let state = grant.control_state();
        let record = AuditRecord {
            time_ms: now_ms(),
            edge: self.location.clone(),
            from: before.owner,
            to: state.owner,
            epoch: state.epoch,
            reason: reason(&grant),
            code: None,
        };
        tracing::warn!(edge = %self.location, epoch = %grant.epoch, "pair grant: {}", record.reason);
        self.shared
            .store
            .record_audits(vec![record], AUDIT_KEEP)
            .await;
        for node in self.links.keys() {
            self.send_grant_to(node, grant.clone());
        }
        true
    }

    /// What the API, the runtime's fence and the proxy read of the location.
    fn publish(&self, grant: &PairGrant) {
        let state = grant.control_state();
        self.shared.runtime.set_grant(&self.location, state);
        self.shared.publish(&self.location, state);
        self.shared
            .registry
            .set_holder(&self.location, grant.node().map(|n| n.as_str()));
    }

    /// `grant`'s proof for each node: a node takes a grant only with its own, so one its
    /// peer passes on cannot be forged by the peer.
    fn proofs(&self, grant: &PairGrant) -> Vec<GrantProof> {
        self.nodes
            .iter()
            .filter_map(|node| {
                let secret = self.shared.registry.node_secret(node)?;
                Some(GrantProof {
                    node: NodeId::new(node.as_str()),
                    mac: tether_common::link::auth::grant_proof(
                        &secret,
                        self.location.as_str(),
                        grant,
                    ),
                })
            })
            .collect()
    }

    /// Sends `grant` to `node`'s current link, with its proofs, without waiting.
    fn send_grant_to(&self, node: &NodeId, grant: PairGrant) {
        let Some(link) = self.shared.registry.link_of_node(node) else {
            return;
        };
        let proofs = self.proofs(&grant);
        let location = self.location.clone();
        tokio::spawn(async move {
            if let Err(err) = link
                .request(Request::PairGrant { grant, proofs }, GRANT_TIMEOUT)
                .await
            {
                tracing::warn!(edge = %location, node = %link.peer(), "the node did not take the pair grant: {err}");
            }
        });
    }
}

/// What the audit log says of a grant.
fn reason(grant: &PairGrant) -> String {
    match &grant.holder {
        PairHolder::Node(node) => format!("site pair: node {node} holds the modules"),
        PairHolder::Master => {
            "site pair: no node linked for the location's timeout, the master holds the modules"
                .into()
        }
        PairHolder::Moving(node) => format!(
            "site pair: the holder is released, the modules go to node {node} once it has stopped"
        ),
    }
}
