//! Failover with the real binaries and device simulators: an edge killed, restarted and
//! restored (by hand and by a restore window), the master killed, the link cut by a fault
//! proxy and healed, failover off, and a master restart. Each wait names the time the
//! design allows beside it.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_common::control::EdgeTiming;
use tether_tests::api::ApiClient;
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::sim::Sim;
use tether_tests::{CORE, wait_for};

/// The edge's failover timeout in these tests.
const TIMEOUT_MS: u64 = 2000;
/// The edge's reconnect period (the default) and its largest jitter (a sixth).
const RECONNECT: Duration = Duration::from_millis(3000 + 500);

/// A logic driver whose status only a method sets: the master can know it only by
/// runtime-state sync from the edge.
const NOTE: &str = r#"
fn ping() { "pong" }
fn remember(text) { status("note", text); text }
"#;

fn site(projector: u16) -> String {
    let core = CORE;
    format!(
        r#"
[[repositories]]
id = "core"
path = "{core}"

[[repositories]]
id = "extra"
path = "repos/extra-drivers"

[[drivers]]
id = "projector"
repository = "core"
file = "projector.rhai"
delimiter = "\r"
default_settings = {{ poll_ms = 300 }}

[[drivers]]
id = "note"
repository = "extra"
file = "note.rhai"
transport = "none"

[[modules]]
id = "proj"
driver = "projector"
name = "Display"
host = "127.0.0.1"
port = {projector}
edge = "site-1"

[[modules]]
id = "note"
driver = "note"
name = "Note"
edge = "site-1"

[[systems]]
id = "room"
name = "Room"
edge = "site-1"
modules = ["proj", "note"]
"#
    )
}

async fn start(projector: &Sim, proxied: bool, edge_settings: &str) -> Cluster {
    start_with(projector, proxied, edge_settings, 300).await
}

async fn start_with(
    projector: &Sim,
    proxied: bool,
    edge_settings: &str,
    boot_wait_ms: u64,
) -> Cluster {
    let mut spec = ClusterSpec::edges(1);
    spec.boot_wait_ms = boot_wait_ms;
    spec.proxied = proxied;
    spec.edge_settings = edge_settings.to_string();
    spec.site_extra = site(projector.port());
    spec.files = vec![("repos/extra-drivers/note.rhai".into(), NOTE.into())];
    let cluster = Cluster::start(spec).await;
    cluster.wait_edge_api_up(0).await;
    wait_executor(
        &cluster.edge_admin(0),
        "edge:site-1",
        Duration::from_secs(10),
    )
    .await;
    cluster
}

fn settings(failover: bool, standby: &str) -> String {
    format!("failover = {failover}\ntimeout_ms = {TIMEOUT_MS}\nstandby = \"{standby}\"")
}

/// Waits until `api` runs `Note 1` as `who`; answers how long that took.
async fn wait_executor(api: &ApiClient, who: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    let what = format!("Note 1 executed by {who}");
    wait_for(&what, limit, || async {
        let (status, body) = api.exec("room", "Note", 1, "ping", json!([])).await;
        (status == 200 && body["executed_by"] == who).then_some(())
    })
    .await;
    start.elapsed()
}

/// The master's (or the edge's) view of site-1's control.
async fn control_of(api: &ApiClient) -> (String, u64) {
    let edge = api.edge("site-1").await.expect("site-1 in /api/v1/edges");
    (
        edge["owner"].as_str().unwrap_or_default().to_string(),
        edge["epoch"].as_u64().expect("an epoch"),
    )
}

async fn audit(api: &ApiClient) -> Vec<Value> {
    let (status, body) = api.get("/api/v1/audit").await;
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

/// Restarts the (killed) edge and waits until it is online and agrees the master holds
/// its modules (rule 4).
async fn restart_edge_under_master(cluster: &mut Cluster, edge: &ApiClient) {
    cluster.edges[0].restart();
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(10))
        .await;
    wait_for(
        "the edge to agree the master controls",
        Duration::from_secs(5),
        || async { (control_of(edge).await.0 == "master").then_some(()) },
    )
    .await;
}

