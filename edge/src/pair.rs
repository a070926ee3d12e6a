//! A site pair's node (DESIGN.md, "Site pairs and collector arrays"): the control task
//! that owns the node's [`NodeSide`] machine, and the link to its peer.
//!
//! The task feeds the machine the master link and the peer link (up, down, and every frame
//! heard, looked at every [`POLL`]), the witness's grants and the peer's notes, and carries
//! out its actions in order: a grant is stored before what follows it is acted on; the
//! modules start or stop (a stop completes, devices disconnected, before the peer is told
//! so: break before make); reports go to the master, notes and grants to the peer.
//!
//! The peer link is the edge link: TLS (the listening node presents its API certificate,
//! the connecting one its link certificate, which names it), the secret handshake with
//! the location's secret, heartbeats. Over it the holder also streams its modules' status,
//! which the standby keeps for the modules it keeps warm, so a takeover starts from it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tether_common::control::clock::wall_now_ms;
use tether_common::control::pair::{
    GrantProof, MAX_GRANT_PROOFS, NodeAction, NodeEvent, NodeReport, NodeSide, PairGrant,
    PairSettings, PeerNote,
};
use tether_common::control::{AuditRecord, ControlState, EdgeId, Mono, NodeId, Owner, clock};
use tether_common::link::{
    AuthenticatedEdge, EdgeSecrets, Incoming, Link, LinkConfig, LinkEvent, ListenerConfig, Secret,
};
use tether_common::protocol::{ErrorCode, Notice, RemoteError, Request};
use tether_common::runtime::Runtime;
use tether_common::store::Store;
use tokio::sync::{mpsc, watch};

use crate::control::{
    AUDIT_KEEP, Command, ControlView, EdgeControl, PeerEvent, Running, reconcile_modules,
    report_audits, stream_status,
};
use crate::replica::Replica;

/// How often the node looks at its links' last frames and at the time.
const POLL: Duration = Duration::from_millis(100);
/// How long the master may take to take a report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(15);
/// Ticks between two tellings of whether this node polls (a second).
const POLLING_RETELL_TICKS: u32 = 10;

/// What a node knows of one of its peers, on their current link.
#[derive(Default)]
struct PeerState {
    link: Option<Link>,
    /// The last frame fed to the machine.
    heard: Option<Mono>,
    /// The peer's last note the machine took.
    note_taken: Option<PeerNote>,
    /// What this node tells the peer on this link, for its sender task (which waits for
    /// room on the link, so the control task never does).
    out: Option<watch::Sender<PeerOut>>,
    /// Whether the peer polls its location's collector arrays.
    polling: bool,
}

/// One node's control.
pub(crate) struct NodeTask {
    location: EdgeId,
    node: NodeId,
    /// Its peers (a pair's other node, or each other node of the location), by id.
    peers: BTreeMap<NodeId, PeerState>,
    /// This node's own secret: a grant is taken only with its proof under it.
    secret: Secret,
    machine: NodeSide,
    /// The grant stored last, and the witness's proofs of it (passed on to the peers).
    stored: PairGrant,
    proofs: Vec<GrantProof>,
    /// The latest report, for the link to the master (one sender a link, in order).
    report: watch::Sender<Option<NodeReport>>,
    /// This node's collector-array slot, for the link to the master.
    slot: watch::Sender<Option<(u64, u64)>>,
    /// Whether this node polls its location's collector arrays.
    polling: bool,
    /// Ticks since this node last told its peers whether it polls.
    polling_ticks: u32,
    replica: Arc<Replica>,
    runtime: Runtime,
    store: Arc<Store>,
    master: Option<Link>,
    /// The last frame from the master fed to the machine.
    master_heard: Option<Mono>,
    view: Arc<RwLock<ControlView>>,
    heartbeat_ms: u64,
    /// Since when it has run the modules with no master linked (wall
    /// clock, for the audit), until a grant decides: under `isolation = "continue"` a
    /// standby may have been granted them meanwhile, and that overlap is reported.
    isolated_since: Option<(std::time::Instant, u64)>,
}

