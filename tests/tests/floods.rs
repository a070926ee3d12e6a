//! Floods of connections that never authenticate, against both of the master's ports at
//! once, with the real binaries: 3,000 idle TCP connections and 3,000 silent TLS
//! connections on each, from thousands of addresses, re-opened as fast as the master drops
//! them. Through it all a restarting edge gets its link back within its reconnect period
//! plus a handshake, nothing changes owner, and `/api/v1/health` keeps answering.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tether_common::link::tls;
use tether_tests::api::ApiClient;
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::flood::{Flood, FloodKind};

const SECOND: Duration = Duration::from_secs(1);
/// Each flood's connections.
const FLOOD: usize = 3_000;
/// The edge's reconnect period (its default) and the master's handshake deadline.
const RECONNECT: Duration = Duration::from_secs(3);
const HANDSHAKE_MS: u64 = 5_000;

/// Polls `/api/v1/health` on fresh connections until `stop`; counts answers and misses,
/// and keeps the slowest answer.
fn watch_health(
    base: String,
    ca: std::path::PathBuf,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, Duration)> {
    tokio::spawn(async move {
        let (mut answered, mut missed, mut slowest) = (0, 0, Duration::ZERO);
        while !stop.load(Ordering::Relaxed) {
            // A new client each time: a new connection, which must get through the flood.
            let api = ApiClient::with_timeout(&base, &ca, None, 5 * SECOND);
            let asked = Instant::now();
            let (status, body) = api.get("/api/v1/health").await;
            if status == 200 && body["booted"] == true {
                answered += 1;
                slowest = slowest.max(asked.elapsed());
            } else {
                missed += 1;
                eprintln!(
                    "health missed after {} ms: {status} {body}",
                    asked.elapsed().as_millis()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (answered, missed, slowest)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_on_both_ports_starve_neither_edges_nor_the_api() {
    let mut spec = ClusterSpec::edges(1);
    spec.handshake_timeout_ms = HANDSHAKE_MS;
    // Long enough that a relink within the reconnect period changes nothing; short
    // enough that a starved edge is failed over during the test.
    spec.edge_settings = "failover = true\ntimeout_ms = 10000".into();
    let mut cluster = Cluster::start(spec).await;
    cluster.wait_edge_online("site-1", true, 15 * SECOND).await;
    let master = cluster.master_api();
    let epoch_before = master.edge("site-1").await.unwrap()["epoch"].clone();

    let stop = Arc::new(AtomicBool::new(false));
    let health = watch_health(master.base().to_string(), cluster.ca(), stop.clone());

    // Silent TLS on the link port needs a client certificate the master trusts: the
    // attacker holds one (a stolen edge certificate, without the edge's secret).
    let certs = cluster.path("certs");
    let with_edge_cert = tls::client_config(
        &cluster.ca(),
        Some((&certs.join("site-1.pem"), &certs.join("site-1.key"))),
    )
    .unwrap();
    let api_tls = Arc::new(tls::api_client_config(&cluster.ca()).unwrap());
    let floods = [
        (
            "idle TCP, link port",
            Flood::start(cluster.link_addr, FLOOD, FloodKind::IdleTcp),
        ),
        (
            "silent TLS, link port",
            Flood::start(
                cluster.link_addr,
                FLOOD,
                FloodKind::SilentTls(with_edge_cert),
            ),
        ),
        (
            "idle TCP, API port",
            Flood::start(cluster.api_addr, FLOOD, FloodKind::IdleTcp),
        ),
        (
            "silent TLS, API port",
            Flood::start(cluster.api_addr, FLOOD, FloodKind::SilentTls(api_tls)),
        ),
    ];
    for (_, flood) in &floods {
        flood.wait_opened(FLOOD as u64, 30 * SECOND).await;
    }
    tokio::time::sleep(2 * SECOND).await;

    // The edge restarts under the flood: the master sees its old link go, then its new
    // one come.
    let restarted = Instant::now();
    cluster.edges[0].restart();
    let limit = RECONNECT + Duration::from_millis(HANDSHAKE_MS);
    let online_as = |want: bool| {
        let master = master.clone();
        async move {
            while master.edge_online("site-1").await != Some(want) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let relinked = tokio::time::timeout(2 * limit, async {
        online_as(false).await;
        online_as(true).await;
        restarted.elapsed()
    })
    .await
    .map_or(u128::MAX, |took| took.as_millis());
    // Past the failover timeout: no change of owner.
    tokio::time::sleep(11 * SECOND).await;
    let edge = master.edge("site-1").await.expect("site-1 listed");
    stop.store(true, Ordering::Relaxed);
    let (answered, missed, slowest) = health.await.unwrap();
    for (what, flood) in &floods {
        eprintln!(
            "{what}: {} connections opened, {} dropped by the master, {} TLS handshakes",
            flood.opened(),
            flood.dropped(),
            flood.tls_done.load(Ordering::Relaxed)
        );
    }
    eprintln!(
        "edge relinked {relinked} ms after its restart; health: {answered} answers, {missed} missed, slowest {} ms",
        slowest.as_millis()
    );
    drop(floods);

    assert!(
        relinked <= limit.as_millis(),
        "the edge got its link back after {relinked} ms (limit {} ms)",
        limit.as_millis()
    );
    assert_eq!(edge["online"], true, "{edge}");
    assert_eq!(edge["owner"], "edge", "no change of owner: {edge}");
    assert_eq!(edge["epoch"], epoch_before, "no change of owner: {edge}");
    let (_, audit) = master.get("/api/v1/audit").await;
    assert!(
        !audit
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["event"] == "owner" && r["to"] == "master"),
        "{audit}"
    );
    assert_eq!(missed, 0, "health went unanswered {missed} times");
    assert!(answered >= 20, "{answered} health answers");
}
