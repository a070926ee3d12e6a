//! The link half of the policy (see [`super::access`]): what an edge may ask of the
//! master over its link. An authenticated edge is a peer that may be hostile; it speaks
//! for its own site only.

use super::access::{Need, Role};
use crate::model::Model;
use crate::protocol::{ModuleRef, Request};

/// What a request over edge `edge`'s link needs, by the link policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkNeed {
    /// It concerns the edge's own site (or the edge itself): served.
    Own,
    /// It concerns another site: served only for a user of the master the edge forwards
    /// it for, who has this need.
    User(Need),
    /// No edge may send it (a master's message); says what it is.
    Never(&'static str),
}

/// The link policy: what edge `edge` may ask of the master. Calls on a module of its
/// slice (one its location runs, or one its systems list: a room's logic calling a shared
/// module of the master) and actions on its own systems are its own; a call on any other
/// module or system needs a forwarded user with the same need as on the client API
/// (exec: operator; reads and streams: viewer; start, stop, expire: an admin or the
/// system's edge's admins). Reports, sync, blob fetches and audit events are its own (their
/// handlers keep them to the edge's own records); what only a master sends, never.
pub fn link_need(model: &Model, edge: &str, body: &Request) -> LinkNeed {
    let module = |at: &ModuleRef, need: Role| {
        let target = match &at.id {
            Some(id) => model.modules.get(id),
            None => model.system_module(&at.system, &at.name, at.index),
        };
        match target {
            Some(module) if model.in_slice(edge, module) => LinkNeed::Own,
            // Unknown targets too: the edge learns nothing about other sites.
            _ => LinkNeed::User(Need::Role(need)),
        }
    };
    let system = |id: &str| match model.systems.get(id) {
        Some(system) if system.edge.as_deref() == Some(edge) => LinkNeed::Own,
        _ => LinkNeed::User(Need::SystemAdmin(id.to_string())),
    };
    match body {
        Request::Execute { module: at, .. } => module(at, Role::Operator),
        Request::StatusRequest { module: at }
        | Request::DebugRead { module: at }
        | Request::StatusSubscribe { module: at }
        | Request::DebugSubscribe { module: at }
        | Request::DebugUnsubscribe { module: at } => module(at, Role::Viewer),
        Request::StartSystem { system: id }
        | Request::StopSystem { system: id }
        | Request::ExpireSystemCache { system: id } => system(id),
        Request::SyncRequest { .. }
        | Request::ControlReport { .. }
        | Request::Hello { .. }
        | Request::FetchBlobs { .. }
        | Request::AuditEvents { .. } => LinkNeed::Own,
        Request::ControlDecision { .. } => LinkNeed::Never("a control decision"),
        Request::MasterReady => LinkNeed::Never("a master-ready notice"),
        Request::ModelChanges(_) => LinkNeed::Never("data-model changes"),
        Request::RepositoryUpdate { .. } => LinkNeed::Never("a repository update"),
        Request::LiveReload { .. } => LinkNeed::Never("a live reload"),
    }
}

/// What a request over a link is about, for a refusal's message: `exec of room-201
/// Display 1`.
pub fn link_target(body: &Request) -> String {
    let module = |at: &ModuleRef| match &at.id {
        Some(id) => format!("module {id}"),
        None => format!("{} {} {}", at.system, at.name, at.index),
    };
    match body {
        Request::Execute {
            module: at, method, ..
        } => format!("exec {method} on {}", module(at)),
        Request::StatusRequest { module: at } | Request::StatusSubscribe { module: at } => {
            format!("the status of {}", module(at))
        }
        Request::DebugRead { module: at }
        | Request::DebugSubscribe { module: at }
        | Request::DebugUnsubscribe { module: at } => format!("the debug log of {}", module(at)),
        Request::StartSystem { system } => format!("start system {system}"),
        Request::StopSystem { system } => format!("stop system {system}"),
        Request::ExpireSystemCache { system } => format!("expire system {system}"),
        _ => "a request".to_string(),
    }
}
