//! Site pairs: a location with two edge nodes (or more), one holding its modules and the
//! others standing by, with the master as witness (DESIGN.md, "Site pairs and collector arrays"; the shape
//! of VOLTTRON's failover agent, with a grant instead of a query). Two sans-I/O machines:
//!
//! - [`NodeSide`], on each node: runs the modules while a grant names it; as holder cut off
//!   from both its peer and every master it follows the location's [`Isolation`]; with
//!   no master to witness, a standby takes over only after `unwitnessed_takeover_ms`, when
//!   that is set.
//! - [`WitnessSide`], on the master: grants the standby only when the holder has been off
//!   the master for `pair_timeout_ms` *and* the standby reports that it has not heard the
//!   holder for as long; takes the modules itself only when no node has been linked for
//!   the location's `timeout_ms`; hands over to a peer that reaches more of the devices
//!   (after a hold-down, so that flapping devices do not make the pair flap).
//!
//! Every decision is a grant with a new epoch, issued by the witness alone; every side
//! refuses an older grant. Break before make throughout: a node starts under a grant only
//! once its peer has said it does not run under that grant or a newer one (or has been
//! silent for the pair timeout), or the witness itself sent the grant and the peer is not
//! linked; a handover from a
//! live holder goes through a release ([`PairHolder::Moving`]); the master stops its own
//! modules before it grants them to a node. A node running on a claim (an unwitnessed
//! takeover) keeps them until the witness decides, or until it hears the holder running.
//! A witness that starts holding the modules itself runs them only once every node has
//! been heard, or after the pair timeout. Why a holder with `isolation = "stop"` never
//! overlaps a standby: see [`stop_after_ms`].
//!
//! The shells carry them out: `edge/src/pair.rs` on each node, `master/src/control/
//! witness.rs` on the witness; the property test (`common/tests/pair.rs`) steps them
//! together in simulated time, with two nodes and with three.

use serde::{Deserialize, Serialize};

use super::{Epoch, Mono, NodeId};

pub use tether_config::Isolation;

/// A location's pair settings (the edge record's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairSettings {
    /// How long the holder must be off the master, and unheard by the standby, before
    /// the standby is granted the modules.
    pub pair_timeout_ms: u64,
    /// How long no node may be linked before the master takes the modules itself.
    pub timeout_ms: u64,
    /// What a holder cut off from both does.
    pub isolation: Isolation,
    /// With no master reachable, a standby takes over after this long without hearing
    /// the holder or any master (off: never without a witness).
    pub unwitnessed_takeover_ms: Option<u64>,
    /// How long the holder must reach fewer devices than its linked peer before it hands
    /// over to it.
    pub device_hold_down_ms: u64,
}

/// A holder with `isolation = "stop"` stops this long after it last heard its peer or a
/// master: half the pair timeout, so that it is stopped before any standby can be granted.
/// Silences count from the last frame (the shell reports every frame, [`NodeEvent::
/// MasterHeard`]), not from when a lost link is noticed (heartbeats later): the holder
/// stops by the cut plus `pair_timeout / 2` and a poll, while a standby is granted the
/// modules no earlier than the cut plus `pair_timeout` less a heartbeat (its own last
/// frame from the holder). With a heartbeat at most a quarter of the pair timeout, which
/// the configuration keeps to, a quarter of the pair timeout is left for the stop.
pub fn stop_after_ms(settings: &PairSettings) -> u64 {
    settings.pair_timeout_ms / 2
}

impl PairSettings {
    /// A location's settings, from its record (the defaults where it names none).
    pub fn of(record: &crate::model::EdgeRecord) -> PairSettings {
        use tether_config::defaults;
        PairSettings {
            pair_timeout_ms: record.pair_timeout_ms.unwrap_or(defaults::PAIR_TIMEOUT_MS),
            timeout_ms: record.timeout_ms,
            isolation: record.isolation.unwrap_or_default(),
            unwitnessed_takeover_ms: record.unwitnessed_takeover_ms,
            device_hold_down_ms: record
                .device_hold_down_ms
                .unwrap_or(defaults::DEVICE_HOLD_DOWN_MS),
        }
    }

    /// Whether the settings can keep their promises, with links heartbeating every
    /// `heartbeat_ms`; the error names the key.
    pub fn check(&self, heartbeat_ms: u64) -> Result<(), String> {
        if heartbeat_ms.saturating_mul(4) > self.pair_timeout_ms {
            return Err(format!(
                "key `pair_timeout_ms`: expected at least four heartbeats ({} ms), not {}",
                heartbeat_ms * 4,
                self.pair_timeout_ms
            ));
        }
        if self.isolation == Isolation::Stop && self.unwitnessed_takeover_ms.is_some() {
            // A standby taking over without a witness is cut off from both by definition:
            // under "stop" it could never run.
            return Err("key `unwitnessed_takeover_ms`: expected none with isolation = \"stop\" (a takeover without a witness is made cut off from both)".into());
        }
        Ok(())
    }
}

