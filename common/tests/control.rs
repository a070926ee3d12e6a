//! The control state machines of both sides, stepped together in simulated time under
//! random link cuts, crashes, restarts, restore windows, manual restores and time passing.
//! Messages between them travel with a latency and are lost when the link goes down.
//!
//! Asserted at every step: epochs never go back on either side; the master takes control
//! only after the edge was unheard for its timeout with failover on, and gives it back only
//! to a connected edge; the edge takes control alone only after a link loss and one more
//! reconnect period; a side starts its modules while the other runs them only while the
//! link is down (break-before-make otherwise), so both run at once only while the link is
//! cut or within one handover of its return; and once the link is up and quiet both sides
//! agree on owner and epoch, and exactly the owner runs the modules.

use std::collections::VecDeque;

use proptest::prelude::*;
use tether_common::control::{
    ControlState, EdgeAction, EdgeEvent, EdgeReport, EdgeSettings, EdgeSide, MasterAction,
    MasterEvent, MasterSide, Owner, Window,
};
use tether_common::model::RestoreWindow;

const RECONNECT_MS: u64 = 3000;
const LATENCY_MS: u64 = 20;
const BOOT_WAIT_MS: u64 = 6000;
/// A report, a decision and its acknowledgement.
const HANDOVER_MS: u64 = 3 * LATENCY_MS;
/// 2026-11-22T00:00:00Z: windows are evaluated on this simulated wall clock.
const START_MS: u64 = 1_795_305_600_000;

#[derive(Debug, Clone)]
enum ToEdge {
    Decision { owner: Owner, epoch: u64 },
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
    Cut,
    Heal,
    CrashEdge,
    StartEdge,
    CrashMaster,
    StartMaster,
    Restore,
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
    now: u64,
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
    log: Vec<String>,
}

