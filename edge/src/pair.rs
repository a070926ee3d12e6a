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

use std::sync::{Arc, RwLock};
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

/// One node's control.
pub(crate) struct NodeTask {
    location: EdgeId,
    node: NodeId,
    /// Its peer (a pair's other node).
    peer_id: NodeId,
    /// This node's own secret: a grant is taken only with its proof under it.
    secret: Secret,
    machine: NodeSide,
    /// The grant stored last, and the witness's proofs of it (passed on to the peer).
    stored: PairGrant,
    proofs: Vec<GrantProof>,
    /// The last grant passed on to the peer on its current link (a grant goes to the
    /// peer when it changes, and on every new link, as the rules' simulation has it).
    relayed: Option<PairGrant>,
    /// The peer's last note the machine took.
    note_taken: Option<PeerNote>,
    /// The latest report, for the link to the master (one sender a link, in order).
    report: watch::Sender<Option<NodeReport>>,
    /// This node's collector-array slot, for the link to the master.
    slot: watch::Sender<Option<(u64, u64)>>,
    /// Whether this node polls its location's collector arrays, whether its peer does,
    /// and what the peer was told last (none: nothing yet on this link).
    polling: bool,
    peer_polling: bool,
    told_polling: Option<bool>,
    /// Ticks since this node last told its peer whether it polls.
    polling_ticks: u32,
    replica: Arc<Replica>,
    runtime: Runtime,
    store: Arc<Store>,
    master: Option<Link>,
    peer: Option<Link>,
    /// The last frames fed to the machine, per link.
    master_heard: Option<Mono>,
    peer_heard: Option<Mono>,
    view: Arc<RwLock<ControlView>>,
    heartbeat_ms: u64,
    /// Since when it has run the modules cut off from its peer and every master (wall
    /// clock, for the audit), until a grant decides: under `isolation = "continue"` a
    /// standby may have been granted them meanwhile, and that overlap is reported.
    isolated_since: Option<(std::time::Instant, u64)>,
}

