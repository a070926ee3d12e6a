//! `edge.toml`: which site this edge serves, how it reaches its master, and its identity.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::load::{
    base_dir, check_api_url, check_id, check_link_settings, check_range, load_file, resolve,
};
use crate::{ConfigError, Limits, MAX_NODES, defaults};

/// An edge's configuration, paths resolved against the file's folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// The edge location this server runs; must match an `[[edges]]` id on the master.
    pub edge_id: String,
    /// Folder for the local replica and the edge's admin token.
    pub data_dir: PathBuf,
    /// The client API (HTTPS) for this site's control systems.
    pub api_listen: SocketAddr,
    /// The API's address as clients reach it (`https://host:port`), sent to the other side
    /// for its `Tether-Preferred-Server` hints; `https://` + `api_listen` when unset.
    #[serde(default)]
    pub api_url: Option<String>,
    /// The master's link address, `host:port` (one master).
    #[serde(default)]
    pub master: Option<String>,
    /// Several masters' link addresses (a cluster), instead of `master`. The edge tries
    /// them in an order of its own (a rendezvous hash of its id), so that edges spread
    /// over the masters, and moves to the next when one fails.
    #[serde(default)]
    pub masters: Vec<String>,
    /// The name on the master's certificate (checked by TLS).
    pub master_name: String,
    /// File holding this edge's shared secret (hex), mode 0600.
    pub secret_file: PathBuf,
    /// Heartbeat interval on the link.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Period between reconnect attempts; each attempt adds up to a sixth of it as jitter.
    #[serde(default = "default_reconnect_ms")]
    pub reconnect_ms: u64,
    /// Largest frame accepted from the master.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: u32,
    /// A master that has not finished the handshake by then is given up on.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// What a client (and, on the master, an edge link) may take: `[limits]`.
    #[serde(default)]
    pub limits: Limits,
    /// TLS identity and trust.
    pub tls: EdgeTls,
    /// Receivers every audit event is POSTed to: `[[alerts]]` (an edge cut off from the
    /// master still alerts).
    #[serde(default)]
    pub alerts: Vec<crate::AlertConfig>,
    /// This server as one node of a site pair: `[pair]` (none: the location's only
    /// server).
    #[serde(default)]
    pub pair: Option<EdgePair>,
    /// Where this server reaches devices the data model names at other addresses:
    /// `"host:port" = "host:port"` (a node of a pair on its own network path, or behind
    /// a NAT). Empty: every device at its record's address.
    #[serde(default)]
    pub device_routes: std::collections::BTreeMap<String, String>,
}

/// A site pair's node: its id, and how it reaches its peers. Between two nodes one
/// listens (`peer_listen`), the other connects to it; a pair names its one peer with
/// `peer_id` (and `peer`, `peer_name` on the connecting node), a location of more nodes
/// lists each peer in `[[pair.peers]]`. Every link between nodes is the edge link's TLS,
/// secret handshake and heartbeats, authenticated with the location's secret, which all
/// its nodes hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgePair {
    /// This node's id: one of the location's `nodes`. Its link to the master
    /// authenticates as this id, with `secret_file` and `tls.cert` (which names it).
    pub node_id: String,
    /// A pair's other node (or `peers`).
    #[serde(default)]
    pub peer_id: Option<String>,
    /// Where this node listens for the peers that connect to it (with its API
    /// certificate).
    #[serde(default)]
    pub peer_listen: Option<SocketAddr>,
    /// A pair's peer's address, `host:port`, when this node connects to it.
    #[serde(default)]
    pub peer: Option<String>,
    /// The name on that peer's API certificate (checked by TLS), when connecting.
    #[serde(default)]
    pub peer_name: Option<String>,
    /// A location of more nodes: each of the others (or `peer_id` for a pair).
    #[serde(default)]
    pub peers: Vec<PairPeer>,
    /// The location's secret (hex), shared by its nodes for their links, mode 0600.
    pub secret_file: PathBuf,
}

/// One of a node's peers, in `[[pair.peers]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairPeer {
    /// Its node id.
    pub id: String,
    /// Its pair listener, `host:port`, when this node connects to it (none: it connects
    /// to this node's `peer_listen`).
    #[serde(default)]
    pub addr: Option<String>,
    /// The name on its API certificate (checked by TLS), when this node connects.
    #[serde(default)]
    pub name: Option<String>,
}

impl EdgePair {
    /// This node's peers, whichever way the file names them (checked at load).
    pub fn peer_list(&self) -> Vec<PairPeer> {
        match &self.peer_id {
            Some(id) => vec![PairPeer {
                id: id.clone(),
                addr: self.peer.clone(),
                name: self.peer_name.clone(),
            }],
            None => self.peers.clone(),
        }
    }
}

