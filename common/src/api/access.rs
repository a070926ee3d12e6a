//! Who may do what: users and roles, and the one table of what each call needs.
//!
//! A request's bearer token is the admin token (the `admin.token` file of this server), or
//! the token of a user of the data model, which keeps only its SHA-256 (`token_hash`).
//! Roles are ordered: a **viewer** reads, an **operator** also runs methods, an **admin**
//! also writes the data model and restores edges. An edge's `admins` (user ids) may,
//! whatever their role, restore that edge and start, stop or expire its systems.
//! No valid token: 401. A valid token without the right: 403.
//!
//! The same policy covers what an edge may ask of the master over its link
//! ([`super::link_need`]): anything about its own site (the modules its location runs or its
//! systems list, its systems), and for anything else only what a user of the master, whose
//! token the edge forwards, may do. The master authorizes that user itself.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::https::ClientConnection;
use super::{AdminToken, ApiError};
use crate::model::Model;
use crate::protocol::OnBehalf;

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads.
    Viewer,
    /// Reads and runs methods.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    /// A role by its name in the data model.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// User id (`admin` for the admin token).
    pub user: String,
    /// Role.
    pub role: Role,
    /// On an edge, the token of a user of the master, to forward with calls for other
    /// sites (the master authorizes the user again). `None` for the edge's own admin
    /// token, which acts on the edge's own site only, and on the master.
    pub on_behalf: Option<OnBehalf>,
}

impl Principal {
    /// Whether this principal may run methods.
    pub fn may_exec(&self) -> bool {
        self.role >= Role::Operator
    }

    fn refuse(&self, what: &str) -> ApiError {
        ApiError::forbidden(format!(
            "user {} ({}) may not {what}",
            self.user,
            self.role.name()
        ))
    }
}

/// What a call needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// At least this role.
    Role(Role),
    /// An admin, or one of this edge's admins.
    EdgeAdmin(String),
    /// An admin, or one of the admins of this system's edge.
    SystemAdmin(String),
}

/// The policy: what each call needs. Reads need a viewer; exec (HTTP, or a WebSocket's
/// exec message, checked by its handler) an operator; restore and a system's start, stop
/// and expire an admin or the edge's admins; everything else (data-model writes, users)
/// an admin.
pub fn need(method: &Method, path: &str) -> Need {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let reading = method == Method::GET || method == Method::HEAD;
    match parts.as_slice() {
        ["api", "v1", "users", ..] => Need::Role(Role::Admin),
        _ if reading => Need::Role(Role::Viewer),
        ["api", "v1", "systems", _, "modules", _, _, "exec"] => Need::Role(Role::Operator),
        ["api", "v1", "edges", edge, "restore"] => Need::EdgeAdmin(edge.to_string()),
        ["api", "v1", "systems", system, "start" | "stop" | "expire"] => {
            Need::SystemAdmin(system.to_string())
        }
        _ => Need::Role(Role::Admin),
    }
}

/// A token's SHA-256 in hex, as a user record keeps it.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random user token.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
    format!("ttu_{}", hex::encode(bytes))
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the access check reads: the admin token and the current model (users, edges'
/// admins, systems' edges).
#[derive(Clone)]
pub struct Access {
    admin: Arc<AdminToken>,
    model: Arc<dyn Fn() -> Arc<Model> + Send + Sync>,
    /// Whether users' tokens are kept with their principal, to forward (an edge).
    forwards: bool,
    /// The hashes of the other admin tokens taken here (the other masters' of a cluster).
    other_admins: Option<Arc<dyn Fn() -> Vec<String> + Send + Sync>>,
}

impl Access {
    /// Checks against `admin` and the users of the model `model` gives.
    pub fn new(
        admin: Arc<AdminToken>,
        model: impl Fn() -> Arc<Model> + Send + Sync + 'static,
    ) -> Self {
        Access {
            admin,
            model: Arc::new(model),
            forwards: false,
            other_admins: None,
        }
    }

    /// A master of a cluster: the other masters' admin tokens (their hashes, as `hashes`
    /// gives them) are admin tokens here too.
    pub fn with_other_admins(
        mut self,
        hashes: impl Fn() -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        self.other_admins = Some(Arc::new(hashes));
        self
    }

    /// An edge's check: a user's principal keeps the user's token, which the edge
    /// forwards with calls for other sites so that the master authorizes the user.
    pub fn forwarding_users(mut self) -> Self {
        self.forwards = true;
        self
    }

    /// The principal a token stands for.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        let another_admin = || {
            self.other_admins.as_ref().is_some_and(|hashes| {
                let hash = token_hash(token);
                hashes()
                    .iter()
                    .any(|other| same(other.as_bytes(), hash.as_bytes()))
            })
        };
        if self.admin.matches(token) || another_admin() {
            return Some(Principal {
                user: "admin".into(),
                role: Role::Admin,
                on_behalf: None,
            });
        }
        let hash = token_hash(token);
        let model = (self.model)();
        let user = model
            .users
            .values()
            .find(|user| same(user.token_hash.as_bytes(), hash.as_bytes()))?;
        Some(Principal {
            user: user.id.clone(),
            role: Role::parse(&user.role)?,
            on_behalf: self.forwards.then(|| OnBehalf(token.to_string())),
        })
    }

    /// Whether `principal` has what `need` asks.
    pub fn authorize(&self, principal: &Principal, need: &Need) -> Result<(), ApiError> {
        if principal.role == Role::Admin {
            return Ok(());
        }
        let model = (self.model)();
        let edge_admin = |edge: &str| {
            model
                .edges
                .get(edge)
                .is_some_and(|record| record.admins.contains(&principal.user))
        };
        match need {
            Need::Role(role) if principal.role >= *role => Ok(()),
            Need::Role(Role::Operator) => Err(principal.refuse("run methods")),
            Need::Role(_) => Err(principal.refuse("change the data model or users")),
            Need::EdgeAdmin(edge) if edge_admin(edge) => Ok(()),
            Need::EdgeAdmin(edge) => Err(principal.refuse(&format!("restore edge {edge}"))),
            Need::SystemAdmin(system) => {
                let edge = model.systems.get(system).and_then(|s| s.edge.clone());
                match edge {
                    Some(edge) if edge_admin(&edge) => Ok(()),
                    _ => Err(principal.refuse(&format!("start or stop system {system}"))),
                }
            }
        }
    }
}

