//! The edge's side of control: report on every new link, obey the master's decisions
//! (refusing stale ones), and claim control itself when the master is lost.
//!
//! The whole of when the edge takes over is stated here, in [`EdgeTiming`]: a silent link
//! is declared dead after three missed heartbeats (noticed within one more heartbeat); one
//! reconnect period (3 s) after a drop the edge tries once more, and that attempt has its
//! handshake deadline; when it fails, or that deadline has passed without a link, the edge
//! runs its modules. The link and the connector are configured from the same numbers.
//! At boot it does not run them before it has either heard the master or failed to reach
//! it twice, so that a restarted edge does not grab modules the master took over while it
//! was gone (rule 4).
//!
//! The edge never issues an epoch: taking control alone it records a claim, under the
//! epoch of the last grant it saw, with itself as holder. The master's next grant, once it
//! hears the edge, outranks it; a decision that carries the claim's epoch with another
//! holder is refused like an older one.

use super::{AuditRecord, Claim, ControlState, EdgeId, EdgeReport, Epoch, Mono, Now, Owner};

/// Lost links or failed attempts, in a row, after which the edge takes control.
pub const LOSSES_BEFORE_TAKEOVER: u32 = 2;
/// Heartbeats missed in a row after which a link is dead.
pub const MISSED_HEARTBEATS: u64 = 3;
/// The wait after a failed attempt gets up to this fraction (1/N) of the reconnect period
/// added as jitter (see [`crate::link::reconnect_delay`]).
pub const RECONNECT_JITTER_DIVISOR: u32 = 6;
/// How long the edge waits before it tries again to store a claim the store refused.
pub const STORE_RETRY_MS: u64 = 1000;

/// The numbers behind the edge's takeover, from its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeTiming {
    /// Interval between heartbeats, each way.
    pub heartbeat_ms: u64,
    /// Period between attempts to reach the master.
    pub reconnect_ms: u64,
    /// Connect, TLS and the secret handshake with one master must finish within this.
    pub handshake_timeout_ms: u64,
    /// The masters one attempt tries, one after another (1 without a cluster).
    pub masters: u64,
}

impl EdgeTiming {
    /// The link's settings for this timing: heartbeats, and dead after
    /// [`MISSED_HEARTBEATS`] of them.
    pub fn link_config(&self, max_frame: usize) -> crate::link::LinkConfig {
        let mut config = crate::link::LinkConfig::with_heartbeat(
            std::time::Duration::from_millis(self.heartbeat_ms),
            max_frame,
        );
        config.dead_after = std::time::Duration::from_millis(self.dead_after_ms());
        config
    }

    /// The link closes when nothing at all has arrived for this long.
    pub fn dead_after_ms(&self) -> u64 {
        MISSED_HEARTBEATS * self.heartbeat_ms
    }

    /// The latest a silent link is noticed after its last frame: the check runs once a
    /// heartbeat.
    pub fn silence_noticed_ms(&self) -> u64 {
        self.dead_after_ms() + self.heartbeat_ms
    }

    /// The jitter added to the wait after a failed attempt, at most (a sixth of the
    /// period), so that many edges retrying a master that is down spread out. The attempt
    /// after a drop has none: its time is part of the takeover's.
    pub fn jitter_max_ms(&self) -> u64 {
        self.reconnect_ms / u64::from(RECONNECT_JITTER_DIVISOR)
    }

    /// The longest one attempt takes: every master tried, each within its deadline. The
    /// master is unreachable when all of them failed in a row.
    pub fn attempt_ms(&self) -> u64 {
        self.masters.max(1) * self.handshake_timeout_ms
    }

    /// After a link drops: one reconnect period, then one attempt within its deadline.
    pub fn takeover_after_drop_ms(&self) -> u64 {
        self.reconnect_ms + self.attempt_ms()
    }

    /// After a first failed attempt (at boot): the next attempt after a period and its
    /// jitter, within its deadline.
    pub fn takeover_after_failed_attempt_ms(&self) -> u64 {
        self.reconnect_ms + self.jitter_max_ms() + self.attempt_ms()
    }

    /// The longest from a silent cut of a working link (the last frame from the master)
    /// to this edge running its modules.
    pub fn worst_case_takeover_ms(&self) -> u64 {
        self.silence_noticed_ms() + self.takeover_after_drop_ms()
    }
}

impl Default for EdgeTiming {
    /// DESIGN.md's defaults: heartbeats every second, 3 s between attempts, 5 s for a
    /// handshake.
    fn default() -> Self {
        EdgeTiming {
            heartbeat_ms: 1000,
            reconnect_ms: 3000,
            handshake_timeout_ms: 5000,
            masters: 1,
        }
    }
}

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
    /// Store the grant (or this edge's own claim) durably. Nothing after this action may
    /// be carried out unless it is stored; if it is not, call
    /// [`EdgeSide::store_failed`].
    Persist(ControlState),
    /// Start this edge's modules under this epoch.
    StartModules {
        /// The epoch they run under.
        epoch: Epoch,
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

/// A decision older than what this edge has seen, or of its epoch with another holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "stale decision {got_owner:?} at epoch {got}: this edge holds {seen_owner:?} at epoch {seen}"
)]
pub struct StaleDecision {
    /// The decision's epoch.
    pub got: Epoch,
    /// The decision's holder.
    pub got_owner: Owner,
    /// The newest epoch the edge has seen.
    pub seen: Epoch,
    /// The holder it has for that epoch.
    pub seen_owner: Owner,
}

