//! The master's side of control for one edge location: boot, the edge's link coming and
//! going, the failover timeout, restore windows and manual restores.
//!
//! Every change of owner is a new grant, issued first ([`MasterAction::Issue`], a
//! compare-and-set on the stored grant) and acted on only once it is stored: the shell
//! carries out the actions after an `Issue` only when the store took it, and otherwise
//! tells the machine ([`MasterSide::issue_failed`]), which goes back to where it stood and
//! tries again after [`ISSUE_RETRY_MS`]. A change of owner is break-before-make: handing
//! back to the edge, the master stops its modules ([`MasterAction::StopModules`] completes
//! before the next action) before it sends the decision.
//!
//! Intervals (the failover timeout, retries) are measured on the monotonic clock of
//! [`Now`]; the wall clock serves restore windows and audit records only.
//!
//! Among several masters (DESIGN.md, "Several masters") each runs one machine per unit,
//! fed what it knows of the others ([`PeerView`], from etcd), the grants they issue
//! ([`MasterEvent::Granted`]) and its own lease ([`Lease`]):
//! - the master that holds the edge's link decides for it by the rules above;
//! - an edge whose link no master holds is failed over, after its timeout counted from
//!   when its last link ended, only by the master the rendezvous hash picks
//!   ([`PeerView::fails_over`]), and only when no master runs it;
//! - a master runs a unit only under its own grant and while its lease allows
//!   ([`Lease::allows`]); it says so before starting ([`MasterAction::ClaimRunning`], a key
//!   on its lease) and withdraws it after stopping, and a decision that another master
//!   must stop first waits until that master's claim is gone (break-before-make between
//!   masters: stopped, or its lease expired).
//!
//! A master alone has the default view: it fails every edge over, nobody else links or
//! runs anything, and its lease never ends.

use super::rules::{Situation, negotiate};
use super::{AuditRecord, ControlState, EdgeReport, Epoch, Held, Mono, Now, Owner, Window};
use crate::identity::UnitId;

/// How long the machine waits before it tries again to issue a grant the store refused.
pub const ISSUE_RETRY_MS: u64 = 1000;

/// An edge location's control settings, from its record.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    /// Whether the master takes the modules when the edge is gone.
    pub failover: bool,
    /// How long the edge may be unheard before that.
    pub timeout_ms: u64,
    /// When control goes back to a connected edge by itself.
    pub window: Option<Window>,
}

/// What this master knows of the other masters, for one unit (from etcd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    /// This master is the one the rendezvous hash of the edge id picks among the live
    /// masters: the one that fails the edge over.
    pub fails_over: bool,
    /// Another master holds the edge's link now.
    pub linked_elsewhere: bool,
    /// When the edge's last link to another master ended, as this master learned it.
    pub link_ended: Option<Mono>,
    /// Another master says it runs the unit's modules (its claim, on its lease).
    pub running_elsewhere: bool,
}

impl PeerView {
    /// A master alone.
    pub const ALONE: PeerView = PeerView {
        fails_over: true,
        linked_elsewhere: false,
        link_ended: None,
        running_elsewhere: false,
    };
}

impl Default for PeerView {
    fn default() -> Self {
        PeerView::ALONE
    }
}

/// Until when this master may run units: its presence lease, as it can know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lease {
    /// A master alone: no lease, no end.
    #[default]
    Alone,
    /// Units must be stopped by then (the lease's end less the time a stop takes).
    Until(Mono),
    /// No lease (cut off from etcd, or not joined yet): nothing may run.
    Lost,
}

impl Lease {
    /// Whether units may run at `now`.
    pub fn allows(self, now: Mono) -> bool {
        match self {
            Lease::Alone => true,
            Lease::Until(until) => now < until,
            Lease::Lost => false,
        }
    }
}

