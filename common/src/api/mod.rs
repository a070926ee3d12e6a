//! The client API's shell (HTTPS serving, bearer tokens, JSON errors) and the handlers
//! that master and edge both serve.

mod access;
mod audit;
mod error;
mod health;
mod https;
mod link_policy;
mod live;
mod modules;
mod token;
mod ws;

pub use access::{
    Access, Need, PresentedToken, Principal, Role, authorize, need, new_token, token_hash,
};
pub use audit::{audit_entry_json, audit_json, rfc3339};
pub use error::ApiError;
pub use health::{Health, health};
pub use https::{ApiLimits, MAX_HEAD_BYTES, read_body, serve_https};
pub use link_policy::{LinkNeed, link_need, link_target, pin_module};
pub use live::{Live, Overview, live_routes};
pub use modules::{PREFERRED_SERVER, checked_api_url, module_routes, system_routes, system_view};
pub use token::{AdminToken, TokenError};
pub use ws::{Elsewhere, FORWARDED_BY, Upstream, WsRelay};

/// Puts `routes` behind the bearer token and the body limit. The token is checked first,
/// so a client without one never has its body read.
pub fn protect(routes: axum::Router, access: Access, limits: ApiLimits) -> axum::Router {
    use axum::middleware::from_fn_with_state;
    routes
        .layer(from_fn_with_state(limits, read_body))
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body))
        .layer(from_fn_with_state(access, authorize))
}
