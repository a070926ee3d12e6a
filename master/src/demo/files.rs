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

/// The edges of the demo.
pub const EDGES: [&str; 2] = ["site-1", "site-2"];

/// Every port the demo uses.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub master_api: u16,
    pub link: u16,
    pub edge_api: [u16; 2],
    /// Projectors of room-101, room-102 (site-1) and store-201 (site-2).
    pub projectors: [u16; 3],
    /// The meter of room-101.
    pub meter: u16,
}

impl Ports {
    /// `base`, `base + 1`, ... in a fixed order; `0` picks free ones.
    pub fn pick(base: u16) -> anyhow::Result<Ports> {
        let ports = if base == 0 {
            free_ports(8)?
        } else {
            let mut ports = Vec::new();
            for i in 0..8u16 {
                let wanted = base
                    .checked_add(i)
                    .context("--base-port: the demo needs 8 ports from it")?;
                std::net::TcpListener::bind(("127.0.0.1", wanted)).with_context(|| {
                    format!("port {wanted} on 127.0.0.1 is in use (another demo?); pick others with --base-port N, or 0 for any")
                })?;
                ports.push(wanted);
            }
            ports
        };
        Ok(Ports {
            master_api: ports[0],
            edge_api: [ports[1], ports[2]],
            link: ports[3],
            projectors: [ports[4], ports[5], ports[6]],
            meter: ports[7],
        })
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
}

impl Layout {
    pub fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }
    pub fn ca(&self) -> PathBuf {
        self.certs().join("ca.pem")
    }
    pub fn master_config(&self) -> PathBuf {
        self.dir.join("master.toml")
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
    pub fn prepare(dir: &Path) -> anyhow::Result<Layout> {
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
        Ok(Layout { dir })
    }

    /// Writes the certificates, drivers, site file and configurations.
    pub fn write(&self, ports: &Ports) -> anyhow::Result<()> {
        let edges: Vec<String> = EDGES.iter().map(|e| e.to_string()).collect();
        tether_common::pki::write_dir(&self.certs(), &edges)?;
        let drivers = self.dir.join("drivers");
        fs::create_dir_all(&drivers)?;
        for (name, text) in DRIVERS {
            fs::write(drivers.join(name), text)?;
        }
        fs::create_dir_all(self.dir.join("logs"))?;
        fs::write(self.dir.join("site.toml"), site_file(self, ports))?;
        fs::write(self.master_config(), master_file(self, ports))?;
        for (i, edge) in EDGES.iter().enumerate() {
            fs::write(self.edge_config(edge), edge_file(self, ports, i))?;
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

fn master_file(layout: &Layout, ports: &Ports) -> String {
    let certs = layout.certs();
    format!(
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
        data = toml_path(&layout.data("master")),
        api = ports.master_api,
        link = ports.link,
        seed = toml_path(&layout.dir.join("site.toml")),
        drivers = toml_path(&layout.dir.join("drivers")),
        cert = toml_path(&certs.join("master.pem")),
        key = toml_path(&certs.join("master.key")),
        ca = toml_path(&layout.ca()),
    )
}

fn edge_file(layout: &Layout, ports: &Ports, index: usize) -> String {
    let edge = EDGES[index];
    let certs = layout.certs();
    format!(
        r#"# Written by tether-master demo.
edge_id = "{edge}"
data_dir = {data}
api_listen = "127.0.0.1:{api}"
master = "127.0.0.1:{link}"
master_name = "localhost"
secret_file = {secret}

[tls]
cert = {cert}
key = {key}
ca = {ca}
"#,
        data = toml_path(&layout.data(edge)),
        api = ports.edge_api[index],
        link = ports.link,
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
    format!(
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
default_settings = {{ poll_ms = 1000 }}

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
standby = "warm"

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
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files the demo writes load as the servers would load them.
    #[test]
    fn the_written_files_load() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::prepare(&dir.path().join("demo")).unwrap();
        let ports = Ports::pick(0).unwrap();
        layout.write(&ports).unwrap();
        let master = tether_config::MasterConfig::load(&layout.master_config()).unwrap();
        assert_eq!(master.api_listen.port(), ports.master_api);
        let site = tether_config::SiteFile::load(&layout.dir.join("site.toml")).unwrap();
        assert_eq!(site.edges.len(), 2);
        assert_eq!(site.systems.len(), 3);
        for edge in EDGES {
            let config = tether_config::EdgeConfig::load(&layout.edge_config(edge)).unwrap();
            assert_eq!(config.edge_id, edge);
        }
        // A second start empties the folder it made...
        std::fs::write(layout.dir.join("data-left-over"), "x").unwrap();
        Layout::prepare(&layout.dir).unwrap();
        assert!(!layout.dir.join("data-left-over").exists());
        // ...unless a live demo owns it: this test's process stands in for one.
        let parent = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        std::fs::write(layout.dir.join(MARKER), format!("pid {}\n", parent.id())).unwrap();
        let err = Layout::prepare(&layout.dir).unwrap_err().to_string();
        assert!(err.contains("is running"), "{err}");
        let mut parent = parent;
        parent.kill().unwrap();
        parent.wait().unwrap();
        Layout::prepare(&layout.dir).unwrap();
        // ...and refuses a folder it did not make.
        let foreign = dir.path().join("mine");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("notes.txt"), "keep me").unwrap();
        let err = Layout::prepare(&foreign).unwrap_err().to_string();
        assert!(err.contains("did not make"), "{err}");
        assert!(foreign.join("notes.txt").exists());
    }
}
