//! The other side: where a call goes when its module does not run here.
//!
//! A runtime answers for the modules it runs. For any other module of its model it asks
//! its [`Remote`] (set by the server: the edge link, seen from either end; see
//! [`crate::proxy`]), so that a client's call, a binding, and a logic module's `system(...)`
//! call all reach the module wherever it runs. A call that arrived over a link names that
//! link in `via`, and is never sent back over it: a call crosses at most two links
//! (edge → master → another edge), and two sides that disagree for a moment about who runs
//! a module answer "not here" instead of passing the call back and forth.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::{DebugLine, ExecError};
use crate::control::Claim;
use crate::identity::EdgeId;
use crate::protocol::{ModuleRef, OnBehalf};

/// Where a call comes from, as far as routing and the far side's authorization need to
/// know.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The link the call arrived on (an edge id on the master, `master` on an edge): it
    /// may go on over another link, never back over this one.
    pub via: Option<String>,
    /// The client it is made for, when this side passes client calls on to the master
    /// for units outside its own site (an edge's users): the master authorizes that
    /// client itself. `None` for this server's own callers (scripts, its admin token),
    /// which reach no further than this side's own units.
    pub on_behalf: Option<OnBehalf>,
}

impl Origin {
    /// A call made on this side: by a script, or by a client whose token the far side
    /// would not know.
    pub fn local() -> Self {
        Origin::default()
    }

    /// A call that arrived over the link named `via`.
    pub fn link(via: &str) -> Self {
        Origin {
            via: Some(via.to_string()),
            on_behalf: None,
        }
    }

    /// A client's call, with the token to forward for it (if this side forwards any).
    pub fn client(on_behalf: Option<OnBehalf>) -> Self {
        Origin {
            via: None,
            on_behalf,
        }
    }
}

/// A call for a module that runs on the other side.
#[derive(Debug, Clone)]
pub struct RemoteCall {
    /// The module, as clients address it.
    pub module: ModuleRef,
    /// The module's edge location (`None`: a module of the master).
    pub edge: Option<EdgeId>,
    /// Where the call comes from.
    pub origin: Origin,
    /// What the caller claims of the module's edge location's grant, to be fenced where
    /// it runs.
    pub claim: Claim,
    /// How long the caller waits.
    pub timeout: Duration,
}

/// A method's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    /// The result.
    pub value: Value,
    /// `master` or `edge:ID`: the side whose module ran it.
    pub executed_by: String,
}

/// What a status watch delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusEvent {
    /// The whole map: first, and again whenever changes may have been missed (a lag, or
    /// the module started running somewhere else).
    Map(Map<String, Value>),
    /// One value changed.
    Value(String, Value),
}

/// What can be done to a control system as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemAction {
    /// Run its modules again.
    Start,
    /// Stop its modules (their devices disconnected) until started.
    Stop,
    /// Drop what is cached about it (module lookups), so it is read afresh.
    ExpireCache,
}

/// The other side, as the runtime reaches it. Every method fails fast with
/// [`ExecError::Unavailable`] when the other side cannot be reached, and with
/// [`ExecError::NotHere`] when the call would go back where it came from.
pub trait Remote: Send + Sync {
    /// Runs a method.
    fn exec(
        &self,
        call: RemoteCall,
        method: String,
        args: Vec<Value>,
    ) -> BoxFuture<'static, Result<Executed, ExecError>>;

    /// A status map.
    fn status(&self, call: RemoteCall)
    -> BoxFuture<'static, Result<Map<String, Value>, ExecError>>;

    /// The recent debug lines.
    fn debug_lines(
        &self,
        call: RemoteCall,
    ) -> BoxFuture<'static, Result<Vec<DebugLine>, ExecError>>;

    /// The status map and its changes until the module stops running there (or the link
    /// goes): the receiver then ends.
    fn watch_status(
        &self,
        call: RemoteCall,
    ) -> BoxFuture<'static, Result<mpsc::Receiver<StatusEvent>, ExecError>>;

    /// The recent debug lines and the new ones, until the module stops running there.
    fn watch_debug(
        &self,
        call: RemoteCall,
    ) -> BoxFuture<'static, Result<mpsc::Receiver<DebugLine>, ExecError>>;

    /// Starts, stops or expires a system on the side that runs it; answers that side.
    fn system_action(
        &self,
        system: String,
        edge: Option<EdgeId>,
        origin: Origin,
        action: SystemAction,
    ) -> BoxFuture<'static, Result<String, ExecError>>;

    /// The other side's client API address, when it controls `system` and a client
    /// would do better to ask it directly.
    fn preferred_server(&self, system: &str) -> Option<String>;

    /// Whether the other side holds every system (the master, seen from an edge): calls
    /// for systems this side does not know go there.
    fn holds_every_system(&self) -> bool;
}