impl NodeTask {
    pub(crate) fn new(
        location: EdgeId,
        (node, peers, secret): (NodeId, Vec<NodeId>, Secret),
        replica: Arc<Replica>,
        runtime: Runtime,
        view: Arc<RwLock<ControlView>>,
        heartbeat_ms: u64,
    ) -> anyhow::Result<NodeTask> {
        let store = replica.store();
        let (model, _) = replica.snapshot();
        let record = model.edges.get(location.as_str());
        let nodes = record.map(|r| r.nodes.clone()).unwrap_or_default();
        let stored = match store.pair_grant(location.as_str())? {
            Some(grant) => grant,
            None => PairGrant::initial(&nodes),
        };
        let settings = settings(record, location.as_str(), heartbeat_ms);
        let proofs = store.pair_proofs(location.as_str())?;
        runtime.set_grant(&location, stored.control_state());
        Ok(NodeTask {
            machine: NodeSide::new(
                node.clone(),
                peers.clone(),
                settings,
                stored.clone(),
                clock::mono_now(),
            ),
            peers: peers
                .into_iter()
                .map(|peer| (peer, PeerState::default()))
                .collect(),
            location,
            node,
            secret,
            proofs,
            stored,
            report: watch::channel(None).0,
            slot: watch::channel(None).0,
            polling: false,
            polling_ticks: 0,
            replica,
            runtime,
            store,
            master: None,
            master_heard: None,
            view,
            heartbeat_ms,
            isolated_since: None,
        })
    }

