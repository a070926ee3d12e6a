//! The records of the data model (DESIGN.md, "Data model"), as the API and the change log
//! carry them: JSON objects with defaults, so a client writes only what it means.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tether_config::defaults;

pub use tether_config::{DriverKind, Isolation, RestoreWindow, Standby, Transport};

use crate::identity::EdgeId;
use crate::protocol::EntityKind;

/// Settings: a JSON object of key to value.
pub type Settings = Map<String, Value>;

/// A record of one entity kind.
pub trait Record: Serialize + serde::de::DeserializeOwned + Clone {
    /// The kind this record is.
    const KIND: EntityKind;
    /// Its id.
    fn id(&self) -> &str;
}

/// An edge location (a site).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeRecord {
    /// Id; the edge's `edge_id`.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Whether the master takes the edge's modules when the edge is gone.
    #[serde(default = "yes")]
    pub failover: bool,
    /// How long the edge may be unreachable before the master takes over.
    #[serde(default = "edge_timeout_ms")]
    pub timeout_ms: u64,
    /// Automatic restore window.
    #[serde(default)]
    pub restore_window: Option<RestoreWindow>,
    /// The IANA time zone the restore window is read in; UTC when absent. (Left out
    /// when absent, so records without one read as before on edges of older versions.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Standby level on the master.
    #[serde(default)]
    pub standby: Standby,
    /// User ids allowed to restore this edge and start or stop its systems.
    #[serde(default)]
    pub admins: Vec<String>,
    /// The driver code the edge runs, as it last reported it: its repository's commit
    /// (`id@commit,...` for several repositories). Set by the master.
    #[serde(default)]
    pub commit: Option<String>,
    /// The master-side file holding the edge's shared secret (hex). The secret itself
    /// never enters the model, so it is never replicated, listed or logged.
    #[serde(default)]
    pub secret_file: Option<String>,
    /// A site pair's nodes, the first preferred (none: the location is one node, with
    /// the location's id). Each node's secret is `ID.secret` beside `secret_file`.
    /// The pair keys below are left out when absent, so that a record of one node reads
    /// as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// A pair: how long the holder must be gone before its standby is granted the
    /// modules (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair_timeout_ms: Option<u64>,
    /// A pair: what a holder cut off from its peer and every master does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
    /// A pair: with no master reachable, a standby takes over after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unwitnessed_takeover_ms: Option<u64>,
    /// A pair: how long the holder must reach fewer devices than its peer before it
    /// hands over (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_hold_down_ms: Option<u64>,
}

impl EdgeRecord {
    /// Whether the location is a site pair (it has nodes).
    pub fn is_pair(&self) -> bool {
        !self.nodes.is_empty()
    }
}

/// A driver repository: a folder of scripts, or a git working copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryRecord {
    /// Id.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Folder on the master.
    pub path: String,
    /// The commit the master serves: git's commit hash, or for a plain folder the
    /// SHA-256 of its files' paths and contents. Set by the master.
    #[serde(default)]
    pub commit: Option<String>,
}

/// A driver: a script's metadata. The script is `file` of `repository` at the
/// repository's commit; the code travels apart from the model (see `crate::code`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverRecord {
    /// Id.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Repository id.
    pub repository: String,
    /// Script file inside the repository.
    pub file: String,
    /// Device or logic.
    #[serde(default)]
    pub kind: DriverKind,
    /// How the driver reaches its device.
    #[serde(default)]
    pub transport: Transport,
    /// Port used when a module names none.
    #[serde(default)]
    pub default_port: Option<u16>,
    /// Settings every module starts from.
    #[serde(default)]
    pub default_settings: Settings,
    /// `tcp`: frames end with this string.
    #[serde(default)]
    pub delimiter: Option<String>,
    /// `tcp`: frames are this many bytes.
    #[serde(default)]
    pub frame_length: Option<u32>,
    /// Requests a module of this driver runs at once.
    #[serde(default = "concurrency")]
    pub concurrency: u32,
    /// How long a method may run before its caller gets a timeout.
    #[serde(default = "exec_timeout_ms")]
    pub timeout_ms: u64,
    /// A collector array: its modules' `schedule_every` polls are split over the live
    /// nodes of a site pair; methods and writes stay on the holder. (Left out when off.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_polling: bool,
}

/// A module: one driver instance for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleRecord {
    /// Id.
    pub id: String,
    /// Driver id.
    pub driver: String,
    /// Name within a system (`Display` is addressed as `Display 1`, `Display 2` ...).
    pub name: String,
    /// Device host.
    #[serde(default)]
    pub host: Option<String>,
    /// Device port (the driver's default port when absent).
    #[serde(default)]
    pub port: Option<u16>,
    /// Device URI.
    #[serde(default)]
    pub uri: Option<String>,
    /// Settings over the driver's defaults.
    #[serde(default)]
    pub settings: Settings,
    /// Edge id, or none for a module of the master.
    #[serde(default)]
    pub edge: Option<EdgeId>,
}

/// A control system (a room): an ordered list of modules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemRecord {
    /// Id.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Edge id, or none for a system of the master.
    #[serde(default)]
    pub edge: Option<EdgeId>,
    /// Module ids, in order.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Settings.
    #[serde(default)]
    pub settings: Settings,
}

/// A user of the client API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRecord {
    /// Id.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// `admin`, `operator` or `viewer`.
    pub role: String,
    /// SHA-256 of the user's token (hex).
    pub token_hash: String,
}

fn yes() -> bool {
    true
}
fn edge_timeout_ms() -> u64 {
    defaults::EDGE_TIMEOUT_MS
}
fn concurrency() -> u32 {
    defaults::MODULE_CONCURRENCY
}
fn exec_timeout_ms() -> u64 {
    defaults::EXEC_TIMEOUT_MS
}

macro_rules! record {
    ($type:ty, $kind:ident) => {
        impl Record for $type {
            const KIND: EntityKind = EntityKind::$kind;
            fn id(&self) -> &str {
                &self.id
            }
        }
    };
}
record!(EdgeRecord, Edge);
record!(RepositoryRecord, Repository);
record!(DriverRecord, Driver);
record!(ModuleRecord, Module);
record!(SystemRecord, System);
record!(UserRecord, User);