/// What happened, as the shell saw it.
#[derive(Debug, Clone)]
pub enum MasterEvent {
    /// The master finished booting (the boot wait ended).
    Booted,
    /// An authenticated link from the edge is up; its report follows.
    LinkUp,
    /// The edge said where it stands (on each new link).
    Report(EdgeReport),
    /// The edge acknowledged a decision: it has stopped or started its modules.
    Acked {
        /// The decision's epoch.
        epoch: Epoch,
    },
    /// The edge's link closed (or died of missed heartbeats).
    LinkDown {
        /// When the edge was last heard, on the monotonic clock.
        last_heard: Mono,
    },
    /// What this master knows of the others changed.
    Peers(PeerView),
    /// The stored grant changed, issued by another master (learned from the store).
    Granted {
        /// The grant.
        grant: ControlState,
        /// For a master's grant: whether it names this master.
        here: bool,
    },
    /// This master's lease changed.
    Lease(Lease),
}

/// What the shell must do, in order; each completes before the next begins.
#[derive(Debug, Clone, PartialEq)]
pub enum MasterAction {
    /// Store `grant` durably if, and only if, the stored grant is still `expected` (and
    /// `grant`'s epoch is above it). Nothing after this action may be carried out unless
    /// the store took it; if it did not, call [`MasterSide::issue_failed`].
    Issue {
        /// The grant the machine believes stored.
        expected: ControlState,
        /// The new grant.
        grant: ControlState,
        /// For a master's grant: it names this master (`false`: the master that holds
        /// the expected grant keeps it, under the new epoch).
        here: bool,
    },
    /// Check that `grant` is still the one stored before telling the edge of it again (a
    /// decision confirming a grant sends no new one; among several masters the grant may
    /// have changed since this master last heard). Like an `Issue`, what follows is
    /// carried out only if it holds; if not, call [`MasterSide::issue_failed`].
    Confirm {
        /// The grant the machine believes stored.
        grant: ControlState,
    },
    /// Say, under this master's lease, that it runs the unit (before starting it);
    /// like an `Issue`, what follows is carried out only once it is stored.
    ClaimRunning,
    /// Withdraw that claim (after stopping).
    ReleaseRunning,
    /// Start the edge's modules here, under this epoch.
    StartModules {
        /// The epoch they run under.
        epoch: Epoch,
    },
    /// Stop the edge's modules here and wait until their devices are disconnected.
    StopModules,
    /// Send a control decision to the edge; its acknowledgement comes back as
    /// [`MasterEvent::Acked`].
    SendDecision {
        /// The owner.
        owner: Owner,
        /// Its epoch.
        epoch: Epoch,
        /// Why.
        reason: String,
    },
    /// Tell the edge the master has booted.
    SendReady,
    /// Record a change of owner.
    Audit(AuditRecord),
}

/// Why a manual restore was not done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreRefused {
    /// The edge already controls its modules.
    #[error("edge {0} already controls its modules")]
    AlreadyEdge(UnitId),
    /// The edge is not connected, so it could not take the modules.
    #[error("edge {0} is not connected; control can only go back to a connected edge")]
    Offline(UnitId),
    /// The master has not finished booting.
    #[error("the master is still booting")]
    Booting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No link; the edge was last heard at this time.
    Down { last_heard: Mono },
    /// A link is up; the edge's report once it has come, and whether the master has
    /// answered it with a decision.
    Up {
        report: Option<EdgeReport>,
        decided: bool,
    },
}

/// Where the machine stood before it issued a grant, to go back to if the store refuses.
#[derive(Debug, Clone)]
struct BeforeIssue {
    state: ControlState,
    here: bool,
    running: bool,
    link: Link,
    resume_held: bool,
    pending: Option<Pending>,
}

/// A decision for the edge that waits until another master has stopped the modules.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    owner: Owner,
    epoch: Epoch,
    reason: String,
    /// Released only on a view of the store at least this new (the grant this master
    /// issued over another master's: an older view may not show that master's claim).
    view_from: Epoch,
}

