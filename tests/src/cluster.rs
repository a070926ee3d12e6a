//! A master and its edges as real processes in a temporary folder, on free ports, with
//! certificates from `tether-master certs` and an optional fault proxy on each edge link.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::api::ApiClient;
use crate::process::{Server, bin};
use crate::proxy::FaultProxy;
use crate::{free_port, wait_for};

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Edge ids.
    pub edges: Vec<String>,
    /// Heartbeat interval on both sides.
    pub heartbeat_ms: u64,
    /// The master's handshake deadline.
    pub handshake_timeout_ms: u64,
    /// Route each edge's link through a [`FaultProxy`].
    pub proxied: bool,
    /// TOML keys added to every `[[edges]]` table of the site file (`failover = false`).
    pub edge_settings: String,
    /// TOML appended to the site file (repositories, drivers, modules, systems).
    pub site_extra: String,
    /// How long the master waits for absent edges at boot (the cluster starts the edges
    /// after the master has booted, so the default is short).
    pub boot_wait_ms: u64,
    /// Lines added to master.toml before its `[tls]` table.
    pub master_extra: String,
    /// Lines added to every edge's toml before its `[tls]` table.
    pub edge_extra: String,
    /// Files written into the cluster's folder before anything starts (path, content),
    /// such as a repository of test drivers (inside `repos/`, the repositories root).
    pub files: Vec<(String, String)>,
    /// The master's `repositories_root`, relative to the cluster's folder or absolute;
    /// `repos` by default, which holds a copy of the workspace's drivers at `repos/core`
    /// ([`crate::CORE`]).
    pub repositories_root: String,
}

impl ClusterSpec {
    /// `n` edges named `site-1` ... with default timings.
    pub fn edges(n: usize) -> ClusterSpec {
        ClusterSpec {
            edges: (1..=n).map(|i| format!("site-{i}")).collect(),
            heartbeat_ms: 1000,
            handshake_timeout_ms: 5000,
            proxied: false,
            boot_wait_ms: 300,
            edge_settings: String::new(),
            site_extra: String::new(),
            master_extra: String::new(),
            edge_extra: String::new(),
            files: Vec::new(),
            repositories_root: "repos".into(),
        }
    }
}

/// A running cluster. Dropping it kills every process and removes the folder.
pub struct Cluster {
    /// The master.
    pub master: Server,
    /// The edges, in spec order.
    pub edges: Vec<Server>,
    /// Each edge's proxy, when proxied.
    pub proxies: Vec<FaultProxy>,
    /// The master's link address.
    pub link_addr: SocketAddr,
    /// The master's API address.
    pub api_addr: SocketAddr,
    /// Each edge's API address.
    pub edge_api_addrs: Vec<SocketAddr>,
    /// The spec it was started from.
    pub spec: ClusterSpec,
    /// The temporary folder (certificates, configurations, data, logs). Last, so that it
    /// is removed after the processes are killed and their logs printed.
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Writes certificates and configuration, starts the master, waits for its API, then
    /// starts the edges.
    pub async fn start(spec: ClusterSpec) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let certs = root.join("certs");
        run_certs(&certs, &spec.edges);
        copy_core_drivers(&root.join(crate::CORE));
        for (path, content) in &spec.files {
            let path = root.join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            std::fs::write(path, content).unwrap();
        }

        let link_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let api_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        std::fs::write(
            root.join("site.toml"),
            format!(
                "{}{}",
                site_toml(&spec.edges, &spec.edge_settings),
                spec.site_extra
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("master.toml"),
            format!(
                "data_dir = \"data/master\"\napi_listen = \"{api_addr}\"\napi_url = \"https://localhost:{}\"\nlink_listen = \"{link_addr}\"\n\
                 seed = \"site.toml\"\nrepositories_root = \"{}\"\nheartbeat_ms = {}\nhandshake_timeout_ms = {}\nboot_wait_ms = {}\n{}\n\
                 [tls]\ncert = \"certs/master.pem\"\nkey = \"certs/master.key\"\nca = \"certs/ca.pem\"\n",
                api_addr.port(),
                spec.repositories_root,
                spec.heartbeat_ms,
                spec.handshake_timeout_ms,
                spec.boot_wait_ms,
                spec.master_extra
            ),
        )
        .unwrap();
        let master = Server::start(
            "master",
            &bin("tether-master"),
            &["--config", root.join("master.toml").to_str().unwrap()],
            &root.join("master.log"),
        );

        let mut proxies = Vec::new();
        let mut edge_api_addrs = Vec::new();
        for edge in &spec.edges {
            let master_addr = if spec.proxied {
                let proxy = FaultProxy::start(0, link_addr).await;
                let addr = proxy.addr();
                proxies.push(proxy);
                addr
            } else {
                link_addr
            };
            let edge_api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            edge_api_addrs.push(edge_api);
            std::fs::write(
                root.join(format!("{edge}.toml")),
                format!(
                    "edge_id = \"{edge}\"\ndata_dir = \"data/{edge}\"\napi_listen = \"{edge_api}\"\n\
                     master = \"{master_addr}\"\nmaster_name = \"localhost\"\nsecret_file = \"certs/{edge}.secret\"\n\
                     heartbeat_ms = {}\n{}\n\
                     [tls]\ncert = \"certs/{edge}.pem\"\nkey = \"certs/{edge}.key\"\nca = \"certs/ca.pem\"\n",
                    spec.heartbeat_ms, spec.edge_extra
                ),
            )
            .unwrap();
        }

        let mut cluster = Cluster {
            dir,
            master,
            edges: Vec::new(),
            proxies,
            link_addr,
            api_addr,
            edge_api_addrs,
            spec,
        };
        cluster.wait_master_up().await;
        for edge in cluster.spec.edges.clone() {
            let server = Server::start(
                &edge,
                &bin("tether-edge"),
                &[
                    "--config",
                    cluster.path(&format!("{edge}.toml")).to_str().unwrap(),
                ],
                &cluster.path(&format!("{edge}.log")),
            );
            cluster.edges.push(server);
        }
        cluster
    }

