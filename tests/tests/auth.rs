//! Authentication of the edge link against the real master binary: every way in that
//! should fail does, with a clear reason in the master's log, while a real edge's link
//! carries on untouched.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tether_common::link::auth::{Transcript, edge_proof};
use tether_common::link::{
    ConnectorConfig, LinkConfig, Secret, client_exporter, connect_once, edge_handshake, tls,
};
use tether_common::protocol::{FrameCodec, HANDSHAKE_MAX_FRAME, Handshake, PROTOCOL_VERSION};
use tether_tests::cluster::{Cluster, ClusterSpec};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

async fn tls_to(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(tls::server_name("localhost").unwrap(), tcp)
        .await
}

fn edge_tls(cluster: &Cluster, certs: &Path, edge: &str) -> Arc<rustls::ClientConfig> {
    let cert = certs.join(format!("{edge}.pem"));
    let key = certs.join(format!("{edge}.key"));
    tls::client_config(&cluster.ca(), Some((&cert, &key))).unwrap()
}

type HandshakeFrames = Framed<TlsStream<TcpStream>, FrameCodec<Handshake>>;

/// A TLS connection with the master's challenge read: frames, nonce, exporter.
async fn challenged(cluster: &Cluster) -> (HandshakeFrames, [u8; 32], [u8; 32]) {
    let stream = tls_to(
        cluster.link_addr,
        edge_tls(cluster, &cluster.path("certs"), "site-1"),
    )
    .await
    .unwrap();
    let exporter = client_exporter(&stream).unwrap();
    let mut frames = Framed::new(stream, FrameCodec::<Handshake>::new(HANDSHAKE_MAX_FRAME));
    let Some(Ok(Handshake::Challenge { nonce, .. })) = frames.next().await else {
        panic!("no challenge");
    };
    (frames, nonce, exporter)
}

