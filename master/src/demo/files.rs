//! The demo's folder: its certificates, driver code, site file and server configurations.
//! Every path is absolute, so the children can be started from anywhere.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Written into a folder the demo owns, so that a later start may empty it and never
/// touches a folder it did not make.
const MARKER: &str = ".tether-demo";

/// The example drivers, carried in the binary so the demo needs no checkout.
const DRIVERS: [(&str, &str); 3] = [
    (
        "projector.rhai",
        include_str!("../../../drivers/projector.rhai"),
    ),
    ("meter.rhai", include_str!("../../../drivers/meter.rhai")),
    ("room.rhai", include_str!("../../../drivers/room.rhai")),
];

/// The edge locations of the demo.
pub const LOCATIONS: [&str; 2] = ["site-1", "site-2"];

/// One edge server of the demo: a location's only server, or a node of a site pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeServer {
    /// Its name (its configuration `NAME.toml`, data folder and certificate).
    pub name: &'static str,
    /// Its location.
    pub location: &'static str,
    /// A pair's node: its peer, and whether it listens for it (else it connects).
    pub pair: Option<(&'static str, bool)>,
}

/// North campus is a site pair (site-1a holds, site-1b stands by), South store one edge.
pub fn edge_servers() -> Vec<EdgeServer> {
    vec![
        EdgeServer {
            name: "site-1a",
            location: "site-1",
            pair: Some(("site-1b", true)),
        },
        EdgeServer {
            name: "site-1b",
            location: "site-1",
            pair: Some(("site-1a", false)),
        },
        EdgeServer {
            name: "site-2",
            location: "site-2",
            pair: None,
        },
    ]
}

/// One master's ports.
#[derive(Debug, Clone, Copy)]
pub struct MasterPorts {
    pub api: u16,
    pub link: u16,
}

/// The ports only several masters use.
#[derive(Debug, Clone, Copy)]
pub struct ClusterPorts {
    /// The projector of the lobby, a system of no edge (the masters run it).
    pub lobby: u16,
    /// etcd's client port.
    pub etcd_client: u16,
    /// etcd's peer port.
    pub etcd_peer: u16,
}

/// Every port the demo uses.
#[derive(Debug, Clone)]
pub struct Ports {
    /// Each master's, the first first.
    pub masters: Vec<MasterPorts>,
    /// The edge servers' APIs, in [`edge_servers`] order.
    pub edge_api: [u16; 3],
    /// Where site-1a listens for its peer.
    pub peer: u16,
    /// Projectors of room-101, room-102 (site-1) and store-201 (site-2).
    pub projectors: [u16; 3],
    /// The meter of room-101.
    pub meter: u16,
    /// With several masters.
    pub cluster: Option<ClusterPorts>,
}

impl Ports {
    /// How many ports the demo uses with `masters` masters.
    pub fn count(masters: usize) -> usize {
        match masters {
            0 | 1 => 10,
            n => 10 + 2 * (n - 1) + 3,
        }
    }

    /// `base`, `base + 1`, ... in a fixed order (the first master's API, two edges' APIs,
    /// its link, the devices, a third edge's API, the pair's peer link; then the other
    /// masters', the lobby's projector, etcd's);
    /// `0` picks free ones.
    pub fn pick(base: u16, masters: usize) -> anyhow::Result<Ports> {
        let count = Self::count(masters);
        let ports = if base == 0 {
            free_ports(count)?
        } else {
            let mut ports = Vec::new();
            for i in 0..count {
                let wanted = u16::try_from(i)
                    .ok()
                    .and_then(|i| base.checked_add(i))
                    .with_context(|| {
                        format!("--base-port: the demo needs {count} ports from it")
                    })?;
                std::net::TcpListener::bind(("127.0.0.1", wanted)).with_context(|| {
                    format!("port {wanted} on 127.0.0.1 is in use (another demo?); pick others with --base-port N, or 0 for any")
                })?;
                ports.push(wanted);
            }
            ports
        };
        let mut all = vec![MasterPorts {
            api: ports[0],
            link: ports[3],
        }];
        let rest = &ports[10..];
        for pair in rest.chunks(2).take(masters.saturating_sub(1)) {
            all.push(MasterPorts {
                api: pair[0],
                link: pair[1],
            });
        }
        let cluster = (masters > 1).then(|| {
            let extra = &rest[2 * (masters - 1)..];
            ClusterPorts {
                lobby: extra[0],
                etcd_client: extra[1],
                etcd_peer: extra[2],
            }
        });
        Ok(Ports {
            masters: all,
            edge_api: [ports[1], ports[2], ports[8]],
            peer: ports[9],
            projectors: [ports[4], ports[5], ports[6]],
            meter: ports[7],
            cluster,
        })
    }

