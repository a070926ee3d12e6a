//! Several masters and several edges, their control machines stepped together in
//! simulated time around a model of etcd: grants by compare-and-set, each master's
//! presence lease (kept alive every third of its time to live, counted by the master from
//! the send and expired by etcd from the answer), claims "this master runs the unit" and
//! link keys on those leases, and watches delivered after a lag. Faults: masters killed,
//! restarted and cut off from etcd; edges killed, restarted and cut off from every master
//! (silently: each side notices after its own delay); manual restores on any master.
//!
//! Asserted at every step: no two masters run a unit at once; a master and an edge run
//! one at once only while the edge has no link to that master (within a handover of its
//! return; linked to another master, within a lease: the one running it is cut off from
//! the edge, and stops when it hears of the edge's grant or when its lease ends); a
//! edge told to start over a link starts only once no master runs its modules; a
//! master runs a unit only under a stored grant naming it, with its lease held, and etcd
//! has not expired that lease; no epoch of a unit is issued twice, and an edge holds only
//! issued epochs. After healing everything: every edge is linked, its master and it agree
//! on the grant, and exactly the holder runs the modules.

use std::collections::{BTreeSet, VecDeque};

use proptest::prelude::*;
use tether_common::control::placement::rendezvous_pick;
use tether_common::control::{
    ControlState, EdgeAction, EdgeEvent, EdgeId, EdgeReport, EdgeSettings, EdgeSide, EdgeTiming,
    Epoch, Held, Lease, MasterAction, MasterEvent, MasterSide, Mono, Now, Owner, PeerView, UnitId,
};

const RECONNECT_MS: u64 = 3000;
const LATENCY_MS: u64 = 20;
/// How long a change in etcd takes to reach a master's watch.
const WATCH_LAG_MS: u64 = 30;
const BOOT_WAIT_MS: u64 = 2000;
const TTL_MS: u64 = 5000;
/// What the master keeps of its lease's end as a margin (LeaseClock's tenth).
const MARGIN_MS: u64 = 500;
/// A report, a decision and its acknowledgement; another master's stop seen by watch.
const HANDOVER_MS: u64 = 3 * LATENCY_MS + 3 * WATCH_LAG_MS;
const START_MS: u64 = 1_795_305_600_000;

fn timing(masters: usize) -> EdgeTiming {
    EdgeTiming {
        heartbeat_ms: 1000,
        reconnect_ms: RECONNECT_MS,
        handshake_timeout_ms: 5000,
        masters: masters as u64,
    }
}

fn master_name(m: usize) -> String {
    format!("m{m}")
}

fn edge_name(e: usize) -> String {
    format!("site-{e}")
}

#[derive(Debug, Clone)]
enum ToEdge {
    Decision { owner: Owner, epoch: Epoch },
    Ready,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Advance(u64),
    /// Edge `e` is cut off from every master, silently.
    CutEdge {
        e: usize,
        edge_after: u64,
        master_after: u64,
    },
    HealEdge(usize),
    CrashEdge(usize),
    StartEdge(usize),
    CrashMaster(usize),
    StartMaster(usize),
    /// Master `m` loses etcd (its network to it), not its edges.
    CutEtcd(usize),
    HealEtcd(usize),
    Restore {
        m: usize,
        e: usize,
    },
}

#[derive(Debug, Clone)]
struct Setup {
    masters: usize,
    edges: usize,
    timeout_ms: u64,
}

/// What a watch event tells a master: etcd's state when the event was sent.
#[derive(Debug, Clone)]
struct Snapshot {
    live: Vec<String>,
    grants: Vec<(ControlState, Option<usize>)>,
    running: Vec<Option<usize>>,
    links: Vec<Option<usize>>,
    link_ended: Vec<Option<u64>>,
}

/// etcd, as the masters share it.
#[derive(Debug, Default)]
struct Store {
    /// Per edge: the grant, and for a master's grant its holder.
    grants: Vec<(ControlState, Option<usize>)>,
    /// Per edge: the master that says it runs the unit (on its lease).
    running: Vec<Option<usize>>,
    /// Per edge: the master holding its link (on its lease), and when the last ended.
    links: Vec<Option<usize>>,
    link_ended: Vec<Option<u64>>,
    /// Per master: when etcd expires its lease.
    expiry: Vec<Option<u64>>,
    /// Per edge: every epoch issued.
    issued: Vec<BTreeSet<Epoch>>,
}

struct MasterProc {
    machines: Vec<MasterSide>,
    boot_at: u64,
    booted: bool,
    /// The end of what its lease allows, on its own clock (`None`: no lease).
    held_until: Option<u64>,
    next_keep_alive: u64,
    running: Vec<bool>,
    /// Watch events on their way: when each arrives, and what etcd held when it was sent.
    watch: VecDeque<(u64, Snapshot)>,
}

struct EdgeProc {
    machine: EdgeSide,
    next_attempt: u64,
    /// Attempts so far: each starts from another master of its order, as when the first
    /// ones fail for reasons of their own, so edges link to masters other than the pick.
    attempts: usize,
}

/// An edge's link to one master.
#[derive(Debug, Clone, Copy)]
struct Link {
    master: usize,
    since: u64,
}

struct World {
    setup: Setup,
    now: u64,
    store: Store,
    masters: Vec<Option<MasterProc>>,
    etcd_cut: Vec<bool>,
    edges: Vec<Option<EdgeProc>>,
    edge_store: Vec<ControlState>,
    edge_running: Vec<bool>,
    links: Vec<Option<Link>>,
    edge_cut: Vec<bool>,
    to_edge: Vec<VecDeque<(u64, ToEdge)>>,
    /// (due, edge, master, report or ack)
    to_master: VecDeque<(u64, usize, usize, Option<EdgeReport>)>,
    edge_notices_at: Vec<Option<u64>>,
    /// Per edge: (master, when it notices, last heard).
    master_notices_at: Vec<Option<(usize, u64, u64)>>,
    edge_lost_at: Vec<u64>,
    /// Writes etcd refused (a lost race, or no lease).
    refusals: usize,
    log: Vec<String>,
}

