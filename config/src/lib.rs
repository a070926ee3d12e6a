//! Tether's configuration file formats: `master.toml`, `edge.toml` and the site file.
//!
//! Every file is TOML. Unknown keys and bad values are errors that name the file, the key
//! and what was expected, on one line, so an operator can fix them without reading code.
//! Relative paths in a file are resolved against that file's folder, so a configuration
//! works wherever it is started from.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod alerts;
mod cluster;
mod edge;
mod error;
mod limits;
mod load;
mod master;
mod site;

pub use alerts::AlertConfig;
pub use cluster::{ClusterConfig, ClusterTls};
pub use edge::{EdgeConfig, EdgePair, EdgeTls};
pub use error::ConfigError;
pub use limits::{Limits, limit_defaults};
pub use load::load_file;
pub use master::{MasterConfig, MasterTls};
pub use site::{
    Driver, DriverKind, Isolation, MAX_NODES, Module, Repository, RestoreWindow, SiteEdge,
    SiteFile, Standby, System, Transport, check_pair, parse_time_zone,
};

/// The defaults DESIGN.md asks to keep, in one place.
pub mod defaults {
    /// Heartbeat interval of the edge link, each way.
    pub const HEARTBEAT_MS: u64 = 1000;
    /// How long the master waits for edges at boot before taking control of absent ones.
    pub const BOOT_WAIT_MS: u64 = 6000;
    /// How long an edge's link may be down before the master takes its modules.
    pub const EDGE_TIMEOUT_MS: u64 = 20_000;
    /// The edge's reconnect period (jitter is added on top).
    pub const RECONNECT_MS: u64 = 3000;
    /// Largest frame on an authenticated link.
    pub const MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;
    /// A peer that has not authenticated by then is dropped.
    pub const HANDSHAKE_TIMEOUT_MS: u64 = 5000;
    /// Model changes the master keeps in its change log.
    pub const CHANGE_LOG_LIMIT: u64 = 10_000;
    /// How long a module method may run before its caller gets a timeout.
    pub const EXEC_TIMEOUT_MS: u64 = 30_000;
    /// Requests a module runs at once, unless its driver says otherwise.
    pub const MODULE_CONCURRENCY: u32 = 1;
    /// A cluster master's presence lease (etcd).
    pub const LEASE_MS: u64 = 5000;
    /// A site pair: how long the holder must be off the master, and unheard by its
    /// standby, before the standby is granted the modules.
    pub const PAIR_TIMEOUT_MS: u64 = 5000;
    /// A site pair: how long the holder must reach fewer devices than its linked peer
    /// before it hands over (so that a flapping device does not make the pair flap).
    pub const DEVICE_HOLD_DOWN_MS: u64 = 10_000;
}