    pub(crate) async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mail: Arc<PeerMail>,
    ) {
        tracing::info!(edge = %self.location, node = %self.node, grant = ?self.stored, "site pair node: waiting for its witness's grant");
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // A peer's link is taken in (up, down) before the letters that came over
                // it, which are read only while their link is the peer's current one.
                biased;
                command = commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => return,
                },
                _ = mail.arrived.notified() => {
                    for (peer, letters) in mail.take() {
                        self.read_mail(peer, letters).await;
                    }
                }
                _ = tick.tick() => {
                    self.tell_polling();
                    let mut actions = self.feed_heard();
                    actions.extend(self.machine.poll(clock::mono_now()));
                    self.carry_out(actions).await;
                    // Without a master, on its own or with peers (which may reach none
                    // either): a node granted the modules meanwhile is the overlap
                    // "continue" allows, reported when this node learns of the grant.
                    if self.machine.is_running()
                        && self.master.is_none()
                        && self.isolated_since.is_none()
                    {
                        tracing::warn!(edge = %self.location, node = %self.node, "site pair: this node runs the modules with no master linked");
                        self.isolated_since = Some((std::time::Instant::now(), wall_now_ms()));
                    }
                }
            }
            self.publish();
            self.set_array_slot();
        }
    }

    /// What a peer sent since the last look: a grant it passed on first (its note is read
    /// against it, as it sent them), then its note, then whether it polls.
    async fn read_mail(&mut self, peer: NodeId, letters: PeerLetters) {
        let current = self.peers.get(&peer).and_then(|state| state.link.as_ref());
        let over_current = match (current, &letters.link) {
            (Some(current), Some(link)) => current.same_link(link),
            _ => false,
        };
        if !over_current {
            // Sent over a link since gone or replaced: what the peer says on its current
            // link counts (it tells it again on every new link).
            return;
        }
        if let Some((grant, proofs)) = letters.grant
            && let Err(err) = self.take_grant(grant, proofs, false).await
        {
            tracing::warn!(%peer, "a grant passed on by a peer was not taken: {err}");
        }
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if let Some(polling) = letters.polling {
            state.polling = polling;
        }
        // The same note again (a link come back) changes nothing.
        if let Some(note) = letters.note
            && state.note_taken.as_ref() != Some(&note)
        {
            state.note_taken = Some(note.clone());
            let actions = self
                .machine
                .handle(clock::mono_now(), NodeEvent::PeerNote(peer, note));
            self.carry_out(actions).await;
        }
    }

    /// The peers whose links are up, with them.
    fn linked_peers(&self) -> impl Iterator<Item = (&NodeId, &Link)> {
        self.peers
            .iter()
            .filter_map(|(id, state)| Some((id, state.link.as_ref()?)))
    }

    /// Takes a grant, from the witness (`from_master`) or passed on by a peer: only with
    /// a valid proof of its own, and a newer one stored before the machine acts on it.
    async fn take_grant(
        &mut self,
        grant: PairGrant,
        proofs: Vec<GrantProof>,
        from_master: bool,
    ) -> Result<(), String> {
        if proofs.len() > MAX_GRANT_PROOFS {
            return Err(format!(
                "{} proofs: a grant carries at most {MAX_GRANT_PROOFS}",
                proofs.len()
            ));
        }
        let proven = proofs.iter().any(|proof| {
            proof.node == self.node
                && tether_common::link::auth::verify_grant_proof(
                    &self.secret,
                    self.location.as_str(),
                    &grant,
                    &proof.mac,
                )
        });
        if !proven {
            return Err(format!(
                "epoch {}: no valid proof for node {} (not the witness's, or altered)",
                grant.epoch, self.node
            ));
        }
        // The witness confirms this node: whatever it ran cut off was its own.
        if from_master && grant.node() == Some(&self.node) {
            self.isolated_since = None;
        }
        if self.machine.grant().superseded_by(&grant) {
            self.store_grant(&grant, proofs).await?;
        }
        let actions = self
            .machine
            .handle(clock::mono_now(), NodeEvent::Granted { grant, from_master });
        self.carry_out(actions).await;
        Ok(())
    }

    /// This node's turn in its location's collector arrays: its rank among the nodes that
    /// poll (itself, and each peer while their link is up), in the location's order. A
    /// node whose array modules do not reach their devices takes no turn, so the other
    /// reads every interval rather than half the reads going missing.
    fn set_array_slot(&self) {
        let (model, _) = self.replica.snapshot();
        let Some(record) = model.edges.get(self.location.as_str()) else {
            return;
        };
        let live: Vec<NodeId> = record
            .nodes
            .iter()
            .map(NodeId::new)
            .filter(|node| match *node == self.node {
                true => self.polling,
                false => self
                    .peers
                    .get(node)
                    .is_some_and(|peer| peer.link.is_some() && peer.polling),
            })
            .collect();
        let slot = tether_common::control::array::slot(&live, &self.node);
        self.runtime.set_array_slot(slot);
        self.slot.send_if_modified(|told| {
            let now = slot.map(|s| (s.rank, s.of));
            let changed = *told != now;
            *told = now;
            changed
        });
    }

    /// Whether this node polls its collector arrays now: its modules of `shared_polling`
    /// drivers run here and each reaches its device. The peers hear of every change.
    fn tell_polling(&mut self) {
        let polling = {
            let (model, _) = self.replica.snapshot();
            let arrays = array_modules(&model, &self.location);
            // Each runs here, and reaches its device if it has one.
            let running = self.runtime.running();
            !arrays.is_empty()
                && arrays.iter().all(|id| {
                    running.contains(id) && self.runtime.device_connected(id) != Some(false)
                })
        };
        self.polling = polling;
        // Told on every change, and again every second: a notice that crossed a link
        // replaced meanwhile is made good within a second.
        self.polling_ticks = (self.polling_ticks + 1) % POLLING_RETELL_TICKS;
        let retell = self.polling_ticks == 0;
        for out in self.peers.values().filter_map(|state| state.out.as_ref()) {
            out.send_if_modified(|out| {
                let due = retell || out.polling != Some(polling);
                if due {
                    out.polling = Some(polling);
                    out.polling_told += 1;
                }
                due
            });
        }
    }

    /// Tells the machine of the frames heard since it last looked (the silences it
    /// times are counted from the last frame of each link).
    fn feed_heard(&mut self) -> Vec<NodeAction> {
        let now = clock::mono_now();
        let mut actions = Vec::new();
        if let Some(link) = &self.master {
            let heard = link.last_heard();
            if self.master_heard != Some(heard) {
                self.master_heard = Some(heard);
                actions.extend(self.machine.handle(now, NodeEvent::MasterHeard));
            }
        }
        for (id, state) in &mut self.peers {
            if let Some(link) = &state.link {
                let heard = link.last_heard();
                if state.heard != Some(heard) {
                    state.heard = Some(heard);
                    actions.extend(self.machine.handle(now, NodeEvent::PeerHeard(id.clone())));
                }
            }
        }
        actions
    }

    async fn command(&mut self, command: Command) {
        let now = clock::mono_now();
        let actions = match command {
            Command::Link(event, link) => {
                use tether_common::control::EdgeEvent;
                match event {
                    EdgeEvent::LinkUp => {
                        self.master = link.clone();
                        self.master_heard = None;
                        if let Some(link) = link {
                            tokio::spawn(report_audits(link.clone(), self.store.clone()));
                            tokio::spawn(send_reports(link.clone(), self.report.subscribe()));
                            tokio::spawn(send_slots(link.clone(), self.slot.subscribe()));
                            let status =
                                stream_status(link, self.runtime.clone(), self.view.clone());
                            tokio::spawn(status);
                        }
                        self.machine.handle(now, NodeEvent::MasterUp)
                    }
                    EdgeEvent::LinkDown | EdgeEvent::AttemptFailed => match self.master.take() {
                        Some(old) => {
                            let last_heard = old.last_heard();
                            self.machine
                                .handle(now, NodeEvent::MasterDown { last_heard })
                        }
                        None => Vec::new(),
                    },
                    EdgeEvent::MasterReady => Vec::new(),
                }
            }
            Command::Decision { reply, .. } => {
                let _ = reply.send(Err(crate::control::DecisionRefused::PairNode));
                Vec::new()
            }
            Command::ReplicaChanged => {
                let (model, _) = self.replica.snapshot();
                let record = model.edges.get(self.location.as_str());
                if let Some(record) = record {
                    let mut named: Vec<&str> = self.peers.keys().map(NodeId::as_str).collect();
                    named.push(self.node.as_str());
                    named.sort_unstable();
                    let mut nodes: Vec<&str> = record.nodes.iter().map(String::as_str).collect();
                    nodes.sort_unstable();
                    if named != nodes {
                        // The witness reads this node's reports about its peers by id, and
                        // grants a standby only when every other node reports on the holder.
                        tracing::error!(edge = %self.location, node = %self.node, peers = ?self.peers.keys().collect::<Vec<_>>(), nodes = ?record.nodes, "[pair] node_id and its peers must be the location's nodes, each of them");
                    }
                }
                self.machine.set_settings(settings(
                    record,
                    self.location.as_str(),
                    self.heartbeat_ms,
                ));
                self.reconcile().await;
                Vec::new()
            }
            Command::Granted {
                grant,
                proofs,
                reply,
            } => {
                let taken = self.take_grant(grant, proofs, true).await;
                if let Err(err) = &taken {
                    tracing::warn!("a grant from the master was not taken: {err}");
                }
                let _ = reply.send(taken);
                return;
            }
            Command::Peer(PeerEvent::Up(id, link)) => {
                let Some(state) = self.peers.get_mut(&id) else {
                    // (the listener admits configured peers only)
                    link.close("not a peer of this node");
                    return;
                };
                if let Some(old) = state.link.replace(link.clone()) {
                    old.close("replaced by a newer link from the peer");
                }
                let (out, told) = watch::channel(PeerOut::default());
                tokio::spawn(send_to_peer(link.clone(), told));
                *state = PeerState {
                    link: Some(link.clone()),
                    out: Some(out),
                    ..PeerState::default()
                };
                // The holder's status, for the standby's warm modules.
                tokio::spawn(stream_status(link, self.runtime.clone(), self.view.clone()));
                self.machine.handle(now, NodeEvent::PeerUp(id))
            }
            Command::Peer(PeerEvent::Down(id, link)) => match self.peers.get_mut(&id) {
                Some(state) if state.link.as_ref().is_some_and(|l| l.same_link(&link)) => {
                    state.link = None;
                    state.out = None;
                    state.polling = false;
                    let last_heard = link.last_heard();
                    self.machine.handle(
                        now,
                        NodeEvent::PeerDown {
                            peer: id,
                            last_heard,
                        },
                    )
                }
                _ => Vec::new(),
            },
            Command::Devices(reached) => self.machine.handle(now, NodeEvent::Devices(reached)),
        };
        self.carry_out(actions).await;
    }

    /// Stores a grant newer than the one stored, with the witness's proofs of it (before
    /// the machine takes it).
    async fn store_grant(
        &mut self,
        grant: &PairGrant,
        proofs: Vec<GrantProof>,
    ) -> Result<(), String> {
        let store = self.store.clone();
        let location = self.location.to_string();
        let (to_store, proven) = (grant.clone(), proofs.clone());
        let stored = tokio::task::spawn_blocking(move || {
            store.set_proven_pair_grant(&location, &to_store, &proven)
        })
        .await;
        match stored {
            Ok(Ok(())) => {
                // Calls this node sends on carry the grant it holds (the holder's fence
                // refuses an older one).
                self.runtime
                    .set_grant(&self.location, grant.control_state());
                self.stored = grant.clone();
                self.proofs = proofs;
                Ok(())
            }
            Ok(Err(err)) => Err(format!("the pair grant could not be stored: {err}")),
            Err(err) => Err(format!("the pair grant could not be stored: {err}")),
        }
    }

    async fn carry_out(&mut self, actions: Vec<NodeAction>) {
        for action in actions {
            match action {
                NodeAction::Start { epoch } => {
                    let reason = match self.machine.claimed() {
                        true => format!(
                            "site pair: node {} takes the modules without a witness (no master and no holder heard for unwitnessed_takeover_ms)",
                            self.node
                        ),
                        false => format!("site pair: node {} runs the modules", self.node),
                    };
                    tracing::warn!(edge = %self.location, node = %self.node, %epoch, "{reason}");
                    self.runtime.set_grant(
                        &self.location,
                        ControlState {
                            owner: Owner::Edge,
                            epoch,
                        },
                    );
                    self.publish();
                    self.reconcile().await;
                    self.audit(Owner::Edge, Owner::Edge, epoch, reason).await;
                }
                NodeAction::Stop { reason } => {
                    tracing::warn!(edge = %self.location, node = %self.node, "site pair: this node stops the modules: {reason}");
                    self.publish();
                    self.reconcile().await;
                    let epoch = self.machine.grant().epoch;
                    let reason = match self.isolated_since.take() {
                        // Cut off from both it kept the rooms running, and another holder
                        // was granted them meanwhile: two holders, for at most this long.
                        Some((since, wall)) if self.machine.grant().node() != Some(&self.node) => {
                            format!(
                                "site pair: node {} stops the modules: {reason}; it ran them with no master linked (cut off from its peers too, or with peers that reached none) for {} ms from {} (isolation = \"continue\"), while node {} was granted them: two holders for at most that long",
                                self.node,
                                since.elapsed().as_millis(),
                                tether_common::api::rfc3339(wall),
                                self.machine
                                    .grant()
                                    .node()
                                    .map(|n| n.as_str())
                                    .unwrap_or("(none)"),
                            )
                        }
                        _ => format!("site pair: node {} stops the modules: {reason}", self.node),
                    };
                    self.audit(Owner::Edge, Owner::Edge, epoch, reason).await;
                }
                NodeAction::Report(report) => {
                    self.report.send_replace(Some(report));
                }
                NodeAction::TellPeer(note) => {
                    // A grant taken since the last goes first (the note is read against
                    // it), with the witness's proofs: a peer may not reach the witness. A
                    // grant without them (none taken since this node's first start)
                    // would only be refused.
                    let grant = self.machine.grant().clone();
                    let passed_on = (!self.proofs.is_empty()).then(|| (grant, self.proofs.clone()));
                    for out in self.peers.values().filter_map(|state| state.out.as_ref()) {
                        out.send_modify(|out| {
                            if passed_on.is_some() {
                                out.grant = passed_on.clone();
                            }
                            out.note = Some(note.clone());
                        });
                    }
                }
            }
        }
    }

    /// Records a start or stop of this node's modules in its audit log (reported to the
    /// master, and to the alert receivers, even while the master is out of reach).
    async fn audit(
        &self,
        from: Owner,
        to: Owner,
        epoch: tether_common::control::Epoch,
        reason: String,
    ) {
        let record = AuditRecord {
            time_ms: wall_now_ms(),
            edge: self.location.clone().into(),
            from,
            to,
            epoch,
            reason,
            code: None,
        };
        self.store.record_audits(vec![record], AUDIT_KEEP).await;
        if let Some(link) = self.master.clone() {
            tokio::spawn(report_audits(link, self.store.clone()));
        }
    }

    async fn reconcile(&self) {
        let state = ControlState {
            owner: Owner::Edge,
            epoch: self.machine.grant().epoch,
        };
        // The standby runs its collector arrays' modules to poll only: their calls go to
        // the holder (marked before they start, so none is served here meanwhile).
        let (model, _) = self.replica.snapshot();
        let running = match self.machine.is_running() {
            true => {
                self.runtime.set_poll_only(Default::default());
                Running::All
            }
            false => {
                let polling = array_modules(&model, &self.location).into_iter().collect();
                self.runtime.set_poll_only(polling);
                Running::Polling
            }
        };
        reconcile_modules(
            &self.replica,
            &self.runtime,
            &self.store,
            self.master.as_ref(),
            &self.location,
            (running, state),
        )
        .await;
        // The standby keeps its location's drivers compiled, with the holder's status.
        if !self.machine.is_running() {
            let (model, _) = self.replica.snapshot();
            let location = self.location.clone();
            self.runtime
                .keep_warm(&model, |module| module.edge.as_ref() == Some(&location))
                .await;
        }
    }

    fn publish(&self) {
        // Read apart: a guard in the assigned value would live through the write below.
        let takeover_worst_ms = self
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .takeover_worst_ms;
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = ControlView {
            state: self.machine.grant().control_state(),
            active: self.machine.is_running(),
            online: self.master.is_some(),
            master_ready: self.master.is_some(),
            takeover_worst_ms,
            pair: Some(PairView {
                node: self.node.clone(),
                holder: self.machine.grant().node().cloned(),
                peers_online: self.linked_peers().map(|(id, _)| id.clone()).collect(),
                peers: self.peers.len(),
                claimed: self.machine.claimed(),
            }),
        };
    }
}

