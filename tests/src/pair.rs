//! A site pair as real processes: a master, and one location (`site-1`) of two nodes
//! (`site-1a`, which listens for its peer, and `site-1b`, which connects), or three
//! (each node listening for those after it), with a fault proxy on each node's link to
//! the master and one on each link between two nodes, so a test can cut any of them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::api::ApiClient;
use crate::cluster::{copy_core_drivers, run_certs};
use crate::process::{Server, bin};
use crate::proxy::FaultProxy;
use crate::{free_port, wait_for};

/// The location.
pub const LOCATION: &str = "site-1";
/// Its nodes, the first preferred (a pair: the first two).
pub const NODES: [&str; 3] = ["site-1a", "site-1b", "site-1c"];

/// What to start.
#[derive(Debug, Clone)]
pub struct PairSpec {
    /// TOML keys added to the location's `[[edges]]` table (`isolation = "stop"`).
    pub edge_settings: String,
    /// TOML appended to the site file (repositories, drivers, modules, systems).
    pub site_extra: String,
    /// Heartbeats of every link.
    pub heartbeat_ms: u64,
    /// Files written into the folder before anything starts (path, content).
    pub files: Vec<(String, String)>,
    /// TOML added to each node's file (by index) after its top-level keys: tables such
    /// as `[device_routes]`.
    pub node_extra: Vec<String>,
    /// Masters: one alone (each node's link to it behind a fault proxy), or several on a
    /// local etcd (`m1`, `m2` ...; each node lists them all, without proxies).
    pub masters: usize,
    /// Nodes: two (a pair, whose files name the peer with `peer_id`) or three (each
    /// lists its peers in `[[pair.peers]]`).
    pub nodes: usize,
}

impl Default for PairSpec {
    fn default() -> Self {
        PairSpec {
            edge_settings: String::new(),
            site_extra: String::new(),
            heartbeat_ms: 500,
            files: Vec::new(),
            node_extra: Vec::new(),
            masters: 1,
            nodes: 2,
        }
    }
}

/// A running pair. Dropping it kills every process and removes the folder.
pub struct PairSite {
    /// The masters (one, or several), in order.
    pub masters: Vec<Server>,
    /// Their API addresses.
    pub api_addrs: Vec<SocketAddr>,
    /// Several masters' etcd.
    pub etcd: Option<crate::etcd::Etcd>,
    /// The nodes, in [`NODES`] order.
    pub nodes: Vec<Server>,
    /// The proxy on each node's link to the master, in [`NODES`] order (one master).
    pub master_links: Vec<FaultProxy>,
    /// The proxy on each link between two nodes `(i, j)`, `i < j`: `j` connects to `i`.
    peer_links: Vec<((usize, usize), FaultProxy)>,
    /// Where each node listens for the peers after it (behind their proxies).
    peer_listen_addrs: Vec<SocketAddr>,
    /// Each node's API address.
    pub node_api_addrs: Vec<SocketAddr>,
    /// The temporary folder, last: removed after the processes are killed.
    pub dir: tempfile::TempDir,
}