/// Who holds a location's modules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PairHolder {
    /// One of its nodes.
    Node(NodeId),
    /// The master.
    Master,
    /// Released, on the way to the node named (a handover from a holder that is alive
    /// and linked, to a peer that reaches more devices): the holder is told to stop first,
    /// and the node is granted the modules once the holder has said it took the release,
    /// so a witness that dies between the two steps leaves nobody running rather than two.
    Moving(NodeId),
}

/// A grant: who holds, under which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairGrant {
    /// The holder.
    pub holder: PairHolder,
    /// Raised by the witness on every change of holder.
    pub epoch: Epoch,
}

impl PairGrant {
    /// The grant a location starts from before its witness has issued one: its
    /// preferred (first) node, epoch 0 (the first grant issued outranks it).
    pub fn initial(nodes: &[String]) -> PairGrant {
        PairGrant {
            holder: PairHolder::Node(NodeId::new(nodes.first().cloned().unwrap_or_default())),
            epoch: Epoch::default(),
        }
    }

    /// The owner and epoch the API, the audit log and the runtime's fence read: the
    /// master, or the edge (one of the nodes, or on the way to one).
    pub fn control_state(&self) -> super::ControlState {
        super::ControlState {
            owner: match self.holder {
                PairHolder::Master => super::Owner::Master,
                PairHolder::Node(_) | PairHolder::Moving(_) => super::Owner::Edge,
            },
            epoch: self.epoch,
        }
    }

    /// The node that holds (none: the master, or a move in progress).
    pub fn node(&self) -> Option<&NodeId> {
        match &self.holder {
            PairHolder::Node(node) => Some(node),
            _ => None,
        }
    }

    /// Whether `other` supersedes this grant (a newer epoch).
    pub fn superseded_by(&self, other: &PairGrant) -> bool {
        other.epoch > self.epoch
    }
}

/// A grant's proof for one node: [`crate::link::auth::grant_proof`] under that node's own
/// secret. The witness sends a grant with a proof for every node of the location; a node
/// takes a grant (from the witness, or passed on by its peer) only with a valid proof of
/// its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantProof {
    /// The node it is for.
    pub node: NodeId,
    /// The MAC.
    pub mac: [u8; 32],
}

/// The most proofs a grant carries (a location's nodes at most).
pub const MAX_GRANT_PROOFS: usize = tether_config::MAX_NODES;

/// What a node tells the witness of itself, on its link and whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The grant it holds to.
    pub epoch: Epoch,
    /// What it hears of each of its peers.
    pub peers: Vec<PeerReport>,
    /// How many of the location's devices it reaches.
    pub devices: u32,
    /// Whether it runs the modules.
    pub running: bool,
    /// Whether it runs them on a claim of its own, made without a witness.
    pub claimed: bool,
}

impl NodeReport {
    /// What it says of `node`.
    pub fn about(&self, node: &NodeId) -> Option<&PeerReport> {
        self.peers.iter().find(|peer| peer.node == *node)
    }
}

/// What a node tells the witness of one of its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    /// The peer.
    pub node: NodeId,
    /// Whether their link is up.
    pub hears: bool,
    /// How long it has not heard the peer (0 while it does).
    pub silent_ms: u64,
    /// The peer's last note, while their link is up (a holder that cannot reach the
    /// witness still tells it, through a peer, that it stopped).
    pub note: Option<PeerNote>,
}

/// What a node tells its peer, on their link, whenever it changes: the grant it holds to
/// and whether it runs. A node named by a grant starts only once its peer has said it
/// does not run under that grant or a newer one, or has not been heard for the pair
/// timeout (so a handover between two nodes that hear each other is break before make).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNote {
    /// The epoch of the grant it holds to.
    pub epoch: Epoch,
    /// Whether it runs the modules.
    pub running: bool,
    /// Whether it runs them on a claim of its own, made without a witness: a peer that
    /// reaches the witness tells it so in its report, and the witness decides (a
    /// claimant that hears only such a peer would otherwise keep its claim).
    pub claimed: bool,
    /// The peers it hears running, with the epoch each runs under: a node that hears
    /// only this one learns through it that a holder runs (a claim made without a
    /// witness ends then).
    pub heard_running: Vec<(NodeId, Epoch)>,
}

