//! The master's side of control for one edge location: boot, the edge's link coming and
//! going, the failover timeout, restore windows and manual restores.
//!
//! A change of owner is break-before-make: handing back to the edge, the master stops
//! its modules first ([`MasterAction::StopModules`] completes before the next action),
//! then persists the new state and sends the decision under a new epoch.

use super::rules::{Situation, negotiate};
use super::{AuditRecord, ControlState, EdgeReport, Owner, Window};

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
        /// When the edge was last heard, unix ms.
        last_heard_ms: u64,
    },
}

/// What the shell must do, in order; each completes before the next begins.
#[derive(Debug, Clone, PartialEq)]
pub enum MasterAction {
    /// Store the state durably.
    Persist(ControlState),
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
    Down { last_heard_ms: u64 },
    /// A link is up; the edge's report once it has come.
    Up { report: Option<EdgeReport> },
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
}

impl MasterSide {
    /// A machine for a master that is booting: it has `persisted` from its store and has
    /// not heard from the edge since `now`.
    pub fn new(edge_id: &str, settings: EdgeSettings, persisted: ControlState, now: u64) -> Self {
        MasterSide {
            edge_id: edge_id.to_string(),
            settings,
            state: persisted,
            booted: false,
            running: false,
            link: Link::Down { last_heard_ms: now },
        }
    }

    /// Owner and epoch as the master sees them.
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
    pub fn handle(&mut self, now: u64, event: MasterEvent) -> Vec<MasterAction> {
        let mut actions = Vec::new();
        match event {
            MasterEvent::Booted => {
                self.booted = true;
                match self.link {
                    // An edge that did not come, whose modules the master ran before it
                    // went down: run them again, fenced by a new epoch.
                    Link::Down { .. } if self.state.owner == Owner::Master => {
                        if self.settings.failover {
                            self.state.epoch += 1;
                            actions.push(MasterAction::Persist(self.state));
                            self.start(&mut actions);
                        }
                    }
                    Link::Up { .. } => actions.push(MasterAction::SendReady),
                    Link::Down { .. } => {}
                }
                // The failover timeout counts from the end of the boot at the earliest.
                if let Link::Down { last_heard_ms } = &mut self.link {
                    *last_heard_ms = (*last_heard_ms).max(now);
                }
            }
            MasterEvent::LinkUp => self.link = Link::Up { report: None },
            MasterEvent::Report(report) => {
                self.link = Link::Up {
                    report: Some(report),
                };
                self.negotiate(now, report, &mut actions);
                if self.booted {
                    actions.push(MasterAction::SendReady);
                }
            }
            MasterEvent::Acked { .. } => {}
            MasterEvent::LinkDown { last_heard_ms } => {
                self.link = Link::Down { last_heard_ms };
            }
        }
        actions.extend(self.poll(now));
        actions
    }

    /// A manual restore: control goes back to the (connected) edge.
    pub fn restore(&mut self, now: u64) -> Result<Vec<MasterAction>, RestoreRefused> {
        if !self.booted {
            return Err(RestoreRefused::Booting);
        }
        if self.state.owner == Owner::Edge {
            return Err(RestoreRefused::AlreadyEdge(self.edge_id.clone()));
        }
        let Link::Up {
            report: Some(report),
        } = self.link
        else {
            return Err(RestoreRefused::Offline(self.edge_id.clone()));
        };
        let mut actions = Vec::new();
        self.hand_to_edge(now, report, "manual restore", &mut actions);
        Ok(actions)
    }

    /// Acts on the passing of time: the failover timeout and restore windows.
    pub fn poll(&mut self, now: u64) -> Vec<MasterAction> {
        let mut actions = Vec::new();
        if !self.booted {
            return actions;
        }
        match self.link {
            Link::Down { last_heard_ms }
                if self.state.owner == Owner::Edge
                    && self.settings.failover
                    && now.saturating_sub(last_heard_ms) >= self.settings.timeout_ms =>
            {
                let reason = format!(
                    "failover: no word from the edge for {} ms (timeout_ms {})",
                    now.saturating_sub(last_heard_ms),
                    self.settings.timeout_ms
                );
                self.change_owner(
                    now,
                    Owner::Master,
                    self.state.epoch + 1,
                    &reason,
                    &mut actions,
                );
                self.start(&mut actions);
            }
            Link::Up {
                report: Some(report),
            } if self.state.owner == Owner::Master && self.window_open(now) => {
                self.hand_to_edge(now, report, "the restore window opened", &mut actions);
            }
            _ => {}
        }
        actions
    }

    /// When [`poll`](Self::poll) next has something to do, if ever (a bound: the shell
    /// may poll sooner).
    pub fn next_poll(&self, now: u64) -> Option<u64> {
        if !self.booted {
            return None;
        }
        match self.link {
            Link::Down { last_heard_ms }
                if self.state.owner == Owner::Edge && self.settings.failover =>
            {
                Some(last_heard_ms.saturating_add(self.settings.timeout_ms))
            }
            Link::Up { report: Some(_) } if self.state.owner == Owner::Master => self
                .settings
                .window
                .as_ref()
                .and_then(|window| window.next_open(now)),
            _ => None,
        }
    }

    fn window_open(&self, now: u64) -> bool {
        self.settings
            .window
            .as_ref()
            .is_some_and(|window| window.is_open(now))
    }

    /// The rules, when an edge has reported on a new link.
    fn negotiate(&mut self, now: u64, report: EdgeReport, actions: &mut Vec<MasterAction>) {
        let (owner, rule) = negotiate(Situation {
            edge_controlling: report.controlling,
            window_open: self.window_open(now),
            master_loading: !self.booted,
            master_running: self.running,
        });
        if owner == Owner::Edge && self.running {
            self.stop(actions);
        }
        // Both sides already agree: confirm without a new epoch, so that a master restart
        // or a reconnect changes nothing.
        let agreed = report.state == self.state && self.state.owner == owner;
        let epoch = if agreed {
            self.state.epoch
        } else {
            self.state.epoch.max(report.state.epoch) + 1
        };
        self.change_owner(now, owner, epoch, rule.reason(), actions);
        actions.push(MasterAction::SendDecision {
            owner,
            epoch,
            reason: rule.reason().to_string(),
        });
    }

    /// Break-before-make towards the edge: stop here, persist, then tell the edge.
    fn hand_to_edge(
        &mut self,
        now: u64,
        report: EdgeReport,
        reason: &str,
        actions: &mut Vec<MasterAction>,
    ) {
        if self.running {
            self.stop(actions);
        }
        let epoch = self.state.epoch.max(report.state.epoch) + 1;
        self.change_owner(now, Owner::Edge, epoch, reason, actions);
        actions.push(MasterAction::SendDecision {
            owner: Owner::Edge,
            epoch,
            reason: reason.to_string(),
        });
    }

    /// Persists a new state (if it is new) and audits a change of owner.
    fn change_owner(
        &mut self,
        now: u64,
        owner: Owner,
        epoch: u64,
        reason: &str,
        actions: &mut Vec<MasterAction>,
    ) {
        let before = self.state;
        let after = ControlState { owner, epoch };
        if after == before {
            return;
        }
        self.state = after;
        actions.push(MasterAction::Persist(after));
        if before.owner != owner {
            actions.push(MasterAction::Audit(AuditRecord {
                time_ms: now,
                edge: self.edge_id.clone(),
                from: before.owner,
                to: owner,
                epoch,
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