/// Where the machine stood before a persist, to go back to if the store refuses.
#[derive(Debug, Clone, Copy)]
struct BeforePersist {
    state: ControlState,
    active: bool,
}

/// The edge's control machine.
#[derive(Debug, Clone)]
pub struct EdgeSide {
    edge_id: EdgeId,
    timing: EdgeTiming,
    state: ControlState,
    active: bool,
    link_up: bool,
    losses: u32,
    /// When the edge takes control if no link has come by then.
    takeover_at: Option<Mono>,
    master_ready: bool,
    before_persist: Option<BeforePersist>,
    /// Nothing is persisted before this (a claim the store refused is tried again later).
    retry_at: Mono,
}

impl EdgeSide {
    /// A machine for an edge that has just started with `persisted` from its replica.
    pub fn new(edge_id: EdgeId, persisted: ControlState, timing: EdgeTiming) -> Self {
        EdgeSide {
            edge_id,
            timing,
            state: persisted,
            active: false,
            link_up: false,
            losses: 0,
            takeover_at: None,
            master_ready: false,
            before_persist: None,
            retry_at: Mono::default(),
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

    /// The timing this machine follows.
    pub fn timing(&self) -> EdgeTiming {
        self.timing
    }

    /// Feeds one link event; answers what to do.
    pub fn handle(&mut self, now: Now, event: EdgeEvent) -> Vec<EdgeAction> {
        self.before_persist = None;
        let mut actions = Vec::new();
        match event {
            EdgeEvent::LinkUp => {
                self.link_up = true;
                self.losses = 0;
                self.takeover_at = None;
                self.master_ready = false;
                actions.push(EdgeAction::SendReport(EdgeReport {
                    state: self.state,
                    controlling: self.active,
                }));
            }
            EdgeEvent::LinkDown | EdgeEvent::AttemptFailed => {
                let dropped = self.link_up;
                self.link_up = false;
                self.master_ready = false;
                self.losses = self.losses.saturating_add(1);
                if self.losses < LOSSES_BEFORE_TAKEOVER && self.takeover_at.is_none() {
                    // The one more attempt must have succeeded by then.
                    let wait = if dropped {
                        self.timing.takeover_after_drop_ms()
                    } else {
                        self.timing.takeover_after_failed_attempt_ms()
                    };
                    self.takeover_at = Some(now.mono.plus(wait));
                }
                if self.losses >= LOSSES_BEFORE_TAKEOVER {
                    self.takeover_at = Some(now.mono);
                }
            }
            EdgeEvent::MasterReady => self.master_ready = self.link_up,
        }
        actions.extend(self.poll(now));
        actions
    }

    /// Acts on the passing of time: the takeover deadline, and a claim the store refused.
    pub fn poll(&mut self, now: Now) -> Vec<EdgeAction> {
        let mut actions = Vec::new();
        let due = self.takeover_at.is_some_and(|at| now.mono >= at);
        if due && !self.link_up && !self.active && now.mono >= self.retry_at {
            self.take_control(now, &mut actions);
        }
        actions
    }

    /// When [`poll`](Self::poll) next has something to do, if ever.
    pub fn next_poll(&self) -> Option<Mono> {
        if self.link_up || self.active {
            return None;
        }
        self.takeover_at.map(|at| at.max(self.retry_at))
    }

    /// A decision from the master; a stale one is refused and changes nothing.
    pub fn decide(
        &mut self,
        now: Now,
        owner: Owner,
        epoch: Epoch,
        reason: &str,
    ) -> Result<Vec<EdgeAction>, StaleDecision> {
        self.before_persist = None;
        if !self
            .state
            .admits(Claim::grant(ControlState { owner, epoch }))
        {
            return Err(StaleDecision {
                got: epoch,
                got_owner: owner,
                seen: self.state.epoch,
                seen_owner: self.state.owner,
            });
        }
        let mut actions = Vec::new();
        let before = self.state;
        let granted = ControlState { owner, epoch };
        if granted != before {
            self.persist(granted, &mut actions);
        }
        if owner == Owner::Master && self.active {
            self.active = false;
            actions.push(EdgeAction::StopModules);
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

    /// The store did not take the last [`EdgeAction::Persist`]; none of the actions after
    /// it were carried out. The machine goes back to where it stood; a claim is tried
    /// again after [`STORE_RETRY_MS`] (a decision is refused, and the master sends it
    /// again on the next link).
    pub fn store_failed(&mut self, now: Now) {
        if let Some(before) = self.before_persist.take() {
            self.state = before.state;
            self.active = before.active;
        }
        self.retry_at = now.mono.plus(STORE_RETRY_MS);
    }

    fn persist(&mut self, state: ControlState, actions: &mut Vec<EdgeAction>) {
        self.before_persist = Some(BeforePersist {
            state: self.state,
            active: self.active,
        });
        self.state = state;
        actions.push(EdgeAction::Persist(state));
    }

    /// Claims control: the epoch of the last grant, this edge as holder.
    fn take_control(&mut self, now: Now, actions: &mut Vec<EdgeAction>) {
        let before = self.state.owner;
        let claim = ControlState {
            owner: Owner::Edge,
            epoch: self.state.epoch,
        };
        if claim != self.state {
            self.persist(claim, actions);
        }
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

    fn audit(&self, now: Now, from: Owner, reason: &str) -> AuditRecord {
        AuditRecord {
            time_ms: now.wall_ms,
            edge: self.edge_id.clone().into(),
            from,
            to: self.state.owner,
            epoch: self.state.epoch,
            reason: reason.to_string(),
            code: None,
        }
    }
}
