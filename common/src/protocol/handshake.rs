use serde::{Deserialize, Serialize};

/// Length of each side's nonce.
pub const NONCE_LEN: usize = 32;
/// A fresh random nonce.
pub type Nonce = [u8; NONCE_LEN];

/// The authentication exchange, the first frames on a new TLS connection:
/// master `Challenge`, edge `Answer`, master `Accepted` or `Refused`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Handshake {
    /// Master to edge: the master's protocol version and a fresh nonce.
    Challenge {
        /// The master's protocol version.
        protocol: u16,
        /// The master's nonce.
        nonce: Nonce,
    },
    /// Edge to master: who it is, its own nonce, and its MAC (see `link::auth`).
    Answer {
        /// The edge's protocol version.
        protocol: u16,
        /// The edge location id.
        edge_id: String,
        /// The edge's nonce.
        nonce: Nonce,
        /// HMAC-SHA256 over both nonces, the id and the TLS exporter value.
        mac: [u8; 32],
    },
    /// Master to edge: the master's own MAC, proving it holds the secret too.
    Accepted {
        /// HMAC-SHA256 under the master's label.
        mac: [u8; 32],
    },
    /// Master to edge: authentication failed; the connection closes.
    Refused {
        /// Why (kept general so that it does not help an attacker).
        reason: String,
    },
}