/// The master's control machine for one unit: an edge location, or (in a cluster) a
/// system of no edge, which has no link and is failed over at once.
#[derive(Debug, Clone)]
pub struct MasterSide {
    unit: UnitId,
    settings: EdgeSettings,
    state: ControlState,
    /// For a master's grant: whether it is this master's.
    here: bool,
    peers: PeerView,
    lease: Lease,
    /// A decision to send once no other master runs the modules.
    pending: Option<Pending>,
    /// The newest grant epoch the store's view has shown this master.
    seen: Epoch,
    /// The grant the last issue replaced was another master's.
    replaced_other: bool,
    booted: bool,
    running: bool,
    link: Link,
    /// The master held the modules when it went down and has not run them or heard the
    /// edge since: it runs them again once booted, without waiting for the timeout.
    resume_held: bool,
    /// Set when the last batch of actions issued a grant.
    before_issue: Option<BeforeIssue>,
    /// Nothing is issued before this (a grant the store refused is tried again later).
    retry_at: Mono,
}

impl MasterSide {
    /// A machine for a master that is booting: it has `persisted` from its store and has
    /// not heard from the edge since `now`.
    pub fn new(unit: UnitId, settings: EdgeSettings, persisted: ControlState, now: Now) -> Self {
        MasterSide {
            peers: PeerView::ALONE,
            lease: Lease::Alone,
            ..Self::in_cluster(unit, settings, (persisted, true), now)
        }
    }

    /// A machine for a master of a cluster: `stored` is the grant stored, and whether (as a
    /// master's grant) it names this master. Until told otherwise ([`MasterEvent::Lease`],
    /// [`MasterEvent::Peers`]) it has no lease and fails nothing over.
    pub fn in_cluster(
        unit: UnitId,
        settings: EdgeSettings,
        (persisted, here): (ControlState, bool),
        now: Now,
    ) -> Self {
        MasterSide {
            unit,
            settings,
            state: persisted,
            here,
            // Nothing is known of the others, and nothing may run, until told.
            peers: PeerView {
                fails_over: false,
                ..PeerView::ALONE
            },
            lease: Lease::Lost,
            pending: None,
            seen: persisted.epoch,
            replaced_other: false,
            booted: false,
            running: false,
            link: Link::Down {
                last_heard: now.mono,
            },
            resume_held: persisted.owner == Owner::Master && here,
            before_issue: None,
            retry_at: Mono::default(),
        }
    }

    /// Owner and epoch as the master sees them (the grant stored last).
    pub fn state(&self) -> ControlState {
        self.state
    }

    /// Whether the master runs the edge's modules now.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// For a master's grant: whether it is this master's.
    pub fn holds_here(&self) -> bool {
        self.state.owner == Owner::Master && self.here
    }

    /// Whether a link from the edge is up.
    pub fn is_connected(&self) -> bool {
        matches!(self.link, Link::Up { .. })
    }

    /// The unit this machine decides for.
    pub fn unit(&self) -> &UnitId {
        &self.unit
    }

    /// The edge's record changed; the new settings apply from the next poll.
    pub fn set_settings(&mut self, settings: EdgeSettings) {
        self.settings = settings;
    }