async fn expect_refused(frames: &mut HandshakeFrames) {
    match frames.next().await {
        Some(Ok(Handshake::Refused { reason })) => assert_eq!(reason, "authentication failed"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn answer(secret: &Secret, master_nonce: &[u8; 32], exporter: &[u8; 32]) -> Handshake {
    let edge_nonce = [9u8; 32];
    let transcript = Transcript {
        master_nonce,
        edge_nonce: &edge_nonce,
        edge_id: "site-1",
        exporter,
    };
    Handshake::Answer {
        protocol: PROTOCOL_VERSION,
        edge_id: "site-1".into(),
        nonce: edge_nonce,
        mac: edge_proof(secret, &transcript),
    }
}

/// Waits for the master's log to gain one more line containing `needle`.
async fn logged(cluster: &Cluster, needle: &str, before: usize) {
    tether_tests::wait_for(
        &format!("the master to log {needle:?}"),
        Duration::from_secs(3),
        || async { (cluster.master.count_in_log(needle) > before).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_handshake_is_refused_with_a_reason_and_the_good_link_carries_on() {
    let mut spec = ClusterSpec::edges(1);
    spec.handshake_timeout_ms = 1000;
    let mut cluster = Cluster::start(spec).await;
    tls::install_crypto_provider();
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(3))
        .await;
    let api = cluster.master_api();
    let connected_since = api.edge("site-1").await.unwrap()["connected_since"].clone();
    let secret = Secret::load(&cluster.path("certs/site-1.secret")).unwrap();
    let refused = "edge link refused";

    // Wrong secret.
    let n = cluster.master.count_in_log("failed authentication");
    let stream = tls_to(
        cluster.link_addr,
        edge_tls(&cluster, &cluster.path("certs"), "site-1"),
    )
    .await
    .unwrap();
    let exporter = client_exporter(&stream).unwrap();
    let err = edge_handshake(stream, &exporter, "site-1", &Secret::generate())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    logged(&cluster, "failed authentication", n).await;

    // Unknown edge id.
    let n = cluster.master.count_in_log("unknown edge id \"site-9\"");
    let stream = tls_to(
        cluster.link_addr,
        edge_tls(&cluster, &cluster.path("certs"), "site-1"),
    )
    .await
    .unwrap();
    let exporter = client_exporter(&stream).unwrap();
    assert!(
        edge_handshake(stream, &exporter, "site-9", &secret)
            .await
            .is_err()
    );
    logged(&cluster, "unknown edge id \"site-9\"", n).await;

    // A replayed answer: valid for one connection, sent on another.
    let n = cluster.master.count_in_log("failed authentication");
    let (first, first_nonce, first_exporter) = challenged(&cluster).await;
    let captured = answer(&secret, &first_nonce, &first_exporter);
    drop(first);
    let (mut second, _, _) = challenged(&cluster).await;
    second.send(&captured).await.unwrap();
    expect_refused(&mut second).await;
    logged(&cluster, "failed authentication", n).await;

    // The right secret and nonce, bound to another connection's exporter (a relay).
    let n = cluster.master.count_in_log("failed authentication");
    let (_other, _, other_exporter) = challenged(&cluster).await;
    let (mut relayed, nonce, _) = challenged(&cluster).await;
    relayed
        .send(&answer(&secret, &nonce, &other_exporter))
        .await
        .unwrap();
    expect_refused(&mut relayed).await;
    logged(&cluster, "failed authentication", n).await;

    // A peer that never finishes: dropped at the 1 s deadline, TLS or not.
    let n = cluster
        .master
        .count_in_log("handshake not finished within 1000 ms");
    // Before either connects, so that both deadlines run from after it.
    let start = Instant::now();
    let mut silent_tls = tls_to(
        cluster.link_addr,
        edge_tls(&cluster, &cluster.path("certs"), "site-1"),
    )
    .await
    .unwrap();
    let mut silent_tcp = TcpStream::connect(cluster.link_addr).await.unwrap();
    let mut buf = [0u8; 512];
    // The TLS peer first gets the challenge, then the close.
    let mut tls_closed = false;
    while let Ok(read) =
        tokio::time::timeout(Duration::from_secs(3), silent_tls.read(&mut buf)).await
    {
        // The master drops the socket without a TLS close_notify: EOF or an error.
        if !matches!(read, Ok(n) if n > 0) {
            tls_closed = true;
            break;
        }
    }
    assert!(tls_closed, "the silent TLS peer was not dropped");
    let tcp_read = tokio::time::timeout(Duration::from_secs(3), silent_tcp.read(&mut buf)).await;
    assert!(
        matches!(tcp_read, Ok(Ok(0)) | Ok(Err(_))),
        "the silent TCP peer was not dropped"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(900) && start.elapsed() < Duration::from_secs(3)
    );
    logged(&cluster, "handshake not finished within 1000 ms", n + 1).await;

    // A TLS 1.2 client.
    let n = cluster.master.count_in_log("TLS handshake failed");
    let tls12 = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_root_certificates(tls::load_roots(&cluster.ca()).unwrap())
        .with_no_client_auth();
    let err = tls_to(cluster.link_addr, Arc::new(tls12))
        .await
        .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("protocol")
            || err.to_string().contains("incompatible"),
        "{err}"
    );
    logged(&cluster, "TLS handshake failed", n).await;

    // A client certificate from another CA: refused by TLS before any secret is asked.
    let n = cluster.master.count_in_log("TLS handshake failed");
    let other_pki = tempfile::tempdir().unwrap();
    tether_common::pki::write_dir(other_pki.path(), &["site-1".into()]).unwrap();
    let foreign = edge_tls(&cluster, other_pki.path(), "site-1");
    if let Ok(stream) = tls_to(cluster.link_addr, foreign).await {
        // TLS 1.3 tells the client only when it next reads.
        let exporter = client_exporter(&stream).unwrap();
        assert!(
            edge_handshake(stream, &exporter, "site-1", &secret)
                .await
                .is_err()
        );
    }
    logged(&cluster, "TLS handshake failed", n).await;
    assert!(
        cluster.master.log_text().contains("UnknownIssuer"),
        "the reason names the issuer"
    );

    // An edge that trusts another CA will not talk to this master.
    let connector = ConnectorConfig {
        master_addrs: vec![cluster.link_addr.to_string()],
        server_name: tls::server_name("localhost").unwrap(),
        tls: tls::client_config(
            &other_pki.path().join("ca.pem"),
            Some((
                &other_pki.path().join("site-1.pem"),
                &other_pki.path().join("site-1.key"),
            )),
        )
        .unwrap(),
        edge_id: "site-1".into(),
        secret: secret.clone(),
        handshake_timeout: Duration::from_secs(2),
        reconnect: Duration::from_secs(3),
        link: LinkConfig::with_heartbeat(Duration::from_secs(1), 1 << 20),
    };
    let err = connect_once(&connector).await.unwrap_err();
    assert!(
        err.contains("TLS handshake") && err.contains("UnknownIssuer"),
        "{err}"
    );

    // Through all of it the real edge's link stayed up: same link, never down.
    assert_eq!(api.edge_online("site-1").await, Some(true));
    assert_eq!(
        api.edge("site-1").await.unwrap()["connected_since"],
        connected_since
    );
    assert_eq!(
        cluster.edges[0].count_in_log("link to the master is down"),
        0
    );
    assert!(cluster.master.count_in_log(refused) >= 8);
    assert!(cluster.master.exited().is_none());
    // The secret itself never reaches a log.
    let secret_hex = std::fs::read_to_string(cluster.path("certs/site-1.secret")).unwrap();
    assert!(!cluster.master.log_text().contains(secret_hex.trim()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_link_for_the_same_edge_replaces_the_first_only_once_authenticated() {
    let cluster = Cluster::start(ClusterSpec::edges(1)).await;
    tls::install_crypto_provider();
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(3))
        .await;
    let api = cluster.master_api();
    let first_since = api.edge("site-1").await.unwrap()["connected_since"].clone();
    let secret = Secret::load(&cluster.path("certs/site-1.secret")).unwrap();

    let connector = ConnectorConfig {
        master_addrs: vec![cluster.link_addr.to_string()],
        server_name: tls::server_name("localhost").unwrap(),
        tls: edge_tls(&cluster, &cluster.path("certs"), "site-1"),
        edge_id: "site-1".into(),
        secret: Secret::generate(),
        handshake_timeout: Duration::from_secs(2),
        reconnect: Duration::from_secs(3),
        link: LinkConfig::with_heartbeat(Duration::from_secs(1), 1 << 20),
    };
    // Not authenticated: the first link stays.
    assert!(connect_once(&connector).await.is_err());
    assert_eq!(
        api.edge("site-1").await.unwrap()["connected_since"],
        first_since
    );

    // Authenticated: it replaces the first, which is told why.
    let good = ConnectorConfig {
        secret,
        ..connector
    };
    let (link, _incoming) = connect_once(&good).await.unwrap();
    cluster.edges[0]
        .wait_for_log("replaced by a newer link", Duration::from_secs(2))
        .await;
    let second_since = api.edge("site-1").await.unwrap()["connected_since"].clone();
    assert_ne!(second_since, first_since);
    assert_eq!(api.edge_online("site-1").await, Some(true));

    // When the newer link goes, the real edge comes back on its next attempt.
    link.close("test done");
    tether_tests::wait_for(
        "the real edge to reconnect",
        Duration::from_secs(6),
        || async {
            let edge = api.edge("site-1").await?;
            (edge["online"] == true && edge["connected_since"] != second_since).then_some(())
        },
    )
    .await;
}

/// An edge's client certificate names its edge id: site-1's certificate with site-2's
/// secret does not make a link, while site-2's own certificate does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_certificate_must_name_its_edge() {
    let mut spec = ClusterSpec::edges(2);
    spec.handshake_timeout_ms = 1000;
    let mut cluster = Cluster::start(spec).await;
    cluster
        .wait_edge_online("site-2", true, Duration::from_secs(10))
        .await;
    cluster.edges[1].kill();
    cluster
        .wait_edge_online("site-2", false, Duration::from_secs(5))
        .await;
    tls::install_crypto_provider();
    let before = cluster.master.count_in_log("does not name edge site-2");
    let mut borrowed = tether_tests::rogue::edge_connector(
        &cluster,
        "site-2",
        LinkConfig::with_heartbeat(Duration::from_secs(1), 1 << 20),
    );
    borrowed.tls = edge_tls(&cluster, &cluster.path("certs"), "site-1");
    if let Ok((link, _incoming)) = connect_once(&borrowed).await {
        tokio::time::timeout(Duration::from_secs(3), link.closed())
            .await
            .expect("the master drops the link at once");
    }
    logged(&cluster, "does not name edge site-2", before).await;
    assert_eq!(
        cluster.master_api().edge_online("site-2").await,
        Some(false)
    );
    // Its own certificate passes.
    let own = tether_tests::rogue::edge_connector(
        &cluster,
        "site-2",
        LinkConfig::with_heartbeat(Duration::from_secs(1), 1 << 20),
    );
    let (link, _incoming) = connect_once(&own).await.expect("site-2's own certificate");
    cluster
        .wait_edge_online("site-2", true, Duration::from_secs(5))
        .await;
    link.close("done");
}
