//! The control state machines of both sides, stepped together in simulated time under
//! random link cuts, crashes, restarts, restore windows, manual restores and time passing.
//! Messages between them travel with a latency and are lost when the link goes down. A
//! cut is silent: each side notices it only after its own delay (its heartbeats missed), so
//! one side may act on a cut long before the other knows of it.
//!
//! Asserted at every step: epochs never go back on either side; the master takes control
//! only after the edge was unheard for its timeout with failover on, and gives it back only
//! to a connected edge; the edge takes control alone only after a link loss and one more
//! reconnect period; a side starts its modules while the other runs them only while the
//! link is down (break-before-make otherwise), so both run at once only while the link is
//! cut or within one handover of its return; and once the link is up and quiet both sides
//! agree on owner and epoch, and exactly the owner runs the modules.
//!
//! Grants: only the master issues epochs, each over the grant it expects stored and above
//! it, so no epoch is issued twice and the edge only ever holds an epoch the master issued;
//! a side runs modules only under the grant (or claim) it has stored, and a store that
//! fails for a while holds decisions back without losing or duplicating any. The wall
//! clock may be stepped by hours either way: intervals are measured on the monotonic one.

use std::collections::{BTreeSet, VecDeque};

use proptest::prelude::*;
use tether_common::control::master::ISSUE_RETRY_MS;
use tether_common::control::{
    ControlState, EdgeAction, EdgeEvent, EdgeId, EdgeReport, EdgeSettings, EdgeSide, EdgeTiming,
    Epoch, MasterAction, MasterEvent, MasterSide, Mono, Now, Owner, UnitId, Window,
};
use tether_common::model::RestoreWindow;

const RECONNECT_MS: u64 = 3000;
const LATENCY_MS: u64 = 20;
const BOOT_WAIT_MS: u64 = 6000;
/// A report, a decision and its acknowledgement.
const HANDOVER_MS: u64 = 3 * LATENCY_MS;
/// 2026-11-22T00:00:00Z: windows are evaluated on this simulated wall clock (which starts
/// equal to the monotonic one and moves with it unless stepped).
const START_MS: u64 = 1_795_305_600_000;
const HOUR_MS: i64 = 3_600_000;

fn timing() -> EdgeTiming {
    EdgeTiming {
        heartbeat_ms: 1000,
        reconnect_ms: RECONNECT_MS,
        handshake_timeout_ms: 5000,
        masters: 1,
    }
}

#[derive(Debug, Clone)]
enum ToEdge {
    Decision { owner: Owner, epoch: Epoch },
    Ready,
}

#[derive(Debug, Clone)]
enum ToMaster {
    Report(EdgeReport),
    Ack,
}

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    /// The link is cut silently (a pulled cable): each side notices only when its
    /// heartbeats have gone missing, after its own delay, so one side may act on the cut
    /// well before the other knows of it.
    Cut {
        edge_after: u64,
        master_after: u64,
    },
    Heal,
    CrashEdge,
    StartEdge,
    CrashMaster,
    StartMaster,
    Restore,
    /// The wall clock jumps by this many ms (an operator or NTP sets it).
    StepWall(i64),
    /// The master's store fails every write for this long.
    MasterStoreFails(u64),
    /// The edge's store fails every write for this long.
    EdgeStoreFails(u64),
}

#[derive(Debug, Clone)]
struct Setup {
    failover: bool,
    timeout_ms: u64,
    window: Option<(String, u64)>,
}

struct MasterProc {
    machine: MasterSide,
    boot_at: u64,
    booted: bool,
}

struct EdgeProc {
    machine: EdgeSide,
    next_attempt: u64,
}

struct World {
    setup: Setup,
    /// The monotonic clock.
    now: u64,
    /// How far the wall clock is from the monotonic one.
    wall_offset: i64,
    /// Writes fail until then.
    master_store_fails_until: u64,
    edge_store_fails_until: u64,
    /// Every epoch the master's store took.
    issued: BTreeSet<Epoch>,
    master: Option<MasterProc>,
    master_store: ControlState,
    edge: Option<EdgeProc>,
    edge_store: ControlState,
    cut: bool,
    /// When the current link came up.
    link_since: Option<u64>,
    to_edge: VecDeque<(u64, ToEdge)>,
    to_master: VecDeque<(u64, ToMaster)>,
    master_running: bool,
    edge_running: bool,
    /// When the master last had the edge's link (or started).
    master_lost_at: u64,
    /// When the edge last had the master's link (or started).
    edge_lost_at: u64,
    /// After a silent cut: when the edge notices.
    edge_notices_at: Option<u64>,
    /// After a silent cut: when the master notices, and when it last heard the edge.
    master_notices_at: Option<(u64, u64)>,
    log: Vec<String>,
}