    /// Feeds one event; answers what to do.
    pub fn handle(&mut self, now: Now, event: MasterEvent) -> Vec<MasterAction> {
        self.before_issue = None;
        self.replaced_other = false;
        let mut actions = Vec::new();
        let reported = matches!(event, MasterEvent::Report(_));
        match event {
            MasterEvent::Booted => {
                self.booted = true;
                if let Link::Up { .. } = self.link {
                    actions.push(MasterAction::SendReady);
                }
                // The failover timeout counts from the end of the boot at the earliest.
                if let Link::Down { last_heard } = &mut self.link {
                    *last_heard = (*last_heard).max(now.mono);
                }
            }
            MasterEvent::LinkUp => {
                self.link = Link::Up {
                    report: None,
                    decided: false,
                }
            }
            MasterEvent::Report(report) => {
                self.link = Link::Up {
                    report: Some(report),
                    decided: false,
                };
            }
            MasterEvent::Acked { .. } => {}
            MasterEvent::LinkDown { last_heard } => {
                self.link = Link::Down { last_heard };
                // Nobody to tell any more; the next link negotiates afresh.
                self.pending = None;
            }
            MasterEvent::Peers(view) => {
                // Another master started or stopped running the modules: what the rules
                // decided for a linked edge may no longer hold (one that died running
                // them leaves them to nobody once its claim expires).
                if view.running_elsewhere != self.peers.running_elsewhere
                    && let Link::Up {
                        report: Some(report),
                        decided: true,
                    } = self.link
                {
                    self.link = Link::Up {
                        report: Some(report),
                        decided: false,
                    };
                }
                self.peers = view;
            }
            MasterEvent::Lease(lease) => self.lease = lease,
            MasterEvent::Granted { grant, here } => {
                self.seen = self.seen.max(grant.epoch);
                // A new grant to the edge was decided by the master holding its link:
                // word from the edge, so the failover timeout counts from now.
                if grant.owner == Owner::Edge
                    && grant.epoch > self.state.epoch
                    && let Link::Down { last_heard } = &mut self.link
                {
                    *last_heard = (*last_heard).max(now.mono);
                }
                if grant.epoch > self.state.epoch {
                    self.state = grant;
                    self.here = here;
                    self.pending = None;
                    // Someone else decided: tell a linked edge what stands now.
                    if let Link::Up {
                        report: Some(report),
                        ..
                    } = self.link
                    {
                        self.link = Link::Up {
                            report: Some(report),
                            decided: false,
                        };
                    }
                }
            }
        }
        // Decisions are all made by `decide`, from where things stand: the same path for
        // a first try and for a retry after the store refused a grant.
        actions.extend(self.decide(now));
        if reported && self.booted {
            actions.push(MasterAction::SendReady);
        }
        actions
    }

    /// The store did not take the grant the last batch issued (it failed, or the stored
    /// grant was not the one expected: `stored` when the store said what it holds). None
    /// of the actions after the `Issue` were carried out; the machine goes back to where
    /// it stood and tries again after [`ISSUE_RETRY_MS`].
    pub fn issue_failed(&mut self, now: Now, stored: Option<Held>) {
        if let Some(before) = self.before_issue.take() {
            self.state = before.state;
            self.here = before.here;
            self.running = before.running;
            self.link = before.link;
            self.resume_held = before.resume_held;
            self.pending = before.pending;
        }
        if let Some(stored) = stored
            && (stored.grant != self.state || stored.here != self.here)
        {
            // Someone else's grant (or ours, stored after all): decide afresh from it.
            self.state = stored.grant;
            self.here = stored.here;
            self.pending = None;
            if let Link::Up {
                report: Some(report),
                ..
            } = self.link
            {
                self.link = Link::Up {
                    report: Some(report),
                    decided: false,
                };
            }
        }
        self.retry_at = now.mono.plus(ISSUE_RETRY_MS);
    }

    /// A manual restore: control goes back to the (connected) edge.
    pub fn restore(&mut self, now: Now) -> Result<Vec<MasterAction>, RestoreRefused> {
        self.before_issue = None;
        self.replaced_other = false;
        if !self.booted {
            return Err(RestoreRefused::Booting);
        }
        if self.state.owner == Owner::Edge {
            return Err(RestoreRefused::AlreadyEdge(self.unit.clone()));
        }
        let Link::Up {
            report: Some(report),
            ..
        } = self.link
        else {
            return Err(RestoreRefused::Offline(self.unit.clone()));
        };
        let mut actions = Vec::new();
        self.hand_to_edge(now, report, "manual restore", &mut actions);
        Ok(actions)
    }

    /// Acts on the passing of time: the failover timeout and restore windows, and a
    /// decision the store refused before.
    pub fn poll(&mut self, now: Now) -> Vec<MasterAction> {
        self.before_issue = None;
        self.replaced_other = false;
        self.decide(now)
    }