impl World {
    fn new(setup: Setup) -> Self {
        let (m, e) = (setup.masters, setup.edges);
        let mut world = World {
            now: START_MS,
            store: Store {
                grants: vec![(ControlState::default(), None); e],
                running: vec![None; e],
                links: vec![None; e],
                link_ended: vec![None; e],
                expiry: vec![None; m],
                issued: vec![BTreeSet::new(); e],
            },
            masters: (0..m).map(|_| None).collect(),
            etcd_cut: vec![false; m],
            edges: (0..e).map(|_| None).collect(),
            edge_store: vec![ControlState::default(); e],
            edge_running: vec![false; e],
            links: vec![None; e],
            edge_cut: vec![false; e],
            to_edge: vec![VecDeque::new(); e],
            to_master: VecDeque::new(),
            edge_notices_at: vec![None; e],
            master_notices_at: vec![None; e],
            edge_lost_at: vec![START_MS; e],
            refusals: 0,
            log: Vec::new(),
            setup,
        };
        for m in 0..world.setup.masters {
            world.start_master(m);
        }
        for e in 0..world.setup.edges {
            world.start_edge(e);
        }
        world
    }

    fn settings(&self) -> EdgeSettings {
        EdgeSettings {
            failover: true,
            timeout_ms: self.setup.timeout_ms,
            window: None,
        }
    }

    fn clock(&self) -> Now {
        Now {
            mono: Mono(self.now),
            wall_ms: self.now,
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "{what}\nat +{} ms; history:\n{}",
            self.now - START_MS,
            self.log.join("\n")
        );
    }

    fn note(&mut self, what: impl Into<String>) {
        let line = format!("+{} {}", self.now - START_MS, what.into());
        self.log.push(line);
    }

    // --- etcd ----------------------------------------------------------------------

    fn reaches_etcd(&self, m: usize) -> bool {
        self.masters[m].is_some() && !self.etcd_cut[m]
    }

    /// Whether etcd still has master `m`'s lease.
    fn lease_live(&self, m: usize) -> bool {
        self.store.expiry[m].is_some_and(|at| at > self.now)
    }

    fn live_masters(&self) -> Vec<String> {
        (0..self.setup.masters)
            .filter(|m| self.lease_live(*m))
            .map(master_name)
            .collect()
    }

