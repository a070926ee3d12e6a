//! Site pairs with the real binaries (DESIGN.md, "Site pairs and collector arrays"): a
//! master as witness and one location of two nodes, each link behind a fault proxy, a
//! projector simulator that allows one device session at a time.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_tests::api::ApiClient;
use tether_tests::pair::{LOCATION, NODES, PairSite, PairSpec, array_site};
use tether_tests::proxy::FaultProxy;
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
    start_with(projector, settings, Vec::new()).await
}

async fn start_with(projector: &Sim, settings: &str, node_extra: Vec<String>) -> PairSite {
    let spec = PairSpec {
        node_extra,
        edge_settings: format!(
            "pair_timeout_ms = {PAIR_TIMEOUT_MS}\ntimeout_ms = 20000\nstandby = \"warm\"\n{settings}"
        ),
        site_extra: site(projector.port()),
        heartbeat_ms: HEARTBEAT_MS,
        files: vec![("repos/extra-drivers/note.rhai".into(), NOTE.into())],
        masters: 1,
        nodes: 2,
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

/// SIGKILLs node `killed` and waits until node `next` runs the rooms (the master's call
/// runs there, and the master names it the holder), within `limit` of the kill.
async fn kill_and_wait_holder(site: &mut PairSite, killed: usize, next: usize, limit: Duration) {
    site.nodes[killed].kill();
    let executor = format!("edge:{}", NODES[next]);
    let took = wait_executor(&site.master_api(), &executor, limit).await;
    eprintln!(
        "{} holds {} ms after {}'s SIGKILL",
        NODES[next],
        took.as_millis(),
        NODES[killed]
    );
    site.wait_holder(NODES[next], Duration::from_secs(2)).await;
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

    kill_and_wait_holder(
        &mut site,
        0,
        1,
        Duration::from_millis(PAIR_TIMEOUT_MS + 1000),
    )
    .await;
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

/// Whether node `index` runs the location's modules, as its own API says.
async fn controlling(site: &PairSite, index: usize) -> bool {
    let api = site.node_api(index).await;
    api.edge(LOCATION)
        .await
        .is_some_and(|edge| edge["controlling"] == true)
}

/// The audit record of node `index` whose reason contains `needle`.
async fn node_record(site: &PairSite, index: usize, needle: &str) -> Option<Value> {
    let api = site.node_api(index).await;
    audit(&api)
        .await
        .into_iter()
        .find(|r| r["reason"].as_str().unwrap_or_default().contains(needle))
}

/// Nothing changes for a pair timeout and more: the same holder under the same epoch,
/// the standby idle, and the holder serving its own API.
async fn assert_unchanged(site: &PairSite, epoch: &Value, what: &str) {
    tokio::time::sleep(Duration::from_millis(PAIR_TIMEOUT_MS + 1500)).await;
    let location = site.location().await;
    assert_eq!(&location["epoch"], epoch, "{what}: {location}");
    assert!(controlling(site, 0).await, "{what}: the holder runs");
    for standby in 1..site.nodes.len() {
        assert!(
            !controlling(site, standby).await,
            "{what}: standby {standby} does not"
        );
    }
    let holder = site.node_api(0).await;
    let (status, body) = holder.exec("room", "Note", 1, "ping", json!([])).await;
    assert_eq!(
        (status, body["executed_by"].clone()),
        (200, json!("edge:site-1a")),
        "{what}: {body}"
    );
}

#[tokio::test]
async fn one_link_cut_at_a_time_changes_nothing() {
    let projector = Sim::projector();
    let site = start(&projector, "").await;
    let epoch = site.location().await["epoch"].clone();

    // The holder's link to the master, the peer link up: the standby vouches for it.
    site.master_links[0].cut();
    assert_unchanged(&site, &epoch, "holder cut off from the master").await;
    site.master_links[0].heal();
    wait_for(
        "the holder back on the master",
        Duration::from_secs(10),
        || async {
            let location = site.location().await;
            (location["nodes"][0]["online"] == true).then_some(())
        },
    )
    .await;

    // The peer link, both master links up: the witness sees the holder.
    site.peer_link(0, 1).cut();
    assert_unchanged(&site, &epoch, "peer link cut").await;
    wait_executor(&site.master_api(), "edge:site-1a", Duration::from_secs(5)).await;
    site.peer_link(0, 1).heal();
}

/// Cuts the holder off from both its peer and the master, until healed.
fn cut_holder_off(site: &PairSite) {
    site.master_links[0].cut();
    site.peer_link(0, 1).cut();
}

fn heal(site: &PairSite) {
    site.master_links[0].heal();
    site.peer_link(0, 1).heal();
}

#[tokio::test]
async fn a_holder_cut_off_from_both_under_stop_stops_before_the_standby_starts() {
    let projector = Sim::projector();
    let site = start(&projector, "isolation = \"stop\"").await;
    let master = site.master_api();
    cut_holder_off(&site);
    let cut_at = Instant::now();
    let took = wait_executor(
        &master,
        "edge:site-1b",
        Duration::from_millis(PAIR_TIMEOUT_MS + 2000),
    )
    .await;
    eprintln!("the standby holds {} ms after the cut", took.as_millis());
    assert!(!controlling(&site, 0).await, "the old holder has stopped");
    let stopped = wait_for(
        "the old holder's stop in its audit log",
        Duration::from_secs(5),
        || node_record(&site, 0, "isolation = \"stop\""),
    )
    .await;
    let started = wait_for(
        "the standby's start in its audit log",
        Duration::from_secs(5),
        || node_record(&site, 1, "node site-1b runs the modules"),
    )
    .await;
    let (stopped, started) = (stopped["time"].clone(), started["time"].clone());
    assert!(
        stopped.as_str() < started.as_str(),
        "break before make: stopped {stopped}, started {started}"
    );
    heal(&site);
    // Healed, the old holder learns the new grant and stays stopped.
    wait_for(
        "the old holder back on the master",
        Duration::from_secs(10),
        || async {
            let location = site.location().await;
            (location["nodes"][0]["online"] == true).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!controlling(&site, 0).await, "the old holder stays stopped");
    assert!(controlling(&site, 1).await);
    assert!(cut_at.elapsed() > took);
}

#[tokio::test]
async fn a_holder_cut_off_from_both_under_continue_overlaps_no_longer_than_the_cut_and_says_so() {
    let projector = Sim::projector();
    let site = start(&projector, "").await;
    let master = site.master_api();
    cut_holder_off(&site);
    let cut_at = Instant::now();
    wait_executor(
        &master,
        "edge:site-1b",
        Duration::from_millis(PAIR_TIMEOUT_MS + 2000),
    )
    .await;
    let overlap_from = Instant::now();
    assert!(
        controlling(&site, 0).await,
        "rooms keep running on the old holder"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    heal(&site);
    let cut_for = cut_at.elapsed();
    wait_for(
        "the old holder to stop",
        Duration::from_secs(10),
        || async { (!controlling(&site, 0).await).then_some(()) },
    )
    .await;
    let overlap = overlap_from.elapsed();
    eprintln!(
        "cut {} ms, overlap at most {} ms",
        cut_for.as_millis(),
        overlap.as_millis()
    );
    assert!(overlap < cut_for, "overlap {overlap:?}, cut {cut_for:?}");
    // Reported: in the old holder's audit log, and so in the master's.
    let needle = "two holders for at most";
    wait_for(
        "the overlap in the old holder's audit log",
        Duration::from_secs(5),
        || node_record(&site, 0, needle),
    )
    .await;
    wait_for(
        "the overlap in the master's audit log",
        Duration::from_secs(10),
        || async {
            audit(&master)
                .await
                .iter()
                .any(|r| r["reason"].as_str().unwrap_or_default().contains(needle))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn without_a_witness_a_standby_never_takes_over() {
    let projector = Sim::projector();
    let mut site = start(&projector, "").await;
    site.master_links[0].cut();
    site.master_links[1].cut();
    tokio::time::sleep(Duration::from_millis(PAIR_TIMEOUT_MS)).await;
    site.nodes[0].kill();
    tokio::time::sleep(Duration::from_millis(PAIR_TIMEOUT_MS + 3000)).await;
    assert!(!controlling(&site, 1).await, "no witness, no takeover");
}

#[tokio::test]
async fn without_a_witness_a_standby_takes_over_after_unwitnessed_takeover_ms() {
    const AFTER_MS: u64 = 6000;
    let projector = Sim::projector();
    let mut site = start(&projector, &format!("unwitnessed_takeover_ms = {AFTER_MS}")).await;
    site.master_links[0].cut();
    site.master_links[1].cut();
    tokio::time::sleep(Duration::from_millis(PAIR_TIMEOUT_MS)).await;
    site.nodes[0].kill();
    let killed = Instant::now();
    let standby = site.node_api(1).await;
    let took = wait_executor(
        &standby,
        "edge:site-1b",
        Duration::from_millis(AFTER_MS + 2000),
    )
    .await;
    eprintln!(
        "unwitnessed takeover {} ms after the kill",
        took.as_millis()
    );
    assert!(
        killed.elapsed() >= Duration::from_millis(AFTER_MS - 1000),
        "not before unwitnessed_takeover_ms: {:?}",
        killed.elapsed()
    );
    // Its audit record follows the start.
    wait_for(
        "the claim in the standby's audit log",
        Duration::from_secs(5),
        || node_record(&site, 1, "without a witness"),
    )
    .await;
}

#[tokio::test]
async fn a_device_the_holder_cannot_reach_but_its_standby_can_moves_the_modules_once() {
    const HOLD_DOWN_MS: u64 = 2000;
    let projector = Sim::projector();
    let device: std::net::SocketAddr = projector.addr.parse().unwrap();
    // Each node reaches the projector on a path of its own.
    let paths = [
        FaultProxy::start(0, device).await,
        FaultProxy::start(0, device).await,
    ];
    let routes = paths
        .iter()
        .map(|path| format!("[device_routes]\n\"{device}\" = \"{}\"\n", path.addr()))
        .collect();
    let site = start_with(
        &projector,
        &format!("device_hold_down_ms = {HOLD_DOWN_MS}"),
        routes,
    )
    .await;
    let master = site.master_api();
    let epoch = site.location().await["epoch"].as_u64().unwrap();
    wait_for(
        "the holder's device session",
        Duration::from_secs(5),
        || async { (projector.open_sessions() == 1).then_some(()) },
    )
    .await;

    // The holder's path to the device goes (refused from now on), the standby's stays.
    let [holder_path, _standby_path] = paths;
    holder_path.reset();
    drop(holder_path);
    let lost = Instant::now();
    wait_executor(&master, "edge:site-1b", Duration::from_secs(15)).await;
    eprintln!(
        "handed over {} ms after the holder lost the device",
        lost.elapsed().as_millis()
    );
    wait_for(
        "the standby's device session",
        Duration::from_secs(10),
        || async { (projector.open_sessions() == 1).then_some(()) },
    )
    .await;
    // Once: released, then granted, and nothing after (two hold-downs more).
    tokio::time::sleep(Duration::from_millis(3 * HOLD_DOWN_MS)).await;
    let location = site.location().await;
    assert_eq!(location["epoch"].as_u64(), Some(epoch + 2), "{location}");
    assert_eq!(location["nodes"][1]["role"], "holder", "{location}");
    assert!(controlling(&site, 1).await && !controlling(&site, 0).await);
}

const POLL_MS: u64 = 1000;

/// Each node's collector-array slot, as the master shows it.
async fn array_slots(site: &PairSite) -> Option<Vec<Value>> {
    let location = site.location().await;
    let nodes = location["nodes"].as_array()?.clone();
    Some(nodes.iter().map(|n| n["array_slot"].clone()).collect())
}

/// The meter's polls (its input-register reads, one a poll) from `since` on, as (ms since
/// `since`, peer).
fn polls(meter: &Sim, since: std::time::SystemTime) -> Vec<(u64, String)> {
    meter
        .events_of("read")
        .into_iter()
        .filter(|e| e["function"] == "read_input")
        .filter_map(|e| {
            let at = humantime::parse_rfc3339(e["time"].as_str()?).ok()?;
            let ms = at.duration_since(since).ok()?.as_millis() as u64;
            Some((ms, e["peer"].as_str()?.to_string()))
        })
        .collect()
}

/// Watches the meter for `intervals` poll intervals and asserts that `nodes` nodes took
/// turns: one read an interval in all, an interval apart, each run of `nodes` reads by
/// `nodes` readers.
async fn assert_turns(meter: &Sim, nodes: usize, intervals: u64) {
    let start = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(intervals * POLL_MS)).await;
    let turns = polls(meter, start);
    eprintln!("{nodes} nodes: {turns:?}");
    let expected = intervals as usize;
    assert!(
        (expected - 1..=expected + 1).contains(&turns.len()),
        "once an interval in all: {turns:?}"
    );
    for run in turns.windows(nodes) {
        let readers: std::collections::HashSet<&String> = run.iter().map(|(_, p)| p).collect();
        assert_eq!(readers.len(), nodes, "each in turn: {turns:?}");
    }
    for pair in turns.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            (POLL_MS / 2..=POLL_MS * 3 / 2).contains(&gap),
            "an interval apart: {turns:?}"
        );
    }
}

/// The longest time between two polls, the first counted from 0.
fn longest_gap(polls: &[(u64, String)]) -> u64 {
    let mut last = 0;
    let mut longest = 0;
    for (at, _) in polls {
        longest = longest.max(at - last);
        last = *at;
    }
    longest
}

#[tokio::test]
async fn a_collector_array_of_two_nodes_takes_turns_and_reschedules_on_a_loss_and_a_return() {
    let meter = Sim::modbus();
    let device: std::net::SocketAddr = meter.addr.parse().unwrap();
    // Each node reaches the meter on a path of its own.
    let mut paths = vec![
        FaultProxy::start(0, device).await,
        FaultProxy::start(0, device).await,
    ];
    let routes = paths
        .iter()
        .map(|path| format!("[device_routes]\n\"{device}\" = \"{}\"\n", path.addr()))
        .collect();
    let spec = PairSpec {
        edge_settings: format!("pair_timeout_ms = {PAIR_TIMEOUT_MS}\ntimeout_ms = 20000"),
        site_extra: array_site(meter.port(), POLL_MS),
        heartbeat_ms: HEARTBEAT_MS,
        files: Vec::new(),
        node_extra: routes,
        masters: 1,
        nodes: 2,
    };
    let mut site = PairSite::start(spec).await;
    site.wait_holder(NODES[0], Duration::from_secs(20)).await;
    // Both nodes poll once their peer link is up.
    wait_for("both nodes polling", Duration::from_secs(20), || async {
        let peers: std::collections::HashSet<String> = polls(&meter, std::time::UNIX_EPOCH)
            .into_iter()
            .map(|(_, peer)| peer)
            .collect();
        (peers.len() == 2).then_some(())
    })
    .await;
    // The master shows each node's turn, as the nodes report them.
    wait_for("both nodes' slots", Duration::from_secs(10), || async {
        (array_slots(&site).await? == [json!([0, 2]), json!([1, 2])]).then_some(())
    })
    .await;
    // Settled (the connects' own polls are over): they alternate, an interval apart.
    tokio::time::sleep(Duration::from_millis(2 * POLL_MS)).await;
    let start = std::time::SystemTime::now();
    assert_turns(&meter, 2, 8).await;
    // The client reads what either node read: the holder's status follows every poll.
    let (status, body) = site
        .master_api()
        .exec("plant", "Meter", 1, "register", json!([0]))
        .await;
    assert_eq!(status, 200, "{body}");
    // Methods stay on the holder: the standby, which polls the meter too, sends a call on.
    let standby = site.node_api(1).await;
    let (status, body) = standby
        .exec("plant", "Meter", 1, "register", json!([0]))
        .await;
    assert_eq!(
        (status, body["executed_by"].clone()),
        (200, json!("edge:site-1a")),
        "{body}"
    );

    // The standby killed: the holder alone reads every interval, within one of the loss.
    site.nodes[1].kill();
    let lost = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(5 * POLL_MS)).await;
    let alone = polls(&meter, lost);
    eprintln!("one node: {alone:?}");
    assert!(alone.len() >= 4, "every interval: {alone:?}");
    assert!(
        alone.first().is_some_and(|(at, _)| *at <= POLL_MS + 300),
        "within one interval of the loss: {alone:?}"
    );
    let peers: std::collections::HashSet<&String> = alone.iter().map(|(_, p)| p).collect();
    assert_eq!(peers.len(), 1, "{alone:?}");
    assert_eq!(
        array_slots(&site).await.unwrap(),
        [json!([0, 1]), Value::Null],
        "the survivor alone"
    );

    // Back: they take turns again.
    site.nodes[1].restart();
    wait_for(
        "the restarted node polling",
        Duration::from_secs(20),
        || async {
            let peers: std::collections::HashSet<String> = polls(&meter, lost)
                .into_iter()
                .map(|(_, peer)| peer)
                .collect();
            (peers.len() == 2).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2 * POLL_MS)).await;
    let again_from = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(6 * POLL_MS)).await;
    let again = polls(&meter, again_from);
    eprintln!("two nodes again: {again:?}");
    for pair in again.windows(2) {
        assert_ne!(pair[0].1, pair[1].1, "they alternate again: {again:?}");
    }
    // No gap longer than two intervals anywhere.
    let all = polls(&meter, start);
    assert!(longest_gap(&all) <= 2 * POLL_MS, "{all:?}");

    // The standby's path to the meter goes: it takes no turn, and the holder reads every
    // interval (rather than half the reads going missing).
    let standby_path = paths.remove(1);
    standby_path.reset();
    drop(standby_path);
    wait_for(
        "the standby out of the array",
        Duration::from_secs(10),
        || async { (array_slots(&site).await? == [json!([0, 1]), Value::Null]).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    let from = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(4 * POLL_MS)).await;
    let holder_alone = polls(&meter, from);
    assert!(
        holder_alone.len() >= 3,
        "every interval from the holder: {holder_alone:?}"
    );
    assert!(
        longest_gap(&holder_alone) <= POLL_MS + 300,
        "{holder_alone:?}"
    );
}

/// The master that witnesses the pair: the one whose row in `GET /api/v1/masters` lists
/// the location among the edges it links.
#[cfg(feature = "cluster")]
async fn witness(api: &ApiClient) -> Option<String> {
    let (status, masters) = api.get("/api/v1/masters").await;
    if status != 200 {
        return None;
    }
    masters.as_array()?.iter().find_map(|master| {
        let links = master["edges"].as_array()?;
        links
            .iter()
            .any(|e| e == LOCATION)
            .then(|| master["id"].as_str().map(str::to_string))?
    })
}

#[cfg(feature = "cluster")]
#[tokio::test]
async fn among_several_masters_one_witnesses_and_its_death_changes_nothing_in_the_pair() {
    let projector = Sim::projector();
    let spec = PairSpec {
        edge_settings: format!("pair_timeout_ms = {PAIR_TIMEOUT_MS}\ntimeout_ms = 20000"),
        site_extra: site(projector.port()),
        heartbeat_ms: HEARTBEAT_MS,
        files: vec![("repos/extra-drivers/note.rhai".into(), NOTE.into())],
        masters: 3,
        ..PairSpec::default()
    };
    let mut site = PairSite::start(spec).await;
    // Every master serves the pair's rooms: the others send the calls to the witness.
    for i in 0..3 {
        wait_executor(
            &site.master_api_at(i),
            "edge:site-1a",
            Duration::from_secs(30),
        )
        .await;
    }
    let first = site.master_api_at(0);
    let old = wait_for("the witness", Duration::from_secs(10), || witness(&first)).await;
    let index = |id: &str| id.trim_start_matches('m').parse::<usize>().unwrap() - 1;
    let epoch = {
        let api = site.master_api_at(index(&old));
        api.edge(LOCATION).await.unwrap()["epoch"].clone()
    };

    // The witness dies: another takes the role once its lease is gone, the nodes link to
    // it, and the pair goes on as it was (the standby still hears the holder).
    site.masters[index(&old)].kill();
    let survivor = site.master_api_at((index(&old) + 1) % 3);
    let new = wait_for("a new witness", Duration::from_secs(20), || async {
        witness(&survivor).await.filter(|w| *w != old)
    })
    .await;
    let witness_api = site.master_api_at(index(&new));
    wait_for(
        "both nodes on the new witness",
        Duration::from_secs(20),
        || async {
            let location = witness_api.edge(LOCATION).await?;
            let nodes = location["nodes"].as_array()?;
            nodes.iter().all(|n| n["online"] == true).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(PAIR_TIMEOUT_MS)).await;
    let location = witness_api.edge(LOCATION).await.unwrap();
    assert_eq!(location["epoch"], epoch, "no grant changed: {location}");
    assert!(controlling(&site, 0).await && !controlling(&site, 1).await);
    wait_executor(&survivor, "edge:site-1a", Duration::from_secs(5)).await;

    // The new witness fails the holder over.
    site.nodes[0].kill();
    let took = wait_executor(
        &survivor,
        "edge:site-1b",
        Duration::from_millis(PAIR_TIMEOUT_MS + 2000),
    )
    .await;
    eprintln!(
        "the new witness's standby holds {} ms after the holder's SIGKILL",
        took.as_millis()
    );
}

/// A peer that passes on a grant the witness did not prove (a forged epoch at the top,
/// which would make the node ignore every real grant) is not believed.
#[tokio::test]
async fn a_grant_passed_on_without_the_witness_proof_is_refused() {
    use tether_common::control::pair::{GrantProof, PairGrant, PairHolder};
    use tether_common::control::{EdgeId, Epoch, NodeId};
    use tether_common::link::{ConnectorConfig, LinkConfig, Secret, connect_once, tls};
    use tether_common::protocol::Notice;

    let projector = Sim::projector();
    let site = start(&projector, "").await;
    let epoch = site.location().await["epoch"].clone();
    tls::install_crypto_provider();
    let certs = site.path("certs");
    // site-1b's identity and the location's secret: the peer link's own credentials. The
    // real site-1b's link is cut, so that its reconnects do not replace this one.
    site.peer_link(0, 1).cut();
    let connector = ConnectorConfig {
        master_addrs: vec![site.peer_listen_addr(0).to_string()],
        server_name: tls::server_name("site-1a").unwrap(),
        tls: tls::client_config(
            &certs.join("ca.pem"),
            Some((&certs.join("site-1b.pem"), &certs.join("site-1b.key"))),
        )
        .unwrap(),
        edge_id: EdgeId::new("site-1b"),
        secret: Secret::load(&certs.join("site-1.secret")).unwrap(),
        handshake_timeout: Duration::from_secs(5),
        reconnect: Duration::from_secs(1),
        link: LinkConfig::with_heartbeat(Duration::from_millis(HEARTBEAT_MS), 1 << 20),
    };
    let (link, _incoming) = connect_once(&connector)
        .await
        .expect("the peer's credentials link");
    let forged = PairGrant {
        holder: PairHolder::Node(NodeId::new("site-1b")),
        epoch: Epoch(u64::MAX),
    };
    // No proof; then one made with the forger's own node secret, not site-1a's.
    link.notify(Notice::PeerGrant {
        grant: forged.clone(),
        proofs: Vec::new(),
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let own = Secret::load(&certs.join("site-1b.secret")).unwrap();
    let mac = tether_common::link::auth::grant_proof(&own, LOCATION, &forged);
    link.notify(Notice::PeerGrant {
        grant: forged,
        proofs: vec![GrantProof {
            node: NodeId::new("site-1a"),
            mac,
        }],
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let view = site.node_view(0).await.expect("site-1a's view");
    assert_eq!(view["holder"], "site-1a", "{view}");
    assert!(controlling(&site, 0).await);
    assert_eq!(site.location().await["epoch"], epoch);
    assert_eq!(
        site.nodes[0].count_in_log("no valid proof"),
        2,
        "both refused"
    );
}

/// A location of three nodes (each linked to the other two, every link behind a fault
/// proxy), under the default `isolation = "continue"` and a location timeout of 8 s.
#[tokio::test]
async fn a_location_of_three_nodes_fails_over_to_the_next_and_with_two_gone_to_the_third() {
    const TIMEOUT_MS: u64 = 8000;
    let projector = Sim::projector();
    let spec = PairSpec {
        edge_settings: format!(
            "pair_timeout_ms = {PAIR_TIMEOUT_MS}\ntimeout_ms = {TIMEOUT_MS}\nstandby = \"warm\""
        ),
        site_extra: site(projector.port()),
        heartbeat_ms: HEARTBEAT_MS,
        files: vec![("repos/extra-drivers/note.rhai".into(), NOTE.into())],
        nodes: 3,
        ..PairSpec::default()
    };
    let mut site = PairSite::start(spec).await;
    let master = site.master_api();
    wait_executor(&master, "edge:site-1a", Duration::from_secs(20)).await;
    site.wait_holder(NODES[0], Duration::from_secs(5)).await;
    // Every node hears both of its peers.
    for i in 0..3 {
        wait_for(
            "a node linked to both peers",
            Duration::from_secs(10),
            || async {
                let view = site.node_view(i).await?;
                (view["peers_online"].as_array()?.len() == 2 && view["peer_online"] == true)
                    .then_some(())
            },
        )
        .await;
    }
    let roles = |location: Value| -> Vec<Value> {
        location["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["role"].clone())
            .collect()
    };
    assert_eq!(
        roles(site.location().await),
        [json!("holder"), json!("standby"), json!("standby")]
    );
    // One link between two nodes cut, then another: nothing changes (each still hears
    // the holder or the master).
    let epoch = site.location().await["epoch"].clone();
    site.peer_link(0, 1).cut();
    site.peer_link(1, 2).cut();
    assert_unchanged(&site, &epoch, "two links between nodes cut").await;
    site.peer_link(0, 1).heal();
    site.peer_link(1, 2).heal();

    // The holder SIGKILLed: the next node runs the rooms within the pair timeout and a
    // second, and the third stays standby.
    tokio::time::sleep(Duration::from_secs(2)).await;
    kill_and_wait_holder(
        &mut site,
        0,
        1,
        Duration::from_millis(PAIR_TIMEOUT_MS + 1000),
    )
    .await;
    assert!(!controlling(&site, 2).await, "site-1c stands by");

    // The second SIGKILLed too: site-1a cannot vouch for it once gone for the location's
    // timeout, so the third runs the rooms then.
    kill_and_wait_holder(
        &mut site,
        1,
        2,
        Duration::from_millis(TIMEOUT_MS + PAIR_TIMEOUT_MS + 2000),
    )
    .await;

    // Both back: they stand by, and the rooms stay on site-1c.
    site.nodes[0].restart();
    site.nodes[1].restart();
    for i in 0..2 {
        wait_for(
            "a restarted node linked to both peers",
            Duration::from_secs(20),
            || async {
                let view = site.node_view(i).await?;
                (view["peers_online"].as_array()?.len() == 2).then_some(())
            },
        )
        .await;
    }
    let epoch = site.location().await["epoch"].clone();
    tokio::time::sleep(Duration::from_millis(PAIR_TIMEOUT_MS + 1500)).await;
    let location = site.location().await;
    assert_eq!(location["epoch"], epoch, "the two nodes back: {location}");
    assert_eq!(
        roles(location),
        [json!("standby"), json!("standby"), json!("holder")]
    );
    assert!(!controlling(&site, 0).await && !controlling(&site, 1).await);
    wait_executor(&master, "edge:site-1c", Duration::from_secs(2)).await;
}

/// A collector array of three nodes: the reads rotate over the three, an interval apart;
/// one node killed, the other two alternate within an interval of the loss.
#[tokio::test]
async fn a_collector_array_of_three_nodes_takes_turns_and_reschedules_on_a_loss() {
    let meter = Sim::modbus();
    let device: std::net::SocketAddr = meter.addr.parse().unwrap();
    // Each node reaches the meter on a path of its own (so the meter tells them apart).
    let mut paths = Vec::new();
    for _ in 0..3 {
        paths.push(FaultProxy::start(0, device).await);
    }
    let routes = paths
        .iter()
        .map(|path| format!("[device_routes]\n\"{device}\" = \"{}\"\n", path.addr()))
        .collect();
    let spec = PairSpec {
        edge_settings: format!("pair_timeout_ms = {PAIR_TIMEOUT_MS}\ntimeout_ms = 20000"),
        site_extra: array_site(meter.port(), POLL_MS),
        heartbeat_ms: HEARTBEAT_MS,
        node_extra: routes,
        nodes: 3,
        ..PairSpec::default()
    };
    let mut site = PairSite::start(spec).await;
    site.wait_holder(NODES[0], Duration::from_secs(20)).await;
    wait_for(
        "the three nodes' slots",
        Duration::from_secs(20),
        || async {
            (array_slots(&site).await? == [json!([0, 3]), json!([1, 3]), json!([2, 3])])
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(3 * POLL_MS)).await;
    let start = std::time::SystemTime::now();
    assert_turns(&meter, 3, 9).await;

    // A standby killed: the other two alternate, within one interval of the loss.
    site.nodes[2].kill();
    let lost = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(6 * POLL_MS)).await;
    let two = polls(&meter, lost);
    eprintln!("two of three: {two:?}");
    assert!(
        two.first().is_some_and(|(at, _)| *at <= POLL_MS + 300),
        "within one interval of the loss: {two:?}"
    );
    let settled: Vec<&(u64, String)> = two.iter().filter(|(at, _)| *at > POLL_MS + 300).collect();
    assert!(settled.len() >= 3, "{two:?}");
    for pair in settled.windows(2) {
        assert_ne!(pair[0].1, pair[1].1, "the two alternate: {two:?}");
    }
    assert_eq!(
        array_slots(&site).await.unwrap(),
        [json!([0, 2]), json!([1, 2]), Value::Null],
    );
    // No gap longer than two intervals anywhere.
    let all = polls(&meter, start);
    assert!(longest_gap(&all) <= 2 * POLL_MS, "{all:?}");
    drop(paths);
}