/// What the API shows of a pair node.
#[derive(Debug, Clone)]
pub struct PairView {
    /// This node.
    pub node: NodeId,
    /// The node its grant names (none: the master, or a move in progress).
    pub holder: Option<NodeId>,
    /// Its peers whose links are up.
    pub peers_online: Vec<NodeId>,
    /// How many peers it has.
    pub peers: usize,
    /// Whether it runs on a claim made without a witness.
    pub claimed: bool,
}

/// The ids of `location`'s modules of collector-array (`shared_polling`) drivers.
fn array_modules(model: &tether_common::model::Model, location: &EdgeId) -> Vec<String> {
    model
        .modules
        .values()
        .filter(|m| m.edge.as_ref() == Some(location))
        .filter(|m| {
            model
                .drivers
                .get(&m.driver)
                .is_some_and(|d| d.shared_polling)
        })
        .map(|m| m.id.clone())
        .collect()
}

/// What each peer sent last and the node has not taken in yet: its note, a grant it
/// passed on, whether it polls. A peer that sends faster than the node takes it in fills
/// nothing (each replaces the one before), and only the node's own peers have a place.
pub(crate) struct PeerMail {
    letters: Mutex<BTreeMap<NodeId, PeerLetters>>,
    /// Rung on every letter (a ring while the node is busy is kept for its next look).
    arrived: tokio::sync::Notify,
}

