//! The site file: the data model a new master starts with (repositories, drivers, edges,
//! modules, control systems). For now the master uses its `[[edges]]` (ids and secrets);
//! the whole model is checked so that a mistake is found when the file is written, not
//! when the part that uses it arrives.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::load::{base_dir, check_id, check_range, parse_str, resolve};
use crate::{ConfigError, defaults};

/// A parsed and checked site file, paths resolved against its folder.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteFile {
    /// Driver repositories.
    #[serde(default)]
    pub repositories: Vec<Repository>,
    /// Drivers, each a script in a repository.
    #[serde(default)]
    pub drivers: Vec<Driver>,
    /// Edge locations (sites).
    #[serde(default)]
    pub edges: Vec<SiteEdge>,
    /// Modules: driver instances for one device each.
    #[serde(default)]
    pub modules: Vec<Module>,
    /// Control systems (rooms).
    #[serde(default)]
    pub systems: Vec<System>,
}

/// A folder (or git working copy) of driver scripts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    /// Id.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Folder, relative to the site file.
    pub path: PathBuf,
}

/// What a driver drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// A device on the network.
    #[default]
    Device,
    /// Pure logic (a room's behaviour).
    Logic,
}

/// How a driver reaches its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A TCP byte stream with framing.
    #[default]
    Tcp,
    /// Modbus TCP.
    Modbus,
    /// No device (logic).
    None,
}

/// A driver: a script in a repository plus metadata.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Driver {
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
    /// Transport.
    #[serde(default)]
    pub transport: Transport,
    /// Port used when a module names none.
    pub default_port: Option<u16>,
    /// Settings every module starts from.
    #[serde(default)]
    pub default_settings: toml::Table,
    /// `tcp`: frames end with this string (`"\r"`, `"\r\n"`); the script gets them without it.
    pub delimiter: Option<String>,
    /// `tcp`: frames are this many bytes (instead of a delimiter).
    pub frame_length: Option<u32>,
    /// Requests a module of this driver runs at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// How long a method may run before its caller gets a timeout.
    #[serde(default = "default_exec_timeout_ms")]
    pub timeout_ms: u64,
    /// A collector array: the `schedule_every` polls of its modules are split over the
    /// live nodes of a site pair (read-only polls, on a device that allows two sessions).
    #[serde(default)]
    pub shared_polling: bool,
}

/// Who keeps an edge's modules ready on the master while the edge runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Standby {
    /// Nothing runs on the master until it takes over.
    #[default]
    Cold,
    /// Drivers compiled and last status kept, for a faster takeover.
    Warm,
}

/// When control goes back to an edge by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreWindow {
    /// 5-field cron expression for the window's start.
    pub start: String,
    /// How long the window stays open.
    pub length_s: u64,
}

impl RestoreWindow {
    /// Parses `start` as exactly five cron fields (minute hour day month weekday); the
    /// error says what is wrong with it, for the caller to prefix with the key.
    pub fn schedule(&self) -> Result<croner::Cron, String> {
        parse_cron(&self.start)
    }
}

/// Parses an IANA time zone name (`Europe/Amsterdam`, `UTC`); the error says what is
/// expected, for the caller to prefix with the key.
pub fn parse_time_zone(name: &str) -> Result<chrono_tz::Tz, String> {
    name.parse::<chrono_tz::Tz>().map_err(|_| {
        format!("an IANA time zone name such as \"Europe/Amsterdam\" or \"UTC\", not {name:?}")
    })
}

/// Parses a 5-field cron expression (no seconds, no year), as restore windows use.
fn parse_cron(text: &str) -> Result<croner::Cron, String> {
    use croner::parser::{CronParser, Seconds, Year};
    let expected = "a 5-field cron expression (minute hour day month weekday)";
    if text.split_whitespace().count() != 5 {
        return Err(format!("{expected}, not {text:?}"));
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|err| format!("{expected}; {text:?} is not one: {err}"))
}