    /// The first master's API port.
    pub fn master_api(&self) -> u16 {
        self.masters[0].api
    }
}

/// `count` free ports from below the kernel's ephemeral range (32768 and up on Linux), so
/// that no outgoing connection takes one before its server binds it; from a random start,
/// so that demos started at once (tests) rarely meet.
fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    let start = rand::random_range(0..SPAN);
    let ports: Vec<u16> = (0..SPAN)
        .map(|i| FIRST + (start + i) % SPAN)
        .filter(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .take(count)
        .collect();
    anyhow::ensure!(
        ports.len() == count,
        "no {count} free ports on 127.0.0.1 from {FIRST}"
    );
    Ok(ports)
}

/// The demo's folder and the files in it.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    /// How many masters.
    pub masters: usize,
}

impl Layout {
    /// Master `index`'s name: `master` alone, `m1`, `m2` ... among several.
    pub fn master_name(&self, index: usize) -> String {
        match self.masters {
            0 | 1 => "master".into(),
            _ => format!("m{}", index + 1),
        }
    }
    pub fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }
    pub fn ca(&self) -> PathBuf {
        self.certs().join("ca.pem")
    }
    pub fn master_config(&self, index: usize) -> PathBuf {
        self.dir.join(format!("{}.toml", self.master_name(index)))
    }
    /// The edge servers, in [`edge_servers`] order.
    pub fn edge_servers(&self) -> Vec<EdgeServer> {
        edge_servers()
    }
    pub fn edge_config(&self, edge: &str) -> PathBuf {
        self.dir.join(format!("{edge}.toml"))
    }
    pub fn data(&self, server: &str) -> PathBuf {
        self.dir.join("data").join(server)
    }
    pub fn log(&self, child: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{child}.log"))
    }

    /// Makes `dir` the demo's folder, empty: a new folder, or one an earlier demo made
    /// (its contents removed). A folder with other contents is refused.
    pub fn prepare(dir: &Path, masters: usize) -> anyhow::Result<Layout> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        let marker = dir.join(MARKER);
        let empty = fs::read_dir(&dir)?.next().is_none();
        if !empty && !marker.exists() {
            anyhow::bail!(
                "{} holds files the demo did not make; give it an empty or new folder with --dir",
                dir.display()
            );
        }
        if let Some(pid) = running_demo(&marker) {
            anyhow::bail!(
                "a demo (pid {pid}) is running in {}; stop it first, or give this one another --dir",
                dir.display()
            );
        }
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            }
            .with_context(|| format!("cannot clear {}", path.display()))?;
        }
        fs::write(
            &marker,
            "made by tether-master demo; emptied at its next start\n",
        )?;
        Ok(Layout { dir, masters })
    }

    /// Writes the certificates, drivers, site file and configurations.
    pub fn write(&self, ports: &Ports) -> anyhow::Result<()> {
        // Every location's secret (a pair's nodes share it for their link) and every
        // server's own.
        let mut ids: Vec<String> = LOCATIONS.iter().map(|e| e.to_string()).collect();
        for server in self.edge_servers() {
            if !ids.iter().any(|id| id == server.name) {
                ids.push(server.name.to_string());
            }
        }
        tether_common::pki::write_dir(&self.certs(), &ids)?;
        let drivers = self.dir.join("drivers");
        fs::create_dir_all(&drivers)?;
        for (name, text) in DRIVERS {
            fs::write(drivers.join(name), text)?;
        }
        fs::create_dir_all(self.dir.join("logs"))?;
        fs::write(self.dir.join("site.toml"), site_file(self, ports))?;
        for index in 0..ports.masters.len() {
            fs::write(self.master_config(index), master_file(self, ports, index))?;
        }
        for (i, server) in self.edge_servers().iter().enumerate() {
            fs::write(self.edge_config(server.name), edge_file(self, ports, i))?;
        }
        Ok(())
    }
}

