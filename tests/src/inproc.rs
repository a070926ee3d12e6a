//! An edge link in process: a master listener and an edge connector over real TLS on
//! loopback with dev certificates, for tests of the link itself.

use std::sync::Arc;
use std::time::Duration;

use tether_common::link::{
    ConnectorConfig, EdgeSecrets, Incoming, LinkConfig, ListenerConfig, Secret, connect_once,
    run_listener, tls,
};
use tether_common::pki;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::proxy::FaultProxy;

/// What a [`pair`] needs kept alive: certificates, the listener, the proxy.
pub struct Keep {
    _dir: tempfile::TempDir,
    /// The proxy between the two, when asked for.
    pub proxy: Option<FaultProxy>,
    _stop: DropGuard,
}

/// The one edge the in-process listener knows.
struct OneEdge(Secret);

impl EdgeSecrets for OneEdge {
    fn secret(&self, edge_id: &str) -> Option<Secret> {
        (edge_id == "site-1").then(|| self.0.clone())
    }
}

/// A master listener and a connected edge link, optionally through a [`FaultProxy`]:
/// the edge's side and its incoming queue, the master's side and its queue, and what
/// keeps the rest alive.
pub async fn pair(
    max_frame: usize,
    proxied: bool,
) -> (
    tether_common::link::Link,
    mpsc::Receiver<Incoming>,
    tether_common::link::Link,
    mpsc::Receiver<Incoming>,
    Keep,
) {
    tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    pki::write_dir(dir.path(), &["site-1".into()]).unwrap();
    let path = |name: &str| dir.path().join(name);
    let secret = Secret::load(&path("site-1.secret")).unwrap();
    let server_tls = tls::link_server_config(
        &path("master.pem"),
        &path("master.key"),
        Some(&path("ca.pem")),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted_rx) = mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let link_config = LinkConfig::with_heartbeat(Duration::from_millis(200), max_frame);
    tokio::spawn(run_listener(
        listener,
        server_tls,
        Arc::new(OneEdge(secret.clone())),
        ListenerConfig {
            handshake_timeout: Duration::from_secs(2),
            first_byte_timeout: Duration::from_secs(2),
            pending: tether_common::admission::AdmissionLimits {
                max_pending: 8,
                max_per_address: 8,
            },
            max_links: 64,
            gauges: None,
            link: link_config.clone(),
        },
        accepted_tx,
        shutdown.clone(),
    ));
    let proxy = if proxied {
        Some(FaultProxy::start(0, addr).await)
    } else {
        None
    };
    let connect_to = proxy.as_ref().map_or(addr, |p| p.addr());
    let connector = ConnectorConfig {
        master_addrs: vec![connect_to.to_string()],
        server_name: tls::server_name("localhost").unwrap(),
        tls: tls::client_config(
            &path("ca.pem"),
            Some((&path("site-1.pem"), &path("site-1.key"))),
        )
        .unwrap(),
        edge_id: "site-1".into(),
        secret,
        handshake_timeout: Duration::from_secs(2),
        reconnect: Duration::from_secs(3),
        link: link_config,
    };
    let (edge_link, edge_incoming) = connect_once(&connector).await.unwrap();
    let master_side = accepted_rx.recv().await.unwrap();
    assert_eq!(master_side.edge_id, "site-1");
    let keep = Keep {
        _dir: dir,
        proxy,
        _stop: shutdown.drop_guard(),
    };
    (
        edge_link,
        edge_incoming,
        master_side.link,
        master_side.incoming,
        keep,
    )
}
