//! `[limits]` in `master.toml` and `edge.toml`: what one client of the API may take before
//! it is cut off, and, on the master, how many edge-link connections it holds at once.
//! Everything here bounds what a peer can make a server hold before (or without)
//! authenticating.

use std::path::Path;

use serde::Deserialize;

use crate::ConfigError;
use crate::load::check_range;

/// The `[limits]` table; every key has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// API connections served at once; further clients wait in the kernel's accept queue.
    pub api_connections: u64,
    /// The largest request body the API reads; a larger one is answered 413.
    pub api_body_bytes: u64,
    /// A client gets this long for its TLS handshake, for each request's headers (and to
    /// send the next request on a kept-alive connection), and for a request's body. An
    /// HTTP/2 connection with no request open for this long ends.
    pub client_timeout_ms: u64,
    /// API connections that have not yet made a request with a valid token, at once;
    /// when full, the oldest of them is dropped for a new one.
    pub api_pending: u64,
    /// A new connection on either port must send its first bytes within this.
    pub first_byte_timeout_ms: u64,
    /// Connections not yet authenticated from one address (an IPv4 address or an IPv6
    /// /64), per port; the oldest is dropped for a new one. Raise it for a master behind
    /// a load balancer or NAT, where every peer has the same address.
    pub pending_per_address: u64,
    /// Master only: authenticated edge links at once. An edge that authenticates over the
    /// cap is turned away until a link ends.
    pub max_links: u64,
    /// Master only: edge-link handshakes in progress at once (each bounded by
    /// `handshake_timeout_ms`); when full, the oldest is dropped for a new one.
    pub max_pending_handshakes: u64,
    /// Master only: the most bytes one driver repository's files may hold.
    pub repository_bytes: u64,
}

/// The defaults, sized for a master with ten thousand edges and a few thousand clients.
pub mod limit_defaults {
    /// API connections at once.
    pub const API_CONNECTIONS: u64 = 4096;
    /// Request body bytes (the largest record, a driver with its settings, is a few KiB).
    pub const API_BODY_BYTES: u64 = 1024 * 1024;
    /// Per TLS handshake, request head and request body.
    pub const CLIENT_TIMEOUT_MS: u64 = 10_000;
    /// API connections not yet authenticated.
    pub const API_PENDING: u64 = 1024;
    /// From accept to the first bytes.
    pub const FIRST_BYTE_TIMEOUT_MS: u64 = 3_000;
    /// Unauthenticated connections per address and port.
    pub const PENDING_PER_ADDRESS: u64 = 16;
    /// Edge-link connections at once.
    pub const MAX_LINKS: u64 = 16_384;
    /// Edge-link handshakes at once.
    pub const MAX_PENDING_HANDSHAKES: u64 = 256;
    /// A driver repository's files (scripts are a few KiB each).
    pub const REPOSITORY_BYTES: u64 = 64 << 20;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            api_connections: limit_defaults::API_CONNECTIONS,
            api_body_bytes: limit_defaults::API_BODY_BYTES,
            client_timeout_ms: limit_defaults::CLIENT_TIMEOUT_MS,
            api_pending: limit_defaults::API_PENDING,
            first_byte_timeout_ms: limit_defaults::FIRST_BYTE_TIMEOUT_MS,
            pending_per_address: limit_defaults::PENDING_PER_ADDRESS,
            max_links: limit_defaults::MAX_LINKS,
            max_pending_handshakes: limit_defaults::MAX_PENDING_HANDSHAKES,
            repository_bytes: limit_defaults::REPOSITORY_BYTES,
        }
    }
}

impl Limits {
    pub(crate) fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        check_range(
            file,
            "limits.api_connections",
            self.api_connections,
            1..=1_000_000,
        )?;
        check_range(
            file,
            "limits.api_body_bytes",
            self.api_body_bytes,
            1024..=1 << 30,
        )?;
        check_range(
            file,
            "limits.client_timeout_ms",
            self.client_timeout_ms,
            100..=600_000,
        )?;
        check_range(file, "limits.api_pending", self.api_pending, 1..=1_000_000)?;
        check_range(
            file,
            "limits.first_byte_timeout_ms",
            self.first_byte_timeout_ms,
            100..=600_000,
        )?;
        check_range(
            file,
            "limits.pending_per_address",
            self.pending_per_address,
            1..=1_000_000,
        )?;
        check_range(file, "limits.max_links", self.max_links, 1..=1_000_000)?;
        check_range(
            file,
            "limits.repository_bytes",
            self.repository_bytes,
            1024..=1 << 34,
        )?;
        check_range(
            file,
            "limits.max_pending_handshakes",
            self.max_pending_handshakes,
            1..=self.max_links.max(1),
        )
    }
}