impl PairSite {
    /// Writes certificates (`tether-master certs --edges site-1,site-1a,site-1b`) and
    /// configuration, starts the master, waits for its API, then starts both nodes.
    pub async fn start(spec: PairSpec) -> PairSite {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_path_buf();
        let node_ids = &NODES[..spec.nodes];
        let ids: Vec<String> = std::iter::once(LOCATION)
            .chain(node_ids.iter().copied())
            .map(str::to_string)
            .collect();
        run_certs(&root.join("certs"), &ids);
        copy_core_drivers(&root.join(crate::CORE));
        for (path, content) in &spec.files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        let nodes = node_ids
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            root.join("site.toml"),
            format!(
                "[[edges]]\nid = \"{LOCATION}\"\nname = \"North campus\"\nsecret_file = \"certs/{LOCATION}.secret\"\n\
                 nodes = [{nodes}]\n{}\n\n{}",
                spec.edge_settings, spec.site_extra
            ),
        )
        .unwrap();
        let etcd = match spec.masters {
            0 | 1 => None,
            _ => Some(crate::etcd::Etcd::start(1).await),
        };
        let mut masters = Vec::new();
        let mut api_addrs = Vec::new();
        let mut link_addrs = Vec::new();
        for i in 1..=spec.masters.max(1) {
            let id = match etcd {
                None => "master".to_string(),
                Some(_) => format!("m{i}"),
            };
            let link_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let api_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let cluster = match &etcd {
                None => String::new(),
                Some(etcd) => format!(
                    "[cluster]\nmaster_id = \"{id}\"\netcd = [\"{}\"]\nlease_ms = 2000\n",
                    etcd.endpoints()[0]
                ),
            };
            std::fs::write(
                root.join(format!("{id}.toml")),
                format!(
                    "id = \"{id}\"\ndata_dir = \"data/{id}\"\napi_listen = \"{api_addr}\"\napi_url = \"https://localhost:{}\"\nlink_listen = \"{link_addr}\"\n\
                     seed = \"site.toml\"\nrepositories_root = \"repos\"\nheartbeat_ms = {}\nboot_wait_ms = 300\n\
                     [tls]\ncert = \"certs/master.pem\"\nkey = \"certs/master.key\"\nca = \"certs/ca.pem\"\n{cluster}",
                    api_addr.port(),
                    spec.heartbeat_ms
                ),
            )
            .unwrap();
            masters.push(Server::start(
                &id,
                &bin("tether-master"),
                &[
                    "--config",
                    root.join(format!("{id}.toml")).to_str().unwrap(),
                ],
                &root.join(format!("{id}.log")),
            ));
            api_addrs.push(api_addr);
            link_addrs.push(link_addr);
        }
        let peer_listen_addrs: Vec<SocketAddr> = node_ids
            .iter()
            .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
            .collect();
        let mut peer_links = Vec::new();
        for (i, listen) in peer_listen_addrs.iter().enumerate() {
            for j in i + 1..spec.nodes {
                let proxy = FaultProxy::start(0, *listen).await;
                peer_links.push(((i, j), proxy));
            }
        }
        let proxy_between = |i: usize, j: usize| {
            let found = peer_links.iter().find(|(ends, _)| *ends == (i, j));
            found.expect("a peer link").1.addr()
        };
        let mut master_links = Vec::new();
        let mut node_api_addrs = Vec::new();
        for (i, node) in node_ids.iter().enumerate() {
            let masters_key = match link_addrs.as_slice() {
                [one] => {
                    let proxy = FaultProxy::start(0, *one).await;
                    let key = format!("master = \"{}\"", proxy.addr());
                    master_links.push(proxy);
                    key
                }
                all => format!(
                    "masters = [{}]",
                    all.iter()
                        .map(|a| format!("\"{a}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            // A node listens for the nodes after it, and connects to those before it.
            let listen = match i + 1 < spec.nodes {
                true => format!("peer_listen = \"{}\"\n", peer_listen_addrs[i]),
                false => String::new(),
            };
            let peers = match spec.nodes {
                2 => match i {
                    0 => format!("peer_id = \"{}\"\n{listen}", node_ids[1]),
                    _ => format!(
                        "peer_id = \"{}\"\npeer = \"{}\"\npeer_name = \"{}\"\n",
                        node_ids[0],
                        proxy_between(0, 1),
                        node_ids[0]
                    ),
                },
                _ => {
                    let mut peers = listen;
                    for (j, peer) in node_ids.iter().enumerate().filter(|(j, _)| *j != i) {
                        peers += &format!("[[pair.peers]]\nid = \"{peer}\"\n");
                        if j < i {
                            peers +=
                                &format!("addr = \"{}\"\nname = \"{peer}\"\n", proxy_between(j, i));
                        }
                    }
                    peers
                }
            };
            std::fs::write(
                root.join(format!("{node}.toml")),
                format!(
                    "edge_id = \"{LOCATION}\"\ndata_dir = \"data/{node}\"\napi_listen = \"{api}\"\n\
                     {masters_key}\nmaster_name = \"localhost\"\nsecret_file = \"certs/{node}.secret\"\n\
                     heartbeat_ms = {}\nreconnect_ms = 500\n{}\n\
                     [tls]\ncert = \"certs/{node}.pem\"\nkey = \"certs/{node}.key\"\nca = \"certs/ca.pem\"\n\
                     [pair]\nnode_id = \"{node}\"\nsecret_file = \"certs/{LOCATION}.secret\"\n{peers}",
                    spec.heartbeat_ms,
                    spec.node_extra.get(i).map(String::as_str).unwrap_or_default(),
                ),
            )
            .unwrap();
            node_api_addrs.push(api);
        }
        let mut site = PairSite {
            masters,
            api_addrs,
            etcd,
            nodes: Vec::new(),
            master_links,
            peer_links,
            peer_listen_addrs,
            node_api_addrs,
            dir,
        };
        for i in 0..site.masters.len() {
            site.wait_master_up(i).await;
        }
        for node in node_ids {
            let server = Server::start(
                node,
                &bin("tether-edge"),
                &[
                    "--config",
                    site.path(&format!("{node}.toml")).to_str().unwrap(),
                ],
                &site.path(&format!("{node}.log")),
            );
            site.nodes.push(server);
        }
        site
    }

    /// The fault proxy on the link between nodes `i` and `j`.
    pub fn peer_link(&self, i: usize, j: usize) -> &FaultProxy {
        let ends = (i.min(j), i.max(j));
        let found = self.peer_links.iter().find(|(between, _)| *between == ends);
        &found.expect("a link between two of the nodes").1
    }

    /// Where node `i` listens for its peers (behind their proxies).
    pub fn peer_listen_addr(&self, i: usize) -> SocketAddr {
        self.peer_listen_addrs[i]
    }

    /// A path inside the folder.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// An API client of the (first) master with its admin token.
    pub fn master_api(&self) -> ApiClient {
        self.master_api_at(0)
    }

    /// An API client of master `index` with the first master's admin token (every
    /// master's works on each among several).
    pub fn master_api_at(&self, index: usize) -> ApiClient {
        let name = match self.etcd {
            None => "master",
            Some(_) => "m1",
        };
        let token = std::fs::read_to_string(self.path(&format!("data/{name}/admin.token")))
            .ok()
            .map(|t| t.trim().to_string());
        ApiClient::new(
            &format!("https://localhost:{}", self.api_addrs[index].port()),
            &self.path("certs/ca.pem"),
            token,
        )
    }

    /// An API client of node `index` with its admin token (waiting for the file).
    pub async fn node_api(&self, index: usize) -> ApiClient {
        let path = self.path(&format!("data/{}/admin.token", NODES[index]));
        let token = wait_for(
            "the node's admin token",
            Duration::from_secs(10),
            || async {
                std::fs::read_to_string(&path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            },
        )
        .await;
        ApiClient::new(
            &format!("https://127.0.0.1:{}", self.node_api_addrs[index].port()),
            &self.path("certs/ca.pem"),
            Some(token),
        )
    }

    async fn wait_master_up(&self, index: usize) {
        let api = ApiClient::new(
            &format!("https://localhost:{}", self.api_addrs[index].port()),
            &self.path("certs/ca.pem"),
            None,
        );
        wait_for("the master's API", Duration::from_secs(20), || async {
            let (status, body) = api.get("/api/v1/health").await;
            (status == 200 && body["booted"] == true).then_some(())
        })
        .await;
    }

    /// The master's view of the location (`GET /api/v1/edges`).
    pub async fn location(&self) -> serde_json::Value {
        self.master_api()
            .edge(LOCATION)
            .await
            .expect("the location in /api/v1/edges")
    }

    /// Node `index`'s own view of its pair (`node` of its `GET /api/v1/edges`).
    pub async fn node_view(&self, index: usize) -> Option<serde_json::Value> {
        let api = self.node_api(index).await;
        Some(api.edge(LOCATION).await?["node"].clone())
    }

    /// Waits until the master names `node` the holder (`role = "holder"`, with both its
    /// link and the grant saying so), within `limit`.
    pub async fn wait_holder(&self, node: &str, limit: Duration) {
        wait_for(&format!("{node} to hold the modules"), limit, || async {
            let location = self.location().await;
            location["nodes"]
                .as_array()?
                .iter()
                .any(|n| n["id"] == node && n["role"] == "holder")
                .then_some(())
        })
        .await;
    }
}

/// Site-file text for a collector array on the location: a Modbus meter at `meter`
/// (127.0.0.1) whose driver declares `shared_polling`, polled every `poll_ms` in all, in
/// system `plant`.
pub fn array_site(meter: u16, poll_ms: u64) -> String {
    format!(
        r#"
[[repositories]]
id = "core"
path = "{core}"

[[drivers]]
id = "meter"
repository = "core"
file = "meter.rhai"
transport = "modbus"
shared_polling = true
default_settings = {{ poll_ms = {poll_ms} }}

[[modules]]
id = "meter"
driver = "meter"
name = "Meter"
host = "127.0.0.1"
port = {meter}
edge = "{LOCATION}"

[[systems]]
id = "plant"
name = "Plant"
edge = "{LOCATION}"
modules = ["meter"]
"#,
        core = crate::CORE,
    )
}
