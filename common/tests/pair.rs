//! A site pair (nodes A, preferred, and B) and its witness (the master), their machines
//! stepped together in simulated time: random cuts and heals of each of the three links
//! (A-master, B-master, A-B), kills and restarts of every side, devices reached changing,
//! restores, links flapping up for a moment. Each side notices a lost link on its own,
//! one to four heartbeats after the last frame it heard; links come back after a
//! reconnect delay of their own.
//!
//! Asserted at every step:
//! - two nodes run the modules at once only while the link between them is cut (or was,
//!   within a reconnect), and then only where the location allows it: with
//!   `isolation = "continue"` while the old holder is cut off from the master too, with
//!   `unwitnessed_takeover_ms` while both are; with `"stop"` and no unwitnessed takeover,
//!   never;
//! - the master runs them with a node only while that node's link to it is cut (or was,
//!   within a reconnect);
//! - no epoch is issued twice, and epochs only grow.
//!
//! After healing everything: exactly one side runs the modules, the one the witness's
//! grant names, and every node holds that grant.

use std::collections::{BTreeSet, VecDeque};

use proptest::prelude::*;
use tether_common::control::pair::{
    Isolation, NodeAction, NodeEvent, NodeReport, NodeSide, PairGrant, PairHolder, PairSettings,
    PeerNote, PeerReport, WitnessAction, WitnessEvent, WitnessSide,
};
use tether_common::control::{Epoch, Mono, NodeId};

const HEARTBEAT_MS: u64 = 500;
const LATENCY_MS: u64 = 20;
const RECONNECT_MAX_MS: u64 = 1000;
const STEP_MS: u64 = 10;
/// After a link heals, how long a stale holder may still run: the link's return, the
/// grant's delivery, a poll.
const GRACE_MS: u64 = RECONNECT_MAX_MS + 4 * LATENCY_MS + 2 * STEP_MS;

const A: usize = 0;
const B: usize = 1;
/// Links: each node's to the master, and theirs to each other.
const AM: usize = 0;
const AB: usize = 2;

fn node_id(i: usize) -> NodeId {
    NodeId::new(["site-1a", "site-1b", "site-1c"][i])
}

fn first_grant() -> PairGrant {
    PairGrant {
        holder: PairHolder::Node(node_id(A)),
        epoch: Epoch::ZERO,
    }
}

/// A small deterministic generator for the sides' own delays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Node(usize),
    Master,
}

#[derive(Debug, Clone)]
enum Delivery {
    /// A link's end notices it down (its last frame at `last_heard`) or up.
    Noticed {
        link: usize,
        end: Side,
        up: bool,
        last_heard: u64,
    },
    /// A grant to a node, from a master (`None`) or passed on by a peer.
    GrantTo(usize, PairGrant, Option<usize>),
    /// A note to a node, from a peer.
    NoteTo(usize, usize, PeerNote),
    ReportFrom(usize, NodeReport),
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Advance(u64),
    Cut(usize),
    Heal(usize),
    Kill(Side),
    Start(Side),
    Devices(usize, u32),
    Restore,
    /// A cut link up for a moment, then cut again (maybe too short to be noticed).
    Flap(usize, u64),
}

/// The links of a location of `n` nodes: each node's to the master (link i for node i),
/// then one between each two nodes (for two nodes: A-master, B-master, A-B).
fn link_count(n: usize) -> usize {
    n + n * (n - 1) / 2
}

/// The link between nodes `i` and `j`.
fn peer_link(n: usize, i: usize, j: usize) -> usize {
    let (i, j) = (i.min(j), i.max(j));
    let mut link = n;
    for a in 0..n {
        for b in a + 1..n {
            if (a, b) == (i, j) {
                return link;
            }
            link += 1;
        }
    }
    unreachable!("no link between {i} and {j}")
}

struct World {
    n: usize,
    now: u64,
    settings: PairSettings,
    rng: Rng,
    nodes: Vec<Option<NodeSide>>,
    stored: Vec<PairGrant>,
    witness: Option<WitnessSide>,
    witness_stored: PairGrant,
    /// Incarnations (each node's, then the master's), so that what was on its way to a
    /// killed side is dropped.
    generation: Vec<u64>,
    cut: Vec<bool>,
    /// Whether each link was physically up, as of the last change.
    was_up: Vec<bool>,
    /// When each link last went physically down, and whether it is down now.
    down_since: Vec<Option<u64>>,
    /// When each link last came back (for the grace after a heal).
    up_since: Vec<u64>,
    queue: VecDeque<(u64, u64, Side, Delivery)>,
    /// Whether each end of each link has noticed it up (frames flow to it then).
    noticed: Vec<[bool; 2]>,
    /// The last heartbeat each link carried.
    beat: Vec<u64>,
    issued: BTreeSet<Epoch>,
    devices: Vec<u32>,
}