/// The pid in a marker, if that process still runs (Linux: `/proc`; elsewhere unknown).
fn running_demo(marker: &Path) -> Option<u32> {
    let text = fs::read_to_string(marker).ok()?;
    let pid: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("pid "))?
        .parse()
        .ok()?;
    let alive = pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists();
    alive.then_some(pid)
}

/// A path as a TOML string.
fn toml_path(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

fn master_file(layout: &Layout, ports: &Ports, index: usize) -> String {
    let certs = layout.certs();
    let name = layout.master_name(index);
    let cluster = match &ports.cluster {
        // A short lease, so that a master's death is quick to watch.
        Some(cluster) => format!(
            "\n[cluster]\nmaster_id = \"{name}\"\netcd = [\"http://127.0.0.1:{}\"]\nlease_ms = 3000\n",
            cluster.etcd_client
        ),
        None => String::new(),
    };
    let text = format!(
        r#"# Written by tether-master demo.
data_dir = {data}
api_listen = "127.0.0.1:{api}"
api_url = "https://localhost:{api}"
link_listen = "127.0.0.1:{link}"
seed = {seed}
repositories_root = {drivers}
boot_wait_ms = 3000

[tls]
cert = {cert}
key = {key}
ca = {ca}
require_client_cert = true
"#,
        data = toml_path(&layout.data(&name)),
        api = ports.masters[index].api,
        link = ports.masters[index].link,
        seed = toml_path(&layout.dir.join("site.toml")),
        drivers = toml_path(&layout.dir.join("drivers")),
        cert = toml_path(&certs.join("master.pem")),
        key = toml_path(&certs.join("master.key")),
        ca = toml_path(&layout.ca()),
    );
    format!("{text}{cluster}")
}

fn edge_file(layout: &Layout, ports: &Ports, index: usize) -> String {
    let server = layout.edge_servers()[index];
    let edge = server.name;
    let certs = layout.certs();
    let pair = match server.pair {
        None => String::new(),
        Some((peer, listens)) => {
            let way = match listens {
                true => format!("peer_listen = \"127.0.0.1:{}\"", ports.peer),
                false => format!(
                    "peer = \"127.0.0.1:{}\"\npeer_name = \"{peer}\"",
                    ports.peer
                ),
            };
            format!(
                "\n# A node of site pair {location}: it links to its peer with the location's secret.\n\
                 [pair]\nnode_id = \"{edge}\"\npeer_id = \"{peer}\"\n{way}\nsecret_file = {secret}\n",
                location = server.location,
                secret = toml_path(&certs.join(format!("{}.secret", server.location))),
            )
        }
    };
    // An edge lists every master (in the order of a hash of its id it tries them).
    let masters = match ports.masters.as_slice() {
        [one] => format!("master = \"127.0.0.1:{}\"", one.link),
        all => format!(
            "masters = [{}]",
            all.iter()
                .map(|m| format!("\"127.0.0.1:{}\"", m.link))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!(
        r#"# Written by tether-master demo.
edge_id = "{location}"
data_dir = {data}
api_listen = "127.0.0.1:{api}"
{masters}
master_name = "localhost"
secret_file = {secret}

[tls]
cert = {cert}
key = {key}
ca = {ca}
{pair}"#,
        location = server.location,
        data = toml_path(&layout.data(edge)),
        api = ports.edge_api[index],
        secret = toml_path(&certs.join(format!("{edge}.secret"))),
        cert = toml_path(&certs.join(format!("{edge}.pem"))),
        key = toml_path(&certs.join(format!("{edge}.key"))),
        ca = toml_path(&layout.ca()),
    )
}

/// Two sites: North campus (room-101: room logic, a projector, a meter; room-102: room
/// logic, a projector) with a warm standby, and South store (store-201: room logic, a
/// projector) with a cold one. A 5 s failover timeout, so a takeover is quick to watch.
fn site_file(layout: &Layout, ports: &Ports) -> String {
    let [p101, p102, p201] = ports.projectors;
    let secret = |edge: &str| toml_path(&layout.certs().join(format!("{edge}.secret")));
    // Among several masters, a lobby of no edge: one master runs it, another when that
    // one dies.
    let lobby = match &ports.cluster {
        Some(cluster) => format!(
            r#"
[[modules]]
id = "lobby-logic"
driver = "room"
name = "Room"

[[modules]]
id = "proj-lobby"
driver = "projector"
name = "Display"
host = "127.0.0.1"
port = {}

[[systems]]
id = "lobby"
name = "Lobby"
modules = ["lobby-logic", "proj-lobby"]
"#,
            cluster.lobby
        ),
        None => String::new(),
    };
    // North campus as a site pair: its holder's death moves the rooms to its standby
    // within the pair timeout; the meter is a collector array, read by both in turn.
    let (nodes, shared_polling) = (
        "\nnodes = [\"site-1a\", \"site-1b\"]\npair_timeout_ms = 5000",
        "\nshared_polling = true",
    );
    let sites = format!(
        r#"# Written by tether-master demo: two sites, three rooms, simulated devices.

[[repositories]]
id = "core"
name = "Example drivers"
path = {drivers}

[[drivers]]
id = "projector"
name = "Line-protocol projector"
repository = "core"
file = "projector.rhai"
transport = "tcp"
delimiter = "\r"
default_settings = {{ poll_ms = 2000 }}

[[drivers]]
id = "meter"
name = "Modbus energy meter"
repository = "core"
file = "meter.rhai"
transport = "modbus"
default_settings = {{ poll_ms = 1000 }}{shared_polling}

[[drivers]]
id = "room"
name = "Room logic"
repository = "core"
file = "room.rhai"
kind = "logic"
transport = "none"

[[edges]]
id = "site-1"
name = "North campus"
secret_file = {secret1}
failover = true
timeout_ms = 5000
standby = "warm"{nodes}

[[edges]]
id = "site-2"
name = "South store"
secret_file = {secret2}
failover = true
timeout_ms = 5000
standby = "cold"

[[modules]]
id = "room-101-logic"
driver = "room"
name = "Room"
edge = "site-1"

[[modules]]
id = "proj-101"
driver = "projector"
name = "Display"
host = "127.0.0.1"
port = {p101}
edge = "site-1"

[[modules]]
id = "meter-101"
driver = "meter"
name = "Meter"
host = "127.0.0.1"
port = {meter}
edge = "site-1"

[[modules]]
id = "room-102-logic"
driver = "room"
name = "Room"
edge = "site-1"

[[modules]]
id = "proj-102"
driver = "projector"
name = "Display"
host = "127.0.0.1"
port = {p102}
edge = "site-1"

[[modules]]
id = "store-201-logic"
driver = "room"
name = "Room"
edge = "site-2"

[[modules]]
id = "proj-201"
driver = "projector"
name = "Display"
host = "127.0.0.1"
port = {p201}
edge = "site-2"

[[systems]]
id = "room-101"
name = "Room 101"
edge = "site-1"
modules = ["room-101-logic", "proj-101", "meter-101"]

[[systems]]
id = "room-102"
name = "Room 102"
edge = "site-1"
modules = ["room-102-logic", "proj-102"]

[[systems]]
id = "store-201"
name = "Store 201"
edge = "site-2"
modules = ["store-201-logic", "proj-201"]
"#,
        drivers = toml_path(&layout.dir.join("drivers")),
        secret1 = secret("site-1"),
        secret2 = secret("site-2"),
        meter = ports.meter,
        nodes = nodes,
        shared_polling = shared_polling,
    );
    format!("{sites}{lobby}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files the demo writes load as the servers would load them.
    #[test]
    fn the_written_files_load() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::prepare(&dir.path().join("demo"), 1).unwrap();
        let ports = Ports::pick(0, 1).unwrap();
        layout.write(&ports).unwrap();
        let master = tether_config::MasterConfig::load(&layout.master_config(0)).unwrap();
        assert_eq!(master.api_listen.port(), ports.master_api());
        assert!(master.cluster.is_none());
        let site = tether_config::SiteFile::load(&layout.dir.join("site.toml")).unwrap();
        assert_eq!(site.edges.len(), 2);
        assert_eq!(site.systems.len(), 3);
        assert_eq!(site.edges[0].nodes, ["site-1a", "site-1b"]);
        for server in layout.edge_servers() {
            let config = tether_config::EdgeConfig::load(&layout.edge_config(server.name)).unwrap();
            assert_eq!(config.edge_id, server.location);
            assert_eq!(
                config.pair.map(|pair| pair.node_id),
                server.pair.map(|_| server.name.to_string())
            );
        }
        // A second start empties the folder it made...
        std::fs::write(layout.dir.join("data-left-over"), "x").unwrap();
        Layout::prepare(&layout.dir, 1).unwrap();
        assert!(!layout.dir.join("data-left-over").exists());
        // ...unless a live demo owns it: this test's process stands in for one.
        let parent = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        std::fs::write(layout.dir.join(MARKER), format!("pid {}\n", parent.id())).unwrap();
        let err = Layout::prepare(&layout.dir, 1).unwrap_err().to_string();
        assert!(err.contains("is running"), "{err}");
        let mut parent = parent;
        parent.kill().unwrap();
        parent.wait().unwrap();
        Layout::prepare(&layout.dir, 1).unwrap();
        // ...and refuses a folder it did not make.
        let foreign = dir.path().join("mine");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("notes.txt"), "keep me").unwrap();
        let err = Layout::prepare(&foreign, 1).unwrap_err().to_string();
        assert!(err.contains("did not make"), "{err}");
        assert!(foreign.join("notes.txt").exists());
    }

    /// Three masters: each a member of one cluster on the demo's etcd, edges listing all.
    #[test]
    fn the_files_of_three_masters_load() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::prepare(&dir.path().join("demo"), 3).unwrap();
        let ports = Ports::pick(0, 3).unwrap();
        assert_eq!(ports.masters.len(), 3);
        layout.write(&ports).unwrap();
        let etcd = ports.cluster.unwrap().etcd_client;
        for index in 0..3 {
            let master = tether_config::MasterConfig::load(&layout.master_config(index)).unwrap();
            let cluster = master.cluster.expect("a [cluster] table");
            assert_eq!(cluster.master_id, format!("m{}", index + 1));
            assert_eq!(cluster.etcd, [format!("http://127.0.0.1:{etcd}")]);
            assert_eq!(master.link_listen.port(), ports.masters[index].link);
        }
        for server in layout.edge_servers() {
            let config = tether_config::EdgeConfig::load(&layout.edge_config(server.name)).unwrap();
            assert_eq!(config.master_addrs().len(), 3);
        }
        let site = tether_config::SiteFile::load(&layout.dir.join("site.toml")).unwrap();
        assert!(
            site.systems
                .iter()
                .any(|s| s.id == "lobby" && s.edge.is_none())
        );
        let mut all: Vec<u16> = ports.masters.iter().flat_map(|m| [m.api, m.link]).collect();
        all.extend(ports.edge_api);
        all.push(ports.peer);
        all.extend(ports.projectors);
        all.extend([
            ports.meter,
            ports.cluster.unwrap().lobby,
            etcd,
            ports.cluster.unwrap().etcd_peer,
        ]);
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count, "every port once");
        assert_eq!(count, Ports::count(3));
    }
}
