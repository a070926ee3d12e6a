//! The edge's replica against the master's slice: the incremental path, live pushes, the
//! snapshot path after the log was truncated while the edge was away, and an edge that
//! boots and runs its modules with the master down.

use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::sim::Sim;
use tether_tests::wait_for;

fn site(projector_port: u16) -> String {
    format!(
        "[[repositories]]\nid = \"core\"\npath = \"{}\"\n\n\
         [[drivers]]\nid = \"projector\"\nrepository = \"core\"\nfile = \"projector.rhai\"\ndelimiter = \"\\r\"\n\n\
         [[drivers]]\nid = \"room\"\nrepository = \"core\"\nfile = \"room.rhai\"\nkind = \"logic\"\ntransport = \"none\"\n\n\
         [[modules]]\nid = \"proj-1\"\ndriver = \"projector\"\nname = \"Display\"\nhost = \"127.0.0.1\"\nport = {projector_port}\nedge = \"site-1\"\n\n\
         [[modules]]\nid = \"proj-2\"\ndriver = \"projector\"\nname = \"Display\"\nhost = \"127.0.0.1\"\nport = 9\nedge = \"site-2\"\n\n\
         [[systems]]\nid = \"room-1\"\nname = \"Room 1\"\nedge = \"site-1\"\nmodules = [\"proj-1\"]\n\n\
         [[systems]]\nid = \"room-2\"\nname = \"Room 2\"\nedge = \"site-2\"\nmodules = [\"proj-2\"]\n",
        tether_tests::CORE
    )
}

async fn start(projector_port: u16, master_extra: &str) -> Cluster {
    let mut spec = ClusterSpec::edges(2);
    spec.site_extra = site(projector_port);
    spec.master_extra = master_extra.to_string();
    let cluster = Cluster::start(spec).await;
    cluster.wait_master_up().await;
    cluster
}

/// Waits until edge `index`'s replica equals the master's slice for it.
async fn wait_in_sync(cluster: &Cluster, index: usize) -> Value {
    cluster
        .wait_replica_in_sync(index, Duration::from_secs(20))
        .await
}

#[tokio::test]
async fn the_replica_follows_the_slice_incrementally_and_live() {
    let sim = Sim::projector();
    let mut cluster = start(sim.port(), "").await;
    let first = wait_in_sync(&cluster, 0).await;
    let records = &first["records"];
    assert!(records["modules"]["proj-1"].is_object(), "{first}");
    assert_eq!(records["drivers"]["projector"]["file"], "projector.rhai");
    assert!(
        records["modules"].get("proj-2").is_none(),
        "another edge's module leaked: {first}"
    );
    assert!(
        records["drivers"].get("room").is_none(),
        "an unused driver leaked: {first}"
    );
    let second = wait_in_sync(&cluster, 1).await;
    assert!(second["records"]["systems"]["room-2"].is_object());

    // Live: a new logic module joins room-1; its driver comes with it.
    let api = cluster.master_api();
    let (status, body) = api
        .post(
            "/api/v1/modules",
            json!({"id": "logic-1", "driver": "room", "name": "Room"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = api
        .put(
            "/api/v1/systems/room-1",
            json!({"name": "Room 1", "edge": "site-1", "modules": ["logic-1", "proj-1"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let synced = wait_in_sync(&cluster, 0).await;
    assert!(synced["records"]["drivers"]["room"].is_object(), "{synced}");

    // Incremental on reconnect: the edge is away for two writes, then asks from its version.
    cluster.edges[0].kill();
    cluster
        .wait_edge_online("site-1", false, Duration::from_secs(10))
        .await;
    let (status, _) = api
        .put(
            "/api/v1/modules/logic-1",
            json!({"driver": "room", "name": "Room", "settings": {"displays": 1}}),
        )
        .await;
    assert_eq!(status, 200);
    // proj-1 leaves room-1 and site-1: the replica must drop it.
    let (status, _) = api
        .put(
            "/api/v1/systems/room-1",
            json!({"name": "Room 1", "edge": "site-1", "modules": ["logic-1"]}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = api
        .put("/api/v1/modules/proj-1", json!({"driver": "projector", "name": "Display", "host": "127.0.0.1", "port": sim.port()}))
        .await;
    assert_eq!(status, 200);
    let changes_before = cluster.master.count_in_log("edge sync: sending changes");
    cluster.edges[0].restart();
    let synced = wait_in_sync(&cluster, 0).await;
    assert!(
        synced["records"]["modules"].get("proj-1").is_none(),
        "{synced}"
    );
    assert_eq!(
        synced["records"]["modules"]["logic-1"]["settings"]["displays"],
        1
    );
    assert!(
        cluster.master.count_in_log("edge sync: sending changes") > changes_before,
        "the reconnecting edge was not served incrementally"
    );
    // The other edge never saw any of it.
    wait_in_sync(&cluster, 1).await;
}

#[tokio::test]
async fn an_edge_away_while_the_log_was_truncated_gets_a_snapshot() {
    let sim = Sim::projector();
    let mut cluster = start(sim.port(), "change_log_limit = 3").await;
    wait_in_sync(&cluster, 0).await;
    cluster.edges[0].kill();
    cluster
        .wait_edge_online("site-1", false, Duration::from_secs(10))
        .await;
    let api = cluster.master_api();
    for i in 0..5 {
        let (status, body) = api
            .put(
                "/api/v1/systems/room-1",
                json!({"name": format!("Room 1 v{i}"), "edge": "site-1", "modules": ["proj-1"]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let snapshots_before = cluster.master.count_in_log("edge sync: sending a snapshot");
    cluster.edges[0].restart();
    let synced = wait_in_sync(&cluster, 0).await;
    assert_eq!(synced["records"]["systems"]["room-1"]["name"], "Room 1 v4");
    assert_eq!(
        cluster.master.count_in_log("edge sync: sending a snapshot"),
        snapshots_before + 1,
        "the log no longer reached back, so the edge needed a snapshot"
    );
}

#[tokio::test]
async fn an_edge_started_with_its_master_down_runs_its_modules_from_the_replica() {
    let sim = Sim::projector();
    let mut cluster = start(sim.port(), "").await;
    wait_in_sync(&cluster, 0).await;
    // The edge's device session is open before the kills, so its end marks the edge gone
    // (a kill before the module connected left no session to end).
    sim.next("connect");
    cluster.master.kill();
    cluster.edges[0].kill();
    sim.next("disconnect");
    cluster.edges[0].restart();
    cluster.wait_edge_api_up(0).await;
    let edge = cluster.edge_admin(0);
    // The module connects to its device and obeys, with no master anywhere.
    sim.next("connect");
    let (status, body) = wait_for("the module to answer", Duration::from_secs(10), || async {
        let answer = edge
            .exec("room-1", "Display", 1, "power", json!([true]))
            .await;
        (answer.0 == 200).then_some(answer)
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["executed_by"], "edge:site-1");
    let command = loop {
        let event = sim.next("command");
        if event["command"] == "PWR ON" {
            break event;
        }
    };
    assert_eq!(command["power"], true);
    assert!(cluster.edges[0].count_in_log("link attempt failed") > 0);
}