/// The edge's trust in the master (the CA) and its own client certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeTls {
    /// PEM client certificate presented to the master: for client authentication only,
    /// naming the edge id.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM server certificate of the edge's client API (its own names, never the
    /// master's). Default: beside `cert`, `ID-api.pem` for `ID.pem`.
    #[serde(default)]
    pub api_cert: PathBuf,
    /// PEM private key of `api_cert`. Default: beside `cert`, `ID-api.key`.
    #[serde(default)]
    pub api_key: PathBuf,
    /// PEM CA the master's certificate must chain to.
    pub ca: PathBuf,
    /// Create a development PKI where the files are missing (examples and tests only).
    #[serde(default)]
    pub create_dev_certs: bool,
}

fn default_heartbeat_ms() -> u64 {
    defaults::HEARTBEAT_MS
}
fn default_reconnect_ms() -> u64 {
    defaults::RECONNECT_MS
}
fn default_max_frame_bytes() -> u32 {
    defaults::MAX_FRAME_BYTES
}
fn default_handshake_timeout_ms() -> u64 {
    defaults::HANDSHAKE_TIMEOUT_MS
}

impl EdgeConfig {
    /// Reads, resolves and validates `edge.toml`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: EdgeConfig = load_file(path)?;
        let base = base_dir(path);
        config.data_dir = resolve(&base, &config.data_dir);
        config.secret_file = resolve(&base, &config.secret_file);
        config.tls.cert = resolve(&base, &config.tls.cert);
        config.tls.key = resolve(&base, &config.tls.key);
        config.tls.ca = resolve(&base, &config.tls.ca);
        let stem = config
            .tls
            .cert
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let folder = config
            .tls
            .cert
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let or_beside = |path: &Path, default: String| {
            if path.as_os_str().is_empty() {
                folder.join(default)
            } else {
                resolve(&base, path)
            }
        };
        config.tls.api_cert = or_beside(&config.tls.api_cert, format!("{stem}-api.pem"));
        config.tls.api_key = or_beside(&config.tls.api_key, format!("{stem}-api.key"));
        crate::alerts::prepare(&mut config.alerts, &base, path)?;
        if let Some(pair) = &mut config.pair {
            pair.secret_file = resolve(&base, &pair.secret_file);
        }
        config.validate(path)?;
        Ok(config)
    }

    /// The masters' link addresses as configured (`master`, or `masters`).
    pub fn master_addrs(&self) -> Vec<String> {
        match &self.master {
            Some(master) => vec![master.clone()],
            None => self.masters.clone(),
        }
    }

    /// The API's address as clients reach it.
    pub fn public_api_url(&self) -> String {
        self.api_url
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.api_listen))
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if let Some(url) = &self.api_url {
            check_api_url(file, url)?;
        }
        check_id(file, "edge_id", &self.edge_id)?;
        self.limits.validate(file)?;
        check_link_settings(
            file,
            self.heartbeat_ms,
            self.max_frame_bytes,
            self.handshake_timeout_ms,
        )?;
        check_range(file, "reconnect_ms", self.reconnect_ms, 10..=600_000)?;
        let key = match (&self.master, self.masters.is_empty()) {
            (Some(_), false) => {
                return Err(ConfigError::invalid(
                    file,
                    "masters",
                    "either master (one) or masters (several), not both",
                ));
            }
            (None, true) => {
                return Err(ConfigError::invalid(
                    file,
                    "master",
                    "host:port of the master's link listener (or masters = [...] for several)",
                ));
            }
            (Some(_), true) => "master",
            (None, false) => "masters",
        };
        let addrs = self.master_addrs();
        for addr in &addrs {
            let port_ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !port_ok {
                return Err(ConfigError::invalid(
                    file,
                    key,
                    format!("host:port of a master's link listener, not {addr:?}"),
                ));
            }
        }
        let distinct: std::collections::BTreeSet<&String> = addrs.iter().collect();
        if distinct.len() != addrs.len() {
            return Err(ConfigError::invalid(
                file,
                "masters",
                "each master once (an address is listed twice)",
            ));
        }
        if self.master_name.is_empty() {
            return Err(ConfigError::invalid(
                file,
                "master_name",
                "the name on the master's certificate",
            ));
        }
        if let Some(pair) = &self.pair {
            pair.validate(file, &self.edge_id)?;
        }
        for (from, to) in &self.device_routes {
            for address in [from, to] {
                if split_host_port(address).is_none() {
                    return Err(ConfigError::invalid(
                        file,
                        format!("device_routes.{from:?}"),
                        format!("host:port to host:port, not {address:?}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `device_routes` as (host, port) pairs, keyed by `host:port` (checked at load).
    pub fn device_routes(&self) -> std::collections::HashMap<String, (String, u16)> {
        self.device_routes
            .iter()
            .filter_map(|(from, to)| Some((from.clone(), split_host_port(to)?)))
            .collect()
    }
}

/// `host:port`, split; none unless both are there and the port is a number above 0.
fn split_host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    (!host.is_empty()).then(|| (host.to_string(), port))
}

impl EdgePair {
    fn validate(&self, file: &Path, edge_id: &str) -> Result<(), ConfigError> {
        check_id(file, "pair.node_id", &self.node_id)?;
        if self.node_id == edge_id {
            return Err(ConfigError::invalid(
                file,
                "pair.node_id",
                "this node's id, other than the location's (edge_id)",
            ));
        }
        match (&self.peer_id, self.peers.is_empty()) {
            (Some(_), false) | (None, true) => {
                return Err(ConfigError::invalid(
                    file,
                    "pair.peer_id",
                    "the pair's other node (peer_id), or each other node of the location in [[pair.peers]], one of the two",
                ));
            }
            (Some(_), true) => {
                if self.peer_listen.is_some() == self.peer.is_some() {
                    return Err(ConfigError::invalid(
                        file,
                        "pair.peer",
                        "either peer (host:port this node connects to) or peer_listen (where it listens for its peer), one of the two",
                    ));
                }
                if self.peer.is_none() && self.peer_name.is_some() {
                    return Err(ConfigError::invalid(
                        file,
                        "pair.peer_name",
                        "none where this node listens (peer_listen)",
                    ));
                }
            }
            (None, false) => {
                if self.peer.is_some() || self.peer_name.is_some() {
                    return Err(ConfigError::invalid(
                        file,
                        "pair.peer",
                        "none beside [[pair.peers]] (each names its own addr and name)",
                    ));
                }
            }
        }
        let (key, addr_key, name_key) = match self.peer_id {
            Some(_) => ("pair.peer_id", "pair.peer", "pair.peer_name"),
            None => ("pair.peers.id", "pair.peers.addr", "pair.peers.name"),
        };
        let peers = self.peer_list();
        if peers.len() + 1 > MAX_NODES {
            return Err(ConfigError::invalid(
                file,
                "pair.peers",
                format!(
                    "at most {} peers (a location has at most {MAX_NODES} nodes)",
                    MAX_NODES - 1
                ),
            ));
        }
        for (i, peer) in peers.iter().enumerate() {
            check_id(file, key, &peer.id)?;
            if peer.id == self.node_id
                || peer.id == edge_id
                || peers[..i].iter().any(|p| p.id == peer.id)
            {
                return Err(ConfigError::invalid(
                    file,
                    key,
                    format!(
                        "another node of the location, once each: not {:?} (node_id {:?}, edge_id {edge_id:?})",
                        peer.id, self.node_id
                    ),
                ));
            }
            match &peer.addr {
                None if self.peer_listen.is_none() => {
                    return Err(ConfigError::invalid(
                        file,
                        "pair.peer_listen",
                        format!(
                            "where this node listens for {} (which connects to it), or its {addr_key}",
                            peer.id
                        ),
                    ));
                }
                None => {}
                Some(addr) => {
                    if split_host_port(addr).is_none() {
                        return Err(ConfigError::invalid(
                            file,
                            addr_key,
                            format!("host:port of {}'s pair listener, not {addr:?}", peer.id),
                        ));
                    }
                    if peer.name.as_deref().is_none_or(str::is_empty) {
                        return Err(ConfigError::invalid(
                            file,
                            name_key,
                            format!("the name on {}'s API certificate", peer.id),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
edge_id = "site-1"
data_dir = "../data/site-1"
api_listen = "127.0.0.1:8444"
master = "127.0.0.1:17400"
master_name = "localhost"
secret_file = "site-1.secret"
[tls]
cert = "site-1.pem"
key = "site-1.key"
ca = "ca.pem"
"#;

    fn load(text: &str) -> Result<EdgeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, text).unwrap();
        EdgeConfig::load(&path)
    }

    #[test]
    fn good_file_loads_with_defaults() {
        let config = load(GOOD).unwrap();
        assert_eq!(config.reconnect_ms, 3000);
        assert!(config.secret_file.ends_with("site-1.secret"));
        assert!(config.secret_file.is_absolute());
    }

    #[test]
    fn a_master_without_port_is_refused() {
        let err = load(&GOOD.replace("127.0.0.1:17400", "127.0.0.1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `master`: expected host:port"), "{err}");
    }

    #[test]
    fn several_masters_load_and_each_is_checked() {
        let several = GOOD.replace(
            "master = \"127.0.0.1:17400\"",
            "masters = [\"10.0.0.1:17400\", \"10.0.0.2:17400\"]",
        );
        let config = load(&several).unwrap();
        assert_eq!(config.master_addrs(), ["10.0.0.1:17400", "10.0.0.2:17400"]);
        let err = load(&several.replace("10.0.0.2:17400", "10.0.0.2"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `masters`: expected host:port") && err.contains("10.0.0.2"),
            "{err}"
        );
        let err = load(&several.replace("10.0.0.2", "10.0.0.1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listed twice"), "{err}");
        let both = format!("masters = [\"10.0.0.1:17400\"]\n{GOOD}");
        let err = load(&both).unwrap_err().to_string();
        assert!(
            err.contains("key `masters`") && err.contains("not both"),
            "{err}"
        );
        let neither = GOOD.replace("master = \"127.0.0.1:17400\"\n", "");
        let err = load(&neither).unwrap_err().to_string();
        assert!(err.contains("key `master`"), "{err}");
    }

    #[test]
    fn an_unknown_key_in_a_table_is_named() {
        let err = load(&format!("{GOOD}cafile = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cafile"), "{err}");
        assert!(err.contains("edge.toml:12"), "{err}");
    }

    #[test]
    fn a_pair_node_names_one_way_to_its_peer() {
        let listen = format!(
            "{GOOD}[pair]\nnode_id = \"site-1a\"\npeer_id = \"site-1b\"\npeer_listen = \"127.0.0.1:17501\"\nsecret_file = \"site-1.secret\"\n"
        );
        let config = load(&listen).unwrap();
        let pair = config.pair.unwrap();
        assert!(pair.secret_file.is_absolute());
        let both = listen.replace(
            "peer_listen = \"127.0.0.1:17501\"",
            "peer_listen = \"127.0.0.1:17501\"\npeer = \"127.0.0.1:17502\"",
        );
        let err = load(&both).unwrap_err().to_string();
        assert!(err.contains("key `pair.peer`"), "{err}");
        let nameless = listen.replace(
            "peer_listen = \"127.0.0.1:17501\"",
            "peer = \"127.0.0.1:17501\"",
        );
        let err = load(&nameless).unwrap_err().to_string();
        assert!(err.contains("key `pair.peer_name`"), "{err}");
        let same = listen.replace("\"site-1b\"", "\"site-1a\"");
        let err = load(&same).unwrap_err().to_string();
        assert!(err.contains("key `pair.peer_id`"), "{err}");
        let location = listen.replace("node_id = \"site-1a\"", "node_id = \"site-1\"");
        let err = load(&location).unwrap_err().to_string();
        assert!(err.contains("key `pair.node_id`"), "{err}");
    }

    #[test]
    fn a_node_of_more_lists_each_peer_and_how_it_is_reached() {
        let mesh = format!(
            "{GOOD}[pair]\nnode_id = \"site-1b\"\npeer_listen = \"127.0.0.1:17502\"\nsecret_file = \"site-1.secret\"\n\
             [[pair.peers]]\nid = \"site-1a\"\naddr = \"127.0.0.1:17501\"\nname = \"site-1a\"\n\
             [[pair.peers]]\nid = \"site-1c\"\n"
        );
        let pair = load(&mesh).unwrap().pair.unwrap();
        let peers = pair.peer_list();
        assert_eq!(
            peers
                .iter()
                .map(|p| (p.id.as_str(), p.addr.is_some()))
                .collect::<Vec<_>>(),
            [("site-1a", true), ("site-1c", false)]
        );
        for (from, to, key) in [
            // A peer that connects here needs a listener.
            (
                "peer_listen = \"127.0.0.1:17502\"\n",
                "",
                "pair.peer_listen",
            ),
            // One that is connected to needs its certificate's name.
            ("name = \"site-1a\"\n", "", "pair.peers.name"),
            (
                "addr = \"127.0.0.1:17501\"",
                "addr = \"17501\"",
                "pair.peers.addr",
            ),
            ("id = \"site-1c\"", "id = \"site-1a\"", "pair.peers.id"),
            ("id = \"site-1c\"", "id = \"site-1b\"", "pair.peers.id"),
            // Both forms at once.
            (
                "node_id = \"site-1b\"\n",
                "node_id = \"site-1b\"\npeer_id = \"site-1c\"\n",
                "pair.peer_id",
            ),
        ] {
            let err = load(&mesh.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(
                err.contains(&format!("key `{key}`")),
                "{from} -> {to}: {err}"
            );
        }
        let none = mesh[..mesh.find("[[pair.peers]]").unwrap()].to_string();
        let err = load(&none).unwrap_err().to_string();
        assert!(err.contains("key `pair.peer_id`"), "{err}");
    }

    #[test]
    fn a_bad_edge_id_is_refused() {
        let err = load(&GOOD.replace("\"site-1\"", "\"site 1/x\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `edge_id`"), "{err}");
    }
}