/// One peer's letters, and the link they came over.
#[derive(Default)]
pub(crate) struct PeerLetters {
    link: Option<Link>,
    note: Option<PeerNote>,
    grant: Option<(PairGrant, Vec<GrantProof>)>,
    polling: Option<bool>,
}

impl PeerMail {
    pub(crate) fn new(peers: &[NodeId]) -> PeerMail {
        PeerMail {
            letters: Mutex::new(
                peers
                    .iter()
                    .map(|peer| (peer.clone(), PeerLetters::default()))
                    .collect(),
            ),
            arrived: tokio::sync::Notify::new(),
        }
    }

    fn put(&self, (from, link): (&NodeId, &Link), write: impl FnOnce(&mut PeerLetters)) {
        let mut letters = self.letters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = letters.get_mut(from) {
            // Letters over an older link give way to those over a newer one.
            if !slot.link.as_ref().is_some_and(|l| l.same_link(link)) {
                *slot = PeerLetters {
                    link: Some(link.clone()),
                    ..PeerLetters::default()
                };
            }
            write(slot);
            drop(letters);
            self.arrived.notify_one();
        }
    }

    /// A peer's note.
    pub(crate) fn note(&self, from: (&NodeId, &Link), note: PeerNote) {
        self.put(from, |slot| slot.note = Some(note));
    }

