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
        | Request::AuditEvents { .. }
        | Request::NodeReport(_)
        | Request::ArraySlot { .. } => LinkNeed::Own,
        Request::PairGrant { .. } => LinkNeed::Never("a pair grant"),
        Request::ControlDecision { .. } => LinkNeed::Never("a control decision"),
        Request::MasterReady => LinkNeed::Never("a master-ready notice"),
        Request::ModelChanges(_) => LinkNeed::Never("data-model changes"),
        Request::RepositoryUpdate { .. } => LinkNeed::Never("a repository update"),
        Request::LiveReload { .. } => LinkNeed::Never("a live reload"),
    }
}

/// Names by id the module a request addresses by system, name and index, as `model`
/// resolves it: the policy judges that module, and the runtime then runs that same module
/// even if its own view of the model is a moment behind.
pub fn pin_module(model: &Model, body: &mut Request) {
    let at = match body {
        Request::Execute { module, .. }
        | Request::StatusRequest { module }
        | Request::DebugRead { module }
        | Request::StatusSubscribe { module }
        | Request::DebugSubscribe { module }
        | Request::DebugUnsubscribe { module } => module,
        _ => return,
    };
    if at.id.is_none()
        && let Some(module) = model.system_module(&at.system, &at.name, at.index)
    {
        at.id = Some(module.id.clone());
    }
}

/// What a request over a link asks, for a refusal's message: `exec power on room-201
/// Display 1`.
pub fn link_target(body: &Request) -> String {
    let module = |at: &ModuleRef| match &at.id {
        Some(id) if at.system.is_empty() => format!("module {id}"),
        Some(id) => format!("{} {} {} (module {id})", at.system, at.name, at.index),
        None => format!("{} {} {}", at.system, at.name, at.index),
    };
    match body {
        Request::Execute {
            module: at, method, ..
        } => format!("exec {method} on {}", module(at)),
        Request::StatusRequest { module: at } => format!("read the status of {}", module(at)),
        Request::StatusSubscribe { module: at } => {
            format!("follow the status of {}", module(at))
        }
        Request::DebugRead { module: at } | Request::DebugSubscribe { module: at } => {
            format!("read the debug log of {}", module(at))
        }
        Request::DebugUnsubscribe { module: at } => {
            format!("stop the debug log of {}", module(at))
        }
        Request::StartSystem { system } => format!("start system {system}"),
        Request::StopSystem { system } => format!("stop system {system}"),
        Request::ExpireSystemCache { system } => format!("expire system {system}"),
        _ => "a request".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ControlOwner, EntityKind, Json};

    /// e1: room r1 with its display d1 and a shared module s1 of no edge; e2: room r2 with
    /// d2; the master's hall h with its lobby display l.
    fn model() -> Model {
        let mut model = Model::default();
        for (kind, id, json) in [
            (
                EntityKind::Repository,
                "core",
                r#"{"id":"core","path":"/d"}"#,
            ),
            (
                EntityKind::Driver,
                "p",
                r#"{"id":"p","repository":"core","file":"p.rhai"}"#,
            ),
            (EntityKind::Edge, "e1", r#"{"id":"e1"}"#),
            (EntityKind::Edge, "e2", r#"{"id":"e2"}"#),
            (
                EntityKind::Module,
                "d1",
                r#"{"id":"d1","driver":"p","name":"Display","edge":"e1"}"#,
            ),
            (
                EntityKind::Module,
                "d2",
                r#"{"id":"d2","driver":"p","name":"Display","edge":"e2"}"#,
            ),
            (
                EntityKind::Module,
                "s1",
                r#"{"id":"s1","driver":"p","name":"Shared"}"#,
            ),
            (
                EntityKind::Module,
                "l",
                r#"{"id":"l","driver":"p","name":"Lobby"}"#,
            ),
            (
                EntityKind::System,
                "r1",
                r#"{"id":"r1","edge":"e1","modules":["d1","s1"]}"#,
            ),
            (
                EntityKind::System,
                "r2",
                r#"{"id":"r2","edge":"e2","modules":["d2"]}"#,
            ),
            (
                EntityKind::System,
                "h",
                r#"{"id":"h","modules":["l","s1"]}"#,
            ),
        ] {
            model.set_json(kind, id, Some(json)).unwrap();
        }
        model
    }

    fn exec(at: ModuleRef) -> Request {
        Request::Execute {
            module: at,
            method: "m".into(),
            args: Json::null(),
            epoch: None,
            holder: None,
        }
    }

    fn by_id(system: &str, id: &str) -> ModuleRef {
        ModuleRef {
            id: Some(id.into()),
            ..ModuleRef::new(system, "Display", 1)
        }
    }

    #[test]
    fn the_link_policy_table() {
        let model = model();
        let operator = LinkNeed::User(Need::Role(Role::Operator));
        let viewer = LinkNeed::User(Need::Role(Role::Viewer));
        let status = |at| Request::StatusRequest { module: at };
        let stop = |system: &str| Request::StopSystem {
            system: system.into(),
        };
        let cases = [
            (
                "its own room's display",
                exec(ModuleRef::new("r1", "Display", 1)),
                LinkNeed::Own,
            ),
            (
                "a shared module its room lists",
                exec(ModuleRef::new("r1", "Shared", 1)),
                LinkNeed::Own,
            ),
            (
                "the same, from the master's hall",
                status(ModuleRef::new("h", "Shared", 1)),
                LinkNeed::Own,
            ),
            (
                "another site's display",
                exec(ModuleRef::new("r2", "Display", 1)),
                operator.clone(),
            ),
            (
                "another site's module by id, named in its own room",
                exec(by_id("r1", "d2")),
                operator.clone(),
            ),
            (
                "the master's lobby",
                status(ModuleRef::new("h", "Lobby", 1)),
                viewer.clone(),
            ),
            (
                "a module that does not exist",
                status(ModuleRef::new("r1", "Nothing", 1)),
                viewer,
            ),
            ("stop its own room", stop("r1"), LinkNeed::Own),
            (
                "stop another site's room",
                stop("r2"),
                LinkNeed::User(Need::SystemAdmin("r2".into())),
            ),
            (
                "stop the master's hall",
                stop("h"),
                LinkNeed::User(Need::SystemAdmin("h".into())),
            ),
            (
                "sync",
                Request::SyncRequest {
                    model_id: 0,
                    since_version: 0,
                },
                LinkNeed::Own,
            ),
            (
                "blobs",
                Request::FetchBlobs { hashes: Vec::new() },
                LinkNeed::Own,
            ),
            (
                "a control decision",
                Request::ControlDecision {
                    owner: ControlOwner::Master,
                    epoch: crate::identity::Epoch(1),
                    reason: String::new(),
                },
                LinkNeed::Never("a control decision"),
            ),
        ];
        for (what, request, want) in cases {
            assert_eq!(link_need(&model, "e1", &request), want, "{what}");
        }
        assert_eq!(
            link_target(&exec(ModuleRef::new("r2", "Display", 1))),
            "exec m on r2 Display 1"
        );
        assert_eq!(
            link_target(&exec(by_id("r1", "d2"))),
            "exec m on r1 Display 1 (module d2)"
        );
        // Pinned: what the policy judged is what runs.
        let mut pinned = exec(ModuleRef::new("r2", "Display", 1));
        pin_module(&model, &mut pinned);
        assert_eq!(link_need(&model, "e1", &pinned), operator);
        assert!(
            matches!(&pinned, Request::Execute { module, .. } if module.id.as_deref() == Some("d2"))
        );
    }
}