/// When a link was last heard, and whether it is up.
#[derive(Debug, Clone, Copy, Default)]
struct Heard {
    up: bool,
    /// The last message, or the moment it came up (`None`: never, since start).
    last: Option<Mono>,
}

impl Heard {
    /// How long since its last frame (a link up but silent counts: the loss of a link is
    /// noticed only heartbeats later, and the decisions are timed from the last frame).
    fn silent_ms(&self, now: Mono, since_start: Mono) -> u64 {
        now.since(self.last.unwrap_or(since_start))
    }
}

/// What happens to a node. A link found down carries when it was last heard (its last
/// frame), not when the loss was noticed: silences are counted from there, so that a
/// holder's stop and a standby's grant are timed from the same moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// Its link to a master came up.
    MasterUp,
    /// Its link to every master was found down.
    MasterDown {
        /// The last frame from a master.
        last_heard: Mono,
    },
    /// Its link to a peer came up.
    PeerUp(NodeId),
    /// Its link to a peer was found down.
    PeerDown {
        /// The peer.
        peer: NodeId,
        /// The last frame from the peer.
        last_heard: Mono,
    },
    /// A frame from a master (a heartbeat, anything): the master link is alive.
    MasterHeard,
    /// A frame from a peer.
    PeerHeard(NodeId),
    /// A grant, from a master (`from_master`) or passed on by the peer.
    Granted {
        /// The grant.
        grant: PairGrant,
        /// Whether a master sent it: the witness's word (a grant naming this node, from
        /// the witness, clears its start; one passed on by the peer needs the peer's note).
        from_master: bool,
    },
    /// How many of the location's devices it reaches now.
    Devices(u32),
    /// A peer's note.
    PeerNote(NodeId, PeerNote),
}

/// What a node's shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAction {
    /// Start the location's modules under this epoch.
    Start {
        /// The grant's epoch (or the claim's, taken without a witness).
        epoch: Epoch,
    },
    /// Stop them; why, for the log and the audit.
    Stop {
        /// Why.
        reason: &'static str,
    },
    /// Send this report to the master(s) (and so to the witness).
    Report(NodeReport),
    /// Send this note to the peer (and its grant, when it changed).
    TellPeer(PeerNote),
}

/// One node's machine.
#[derive(Debug, Clone)]
pub struct NodeSide {
    me: NodeId,
    settings: PairSettings,
    grant: PairGrant,
    /// Taken without a witness (`unwitnessed_takeover_ms`), until a grant says otherwise.
    claimed: bool,
    master: Heard,
    /// Its peers (the location's other nodes): their links and last notes.
    peers: Vec<Peer>,
    devices: u32,
    running: bool,
    started: Mono,
    /// The epoch of a grant naming this node that a master itself sent it.
    witnessed: Option<Epoch>,
    /// Until it has heard a grant from a master (or from its peer, in a pair; a newer one
    /// from a peer, with several) a node runs nothing: at its start (for a boot wait at
    /// most) its stored grant may be stale, and so may it be after it stopped, cut off
    /// from both, under `isolation = "stop"`.
    awaiting_grant: bool,
    /// Whether the wait is the boot's (it ends after the pair timeout even unheard).
    booting: bool,
}

/// One of a node's peers, as it hears it.
#[derive(Debug, Clone)]
struct Peer {
    id: NodeId,
    heard: Heard,
    /// Its last note, while its link is up.
    note: Option<PeerNote>,
}

impl Peer {
    fn new(id: NodeId) -> Self {
        Peer {
            id,
            heard: Heard::default(),
            note: None,
        }
    }
}

impl NodeSide {
    /// A node of a location whose other nodes are `peers`, starting with `persisted`, the
    /// last grant it stored, at `now`.
    pub fn new(
        me: NodeId,
        peers: Vec<NodeId>,
        settings: PairSettings,
        persisted: PairGrant,
        now: Mono,
    ) -> Self {
        NodeSide {
            peers: peers
                .into_iter()
                .filter(|peer| *peer != me)
                .map(Peer::new)
                .collect(),
            me,
            settings,
            grant: persisted,
            claimed: false,
            master: Heard::default(),
            devices: 0,
            running: false,
            started: now,
            awaiting_grant: true,
            booting: true,
            witnessed: None,
        }
    }

    /// Whether its modules run.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The location's settings changed (its record was edited).
    pub fn set_settings(&mut self, settings: PairSettings) {
        self.settings = settings;
    }