/// An edge location (a site).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteEdge {
    /// Id; the edge's `edge_id`.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// File holding the edge's shared secret (hex), relative to the site file.
    pub secret_file: PathBuf,
    /// Whether the master takes the edge's modules when the edge is gone.
    #[serde(default = "default_true")]
    pub failover: bool,
    /// How long the edge may be unreachable before the master takes over.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Standby level on the master.
    #[serde(default)]
    pub standby: Standby,
    /// Optional automatic restore window.
    pub restore_window: Option<RestoreWindow>,
    /// The IANA time zone its restore window is read in (`Europe/Amsterdam`); UTC when
    /// absent.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// User ids allowed to restore this edge and start or stop its systems.
    #[serde(default)]
    pub admins: Vec<String>,
    /// A site pair's nodes, the first preferred (none: one node, the location itself).
    /// Each node's secret is `ID.secret` beside `secret_file`.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// A pair: how long the holder must be gone before its standby is granted the
    /// modules (default 5000).
    #[serde(default)]
    pub pair_timeout_ms: Option<u64>,
    /// A pair: what a holder cut off from its peer and every master does.
    #[serde(default)]
    pub isolation: Option<Isolation>,
    /// A pair: with no master reachable, a standby takes over after this long (off by
    /// default: never without a witness).
    #[serde(default)]
    pub unwitnessed_takeover_ms: Option<u64>,
    /// A pair: how long the holder must reach fewer devices than its peer before it
    /// hands over (default 10000).
    #[serde(default)]
    pub device_hold_down_ms: Option<u64>,
}

/// What a site pair's holder cut off from its peer and from every master does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Rooms keep running (two holders are possible while the cut lasts; reported).
    #[default]
    Continue,
    /// The holder stops its modules before a standby can have been granted them.
    Stop,
}

/// The most nodes a location has (each grant carries a proof for every one).
pub const MAX_NODES: usize = 8;

/// Checks a location's pair keys (the site file's and the model's rules); the error
/// names the key (without its table) and what was expected.
pub fn check_pair(
    id: &str,
    nodes: &[String],
    pair_timeout_ms: Option<u64>,
    isolation: Option<Isolation>,
    unwitnessed_takeover_ms: Option<u64>,
    device_hold_down_ms: Option<u64>,
) -> Result<(), (String, String)> {
    let pair_keys = pair_timeout_ms.is_some()
        || isolation.is_some()
        || unwitnessed_takeover_ms.is_some()
        || device_hold_down_ms.is_some();
    if nodes.is_empty() {
        return match pair_keys {
            true => Err((
                "nodes".into(),
                "a list of nodes: the pair keys apply to a location with nodes".into(),
            )),
            false => Ok(()),
        };
    }
    if !(2..=MAX_NODES).contains(&nodes.len()) {
        return Err((
            "nodes".into(),
            format!(
                "two to {MAX_NODES} nodes (a site pair, or more), not {}",
                nodes.len()
            ),
        ));
    }
    for (i, node) in nodes.iter().enumerate() {
        if node == id {
            return Err((
                format!("nodes[{i}]"),
                format!("a node id other than the location's own ({id:?})"),
            ));
        }
        if nodes[..i].contains(node) {
            return Err((
                format!("nodes[{i}]"),
                format!("each node once; {node:?} is named twice"),
            ));
        }
    }
    let timeout = pair_timeout_ms.unwrap_or(defaults::PAIR_TIMEOUT_MS);
    // Four heartbeats of the default link at least (a node checks its own heartbeat too).
    if !(4 * defaults::HEARTBEAT_MS..=600_000).contains(&timeout) {
        return Err((
            "pair_timeout_ms".into(),
            format!(
                "a value in {}..=600000, not {timeout}",
                4 * defaults::HEARTBEAT_MS
            ),
        ));
    }
    if let Some(hold) = device_hold_down_ms
        && !(1000..=3_600_000).contains(&hold)
    {
        return Err((
            "device_hold_down_ms".into(),
            format!("a value in 1000..=3600000, not {hold}"),
        ));
    }
    if let Some(after) = unwitnessed_takeover_ms {
        if isolation == Some(Isolation::Stop) {
            return Err(("unwitnessed_takeover_ms".into(), "none with isolation = \"stop\" (a takeover without a witness is made cut off from both)".into()));
        }
        if !(timeout..=86_400_000).contains(&after) {
            return Err((
                "unwitnessed_takeover_ms".into(),
                format!("a value in {timeout}..=86400000 (at least pair_timeout_ms), not {after}"),
            ));
        }
    }
    Ok(())
}