/// The peer of the device session that is open now (the last connect).
fn session_peer(sim: &Sim) -> String {
    let connects = sim.events_of("connect");
    connects.last().expect("a device session")["peer"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits until the simulator shows a session of a peer other than `old` (and none open
/// of `old`); answers the new peer.
async fn wait_new_session(sim: &Sim, old: &str, limit: Duration) -> String {
    wait_for("a new device session", limit, || async {
        let peer = session_peer(sim);
        (peer != old && sim.open_sessions() == 1).then_some(peer)
    })
    .await
}

/// Index of the first event of `kind` from `peer`.
fn position(sim: &Sim, kind: &str, peer: &str) -> Option<usize> {
    sim.events()
        .iter()
        .position(|e| e["event"] == kind && e["peer"] == peer)
}

#[tokio::test]
async fn an_edge_killed_is_taken_over_and_restored_by_hand_and_by_window() {
    let projector = Sim::projector();
    let mut cluster = start(&projector, false, &settings(true, "warm")).await;
    let master = cluster.master_api();
    let edge = cluster.edge_admin(0);
    let (status, _) = edge
        .exec("room", "Note", 1, "remember", json!(["kept by sync"]))
        .await;
    assert_eq!(status, 200);
    let edge_peer = wait_for(
        "the edge's device session",
        Duration::from_secs(5),
        || async { (projector.open_sessions() == 1).then(|| session_peer(&projector)) },
    )
    .await;
    assert_eq!(control_of(&master).await, ("edge".into(), 0));
    // Let the status change reach the master (one notice on a live link).
    tokio::time::sleep(Duration::from_millis(500)).await;

    // (a) SIGKILL the edge: the master executes within timeout_ms + 1 s.
    cluster.edges[0].kill();
    let took = wait_executor(&master, "master", Duration::from_millis(TIMEOUT_MS + 1000)).await;
    eprintln!("takeover after {} ms", took.as_millis());
    let master_peer = wait_new_session(&projector, &edge_peer, Duration::from_secs(3)).await;
    assert!(
        position(&projector, "disconnect", &edge_peer)
            < position(&projector, "connect", &master_peer),
        "the edge's session ends before the master's starts"
    );
    // Warm standby: the takeover starts from the state synced from the edge.
    assert_eq!(
        master.status("room", "Note", 1).await["note"],
        "kept by sync"
    );
    assert_eq!(control_of(&master).await, ("master".into(), 1));
    let log = audit(&master).await;
    let last = log.last().expect("an audit event");
    assert_eq!(
        (&last["edge"], &last["from"], &last["to"], &last["epoch"]),
        (
            &json!("site-1"),
            &json!("edge"),
            &json!("master"),
            &json!(1)
        )
    );
    assert!(
        last["reason"].as_str().unwrap().contains("failover"),
        "{last}"
    );

    // (b) restart the edge: the master keeps control (rule 4).
    restart_edge_under_master(&mut cluster, &edge).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The edge does not run its modules; it serves them by proxy, and says who controls.
    let answer = edge.exec_full("room", "Note", 1, "ping", json!([])).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["executed_by"], "master", "{answer:?}");
    assert!(
        master.is_at(answer.preferred_server.as_deref()),
        "{answer:?}"
    );
    wait_executor(&master, "master", Duration::from_secs(1)).await;
    assert_eq!(
        session_peer(&projector),
        master_peer,
        "no new device session"
    );

    // A manual restore hands back: the master's device session closes before the edge's
    // opens (the simulator allows one session: an overlap would be refused).
    let (status, body) = master.post("/api/v1/edges/site-1/restore", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["owner"], "edge");
    let restored_epoch = body["epoch"].as_u64().unwrap();
    wait_executor(&edge, "edge:site-1", Duration::from_secs(3)).await;
    let edge_peer = wait_new_session(&projector, &master_peer, Duration::from_secs(3)).await;
    assert!(
        position(&projector, "disconnect", &master_peer)
            < position(&projector, "connect", &edge_peer),
        "break before make: {:?}",
        projector.events()
    );
    assert!(
        projector.events_of("refused").is_empty(),
        "{:?}",
        projector.events()
    );
    assert_eq!(control_of(&master).await, ("edge".into(), restored_epoch));
    let (status, body) = master.post("/api/v1/edges/site-1/restore", json!({})).await;
    assert_eq!(
        (status, &body["error"]),
        (409, &json!("conflict")),
        "{body}"
    );
    assert!(audit(&master).await.last().unwrap()["reason"] == "manual restore");

    // Take over once more, then let a restore window open: it hands back by itself.
    cluster.edges[0].kill();
    wait_executor(&master, "master", Duration::from_millis(TIMEOUT_MS + 1000)).await;
    cluster.edges[0].restart();
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(control_of(&master).await.0, "master");
    let (_, mut record) = master.get("/api/v1/edges/site-1").await;
    record["restore_window"] = json!({"start": "* * * * *", "length_s": 3600});
    let (status, body) = master.put("/api/v1/edges/site-1", record).await;
    assert_eq!(status, 200, "{body}");
    wait_executor(&edge, "edge:site-1", Duration::from_secs(3)).await;
    assert_eq!(control_of(&master).await.0, "edge");
    let last = audit(&master).await.last().cloned().unwrap();
    assert!(
        last["reason"].as_str().unwrap().contains("restore window"),
        "{last}"
    );
}

/// An edge's record edited at run time reaches its unit on the master (the unit is told
/// its own record's changes, nothing else): failover switched off by the API, the edge
/// killed, and the master does not take its modules, though with failover on it did so
/// within `TIMEOUT_MS` + 1 s in the test above.
#[tokio::test]
async fn failover_switched_off_at_run_time_holds() {
    let projector = Sim::projector();
    let mut cluster = start(&projector, false, &settings(true, "cold")).await;
    let master = cluster.master_api();
    let (_, mut record) = master.get("/api/v1/edges/site-1").await;
    record["failover"] = json!(false);
    let (status, body) = master.put("/api/v1/edges/site-1", record).await;
    assert_eq!(status, 200, "{body}");
    // A change elsewhere in the model after it: the unit keeps what it was told.
    let (status, body) = master
        .post(
            "/api/v1/users",
            json!({"id": "ulla", "name": "Ulla", "role": "viewer"}),
        )
        .await;
    assert!((200..300).contains(&status), "{body}");
    cluster.edges[0].kill();
    tokio::time::sleep(Duration::from_millis(TIMEOUT_MS + 2000)).await;
    assert_eq!(control_of(&master).await.0, "edge", "no takeover");
    let (status, body) = master.exec("room", "Note", 1, "ping", json!([])).await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test]
async fn an_invalid_window_is_refused() {
    let projector = Sim::projector();
    let cluster = start(&projector, false, &settings(true, "cold")).await;
    let master = cluster.master_api();
    let (_, mut record) = master.get("/api/v1/edges/site-1").await;
    record["restore_window"] = json!({"start": "0 25 * * *", "length_s": 60});
    let (status, body) = master.put("/api/v1/edges/site-1", record.clone()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("restore_window.start"),
        "{body}"
    );
    record["restore_window"] = json!({"start": "0 2 * * *", "length_s": 0});
    let (status, body) = master.put("/api/v1/edges/site-1", record.clone()).await;
    assert_eq!(status, 422, "{body}");
    // The window is read in the location's time zone: an IANA name, or 422 naming it.
    record["restore_window"] = json!({"start": "0 2 * * *", "length_s": 3600});
    record["time_zone"] = json!("Europe/Atlantis");
    let (status, body) = master.put("/api/v1/edges/site-1", record.clone()).await;
    assert_eq!(status, 422, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("time_zone") && message.contains("Europe/Atlantis"),
        "{body}"
    );
    record["time_zone"] = json!("Europe/Amsterdam");
    let (status, body) = master.put("/api/v1/edges/site-1", record).await;
    assert_eq!(status, 200, "{body}");
    let (_, stored) = master.get("/api/v1/edges/site-1").await;
    assert_eq!(stored["time_zone"], "Europe/Amsterdam", "{stored}");
}

#[tokio::test]
async fn the_edge_runs_on_when_the_master_dies_and_takes_control_if_it_had_not() {
    let projector = Sim::projector();
    let mut cluster = start(&projector, false, &settings(true, "cold")).await;
    let master = cluster.master_api();
    let edge = cluster.edge_admin(0);

    // Hand the modules to the master: kill the edge, wait for the takeover, restart it.
    cluster.edges[0].kill();
    wait_executor(&master, "master", Duration::from_millis(TIMEOUT_MS + 1000)).await;
    // Cold standby: nothing was kept of the edge's state.
    assert!(master.status("room", "Note", 1).await.get("note").is_none());
    restart_edge_under_master(&mut cluster, &edge).await;

    // (c) SIGKILL the master: the edge, not in control, takes it within 3 s plus one
    // reconnect attempt.
    let master_peer = session_peer(&projector);
    cluster.master.kill();
    let took = wait_executor(
        &edge,
        "edge:site-1",
        RECONNECT + Duration::from_millis(1000),
    )
    .await;
    eprintln!("the edge took control after {} ms", took.as_millis());
    assert!(
        took >= Duration::from_millis(2500),
        "it waited for one more attempt: {took:?}"
    );
    wait_new_session(&projector, &master_peer, Duration::from_secs(3)).await;
    let (status, log) = edge.get("/api/v1/audit").await;
    assert_eq!(status, 200);
    assert_eq!(
        log.as_array().unwrap().last().unwrap()["to"],
        "edge",
        "{log}"
    );

    // And it keeps running while the master stays away.
    let sessions = projector.events_of("connect").len();
    for _ in 0..5 {
        let (status, _) = edge
            .exec("room", "Display", 1, "power", json!([true]))
            .await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(
        projector.events_of("connect").len(),
        sessions,
        "no reconnects"
    );

    // The master comes back: the edge is controlling (rule 1) and keeps it; the master
    // hears of the edge's own takeover.
    cluster.master.restart();
    cluster.wait_master_up().await;
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(10))
        .await;
    wait_for(
        "the edge's audit event on the master",
        Duration::from_secs(5),
        || async {
            let log = audit(&master).await;
            log.iter()
                .any(|e| {
                    e["to"] == "edge" && e["reason"].as_str().unwrap_or("").contains("unreachable")
                })
                .then_some(())
        },
    )
    .await;
    assert_eq!(control_of(&master).await.0, "edge");
    wait_executor(&edge, "edge:site-1", Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_silent_cut_lets_the_edge_take_over_within_its_stated_worst_case() {
    let projector = Sim::projector();
    let mut cluster = start(&projector, true, &settings(true, "cold")).await;
    let master = cluster.master_api();
    let edge = cluster.edge_admin(0);
    cluster.edges[0].kill();
    wait_executor(&master, "master", Duration::from_millis(TIMEOUT_MS + 1000)).await;
    restart_edge_under_master(&mut cluster, &edge).await;

    // Pull the cable: no close, no reset, only silence, and new connections hang (the
    // last attempt runs into its handshake deadline).
    let spec = ClusterSpec::edges(1);
    let timing = EdgeTiming {
        heartbeat_ms: spec.heartbeat_ms,
        reconnect_ms: 3000,
        handshake_timeout_ms: spec.handshake_timeout_ms,
        masters: 1,
    };
    let shown = edge.edge("site-1").await.expect("the edge's own record");
    assert_eq!(
        shown["takeover_worst_ms"],
        timing.worst_case_takeover_ms(),
        "{shown}"
    );
    cluster.proxies[0].cut();
    let took = wait_executor(
        &edge,
        "edge:site-1",
        Duration::from_millis(timing.worst_case_takeover_ms() + 1000),
    )
    .await;
    eprintln!(
        "the edge took control {} ms after a silent cut (stated worst case {} ms)",
        took.as_millis(),
        timing.worst_case_takeover_ms()
    );
    let earliest = timing.dead_after_ms() + timing.reconnect_ms;
    assert!(
        took >= Duration::from_millis(earliest - 200),
        "not before the link was dead and the one more attempt was due: {took:?}"
    );
    let (status, log) = edge.get("/api/v1/audit").await;
    assert_eq!(status, 200);
    let last = log.as_array().unwrap().last().cloned().unwrap_or_default();
    assert_eq!(last["to"], "edge", "{log}");
    let (_, epoch) = control_of(&edge).await;
    assert_eq!(
        last["epoch"], epoch,
        "the claim is under the last granted epoch, no epoch of its own"
    );
}

#[tokio::test]
async fn a_cut_link_fails_over_and_heals_to_the_edge() {
    // Two sessions, so that the master's takeover during the cut reaches the device too.
    let projector = Sim::start(&[
        "projector",
        "--listen",
        "127.0.0.1:0",
        "--max-sessions",
        "2",
    ]);
    let cluster = start(&projector, true, &settings(true, "cold")).await;
    let master = cluster.master_api();
    let edge = cluster.edge_admin(0);
    let edge_peer = session_peer(&projector);

    // (d) cut the link: the edge keeps control; the master takes over after the timeout.
    cluster.proxies[0].cut();
    let took = wait_executor(
        &master,
        "master",
        Duration::from_millis(TIMEOUT_MS + 1000 + 3000),
    )
    .await;
    eprintln!("the master took over {} ms after the cut", took.as_millis());
    wait_executor(&edge, "edge:site-1", Duration::from_millis(100)).await;
    let master_peer = wait_for(
        "the master's device session",
        Duration::from_secs(3),
        || async {
            let peer = session_peer(&projector);
            (peer != edge_peer).then_some(peer)
        },
    )
    .await;
    assert!(
        position(&projector, "disconnect", &edge_peer).is_none(),
        "the edge kept its session"
    );

    // Heal: the edge wins (rule 1); the master's device session closes within 1 s of the
    // link's return (the edge reconnects within one reconnect period).
    cluster.proxies[0].heal();
    cluster
        .wait_edge_online("site-1", true, RECONNECT + Duration::from_secs(1))
        .await;
    let link_up = Instant::now();
    wait_for(
        "the master's device session to close",
        Duration::from_secs(1),
        || async { position(&projector, "disconnect", &master_peer).map(|_| ()) },
    )
    .await;
    eprintln!(
        "the master's session closed {} ms after the link came back",
        link_up.elapsed().as_millis()
    );
    // The master stops its modules before it hands them back (break before make), so its
    // view says `edge` a moment after its session closed.
    wait_for("the edge to hold again", Duration::from_secs(2), || async {
        (control_of(&master).await.0 == "edge").then_some(())
    })
    .await;
    let answer = master.exec_full("room", "Note", 1, "ping", json!([])).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["executed_by"], "edge:site-1", "{answer:?}");
    assert!(edge.is_at(answer.preferred_server.as_deref()), "{answer:?}");
    assert!(
        position(&projector, "disconnect", &edge_peer).is_none(),
        "the edge never let go"
    );
    let (owner, epoch) = control_of(&edge).await;
    assert_eq!(
        (owner.as_str(), epoch),
        ("edge", control_of(&master).await.1)
    );

    // A stale epoch is refused at the API.
    let path = "/api/v1/systems/room/modules/Note/1/exec";
    let (status, body) = edge.post(path, json!({"method": "ping", "epoch": 0})).await;
    assert_eq!(
        (status, &body["error"]),
        (409, &json!("stale_epoch")),
        "{body}"
    );
    let (status, body) = edge
        .post(path, json!({"method": "ping", "epoch": epoch}))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn failover_off_keeps_the_master_out() {
    let projector = Sim::projector();
    let mut cluster = start(&projector, false, &settings(false, "warm")).await;
    let master = cluster.master_api();
    let connects = projector.events_of("connect").len();
    // (e) the edge dies and stays dead for twice its timeout: the master never runs it.
    cluster.edges[0].kill();
    tokio::time::sleep(Duration::from_millis(2 * TIMEOUT_MS + 500)).await;
    let (status, body) = master.exec("room", "Note", 1, "ping", json!([])).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("unavailable")),
        "the owner is unreachable: {body}"
    );
    assert_eq!(control_of(&master).await, ("edge".into(), 0));
    assert_eq!(projector.events_of("connect").len(), connects);
    assert!(audit(&master).await.is_empty());
}

#[tokio::test]
async fn a_master_restart_changes_nothing() {
    let projector = Sim::projector();
    // The default boot wait (6 s) outlasts the edge's reconnect period (3 s): the master
    // waits for the edge before it would count its timeout.
    let mut cluster = start_with(&projector, false, &settings(true, "cold"), 6000).await;
    let edge = cluster.edge_admin(0);
    let before = control_of(&cluster.master_api()).await;
    // (f) restart the master while the edge is up: nothing changes owner, nothing flaps.
    cluster.master.kill();
    cluster.master.restart();
    cluster.wait_master_up().await;
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(TIMEOUT_MS + 500)).await;
    let master = cluster.master_api();
    assert_eq!(control_of(&master).await, before);
    assert_eq!(control_of(&edge).await, before);
    assert!(audit(&master).await.is_empty());
    assert!(
        projector.events_of("disconnect").is_empty(),
        "the device session never dropped"
    );
    assert_eq!(projector.events_of("connect").len(), 1);
    wait_executor(&edge, "edge:site-1", Duration::from_millis(500)).await;
    assert_eq!(cluster.edges[0].count_in_log("stops its modules"), 0);
}