    /// The location's other nodes changed: those it knew keep what it heard of them.
    pub fn set_peers(&mut self, peers: Vec<NodeId>) {
        let mut known = std::mem::take(&mut self.peers);
        self.peers = peers
            .into_iter()
            .filter(|peer| *peer != self.me)
            .map(|id| match known.iter().position(|p| p.id == id) {
                Some(i) => known.swap_remove(i),
                None => Peer::new(id),
            })
            .collect();
    }

    fn peer_mut(&mut self, id: &NodeId) -> Option<&mut Peer> {
        self.peers.iter_mut().find(|peer| peer.id == *id)
    }

    /// The grant it holds to.
    pub fn grant(&self) -> &PairGrant {
        &self.grant
    }

    /// Whether it runs on a claim of its own, made without a witness.
    pub fn claimed(&self) -> bool {
        self.claimed
    }

    /// Its note for its peer.
    pub fn note(&self) -> PeerNote {
        PeerNote {
            epoch: self.grant.epoch,
            running: self.running,
            claimed: self.claimed,
            heard_running: self.heard_running(),
        }
    }

    /// The peers it hears running (their notes, while their links are up).
    fn heard_running(&self) -> Vec<(NodeId, Epoch)> {
        self.peers
            .iter()
            .filter_map(|peer| {
                let note = peer.note.as_ref()?;
                note.running.then(|| (peer.id.clone(), note.epoch))
            })
            .collect()
    }

    /// Its report for the witness.
    pub fn report(&self, now: Mono) -> NodeReport {
        NodeReport {
            epoch: self.grant.epoch,
            peers: self
                .peers
                .iter()
                .map(|peer| PeerReport {
                    node: peer.id.clone(),
                    hears: peer.heard.up,
                    silent_ms: peer.heard.silent_ms(now, self.started),
                    note: peer.note.clone(),
                })
                .collect(),
            running: self.running,
            claimed: self.claimed,
            devices: self.devices,
        }
    }

    /// Takes in an event; answers what to do.
    pub fn handle(&mut self, now: Mono, event: NodeEvent) -> Vec<NodeAction> {
        let mut actions = Vec::new();
        match event {
            NodeEvent::MasterUp => {
                self.master = Heard {
                    up: true,
                    last: Some(now),
                };
                actions.push(NodeAction::Report(self.report(now)));
            }
            NodeEvent::MasterDown { last_heard } => {
                self.master = Heard {
                    up: false,
                    last: Some(last_heard),
                };
            }
            NodeEvent::PeerUp(id) => {
                let Some(peer) = self.peer_mut(&id) else {
                    return actions;
                };
                peer.heard = Heard {
                    up: true,
                    last: Some(now),
                };
                actions.push(NodeAction::Report(self.report(now)));
                actions.push(NodeAction::TellPeer(self.note()));
            }
            NodeEvent::PeerDown { peer, last_heard } => {
                let Some(peer) = self.peer_mut(&peer) else {
                    return actions;
                };
                peer.heard = Heard {
                    up: false,
                    last: Some(last_heard),
                };
                peer.note = None;
                actions.push(NodeAction::Report(self.report(now)));
            }
            NodeEvent::PeerNote(id, note) => {
                let before = self.heard_running();
                // A note from a link found down meanwhile is old news.
                let Some(peer) = self.peer_mut(&id).filter(|peer| peer.heard.up) else {
                    return actions;
                };
                peer.note = Some(note);
                peer.heard.last = Some(now);
                // The witness hears of it too (a release acknowledged through the peer).
                actions.push(NodeAction::Report(self.report(now)));
                // And the other peers, when whom it hears running changed.
                if self.heard_running() != before && self.peers.len() > 1 {
                    actions.push(NodeAction::TellPeer(self.note()));
                }
            }
            NodeEvent::MasterHeard => self.master.last = Some(now),
            NodeEvent::PeerHeard(id) => {
                if let Some(peer) = self.peer_mut(&id) {
                    peer.heard.last = Some(now);
                }
            }
            NodeEvent::Granted { grant, from_master } => {
                // The wait ends on the witness's word, or on a grant a peer passes on. With
                // several peers, only a newer one: not a peer's echo of the grant this node
                // holds (learned from this very node, while a third holds a newer one).
                // With one, its peer's grant says what the location holds (else a pair
                // whose master is away would stay dark, both nodes healthy).
                if from_master || self.peers.len() == 1 || self.grant.superseded_by(&grant) {
                    self.awaiting_grant = false;
                    self.booting = false;
                }
                if from_master && grant.holder == PairHolder::Node(self.me.clone()) {
                    self.witnessed = Some(grant.epoch);
                }
                // A newer grant ends a claim made without a witness (the witness decided;
                // until then the claimant keeps the rooms running).
                if grant.epoch > self.grant.epoch {
                    self.claimed = false;
                }
                if self.grant.superseded_by(&grant) {
                    self.grant = grant;
                    // The witness and the peer learn that this node took it (and stopped,
                    // if it must).
                    let before = self.running;
                    self.decide(now, &mut actions);
                    actions.push(NodeAction::Report(self.report(now)));
                    if before == self.running {
                        actions.push(NodeAction::TellPeer(self.note()));
                    }
                    return actions;
                }
            }
            NodeEvent::Devices(devices) => {
                if devices != self.devices {
                    self.devices = devices;
                    actions.push(NodeAction::Report(self.report(now)));
                }
            }
        }
        self.decide(now, &mut actions);
        actions
    }