/// A module: one driver instance for one device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Module {
    /// Id.
    pub id: String,
    /// Driver id.
    pub driver: String,
    /// Name within a system (`Display` is addressed as `Display 1`, `Display 2` ...).
    pub name: String,
    /// Device host.
    pub host: Option<String>,
    /// Device port.
    pub port: Option<u16>,
    /// Device URI, for drivers that use one.
    pub uri: Option<String>,
    /// Settings over the driver's defaults.
    #[serde(default)]
    pub settings: toml::Table,
    /// Edge id, or none for a module of the master.
    pub edge: Option<String>,
}

/// A control system (a room): an ordered list of modules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct System {
    /// Id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Edge id, or none for a system of the master.
    pub edge: Option<String>,
    /// Module ids, in order.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Settings.
    #[serde(default)]
    pub settings: toml::Table,
}

fn default_true() -> bool {
    true
}
fn default_concurrency() -> u32 {
    defaults::MODULE_CONCURRENCY
}
fn default_exec_timeout_ms() -> u64 {
    defaults::EXEC_TIMEOUT_MS
}
fn default_timeout_ms() -> u64 {
    defaults::EDGE_TIMEOUT_MS
}

impl SiteFile {
    /// Reads, resolves and checks a site file (types, ids, references, ranges).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and checks `text` as the site file at `path` (which names it in errors and
    /// is the base of its relative paths).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut site: SiteFile = parse_str(path, text)?;
        let base = base_dir(path);
        for repository in &mut site.repositories {
            repository.path = resolve(&base, &repository.path);
        }
        for edge in &mut site.edges {
            edge.secret_file = resolve(&base, &edge.secret_file);
        }
        site.validate(path)?;
        Ok(site)
    }

    /// The edge with this id.
    pub fn edge(&self, id: &str) -> Option<&SiteEdge> {
        self.edges.iter().find(|edge| edge.id == id)
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let repositories = unique_ids(
            file,
            "repositories",
            self.repositories.iter().map(|r| &r.id),
        )?;
        let drivers = unique_ids(file, "drivers", self.drivers.iter().map(|d| &d.id))?;
        let edges = unique_ids(file, "edges", self.edges.iter().map(|e| &e.id))?;
        let modules = unique_ids(file, "modules", self.modules.iter().map(|m| &m.id))?;
        unique_ids(file, "systems", self.systems.iter().map(|s| &s.id))?;

        let must_exist = |key: String, set: &HashSet<&str>, id: &str, what: &str| {
            if set.contains(id) {
                Ok(())
            } else {
                Err(ConfigError::invalid(
                    file,
                    key,
                    format!("the id of one of the {what}, not {id:?}"),
                ))
            }
        };
        for (i, driver) in self.drivers.iter().enumerate() {
            must_exist(
                format!("drivers[{i}].repository"),
                &repositories,
                &driver.repository,
                "[[repositories]]",
            )?;
        }
        for (i, driver) in self.drivers.iter().enumerate() {
            check_range(
                file,
                &format!("drivers[{i}].concurrency"),
                driver.concurrency.into(),
                1..=64,
            )?;
            check_range(
                file,
                &format!("drivers[{i}].timeout_ms"),
                driver.timeout_ms,
                10..=3_600_000,
            )?;
            if driver.delimiter.is_some() && driver.frame_length.is_some() {
                return Err(ConfigError::invalid(
                    file,
                    format!("drivers[{i}].frame_length"),
                    "either a delimiter or a frame_length, not both",
                ));
            }
            if driver.delimiter.as_deref() == Some("") {
                return Err(ConfigError::invalid(
                    file,
                    format!("drivers[{i}].delimiter"),
                    "a non-empty delimiter",
                ));
            }
            if let Some(length) = driver.frame_length {
                check_range(
                    file,
                    &format!("drivers[{i}].frame_length"),
                    length.into(),
                    1..=65_536,
                )?;
            }
        }
        for (i, edge) in self.edges.iter().enumerate() {
            check_range(
                file,
                &format!("edges[{i}].timeout_ms"),
                edge.timeout_ms,
                100..=86_400_000,
            )?;
            if let Some(window) = &edge.restore_window {
                check_range(
                    file,
                    &format!("edges[{i}].restore_window.length_s"),
                    window.length_s,
                    1..=86_400 * 7,
                )?;
                if let Err(expected) = window.schedule() {
                    return Err(ConfigError::invalid(
                        file,
                        format!("edges[{i}].restore_window.start"),
                        expected,
                    ));
                }
            }
            if let Some(zone) = &edge.time_zone
                && let Err(expected) = parse_time_zone(zone)
            {
                return Err(ConfigError::invalid(
                    file,
                    format!("edges[{i}].time_zone"),
                    expected,
                ));
            }
            for (j, node) in edge.nodes.iter().enumerate() {
                let key = format!("edges[{i}].nodes[{j}]");
                check_id(file, &key, node)?;
                let taken = (node != &edge.id && edges.contains(node.as_str()))
                    || self.edges[..i]
                        .iter()
                        .any(|other| other.nodes.contains(node));
                if taken {
                    return Err(ConfigError::invalid(
                        file,
                        key,
                        format!("a node id no other location or node has, not {node:?}"),
                    ));
                }
            }
            if let Err((key, expected)) = check_pair(
                &edge.id,
                &edge.nodes,
                edge.pair_timeout_ms,
                edge.isolation,
                edge.unwitnessed_takeover_ms,
                edge.device_hold_down_ms,
            ) {
                return Err(ConfigError::invalid(
                    file,
                    format!("edges[{i}].{key}"),
                    expected,
                ));
            }
        }
        for (i, module) in self.modules.iter().enumerate() {
            must_exist(
                format!("modules[{i}].driver"),
                &drivers,
                &module.driver,
                "[[drivers]]",
            )?;
            if let Some(edge) = &module.edge {
                must_exist(format!("modules[{i}].edge"), &edges, edge, "[[edges]]")?;
            }
        }
        for (i, system) in self.systems.iter().enumerate() {
            if let Some(edge) = &system.edge {
                must_exist(format!("systems[{i}].edge"), &edges, edge, "[[edges]]")?;
            }
            for (j, module) in system.modules.iter().enumerate() {
                must_exist(
                    format!("systems[{i}].modules[{j}]"),
                    &modules,
                    module,
                    "[[modules]]",
                )?;
            }
        }
        Ok(())
    }
}

