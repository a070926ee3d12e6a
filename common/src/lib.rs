//! Tether's shared library. Each part is one concern:
//!
//! - [`protocol`]: message types and the frame codec; no I/O.
//! - [`control`]: who runs an edge's modules: negotiation, failover, restore windows,
//!   epochs, as sans-I/O state machines.
//! - [`link`]: the thin tokio shell around the edge link: TLS, authentication,
//!   multiplexing, heartbeats, reconnects.
//! - [`pki`]: development certificates and secrets.
//! - [`api`]: the HTTPS client API's shell and the handlers both servers serve.
//! - [`identity`]: edge, master and epoch as types.
//! - [`hostile`]: the parsers of untrusted bytes behind one call each, for fuzzing.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod admission;
pub mod alerts;
pub mod api;
pub mod code;
pub mod control;
pub mod hostile;
pub mod identity;
pub mod link;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod protocol;
pub mod proxy;
pub mod rate;
pub mod report;
pub mod runtime;
pub mod shutdown;
pub mod store;

/// Tether's version, reported by `/api/v1/health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