    /// Time passed: answers what to do now.
    pub fn poll(&mut self, now: Mono) -> Vec<NodeAction> {
        let mut actions = Vec::new();
        self.decide(now, &mut actions);
        actions
    }

    fn decide(&mut self, now: Mono, actions: &mut Vec<NodeAction>) {
        // Unheard for the boot wait, a node runs its stored grant only where rooms are to
        // keep running cut off from both ("continue"): under "stop" it waits for a grant
        // (a link that came up and went before the grant did would not make it isolated).
        if self.booting && now.since(self.started) >= self.settings.pair_timeout_ms {
            self.booting = false;
            if self.settings.isolation == Isolation::Continue {
                self.awaiting_grant = false;
            }
        }
        let named = self.grant.holder == PairHolder::Node(self.me.clone());
        let master_silent = self.master.silent_ms(now, self.started);
        let started = self.started;
        let silent = |peer: &Peer| peer.heard.silent_ms(now, started);
        // The peer heard last (none: silent for ever).
        let peers_silent = self.peers.iter().map(silent).min().unwrap_or(u64::MAX);
        if !named
            && !self.claimed
            && let Some(after) = self.settings.unwitnessed_takeover_ms
            && master_silent >= after
            && peers_silent >= after
        {
            // No witness and no holder heard for that long: take it (VOLTTRON's simple
            // mode), under the last grant's epoch, which the next grant outranks.
            self.claimed = true;
        }
        // A claim ends as soon as the holder is heard running again: itself, or through a
        // peer that hears it.
        let epoch = self.grant.epoch;
        if self.claimed
            && self.peers.iter().any(|peer| {
                peer.note.as_ref().is_some_and(|note| {
                    (note.running && note.epoch >= epoch)
                        || note
                            .heard_running
                            .iter()
                            .any(|(node, e)| *node != self.me && *e >= epoch)
                })
            })
        {
            self.claimed = false;
        }
        let holds = named || self.claimed;
        let isolated_stop = self.settings.isolation == Isolation::Stop
            && master_silent.min(peers_silent) >= stop_after_ms(&self.settings);
        if isolated_stop && holds {
            // Heard again, it runs only once a grant says it still holds.
            self.awaiting_grant = true;
        }
        // Break before make: a node starts once its peer has said it does not run under
        // this grant or a newer one, or after the peer has been silent for the pair
        // timeout (cut off: under "stop" it has stopped by then).
        // A grant from the witness itself clears the start too while the peer is not
        // linked; while it is, its note decides (it has heard of this grant and does not
        // run), so that two grants crossing on their way never start both.
        // With several peers, each of them clears it so.
        let witnessed = self.witnessed == Some(self.grant.epoch);
        let peer_clear = self.claimed
            || self.peers.iter().all(|peer| {
                (witnessed && !peer.heard.up)
                    || silent(peer) >= self.settings.pair_timeout_ms
                    || peer
                        .note
                        .as_ref()
                        .is_some_and(|note| !note.running && note.epoch >= self.grant.epoch)
            });
        let run = holds && !isolated_stop && !self.awaiting_grant && (self.running || peer_clear);
        if run && !self.running {
            self.running = true;
            actions.push(NodeAction::Start {
                epoch: self.grant.epoch,
            });
            actions.push(NodeAction::TellPeer(self.note()));
        } else if !run && self.running {
            self.running = false;
            actions.push(NodeAction::Stop {
                reason: if holds {
                    "cut off from its peers and every master (isolation = \"stop\")"
                } else {
                    "another holder was granted the modules"
                },
            });
            // Only once stopped: the peer may start on this note.
            actions.push(NodeAction::TellPeer(self.note()));
        }
    }
}

/// What the witness hears of a location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessEvent {
    /// A node's link came up.
    Up(NodeId),
    /// A node's link was found down; its last frame came then.
    Down(NodeId, Mono),
    /// A node's report.
    Report(NodeId, NodeReport),
    /// An operator asks the modules back from the master to the preferred linked node.
    Restore,
}