    fn decide(&mut self, now: Now) -> Vec<MasterAction> {
        let mut actions = Vec::new();
        // Running under a grant that is no longer this master's (a store that answered
        // with another's grant, another master's grant), or past what the lease allows:
        // stop at once.
        if self.running && (!self.holds_here() || !self.lease.allows(now.mono)) {
            self.stop(&mut actions);
        }
        // A decision that waited for another master to stop (stored already: sending it
        // does not wait for a retry).
        if let Some(pending) = self.pending.take() {
            if self.peers.running_elsewhere || self.seen < pending.view_from {
                self.pending = Some(pending);
            } else {
                actions.push(MasterAction::SendDecision {
                    owner: pending.owner,
                    epoch: pending.epoch,
                    reason: pending.reason,
                });
            }
        }
        if now.mono < self.retry_at {
            return actions;
        }
        let may_run = self.lease.allows(now.mono)
            && !self.peers.running_elsewhere
            && !self.peers.linked_elsewhere;
        match self.link {
            Link::Up {
                report: Some(report),
                decided: false,
            } => self.negotiate(now, report, &mut actions),
            _ if !self.booted => {}
            // An edge that did not come, whose modules the master ran before it went
            // down: run them again at once, under a new grant.
            Link::Down { .. }
                if self.resume_held
                    && self.holds_here()
                    && self.settings.failover
                    && !self.running
                    && may_run =>
            {
                let reason = "the master runs the modules it held before it restarted";
                self.change_owner(now, Owner::Master, reason, None, &mut actions);
                self.start(&mut actions);
                self.resume_held = false;
            }
            // Nobody known to run them (the edge's, or a master's grant while no master
            // runs them): the master the hash picks fails over after the timeout, counted
            // from when the edge's last link (here or elsewhere) ended.
            Link::Down { last_heard }
                if !self.running
                    && self.settings.failover
                    && self.peers.fails_over
                    && may_run
                    && now.mono.since(self.unheard_since(last_heard))
                        >= self.settings.timeout_ms =>
            {
                let unheard = now.mono.since(self.unheard_since(last_heard));
                let reason = format!(
                    "failover: no word from the edge for {unheard} ms (timeout_ms {})",
                    self.settings.timeout_ms
                );
                self.change_owner(now, Owner::Master, &reason, None, &mut actions);
                self.start(&mut actions);
            }
            Link::Up {
                report: Some(report),
                decided: true,
            } if self.state.owner == Owner::Master && self.window_open(now) => {
                self.hand_to_edge(now, report, "the restore window opened", &mut actions);
            }
            _ => {}
        }
        actions
    }

    /// The last moment the edge was heard of: by this master, or as the end of its link
    /// to another.
    fn unheard_since(&self, last_heard: Mono) -> Mono {
        self.peers
            .link_ended
            .map_or(last_heard, |ended| ended.max(last_heard))
    }

    /// When [`poll`](Self::poll) next has something to do, if ever (a bound: the shell
    /// may poll sooner).
    pub fn next_poll(&self, now: Now) -> Option<Mono> {
        // Running on a lease: stop by its end; running where it may not: stop now.
        let lease_end = match self.lease {
            _ if self.running && (!self.holds_here() || !self.lease.allows(now.mono)) => {
                Some(now.mono)
            }
            Lease::Until(until) if self.running => Some(until),
            _ => None,
        };
        let pending = self
            .pending
            .as_ref()
            .filter(|p| !self.peers.running_elsewhere && self.seen >= p.view_from)
            .map(|_| now.mono);
        // What would let this master run the modules; without it nothing is due until
        // an event changes it.
        let may_run = self.lease.allows(now.mono)
            && !self.peers.running_elsewhere
            && !self.peers.linked_elsewhere;
        let due = match self.link {
            Link::Up {
                report: Some(_),
                decided: false,
            } => Some(now.mono),
            _ if !self.booted => None,
            Link::Down { .. }
                if self.resume_held
                    && self.holds_here()
                    && self.settings.failover
                    && !self.running
                    && may_run =>
            {
                Some(now.mono)
            }
            Link::Down { last_heard }
                if !self.running && self.settings.failover && self.peers.fails_over && may_run =>
            {
                Some(
                    self.unheard_since(last_heard)
                        .plus(self.settings.timeout_ms),
                )
            }
            Link::Up {
                report: Some(_), ..
            } if self.state.owner == Owner::Master => self
                .settings
                .window
                .as_ref()
                .and_then(|window| window.next_open(now.wall_ms))
                .map(|wall| now.mono_at_wall(wall)),
            _ => None,
        };
        let due = due.map(|at| at.max(self.retry_at));
        [due, lease_end, pending].into_iter().flatten().min()
    }