    /// A grant a peer passed on, with the witness's proofs (the latest replaces one not
    /// yet taken in: the node refuses an older grant anyway, and a forged one with a high
    /// epoch must not hold the place of the real ones that follow).
    pub(crate) fn grant(&self, from: (&NodeId, &Link), grant: PairGrant, proofs: Vec<GrantProof>) {
        self.put(from, |slot| slot.grant = Some((grant, proofs)));
    }

    /// Whether a peer polls its collector arrays.
    pub(crate) fn polling(&self, from: (&NodeId, &Link), polling: bool) {
        self.put(from, |slot| slot.polling = Some(polling));
    }

    /// Every peer's letters not yet taken in.
    fn take(&self) -> Vec<(NodeId, PeerLetters)> {
        let mut letters = self.letters.lock().unwrap_or_else(|p| p.into_inner());
        letters
            .iter_mut()
            .filter(|(_, slot)| {
                slot.note.is_some() || slot.grant.is_some() || slot.polling.is_some()
            })
            .map(|(peer, slot)| {
                let link = slot.link.clone();
                (
                    peer.clone(),
                    std::mem::replace(
                        slot,
                        PeerLetters {
                            link,
                            ..PeerLetters::default()
                        },
                    ),
                )
            })
            .collect()
    }
}

/// What a node tells one peer on one link: the latest of each (a note or grant overtaken
/// before it went out is not sent).
#[derive(Debug, Clone, Default)]
struct PeerOut {
    /// The grant it holds, with the witness's proofs, to pass on.
    grant: Option<(PairGrant, Vec<GrantProof>)>,
    /// Its note.
    note: Option<PeerNote>,
    /// Whether it polls its collector arrays, and how often that was to be told (it is
    /// told again every second).
    polling: Option<bool>,
    polling_told: u64,
}

/// Sends one peer what this node tells it, in order (a grant before the note read
/// against it), until the link closes: the grant once on the link and again when it
/// changes, the note on every change, the polling on every telling. Waiting for room
/// on a link being cut holds up this task only.
async fn send_to_peer(link: Link, mut out: watch::Receiver<PeerOut>) {
    let mut sent = PeerOut::default();
    loop {
        let now = out.borrow_and_update().clone();
        let grant = now
            .grant
            .clone()
            .filter(|grant| sent.grant.as_ref() != Some(grant));
        let note = now
            .note
            .clone()
            .filter(|note| sent.note.as_ref() != Some(note));
        let polling = now
            .polling
            .filter(|_| now.polling_told != sent.polling_told);
        let mut notices = Vec::new();
        if let Some((grant, proofs)) = grant {
            notices.push(Notice::PeerGrant { grant, proofs });
        }
        notices.extend(note.map(Notice::PeerNote));
        notices.extend(polling.map(|polling| Notice::PeerPolling { polling }));
        for notice in notices {
            if let Err(err) = link.notify(notice).await {
                tracing::debug!(peer = %link.peer(), "not sent to the peer: {err}");
                return;
            }
        }
        sent = now;
        tokio::select! {
            changed = out.changed() => if changed.is_err() { return },
            _ = link.closed() => return,
        }
    }
}

