//! An edge that lists several masters (`masters = [...]`): it tries them in the order of
//! its rendezvous hash, moves on from those that fail, links to one that answers, and
//! states a takeover deadline that allows one try of each.

use std::time::Duration;

use tether_common::control::EdgeTiming;
use tether_common::control::placement::rendezvous_order;
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::{free_port, wait_for};

#[tokio::test]
async fn an_edge_moves_past_unreachable_masters_to_one_that_answers() {
    let spec = ClusterSpec::edges(1);
    let mut cluster = Cluster::start(spec.clone()).await;
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(10))
        .await;
    let live = cluster.link_addr.to_string();
    // Addresses where nothing listens, until the edge's own order puts one of them
    // before the live master (so the edge must move past it).
    let mut masters = vec![live.clone()];
    loop {
        masters.push(format!("127.0.0.1:{}", free_port()));
        if masters.len() >= 3 && *rendezvous_order("site-1", &masters)[0] != live {
            break;
        }
    }
    let first = rendezvous_order("site-1", &masters)[0].clone();
    let list = masters
        .iter()
        .map(|m| format!("\"{m}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = cluster.path("site-1.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace(
        &format!("master = \"{live}\""),
        &format!("masters = [{list}]"),
    );
    assert!(text.contains("masters = ["), "{text}");
    std::fs::write(&config, text).unwrap();

    let up = "link to the master is up";
    let ups_before = cluster.edges[0].log_text().matches(up).count();
    cluster.edges[0].restart();
    let log = wait_for(
        "the edge to link again",
        Duration::from_secs(15),
        || async {
            let log = cluster.edges[0].log_text();
            (log.matches(up).count() > ups_before).then_some(log)
        },
    )
    .await;
    let this_run = &log[log.find("not reached").expect("a master not reached")..];
    let moved_past = format!("master {first} not reached, trying the next");
    assert!(
        log.contains(&moved_past) && this_run.contains(up),
        "the edge tried {first} first and moved on: {log}"
    );
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(5))
        .await;

    // One attempt tries every master, each within the handshake deadline: the edge's
    // stated worst case allows for all of them.
    let timing = EdgeTiming {
        heartbeat_ms: spec.heartbeat_ms,
        reconnect_ms: 3000,
        handshake_timeout_ms: spec.handshake_timeout_ms,
        masters: masters.len() as u64,
    };
    let shown = cluster
        .edge_admin(0)
        .edge("site-1")
        .await
        .expect("the edge's own record");
    assert_eq!(
        shown["takeover_worst_ms"],
        timing.worst_case_takeover_ms(),
        "{shown}"
    );
    assert_eq!(
        timing.worst_case_takeover_ms(),
        timing.silence_noticed_ms() + 3000 + masters.len() as u64 * spec.handshake_timeout_ms
    );
}