impl World {
    fn new(setup: Setup) -> Self {
        let mut world = World {
            setup,
            now: START_MS,
            wall_offset: 0,
            master_store_fails_until: 0,
            edge_store_fails_until: 0,
            issued: BTreeSet::new(),
            master: None,
            master_store: ControlState::default(),
            edge: None,
            edge_store: ControlState::default(),
            cut: false,
            link_since: None,
            to_edge: VecDeque::new(),
            to_master: VecDeque::new(),
            master_running: false,
            edge_running: false,
            master_lost_at: START_MS,
            edge_lost_at: START_MS,
            edge_notices_at: None,
            master_notices_at: None,
            log: Vec::new(),
        };
        world.start_master();
        world.start_edge();
        world
    }

    fn settings(&self) -> EdgeSettings {
        EdgeSettings {
            failover: self.setup.failover,
            timeout_ms: self.setup.timeout_ms,
            window: self.setup.window.as_ref().map(|(start, length_s)| {
                Window::new(
                    &RestoreWindow {
                        start: start.clone(),
                        length_s: *length_s,
                    },
                    None,
                )
                .unwrap()
            }),
        }
    }

    fn clock(&self) -> Now {
        Now {
            mono: Mono(self.now),
            wall_ms: self.now.saturating_add_signed(self.wall_offset),
        }
    }

