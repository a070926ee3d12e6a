//! Who runs an edge location's modules, as sans-I/O state machines (the shape of
//! `quinn-proto`): they take events and the time, and answer actions for their shell to
//! carry out in order. They never touch a socket, a file or the system clock, so a test
//! can drive hours of link cuts, crashes and restore windows in milliseconds.
//!
//! - [`rules`]: the negotiation rules when an edge connects.
//! - [`window`]: restore windows (cron start, length).
//! - [`master`]: the master's side, one machine per edge location.
//! - [`edge`]: the edge's side.

pub mod edge;
pub mod master;
pub mod rules;
pub mod window;

use serde::{Deserialize, Serialize};

pub use crate::protocol::{AuditRecord, ControlOwner as Owner};
pub use edge::{EdgeAction, EdgeEvent, EdgeSide, StaleDecision};
pub use master::{EdgeSettings, MasterAction, MasterEvent, MasterSide, RestoreRefused};
pub use window::Window;

/// Owner and epoch of one edge location, as each side persists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    /// Who runs the modules.
    pub owner: Owner,
    /// Raised on every change of owner; anything carrying an older one is refused.
    pub epoch: u64,
}

impl Default for ControlState {
    /// A new edge location belongs to its edge, at epoch 0.
    fn default() -> Self {
        ControlState {
            owner: Owner::Edge,
            epoch: 0,
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

/// `"edge"` or `"master"`, as the API shows an owner.
pub fn owner_name(owner: Owner) -> &'static str {
    match owner {
        Owner::Edge => "edge",
        Owner::Master => "master",
    }
}