    /// A path inside the cluster's folder.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.path("certs/ca.pem")
    }

    /// An API client of the master with its admin token.
    pub fn master_api(&self) -> ApiClient {
        let token = std::fs::read_to_string(self.path("data/master/admin.token"))
            .ok()
            .map(|t| t.trim().to_string());
        ApiClient::new(
            &format!("https://localhost:{}", self.api_addr.port()),
            &self.ca(),
            token,
        )
    }

    /// An API client of edge `index` with the edge's admin token.
    /// An edge that was just started may not have written its token yet: this waits for
    /// the file (up to 10 s), so that a client made early does not stay without one.
    pub fn edge_admin(&self, index: usize) -> ApiClient {
        let edge = &self.spec.edges[index];
        let path = self.path(&format!("data/{edge}/admin.token"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let token = loop {
            match std::fs::read_to_string(&path) {
                Ok(text) if !text.trim().is_empty() => break Some(text.trim().to_string()),
                _ if std::time::Instant::now() >= deadline => break None,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        self.edge_api(index).with_token(token)
    }

    /// An API client of edge `index` (no token).
    pub fn edge_api(&self, index: usize) -> ApiClient {
        ApiClient::new(
            // Development edge certificates name the loopback address, not `localhost`
            // (the master's name).
            &format!("https://127.0.0.1:{}", self.edge_api_addrs[index].port()),
            &self.ca(),
            None,
        )
    }

    /// Waits until the master answers health.
    pub async fn wait_master_up(&self) {
        let api = ApiClient::new(
            &format!("https://localhost:{}", self.api_addr.port()),
            &self.ca(),
            None,
        );
        wait_for("the master's API", Duration::from_secs(20), || async {
            let (status, body) = api.get("/api/v1/health").await;
            (status == 200 && body["booted"] == true).then_some(())
        })
        .await;
    }

    /// Waits until edge `index` answers health on its own API.
    pub async fn wait_edge_api_up(&self, index: usize) {
        let api = self.edge_api(index);
        wait_for("the edge's API", Duration::from_secs(20), || async {
            (api.get("/api/v1/health").await.0 == 200).then_some(())
        })
        .await;
    }

    /// Waits until the master shows `edge` online (or offline), within `limit`.
    pub async fn wait_edge_online(&self, edge: &str, online: bool, limit: Duration) {
        let api = self.master_api();
        let what = format!("{edge} to be {}", if online { "online" } else { "offline" });
        wait_for(&what, limit, || async {
            (api.edge_online(edge).await == Some(online)).then_some(())
        })
        .await;
    }
}

impl Cluster {
    /// Waits until edge `index`'s replica (`GET /api/v1/replica` on the edge) equals the
    /// master's slice for it (records, version and model id), and returns it; panics
    /// after `limit` showing both.
    pub async fn wait_replica_in_sync(&self, index: usize, limit: Duration) -> serde_json::Value {
        let edge_id = self.spec.edges[index].clone();
        let master = self.master_api();
        let edge = self.edge_admin(index);
        let mut last = (serde_json::Value::Null, serde_json::Value::Null);
        let found = tokio::time::timeout(limit, async {
            loop {
                let (_, slice) = master.get(&format!("/api/v1/edges/{edge_id}/slice")).await;
                let (_, replica) = edge.get("/api/v1/replica").await;
                if slice["version"].is_u64() && slice == replica {
                    return slice;
                }
                last = (slice, replica);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "{edge_id} never matched:\nslice   {}\nreplica {}",
                last.0, last.1
            )
        })
    }
}

/// The `[[edges]]` tables of a site file: `edges`, each with `settings` added.
pub fn site_toml(edges: &[String], settings: &str) -> String {
    edges
        .iter()
        .map(|edge| {
            format!(
                "[[edges]]\nid = \"{edge}\"\nname = \"Test {edge}\"\nsecret_file = \"certs/{edge}.secret\"\n{settings}\n\n"
            )
        })
        .collect()
}

/// Copies the workspace's example drivers to `to` (the repositories root holds the
/// repositories: the workspace's own folder is outside it).
pub fn copy_core_drivers(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(crate::drivers_dir()).expect("the workspace's drivers") {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// Runs `tether-master certs` (the real command) into `dir`.
pub fn run_certs(dir: &Path, edges: &[String]) {
    let mut args = vec![
        "certs".to_string(),
        "--dir".into(),
        dir.display().to_string(),
    ];
    if !edges.is_empty() {
        args.extend(["--edges".into(), edges.join(",")]);
    }
    let status = Command::new(bin("tether-master"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run tether-master certs");
    assert!(status.success(), "tether-master certs failed");
}