    fn link_up(&self) -> bool {
        self.link_since.is_some()
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

    // --- processes -----------------------------------------------------------------

    fn start_master(&mut self) {
        if self.master.is_some() {
            return;
        }
        let machine = MasterSide::new(
            UnitId::new("e"),
            self.settings(),
            self.master_store,
            self.clock(),
        );
        self.master = Some(MasterProc {
            machine,
            boot_at: self.now + BOOT_WAIT_MS,
            booted: false,
        });
        self.master_lost_at = self.now;
        self.note("master starts");
    }

    fn start_edge(&mut self) {
        if self.edge.is_some() {
            return;
        }
        self.edge = Some(EdgeProc {
            machine: EdgeSide::new(EdgeId::new("e"), self.edge_store, timing()),
            next_attempt: self.now,
        });
        self.edge_lost_at = self.now;
        self.note("edge starts");
    }

    fn crash_master(&mut self) {
        if self.master.take().is_some() {
            self.master_notices_at = None;
            self.master_running = false;
            self.note("master crashes");
            self.sever(0, 0);
        }
    }

    fn crash_edge(&mut self) {
        if self.edge.take().is_some() {
            self.edge_notices_at = None;
            self.edge_running = false;
            self.note("edge crashes");
            self.sever(0, 0);
        }
    }

    /// The link goes down: messages in flight are lost, and each side still alive learns
    /// of it after its own delay (at once when the peer's process died, its sockets
    /// closed by its kernel; after missed heartbeats when the cable was pulled).
    fn sever(&mut self, edge_after: u64, master_after: u64) {
        if self.link_since.take().is_none() {
            return;
        }
        self.to_edge.clear();
        self.to_master.clear();
        self.note("link down");
        if self.edge.is_some() {
            self.edge_notices_at = Some(self.now + edge_after);
        }
        if self.master.is_some() {
            self.master_notices_at = Some((self.now + master_after, self.now));
        }
    }

    // --- feeding the machines and carrying out their actions --------------------------

    fn master_event(&mut self, event: MasterEvent) {
        let now = self.clock();
        let Some(master) = &mut self.master else {
            return;
        };
        let actions = master.machine.handle(now, event);
        self.master_actions(actions);
    }

    fn edge_event(&mut self, event: EdgeEvent) {
        let now = self.clock();
        let Some(edge) = &mut self.edge else { return };
        let actions = edge.machine.handle(now, event);
        self.edge_actions(actions);
    }

    /// Carries out the master's actions as its shell does; answers whether all were (a
    /// grant the store did not take stops the rest).
    fn master_actions(&mut self, actions: Vec<MasterAction>) -> bool {
        for action in actions {
            self.note(format!("master: {action:?}"));
            match action {
                MasterAction::Issue {
                    expected,
                    grant: state,
                    here,
                } => {
                    if state.owner == Owner::Master && !here {
                        self.fail("a master alone issued a master's grant to another".into());
                    }
                    if expected != self.master_store {
                        self.fail(format!(
                            "the master expected {expected:?} stored, but the store holds {:?}",
                            self.master_store
                        ));
                    }
                    if state.epoch <= self.master_store.epoch {
                        self.fail(format!("master epoch did not rise: {state:?}"));
                    }
                    if self.now < self.master_store_fails_until {
                        self.note("master: the store refuses the grant");
                        let now = self.clock();
                        if let Some(master) = &mut self.master {
                            master.machine.issue_failed(now, None);
                        }
                        return false;
                    }
                    if !self.issued.insert(state.epoch) {
                        self.fail(format!("epoch {} issued twice", state.epoch));
                    }
                    if state.owner == Owner::Master
                        && self.master_store.owner == Owner::Edge
                        && !(self.setup.failover
                            && !self.link_up()
                            && self.now - self.master_lost_at >= self.setup.timeout_ms)
                    {
                        self.fail("the master took control without a failover timeout".into());
                    }
                    // (A silent cut it has not noticed yet it cannot know of.)
                    if state.owner == Owner::Edge
                        && self.master_store.owner == Owner::Master
                        && !self.link_up()
                        && self.master_notices_at.is_none()
                    {
                        self.fail("the master gave control to an edge it knew gone".into());
                    }
                    self.master_store = state;
                }
                MasterAction::StartModules { epoch } => {
                    if self.edge_running && self.link_up() {
                        self.fail("the master started modules the connected edge runs".into());
                    }
                    let granted = ControlState {
                        owner: Owner::Master,
                        epoch,
                    };
                    if self.master_store != granted {
                        self.fail(format!(
                            "the master runs under {granted:?} but stored {:?}",
                            self.master_store
                        ));
                    }
                    self.master_running = true;
                }
                MasterAction::StopModules => self.master_running = false,
                // A master alone has no lease to claim on.
                MasterAction::ClaimRunning | MasterAction::ReleaseRunning => {}
                // It alone writes its store: what it confirms is what it stored.
                MasterAction::Confirm { grant } => {
                    if grant != self.master_store {
                        self.fail(format!(
                            "the master confirms {grant:?} but stored {:?}",
                            self.master_store
                        ));
                    }
                }
                MasterAction::SendDecision { owner, epoch, .. } => {
                    if self.link_up() {
                        let at = self.now + LATENCY_MS;
                        self.to_edge
                            .push_back((at, ToEdge::Decision { owner, epoch }));
                    }
                }
                MasterAction::SendReady => {
                    if self.link_up() {
                        self.to_edge
                            .push_back((self.now + LATENCY_MS, ToEdge::Ready));
                    }
                }
                MasterAction::Audit(record) => {
                    if record.epoch != self.master_store.epoch {
                        self.fail(format!("audit {record:?} is not the stored epoch"));
                    }
                }
            }
        }
        true
    }

    /// Carries out the edge's actions as its shell does; answers whether all were.
    fn edge_actions(&mut self, actions: Vec<EdgeAction>) -> bool {
        for action in actions {
            self.note(format!("edge: {action:?}"));
            match action {
                EdgeAction::Persist(state) => {
                    if state.epoch < self.edge_store.epoch {
                        self.fail(format!("edge epoch went back to {state:?}"));
                    }
                    if state.epoch != Epoch::ZERO && !self.issued.contains(&state.epoch) {
                        self.fail(format!(
                            "the edge holds epoch {} no master issued",
                            state.epoch
                        ));
                    }
                    if self.now < self.edge_store_fails_until {
                        self.note("edge: the store refuses");
                        let now = self.clock();
                        if let Some(edge) = &mut self.edge {
                            edge.machine.store_failed(now);
                        }
                        return false;
                    }
                    self.edge_store = state;
                }
                EdgeAction::StartModules { epoch } => {
                    let granted = ControlState {
                        owner: Owner::Edge,
                        epoch,
                    };
                    if self.edge_store != granted {
                        self.fail(format!(
                            "the edge runs under {granted:?} but stored {:?}",
                            self.edge_store
                        ));
                    }
                    if self.master_running && self.link_up() {
                        self.fail("the edge started modules the master runs, link up".into());
                    }
                    if !self.link_up() && self.now - self.edge_lost_at < RECONNECT_MS {
                        self.fail("the edge took control before one more attempt".into());
                    }
                    self.edge_running = true;
                }
                EdgeAction::StopModules => self.edge_running = false,
                EdgeAction::SendReport(report) => {
                    if self.link_up() {
                        let at = self.now + LATENCY_MS;
                        self.to_master.push_back((at, ToMaster::Report(report)));
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
        due.extend(self.to_edge.front().map(|(at, _)| *at));
        due.extend(self.to_master.front().map(|(at, _)| *at));
        due.extend(self.edge_notices_at);
        due.extend(self.master_notices_at.map(|(at, _)| at));
        if let Some(edge) = &self.edge {
            if !self.link_up() && self.edge_notices_at.is_none() {
                due.push(edge.next_attempt);
            }
            due.extend(edge.machine.next_poll().map(|at| at.0));
        }
        if let Some(master) = &self.master {
            if !master.booted {
                due.push(master.boot_at);
            }
            // It may have things to do before it has booted: a report to answer.
            due.extend(master.machine.next_poll(self.clock()).map(|at| at.0));
        }
        due.into_iter().min()
    }

    fn advance(&mut self, by: u64) {
        let target = self.now + by;
        let mut fired_at_same_time = 0;
        while let Some(due) = self.next_due().filter(|due| *due <= target) {
            if due <= self.now {
                fired_at_same_time += 1;
                if fired_at_same_time > 100 {
                    self.fail("livelock: something is due again and again".into());
                }
            } else {
                fired_at_same_time = 0;
                self.now = due;
            }
            self.fire_due();
            self.check_overlap();
            self.check_agreement();
        }
        self.now = target;
        self.check_overlap();
    }

    fn fire_due(&mut self) {
        let now = self.now;
        let clock = self.clock();
        if let Some((at, _)) = self.to_master.front()
            && *at <= now
        {
            let (_, message) = self.to_master.pop_front().unwrap();
            self.note(format!("master receives {message:?}"));
            match message {
                ToMaster::Report(report) => self.master_event(MasterEvent::Report(report)),
                ToMaster::Ack => {}
            }
            return;
        }
        if let Some((at, _)) = self.to_edge.front()
            && *at <= now
        {
            let (_, message) = self.to_edge.pop_front().unwrap();
            self.note(format!("edge receives {message:?}"));
            match message {
                ToEdge::Decision { owner, epoch } => {
                    let edge = self.edge.as_mut().unwrap();
                    match edge.machine.decide(clock, owner, epoch, "decision") {
                        Ok(actions) => {
                            if self.edge_actions(actions) {
                                self.to_master.push_back((now + LATENCY_MS, ToMaster::Ack));
                            } else {
                                // Not stored: the edge answers an error, and the real
                                // master closes the link; the next one negotiates again.
                                self.sever(0, 0);
                            }
                        }
                        // The real master closes a link whose edge refuses a decision.
                        Err(_) => self.sever(0, 0),
                    }
                }
                ToEdge::Ready => self.edge_event(EdgeEvent::MasterReady),
            }
            return;
        }
        if let Some(at) = self.edge_notices_at
            && at <= now
        {
            self.edge_notices_at = None;
            self.note("edge notices the cut");
            self.edge_lost_at = now;
            if let Some(edge) = &mut self.edge {
                edge.next_attempt = now + RECONNECT_MS;
            }
            self.edge_event(EdgeEvent::LinkDown);
            return;
        }
        if let Some((at, last_heard)) = self.master_notices_at
            && at <= now
        {
            self.master_notices_at = None;
            self.note("master notices the cut");
            self.master_lost_at = last_heard;
            self.master_event(MasterEvent::LinkDown {
                last_heard: Mono(last_heard),
            });
            return;
        }
        // An edge that has not noticed the cut still believes in its link: no attempts.
        if let Some(edge) = &self.edge
            && !self.link_up()
            && self.edge_notices_at.is_none()
            && edge.next_attempt <= now
        {
            if self.master.is_some() && !self.cut {
                self.link_since = Some(now);
                // The new link replaces the dead one the master had not noticed yet.
                self.master_notices_at = None;
                self.note("link up");
                self.master_event(MasterEvent::LinkUp);
                self.edge_event(EdgeEvent::LinkUp);
            } else {
                self.edge.as_mut().unwrap().next_attempt = now + RECONNECT_MS;
                self.edge_event(EdgeEvent::AttemptFailed);
            }
            return;
        }
        if let Some(edge) = &mut self.edge
            && edge.machine.next_poll().is_some_and(|at| at.0 <= now)
        {
            let actions = edge.machine.poll(clock);
            self.edge_actions(actions);
            return;
        }
        if let Some(master) = &mut self.master {
            if !master.booted && master.boot_at <= now {
                master.booted = true;
                self.note("master booted");
                self.master_event(MasterEvent::Booted);
            } else {
                let actions = master.machine.poll(clock);
                self.master_actions(actions);
            }
        }
    }

    // --- the properties --------------------------------------------------------------

    fn check_overlap(&self) {
        if self.master_running
            && self.edge_running
            && let Some(since) = self.link_since
            && self.now - since > HANDOVER_MS
        {
            self.fail(format!(
                "both sides run the modules {} ms after the link came up",
                self.now - since
            ));
        }
    }

    fn check_agreement(&self) {
        let quiet = self.to_edge.is_empty() && self.to_master.is_empty();
        let (Some(master), Some(edge), Some(since)) = (&self.master, &self.edge, self.link_since)
        else {
            return;
        };
        // A grant the master's store refused waits for its retry.
        let store_back = self.master_store_fails_until + ISSUE_RETRY_MS + HANDOVER_MS;
        if !quiet || self.now - since < HANDOVER_MS || self.now < store_back {
            return;
        }
        let (m, e) = (master.machine.state(), edge.machine.state());
        if m != e {
            self.fail(format!("link quiet but master says {m:?}, edge {e:?}"));
        }
        if self.master_running != (m.owner == Owner::Master)
            || self.edge_running != (m.owner == Owner::Edge)
        {
            self.fail(format!(
                "owner {:?} but master running {} and edge running {}",
                m.owner, self.master_running, self.edge_running
            ));
        }
    }

    fn apply(&mut self, op: &Op) {
        self.note(format!("op {op:?}"));
        match op {
            Op::Advance(ms) => self.advance(*ms),
            Op::Cut {
                edge_after,
                master_after,
            } => {
                self.cut = true;
                self.sever(*edge_after, *master_after);
            }
            Op::Heal => self.cut = false,
            Op::CrashEdge => self.crash_edge(),
            Op::StartEdge => self.start_edge(),
            Op::CrashMaster => self.crash_master(),
            Op::StartMaster => self.start_master(),
            Op::Restore => {
                let now = self.clock();
                if let Some(master) = &mut self.master
                    && let Ok(actions) = master.machine.restore(now)
                {
                    self.master_actions(actions);
                }
            }
            Op::StepWall(by) => self.wall_offset += by,
            Op::MasterStoreFails(ms) => self.master_store_fails_until = self.now + ms,
            Op::EdgeStoreFails(ms) => self.edge_store_fails_until = self.now + ms,
        }
        // Whatever an operation started settles within a handover.
        self.advance(0);
    }

    /// Heal everything, start what is down, and wait: the sides must end up agreeing.
    fn settle(&mut self) {
        self.cut = false;
        self.master_store_fails_until = self.master_store_fails_until.min(self.now);
        self.edge_store_fails_until = self.edge_store_fails_until.min(self.now);
        self.start_master();
        self.start_edge();
        self.advance(BOOT_WAIT_MS + 2 * RECONNECT_MS);
        if !self.link_up() {
            self.fail("no link after healing everything".into());
        }
        self.check_agreement();
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..200).prop_map(Op::Advance),
        6 => (0u64..8_000).prop_map(Op::Advance),
        3 => (0u64..40_000).prop_map(Op::Advance),
        1 => (0u64..7_200_000).prop_map(Op::Advance),
        2 => (0u64..5_000, 0u64..5_000).prop_map(|(edge_after, master_after)| Op::Cut {
            edge_after,
            master_after,
        }),
        2 => Just(Op::Heal),
        1 => Just(Op::CrashEdge),
        1 => Just(Op::StartEdge),
        1 => Just(Op::CrashMaster),
        1 => Just(Op::StartMaster),
        1 => Just(Op::Restore),
        1 => (-48 * HOUR_MS..48 * HOUR_MS).prop_map(Op::StepWall),
        1 => (0u64..10_000).prop_map(Op::MasterStoreFails),
        1 => (0u64..10_000).prop_map(Op::EdgeStoreFails),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        any::<bool>(),
        prop_oneof![Just(1_000u64), Just(5_000), Just(20_000)],
        prop_oneof![
            Just(None),
            Just(Some(("0 * * * *".to_string(), 600))),
            Just(Some(("*/5 * * * *".to_string(), 60))),
        ],
    )
        .prop_map(|(failover, timeout_ms, window)| Setup {
            failover,
            timeout_ms,
            window,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn control_stays_safe_and_converges(setup in setup(), ops in proptest::collection::vec(op(), 1..80)) {
        let mut world = World::new(setup);
        for op in &ops {
            world.apply(op);
        }
        world.settle();
    }
}

// --- the scenarios of the issue, stepped by hand ------------------------------------

fn world(failover: bool) -> World {
    let mut world = World::new(Setup {
        failover,
        timeout_ms: 20_000,
        window: None,
    });
    world.advance(BOOT_WAIT_MS + 100);
    world
}

#[test]
fn an_edge_that_dies_is_taken_over_after_its_timeout() {
    let mut w = world(true);
    assert!(w.edge_running && !w.master_running);
    w.crash_edge();
    w.advance(19_900);
    assert!(!w.master_running, "not before the timeout");
    w.advance(200);
    assert!(w.master_running);
    assert_eq!(w.master_store.owner, Owner::Master);
    assert_eq!(w.master_store.epoch, Epoch(1));
}

#[test]
fn a_restarted_edge_stays_stopped_until_a_restore() {
    let mut w = world(true);
    w.crash_edge();
    w.advance(21_000);
    w.start_edge();
    w.advance(RECONNECT_MS * 3);
    assert!(
        w.master_running && !w.edge_running,
        "rule 4 keeps the master"
    );
    assert_eq!(w.edge_store, w.master_store);
    let now = w.clock();
    let actions = w.master.as_mut().unwrap().machine.restore(now).unwrap();
    let position = |wanted: fn(&MasterAction) -> bool| actions.iter().position(wanted).unwrap();
    let issued = position(|a| matches!(a, MasterAction::Issue { .. }));
    let stopped = position(|a| *a == MasterAction::StopModules);
    let sent = position(|a| matches!(a, MasterAction::SendDecision { .. }));
    assert!(issued < stopped, "the grant is stored first");
    assert!(stopped < sent, "break before make");
    w.master_actions(actions);
    w.advance(HANDOVER_MS);
    assert!(!w.master_running && w.edge_running);
    assert_eq!(w.edge_store.owner, Owner::Edge);
    // 1: the takeover (the reconnected edge is told of it: no new grant, it had seen
    // none later); 2: the restore.
    assert_eq!(w.edge_store.epoch, Epoch(2));
}

#[test]
fn a_cut_link_heals_to_the_edge() {
    let mut w = world(true);
    w.apply(&Op::Cut {
        edge_after: 0,
        master_after: 0,
    });
    w.advance(21_000);
    assert!(w.master_running && w.edge_running, "both run while cut");
    w.apply(&Op::Heal);
    w.advance(RECONNECT_MS + 600);
    assert!(!w.master_running && w.edge_running, "rule 1");
    assert_eq!(w.edge_store, w.master_store);
}

#[test]
fn the_edge_takes_control_when_the_master_is_lost() {
    let mut w = world(true);
    w.crash_edge();
    w.advance(21_000);
    w.start_edge();
    w.advance(RECONNECT_MS);
    assert!(!w.edge_running);
    w.crash_master();
    w.advance(RECONNECT_MS - 10);
    assert!(!w.edge_running, "it waits one reconnect period");
    w.advance(20);
    assert!(w.edge_running, "then one failed attempt is enough");
}

#[test]
fn failover_off_keeps_the_master_out() {
    let mut w = world(false);
    w.crash_edge();
    w.advance(3_600_000);
    assert!(!w.master_running);
    assert_eq!(w.master_store.owner, Owner::Edge);
}

#[test]
fn a_master_restart_changes_nothing() {
    let mut w = world(true);
    let before = w.master_store;
    w.crash_master();
    w.start_master();
    w.advance(BOOT_WAIT_MS + RECONNECT_MS * 2);
    assert_eq!(w.master_store, before);
    assert_eq!(w.edge_store, before);
    assert!(w.edge_running && !w.master_running);
}

#[test]
fn an_opening_window_hands_back() {
    let mut w = World::new(Setup {
        failover: true,
        timeout_ms: 5_000,
        window: Some(("0 2 * * *".into(), 3600)),
    });
    w.advance(BOOT_WAIT_MS);
    w.crash_edge();
    w.advance(6_000);
    w.start_edge();
    w.advance(RECONNECT_MS);
    assert!(w.master_running, "outside the window the master keeps it");
    // Midnight + 2 h: the window opens.
    w.advance(2 * 3_600_000 - (w.now - START_MS));
    w.advance(HANDOVER_MS);
    assert!(w.edge_running && !w.master_running);
}

#[test]
fn a_wall_clock_step_neither_causes_nor_delays_a_takeover() {
    // Forward: an edge unheard for 5 s of a 20 s timeout, and the clock jumps 6 hours.
    let mut w = world(true);
    w.crash_edge();
    w.advance(5_000);
    w.apply(&Op::StepWall(6 * HOUR_MS));
    w.advance(14_000);
    assert!(!w.master_running, "the step did not cause a takeover");
    assert_eq!(w.master_store.owner, Owner::Edge);
    // The edge returns within its timeout: nothing changed owner.
    w.start_edge();
    w.advance(RECONNECT_MS);
    assert!(w.edge_running && !w.master_running);
    assert_eq!(w.master_store, ControlState::default());

    // Backward: the clock jumps 6 hours back while the edge is away; the takeover still
    // comes at the timeout.
    w.crash_edge();
    w.advance(1_000);
    w.apply(&Op::StepWall(-6 * HOUR_MS));
    w.advance(18_900);
    assert!(!w.master_running);
    w.advance(200);
    assert!(w.master_running, "the step did not delay the takeover");

    // And an edge cut off from the master is not hurried or held back either.
    w.start_edge();
    w.advance(RECONNECT_MS * 3);
    assert!(!w.edge_running, "rule 4: the master keeps it");
    w.crash_master();
    w.apply(&Op::StepWall(12 * HOUR_MS));
    w.advance(RECONNECT_MS - 10);
    assert!(!w.edge_running, "it still waits one reconnect period");
    w.advance(20);
    assert!(w.edge_running);
}

#[test]
fn a_grant_the_store_refuses_is_not_acted_on_and_is_tried_again() {
    let mut w = world(true);
    w.crash_edge();
    w.apply(&Op::MasterStoreFails(30_000));
    w.advance(29_000);
    assert!(!w.master_running, "no takeover without its grant stored");
    assert_eq!(w.master_store, ControlState::default());
    assert!(w.issued.is_empty());
    w.advance(2_100);
    assert!(w.master_running, "tried again once the store is back");
    assert_eq!(
        w.master_store,
        ControlState {
            owner: Owner::Master,
            epoch: Epoch(1)
        }
    );

    // The edge's own claim: not run before it is stored.
    let mut w = world(true);
    w.crash_edge();
    w.advance(21_000);
    w.start_edge();
    w.advance(RECONNECT_MS);
    assert!(!w.edge_running);
    w.crash_master();
    w.apply(&Op::EdgeStoreFails(10_000));
    w.advance(9_000);
    assert!(!w.edge_running, "no claim stored, no modules");
    w.advance(2_100);
    assert!(w.edge_running);
    assert_eq!(w.edge_store.owner, Owner::Edge);
}

#[test]
fn the_edge_claims_under_the_last_granted_epoch_and_refuses_it_from_another_holder() {
    let mut edge = EdgeSide::new(
        EdgeId::new("e"),
        ControlState {
            owner: Owner::Master,
            epoch: Epoch(5),
        },
        timing(),
    );
    let at = |ms: u64| Now {
        mono: Mono(ms),
        wall_ms: START_MS + ms,
    };
    edge.handle(at(0), EdgeEvent::LinkUp);
    edge.handle(at(10), EdgeEvent::LinkDown);
    let actions = edge.handle(at(3_010), EdgeEvent::AttemptFailed);
    let claim = ControlState {
        owner: Owner::Edge,
        epoch: Epoch(5),
    };
    assert_eq!(
        actions[0],
        EdgeAction::Persist(claim),
        "no epoch of its own"
    );
    assert!(edge.is_active());
    // The master's grant of that epoch, delivered late, is refused: the same epoch with
    // another holder.
    let stale = edge
        .decide(at(3_100), Owner::Master, Epoch(5), "late")
        .unwrap_err();
    assert_eq!((stale.got, stale.seen), (Epoch(5), Epoch(5)));
    assert!(edge.is_active() && edge.state() == claim);
    // An older one too; the claim confirmed, or a newer grant, are taken.
    assert!(
        edge.decide(at(3_200), Owner::Master, Epoch(4), "older")
            .is_err()
    );
    assert!(
        edge.decide(at(3_300), Owner::Edge, Epoch(5), "confirmed")
            .is_ok()
    );
    let actions = edge
        .decide(at(3_400), Owner::Master, Epoch(6), "newer")
        .unwrap();
    assert_eq!(
        actions[0],
        EdgeAction::Persist(ControlState {
            owner: Owner::Master,
            epoch: Epoch(6)
        }),
        "stored before the stop"
    );
    assert_eq!(actions[1], EdgeAction::StopModules);
}

#[test]
fn the_edge_takes_over_by_its_stated_deadline_even_when_the_last_attempt_hangs() {
    let t = timing();
    assert_eq!(
        t.worst_case_takeover_ms(),
        3 * 1000 + 1000 + RECONNECT_MS + 5000,
        "three missed heartbeats, noticed within one more, the wait, the attempt's deadline"
    );
    let mut edge = EdgeSide::new(
        EdgeId::new("e"),
        ControlState {
            owner: Owner::Master,
            epoch: Epoch(1),
        },
        t,
    );
    let at = |ms: u64| Now {
        mono: Mono(ms),
        wall_ms: START_MS + ms,
    };
    edge.handle(at(0), EdgeEvent::LinkUp);
    // The link dies of silence; the next attempt never reports (it hangs).
    edge.handle(at(100), EdgeEvent::LinkDown);
    let deadline = 100 + t.takeover_after_drop_ms();
    assert_eq!(edge.next_poll(), Some(Mono(deadline)));
    assert!(edge.poll(at(deadline - 1)).is_empty());
    assert!(!edge.is_active());
    let actions = edge.poll(at(deadline));
    assert!(actions.contains(&EdgeAction::StartModules { epoch: Epoch(1) }));
    assert!(edge.is_active());
}

#[test]
fn a_master_that_stopped_for_a_running_edge_waits_the_timeout_even_unstored() {
    let mut w = world(true);
    w.crash_edge();
    w.advance(21_000);
    w.start_edge();
    w.advance(RECONNECT_MS * 3);
    assert!(w.master_running && !w.edge_running, "rule 4");
    let cut = Op::Cut {
        edge_after: 0,
        master_after: 0,
    };
    w.apply(&cut);
    w.advance(RECONNECT_MS + 100);
    assert!(w.edge_running, "the edge took over during the cut");
    // The link returns while the master's store fails: it stops (the edge runs them) but
    // cannot store the edge's grant.
    w.apply(&Op::MasterStoreFails(3_600_000));
    w.apply(&Op::Heal);
    while w.master_running {
        w.advance(10);
    }
    assert!(w.edge_running);
    // Cut again at once, and the store is back: the master must not take the modules
    // back before the edge's timeout.
    w.apply(&cut);
    w.apply(&Op::MasterStoreFails(0));
    w.advance(19_000);
    assert!(!w.master_running, "no takeover before timeout_ms");
    w.advance(2_000);
    assert!(w.master_running, "after it, a failover as usual");
}
