//! Who runs an edge location's modules, as sans-I/O state machines (the shape of
//! `quinn-proto`): they take events and the time, and answer actions for their shell to
//! carry out in order. They never touch a socket, a file or the system clock, so a test
//! can drive hours of link cuts, crashes and restore windows in milliseconds.
//!
//! - [`clock`]: the monotonic clock for intervals, the wall clock for records and windows.
//! - [`rules`]: the negotiation rules when an edge connects.
//! - [`window`]: restore windows (cron start, length).
//! - [`master`]: the master's side, one machine per edge location.
//! - [`edge`]: the edge's side.

pub mod array;
pub mod clock;
pub mod edge;
pub mod lease;
pub mod master;
pub mod pair;
pub mod placement;
pub mod rules;
pub mod window;

use serde::{Deserialize, Serialize};

pub use crate::identity::{EdgeId, Epoch, MasterId, NodeId, UnitId};
pub use crate::protocol::{AuditRecord, ControlOwner as Owner};
pub use clock::{Mono, Now};
pub use edge::{EdgeAction, EdgeEvent, EdgeSide, EdgeTiming, StaleDecision};
pub use master::{
    EdgeSettings, Lease, MasterAction, MasterEvent, MasterSide, PeerView, RestoreRefused,
};
pub use window::Window;

/// A grant: who runs one edge location's modules, under which epoch. The master issues
/// grants, each by a compare-and-set on the one it stored last, so no two grants of a
/// location share an epoch; an edge persists the last grant it was sent, or the claim it
/// made itself while no master was reachable (same epoch, itself as holder: a claim never
/// raises an epoch, so the grant a master issues when it hears the edge again outranks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    /// Who runs the modules.
    pub owner: Owner,
    /// Raised on every change of owner; anything carrying an older one is refused.
    pub epoch: Epoch,
}

impl ControlState {
    /// Whether something carrying `claim` is as new as this grant. An older epoch is
    /// stale; so is an equal epoch with another holder, which can only come from a grant
    /// this side knows is superseded or from a claim made while the sides could not talk.
    /// A claim of no epoch (a client that did not say) is not fenced.
    pub fn admits(&self, claim: Claim) -> bool {
        match claim.epoch {
            None => true,
            Some(epoch) => {
                epoch > self.epoch
                    || (epoch == self.epoch && claim.holder.is_none_or(|h| h == self.owner))
            }
        }
    }
}

/// What a caller or a decision claims of an edge location's grant, to be fenced against
/// the receiver's own view. Clients know epochs only; servers send both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Claim {
    /// The epoch claimed, if any.
    pub epoch: Option<Epoch>,
    /// The holder claimed for it, if known.
    pub holder: Option<Owner>,
}

impl Claim {
    /// A client's claim: an epoch, or nothing.
    pub fn epoch(epoch: Option<Epoch>) -> Claim {
        Claim {
            epoch,
            holder: None,
        }
    }

    /// A server's claim: the whole grant as it sees it.
    pub fn grant(grant: ControlState) -> Claim {
        Claim {
            epoch: Some(grant.epoch),
            holder: Some(grant.owner),
        }
    }
}

impl Default for ControlState {
    /// A new edge location belongs to its edge, at epoch 0.
    fn default() -> Self {
        ControlState {
            owner: Owner::Edge,
            epoch: Epoch::ZERO,
        }
    }
}

/// What an edge tells the master when its link comes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeReport {
    /// Its persisted owner and epoch.
    pub state: ControlState,
    /// Whether its modules are loaded and running now.
    pub controlling: bool,
}

/// A stored grant as one master sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held {
    /// The grant.
    pub grant: ControlState,
    /// For a master's grant: whether it names this master (a master alone: always).
    pub here: bool,
}

/// `"edge"` or `"master"`, as the API shows an owner.
pub fn owner_name(owner: Owner) -> &'static str {
    match owner {
        Owner::Edge => "edge",
        Owner::Master => "master",
    }
}
