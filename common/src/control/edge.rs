//! The edge's side of control: report on every new link, obey the master's decisions
//! (refusing stale ones), and take control itself when the master is lost: after a link
//! drop it waits one reconnect period (3 s) and tries once more; if that fails too, it
//! runs its modules. At boot it does not run them before it has either heard the master
//! or failed to reach it twice, so that a restarted edge does not grab modules the master
//! took over while it was gone (rule 4).

use super::{AuditRecord, ControlState, EdgeReport, Owner};

/// Lost links or failed attempts, in a row, after which the edge takes control.
pub const LOSSES_BEFORE_TAKEOVER: u32 = 2;

/// What happened to the link, as the shell saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeEvent {
    /// An authenticated link to the master is up.
    LinkUp,
    /// The link that was up closed.
    LinkDown,
    /// An attempt to connect failed.
    AttemptFailed,
    /// The master says it has booted.
    MasterReady,
}

/// What the shell must do, in order; each completes before the next begins.
#[derive(Debug, Clone, PartialEq)]
pub enum EdgeAction {
    /// Store the state durably.
    Persist(ControlState),
    /// Start this edge's modules under this epoch.
    StartModules {
        /// The epoch they run under.
        epoch: u64,
    },
    /// Stop them and wait until their devices are disconnected.
    StopModules,
    /// Tell the master where this edge stands.
    SendReport(EdgeReport),
    /// Record a change of owner; `report` when the master should hear of it (the edge
    /// decided it alone), not when the master decided it.
    Audit {
        /// The event.
        record: AuditRecord,
        /// Send it to the master.
        report: bool,
    },
}

/// A decision older than what this edge has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stale epoch {got}: this edge has seen epoch {seen}")]
pub struct StaleDecision {
    /// The decision's epoch.
    pub got: u64,
    /// The newest epoch the edge has seen.
    pub seen: u64,
}

/// The edge's control machine.
#[derive(Debug, Clone)]
pub struct EdgeSide {
    edge_id: String,
    state: ControlState,
    active: bool,
    link_up: bool,
    losses: u32,
    master_ready: bool,
}

impl EdgeSide {
    /// A machine for an edge that has just started with `persisted` from its replica.
    pub fn new(edge_id: &str, persisted: ControlState) -> Self {
        EdgeSide {
            edge_id: edge_id.to_string(),
            state: persisted,
            active: false,
            link_up: false,
            losses: 0,
            master_ready: false,
        }
    }

    /// Owner and epoch as this edge sees them.
    pub fn state(&self) -> ControlState {
        self.state
    }

    /// Whether this edge runs its modules now.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Whether the master said it has booted, on the current link.
    pub fn master_ready(&self) -> bool {
        self.master_ready
    }

    /// Feeds one link event; answers what to do.
    pub fn handle(&mut self, now: u64, event: EdgeEvent) -> Vec<EdgeAction> {
        let mut actions = Vec::new();
        match event {
            EdgeEvent::LinkUp => {
                self.link_up = true;
                self.losses = 0;
                self.master_ready = false;
                actions.push(EdgeAction::SendReport(EdgeReport {
                    state: self.state,
                    controlling: self.active,
                }));
            }
            EdgeEvent::LinkDown | EdgeEvent::AttemptFailed => {
                self.link_up = false;
                self.master_ready = false;
                self.losses = self.losses.saturating_add(1);
                if self.losses >= LOSSES_BEFORE_TAKEOVER && !self.active {
                    self.take_control(now, &mut actions);
                }
            }
            EdgeEvent::MasterReady => self.master_ready = self.link_up,
        }
        actions
    }

    /// A decision from the master; a stale one is refused and changes nothing.
    pub fn decide(
        &mut self,
        now: u64,
        owner: Owner,
        epoch: u64,
        reason: &str,
    ) -> Result<Vec<EdgeAction>, StaleDecision> {
        if epoch < self.state.epoch {
            return Err(StaleDecision {
                got: epoch,
                seen: self.state.epoch,
            });
        }
        let mut actions = Vec::new();
        if owner == Owner::Master && self.active {
            self.active = false;
            actions.push(EdgeAction::StopModules);
        }
        let before = self.state;
        self.state = ControlState { owner, epoch };
        if self.state != before {
            actions.push(EdgeAction::Persist(self.state));
        }
        if before.owner != owner {
            actions.push(EdgeAction::Audit {
                record: self.audit(now, before.owner, reason),
                report: false,
            });
        }
        if owner == Owner::Edge && !self.active {
            self.active = true;
            actions.push(EdgeAction::StartModules { epoch });
        }
        Ok(actions)
    }

    fn take_control(&mut self, now: u64, actions: &mut Vec<EdgeAction>) {
        let before = self.state.owner;
        // A new epoch even when the persisted owner is already the edge: the master may
        // have taken over meanwhile, and whatever it sent under that epoch is now stale.
        self.state = ControlState {
            owner: Owner::Edge,
            epoch: self.state.epoch + 1,
        };
        actions.push(EdgeAction::Persist(self.state));
        if before != Owner::Edge {
            actions.push(EdgeAction::Audit {
                record: self.audit(
                    now,
                    before,
                    "the master is unreachable: the link is lost and one more attempt failed",
                ),
                report: true,
            });
        }
        self.active = true;
        actions.push(EdgeAction::StartModules {
            epoch: self.state.epoch,
        });
    }

    fn audit(&self, now: u64, from: Owner, reason: &str) -> AuditRecord {
        AuditRecord {
            time_ms: now,
            edge: self.edge_id.clone(),
            from,
            to: self.state.owner,
            epoch: self.state.epoch,
            reason: reason.to_string(),
            code: None,
        }
    }
}