/// Checks each id's form and that none repeats; returns the set for reference checks.
fn unique_ids<'a>(
    file: &Path,
    section: &str,
    ids: impl Iterator<Item = &'a String>,
) -> Result<HashSet<&'a str>, ConfigError> {
    let mut seen = HashSet::new();
    for (i, id) in ids.enumerate() {
        let key = format!("{section}[{i}].id");
        check_id(file, &key, id)?;
        if !seen.insert(id.as_str()) {
            return Err(ConfigError::invalid(
                file,
                key,
                format!("an id not used before in [[{section}]], not {id:?} again"),
            ));
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[repositories]]
id = "core"
path = "../drivers"

[[drivers]]
id = "projector"
repository = "core"
file = "projector.rhai"

[[edges]]
id = "site-1"
name = "North campus"
secret_file = "site-1.secret"
standby = "warm"
restore_window = { start = "0 2 * * *", length_s = 3600 }

[[modules]]
id = "proj-101"
driver = "projector"
name = "Display"
host = "127.0.0.1"
port = 9101
edge = "site-1"

[[systems]]
id = "room-101"
name = "Room 101"
edge = "site-1"
modules = ["proj-101"]
"#;

    fn load(text: &str) -> Result<SiteFile, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.toml");
        std::fs::write(&path, text).unwrap();
        SiteFile::load(&path)
    }

    #[test]
    fn the_design_example_loads() {
        let site = load(GOOD).unwrap();
        let edge = site.edge("site-1").unwrap();
        assert!(edge.failover);
        assert_eq!(edge.timeout_ms, 20_000);
        assert_eq!(edge.standby, Standby::Warm);
        assert!(edge.secret_file.is_absolute());
        assert_eq!(site.systems[0].modules, vec!["proj-101"]);
    }

    #[test]
    fn a_dangling_reference_is_named() {
        let err = load(&GOOD.replace("modules = [\"proj-101\"]", "modules = [\"proj-102\"]"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `systems[0].modules[0]`: expected the id of one of the [[modules]], not \"proj-102\""), "{err}");
    }

    #[test]
    fn a_duplicate_id_is_refused() {
        let text = format!("{GOOD}\n[[edges]]\nid = \"site-1\"\nsecret_file = \"x\"\n");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("key `edges[1].id`"), "{err}");
    }

    #[test]
    fn a_bad_standby_names_the_key() {
        let err = load(&GOOD.replace("\"warm\"", "\"hot\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `edges[0].standby`"), "{err}");
        assert!(err.contains("cold") && err.contains("warm"), "{err}");
    }

    #[test]
    fn a_cron_without_five_fields_is_refused() {
        let err = load(&GOOD.replace("0 2 * * *", "0 2 * *"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("edges[0].restore_window.start"), "{err}");
    }

    #[test]
    fn a_cron_with_a_field_out_of_range_is_refused() {
        let err = load(&GOOD.replace("0 2 * * *", "0 25 * * *"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("edges[0].restore_window.start"), "{err}");
        assert!(err.contains("0 25 * * *"), "{err}");
    }

    #[test]
    fn a_time_zone_is_an_iana_name_and_a_bad_one_names_the_key() {
        let zoned = GOOD.replace(
            "restore_window = {",
            "time_zone = \"Europe/Amsterdam\"\nrestore_window = {",
        );
        let site = load(&zoned).unwrap();
        assert_eq!(site.edges[0].time_zone.as_deref(), Some("Europe/Amsterdam"));
        let err = load(&zoned.replace("Europe/Amsterdam", "Europe/Atlantis"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `edges[0].time_zone`"), "{err}");
        assert!(err.contains("Europe/Atlantis"), "{err}");
    }

    #[test]
    fn a_location_has_two_to_eight_nodes_with_ids_of_their_own_and_settings_that_hold() {
        let pair = |extra: &str| {
            GOOD.replace(
                "restore_window = {",
                &format!("{extra}\nrestore_window = {{"),
            )
        };
        let site = load(&pair(
            "nodes = [\"site-1a\", \"site-1b\"]\nisolation = \"stop\"",
        ))
        .unwrap();
        assert_eq!(site.edges[0].nodes, ["site-1a", "site-1b"]);
        let three = load(&pair("nodes = [\"site-1a\", \"site-1b\", \"site-1c\"]")).unwrap();
        assert_eq!(three.edges[0].nodes.len(), 3);
        let nine: Vec<String> = (0..9).map(|i| format!("\"n{i}\"")).collect();
        let nine = format!("nodes = [{}]", nine.join(", "));
        for (extra, key) in [
            ("nodes = [\"site-1a\"]", "edges[0].nodes"),
            (nine.as_str(), "edges[0].nodes"),
            ("nodes = [\"site-1a\", \"site-1a\"]", "edges[0].nodes[1]"),
            ("pair_timeout_ms = 5000", "edges[0].nodes"),
            (
                "nodes = [\"site-1a\", \"site-1b\"]\nisolation = \"stop\"\nunwitnessed_takeover_ms = 9000",
                "edges[0].unwitnessed_takeover_ms",
            ),
            (
                "nodes = [\"site-1a\", \"site-1b\"]\npair_timeout_ms = 1000",
                "edges[0].pair_timeout_ms",
            ),
        ] {
            let err = load(&pair(extra)).unwrap_err().to_string();
            assert!(err.contains(&format!("key `{key}`")), "{extra}: {err}");
        }
    }
}
