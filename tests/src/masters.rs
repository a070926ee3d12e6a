//! Several masters in a cluster on a real etcd, each reaching etcd through a fault proxy
//! of its own (so that a test can cut one master off from etcd alone), with edges that
//! list every master. Processes and folders go when it is dropped.
#![cfg(feature = "cluster")]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::api::ApiClient;
use crate::cluster::{copy_core_drivers, run_certs, site_toml};
use crate::etcd::Etcd;
use crate::process::{Server, bin};
use crate::proxy::FaultProxy;
use crate::{free_port, wait_for};

/// What to start.
#[derive(Debug, Clone)]
pub struct MastersSpec {
    /// How many masters (`m1` ...).
    pub masters: usize,
    /// Edge ids.
    pub edges: Vec<String>,
    /// The masters' presence lease.
    pub lease_ms: u64,
    /// TOML keys added to every `[[edges]]` table.
    pub edge_settings: String,
    /// TOML appended to the site file.
    pub site_extra: String,
    /// Files written into the folder first (path, content).
    pub files: Vec<(String, String)>,
    /// etcd's members. With one, each master reaches it through a fault proxy of its own;
    /// with more, each master lists every member's own address.
    pub etcd_members: usize,
    /// Each master's wall clock, off by this many seconds (by index; missing: none).
    pub clock_offsets_s: Vec<i64>,
}

/// One master of the cluster.
pub struct Master {
    /// Its id.
    pub id: String,
    /// Its process.
    pub server: Server,
    /// Its link listener.
    pub link_addr: SocketAddr,
    /// Its API.
    pub api_addr: SocketAddr,
    /// Its way to etcd (when etcd has one member).
    pub etcd_proxy: FaultProxy,
}

/// A running cluster of masters and edges.
pub struct Masters {
    /// The masters, `m1` first.
    pub masters: Vec<Master>,
    /// The edges, in spec order.
    pub edges: Vec<Server>,
    /// Each edge's API address.
    pub edge_api_addrs: Vec<SocketAddr>,
    /// The spec.
    pub spec: MastersSpec,
    /// etcd.
    pub etcd: Etcd,
    /// Certificates, configurations, data, logs; last, so that it goes after the processes.
    pub dir: tempfile::TempDir,
}

impl Masters {
    /// Starts etcd, the masters (each waited for), then the edges.
    pub async fn start(spec: MastersSpec) -> Masters {
        let etcd = Etcd::start(spec.etcd_members.max(1)).await;
        let etcd_addr: SocketAddr = etcd.endpoints()[0]
            .trim_start_matches("http://")
            .parse()
            .unwrap();
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        run_certs(&root.join("certs"), &spec.edges);
        copy_core_drivers(&root.join(crate::CORE));
        for (path, content) in &spec.files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        std::fs::write(
            root.join("site.toml"),
            format!(
                "{}{}",
                site_toml(&spec.edges, &spec.edge_settings),
                spec.site_extra
            ),
        )
        .unwrap();
        let mut masters = Vec::new();
        for i in 1..=spec.masters {
            let id = format!("m{i}");
            let link_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let api_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let etcd_proxy = FaultProxy::start(0, etcd_addr).await;
            let config = root.join(format!("{id}.toml"));
            std::fs::write(
                &config,
                format!(
                    "id = \"{id}\"\ndata_dir = \"data/{id}\"\napi_listen = \"{api_addr}\"\napi_url = \"https://localhost:{}\"\n\
                     link_listen = \"{link_addr}\"\nseed = \"site.toml\"\nrepositories_root = \"repos\"\nboot_wait_ms = 300\n\
                     [tls]\ncert = \"certs/master.pem\"\nkey = \"certs/master.key\"\nca = \"certs/ca.pem\"\n\
                     [cluster]\nmaster_id = \"{id}\"\netcd = [{}]\nlease_ms = {}\n",
                    api_addr.port(),
                    match spec.etcd_members {
                        0 | 1 => format!("\"http://{}\"", etcd_proxy.addr()),
                        _ => etcd
                            .endpoints()
                            .iter()
                            .map(|e| format!("\"{e}\""))
                            .collect::<Vec<_>>()
                            .join(", "),
                    },
                    spec.lease_ms,
                ),
            )
            .unwrap();
            let server = Server::start_with_env(
                &id,
                &bin("tether-master"),
                &["--config", config.to_str().unwrap()],
                &root.join(format!("{id}.log")),
                crate::skew::wall_clock_off_by(
                    spec.clock_offsets_s.get(i - 1).copied().unwrap_or(0),
                ),
            );
            masters.push(Master {
                id,
                server,
                link_addr,
                api_addr,
                etcd_proxy,
            });
        }
        let mut cluster = Masters {
            masters,
            edges: Vec::new(),
            edge_api_addrs: Vec::new(),
            spec: spec.clone(),
            etcd,
            dir,
        };
        for i in 0..cluster.masters.len() {
            cluster.wait_master_up(i).await;
        }
        let list = cluster
            .masters
            .iter()
            .map(|m| format!("\"{}\"", m.link_addr))
            .collect::<Vec<_>>()
            .join(", ");
        for edge in &spec.edges {
            let edge_api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            cluster.edge_api_addrs.push(edge_api);
            let config = cluster.path(&format!("{edge}.toml"));
            std::fs::write(
                &config,
                format!(
                    "edge_id = \"{edge}\"\ndata_dir = \"data/{edge}\"\napi_listen = \"{edge_api}\"\n\
                     masters = [{list}]\nmaster_name = \"localhost\"\nsecret_file = \"certs/{edge}.secret\"\n\
                     [tls]\ncert = \"certs/{edge}.pem\"\nkey = \"certs/{edge}.key\"\nca = \"certs/ca.pem\"\n"
                ),
            )
            .unwrap();
            let server = Server::start(
                edge,
                &bin("tether-edge"),
                &["--config", config.to_str().unwrap()],
                &cluster.path(&format!("{edge}.log")),
            );
            cluster.edges.push(server);
        }
        cluster
    }

    /// A path inside the folder.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Master `index`'s API with its admin token.
    pub fn master_api(&self, index: usize) -> ApiClient {
        let id = &self.masters[index].id;
        let token = std::fs::read_to_string(self.path(&format!("data/{id}/admin.token")))
            .ok()
            .map(|t| t.trim().to_string());
        ApiClient::new(
            &format!("https://localhost:{}", self.masters[index].api_addr.port()),
            &self.path("certs/ca.pem"),
            token,
        )
    }

    /// Edge `index`'s API with its admin token (waiting for the token file).
    pub async fn edge_admin(&self, index: usize) -> ApiClient {
        let edge = &self.spec.edges[index];
        let path = self.path(&format!("data/{edge}/admin.token"));
        let token = wait_for(
            "the edge's admin token",
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
            &format!("https://127.0.0.1:{}", self.edge_api_addrs[index].port()),
            &self.path("certs/ca.pem"),
            Some(token),
        )
    }

    /// Waits until master `index` answers health, booted.
    pub async fn wait_master_up(&self, index: usize) {
        let api = self.master_api(index);
        wait_for("a master's API", Duration::from_secs(30), || async {
            let (status, body) = api.get("/api/v1/health").await;
            (status == 200 && body["booted"] == true).then_some(())
        })
        .await;
    }
}