impl World {
    fn new(n: usize, settings: PairSettings, seed: u64) -> World {
        let now = 0;
        let links = link_count(n);
        let ids: Vec<NodeId> = (0..n).map(node_id).collect();
        let mut world = World {
            n,
            now,
            settings,
            rng: Rng(seed | 1),
            nodes: (0..n)
                .map(|i| {
                    Some(NodeSide::new(
                        node_id(i),
                        ids.clone(),
                        settings,
                        first_grant(),
                        Mono(now),
                    ))
                })
                .collect(),
            stored: vec![first_grant(); n],
            witness: Some(WitnessSide::new(ids, settings, first_grant(), Mono(now))),
            witness_stored: first_grant(),
            generation: vec![0; n + 1],
            cut: vec![false; links],
            was_up: vec![false; links],
            down_since: vec![Some(0); links],
            up_since: vec![0; links],
            queue: VecDeque::new(),
            noticed: vec![[false; 2]; links],
            beat: vec![0; links],
            issued: BTreeSet::new(),
            devices: vec![3; n],
        };
        for i in 0..n {
            if let Some(node) = &mut world.nodes[i] {
                let _ = node.handle(Mono(now), NodeEvent::Devices(world.devices[i]));
            }
        }
        world.links_changed();
        world
    }

    fn ids(&self) -> Vec<NodeId> {
        (0..self.n).map(node_id).collect()
    }

    fn ends(&self, link: usize) -> (Side, Side) {
        if link < self.n {
            return (Side::Node(link), Side::Master);
        }
        for a in 0..self.n {
            for b in a + 1..self.n {
                if peer_link(self.n, a, b) == link {
                    return (Side::Node(a), Side::Node(b));
                }
            }
        }
        unreachable!("no link {link}")
    }

    fn gen_index(&self, side: Side) -> usize {
        match side {
            Side::Node(i) => i,
            Side::Master => self.n,
        }
    }

    fn alive(&self, side: Side) -> bool {
        match side {
            Side::Node(i) => self.nodes[i].is_some(),
            Side::Master => self.witness.is_some(),
        }
    }

    fn physically_up(&self, link: usize) -> bool {
        let (a, b) = self.ends(link);
        !self.cut[link] && self.alive(a) && self.alive(b)
    }

    /// Whether messages flow over `link`: up, and both ends have their end of it (a link
    /// is established at both ends before anything is sent over it).
    fn carries(&self, link: usize) -> bool {
        self.physically_up(link) && self.noticed[link][0] && self.noticed[link][1]
    }

    /// Schedules each end's noticing of every link whose physical state changed.
    fn links_changed(&mut self) {
        for link in 0..link_count(self.n) {
            let up = self.physically_up(link);
            if up == self.was_up[link] {
                continue;
            }
            self.was_up[link] = up;
            let (a, b) = self.ends(link);
            if up {
                self.down_since[link] = None;
                self.up_since[link] = self.now;
                // The connect completes at one end, the other a latency later.
                let delay = LATENCY_MS + self.rng.below(RECONNECT_MAX_MS - LATENCY_MS);
                for (k, end) in [a, b].into_iter().enumerate() {
                    self.schedule(
                        delay + k as u64 * LATENCY_MS,
                        end,
                        Delivery::Noticed {
                            link,
                            end,
                            up: true,
                            last_heard: 0,
                        },
                    );
                }
            } else {
                self.down_since[link] = Some(self.now);
                // Each end's last frame came within a heartbeat before (each its own), and
                // each notices the silence on a heartbeat tick past three heartbeats: one
                // to four heartbeats after that frame, each at its own time.
                for end in [a, b] {
                    let last_heard = self.now.saturating_sub(self.rng.below(HEARTBEAT_MS));
                    let notice = last_heard + HEARTBEAT_MS + self.rng.below(3 * HEARTBEAT_MS);
                    let delay = notice.saturating_sub(self.now).max(1);
                    self.schedule(
                        delay,
                        end,
                        Delivery::Noticed {
                            link,
                            end,
                            up: false,
                            last_heard,
                        },
                    );
                }
            }
        }
    }

    fn schedule(&mut self, delay: u64, to: Side, delivery: Delivery) {
        let generation = self.generation[self.gen_index(to)];
        self.queue
            .push_back((self.now + delay, generation, to, delivery));
    }

    fn send_grant(&mut self, to: usize, grant: PairGrant, from_peer: Option<usize>) {
        self.schedule(
            LATENCY_MS,
            Side::Node(to),
            Delivery::GrantTo(to, grant, from_peer),
        );
    }