/// The token a client presented, kept with its request for what must present it again on
/// the client's behalf (a WebSocket command sent on to the master that serves its module).
#[derive(Clone)]
pub struct PresentedToken(pub String);

impl std::fmt::Debug for PresentedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresentedToken(..)")
    }
}

/// The bearer token of a request; on the WebSocket route also `?access_token=`, since a
/// browser cannot set headers on a WebSocket.
fn presented(request: &Request) -> Option<String> {
    if let Some(header) = request.headers().get(AUTHORIZATION) {
        return header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(|token| token.trim().to_string());
    }
    if request.uri().path() == "/api/v1/ws" {
        return request.uri().query().and_then(|query| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix("access_token="))
                .map(str::to_string)
        });
    }
    None
}

/// Middleware: 401 without a valid token, 403 without the right; otherwise the request
/// goes on with its [`Principal`] in its extensions, and its connection counts as
/// authenticated (it leaves the table of pending connections).
pub async fn authorize(State(access): State<Access>, mut request: Request, next: Next) -> Response {
    let Some(token) = presented(&request) else {
        let refused = ApiError::unauthorized("an `Authorization: Bearer TOKEN` header is required");
        return refuse(request, refused).await;
    };
    let Some(principal) = access.authenticate(&token) else {
        return refuse(
            request,
            ApiError::unauthorized("the bearer token is not valid"),
        )
        .await;
    };
    if let Some(connection) = request.extensions().get::<Arc<ClientConnection>>() {
        connection.authenticated();
    }
    let need = need(request.method(), request.uri().path());
    if let Err(refused) = access.authorize(&principal, &need) {
        return refuse(request, refused).await;
    }
    request.extensions_mut().insert(principal);
    request.extensions_mut().insert(PresentedToken(token));
    next.run(request).await
}

/// The most of a refused request's body read (and thrown away) before the refusal.
const REFUSED_DRAIN_BYTES: usize = 64 * 1024;
/// How long reading it may take.
const REFUSED_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// Answers `refused`, after reading a small body to its end: an HTTP/2 client whose
/// request body is left unread gets its stream reset, and often sees that reset instead of
/// the 401 or 403. A body larger than one flow-control window is not read (the client
/// cannot have sent more of it anyway), so an unauthenticated client makes the server
/// read at most this much.
async fn refuse(request: Request, refused: ApiError) -> Response {
    if request.method() != axum::http::Method::GET && request.method() != axum::http::Method::HEAD {
        let body = request.into_body();
        let _ = tokio::time::timeout(
            REFUSED_DRAIN_TIME,
            axum::body::to_bytes(body, REFUSED_DRAIN_BYTES),
        )
        .await;
    }
    refused.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_table() {
        let get = Method::GET;
        let post = Method::POST;
        let cases = [
            (&get, "/api/v1/edges", Need::Role(Role::Viewer)),
            (&get, "/api/v1/ws", Need::Role(Role::Viewer)),
            (&get, "/api/v1/users", Need::Role(Role::Admin)),
            (
                &post,
                "/api/v1/systems/r/modules/Display/1/exec",
                Need::Role(Role::Operator),
            ),
            (
                &post,
                "/api/v1/edges/e/restore",
                Need::EdgeAdmin("e".into()),
            ),
            (
                &post,
                "/api/v1/systems/r/stop",
                Need::SystemAdmin("r".into()),
            ),
            (&post, "/api/v1/modules", Need::Role(Role::Admin)),
            (&Method::PUT, "/api/v1/edges/e", Need::Role(Role::Admin)),
            (
                &Method::DELETE,
                "/api/v1/systems/r",
                Need::Role(Role::Admin),
            ),
        ];
        for (method, path, want) in cases {
            assert_eq!(need(method, path), want, "{method} {path}");
        }
    }
}