impl NodeTask {
    pub(crate) fn new(
        location: EdgeId,
        (node, peer, secret): (NodeId, NodeId, Secret),
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
                vec![peer.clone()],
                settings,
                stored.clone(),
                clock::mono_now(),
            ),
            peer_id: peer,
            location,
            node,
            secret,
            relayed: None,
            proofs,
            stored,
            note_taken: None,
            report: watch::channel(None).0,
            slot: watch::channel(None).0,
            polling: false,
            peer_polling: false,
            told_polling: None,
            polling_ticks: 0,
            replica,
            runtime,
            store,
            master: None,
            peer: None,
            master_heard: None,
            peer_heard: None,
            view,
            heartbeat_ms,
            isolated_since: None,
        })
    }

    pub(crate) async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        (mut notes, mut grants, mut peer_polling): PeerInboxes,
    ) {
        tracing::info!(edge = %self.location, node = %self.node, grant = ?self.stored, "site pair node: waiting for its witness's grant");
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => return,
                },
                changed = notes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let note = notes.borrow_and_update().clone();
                    // The same note again (a link come back) changes nothing.
                    if let Some(note) = note
                        && self.note_taken.as_ref() != Some(&note)
                    {
                        self.note_taken = Some(note.clone());
                        let actions = self.machine.handle(clock::mono_now(), NodeEvent::PeerNote(self.peer_id.clone(), note));
                        self.carry_out(actions).await;
                    }
                }
                changed = grants.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let passed_on = grants.borrow_and_update().clone();
                    if let Some((grant, proofs)) = passed_on
                        && let Err(err) = self.take_grant(grant, proofs, false).await
                    {
                        tracing::warn!("a grant passed on by the peer was not taken: {err}");
                    }
                }
                changed = peer_polling.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.peer_polling = *peer_polling.borrow_and_update();
                }
                _ = tick.tick() => {
                    self.tell_polling().await;
                    let mut actions = self.feed_heard();
                    actions.extend(self.machine.poll(clock::mono_now()));
                    self.carry_out(actions).await;
                    if self.machine.is_running()
                        && self.master.is_none()
                        && self.peer.is_none()
                        && self.isolated_since.is_none()
                    {
                        tracing::warn!(edge = %self.location, node = %self.node, "site pair: this node runs the modules cut off from its peer and every master");
                        self.isolated_since = Some((std::time::Instant::now(), wall_now_ms()));
                    }
                }
            }
            self.publish();
            self.set_array_slot();
        }
    }

    /// Takes a grant, from the witness (`from_master`) or passed on by the peer: only with
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
    /// poll (itself, and its peer while their link is up), in the location's order. A
    /// node whose array modules do not reach their devices takes no turn, so the other
    /// reads every interval rather than half the reads going missing.
    fn set_array_slot(&self) {
        let (model, _) = self.replica.snapshot();
        let Some(record) = model.edges.get(self.location.as_str()) else {
            return;
        };
        let peer_polls = self.peer.is_some() && self.peer_polling;
        let live: Vec<NodeId> = record
            .nodes
            .iter()
            .filter(|node| match node.as_str() == self.node.as_str() {
                true => self.polling,
                false => peer_polls,
            })
            .map(NodeId::new)
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
    /// drivers run here and each reaches its device. The peer hears of every change.
    async fn tell_polling(&mut self) {
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
        let due = self.told_polling != Some(polling) || self.polling_ticks == 0;
        if let Some(link) = &self.peer
            && due
            && link.notify(Notice::PeerPolling { polling }).await.is_ok()
        {
            self.told_polling = Some(polling);
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
        if let Some(link) = &self.peer {
            let heard = link.last_heard();
            if self.peer_heard != Some(heard) {
                self.peer_heard = Some(heard);
                actions.extend(
                    self.machine
                        .handle(now, NodeEvent::PeerHeard(self.peer_id.clone())),
                );
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
                if let Some(record) = record
                    && !(record.nodes.contains(&self.node.to_string())
                        && record.nodes.contains(&self.peer_id.to_string()))
                {
                    // The witness reads this node's reports about its peer by id.
                    tracing::error!(edge = %self.location, node = %self.node, peer = %self.peer_id, nodes = ?record.nodes, "[pair] node_id and peer_id must both be nodes of the location's record");
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
            Command::Peer(PeerEvent::Up(link)) => {
                if let Some(old) = self.peer.replace(link.clone()) {
                    old.close("replaced by a newer link from the peer");
                }
                self.peer_heard = None;
                self.note_taken = None;
                self.told_polling = None;
                self.relayed = None;
                // The holder's status, for the standby's warm modules.
                tokio::spawn(stream_status(link, self.runtime.clone(), self.view.clone()));
                self.machine
                    .handle(now, NodeEvent::PeerUp(self.peer_id.clone()))
            }
            Command::Peer(PeerEvent::Down(link)) => match &self.peer {
                Some(current) if current.same_link(&link) => {
                    self.peer = None;
                    self.peer_polling = false;
                    let last_heard = link.last_heard();
                    let peer = self.peer_id.clone();
                    self.machine
                        .handle(now, NodeEvent::PeerDown { peer, last_heard })
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
                                "site pair: node {} stops the modules: {reason}; it ran them cut off from its peer and every master for {} ms from {} (isolation = \"continue\"), while node {} was granted them: two holders for at most that long",
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
                    if let Some(link) = &self.peer {
                        // A grant taken since the last goes first (the note is read
                        // against it), with the witness's proofs: the peer may not reach
                        // the witness.
                        let grant = self.machine.grant().clone();
                        // A grant without the witness's proofs (none taken since this
                        // node's first start) would only be refused.
                        let due = self.relayed.as_ref() != Some(&grant) && !self.proofs.is_empty();
                        let sent = match due {
                            true => {
                                let passed_on = Notice::PeerGrant {
                                    grant: grant.clone(),
                                    proofs: self.proofs.clone(),
                                };
                                link.notify(passed_on).await
                            }
                            false => Ok(()),
                        };
                        let sent = match sent {
                            Ok(()) => {
                                self.relayed = Some(grant);
                                link.notify(Notice::PeerNote(note)).await
                            }
                            Err(err) => Err(err),
                        };
                        if let Err(err) = sent {
                            tracing::debug!("note to the peer not sent: {err}");
                        }
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
                peer_online: self.peer.is_some(),
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
    /// Whether its link to its peer is up.
    pub peer_online: bool,
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

/// What the peer sent last: its note, a grant it passed on, whether it polls.
pub(crate) type PeerInboxes = (
    watch::Receiver<Option<PeerNote>>,
    watch::Receiver<Option<(PairGrant, Vec<GrantProof>)>>,
    watch::Receiver<bool>,
);

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

/// The peer's secret, for the listening node: the location's, for the peer's id only.
struct PeerSecret {
    peer: NodeId,
    secret: Secret,
}

impl EdgeSecrets for PeerSecret {
    fn secret(&self, id: &str) -> Option<Secret> {
        (id == self.peer.as_str()).then(|| self.secret.clone())
    }
}

/// How a node reaches its peer.
pub(crate) enum PeerLink {
    /// It listens (with its API certificate, asking for the peer's link certificate).
    Listen {
        listener: tokio::net::TcpListener,
        tls: Arc<rustls::ServerConfig>,
        peer: NodeId,
        secret: Secret,
        config: ListenerConfig,
    },
    /// It connects.
    Connect(tether_common::link::ConnectorConfig),
}

/// Keeps the link to the peer until `shutdown`, telling `control` of it, and serves what
/// the peer sends.
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
            peer,
            secret,
            config,
        } => {
            let (accepted_tx, mut accepted) = mpsc::channel::<AuthenticatedEdge>(4);
            let secrets = Arc::new(PeerSecret { peer, secret });
            tokio::spawn(tether_common::link::run_listener(
                listener,
                tls,
                secrets,
                config,
                accepted_tx,
                shutdown,
            ));
            while let Some(peer) = accepted.recv().await {
                tokio::spawn(serve_peer(
                    peer.link,
                    peer.incoming,
                    control.clone(),
                    runtime.clone(),
                ));
            }
        }
        PeerLink::Connect(connector) => {
            let (events_tx, mut events) = mpsc::channel(16);
            tokio::spawn(tether_common::link::maintain_link(
                connector, events_tx, shutdown,
            ));
            while let Some(event) = events.recv().await {
                if let LinkEvent::Up { link, incoming } = event {
                    tokio::spawn(serve_peer(link, incoming, control.clone(), runtime.clone()));
                }
            }
        }
    }
}

/// Serves one link from the peer until it closes: its notes and passed-on grants to
/// control, its modules' status to the warm standby; requests are refused (the peer asks
/// the master, not its peer, for calls).
async fn serve_peer(
    link: Link,
    mut incoming: mpsc::Receiver<Incoming>,
    control: EdgeControl,
    runtime: Runtime,
) {
    tracing::info!(peer = %link.peer(), "site pair: the link to the peer is up");
    control.peer_event(PeerEvent::Up(link.clone()));
    while let Some(item) = incoming.recv().await {
        match item {
            Incoming::Notice(Notice::PeerNote(note), _) => control.peer_note(note),
            Incoming::Notice(Notice::PeerGrant { grant, proofs }, _) => {
                control.peer_grant(grant, proofs)
            }
            Incoming::Notice(Notice::PeerPolling { polling }, _) => control.peer_polling(polling),
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
    tracing::warn!(peer = %link.peer(), "site pair: the link to the peer is down: {}", link.close_reason().unwrap_or_default());
    control.peer_event(PeerEvent::Down(link));
}

/// Link settings for the peer link: the edge link's.
pub(crate) fn peer_link_config(heartbeat_ms: u64, max_frame: usize) -> LinkConfig {
    LinkConfig::with_heartbeat(Duration::from_millis(heartbeat_ms), max_frame)
}