/// What the witness's shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessAction {
    /// Store this grant (compare-and-set), then send it to every linked node.
    Issue(PairGrant),
    /// The master runs the modules now (a grant naming it was issued).
    Start {
        /// Its epoch.
        epoch: Epoch,
    },
    /// The master stops them (a node was granted them).
    Stop,
}

#[derive(Debug, Clone, Default)]
struct NodeView {
    link: Heard,
    report: Option<(NodeReport, Mono)>,
    /// Since when it has reached more devices than the holder (for the hold-down).
    better_since: Option<Mono>,
}

/// The master's machine for one location with nodes.
#[derive(Debug, Clone)]
pub struct WitnessSide {
    nodes: Vec<NodeId>,
    views: Vec<NodeView>,
    settings: PairSettings,
    grant: PairGrant,
    running: bool,
    started: Mono,
}

impl WitnessSide {
    /// The witness of a location of `nodes` (the first preferred), from the grant it
    /// stored last, at `now`.
    pub fn new(
        nodes: Vec<NodeId>,
        settings: PairSettings,
        persisted: PairGrant,
        now: Mono,
    ) -> Self {
        WitnessSide {
            views: vec![NodeView::default(); nodes.len()],
            nodes,
            settings,
            grant: persisted,
            running: false,
            started: now,
        }
    }

    /// The location's settings changed (its record was edited).
    pub fn set_settings(&mut self, settings: PairSettings) {
        self.settings = settings;
    }

    /// A node holds a grant of `epoch`, above the last this witness stored (its store lost
    /// grants: a restored backup, a pair moved onto etcd): it issues above it from now on,
    /// or the nodes would refuse its grants as old. The holder it names is left as it is:
    /// at worst a device handover stops and starts the holder once.
    pub fn raise_epoch(&mut self, epoch: Epoch) {
        if epoch > self.grant.epoch {
            self.grant.epoch = epoch;
        }
    }

    /// The grant stored last.
    pub fn grant(&self) -> &PairGrant {
        &self.grant
    }

    /// Whether the master runs the modules.
    pub fn is_running(&self) -> bool {
        self.running
    }