    fn node_actions(&mut self, i: usize, before: PairGrant, actions: Vec<NodeAction>) {
        for action in actions {
            match action {
                NodeAction::Report(report) => {
                    self.schedule(LATENCY_MS, Side::Master, Delivery::ReportFrom(i, report));
                }
                NodeAction::TellPeer(note) => {
                    for j in (0..self.n).filter(|j| *j != i) {
                        let note = note.clone();
                        self.schedule(LATENCY_MS, Side::Node(j), Delivery::NoteTo(j, i, note));
                    }
                }
                _ => {}
            }
        }
        // A node stores a grant it took, and passes it on to its peers.
        let Some(node) = &self.nodes[i] else { return };
        let grant = node.grant().clone();
        if grant != before {
            self.stored[i] = grant.clone();
            for j in (0..self.n).filter(|j| *j != i) {
                self.send_grant(j, grant.clone(), Some(i));
            }
        }
    }

    fn witness_actions(&mut self, actions: Vec<WitnessAction>) -> Result<(), String> {
        for action in actions {
            if let WitnessAction::Issue(grant) = action {
                if self
                    .issued
                    .iter()
                    .next_back()
                    .is_some_and(|last| *last >= grant.epoch)
                {
                    return Err(format!(
                        "epoch {:?} issued after {:?}",
                        grant.epoch, self.issued
                    ));
                }
                self.issued.insert(grant.epoch);
                self.witness_stored = grant.clone();
                for i in 0..self.n {
                    self.send_grant(i, grant.clone(), None);
                }
            }
        }
        Ok(())
    }