/// Sends the master each report of this node, the latest first, in order, until the link
/// closes: a report is the node's whole state, so one that is overtaken is not sent.
async fn send_reports(link: Link, mut reports: watch::Receiver<Option<NodeReport>>) {
    loop {
        let report = reports.borrow_and_update().clone();
        if let Some(report) = report
            && let Err(err) = link
                .request(Request::NodeReport(report), REPORT_TIMEOUT)
                .await
        {
            tracing::warn!("node report not taken: {err}");
        }
        tokio::select! {
            changed = reports.changed() => if changed.is_err() { return },
            _ = link.closed() => return,
        }
    }
}

/// Sends the master this node's collector-array slot, and each change, until the link
/// closes.
async fn send_slots(link: Link, mut slots: watch::Receiver<Option<(u64, u64)>>) {
    loop {
        let slot = *slots.borrow_and_update();
        if let Err(err) = link
            .request(Request::ArraySlot { slot }, REPORT_TIMEOUT)
            .await
        {
            tracing::debug!("array slot not taken (sent again): {err}");
            tokio::time::sleep(Duration::from_secs(1)).await;
            slots.mark_changed();
        }
        tokio::select! {
            changed = slots.changed() => if changed.is_err() { return },
            _ = link.closed() => return,
        }
    }
}

/// The pair settings of `location` from its record; the defaults while the replica has
/// none. A heartbeat too slow for the pair timeout is logged: the isolation promise needs
/// four heartbeats in a pair timeout.
fn settings(
    record: Option<&tether_common::model::EdgeRecord>,
    location: &str,
    heartbeat_ms: u64,
) -> PairSettings {
    use tether_config::defaults;
    let settings = match record {
        Some(record) => PairSettings::of(record),
        None => PairSettings {
            pair_timeout_ms: defaults::PAIR_TIMEOUT_MS,
            timeout_ms: defaults::EDGE_TIMEOUT_MS,
            isolation: Default::default(),
            unwitnessed_takeover_ms: None,
            device_hold_down_ms: defaults::DEVICE_HOLD_DOWN_MS,
        },
    };
    if let Err(err) = settings.check(heartbeat_ms) {
        tracing::error!(
            edge = location,
            "the pair's settings do not fit this node's heartbeat_ms ({heartbeat_ms}): {err}"
        );
    }
    settings
}

/// How often a node counts the devices it reaches.
const DEVICE_COUNT_EVERY: Duration = Duration::from_secs(2);
/// How long a probe of a device may take to connect.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Probes in flight at once.
const PROBES_AT_ONCE: usize = 32;

/// Counts the location's devices this node reaches, every [`DEVICE_COUNT_EVERY`], and
/// tells control (devices count as health: a holder that reaches fewer than its peer
/// hands over). A device counts when it accepts a TCP connection at the address this node
/// reaches it at (closed at once); one a module here is connected to counts without a
/// probe. Both nodes measure the same way, so a device that accepts connections but fails
/// its sessions does not move the modules back and forth.
pub(crate) async fn count_devices(
    location: EdgeId,
    replica: Arc<Replica>,
    runtime: Runtime,
    control: EdgeControl,
) {
    loop {
        let (model, _) = replica.snapshot();
        let devices: Vec<(String, Option<(String, u16)>)> = model
            .modules
            .values()
            .filter(|module| module.edge.as_ref() == Some(&location))
            .filter(|module| {
                model
                    .drivers
                    .get(&module.driver)
                    .is_some_and(|d| d.transport != tether_common::model::Transport::None)
            })
            .filter_map(|module| {
                let address = runtime.device_address(&model, module)?;
                Some((module.id.clone(), Some(address)))
            })
            .collect();
        let mut probes = tokio::task::JoinSet::new();
        let mut reached = 0u32;
        for (module, address) in devices {
            // Both nodes measure the same: the device accepts a connection. A module
            // connected to it here says so without a probe (a probe would take a session
            // of a device that allows one).
            if runtime.device_connected(&module) == Some(true) {
                reached += 1;
                continue;
            }
            let Some((host, port)) = address else {
                continue;
            };
            while probes.len() >= PROBES_AT_ONCE {
                reached += u32::from(probes.join_next().await.is_some_and(|r| r.unwrap_or(false)));
            }
            probes.spawn(async move {
                let connect = tokio::net::TcpStream::connect((host.as_str(), port));
                matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, connect).await,
                    Ok(Ok(_))
                )
            });
        }
        while let Some(result) = probes.join_next().await {
            reached += u32::from(result.unwrap_or(false));
        }
        control.devices(reached);
        tokio::time::sleep(DEVICE_COUNT_EVERY).await;
    }
}

