//! A real etcd (Debian's `etcd-server`; `TETHER_ETCD` names another binary) of one or
//! more members, on free loopback ports in a temporary folder, killed when dropped.

use std::path::PathBuf;
use std::time::Duration;

use crate::process::Server;
use crate::{free_port, wait_for};

/// The etcd binary: `TETHER_ETCD`, else `etcd` on the PATH; panics naming the package.
pub fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TETHER_ETCD") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|path| path.is_file())
    });
    found.expect(
        "etcd is missing: install Debian's etcd-server package (bash .ci/run does), \
         or name the binary in TETHER_ETCD",
    )
}

/// One member.
pub struct Member {
    /// Its process.
    pub server: Server,
    /// Its client URL, `http://127.0.0.1:PORT`.
    pub client_url: String,
}

/// A running etcd cluster. Dropping it kills the members and removes the folder.
pub struct Etcd {
    /// The members, in start order.
    pub members: Vec<Member>,
    /// Data folders and logs; last, so that it goes after the processes.
    pub dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts `n` members forming one cluster and waits until it serves requests.
    pub async fn start(n: usize) -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let binary = etcd_binary();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let data = dir.path().join(&name);
            let args = [
                "--name",
                &name,
                "--data-dir",
                data.to_str().unwrap(),
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "tether-test",
                // Quick elections, so that a test losing a member moves on in seconds.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ];
            let log = dir.path().join(format!("{name}.log"));
            let server = Server::start(&format!("etcd-{name}"), &binary, &args, &log);
            members.push(Member { server, client_url });
        }
        let etcd = Etcd { members, dir };
        etcd.wait_healthy(Duration::from_secs(20)).await;
        etcd
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Waits until a member's `/health` says the cluster has a leader.
    pub async fn wait_healthy(&self, limit: Duration) {
        self.wait_health_of("etcd to be healthy", self.endpoints(), limit)
            .await;
    }

    /// Waits until member `index` itself answers healthy: it is back in the cluster and
    /// serves a read through the quorum (etcd's `/health` runs one), not merely started.
    pub async fn wait_member_healthy(&self, index: usize, limit: Duration) {
        let what = format!("etcd member {index} to be back in the cluster");
        let url = self.members[index].client_url.clone();
        self.wait_health_of(&what, vec![url], limit).await;
    }

    /// Waits until one of `urls` answers `/health` with `true`.
    async fn wait_health_of(&self, what: &str, urls: Vec<String>, limit: Duration) {
        // The HTTP client brings no TLS provider of its own (plain HTTP here, but it asks).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        wait_for(what, limit, || {
            let client = client.clone();
            let urls = urls.clone();
            async move {
                for url in urls {
                    // A member down (or still starting) is passed over for the next.
                    let Ok(health) = client.get(format!("{url}/health")).send().await else {
                        continue;
                    };
                    let body: serde_json::Value = health.json().await.unwrap_or_default();
                    if body["health"] == "true" {
                        return Some(());
                    }
                }
                None
            }
        })
        .await;
    }
}