    fn deliver(&mut self, delivery: Delivery) -> Result<(), String> {
        let now = Mono(self.now);
        match delivery {
            Delivery::Noticed {
                link,
                end,
                up,
                last_heard,
            } => {
                // A notice of a state that changed again meanwhile is dropped.
                if self.physically_up(link) != up {
                    return Ok(());
                }
                let (first, second) = self.ends(link);
                let index = usize::from(self.gen_index(end) != self.gen_index(first));
                // A link this end never had up (it flapped before being noticed) is not
                // noticed going down either: no frame ever came over it.
                if !up && !self.noticed[link][index] {
                    return Ok(());
                }
                self.noticed[link][index] = up;
                match end {
                    Side::Master => {
                        let node = node_id(link);
                        let event = match up {
                            true => WitnessEvent::Up(node),
                            false => WitnessEvent::Down(node, Mono(last_heard)),
                        };
                        let Some(witness) = &mut self.witness else {
                            return Ok(());
                        };
                        let actions = witness.handle(now, event);
                        let grant = witness.grant().clone();
                        self.witness_actions(actions)?;
                        // A node linking gets the grant.
                        if up {
                            self.send_grant(link, grant, None);
                        }
                    }
                    Side::Node(i) => {
                        // The other end, for a link between nodes.
                        let other = match (first, second) {
                            (Side::Node(a), Side::Node(b)) => Some(if a == i { b } else { a }),
                            _ => None,
                        };
                        let event = match (other, up) {
                            (None, true) => NodeEvent::MasterUp,
                            (None, false) => NodeEvent::MasterDown {
                                last_heard: Mono(last_heard),
                            },
                            (Some(peer), true) => NodeEvent::PeerUp(node_id(peer)),
                            (Some(peer), false) => NodeEvent::PeerDown {
                                peer: node_id(peer),
                                last_heard: Mono(last_heard),
                            },
                        };
                        let Some(node) = &mut self.nodes[i] else {
                            return Ok(());
                        };
                        let before = node.grant().clone();
                        let actions = node.handle(now, event);
                        let grant = node.grant().clone();
                        self.node_actions(i, before, actions);
                        if let (Some(peer), true) = (other, up) {
                            self.send_grant(peer, grant, Some(i));
                        }
                    }
                }
            }
            Delivery::GrantTo(i, grant, from_peer) => {
                // Over the link it was sent on, if that link is still up.
                let link = match from_peer {
                    None => i,
                    Some(peer) => peer_link(self.n, i, peer),
                };
                if !self.carries(link) {
                    return Ok(());
                }
                let Some(node) = &mut self.nodes[i] else {
                    return Ok(());
                };
                let before = node.grant().clone();
                let from_master = from_peer.is_none();
                let actions = node.handle(now, NodeEvent::Granted { grant, from_master });
                self.node_actions(i, before, actions);
            }
            Delivery::NoteTo(i, from, note) => {
                if !self.carries(peer_link(self.n, i, from)) {
                    return Ok(());
                }
                let Some(node) = &mut self.nodes[i] else {
                    return Ok(());
                };
                let before = node.grant().clone();
                let actions = node.handle(now, NodeEvent::PeerNote(node_id(from), note));
                self.node_actions(i, before, actions);
            }
            Delivery::ReportFrom(i, report) => {
                if !self.carries(i) {
                    return Ok(());
                }
                let Some(witness) = &mut self.witness else {
                    return Ok(());
                };
                let actions = witness.handle(now, WitnessEvent::Report(node_id(i), report));
                self.witness_actions(actions)?;
            }
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        self.now += STEP_MS;
        // Heartbeats: a node hears a frame on each link it has noticed up, while the link
        // is up, once a heartbeat.
        for link in 0..link_count(self.n) {
            if !self.physically_up(link) || self.now - self.beat[link] < HEARTBEAT_MS {
                continue;
            }
            self.beat[link] = self.now;
            let (first, second) = self.ends(link);
            for (index, end) in [first, second].into_iter().enumerate() {
                let Side::Node(i) = end else { continue };
                if !self.noticed[link][index] {
                    continue;
                }
                let event = match (first, second) {
                    (Side::Node(a), Side::Node(b)) => {
                        NodeEvent::PeerHeard(node_id(if a == i { b } else { a }))
                    }
                    _ => NodeEvent::MasterHeard,
                };
                if let Some(node) = &mut self.nodes[i] {
                    let before = node.grant().clone();
                    let actions = node.handle(Mono(self.now), event);
                    self.node_actions(i, before, actions);
                }
            }
        }
        loop {
            let due = self
                .queue
                .iter()
                .enumerate()
                .filter(|(_, (at, ..))| *at <= self.now)
                .min_by_key(|(_, (at, ..))| *at)
                .map(|(i, _)| i);
            let Some(index) = due else { break };
            let (_, generation, to, delivery) = self.queue.remove(index).unwrap();
            if generation != self.generation[self.gen_index(to)] || !self.alive(to) {
                continue;
            }
            self.deliver(delivery)?;
        }
        let now = Mono(self.now);
        for i in 0..self.n {
            if let Some(node) = &mut self.nodes[i] {
                let before = node.grant().clone();
                let actions = node.poll(now);
                self.node_actions(i, before, actions);
            }
        }
        if let Some(witness) = &mut self.witness {
            let actions = witness.poll(now);
            self.witness_actions(actions)?;
        }
        self.check()
    }

    /// Whether `link` is down now, or came back within the grace.
    fn recently_down(&self, link: usize) -> bool {
        self.down_since[link].is_some() || self.now.saturating_sub(self.up_since[link]) <= GRACE_MS
    }

    /// Whether node `i` is (or was, within the grace) on an island without a master: it
    /// and the nodes it reaches over links between nodes are all cut off from the master
    /// (for a pair: `i` cut off from its peer and the master). The one case where the
    /// location lets a node run beside another.
    fn isolated(&self, i: usize) -> bool {
        let mut island = vec![i];
        let mut next = 0;
        while next < island.len() {
            let a = island[next];
            for b in 0..self.n {
                if !island.contains(&b) && !self.recently_down(peer_link(self.n, a, b)) {
                    island.push(b);
                }
            }
            next += 1;
        }
        island.iter().all(|a| self.recently_down(*a))
    }

    fn check(&self) -> Result<(), String> {
        let running = |i: usize| self.nodes[i].as_ref().is_some_and(|n| n.is_running());
        let master_runs = self.witness.as_ref().is_some_and(|w| w.is_running());
        for i in 0..self.n {
            for j in i + 1..self.n {
                if !(running(i) && running(j)) {
                    continue;
                }
                let allowed = self.recently_down(peer_link(self.n, i, j))
                    && match self.settings.isolation {
                        Isolation::Continue => self.isolated(i) || self.isolated(j),
                        Isolation::Stop => false,
                    };
                if !allowed {
                    return Err(format!(
                        "at {} ms nodes {i} and {j} run: cut {:?}, down since {:?}, grants {:?}",
                        self.now,
                        self.cut,
                        self.down_since,
                        self.nodes
                            .iter()
                            .map(|n| n.as_ref().map(|n| n.grant().clone()))
                            .collect::<Vec<_>>(),
                    ));
                }
            }
        }
        for i in 0..self.n {
            if master_runs && running(i) && !self.recently_down(i) {
                return Err(format!(
                    "at {} ms the master and node {i} run while linked: down since {:?}",
                    self.now, self.down_since
                ));
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Result<(), String> {
        match op {
            Op::Advance(ms) => {
                for _ in 0..ms / STEP_MS {
                    self.step()?;
                }
                return Ok(());
            }
            Op::Cut(link) => {
                let links = self.cut.len();
                self.cut[link % links] = true;
            }
            Op::Heal(link) => {
                let links = self.cut.len();
                self.cut[link % links] = false;
            }
            Op::Kill(side) => {
                let index = self.gen_index(side);
                self.generation[index] += 1;
                match side {
                    Side::Node(i) => self.nodes[i] = None,
                    Side::Master => self.witness = None,
                }
            }
            Op::Start(side) => {
                if self.alive(side) {
                    return Ok(());
                }
                let index = self.gen_index(side);
                self.generation[index] += 1;
                let now = Mono(self.now);
                match side {
                    Side::Node(i) => {
                        let mut node = NodeSide::new(
                            node_id(i),
                            self.ids(),
                            self.settings,
                            self.stored[i].clone(),
                            now,
                        );
                        let _ = node.handle(now, NodeEvent::Devices(self.devices[i]));
                        self.nodes[i] = Some(node);
                    }
                    Side::Master => {
                        self.witness = Some(WitnessSide::new(
                            self.ids(),
                            self.settings,
                            self.witness_stored.clone(),
                            now,
                        ))
                    }
                }
            }
            Op::Devices(i, devices) => {
                self.devices[i] = devices;
                if let Some(node) = &mut self.nodes[i] {
                    let before = node.grant().clone();
                    let actions = node.handle(Mono(self.now), NodeEvent::Devices(devices));
                    self.node_actions(i, before, actions);
                }
            }
            Op::Flap(link, ms) => {
                let link = link % self.cut.len();
                self.apply(Op::Heal(link))?;
                self.apply(Op::Advance(ms))?;
                self.cut[link] = true;
            }
            Op::Restore => {
                if let Some(witness) = &mut self.witness {
                    let actions = witness.handle(Mono(self.now), WitnessEvent::Restore);
                    self.witness_actions(actions)?;
                }
            }
        }
        self.links_changed();
        Ok(())
    }

    /// Everything healed and started, and time for the dust to settle: one runs, the
    /// one the witness names, and every node holds its grant.
    fn settle(&mut self) -> Result<(), String> {
        for link in 0..link_count(self.n) {
            self.apply(Op::Heal(link))?;
        }
        for i in 0..self.n {
            self.apply(Op::Start(Side::Node(i)))?;
        }
        self.apply(Op::Start(Side::Master))?;
        self.apply(Op::Advance(
            self.settings.timeout_ms + self.settings.pair_timeout_ms + 5_000,
        ))?;
        let witness = self.witness.as_ref().unwrap();
        let grant = witness.grant().clone();
        let runners: Vec<String> = (0..self.n)
            .filter(|i| self.nodes[*i].as_ref().unwrap().is_running())
            .map(|i| node_id(i).to_string())
            .chain(witness.is_running().then(|| "master".to_string()))
            .collect();
        let expected = match &grant.holder {
            PairHolder::Node(node) => node.to_string(),
            PairHolder::Master => "master".to_string(),
            PairHolder::Moving(node) => format!("(still moving to {node})"),
        };
        if runners != [expected.clone()] {
            return Err(format!(
                "after healing {runners:?} run; the grant names {expected}"
            ));
        }
        for i in 0..self.n {
            let held = self.nodes[i].as_ref().unwrap().grant();
            if *held != grant {
                return Err(format!("node {i} holds {held:?}, the witness {grant:?}"));
            }
        }
        Ok(())
    }
}

fn side(n: usize) -> impl Strategy<Value = Side> {
    prop_oneof![
        n as u32 => (0..n).prop_map(Side::Node),
        1 => Just(Side::Master),
    ]
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    let links = link_count(n);
    prop_oneof![
        4 => (1u64..12_000).prop_map(Op::Advance),
        2 => (0..links).prop_map(Op::Cut),
        2 => (0..links).prop_map(Op::Heal),
        1 => side(n).prop_map(Op::Kill),
        1 => side(n).prop_map(Op::Start),
        1 => ((0..n), (0u32..4)).prop_map(|(i, d)| Op::Devices(i, d)),
        1 => Just(Op::Restore),
        1 => ((0..links), (10u64..300)).prop_map(|(link, ms)| Op::Flap(link, ms)),
    ]
}

fn settings() -> impl Strategy<Value = PairSettings> {
    (
        prop_oneof![Just(Isolation::Continue), Just(Isolation::Stop)],
        prop_oneof![Just(None), Just(Some(7_000u64))],
    )
        .prop_map(|(isolation, unwitnessed)| PairSettings {
            pair_timeout_ms: 5_000,
            timeout_ms: 8_000,
            isolation,
            // (the configuration refuses it with "stop")
            unwitnessed_takeover_ms: unwitnessed.filter(|_| isolation == Isolation::Continue),
            device_hold_down_ms: 2_000,
        })
        .prop_filter("valid settings", |s| s.check(HEARTBEAT_MS).is_ok())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2_000,
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_pair_and_its_witness_never_run_twice_beyond_what_the_location_allows(
        settings in settings(),
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(2), 1..40),
    ) {
        let mut world = World::new(2, settings, seed);
        for op in ops {
            if let Err(why) = world.apply(op) {
                prop_assert!(false, "{why}");
            }
        }
        if let Err(why) = world.settle() {
            prop_assert!(false, "{why}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1_000,
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    })]

    /// Three nodes, six links: the rules hold for a location of more than two nodes too,
    /// unwitnessed takeovers included (a claimant that hears only a peer that neither
    /// runs nor hears the holder learns the witness's decision through it).
    #[test]
    fn three_nodes_and_their_witness_never_run_twice_beyond_what_the_location_allows(
        settings in settings(),
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(3), 1..40),
    ) {
        let mut world = World::new(3, settings, seed);
        for op in ops {
            if let Err(why) = world.apply(op) {
                prop_assert!(false, "{why}");
            }
        }
        if let Err(why) = world.settle() {
            prop_assert!(false, "{why}");
        }
    }
}

/// The settings of the cases below: pair timeout 5 s, location timeout 8 s, no
/// unwitnessed takeover, a device hold-down of 2 s.
fn fixed(isolation: Isolation) -> PairSettings {
    PairSettings {
        pair_timeout_ms: 5_000,
        timeout_ms: 8_000,
        isolation,
        unwitnessed_takeover_ms: None,
        device_hold_down_ms: 2_000,
    }
}

/// The issue's cases, one by one, with "stop": the holder cut off from both stops before
/// the standby is granted the modules; cut from the master alone, or from its peer alone,
/// nothing changes.
#[test]
fn the_holder_cut_off_from_both_stops_before_the_standby_is_granted() {
    let settings = fixed(Isolation::Stop);
    let mut world = World::new(2, settings, 7);
    world.apply(Op::Advance(3_000)).unwrap();
    let runs = |w: &World, i: usize| w.nodes[i].as_ref().unwrap().is_running();
    assert!(runs(&world, A) && !runs(&world, B), "A, preferred, holds");
    // Cut from the master alone, then from its peer alone: nothing changes.
    for link in [AM, AB] {
        world.apply(Op::Cut(link)).unwrap();
        world.apply(Op::Advance(12_000)).unwrap();
        assert!(
            runs(&world, A) && !runs(&world, B),
            "cut {link}: A keeps it"
        );
        world.apply(Op::Heal(link)).unwrap();
        world.apply(Op::Advance(3_000)).unwrap();
    }
    assert_eq!(world.issued.len(), 0, "no grant was issued");
    // Both: A stops, then B is granted them.
    world.apply(Op::Cut(AM)).unwrap();
    world.apply(Op::Cut(AB)).unwrap();
    let cut = world.now;
    let mut stopped = None;
    let mut started = None;
    for _ in 0..1_500 {
        world.step().unwrap();
        if stopped.is_none() && !runs(&world, A) {
            stopped = Some(world.now - cut);
        }
        if started.is_none() && runs(&world, B) {
            started = Some(world.now - cut);
        }
    }
    let (stopped, started) = (stopped.unwrap(), started.unwrap());
    assert!(
        stopped < started,
        "A stopped at {stopped} ms, B started at {started} ms"
    );
    assert!(started <= 5_000 + 3 * HEARTBEAT_MS + 200, "{started}");
}

/// Devices count as health: a holder that reaches fewer of them than its linked peer
/// hands over after the hold-down, once; a flap shorter than the hold-down changes nothing.
#[test]
fn a_holder_that_reaches_fewer_devices_than_its_peer_hands_over_once() {
    let settings = fixed(Isolation::Continue);
    let mut world = World::new(2, settings, 11);
    world.apply(Op::Advance(3_000)).unwrap();
    let runs = |w: &World, i: usize| w.nodes[i].as_ref().unwrap().is_running();
    assert!(runs(&world, A));
    // A flap: A loses two devices for a second, then has them again.
    world.apply(Op::Devices(A, 1)).unwrap();
    world.apply(Op::Advance(1_000)).unwrap();
    world.apply(Op::Devices(A, 3)).unwrap();
    world.apply(Op::Advance(5_000)).unwrap();
    assert!(
        runs(&world, A) && world.issued.is_empty(),
        "a flap hands nothing over"
    );
    // For good: B, which reaches all three, gets the modules, once.
    world.apply(Op::Devices(A, 1)).unwrap();
    world.apply(Op::Advance(5_000)).unwrap();
    assert!(runs(&world, B) && !runs(&world, A));
    world.apply(Op::Advance(20_000)).unwrap();
    // Once: the release (A stops), then B's grant, and nothing after.
    assert_eq!(world.issued.len(), 2, "once: {:?}", world.issued);
    assert_eq!(
        world.witness.as_ref().unwrap().grant(),
        &PairGrant {
            holder: PairHolder::Node(node_id(B)),
            epoch: Epoch(2)
        }
    );
}

#[test]
fn settings_that_cannot_keep_their_promises_are_refused_naming_the_key() {
    let good = fixed(Isolation::Stop);
    assert!(good.check(1_000).is_ok());
    let err = good.check(2_000).unwrap_err();
    assert!(err.contains("pair_timeout_ms"), "{err}");
    let both = PairSettings {
        unwitnessed_takeover_ms: Some(10_000),
        ..good
    };
    assert!(
        both.check(1_000)
            .unwrap_err()
            .contains("unwitnessed_takeover_ms")
    );
}

/// The holder SIGKILLed: the standby holds within the pair timeout and a second.
#[test]
fn the_standby_holds_within_the_pair_timeout_and_a_second_of_the_holders_death() {
    let mut slowest = 0;
    for seed in 1..20 {
        let settings = fixed(Isolation::Stop);
        let mut world = World::new(2, settings, seed);
        world.apply(Op::Advance(3_000)).unwrap();
        world.apply(Op::Kill(Side::Node(A))).unwrap();
        let killed = world.now;
        let mut held = None;
        for _ in 0..1_000 {
            world.step().unwrap();
            if world.nodes[B].as_ref().unwrap().is_running() {
                held = Some(world.now - killed);
                break;
            }
        }
        let held = held.expect("the standby holds");
        assert!(held <= 5_000 + 1_000, "seed {seed}: after {held} ms");
        slowest = slowest.max(held);
    }
    eprintln!("the standby held at most {slowest} ms after the holder's death");
}

/// The grants among a witness's actions.
fn issued(actions: &[WitnessAction]) -> Vec<&PairGrant> {
    actions
        .iter()
        .filter_map(|a| match a {
            WitnessAction::Issue(grant) => Some(grant),
            _ => None,
        })
        .collect()
}

/// A witness whose store lost grants (a restored backup) hears a node hold a newer epoch:
/// its next grant goes above it, so the nodes take it rather than refuse it as old.
#[test]
fn a_witness_behind_its_nodes_issues_above_their_epoch() {
    let mut witness = WitnessSide::new(
        vec![node_id(A), node_id(B)],
        fixed(Isolation::Continue),
        first_grant(),
        Mono(0),
    );
    witness.handle(Mono(0), WitnessEvent::Up(node_id(B)));
    witness.raise_epoch(Epoch(41));
    witness.raise_epoch(Epoch(7));
    assert_eq!(witness.grant().epoch, Epoch(41), "raised, never lowered");
    // The holder (A) has never linked; B has not heard it for the pair timeout.
    let report = NodeReport {
        epoch: Epoch(41),
        peers: vec![PeerReport {
            node: node_id(A),
            hears: false,
            silent_ms: 6_000,
            note: None,
        }],
        devices: 0,
        running: false,
        claimed: false,
    };
    let mut actions = witness.handle(Mono(6_000), WitnessEvent::Report(node_id(B), report));
    actions.extend(witness.poll(Mono(6_000)));
    let issued = issued(&actions);
    assert_eq!(
        issued,
        [&PairGrant {
            holder: PairHolder::Node(node_id(B)),
            epoch: Epoch(42)
        }],
        "{actions:?}"
    );
}

/// A pair whose master is away for good, under "stop": both nodes restarted (a power cut),
/// or the holder cut off from both and then its peer link back, the named holder runs again
/// on its peer's word (the rooms are not left dark with both nodes healthy).
#[test]
fn a_pair_whose_master_is_gone_runs_again_once_its_nodes_hear_each_other() {
    let runs = |w: &World, i: usize| w.nodes[i].as_ref().is_some_and(|n| n.is_running());
    // Both restarted with the master links down.
    let mut world = World::new(2, fixed(Isolation::Stop), 5);
    world.apply(Op::Advance(3_000)).unwrap();
    assert!(runs(&world, A));
    world.apply(Op::Cut(AM)).unwrap();
    world.apply(Op::Cut(1)).unwrap();
    world.apply(Op::Kill(Side::Node(A))).unwrap();
    world.apply(Op::Kill(Side::Node(B))).unwrap();
    world.apply(Op::Start(Side::Node(A))).unwrap();
    world.apply(Op::Start(Side::Node(B))).unwrap();
    world.apply(Op::Advance(15_000)).unwrap();
    assert!(runs(&world, A) && !runs(&world, B), "A, named, runs again");
    // The holder cut off from both (it stops), then its peer link back, the master not.
    let mut world = World::new(2, fixed(Isolation::Stop), 9);
    world.apply(Op::Advance(3_000)).unwrap();
    world.apply(Op::Cut(AM)).unwrap();
    world.apply(Op::Cut(1)).unwrap();
    world.apply(Op::Cut(AB)).unwrap();
    world.apply(Op::Advance(6_000)).unwrap();
    assert!(!runs(&world, A), "cut off from both under stop, A stopped");
    world.apply(Op::Heal(AB)).unwrap();
    world.apply(Op::Advance(5_000)).unwrap();
    assert!(
        runs(&world, A) && !runs(&world, B),
        "A runs again on B's word"
    );
}

/// Three nodes, two of them killed one after the other: under `"continue"` the third runs
/// the rooms once the second has been gone for the location's timeout (it cannot vouch
/// for a holder any more); under `"stop"` it waits, since a node it cannot hear might
/// share an island with a holder that still runs.
#[test]
fn three_nodes_two_gone_the_third_runs_under_continue_and_waits_under_stop() {
    const C: usize = 2;
    for isolation in [Isolation::Continue, Isolation::Stop] {
        let settings = fixed(isolation);
        let mut world = World::new(3, settings, 7);
        world.apply(Op::Advance(3_000)).unwrap();
        assert!(world.nodes[A].as_ref().unwrap().is_running());
        world.apply(Op::Kill(Side::Node(A))).unwrap();
        world.apply(Op::Kill(Side::Node(B))).unwrap();
        world
            .apply(Op::Advance(
                settings.timeout_ms + settings.pair_timeout_ms + 2_000,
            ))
            .unwrap();
        let third = world.nodes[C].as_ref().unwrap();
        match isolation {
            Isolation::Continue => assert!(third.is_running(), "the survivor runs the rooms"),
            Isolation::Stop => assert!(!third.is_running(), "the survivor waits"),
        }
        // Back: the location settles on one holder.
        world.settle().unwrap();
    }
}

/// A claim is decided once: the witness grants the holder (linked and running) a new
/// epoch, and while the claimant's report still says it claimed under the older one, no
/// further grant follows (each would be a compare-and-set and an audit record).
#[test]
fn a_claim_is_decided_with_one_grant() {
    let mut witness = WitnessSide::new(
        vec![node_id(A), node_id(B)],
        fixed(Isolation::Continue),
        first_grant(),
        Mono(0),
    );
    witness.handle(Mono(0), WitnessEvent::Up(node_id(A)));
    witness.handle(Mono(0), WitnessEvent::Up(node_id(B)));
    let report = |running: bool, claimed: bool| NodeReport {
        epoch: Epoch(0),
        peers: Vec::new(),
        devices: 0,
        running,
        claimed,
    };
    let mut actions = witness.handle(
        Mono(10),
        WitnessEvent::Report(node_id(A), report(true, false)),
    );
    actions.extend(witness.handle(
        Mono(20),
        WitnessEvent::Report(node_id(B), report(true, true)),
    ));
    for ms in (30..1_000).step_by(25) {
        actions.extend(witness.poll(Mono(ms)));
    }
    let issued = issued(&actions);
    assert_eq!(
        issued,
        [&PairGrant {
            holder: PairHolder::Node(node_id(A)),
            epoch: Epoch(1)
        }],
        "{actions:?}"
    );
}

/// Three nodes under `"continue"`, all gone and the master holding the rooms; one comes
/// back and an operator restores: it runs them, though the other two are still away
/// (gone for the location's timeout, they cannot vouch for anything).
#[test]
fn a_restore_with_two_of_three_nodes_away_completes() {
    let runs = |w: &World, i: usize| w.nodes[i].as_ref().is_some_and(|n| n.is_running());
    let settings = fixed(Isolation::Continue);
    let mut world = World::new(3, settings, 11);
    world.apply(Op::Advance(3_000)).unwrap();
    for i in 0..3 {
        world.apply(Op::Kill(Side::Node(i))).unwrap();
    }
    world
        .apply(Op::Advance(
            settings.timeout_ms + settings.pair_timeout_ms + 2_000,
        ))
        .unwrap();
    assert!(
        world.witness.as_ref().unwrap().is_running(),
        "the master holds"
    );
    world.apply(Op::Start(Side::Node(A))).unwrap();
    world.apply(Op::Advance(3_000)).unwrap();
    world.apply(Op::Restore).unwrap();
    world
        .apply(Op::Advance(settings.pair_timeout_ms + 2_000))
        .unwrap();
    assert!(runs(&world, A), "the restored node runs the rooms");
    assert!(!world.witness.as_ref().unwrap().is_running());
}