    fn window_open(&self, now: Now) -> bool {
        self.settings
            .window
            .as_ref()
            .is_some_and(|window| window.is_open(now.wall_ms))
    }

    /// The rules, when an edge has reported on a new link.
    fn negotiate(&mut self, now: Now, report: EdgeReport, actions: &mut Vec<MasterAction>) {
        // The edge is heard: the rules decide from here, not what was held before.
        self.resume_held = false;
        let (owner, rule) = negotiate(Situation {
            edge_controlling: report.controlling,
            window_open: self.window_open(now),
            // A master still loading does not take the modules from one running them.
            master_loading: !self.booted && !self.runs_elsewhere_under_its_grant(),
            // This master, or the master whose grant stands (another's lingering claim
            // under a grant no longer its own is a master stopping).
            master_running: self.running || self.runs_elsewhere_under_its_grant(),
        });
        // An edge that runs its modules already: stop here at once, whatever the store
        // does (two runners on a live link is the one thing never to allow). Otherwise
        // the grant first, so that a store that fails leaves the master running them.
        if owner == Owner::Edge && self.running && report.controlling {
            self.stop(actions);
        }
        // The grant stands as it is when it has the owner decided and the edge can take
        // it (it has seen no later epoch): a master restart or a reconnect changes
        // nothing. Otherwise a new one; a master's new grant stays with the master that
        // runs the modules (this one, or another).
        let agreed = self.state.owner == owner
            && (report.state == self.state || report.state.epoch < self.state.epoch);
        if agreed {
            // Still stored? (Among several masters it may have changed unheard.)
            self.before_issue = Some(self.before());
            actions.push(MasterAction::Confirm { grant: self.state });
        } else {
            let here = owner == Owner::Master && !self.runs_elsewhere_under_its_grant();
            self.issue(now, owner, here, rule.reason(), Some(report), actions);
        }
        if owner == Owner::Edge && self.running {
            self.stop(actions);
        }
        self.link = Link::Up {
            report: Some(report),
            decided: true,
        };
        self.decision(owner, rule.reason(), actions);
        self.report_follows(owner);
    }

    /// Once it has a decision, the edge stands where the decision says: what the rules are
    /// judged on if something else (another master's grant or claim) calls for deciding
    /// again, rather than what it reported when its link came up.
    fn report_follows(&mut self, owner: Owner) {
        if let Link::Up {
            report: Some(_),
            decided,
        } = self.link
        {
            self.link = Link::Up {
                report: Some(EdgeReport {
                    state: self.state,
                    controlling: owner == Owner::Edge,
                }),
                decided,
            };
        }
    }

    /// Another master runs the modules under the grant that stands (its own).
    fn runs_elsewhere_under_its_grant(&self) -> bool {
        self.peers.running_elsewhere && self.state.owner == Owner::Master && !self.here
    }

