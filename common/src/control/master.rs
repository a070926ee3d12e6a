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

use super::rules::{Situation, negotiate};
use super::{AuditRecord, ControlState, EdgeReport, Mono, Now, Owner, Window};

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
        epoch: u64,
    },
    /// The edge's link closed (or died of missed heartbeats).
    LinkDown {
        /// When the edge was last heard, on the monotonic clock.
        last_heard: Mono,
    },
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
    },
    /// Start the edge's modules here, under this epoch.
    StartModules {
        /// The epoch they run under.
        epoch: u64,
    },
    /// Stop the edge's modules here and wait until their devices are disconnected.
    StopModules,
    /// Send a control decision to the edge; its acknowledgement comes back as
    /// [`MasterEvent::Acked`].
    SendDecision {
        /// The owner.
        owner: Owner,
        /// Its epoch.
        epoch: u64,
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
    AlreadyEdge(String),
    /// The edge is not connected, so it could not take the modules.
    #[error("edge {0} is not connected; control can only go back to a connected edge")]
    Offline(String),
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
#[derive(Debug, Clone, Copy)]
struct BeforeIssue {
    state: ControlState,
    running: bool,
    link: Link,
    resume_held: bool,
}

/// The master's control machine for one edge location.
#[derive(Debug, Clone)]
pub struct MasterSide {
    edge_id: String,
    settings: EdgeSettings,
    state: ControlState,
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
    pub fn new(edge_id: &str, settings: EdgeSettings, persisted: ControlState, now: Now) -> Self {
        MasterSide {
            edge_id: edge_id.to_string(),
            settings,
            state: persisted,
            booted: false,
            running: false,
            link: Link::Down {
                last_heard: now.mono,
            },
            resume_held: persisted.owner == Owner::Master,
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

    /// Whether a link from the edge is up.
    pub fn is_connected(&self) -> bool {
        matches!(self.link, Link::Up { .. })
    }

    /// The edge location's id.
    pub fn edge_id(&self) -> &str {
        &self.edge_id
    }

    /// The edge's record changed; the new settings apply from the next poll.
    pub fn set_settings(&mut self, settings: EdgeSettings) {
        self.settings = settings;
    }

    /// Feeds one event; answers what to do.
    pub fn handle(&mut self, now: Now, event: MasterEvent) -> Vec<MasterAction> {
        self.before_issue = None;
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
    pub fn issue_failed(&mut self, now: Now, stored: Option<ControlState>) {
        if let Some(before) = self.before_issue.take() {
            self.state = before.state;
            self.running = before.running;
            self.link = before.link;
            self.resume_held = before.resume_held;
        }
        if let Some(stored) = stored
            && stored != self.state
        {
            // Someone else's grant (or ours, stored after all): decide afresh from it.
            self.state = stored;
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
        if !self.booted {
            return Err(RestoreRefused::Booting);
        }
        if self.state.owner == Owner::Edge {
            return Err(RestoreRefused::AlreadyEdge(self.edge_id.clone()));
        }
        let Link::Up {
            report: Some(report),
            ..
        } = self.link
        else {
            return Err(RestoreRefused::Offline(self.edge_id.clone()));
        };
        let mut actions = Vec::new();
        self.hand_to_edge(now, report, "manual restore", &mut actions);
        Ok(actions)
    }

    /// Acts on the passing of time: the failover timeout and restore windows, and a
    /// decision the store refused before.
    pub fn poll(&mut self, now: Now) -> Vec<MasterAction> {
        self.before_issue = None;
        self.decide(now)
    }

    fn decide(&mut self, now: Now) -> Vec<MasterAction> {
        let mut actions = Vec::new();
        // Running under a grant that is no longer the master's (a store that answered
        // with another's grant): stop at once.
        if self.running && self.state.owner != Owner::Master {
            self.stop(&mut actions);
        }
        if now.mono < self.retry_at {
            return actions;
        }
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
                    && self.state.owner == Owner::Master
                    && self.settings.failover
                    && !self.running =>
            {
                let reason = "the master runs the modules it held before it restarted";
                self.change_owner(now, Owner::Master, reason, None, &mut actions);
                self.start(&mut actions);
                self.resume_held = false;
            }
            // Nobody known to run them (the edge's, or the master's own grant while it
            // had stopped for an edge that ran them): fail over after the timeout.
            Link::Down { last_heard }
                if !self.running
                    && self.settings.failover
                    && now.mono.since(last_heard) >= self.settings.timeout_ms =>
            {
                let reason = format!(
                    "failover: no word from the edge for {} ms (timeout_ms {})",
                    now.mono.since(last_heard),
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

    /// When [`poll`](Self::poll) next has something to do, if ever (a bound: the shell
    /// may poll sooner).
    pub fn next_poll(&self, now: Now) -> Option<Mono> {
        let due = match self.link {
            Link::Up {
                report: Some(_),
                decided: false,
            } => Some(now.mono),
            _ if !self.booted => None,
            Link::Down { .. }
                if self.resume_held
                    && self.state.owner == Owner::Master
                    && self.settings.failover
                    && !self.running =>
            {
                Some(now.mono)
            }
            Link::Down { last_heard } if !self.running && self.settings.failover => {
                Some(last_heard.plus(self.settings.timeout_ms))
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
        due.map(|at| at.max(self.retry_at))
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
            master_loading: !self.booted,
            master_running: self.running,
        });
        // An edge that runs its modules already: stop here at once, whatever the store
        // does (two runners on a live link is the one thing never to allow). Otherwise
        // the grant first, so that a store that fails leaves the master running them.
        if owner == Owner::Edge && self.running && report.controlling {
            self.stop(actions);
        }
        // Both sides already agree: confirm without a new grant, so that a master
        // restart or a reconnect changes nothing.
        let agreed = report.state == self.state && self.state.owner == owner;
        if !agreed {
            self.change_owner(now, owner, rule.reason(), Some(report), actions);
        }
        if owner == Owner::Edge && self.running {
            self.stop(actions);
        }
        self.link = Link::Up {
            report: Some(report),
            decided: true,
        };
        actions.push(MasterAction::SendDecision {
            owner,
            epoch: self.state.epoch,
            reason: rule.reason().to_string(),
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
        actions.push(MasterAction::SendDecision {
            owner: Owner::Edge,
            epoch: self.state.epoch,
            reason: reason.to_string(),
        });
    }

    /// Issues a new grant to `owner` (the epoch above both what is stored and what the
    /// edge reported, should the edge have seen more than this master's store holds), and
    /// audits a change of owner.
    fn change_owner(
        &mut self,
        now: Now,
        owner: Owner,
        reason: &str,
        report: Option<EdgeReport>,
        actions: &mut Vec<MasterAction>,
    ) {
        let before = self.state;
        let seen = report.map_or(0, |r| r.state.epoch);
        let grant = ControlState {
            owner,
            epoch: before.epoch.max(seen) + 1,
        };
        self.before_issue = Some(BeforeIssue {
            state: before,
            running: self.running,
            link: self.link,
            resume_held: self.resume_held,
        });
        self.state = grant;
        actions.push(MasterAction::Issue {
            expected: before,
            grant,
        });
        if before.owner != owner {
            actions.push(MasterAction::Audit(AuditRecord {
                time_ms: now.wall_ms,
                edge: self.edge_id.clone(),
                from: before.owner,
                to: owner,
                epoch: grant.epoch,
                reason: reason.to_string(),
                code: None,
            }));
        }
    }

    fn start(&mut self, actions: &mut Vec<MasterAction>) {
        self.running = true;
        actions.push(MasterAction::StartModules {
            epoch: self.state.epoch,
        });
    }

    fn stop(&mut self, actions: &mut Vec<MasterAction>) {
        self.running = false;
        actions.push(MasterAction::StopModules);
    }
}
