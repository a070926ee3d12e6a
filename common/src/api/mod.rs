//! The client API's shell (HTTPS serving, bearer tokens, JSON errors) and the handlers
//! that master and edge both serve.

mod access;
mod audit;
mod error;
mod health;
mod https;
mod live;
mod modules;
mod token;
mod ws;

pub use access::{Access, Need, Principal, Role, authorize, need, new_token, token_hash};
pub use audit::{audit_json, rfc3339};
pub use error::ApiError;
pub use health::{Health, health};
pub use https::{ApiLimits, MAX_HEAD_BYTES, read_body, serve_https};
pub use live::{Live, Overview, live_routes};
pub use modules::{PREFERRED_SERVER, module_routes, system_routes, system_view};
pub use token::{AdminToken, TokenError};
