//! Alerts (`[[alerts]]`): every audit event POSTed to a small HTTP receiver in the test,
//! one POST per event and in order; the receiver down for 30 s (the master SIGKILLed and
//! restarted meanwhile) and up again: everything kept is delivered, nothing twice, and
//! the bound drops the oldest and counts them; an edge cut off from its master alerts on
//! its own.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;
use tether_common::control::Epoch;
use tether_common::protocol::{AuditRecord, ControlOwner, Request};
use tether_tests::api::ApiClient;
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::receiver::Receiver;
use tether_tests::rogue::RogueEdge;
use tether_tests::wait_for;

const TOKEN: &str = "alert-token-123";
const MAX_PENDING: u64 = 50;

/// The master's alert gauge or counter for its first receiver, at `url` (named by its
/// place and origin: a webhook's path may hold its secret).
async fn alert_metric(api: &ApiClient, name: &str, url: &str) -> u64 {
    let (status, _, text) = api.get_text("/metrics").await;
    assert_eq!(status, 200, "{text}");
    let origin = url.trim_end_matches("/alerts");
    let prefix = format!("{name}{{receiver=\"alerts[0] {origin}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The bodies `server` sent.
fn from(receiver: &Receiver, server: &str) -> Vec<Value> {
    receiver
        .bodies()
        .into_iter()
        .filter(|b| b["server"] == server)
        .collect()
}

#[tokio::test]
async fn every_audit_event_is_posted_once_in_order_kept_while_the_receiver_is_down_and_bounded() {
    let mut receiver = Receiver::start(TOKEN).await;
    let url = receiver.url("/alerts");
    let alerts = format!(
        "[[alerts]]\nurl = \"{url}\"\ntoken_file = \"alert.token\"\nmax_pending = {MAX_PENDING}\n"
    );
    let cluster = Cluster::start(ClusterSpec {
        edge_settings: "failover = true\ntimeout_ms = 1500".into(),
        master_extra: alerts.clone(),
        edge_extra: alerts,
        files: vec![("alert.token".into(), format!("{TOKEN}\n"))],
        ..ClusterSpec::edges(1)
    })
    .await;
    let master = cluster.master_api();
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(15))
        .await;
    let mut cluster = cluster;

    // A change of holder: the master takes the edge's modules. One POST, with the token.
    cluster.edges[0].kill();
    let takeover = wait_for("the takeover's alert", Duration::from_secs(10), || async {
        from(&receiver, "master:master")
            .into_iter()
            .find(|b| b["event"] == "owner" && b["to"] == "master")
    })
    .await;
    assert_eq!(takeover["edge"], "site-1", "{takeover}");
    assert_eq!(
        takeover["id"],
        format!("master:master:{}", takeover["seq"]),
        "{takeover}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        from(&receiver, "master:master").len(),
        1,
        "one POST per event"
    );

    // The receiver goes down for 30 s while 60 events happen (the edge's reports, sent
    // by a rogue holding site-1's secret now that the edge is dead): the newest 50 are
    // kept, the 10 oldest dropped and counted.
    receiver.stop();
    let rogue = RogueEdge::connect(&cluster, "site-1").await;
    let events: Vec<AuditRecord> = (0..60)
        .map(|i| AuditRecord {
            time_ms: 1_000 + i,
            edge: "site-1".into(),
            from: ControlOwner::Edge,
            to: ControlOwner::Edge,
            epoch: Epoch(1_000 + i),
            reason: format!("event {i}"),
            code: None,
        })
        .collect();
    rogue
        .request(Request::AuditEvents { events })
        .await
        .expect("the master takes the edge's report");
    let down = std::time::Instant::now();
    wait_for("the bound to count", Duration::from_secs(10), || async {
        let dropped = alert_metric(&master, "tether_alerts_dropped_total", &url).await;
        let pending = alert_metric(&master, "tether_alerts_pending", &url).await;
        (dropped == 10 && pending == MAX_PENDING).then_some(())
    })
    .await;
    // Kept on disk: the master SIGKILLed and started again meanwhile loses none of them.
    drop(rogue);
    cluster.master.kill();
    cluster.master.restart();
    cluster.wait_master_up().await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(down.elapsed())).await;
    assert_eq!(
        from(&receiver, "master:master").len(),
        1,
        "nothing while down"
    );

    // Up again: the 50 kept arrive, in order, each once.
    receiver.restart().await;
    let delivered = wait_for("the kept events", Duration::from_secs(15), || async {
        let bodies = from(&receiver, "master:master");
        (bodies.len() >= 51).then_some(bodies)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered_now = from(&receiver, "master:master");
    assert_eq!(
        delivered_now.len(),
        51,
        "none twice: {:?}",
        delivered_now.len()
    );
    let epochs: Vec<u64> = delivered[1..]
        .iter()
        .map(|b| b["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(
        epochs,
        (1_010..1_060).collect::<Vec<u64>>(),
        "the newest 50, in order"
    );
    let ids: HashSet<&str> = delivered.iter().filter_map(|b| b["id"].as_str()).collect();
    assert_eq!(ids.len(), delivered.len());
    assert!(delivered[1..].iter().all(|b| b["reported_by"] == "edge"));
    assert_eq!(
        alert_metric(&master, "tether_alerts_pending", &url).await,
        0
    );

    // An edge cut off from its master alerts on its own: the edge back under the master,
    // the master killed, the edge takes its modules and says so.
    cluster.edges[0].restart();
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(15))
        .await;
    let before = from(&receiver, "edge:site-1").len();
    cluster.master.kill();
    let own = wait_for("the edge's alert", Duration::from_secs(20), || async {
        from(&receiver, "edge:site-1")
            .into_iter()
            .skip(before)
            .find(|b| b["event"] == "owner" && b["to"] == "edge")
    })
    .await;
    assert_eq!(own["edge"], "site-1", "{own}");
}
