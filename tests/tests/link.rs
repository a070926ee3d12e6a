//! The edge link with the real binaries: edges come online, go offline when killed or cut
//! off, and come back after restarts and heals, each within the time written beside it.

use std::time::{Duration, Instant};

use tether_tests::cluster::{Cluster, ClusterSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_come_online_and_survive_kills_and_restarts_of_either_side() {
    let mut cluster = Cluster::start(ClusterSpec::edges(2)).await;
    let api = cluster.master_api();

    // A master and two edges show online within 2 s of the edges starting.
    let started = Instant::now();
    for edge in ["site-1", "site-2"] {
        cluster
            .wait_edge_online(edge, true, Duration::from_secs(2))
            .await;
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    let site1 = api.edge("site-1").await.unwrap();
    assert_eq!(site1["name"], "Test site-1");
    assert!(site1["last_seen"].is_string(), "{site1}");
    // Heartbeats measure the round trip within a beat or two.
    tether_tests::wait_for("an RTT for site-1", Duration::from_secs(3), || async {
        api.edge("site-1").await.and_then(|e| e["rtt_ms"].as_f64())
    })
    .await;

    // SIGKILL an edge: offline within three heartbeats (+1 s); the other stays online.
    cluster.edges[0].kill();
    cluster
        .wait_edge_online("site-1", false, Duration::from_secs(4))
        .await;
    assert_eq!(api.edge_online("site-2").await, Some(true));
    let offline = api.edge("site-1").await.unwrap();
    assert!(
        offline["last_seen"].is_string(),
        "last_seen is kept: {offline}"
    );
    assert!(offline["rtt_ms"].is_null());

    // Restart it: online within 2 s (it connects at once on start).
    cluster.edges[0].restart();
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(2))
        .await;

    // SIGKILL the master and restart it: edges are back within 3 s plus jitter (0.5 s),
    // plus 1.5 s for the master's start and the handshakes.
    cluster.master.kill();
    let killed = Instant::now();
    cluster.master.restart();
    cluster.wait_master_up().await;
    for edge in ["site-1", "site-2"] {
        let left = Duration::from_secs(5).saturating_sub(killed.elapsed());
        cluster.wait_edge_online(edge, true, left).await;
    }
    assert!(killed.elapsed() < Duration::from_secs(5));
    // The edges saw the drop and reconnected; nothing else happened to them.
    for edge in &mut cluster.edges {
        assert!(edge.count_in_log("link to the master is down") >= 1);
        assert!(edge.exited().is_none(), "edge exited");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_goes_offline_on_missed_heartbeats_and_comes_back_when_healed() {
    let mut spec = ClusterSpec::edges(2);
    spec.heartbeat_ms = 300;
    spec.proxied = true;
    let cluster = Cluster::start(spec).await;
    let api = cluster.master_api();
    for edge in ["site-1", "site-2"] {
        cluster
            .wait_edge_online(edge, true, Duration::from_secs(3))
            .await;
    }

    // A partition sends no FIN: only the missing heartbeats tell, after 3 x 300 ms.
    cluster.proxies[0].cut();
    let cut = Instant::now();
    cluster
        .wait_edge_online("site-1", false, Duration::from_secs(3))
        .await;
    assert!(
        cut.elapsed() >= Duration::from_millis(600),
        "offline before heartbeats could be missed"
    );
    cluster
        .master
        .wait_for_log("missed heartbeats", Duration::from_secs(2))
        .await;
    cluster.edges[0]
        .wait_for_log("missed heartbeats", Duration::from_secs(2))
        .await;
    assert_eq!(
        api.edge_online("site-2").await,
        Some(true),
        "the other edge is untouched"
    );

    // Heal: the edge reconnects on its next attempt (3 s + jitter).
    cluster.proxies[0].heal();
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(6))
        .await;

    // Latency shows in the RTT.
    cluster.proxies[1].delay(Duration::from_millis(100));
    tether_tests::wait_for(
        "site-2's RTT to show the delay",
        Duration::from_secs(5),
        || async {
            let rtt = api.edge("site-2").await?["rtt_ms"].as_f64()?;
            (rtt >= 190.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        api.edge_online("site-2").await,
        Some(true),
        "a slow link is not a dead one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_wants_the_admin_token_except_for_health() {
    let cluster = Cluster::start(ClusterSpec::edges(1)).await;
    let api = cluster.master_api();
    let (status, body) = api.get("/api/v1/health").await;
    assert_eq!(status, 200);
    assert_eq!(body["role"], "master");
    assert_eq!(body["booted"], true);
    assert!(body["version"].is_string());

    let anonymous = api.with_token(None);
    assert_eq!(anonymous.get("/api/v1/health").await.0, 200);
    let (status, body) = anonymous.get("/api/v1/edges").await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "unauthorized");
    let (status, _) = api
        .with_token(Some("tth_not-the-token".into()))
        .get("/api/v1/edges")
        .await;
    assert_eq!(status, 401);
    assert_eq!(api.get("/api/v1/edges").await.0, 200);

    cluster.wait_edge_api_up(0).await;
    let (status, body) = cluster.edge_api(0).get("/api/v1/health").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["role"], "edge");
    assert_eq!(body["id"], "site-1");
    // The admin token was written 0600 on first start.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cluster.path("data/master/admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