impl World {
    fn new(setup: Setup) -> Self {
        let mut world = World {
            setup,
            now: START_MS,
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
                Window::new(&RestoreWindow {
                    start: start.clone(),
                    length_s: *length_s,
                })
                .unwrap()
            }),
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
        let machine = MasterSide::new("e", self.settings(), self.master_store, self.now);
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
            machine: EdgeSide::new("e", self.edge_store),
            next_attempt: self.now,
        });
        self.edge_lost_at = self.now;
        self.note("edge starts");
    }

    fn crash_master(&mut self) {
        if self.master.take().is_some() {
            self.master_running = false;
            self.note("master crashes");
            self.drop_link(false, true);
        }
    }

    fn crash_edge(&mut self) {
        if self.edge.take().is_some() {
            self.edge_running = false;
            self.note("edge crashes");
            self.drop_link(true, false);
        }
    }

    /// The link goes down; the sides still alive notice.
    fn drop_link(&mut self, tell_master: bool, tell_edge: bool) {
        if self.link_since.take().is_none() {
            return;
        }
        self.to_edge.clear();
        self.to_master.clear();
        self.note("link down");
        if tell_master {
            self.master_lost_at = self.now;
            self.master_event(MasterEvent::LinkDown {
                last_heard_ms: self.now,
            });
        }
        if tell_edge {
            self.edge_lost_at = self.now;
            if let Some(edge) = &mut self.edge {
                edge.next_attempt = self.now + RECONNECT_MS;
            }
            self.edge_event(EdgeEvent::LinkDown);
        }
    }

    // --- feeding the machines and carrying out their actions --------------------------

    fn master_event(&mut self, event: MasterEvent) {
        let now = self.now;
        let Some(master) = &mut self.master else {
            return;
        };
        let actions = master.machine.handle(now, event);
        self.master_actions(actions);
    }

    fn edge_event(&mut self, event: EdgeEvent) {
        let now = self.now;
        let Some(edge) = &mut self.edge else { return };
        let actions = edge.machine.handle(now, event);
        self.edge_actions(actions);
    }

    fn master_actions(&mut self, actions: Vec<MasterAction>) {
        for action in actions {
            self.note(format!("master: {action:?}"));
            match action {
                MasterAction::Persist(state) => {
                    if state.epoch < self.master_store.epoch {
                        self.fail(format!("master epoch went back to {state:?}"));
                    }
                    if state.owner == Owner::Master
                        && self.master_store.owner == Owner::Edge
                        && !(self.setup.failover
                            && !self.link_up()
                            && self.now - self.master_lost_at >= self.setup.timeout_ms)
                    {
                        self.fail("the master took control without a failover timeout".into());
                    }
                    if state.owner == Owner::Edge
                        && self.master_store.owner == Owner::Master
                        && !self.link_up()
                    {
                        self.fail("the master gave control to an edge not connected".into());
                    }
                    self.master_store = state;
                }
                MasterAction::StartModules { .. } => {
                    if self.edge_running && self.link_up() {
                        self.fail("the master started modules the connected edge runs".into());
                    }
                    self.master_running = true;
                }
                MasterAction::StopModules => self.master_running = false,
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
    }

    fn edge_actions(&mut self, actions: Vec<EdgeAction>) {
        for action in actions {
            self.note(format!("edge: {action:?}"));
            match action {
                EdgeAction::Persist(state) => {
                    if state.epoch < self.edge_store.epoch {
                        self.fail(format!("edge epoch went back to {state:?}"));
                    }
                    self.edge_store = state;
                }
                EdgeAction::StartModules { .. } => {
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
    }

    // --- time ----------------------------------------------------------------------

    fn next_due(&self) -> Option<u64> {
        let mut due: Vec<u64> = Vec::new();
        due.extend(self.to_edge.front().map(|(at, _)| *at));
        due.extend(self.to_master.front().map(|(at, _)| *at));
        if let Some(edge) = &self.edge
            && !self.link_up()
        {
            due.push(edge.next_attempt);
        }
        if let Some(master) = &self.master {
            if !master.booted {
                due.push(master.boot_at);
            } else if let Some(at) = master.machine.next_poll(self.now) {
                due.push(at);
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
                    match edge.machine.decide(now, owner, epoch, "decision") {
                        Ok(actions) => {
                            self.edge_actions(actions);
                            self.to_master.push_back((now + LATENCY_MS, ToMaster::Ack));
                        }
                        // The real master closes a link whose edge refuses a decision.
                        Err(_) => self.drop_link(true, true),
                    }
                }
                ToEdge::Ready => self.edge_event(EdgeEvent::MasterReady),
            }
            return;
        }
        if let Some(edge) = &self.edge
            && !self.link_up()
            && edge.next_attempt <= now
        {
            if self.master.is_some() && !self.cut {
                self.link_since = Some(now);
                self.note("link up");
                self.master_event(MasterEvent::LinkUp);
                self.edge_event(EdgeEvent::LinkUp);
            } else {
                self.edge.as_mut().unwrap().next_attempt = now + RECONNECT_MS;
                self.edge_event(EdgeEvent::AttemptFailed);
            }
            return;
        }
        if let Some(master) = &mut self.master {
            if !master.booted && master.boot_at <= now {
                master.booted = true;
                self.note("master booted");
                self.master_event(MasterEvent::Booted);
            } else if master.booted {
                let actions = master.machine.poll(now);
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
        if !quiet || self.now - since < HANDOVER_MS {
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
            Op::Cut => {
                self.cut = true;
                self.drop_link(true, true);
            }
            Op::Heal => self.cut = false,
            Op::CrashEdge => self.crash_edge(),
            Op::StartEdge => self.start_edge(),
            Op::CrashMaster => self.crash_master(),
            Op::StartMaster => self.start_master(),
            Op::Restore => {
                let now = self.now;
                if let Some(master) = &mut self.master
                    && let Ok(actions) = master.machine.restore(now)
                {
                    self.master_actions(actions);
                }
            }
        }
        // Whatever an operation started settles within a handover.
        self.advance(0);
    }

    /// Heal everything, start what is down, and wait: the sides must end up agreeing.
    fn settle(&mut self) {
        self.cut = false;
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
        2 => Just(Op::Cut),
        2 => Just(Op::Heal),
        1 => Just(Op::CrashEdge),
        1 => Just(Op::StartEdge),
        1 => Just(Op::CrashMaster),
        1 => Just(Op::StartMaster),
        1 => Just(Op::Restore),
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
    assert_eq!(w.master_store.epoch, 1);
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
    let actions = w.master.as_mut().unwrap().machine.restore(w.now).unwrap();
    assert_eq!(actions[0], MasterAction::StopModules, "break before make");
    w.master_actions(actions);
    w.advance(HANDOVER_MS);
    assert!(!w.master_running && w.edge_running);
    assert_eq!(w.edge_store.owner, Owner::Edge);
    // 1: the takeover; 2: the edge told of it on reconnect; 3: the restore.
    assert_eq!(w.edge_store.epoch, 3);
}

#[test]
fn a_cut_link_heals_to_the_edge() {
    let mut w = world(true);
    w.apply(&Op::Cut);
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
