//! Site pairs with the real binaries (DESIGN.md, "Site pairs and collector arrays"): a
//! master as witness and one location of two nodes, each link behind a fault proxy, a
//! projector simulator that allows one device session at a time.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_tests::api::ApiClient;
use tether_tests::pair::{NODES, PairSite, PairSpec};
use tether_tests::sim::Sim;
use tether_tests::{CORE, wait_for};

/// The pair timeout in these tests (four heartbeats of 500 ms at least).
const PAIR_TIMEOUT_MS: u64 = 4000;
const HEARTBEAT_MS: u64 = 500;

/// A logic driver whose status only a method sets: the standby can know it only by the
/// holder's status sync.
const NOTE: &str = r#"
fn ping() { "pong" }
fn remember(text) { status("note", text); text }
"#;

fn site(projector: u16) -> String {
    format!(
        r#"
[[repositories]]
id = "core"
path = "{CORE}"

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

async fn start(projector: &Sim, settings: &str) -> PairSite {
    let spec = PairSpec {
        edge_settings: format!(
            "pair_timeout_ms = {PAIR_TIMEOUT_MS}\ntimeout_ms = 20000\nstandby = \"warm\"\n{settings}"
        ),
        site_extra: site(projector.port()),
        heartbeat_ms: HEARTBEAT_MS,
        files: vec![("repos/extra-drivers/note.rhai".into(), NOTE.into())],
    };
    let site = PairSite::start(spec).await;
    wait_executor(&site.master_api(), "edge:site-1a", Duration::from_secs(20)).await;
    site.wait_holder(NODES[0], Duration::from_secs(5)).await;
    site
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

/// The peer of the device session opened last.
fn session_peer(sim: &Sim) -> String {
    let connects = sim.events_of("connect");
    connects.last().expect("a device session")["peer"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Index of the first event of `kind` from `peer`.
fn position(sim: &Sim, kind: &str, peer: &str) -> Option<usize> {
    sim.events()
        .iter()
        .position(|e| e["event"] == kind && e["peer"] == peer)
}

async fn audit(api: &ApiClient) -> Vec<Value> {
    let (status, body) = api.get("/api/v1/audit").await;
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_holder_killed_is_replaced_by_its_standby_within_the_pair_timeout_from_the_synced_status()
{
    let projector = Sim::projector();
    let mut site = start(&projector, "").await;
    let master = site.master_api();
    let (status, body) = master
        .exec("room", "Note", 1, "remember", json!(["kept by sync"]))
        .await;
    assert_eq!(
        (status, body["executed_by"].clone()),
        (200, json!("edge:site-1a")),
        "{body}"
    );
    let old = wait_for(
        "the holder's device session",
        Duration::from_secs(5),
        || async { (projector.open_sessions() == 1).then(|| session_peer(&projector)) },
    )
    .await;
    let location = site.location().await;
    assert_eq!(location["online"], true, "{location}");
    let roles: Vec<(Value, Value)> = location["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].clone(), n["role"].clone()))
        .collect();
    assert_eq!(
        roles,
        [
            (json!("site-1a"), json!("holder")),
            (json!("site-1b"), json!("standby"))
        ],
        "{location}"
    );
    // The status change reaches the standby over the peer link.
    tokio::time::sleep(Duration::from_millis(500)).await;

    site.nodes[0].kill();
    let took = wait_executor(
        &master,
        "edge:site-1b",
        Duration::from_millis(PAIR_TIMEOUT_MS + 1000),
    )
    .await;
    eprintln!(
        "standby holds {} ms after the holder's SIGKILL",
        took.as_millis()
    );
    site.wait_holder(NODES[1], Duration::from_secs(2)).await;
    // It started from the holder's status, synced before the kill.
    let status = master.status("room", "Note", 1).await;
    assert_eq!(status["note"], "kept by sync", "{status}");
    // One device session at a time: the old one ended before the new one began.
    let new = wait_for(
        "the standby's device session",
        Duration::from_secs(5),
        || async {
            let peer = session_peer(&projector);
            (peer != old && projector.open_sessions() == 1).then_some(peer)
        },
    )
    .await;
    assert!(
        position(&projector, "disconnect", &old) < position(&projector, "connect", &new),
        "the old session ended first: {:?}",
        projector.events()
    );
    // The change of holder is in the master's audit log.
    let records = audit(&master).await;
    assert!(
        records.iter().any(|r| r["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("node site-1b holds")),
        "{records:?}"
    );
}