    fn index(&self, node: &NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n == node)
    }

    /// Takes in an event; answers what to do.
    pub fn handle(&mut self, now: Mono, event: WitnessEvent) -> Vec<WitnessAction> {
        let mut actions = Vec::new();
        match event {
            WitnessEvent::Up(node) => {
                if let Some(i) = self.index(&node) {
                    self.views[i].link = Heard {
                        up: true,
                        last: Some(now),
                    };
                }
            }
            WitnessEvent::Down(node, last_heard) => {
                if let Some(i) = self.index(&node) {
                    self.views[i].link = Heard {
                        up: false,
                        last: Some(last_heard),
                    };
                    self.views[i].report = None;
                    self.views[i].better_since = None;
                }
            }
            WitnessEvent::Report(node, report) => {
                if let Some(i) = self.index(&node) {
                    self.views[i].report = Some((report, now));
                }
            }
            WitnessEvent::Restore => {
                if self.grant.holder == PairHolder::Master
                    && let Some(i) = (0..self.nodes.len()).find(|i| self.views[*i].link.up)
                {
                    // Break before make: the master's modules stop before the grant goes,
                    // and the node is granted them through a release, once the other
                    // node has said it does not run (a stale holder cut off from the
                    // master may still run its rooms) or has been gone long enough.
                    if self.running {
                        self.running = false;
                        actions.push(WitnessAction::Stop);
                    }
                    self.issue(PairHolder::Moving(self.nodes[i].clone()), &mut actions);
                }
            }
        }
        self.decide(now, &mut actions);
        actions
    }

    /// Time passed: answers what to do now.
    pub fn poll(&mut self, now: Mono) -> Vec<WitnessAction> {
        let mut actions = Vec::new();
        self.decide(now, &mut actions);
        actions
    }

    /// A node (other than `except`) that runs on a claim of its own: it says so on its
    /// link, or a linked peer reports its note saying so. A claim counts only at this
    /// witness's epoch: one below it ends when the claimant takes the grant this witness
    /// holds (sent on every new link, and passed on by a peer on every new peer link),
    /// and the grant issued for a claim is above it, so one decision is taken per claim.
    fn claimant(&self, except: Option<usize>) -> Option<usize> {
        let epoch = self.grant.epoch;
        (0..self.nodes.len())
            .filter(|c| Some(*c) != except)
            .find(|c| {
                let direct = self.views[*c].link.up
                    && self.views[*c]
                        .report
                        .as_ref()
                        .is_some_and(|(report, _)| report.claimed && report.epoch >= epoch);
                let relayed = self.views.iter().any(|view| {
                    view.link.up
                        && view.report.as_ref().is_some_and(|(report, _)| {
                            report.about(&self.nodes[*c]).is_some_and(|peer| {
                                peer.hears
                                    && peer.note.as_ref().is_some_and(|note| {
                                        note.running && note.claimed && note.epoch >= epoch
                                    })
                            })
                        })
                });
                direct || relayed
            })
    }

    fn issue(&mut self, holder: PairHolder, actions: &mut Vec<WitnessAction>) {
        let grant = PairGrant {
            holder,
            epoch: self.grant.epoch.next(),
        };
        self.grant = grant.clone();
        actions.push(WitnessAction::Issue(grant));
    }

    fn decide(&mut self, now: Mono, actions: &mut Vec<WitnessAction>) {
        match self.grant.holder.clone() {
            PairHolder::Node(holder) => self.decide_for_node(now, &holder, actions),
            PairHolder::Moving(to) => self.decide_move(now, &to, actions),
            // The master keeps what it took until a restore (as with one edge), unless a
            // node runs them on a claim of its own (taken while no master was there): the
            // node keeps them, the master stopping first.
            PairHolder::Master => {
                if let Some(c) = self.claimant(None) {
                    if self.running {
                        self.running = false;
                        actions.push(WitnessAction::Stop);
                    }
                    self.issue(PairHolder::Node(self.nodes[c].clone()), actions);
                }
            }
        }
        // A master that starts (again) holding the modules runs them once every node has
        // been heard, or after the pair timeout: a node may have claimed them meanwhile.
        let heard_all = self.views.iter().all(|view| view.report.is_some());
        if !self.running && now.since(self.started) < self.settings.pair_timeout_ms && !heard_all {
            return;
        }
        let run = self.grant.holder == PairHolder::Master;
        if run && !self.running {
            self.running = true;
            actions.push(WitnessAction::Start {
                epoch: self.grant.epoch,
            });
        } else if !run && self.running {
            self.running = false;
            actions.push(WitnessAction::Stop);
        }
    }

    fn decide_for_node(&mut self, now: Mono, holder: &NodeId, actions: &mut Vec<WitnessAction>) {
        let Some(h) = self.index(holder) else {
            return;
        };
        let timeout = self.settings.pair_timeout_ms;
        let holder_off = match self.views[h].link.up {
            true => 0,
            false => self.views[h].link.silent_ms(now, self.started),
        };
        // A node that runs on a claim of its own (taken without a witness) is decided for
        // as soon as it is heard: it keeps the modules when the holder is gone (off the
        // master for the pair timeout, and unheard by every other node, each linked); else
        // the holder does (at once when it runs or may run unseen, else once the claimant
        // has stopped).
        if let Some(c) = self.claimant(Some(h)) {
            let holder_runs = self.views[h].link.up
                && self.views[h]
                    .report
                    .as_ref()
                    .is_some_and(|(report, _)| report.running);
            let holder_gone = holder_off >= timeout
                && (0..self.nodes.len())
                    .filter(|s| *s != h && *s != c)
                    .all(|s| self.cannot_vouch(s, h, now));
            let next = if holder_gone {
                PairHolder::Node(self.nodes[c].clone())
            } else if holder_runs || !self.views[h].link.up {
                PairHolder::Node(holder.clone())
            } else {
                PairHolder::Moving(holder.clone())
            };
            self.issue(next, actions);
            return;
        }
        // The holder off the master for the pair timeout, and every other node linked and
        // reporting that it has not heard the holder for as long (or gone, see
        // [`Self::cannot_vouch`]): the first linked one is granted the modules. A node that
        // hears the holder vouches for it (it runs, cut off from the master alone), and
        // one off the master might: either holds it.
        let others: Vec<usize> = (0..self.nodes.len()).filter(|s| *s != h).collect();
        let nobody_hears = others.iter().all(|s| self.cannot_vouch(*s, h, now));
        let witnessed = others
            .iter()
            .copied()
            .find(|s| self.views[*s].link.up)
            .filter(|_| nobody_hears);
        if holder_off >= timeout
            && let Some(s) = witnessed
        {
            self.issue(PairHolder::Node(self.nodes[s].clone()), actions);
            return;
        }
        // No node linked for the location's timeout: the master takes the modules.
        let all_off = self.views.iter().all(|view| {
            !view.link.up && view.link.silent_ms(now, self.started) >= self.settings.timeout_ms
        });
        if all_off {
            self.issue(PairHolder::Master, actions);
            return;
        }
        // Devices count as health: a linked peer that reaches more of them than the
        // holder for the hold-down gets the modules, the holder released first.
        let holder_devices = self.views[h]
            .report
            .as_ref()
            .filter(|_| self.views[h].link.up)
            .map(|(report, _)| report.devices);
        for s in (0..self.nodes.len()).filter(|s| *s != h) {
            let better = self.views[s].link.up
                && holder_devices.is_some_and(|held| {
                    self.views[s]
                        .report
                        .as_ref()
                        .is_some_and(|(report, _)| report.devices > held)
                });
            if !better {
                self.views[s].better_since = None;
                continue;
            }
            let since = *self.views[s].better_since.get_or_insert(now);
            if now.since(since) >= self.settings.device_hold_down_ms {
                self.views[s].better_since = None;
                self.issue(PairHolder::Moving(self.nodes[s].clone()), actions);
                return;
            }
        }
    }

    /// Whether node `s` cannot vouch that holder `h` runs: linked, it reports that it has
    /// not heard `h` for the pair timeout. Unlinked, it might hear `h` (the two of them on
    /// an island without a master, where `h` keeps running), so it vouches, except under
    /// `isolation = "continue"` (where a holder cut off from every master may run beside
    /// a granted node, the risk the location takes) once it has been off the master for
    /// the location's `timeout_ms` and unheard by every linked node for the pair
    /// timeout: else, in a location of three nodes, two of them gone would leave the
    /// third dark.
    fn cannot_vouch(&self, s: usize, h: usize, now: Mono) -> bool {
        let view = &self.views[s];
        if view.link.up {
            return self.unheard(s, h, now);
        }
        self.settings.isolation == Isolation::Continue
            && view.link.silent_ms(now, self.started) >= self.settings.timeout_ms
            && (0..self.nodes.len())
                .filter(|p| *p != s && self.views[*p].link.up)
                .all(|p| self.unheard(p, s, now))
    }

    /// Whether node `s` reported that it has not heard node `o` for the pair timeout.
    fn unheard(&self, s: usize, o: usize, now: Mono) -> bool {
        self.views[s].report.as_ref().is_some_and(|(report, at)| {
            report.about(&self.nodes[o]).is_some_and(|peer| {
                !peer.hears && peer.silent_ms + now.since(*at) >= self.settings.pair_timeout_ms
            })
        })
    }

    /// A move to `to`: granted once every other node has said it took the release (so it
    /// stopped), or has been gone long enough to be failed over (off the master and
    /// unheard by every linked node for the pair timeout).
    fn decide_move(&mut self, now: Mono, to: &NodeId, actions: &mut Vec<WitnessAction>) {
        let Some(t) = self.index(to) else {
            return;
        };
        let timeout = self.settings.pair_timeout_ms;
        let epoch = self.grant.epoch;
        let released = (0..self.nodes.len()).filter(|o| *o != t).all(|o| {
            let view = &self.views[o];
            let acked = view.link.up
                && view
                    .report
                    .as_ref()
                    .is_some_and(|(report, _)| report.epoch >= epoch);
            let gone = !view.link.up
                && view.link.silent_ms(now, self.started) >= timeout
                && (0..self.nodes.len())
                    .filter(|p| *p != o)
                    .all(|p| self.cannot_vouch(p, o, now));
            // Acknowledged through a peer: a linked node (`to`, or another) heard it say
            // it stopped under the move.
            let through_peer = self.views.iter().any(|view| {
                view.link.up
                    && view.report.as_ref().is_some_and(|(report, _)| {
                        report.about(&self.nodes[o]).is_some_and(|peer| {
                            peer.hears
                                && peer
                                    .note
                                    .as_ref()
                                    .is_some_and(|note| !note.running && note.epoch >= epoch)
                        })
                    })
            });
            acked || gone || through_peer
        });
        if released && self.views[t].link.up {
            self.issue(PairHolder::Node(to.clone()), actions);
            return;
        }
        // `to` gone meanwhile: the modules go back to a linked node (it stopped for the
        // move, and `to` is off).
        if !self.views[t].link.up
            && self.views[t].link.silent_ms(now, self.started) >= timeout
            && let Some(o) = (0..self.nodes.len()).find(|o| *o != t && self.views[*o].link.up)
        {
            self.issue(PairHolder::Node(self.nodes[o].clone()), actions);
            return;
        }
        // Nobody linked for the location's timeout: the master takes the modules.
        if self.views.iter().all(|view| {
            !view.link.up && view.link.silent_ms(now, self.started) >= self.settings.timeout_ms
        }) {
            self.issue(PairHolder::Master, actions);
        }
    }
}