    /// Sends the decision standing now, or holds it back while another master still runs
    /// the modules and the edge is to start them.
    fn decision(&mut self, owner: Owner, reason: &str, actions: &mut Vec<MasterAction>) {
        let replaced_other = std::mem::take(&mut self.replaced_other);
        // A decision made again for the same grant keeps the view it waits for.
        let waited = self
            .pending
            .as_ref()
            .filter(|p| p.epoch == self.state.epoch)
            .map_or(Epoch::ZERO, |p| p.view_from);
        let view_from = if replaced_other {
            self.state.epoch
        } else {
            waited
        };
        if owner == Owner::Edge && (self.peers.running_elsewhere || view_from > self.seen) {
            self.pending = Some(Pending {
                owner,
                epoch: self.state.epoch,
                reason: reason.to_string(),
                view_from,
            });
            return;
        }
        self.pending = None;
        actions.push(MasterAction::SendDecision {
            owner,
            epoch: self.state.epoch,
            reason: reason.to_string(),
        });
    }

    /// Towards the edge: a new grant, then stop here, then tell the edge.
    fn hand_to_edge(
        &mut self,
        now: Now,
        report: EdgeReport,
        reason: &str,
        actions: &mut Vec<MasterAction>,
    ) {
        self.change_owner(now, Owner::Edge, reason, Some(report), actions);
        if self.running {
            self.stop(actions);
        }
        self.decision(Owner::Edge, reason, actions);
        self.report_follows(Owner::Edge);
    }

    /// Issues a new grant to `owner` (a master's: to this master), and audits a change of
    /// owner.
    fn change_owner(
        &mut self,
        now: Now,
        owner: Owner,
        reason: &str,
        report: Option<EdgeReport>,
        actions: &mut Vec<MasterAction>,
    ) {
        self.issue(now, owner, true, reason, report, actions);
    }

    /// Issues a new grant to `owner` (for a master's: to this master if `here`, else to
    /// the master that holds the stored one), the epoch above both what is stored and
    /// what the edge reported (should the edge have seen more than this master's store
    /// holds), and audits a change of owner.
    fn issue(
        &mut self,
        now: Now,
        owner: Owner,
        here: bool,
        reason: &str,
        report: Option<EdgeReport>,
        actions: &mut Vec<MasterAction>,
    ) {
        let before = self.state;
        let seen = report.map_or(Epoch::ZERO, |r| r.state.epoch);
        let grant = ControlState {
            owner,
            epoch: before.epoch.max(seen).next(),
        };
        // Another master may run under the grant replaced, and claim to only a moment
        // after it (the claim goes with its grant, but this master's view may predate
        // both): the edge hears of the new grant only once a view as new as it shows no
        // other master's claim.
        self.replaced_other = before.owner == Owner::Master && !self.here;
        self.before_issue = Some(self.before());
        self.state = grant;
        // Another master keeps its grant only when it held the one replaced.
        self.here = if owner == Owner::Master && !here {
            false
        } else {
            here || owner == Owner::Edge
        };
        actions.push(MasterAction::Issue {
            expected: before,
            grant,
            here: owner == Owner::Master && here,
        });
        if before.owner != owner {
            actions.push(MasterAction::Audit(AuditRecord {
                time_ms: now.wall_ms,
                edge: self.unit.clone(),
                from: before.owner,
                to: owner,
                epoch: grant.epoch,
                reason: reason.to_string(),
                code: None,
            }));
        }
    }

    /// Where the machine stands now, to come back to if the store refuses what follows.
    fn before(&self) -> BeforeIssue {
        BeforeIssue {
            state: self.state,
            here: self.here,
            running: self.running,
            link: self.link,
            resume_held: self.resume_held,
            pending: self.pending.clone(),
        }
    }

    fn start(&mut self, actions: &mut Vec<MasterAction>) {
        self.running = true;
        actions.push(MasterAction::ClaimRunning);
        actions.push(MasterAction::StartModules {
            epoch: self.state.epoch,
        });
    }

    fn stop(&mut self, actions: &mut Vec<MasterAction>) {
        self.running = false;
        actions.push(MasterAction::StopModules);
        actions.push(MasterAction::ReleaseRunning);
    }
}