    /// What etcd holds now, as a watch event carries it.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            live: self.live_masters(),
            grants: self.store.grants.clone(),
            running: self.store.running.clone(),
            links: self.store.links.clone(),
            link_ended: self.store.link_ended.clone(),
        }
    }

    /// etcd changed: every master that reaches it hears of it after the watch's lag, in
    /// order, as it was then.
    fn changed(&mut self) {
        let due = self.now + WATCH_LAG_MS;
        let snapshot = self.snapshot();
        for m in 0..self.setup.masters {
            if self.reaches_etcd(m)
                && let Some(master) = &mut self.masters[m]
            {
                master.watch.push_back((due, snapshot.clone()));
            }
        }
    }

    /// Leases past their time: etcd drops them with their claims and link keys.
    fn expire(&mut self) {
        for m in 0..self.setup.masters {
            if self.store.expiry[m].is_some_and(|at| at <= self.now) {
                self.store.expiry[m] = None;
                self.note(format!("etcd expires {}'s lease", master_name(m)));
                for e in 0..self.setup.edges {
                    if self.store.running[e] == Some(m) {
                        self.store.running[e] = None;
                    }
                    if self.store.links[e] == Some(m) {
                        self.store.links[e] = None;
                        self.store.link_ended[e] = Some(self.now);
                    }
                }
                self.changed();
            }
        }
    }

    /// What master `m` learns of edge `e` from a watch event.
    fn view(m: usize, e: usize, snapshot: &Snapshot) -> PeerView {
        PeerView {
            fails_over: rendezvous_pick(&edge_name(e), &snapshot.live) == Some(&master_name(m)),
            linked_elsewhere: snapshot.links[e].is_some_and(|x| x != m),
            link_ended: snapshot.link_ended[e].map(Mono),
            running_elsewhere: snapshot.running[e].is_some_and(|x| x != m),
        }
    }

    /// The next watch event reaches master `m`.
    fn deliver_watch(&mut self, m: usize) {
        let Some((_, snapshot)) = self.masters[m].as_mut().and_then(|x| x.watch.pop_front()) else {
            return;
        };
        self.apply_snapshot(m, &snapshot);
    }

    /// Master `m` reads etcd afresh (it joined, or reaches etcd again).
    fn resync(&mut self, m: usize) {
        if !self.reaches_etcd(m) {
            return;
        }
        if let Some(master) = &mut self.masters[m] {
            master.watch.clear();
        }
        let snapshot = self.snapshot();
        self.apply_snapshot(m, &snapshot);
    }

    fn apply_snapshot(&mut self, m: usize, snapshot: &Snapshot) {
        for e in 0..self.setup.edges {
            let (grant, holder) = snapshot.grants[e];
            self.master_event(m, e, MasterEvent::Peers(Self::view(m, e, snapshot)));
            self.master_event(
                m,
                e,
                MasterEvent::Granted {
                    grant,
                    here: holder == Some(m),
                },
            );
        }
    }

    fn keep_alive(&mut self, m: usize) {
        let now = self.now;
        let reaches = self.reaches_etcd(m);
        let Some(master) = &mut self.masters[m] else {
            return;
        };
        master.next_keep_alive = now + TTL_MS / 3;
        if !reaches {
            return;
        }
        // A lease etcd expired (cut off too long): the master joins again, on a new one.
        let rejoined = self.store.expiry[m].is_none_or(|at| at <= now);
        // etcd handles it as it is sent (no latency here): it expires a TTL later, and
        // the master holds it until a margin before that.
        self.store.expiry[m] = Some(now + TTL_MS);
        let until = now + TTL_MS - MARGIN_MS;
        master.held_until = Some(until);
        if rejoined {
            self.note(format!("{} joins again", master_name(m)));
            self.changed();
        }
        // Claims it could not withdraw while cut off go now: the shell keeps its claims
        // in line with what it runs whenever it reaches etcd.
        for e in 0..self.setup.edges {
            let runs = self.masters[m].as_ref().is_some_and(|x| x.running[e]);
            if self.store.running[e] == Some(m) && !runs {
                self.store.running[e] = None;
                self.changed();
            }
        }
        for e in 0..self.setup.edges {
            self.master_event(m, e, MasterEvent::Lease(Lease::Until(Mono(until))));
        }
    }

    // --- processes -----------------------------------------------------------------

    fn start_master(&mut self, m: usize) {
        if self.masters[m].is_some() {
            return;
        }
        // A restarted master waits out its old lease before it joins (its id in use).
        if self.lease_live(m) {
            return;
        }
        let machines = (0..self.setup.edges)
            .map(|e| {
                let (grant, holder) = self.store.grants[e];
                MasterSide::in_cluster(
                    UnitId::new(edge_name(e)),
                    self.settings(),
                    (grant, holder == Some(m)),
                    self.clock(),
                )
            })
            .collect();
        self.masters[m] = Some(MasterProc {
            machines,
            boot_at: self.now + BOOT_WAIT_MS,
            booted: false,
            held_until: None,
            next_keep_alive: self.now,
            running: vec![false; self.setup.edges],
            watch: VecDeque::new(),
        });
        self.note(format!("{} starts", master_name(m)));
        if self.reaches_etcd(m) {
            self.store.expiry[m] = Some(self.now + TTL_MS);
            self.changed();
        }
        for e in 0..self.setup.edges {
            self.master_event(m, e, MasterEvent::Lease(Lease::Lost));
        }
        self.keep_alive(m);
        self.resync(m);
    }

    fn start_edge(&mut self, e: usize) {
        if self.edges[e].is_some() {
            return;
        }
        self.edges[e] = Some(EdgeProc {
            machine: EdgeSide::new(
                EdgeId::new(edge_name(e)),
                self.edge_store[e],
                timing(self.setup.masters),
            ),
            next_attempt: self.now,
            attempts: 0,
        });
        self.edge_lost_at[e] = self.now;
        self.note(format!("{} starts", edge_name(e)));
    }

    fn crash_master(&mut self, m: usize) {
        if self.masters[m].take().is_some() {
            self.note(format!("{} crashes", master_name(m)));
            for e in 0..self.setup.edges {
                if self.links[e].is_some_and(|l| l.master == m) {
                    self.sever(e, 0, 0);
                }
                if self.master_notices_at[e].is_some_and(|(x, _, _)| x == m) {
                    self.master_notices_at[e] = None;
                }
            }
        }
    }

    fn crash_edge(&mut self, e: usize) {
        if self.edges[e].take().is_some() {
            self.edge_notices_at[e] = None;
            self.edge_running[e] = false;
            self.note(format!("{} crashes", edge_name(e)));
            self.sever(e, 0, 0);
        }
    }

    /// Edge `e`'s link goes down: messages in flight are lost, and each side still alive
    /// learns of it after its own delay.
    fn sever(&mut self, e: usize, edge_after: u64, master_after: u64) {
        let Some(link) = self.links[e].take() else {
            return;
        };
        self.to_edge[e].clear();
        self.to_master.retain(|(_, x, _, _)| *x != e);
        self.note(format!(
            "{} link to {} down",
            edge_name(e),
            master_name(link.master)
        ));
        if self.edges[e].is_some() {
            self.edge_notices_at[e] = Some(self.now + edge_after);
        }
        if self.masters[link.master].is_some() {
            self.master_notices_at[e] = Some((link.master, self.now + master_after, self.now));
        }
    }

    // --- feeding the machines and carrying out their actions --------------------------

    fn master_event(&mut self, m: usize, e: usize, event: MasterEvent) {
        let now = self.clock();
        let Some(master) = &mut self.masters[m] else {
            return;
        };
        let actions = master.machines[e].handle(now, event);
        self.master_actions(m, e, actions);
    }

    fn edge_event(&mut self, e: usize, event: EdgeEvent) {
        let now = self.clock();
        let Some(edge) = &mut self.edges[e] else {
            return;
        };
        let actions = edge.machine.handle(now, event);
        self.edge_actions(e, actions);
    }

    fn refused(
        &mut self,
        m: usize,
        e: usize,
        stored: Option<(ControlState, Option<usize>)>,
    ) -> bool {
        let stored = stored.map(|(grant, holder)| Held {
            grant,
            here: holder == Some(m),
        });
        self.note(format!("{}: refused by etcd", master_name(m)));
        self.refusals += 1;
        let now = self.clock();
        if let Some(master) = &mut self.masters[m] {
            master.machines[e].issue_failed(now, stored);
        }
        false
    }

    /// Carries out master `m`'s actions for edge `e` as its shell does against etcd.
    fn master_actions(&mut self, m: usize, e: usize, actions: Vec<MasterAction>) -> bool {
        for action in actions {
            self.note(format!(
                "{} for {}: {action:?}",
                master_name(m),
                edge_name(e)
            ));
            match action {
                MasterAction::Issue {
                    expected,
                    grant,
                    here,
                } => {
                    // A transaction that also asks for the issuer's lease.
                    if !self.reaches_etcd(m) || !self.lease_live(m) {
                        return self.refused(m, e, None);
                    }
                    let (stored, holder) = self.store.grants[e];
                    if stored != expected || grant.epoch <= stored.epoch {
                        return self.refused(m, e, Some((stored, holder)));
                    }
                    // A master taking a unit for itself: the transaction also asks that
                    // no other master holds the edge's link or claims the unit.
                    let other = |x: Option<usize>| x.is_some_and(|x| x != m);
                    if grant.owner == Owner::Master
                        && here
                        && (other(self.store.links[e]) || other(self.store.running[e]))
                    {
                        return self.refused(m, e, Some((stored, holder)));
                    }
                    let holder = match (grant.owner, here) {
                        (Owner::Edge, _) => None,
                        (Owner::Master, true) => Some(m),
                        (Owner::Master, false) => {
                            if holder.is_none() {
                                self.fail("a master's grant kept for no master".into());
                            }
                            holder
                        }
                    };
                    if !self.store.issued[e].insert(grant.epoch) {
                        self.fail(format!(
                            "epoch {} of {} issued twice",
                            grant.epoch,
                            edge_name(e)
                        ));
                    }
                    self.store.grants[e] = (grant, holder);
                    // A master's grant for itself carries its claim in the same
                    // transaction: no view shows the one without the other.
                    if grant.owner == Owner::Master && here {
                        self.store.running[e] = Some(m);
                    }
                    self.changed();
                }
                MasterAction::Confirm { grant } => {
                    let (stored, holder) = self.store.grants[e];
                    if !self.reaches_etcd(m) || !self.lease_live(m) {
                        return self.refused(m, e, None);
                    }
                    if stored != grant {
                        return self.refused(m, e, Some((stored, holder)));
                    }
                }
                MasterAction::ClaimRunning => {
                    let (stored, holder) = self.store.grants[e];
                    let mine = stored.owner == Owner::Master && holder == Some(m);
                    if !self.reaches_etcd(m) || !self.lease_live(m) || !mine {
                        return self.refused(m, e, Some((stored, holder)));
                    }
                    if self.store.running[e].is_some_and(|x| x != m) {
                        return self.refused(m, e, Some((stored, holder)));
                    }
                    self.store.running[e] = Some(m);
                    self.changed();
                }
                MasterAction::ReleaseRunning => {
                    if self.reaches_etcd(m) && self.store.running[e] == Some(m) {
                        self.store.running[e] = None;
                        self.changed();
                    }
                }
                MasterAction::StartModules { epoch } => {
                    let (stored, holder) = self.store.grants[e];
                    if stored
                        != (ControlState {
                            owner: Owner::Master,
                            epoch,
                        })
                        || holder != Some(m)
                    {
                        self.fail(format!(
                            "{} runs {} under epoch {epoch}, but etcd holds {stored:?} for {holder:?}",
                            master_name(m),
                            edge_name(e)
                        ));
                    }
                    let held = self.masters[m].as_ref().and_then(|x| x.held_until);
                    if held.is_none_or(|until| until <= self.now) || !self.lease_live(m) {
                        self.fail(format!("{} started without a lease", master_name(m)));
                    }
                    for other in 0..self.setup.masters {
                        if other != m && self.masters[other].as_ref().is_some_and(|x| x.running[e])
                        {
                            self.fail(format!(
                                "{} starts {} while {} runs it",
                                master_name(m),
                                edge_name(e),
                                master_name(other)
                            ));
                        }
                    }
                    if let Some(master) = &mut self.masters[m] {
                        master.running[e] = true;
                    }
                }
                MasterAction::StopModules => {
                    if let Some(master) = &mut self.masters[m] {
                        master.running[e] = false;
                    }
                }
                MasterAction::SendDecision { owner, epoch, .. } => {
                    if self.links[e].is_some_and(|l| l.master == m) {
                        self.to_edge[e]
                            .push_back((self.now + LATENCY_MS, ToEdge::Decision { owner, epoch }));
                    }
                }
                MasterAction::SendReady => {
                    if self.links[e].is_some_and(|l| l.master == m) {
                        self.to_edge[e].push_back((self.now + LATENCY_MS, ToEdge::Ready));
                    }
                }
                MasterAction::Audit(_) => {}
            }
        }
        true
    }

    fn edge_actions(&mut self, e: usize, actions: Vec<EdgeAction>) -> bool {
        for action in actions {
            self.note(format!("{}: {action:?}", edge_name(e)));
            match action {
                EdgeAction::Persist(state) => {
                    if state.epoch < self.edge_store[e].epoch {
                        self.fail(format!("{} epoch went back to {state:?}", edge_name(e)));
                    }
                    if state.epoch != Epoch::ZERO && !self.store.issued[e].contains(&state.epoch) {
                        self.fail(format!(
                            "{} holds epoch {} no master issued",
                            edge_name(e),
                            state.epoch
                        ));
                    }
                    self.edge_store[e] = state;
                }
                EdgeAction::StartModules { epoch } => {
                    if self.edge_store[e]
                        != (ControlState {
                            owner: Owner::Edge,
                            epoch,
                        })
                    {
                        self.fail(format!(
                            "{} runs under epoch {epoch} it did not store",
                            edge_name(e)
                        ));
                    }
                    // Told to start over a link: every master has stopped first.
                    let runner = (0..self.setup.masters)
                        .find(|m| self.masters[*m].as_ref().is_some_and(|x| x.running[e]));
                    if self.links[e].is_some()
                        && let Some(m) = runner
                    {
                        self.fail(format!(
                            "{} starts while {} runs it (break before make)",
                            edge_name(e),
                            master_name(m)
                        ));
                    }
                    self.edge_running[e] = true;
                }
                EdgeAction::StopModules => self.edge_running[e] = false,
                EdgeAction::SendReport(report) => {
                    if let Some(link) = self.links[e] {
                        self.to_master.push_back((
                            self.now + LATENCY_MS,
                            e,
                            link.master,
                            Some(report),
                        ));
                    }
                }
                EdgeAction::Audit { .. } => {}
            }
        }
        true
    }

    // --- time ----------------------------------------------------------------------

    fn next_due(&self) -> Option<u64> {
        let mut due: Vec<u64> = Vec::new();
        due.extend(self.to_master.front().map(|(at, ..)| *at));
        for e in 0..self.setup.edges {
            due.extend(self.to_edge[e].front().map(|(at, _)| *at));
            due.extend(self.edge_notices_at[e]);
            due.extend(self.master_notices_at[e].map(|(_, at, _)| at));
            if let Some(edge) = &self.edges[e] {
                if self.links[e].is_none() && self.edge_notices_at[e].is_none() {
                    due.push(edge.next_attempt);
                }
                due.extend(edge.machine.next_poll().map(|at| at.0));
            }
        }
        due.extend(self.store.expiry.iter().flatten().copied());
        for master in self.masters.iter().flatten() {
            due.push(master.next_keep_alive);
            due.extend(master.watch.front().map(|(at, _)| *at));
            if !master.booted {
                due.push(master.boot_at);
            }
            due.extend(master.held_until);
            for machine in &master.machines {
                due.extend(machine.next_poll(self.clock()).map(|at| at.0));
            }
        }
        due.into_iter().min()
    }

    fn advance(&mut self, by: u64) {
        let target = self.now + by;
        let mut fired_at_same_time = 0;
        while let Some(due) = self.next_due().filter(|due| *due <= target) {
            if due <= self.now {
                fired_at_same_time += 1;
                if fired_at_same_time > 200 {
                    self.fail("livelock: something is due again and again".into());
                }
            } else {
                fired_at_same_time = 0;
                self.now = due;
            }
            self.fire_due();
            self.check();
        }
        self.now = target;
        self.check();
    }

    fn fire_due(&mut self) {
        let now = self.now;
        let clock = self.clock();
        self.expire();
        if let Some((at, ..)) = self.to_master.front()
            && *at <= now
        {
            let (_, e, m, message) = self.to_master.pop_front().unwrap();
            // An acknowledgement changes nothing here; a report is the master's to answer.
            if let Some(report) = message {
                self.master_event(m, e, MasterEvent::Report(report));
            }
            return;
        }
        for e in 0..self.setup.edges {
            if let Some((at, _)) = self.to_edge[e].front()
                && *at <= now
            {
                let (_, message) = self.to_edge[e].pop_front().unwrap();
                let master = self.links[e].map(|l| l.master);
                match message {
                    ToEdge::Decision { owner, epoch } => {
                        let edge = self.edges[e].as_mut().unwrap();
                        match edge.machine.decide(clock, owner, epoch, "decision") {
                            Ok(actions) => {
                                self.edge_actions(e, actions);
                                if let Some(m) = master {
                                    self.to_master.push_back((now + LATENCY_MS, e, m, None));
                                }
                            }
                            Err(_) => self.sever(e, 0, 0),
                        }
                    }
                    ToEdge::Ready => self.edge_event(e, EdgeEvent::MasterReady),
                }
                return;
            }
            if let Some(at) = self.edge_notices_at[e]
                && at <= now
            {
                self.edge_notices_at[e] = None;
                self.edge_lost_at[e] = now;
                if let Some(edge) = &mut self.edges[e] {
                    edge.next_attempt = now + RECONNECT_MS;
                }
                self.edge_event(e, EdgeEvent::LinkDown);
                return;
            }
            if let Some((m, at, last_heard)) = self.master_notices_at[e]
                && at <= now
            {
                self.master_notices_at[e] = None;
                if self.reaches_etcd(m) && self.store.links[e] == Some(m) {
                    self.store.links[e] = None;
                    self.store.link_ended[e] = Some(now);
                    self.changed();
                }
                self.master_event(
                    m,
                    e,
                    MasterEvent::LinkDown {
                        last_heard: Mono(last_heard),
                    },
                );
                return;
            }
            if let Some(edge) = &self.edges[e]
                && self.links[e].is_none()
                && self.edge_notices_at[e].is_none()
                && edge.next_attempt <= now
            {
                self.attempt(e);
                return;
            }
            if let Some(edge) = &mut self.edges[e]
                && edge.machine.next_poll().is_some_and(|at| at.0 <= now)
            {
                let actions = edge.machine.poll(clock);
                self.edge_actions(e, actions);
                return;
            }
        }
        for m in 0..self.setup.masters {
            let Some(master) = &self.masters[m] else {
                continue;
            };
            if master.next_keep_alive <= now {
                self.keep_alive(m);
                return;
            }
            if master.watch.front().is_some_and(|(at, _)| *at <= now) {
                self.deliver_watch(m);
                return;
            }
            if master.held_until.is_some_and(|until| until <= now) {
                self.lease_lapsed(m);
                return;
            }
            if !master.booted && master.boot_at <= now {
                self.masters[m].as_mut().unwrap().booted = true;
                for e in 0..self.setup.edges {
                    self.master_event(m, e, MasterEvent::Booted);
                }
                return;
            }
            for e in 0..self.setup.edges {
                let master = self.masters[m].as_mut().unwrap();
                if master.machines[e]
                    .next_poll(clock)
                    .is_some_and(|at| at.0 <= now)
                {
                    let actions = master.machines[e].poll(clock);
                    self.master_actions(m, e, actions);
                    return;
                }
            }
        }
    }

    /// Master `m`'s lease ran out on its own clock: its units stop (the machines see to
    /// it), and it closes its edges' links so that they find a master in the cluster.
    fn lease_lapsed(&mut self, m: usize) {
        self.note(format!("{}'s lease lapses", master_name(m)));
        if let Some(master) = &mut self.masters[m] {
            master.held_until = None;
        }
        for e in 0..self.setup.edges {
            self.master_event(m, e, MasterEvent::Lease(Lease::Lost));
            if self.links[e].is_some_and(|l| l.master == m) {
                self.sever(e, 0, 0);
            }
        }
    }

    /// Edge `e` tries its masters in its order; a master without a lease refuses, and so
    /// does one that cannot store the link's key (the others would take the edge for
    /// unlinked, and fail it over while it runs its rooms).
    fn attempt(&mut self, e: usize) {
        let now = self.now;
        let names: Vec<String> = (0..self.setup.masters).map(master_name).collect();
        let mut order = tether_common::control::placement::rendezvous_order(&edge_name(e), &names);
        if let Some(edge) = &mut self.edges[e] {
            order.rotate_left(edge.attempts % names.len());
            edge.attempts += 1;
        }
        let target = order
            .into_iter()
            .map(|name| name[1..].parse::<usize>().unwrap())
            .find(|m| {
                self.reaches_etcd(*m)
                    && self.masters[*m]
                        .as_ref()
                        .is_some_and(|x| x.held_until.is_some_and(|until| until > now))
            })
            .filter(|_| !self.edge_cut[e]);
        let Some(m) = target else {
            self.edges[e].as_mut().unwrap().next_attempt = now + RECONNECT_MS;
            self.edge_event(e, EdgeEvent::AttemptFailed);
            return;
        };
        self.links[e] = Some(Link {
            master: m,
            since: now,
        });
        // A new link replaces one its master had not noticed was dead.
        if let Some((old, _, last_heard)) = self.master_notices_at[e].take() {
            self.master_event(
                old,
                e,
                MasterEvent::LinkDown {
                    last_heard: Mono(last_heard),
                },
            );
        }
        self.note(format!("{} links to {}", edge_name(e), master_name(m)));
        self.store.links[e] = Some(m);
        self.changed();
        self.master_event(m, e, MasterEvent::LinkUp);
        self.edge_event(e, EdgeEvent::LinkUp);
    }

    // --- the properties --------------------------------------------------------------

    fn check(&self) {
        for e in 0..self.setup.edges {
            let runners: Vec<usize> = (0..self.setup.masters)
                .filter(|m| self.masters[*m].as_ref().is_some_and(|x| x.running[e]))
                .collect();
            if runners.len() > 1 {
                self.fail(format!("masters {runners:?} both run {}", edge_name(e)));
            }
            if let Some(&m) = runners.first() {
                if !self.lease_live(m) {
                    self.fail(format!(
                        "{} runs {} after etcd expired its lease",
                        master_name(m),
                        edge_name(e)
                    ));
                }
                // On a live link to the master that runs it: only within a handover. Linked
                // to another master, the one running it is cut off from the edge: it hears
                // of the edge's grant by watch, or stops with its lease at the latest.
                if self.edge_running[e]
                    && let Some(link) = self.links[e]
                {
                    let allowed = if link.master == m {
                        HANDOVER_MS
                    } else {
                        HANDOVER_MS + TTL_MS
                    };
                    if self.now - link.since > allowed {
                        self.fail(format!(
                            "{} and {} both run it {} ms after its link to {} came up",
                            master_name(m),
                            edge_name(e),
                            self.now - link.since,
                            master_name(link.master)
                        ));
                    }
                }
            }
        }
    }

    fn apply(&mut self, op: Op) {
        self.note(format!("op {op:?}"));
        let (masters, edges) = (self.setup.masters, self.setup.edges);
        match op {
            Op::Advance(ms) => self.advance(ms),
            Op::CutEdge {
                e,
                edge_after,
                master_after,
            } => {
                let e = e % edges;
                self.edge_cut[e] = true;
                self.sever(e, edge_after, master_after);
            }
            Op::HealEdge(e) => self.edge_cut[e % edges] = false,
            Op::CrashEdge(e) => self.crash_edge(e % edges),
            Op::StartEdge(e) => self.start_edge(e % edges),
            Op::CrashMaster(m) => self.crash_master(m % masters),
            Op::StartMaster(m) => self.start_master(m % masters),
            Op::CutEtcd(m) => self.etcd_cut[m % masters] = true,
            Op::HealEtcd(m) => {
                let m = m % masters;
                self.etcd_cut[m] = false;
                self.resync(m);
            }
            Op::Restore { m, e } => {
                let (m, e) = (m % masters, e % edges);
                let now = self.clock();
                if let Some(master) = &mut self.masters[m]
                    && let Ok(actions) = master.machines[e].restore(now)
                {
                    self.master_actions(m, e, actions);
                }
            }
        }
        self.advance(0);
    }

    /// Heal everything, start what is down (a master whose old lease still lives waits
    /// it out), and wait: every edge linked, agreeing with its master, one runner each.
    fn settle(&mut self) {
        for e in 0..self.setup.edges {
            self.edge_cut[e] = false;
            self.start_edge(e);
        }
        for m in 0..self.setup.masters {
            if self.etcd_cut[m] {
                self.etcd_cut[m] = false;
                self.resync(m);
            }
        }
        self.advance(TTL_MS + 100);
        for m in 0..self.setup.masters {
            self.start_master(m);
        }
        self.advance(BOOT_WAIT_MS + 3 * RECONNECT_MS + self.setup.timeout_ms + TTL_MS);
        for e in 0..self.setup.edges {
            let Some(link) = self.links[e] else {
                self.fail(format!(
                    "{} has no link after healing everything",
                    edge_name(e)
                ));
            };
            let master = self.masters[link.master].as_ref().unwrap();
            let (m, edge) = (
                master.machines[e].state(),
                self.edges[e].as_ref().unwrap().machine.state(),
            );
            if m != edge {
                self.fail(format!(
                    "{}: its master says {m:?}, it says {edge:?}",
                    edge_name(e)
                ));
            }
            let runners: Vec<usize> = (0..self.setup.masters)
                .filter(|x| self.masters[*x].as_ref().is_some_and(|p| p.running[e]))
                .collect();
            let expected_master = self.store.grants[e].1;
            match m.owner {
                Owner::Edge if self.edge_running[e] && runners.is_empty() => {}
                Owner::Master
                    if !self.edge_running[e]
                        && runners.len() == 1
                        && Some(runners[0]) == expected_master => {}
                _ => self.fail(format!(
                    "{}: owner {:?} but the edge runs: {}, masters running: {runners:?}",
                    edge_name(e),
                    m.owner,
                    self.edge_running[e]
                )),
            }
        }
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..200).prop_map(Op::Advance),
        6 => (0u64..8_000).prop_map(Op::Advance),
        3 => (0u64..30_000).prop_map(Op::Advance),
        2 => (0usize..3, 0u64..5_000, 0u64..5_000).prop_map(|(e, edge_after, master_after)| Op::CutEdge { e, edge_after, master_after }),
        2 => (0usize..3).prop_map(Op::HealEdge),
        1 => (0usize..3).prop_map(Op::CrashEdge),
        1 => (0usize..3).prop_map(Op::StartEdge),
        1 => (0usize..3).prop_map(Op::CrashMaster),
        2 => (0usize..3).prop_map(Op::StartMaster),
        1 => (0usize..3).prop_map(Op::CutEtcd),
        2 => (0usize..3).prop_map(Op::HealEtcd),
        1 => (0usize..3, 0usize..3).prop_map(|(m, e)| Op::Restore { m, e }),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        2usize..=3,
        1usize..=3,
        prop_oneof![Just(1_000u64), Just(5_000), Just(20_000)],
    )
        .prop_map(|(masters, edges, timeout_ms)| Setup {
            masters,
            edges,
            timeout_ms,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    #[test]
    fn several_masters_never_run_a_unit_twice_and_converge(setup in setup(), ops in proptest::collection::vec(op(), 1..60)) {
        let mut world = World::new(setup);
        for op in ops {
            world.apply(op);
        }
        world.settle();
    }
}

fn world(masters: usize, edges: usize) -> World {
    let mut world = World::new(Setup {
        masters,
        edges,
        timeout_ms: 5_000,
    });
    world.advance(BOOT_WAIT_MS + 1000);
    world
}

fn runner(world: &World, e: usize) -> Option<usize> {
    (0..world.setup.masters).find(|m| world.masters[*m].as_ref().is_some_and(|x| x.running[e]))
}

#[test]
fn a_dead_edge_is_failed_over_by_the_one_master_the_hash_picks() {
    let mut w = world(3, 1);
    assert!(w.edge_running[0]);
    w.crash_edge(0);
    w.advance(5_000 + 500);
    let picked = rendezvous_pick(&edge_name(0), &w.live_masters()).cloned();
    assert_eq!(runner(&w, 0).map(master_name), picked);
    assert_eq!(w.store.issued[0].len(), 1, "one grant, by one master");
    assert_eq!(w.refusals, 0, "no other master even tried");
}

#[test]
fn a_master_that_joins_takes_nothing_over_from_a_live_one() {
    let names: Vec<String> = (0..3).map(master_name).collect();
    let latecomer = rendezvous_pick(&edge_name(0), &names).unwrap()[1..]
        .parse::<usize>()
        .unwrap();
    let mut w = world(3, 1);
    // The master the hash would pick among all three is away when the edge dies.
    w.crash_master(latecomer);
    w.advance(TTL_MS);
    w.crash_edge(0);
    w.advance(5_500);
    let holder = runner(&w, 0).expect("a master took the dead edge over");
    assert_ne!(holder, latecomer);
    // It comes back, and is now the hash's pick: the unit stays where it runs.
    w.start_master(latecomer);
    w.advance(BOOT_WAIT_MS + 10_000);
    assert_eq!(
        runner(&w, 0),
        Some(holder),
        "sticky: no move to the latecomer"
    );
    assert_eq!(w.store.issued[0].len(), 1, "no new grant");
}

#[test]
fn a_master_cut_off_from_etcd_stops_before_its_lease_expires_and_another_takes_over() {
    let mut w = world(3, 1);
    w.crash_edge(0);
    w.advance(5_500);
    let first = runner(&w, 0).expect("a master took the dead edge over");
    w.etcd_cut[first] = true;
    // It stops by its own reckoning before etcd expires its lease ...
    let expiry = w.store.expiry[first].unwrap();
    w.advance(expiry - w.now - 1);
    assert_eq!(
        runner(&w, 0),
        None,
        "stopped before its lease can have expired"
    );
    // ... and a survivor starts once etcd has expired it.
    w.advance(2 * WATCH_LAG_MS + 1000);
    let second = runner(&w, 0).expect("a survivor took over");
    assert_ne!(second, first);
    // Healed, the first rejoins without taking anything back.
    w.etcd_cut[first] = false;
    w.advance(TTL_MS);
    assert_eq!(runner(&w, 0), Some(second));
}

#[test]
fn a_restore_through_another_master_waits_for_the_holder_to_stop() {
    let mut w = world(2, 1);
    w.crash_edge(0);
    w.advance(5_500);
    let holder = runner(&w, 0).expect("taken over");
    w.start_edge(0);
    w.advance(RECONNECT_MS);
    let linked = w.links[0].expect("the edge linked again").master;
    let now = w.clock();
    let actions = w.masters[linked].as_mut().unwrap().machines[0]
        .restore(now)
        .unwrap();
    w.master_actions(linked, 0, actions);
    w.advance(HANDOVER_MS + 100);
    assert!(
        w.edge_running[0] && runner(&w, 0).is_none(),
        "handed back (holder m{holder}, linked m{linked})"
    );
}

/// One master's machine for `e`, booted, on a lease, not the hash's pick.
fn machine_on_lease() -> (MasterSide, Now) {
    let now = Now {
        mono: Mono(START_MS),
        wall_ms: START_MS,
    };
    let settings = EdgeSettings {
        failover: true,
        timeout_ms: 5_000,
        window: None,
    };
    let mut m = MasterSide::in_cluster(
        UnitId::new("e"),
        settings,
        (ControlState::default(), true),
        now,
    );
    m.handle(
        now,
        MasterEvent::Lease(Lease::Until(Mono(START_MS + 3_600_000))),
    );
    m.handle(now, MasterEvent::Booted);
    (m, now)
}

fn decisions(actions: &[MasterAction]) -> Vec<(Owner, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            MasterAction::SendDecision { owner, epoch, .. } => Some((*owner, epoch.get())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_grant_over_another_masters_reaches_the_edge_only_on_a_view_that_new() {
    let (mut m, now) = machine_on_lease();
    m.handle(now, MasterEvent::LinkUp);
    let report = EdgeReport {
        state: ControlState::default(),
        controlling: false,
    };
    // Rule 5 confirms the edge's grant: the shell checks it is still stored ...
    let actions = m.handle(now, MasterEvent::Report(report));
    assert!(actions.contains(&MasterAction::Confirm {
        grant: ControlState::default()
    }));
    // ... and it is not: another master failed the edge over meanwhile (this master's
    // view has not shown it, nor that master's claim).
    let theirs = ControlState {
        owner: Owner::Master,
        epoch: Epoch(1),
    };
    m.issue_failed(
        now,
        Some(Held {
            grant: theirs,
            here: false,
        }),
    );
    let later = Now {
        mono: Mono(START_MS + 2_000),
        ..now
    };
    let actions = m.poll(later);
    assert!(
        actions.iter().any(|a| matches!(a, MasterAction::Issue { grant, .. } if grant.owner == Owner::Edge && grant.epoch == Epoch(2))),
        "{actions:?}"
    );
    assert!(
        decisions(&actions).is_empty(),
        "not before a view as new as the grant: {actions:?}"
    );
    // A view with the other master's claim, then one without it and with the new grant.
    let claim = PeerView {
        fails_over: false,
        linked_elsewhere: false,
        link_ended: None,
        running_elsewhere: true,
    };
    assert!(decisions(&m.handle(later, MasterEvent::Peers(claim))).is_empty());
    let stopped = PeerView {
        running_elsewhere: false,
        ..claim
    };
    assert!(
        decisions(&m.handle(
            later,
            MasterEvent::Granted {
                grant: theirs,
                here: false
            }
        ))
        .is_empty()
    );
    assert!(
        decisions(&m.handle(later, MasterEvent::Peers(stopped))).is_empty(),
        "the view is older than the grant"
    );
    let granted = ControlState {
        owner: Owner::Edge,
        epoch: Epoch(2),
    };
    let actions = m.handle(
        later,
        MasterEvent::Granted {
            grant: granted,
            here: true,
        },
    );
    assert_eq!(decisions(&actions), [(Owner::Edge, 2)], "{actions:?}");
}

/// The hash's pick, whose own link to the edge ended, learns that another master (the one
/// the edge is linked to now) handed the edge a new grant: that is word from the edge,
/// and the timeout counts again from then, so the pick does not take the edge over from
/// under the master it is linked to.
#[test]
fn a_new_grant_to_the_edge_is_word_from_it_and_restarts_the_failover_timeout() {
    let (mut m, now) = machine_on_lease();
    let pick = PeerView {
        fails_over: true,
        linked_elsewhere: false,
        link_ended: None,
        running_elsewhere: false,
    };
    m.handle(now, MasterEvent::Peers(pick));
    let at = |ms: u64| Now {
        mono: Mono(START_MS + ms),
        wall_ms: START_MS + ms,
    };
    // 4 s into the 5 s timeout, another master hands the edge a new grant.
    let handed = ControlState {
        owner: Owner::Edge,
        epoch: Epoch(1),
    };
    m.handle(
        at(4_000),
        MasterEvent::Granted {
            grant: handed,
            here: false,
        },
    );
    let actions = m.poll(at(6_000));
    assert!(
        !actions.iter().any(
            |a| matches!(a, MasterAction::Issue { grant, .. } if grant.owner == Owner::Master)
        ),
        "no failover 2 s after word from the edge: {actions:?}"
    );
    // Without any more word, the timeout runs out 5 s after the grant.
    let actions = m.poll(at(9_100));
    assert!(
        actions.iter().any(
            |a| matches!(a, MasterAction::Issue { grant, .. } if grant.owner == Owner::Master)
        ),
        "{actions:?}"
    );
}

#[test]
fn rules_decided_again_judge_the_edge_as_it_stands_since_the_last_decision() {
    let (mut m, now) = machine_on_lease();
    m.handle(now, MasterEvent::LinkUp);
    let actions = m.handle(
        now,
        MasterEvent::Report(EdgeReport {
            state: ControlState::default(),
            controlling: false,
        }),
    );
    assert_eq!(
        decisions(&actions),
        [(Owner::Edge, 0)],
        "rule 5: the edge runs them"
    );
    // Another master's grant and claim turn up (a takeover that should not have been):
    // the edge runs its modules since the decision, so rule 1 keeps them there.
    let theirs = ControlState {
        owner: Owner::Master,
        epoch: Epoch(1),
    };
    let mut actions = m.handle(
        now,
        MasterEvent::Peers(PeerView {
            fails_over: false,
            linked_elsewhere: false,
            link_ended: None,
            running_elsewhere: true,
        }),
    );
    actions.extend(m.handle(
        now,
        MasterEvent::Granted {
            grant: theirs,
            here: false,
        },
    ));
    let issued: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            MasterAction::Issue { grant, .. } => Some(*grant),
            _ => None,
        })
        .collect();
    assert_eq!(
        issued,
        [ControlState {
            owner: Owner::Edge,
            epoch: Epoch(2)
        }],
        "rule 1, not rule 4: {actions:?}"
    );
}