/// The peers' secret, for the listening node: the location's, for the ids of the peers
/// that connect to it only.
struct PeerSecret {
    peers: Vec<NodeId>,
    secret: Secret,
}

impl EdgeSecrets for PeerSecret {
    fn secret(&self, id: &str) -> Option<Secret> {
        self.peers
            .iter()
            .any(|peer| peer.as_str() == id)
            .then(|| self.secret.clone())
    }
}

/// How a node reaches some of its peers.
pub(crate) enum PeerLink {
    /// It listens for these (with its API certificate, asking for each one's link
    /// certificate, which names it).
    Listen {
        listener: tokio::net::TcpListener,
        tls: Arc<rustls::ServerConfig>,
        peers: Vec<NodeId>,
        secret: Secret,
        config: ListenerConfig,
    },
    /// It connects to one (the link's far end is an address: the peer is this id).
    Connect(NodeId, tether_common::link::ConnectorConfig),
}

/// Keeps links to peers until `shutdown`, telling `control` of them, and serves what the
/// peers send.
pub(crate) async fn run_peer_link(
    how: PeerLink,
    control: EdgeControl,
    runtime: Runtime,
    shutdown: tokio_util::sync::CancellationToken,
) {
    match how {
        PeerLink::Listen {
            listener,
            tls,
            peers,
            secret,
            config,
        } => {
            let (accepted_tx, mut accepted) = mpsc::channel::<AuthenticatedEdge>(4);
            let secrets = Arc::new(PeerSecret { peers, secret });
            tokio::spawn(tether_common::link::run_listener(
                listener,
                tls,
                secrets,
                config,
                accepted_tx,
                shutdown,
            ));
            while let Some(peer) = accepted.recv().await {
                // Authenticated as this id (the handshake and its certificate).
                let id = NodeId::new(peer.link.peer());
                tokio::spawn(serve_peer(
                    id,
                    (peer.link, peer.incoming),
                    control.clone(),
                    runtime.clone(),
                ));
            }
        }
        PeerLink::Connect(id, connector) => {
            let (events_tx, mut events) = mpsc::channel(16);
            tokio::spawn(tether_common::link::maintain_link(
                connector, events_tx, shutdown,
            ));
            while let Some(event) = events.recv().await {
                if let LinkEvent::Up { link, incoming } = event {
                    let served = serve_peer(
                        id.clone(),
                        (link, incoming),
                        control.clone(),
                        runtime.clone(),
                    );
                    tokio::spawn(served);
                }
            }
        }
    }
}

/// Serves one link from a peer until it closes: its notes and passed-on grants to
/// control, its modules' status to the warm standby; requests are refused (the peer asks
/// the master, not its peer, for calls).
async fn serve_peer(
    peer: NodeId,
    (link, mut incoming): (Link, mpsc::Receiver<Incoming>),
    control: EdgeControl,
    runtime: Runtime,
) {
    tracing::info!(%peer, "site pair: the link to the peer is up");
    control.peer_event(PeerEvent::Up(peer.clone(), link.clone()));
    while let Some(item) = incoming.recv().await {
        match item {
            Incoming::Notice(Notice::PeerNote(note), _) => control.peer_note((&peer, &link), note),
            Incoming::Notice(Notice::PeerGrant { grant, proofs }, _) => {
                control.peer_grant((&peer, &link), grant, proofs)
            }
            Incoming::Notice(Notice::PeerPolling { polling }, _) => {
                control.peer_polling((&peer, &link), polling)
            }
            Incoming::Notice(
                Notice::StatusChanged {
                    module_id,
                    key,
                    value,
                    ..
                },
                _,
            ) => {
                if value.0.len() <= tether_common::runtime::MAX_STATUS_VALUE
                    && let Ok(value) = serde_json::from_str::<serde_json::Value>(&value.0)
                {
                    // A collector array's read by the peer: the holder's module takes it;
                    // else it is the holder's status, kept for a warm start.
                    if !runtime.peer_status(&module_id, &key, value.clone()) {
                        runtime.standby_status(&module_id, &key, value);
                    }
                }
            }
            Incoming::Request(request) => {
                let refused = RemoteError::new(
                    ErrorCode::Unsupported,
                    "a site pair's peer link carries notes only",
                );
                request.responder.respond(Err(refused)).await;
            }
        }
    }
    link.closed().await;
    tracing::warn!(%peer, "site pair: the link to the peer is down: {}", link.close_reason().unwrap_or_default());
    control.peer_event(PeerEvent::Down(peer, link));
}

/// Link settings for the peer link: the edge link's.
pub(crate) fn peer_link_config(heartbeat_ms: u64, max_frame: usize) -> LinkConfig {
    LinkConfig::with_heartbeat(Duration::from_millis(heartbeat_ms), max_frame)
}
