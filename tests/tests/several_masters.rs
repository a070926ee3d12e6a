//! Several masters on a real etcd (real processes, a projector simulator allowing one
//! session, fault proxies between each master and etcd): an edge killed is taken over by
//! exactly one master; the master running it, cut off from etcd, stops before its lease
//! can have expired and a survivor starts it after, with a gap on the device and no
//! overlap; healed, the cut master rejoins and takes nothing back.
#![cfg(feature = "cluster")]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_tests::api::ApiClient;
use tether_tests::masters::{Masters, MastersSpec};
use tether_tests::sim::Sim;
use tether_tests::ws::WsClient;
use tether_tests::{CORE, wait_for};

const TIMEOUT_MS: u64 = 2000;
const LEASE_MS: u64 = 3000;

/// The repositories and drivers both sites use: the projector, and a logic driver whose
/// `ping` says who runs it.
fn drivers() -> String {
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
"#
    )
}

fn site(projector: u16) -> String {
    let rest = format!(
        r#"
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
    );
    format!("{}{rest}", drivers())
}

async fn start(projector: &Sim, masters: usize) -> Masters {
    Masters::start(MastersSpec {
        masters,
        edges: vec!["site-1".into()],
        lease_ms: LEASE_MS,
        edge_settings: format!("failover = true\ntimeout_ms = {TIMEOUT_MS}\nstandby = \"cold\""),
        site_extra: site(projector.port()),
        files: vec![(
            "repos/extra-drivers/note.rhai".into(),
            "fn ping() { \"pong\" }\n".into(),
        )],
        etcd_members: 1,
        clock_offsets_s: Vec::new(),
    })
    .await
}

/// Who runs `Note 1` as `api` sees it (`None`: nobody answers it there).
async fn executor(api: &ApiClient) -> Option<String> {
    let (status, body) = api.exec("room", "Note", 1, "ping", json!([])).await;
    (status == 200).then(|| body["executed_by"].as_str().unwrap_or_default().to_string())
}

/// The index of the master that runs `system`'s Note now: the one whose answer names it.
async fn runner_of(cluster: &Masters, system: &str) -> Option<usize> {
    for (i, master) in cluster.masters.iter().enumerate() {
        let (status, body) = cluster
            .master_api(i)
            .exec(system, "Note", 1, "ping", json!([]))
            .await;
        if status == 200 && body["executed_by"] == format!("master:{}", master.id) {
            return Some(i);
        }
    }
    None
}

/// The index of the master that runs the room's modules now.
async fn runner(cluster: &Masters) -> Option<usize> {
    runner_of(cluster, "room").await
}

/// Changes of owner of `edge` to a master that a master recorded itself.
async fn takeovers_of(api: &ApiClient, edge: &str) -> Vec<Value> {
    let (_, body) = api.get(&format!("/api/v1/audit?edge={edge}")).await;
    body.as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["to"] == "master" && e["reported_by"].is_null())
        .collect()
}

async fn takeovers(api: &ApiClient) -> Vec<Value> {
    takeovers_of(api, "site-1").await
}

/// Device sessions that were refused (a second controller while one was connected).
fn refused(sim: &Sim) -> usize {
    sim.events_of("refused").len()
}

#[tokio::test]
async fn an_edge_killed_is_taken_over_by_exactly_one_master_and_a_cut_one_hands_over_without_overlap()
 {
    let projector = Sim::projector();
    let mut cluster = start(&projector, 2).await;
    let edge = cluster.edge_admin(0).await;
    wait_for(
        "the edge to run its room",
        Duration::from_secs(15),
        || async { (executor(&edge).await.as_deref() == Some("edge:site-1")).then_some(()) },
    )
    .await;
    let (status, listed) = cluster.master_api(0).get("/api/v1/masters").await;
    assert_eq!(status, 200, "{listed}");
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["m1", "m2"], "{listed}");
    for master in listed.as_array().unwrap() {
        // etcd counts in whole seconds; a lease is renewed every third of its time.
        let age = master["lease_age_ms"].as_u64();
        assert!(age.is_some_and(|age| age < LEASE_MS), "{master}");
    }

    // The edge dies: exactly one master takes over, after the timeout.
    cluster.edges[0].kill();
    let killed = Instant::now();
    let holder = wait_for(
        "a master to run the room",
        Duration::from_millis(TIMEOUT_MS + 5_000),
        || runner(&cluster),
    )
    .await;
    let took = killed.elapsed();
    eprintln!(
        "m{} took site-1 over {} ms after the kill",
        holder + 1,
        took.as_millis()
    );
    // The audit log is shared: every master shows the one change of owner, by the one
    // master that made it.
    for i in 0..cluster.masters.len() {
        let api = cluster.master_api(i);
        let records = wait_for(
            "the takeover in the shared audit log",
            Duration::from_secs(10),
            || async {
                let records = takeovers(&api).await;
                (!records.is_empty()).then_some(records)
            },
        )
        .await;
        assert_eq!(
            records.len(),
            1,
            "one change of owner, by one master: {records:?}"
        );
        assert_eq!(records[0]["master"], cluster.masters[holder].id.as_str());
    }
    wait_for(
        "the master's device session",
        Duration::from_secs(5),
        || async { (projector.open_sessions() == 1).then_some(()) },
    )
    .await;
    assert_eq!(refused(&projector), 0, "{:?}", projector.events());

    // The holder is cut off from etcd: it stops before its lease can have expired, and
    // the survivor starts after that, so the device shows a gap and never two sessions.
    let survivor = 1 - holder;
    cluster.masters[holder].etcd_proxy.cut();
    let cut = Instant::now();
    wait_for(
        "the survivor to run the room",
        Duration::from_millis(3 * LEASE_MS + TIMEOUT_MS + 5_000),
        || async { (runner(&cluster).await == Some(survivor)).then_some(()) },
    )
    .await;
    eprintln!(
        "{} took the room over {} ms after {} was cut off from etcd",
        cluster.masters[survivor].id,
        cut.elapsed().as_millis(),
        cluster.masters[holder].id
    );
    assert_eq!(
        refused(&projector),
        0,
        "no overlap: {:?}",
        projector.events()
    );
    let events = projector.events();
    let last_disconnect = events.iter().rposition(|e| e["event"] == "disconnect");
    let last_connect = events.iter().rposition(|e| e["event"] == "connect");
    assert!(
        last_disconnect < last_connect,
        "the cut master's session ended before the survivor's began: {events:?}"
    );

    // Healed, the cut master rejoins and takes nothing back.
    cluster.masters[holder].etcd_proxy.heal();
    tokio::time::sleep(Duration::from_millis(2 * LEASE_MS)).await;
    assert_eq!(runner(&cluster).await, Some(survivor), "nothing taken back");
    assert_eq!(refused(&projector), 0, "{:?}", projector.events());
    let (_, listed) = cluster.master_api(survivor).get("/api/v1/masters").await;
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(2),
        "both present again: {listed}"
    );
    // The edge comes back, links to one of the masters, and is told the rules' answer:
    // a master runs its room (rule 4), so the room stays where it runs.
    cluster.edges[0].restart();
    let edge = cluster.edge_admin(0).await;
    wait_for("the edge linked again", Duration::from_secs(15), || async {
        let me = edge.edge("site-1").await?;
        (me["online"] == true && me["owner"] == "master").then_some(())
    })
    .await;
    assert_eq!(
        runner(&cluster).await,
        Some(survivor),
        "the room stays where it runs"
    );
    // The master holding the edge's link shows the grant the edge holds, whichever
    // master issued it (it may have taken it in from the other).
    let own = edge.edge("site-1").await.expect("the edge's view");
    wait_for(
        "the link's master showing the edge's grant",
        Duration::from_secs(5),
        || async {
            for i in 0..cluster.masters.len() {
                let seen = cluster.master_api(i).edge("site-1").await?;
                if seen["online"] == true {
                    return (seen["owner"] == own["owner"] && seen["epoch"] == own["epoch"])
                        .then_some(());
                }
            }
            None
        },
    )
    .await;
    assert_eq!(refused(&projector), 0, "{:?}", projector.events());
}

/// Rooms of two edges, and a hall of no edge (a projector allowing one session).
fn hall_site(hall_projector: u16) -> String {
    let rest = format!(
        r#"
[[modules]]
id = "note-1"
driver = "note"
name = "Note"
edge = "site-1"

[[modules]]
id = "note-2"
driver = "note"
name = "Note"
edge = "site-2"

[[modules]]
id = "hall-note"
driver = "note"
name = "Note"

[[modules]]
id = "hall-display"
driver = "projector"
name = "Display"
host = "127.0.0.1"
port = {hall_projector}

[[systems]]
id = "room-1"
name = "Room 1"
edge = "site-1"
modules = ["note-1"]

[[systems]]
id = "room-2"
name = "Room 2"
edge = "site-2"
modules = ["note-2"]

[[systems]]
id = "hall"
name = "Hall"
modules = ["hall-note", "hall-display"]
"#
    );
    format!("{}{rest}", drivers())
}

/// `masters` masters on etcd of `members`, two edges with a room each, and a hall of no
/// edge whose display is the projector returned; with each edge's admin API.
async fn start_hall(masters: usize, members: usize) -> (Sim, Masters, [ApiClient; 2]) {
    start_hall_skewed(masters, members, Vec::new()).await
}

/// [`start_hall`] with each master's wall clock off by the seconds given.
async fn start_hall_skewed(
    masters: usize,
    members: usize,
    clock_offsets_s: Vec<i64>,
) -> (Sim, Masters, [ApiClient; 2]) {
    let projector = Sim::projector();
    let cluster = Masters::start(MastersSpec {
        masters,
        edges: vec!["site-1".into(), "site-2".into()],
        lease_ms: LEASE_MS,
        edge_settings: format!("failover = true\ntimeout_ms = {TIMEOUT_MS}\nstandby = \"cold\""),
        site_extra: hall_site(projector.port()),
        files: vec![(
            "repos/extra-drivers/note.rhai".into(),
            "fn ping() { \"pong\" }\n".into(),
        )],
        etcd_members: members,
        clock_offsets_s,
    })
    .await;
    let edges = [cluster.edge_admin(0).await, cluster.edge_admin(1).await];
    (projector, cluster, edges)
}

#[tokio::test]
async fn a_master_killed_hands_its_system_of_no_edge_to_a_survivor_and_edges_keep_their_rooms() {
    let (projector, mut cluster, edges) = start_hall(3, 1).await;
    for (i, edge) in edges.iter().enumerate() {
        let (system, who) = (format!("room-{}", i + 1), format!("edge:site-{}", i + 1));
        wait_for(
            "each edge to run its room",
            Duration::from_secs(15),
            || async {
                let (status, body) = edge.exec(&system, "Note", 1, "ping", json!([])).await;
                (status == 200 && body["executed_by"] == who).then_some(())
            },
        )
        .await;
    }
    // The hall runs on exactly one master.
    let holder = wait_for("a master to run the hall", Duration::from_secs(10), || {
        runner_of(&cluster, "hall")
    })
    .await;
    wait_for(
        "the hall's device session",
        Duration::from_secs(5),
        || async { (projector.open_sessions() == 1).then_some(()) },
    )
    .await;

    // A WebSocket client of another master binds the hall display's status: its
    // binding is made on the holder, and follows the hall to wherever it moves.
    let other = (0..cluster.masters.len()).find(|i| *i != holder).unwrap();
    let mut ws = WsClient::connect(
        &format!(
            "https://localhost:{}",
            cluster.masters[other].api_addr.port()
        ),
        &cluster.path("certs/ca.pem"),
        &cluster.master_api(other).token().unwrap(),
    )
    .await
    .expect("a WebSocket to another master");
    ws.send(json!({"id": 1, "cmd": "bind", "sys": "hall", "mod": "Display", "key": "connected"}))
        .await;
    assert_eq!(
        ws.answer(1, Duration::from_secs(5)).await["type"],
        "success"
    );
    let connected =
        |m: &Value| m["type"] == "notify" && m["key"] == "connected" && m["value"] == true;
    ws.wait(
        "the hall display connected",
        Duration::from_secs(10),
        connected,
    )
    .await;
    ws.clear();

    // SIGKILL it: a survivor runs the hall once the lease is gone.
    kill_the_halls_master(&mut cluster, holder).await;
    assert_eq!(refused(&projector), 0, "{:?}", projector.events());
    ws.wait(
        "the hall display connected again, through the binding made before",
        Duration::from_secs(10),
        connected,
    )
    .await;

    // The edges kept their rooms all along, and are linked to survivors.
    for (i, edge) in edges.iter().enumerate() {
        let (system, who) = (format!("room-{}", i + 1), format!("edge:site-{}", i + 1));
        let (status, body) = edge.exec(&system, "Note", 1, "ping", json!([])).await;
        assert_eq!((status, &body["executed_by"]), (200, &json!(who)), "{body}");
        wait_for("each edge linked", Duration::from_secs(10), || async {
            let me = edge.edge(&format!("site-{}", i + 1)).await?;
            (me["online"] == true).then_some(())
        })
        .await;
    }
    for i in (0..cluster.masters.len()).filter(|i| *i != holder) {
        for edge in ["site-1", "site-2"] {
            assert!(
                takeovers_of(&cluster.master_api(i), edge).await.is_empty(),
                "no change of owner for {edge}"
            );
        }
    }
}

/// SIGKILLs `holder`, which runs the hall, and waits for a survivor to run it: within
/// the lease and a little. The survivor.
async fn kill_the_halls_master(cluster: &mut Masters, holder: usize) -> usize {
    cluster.masters[holder].server.kill();
    let killed = Instant::now();
    let survivor = wait_for(
        "a survivor to run the hall",
        Duration::from_millis(2 * LEASE_MS + 5_000),
        || runner_of(cluster, "hall"),
    )
    .await;
    let took = killed.elapsed();
    eprintln!(
        "{} ran the hall {} ms after {} was killed (lease_ms {LEASE_MS})",
        cluster.masters[survivor].id,
        took.as_millis(),
        cluster.masters[holder].id
    );
    assert_ne!(survivor, holder);
    assert!(
        took < Duration::from_millis(LEASE_MS + 1_500),
        "within the lease and a little: {took:?}"
    );
    survivor
}

/// Waits for site-1 to run its room and for a master to run the hall; that master.
async fn room_and_hall_running(cluster: &Masters, site_1: &ApiClient) -> usize {
    wait_for(
        "site-1 to run its room",
        Duration::from_secs(15),
        || async {
            let (status, body) = site_1.exec("room-1", "Note", 1, "ping", json!([])).await;
            (status == 200 && body["executed_by"] == "edge:site-1").then_some(())
        },
    )
    .await;
    wait_for("a master to run the hall", Duration::from_secs(10), || {
        runner_of(cluster, "hall")
    })
    .await
}

/// Masters whose wall clocks are minutes apart (one 5 min behind, one 5 min ahead) agree
/// all the same: leases are etcd's time to live and each master's monotonic clock, and
/// failure detection is each master's own monotonic clock, so no wall clock is compared
/// with another. An edge killed is taken by exactly one master after its timeout; the
/// master running the hall killed, a survivor runs it after the lease, with no overlap.
#[tokio::test]
async fn masters_whose_clocks_are_minutes_apart_fail_over_on_time_and_once() {
    const OFFSETS_S: [i64; 3] = [0, -300, 300];
    let (projector, mut cluster, edges) = start_hall_skewed(3, 1, OFFSETS_S.to_vec()).await;
    let holder = room_and_hall_running(&cluster, &edges[0]).await;

    // site-1's edge killed: one master takes its room, after timeout_ms.
    cluster.edges[0].kill();
    let killed = Instant::now();
    let (status, body) = wait_for(
        "a master to run room-1",
        Duration::from_secs(15),
        || async {
            for i in 0..cluster.masters.len() {
                let (status, body) = cluster
                    .master_api(i)
                    .exec("room-1", "Note", 1, "ping", json!([]))
                    .await;
                if status == 200 && body["executed_by"].as_str()?.starts_with("master:") {
                    return Some((status, body));
                }
            }
            None
        },
    )
    .await;
    let took = killed.elapsed();
    eprintln!("{body} after {took:?}");
    assert_eq!(status, 200);
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS),
        "not before timeout_ms: {took:?}"
    );
    let records = wait_for(
        "the takeover in the shared audit",
        Duration::from_secs(5),
        || async {
            let records = takeovers_of(&cluster.master_api(0), "site-1").await;
            (!records.is_empty()).then_some(records)
        },
    )
    .await;
    assert_eq!(records.len(), 1, "exactly one master took it: {records:?}");
    // The clocks really are apart: each master's log is stamped with its own wall clock.
    for (i, master) in cluster.masters.iter().enumerate() {
        let log = master.server.log_text();
        let last = log
            .lines()
            .rev()
            .find_map(|line| humantime::parse_rfc3339_weak(line.split_whitespace().next()?).ok());
        let stamped = last.expect("a stamped log line");
        let off_s = match stamped.duration_since(std::time::SystemTime::now()) {
            Ok(ahead) => ahead.as_secs() as i64,
            Err(behind) => -(behind.duration().as_secs() as i64),
        };
        assert!(
            (off_s - OFFSETS_S[i]).abs() < 60,
            "m{}'s clock should be {} s off, its log says {off_s} s",
            i + 1,
            OFFSETS_S[i]
        );
    }

    // The hall's master killed: a survivor runs the hall after the lease, no overlap.
    kill_the_halls_master(&mut cluster, holder).await;
    assert_eq!(refused(&projector), 0, "{:?}", projector.events());
}

#[tokio::test]
async fn losing_one_etcd_member_changes_nothing_and_losing_quorum_stops_units_not_rooms() {
    let (projector, mut cluster, edges) = start_hall(2, 3).await;
    let rooms_kept = || async {
        for (i, edge) in edges.iter().enumerate() {
            let (system, who) = (format!("room-{}", i + 1), format!("edge:site-{}", i + 1));
            let (status, body) = edge.exec(&system, "Note", 1, "ping", json!([])).await;
            if status != 200 || body["executed_by"] != who {
                return false;
            }
        }
        true
    };
    wait_for(
        "each edge to run its room",
        Duration::from_secs(15),
        || async { rooms_kept().await.then_some(()) },
    )
    .await;
    let holder = wait_for("a master to run the hall", Duration::from_secs(10), || {
        runner_of(&cluster, "hall")
    })
    .await;

    // One member of three stops: etcd keeps its quorum, and nothing changes owner.
    cluster.etcd.members[0].server.kill();
    // Once the two left have a leader (the one killed may have led), every write is
    // taken, through each master: none may fail for the member that is gone.
    cluster.etcd.wait_healthy(Duration::from_secs(20)).await;
    for n in 0..30 {
        let name = format!("Hall {n}");
        let hall = json!({"name": name, "modules": ["hall-note", "hall-display"]});
        let master = cluster.master_api(n % cluster.masters.len());
        let (status, body) = master.put("/api/v1/systems/hall", hall).await;
        assert_eq!(status, 200, "write {n} with one etcd member down: {body}");
    }
    for i in 0..cluster.masters.len() {
        let master = cluster.master_api(i);
        wait_for(
            "the last write on every master",
            Duration::from_secs(5),
            || async {
                let (_, record) = master.get("/api/v1/systems/hall").await;
                (record["name"] == "Hall 29").then_some(())
            },
        )
        .await;
    }

    tokio::time::sleep(Duration::from_millis(2 * LEASE_MS)).await;
    // (Asked again for a moment: one exec may meet a busy machine; a change of owner
    // would answer from the other master every time.)
    wait_for(
        "the hall still on its master",
        Duration::from_secs(3),
        || async { (runner_of(&cluster, "hall").await == Some(holder)).then_some(()) },
    )
    .await;
    for i in 0..cluster.masters.len() {
        for edge in ["site-1", "site-2"] {
            assert!(takeovers_of(&cluster.master_api(i), edge).await.is_empty());
        }
    }
    wait_for("the edges' rooms", Duration::from_secs(3), || async {
        rooms_kept().await.then_some(())
    })
    .await;
    // A second stops: no quorum. The hall stops as the lease lapses (safety before
    // availability); the edges keep running their rooms.
    cluster.etcd.members[1].server.kill();
    let lost = Instant::now();
    wait_for(
        "the hall to stop without a quorum",
        Duration::from_millis(2 * LEASE_MS),
        || async { runner_of(&cluster, "hall").await.is_none().then_some(()) },
    )
    .await;
    eprintln!(
        "without a quorum the hall stopped {} ms after the second member went (lease_ms {LEASE_MS})",
        lost.elapsed().as_millis()
    );
    tokio::time::sleep(Duration::from_millis(LEASE_MS)).await;
    wait_for(
        "the edges' rooms without etcd",
        Duration::from_secs(3),
        || async { rooms_kept().await.then_some(()) },
    )
    .await;
    assert_eq!(
        runner_of(&cluster, "hall").await,
        None,
        "nothing runs without a lease"
    );
    // Reads are served; a model write answers 503 naming etcd.
    let hall = json!({"name": "Hall B", "modules": ["hall-note", "hall-display"]});
    let master = cluster.master_api(0);
    let (status, record) = master.get("/api/v1/systems/hall").await;
    assert_eq!(status, 200, "{record}");
    let (status, body) = master.put("/api/v1/systems/hall", hall.clone()).await;
    assert_eq!(
        (status, &body["error"]),
        (503, &json!("unavailable")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("etcd"), "{body}");

    // The members come back: the cluster resumes, the hall runs again on one master.
    cluster.etcd.members[0].server.restart();
    cluster.etcd.members[1].server.restart();
    let back = Instant::now();
    wait_for(
        "the hall to run again",
        Duration::from_millis(4 * LEASE_MS + 10_000),
        || runner_of(&cluster, "hall"),
    )
    .await;
    eprintln!(
        "the hall ran again {} ms after the members came back",
        back.elapsed().as_millis()
    );
    // Each master takes writes again once it has joined again (its own lease back).
    let master = cluster.master_api(0);
    wait_for(
        "writes taken again",
        Duration::from_millis(4 * LEASE_MS),
        || async {
            let (status, _) = master.put("/api/v1/systems/hall", hall.clone()).await;
            (status == 200).then_some(())
        },
    )
    .await;
    wait_for("the edges' rooms", Duration::from_secs(3), || async {
        rooms_kept().await.then_some(())
    })
    .await;
    assert_eq!(refused(&projector), 0, "{:?}", projector.events());
}

#[tokio::test]
async fn any_master_serves_any_call_by_sending_it_to_the_holder_and_takes_every_masters_tokens() {
    let (_projector, cluster, edges) = start_hall(3, 1).await;
    let holder = room_and_hall_running(&cluster, &edges[0]).await;
    let holder_url = format!(
        "https://localhost:{}",
        cluster.masters[holder].api_addr.port()
    );
    for i in 0..cluster.masters.len() {
        let api = cluster.master_api(i);
        // The hall, run by one master: every master answers it, from the holder.
        let answer = api.exec_full("hall", "Note", 1, "ping", json!([])).await;
        assert_eq!(answer.status, 200, "m{}: {:?}", i + 1, answer.body);
        assert_eq!(
            answer.body["executed_by"],
            format!("master:{}", cluster.masters[holder].id)
        );
        if i != holder {
            assert_eq!(
                answer.preferred_server.as_deref(),
                Some(holder_url.as_str()),
                "m{} names the holder",
                i + 1
            );
        }
        // A room its edge runs: every master reaches it, through the link's master.
        let answer = api.exec_full("room-1", "Note", 1, "ping", json!([])).await;
        assert_eq!(answer.status, 200, "m{}: {:?}", i + 1, answer.body);
        assert_eq!(answer.body["executed_by"], "edge:site-1");
    }

    // The same over a WebSocket to a master that holds neither: the hall's exec runs on
    // its holder, its display's status binding and the room's come through, with a
    // redirect hint naming the holder.
    let other = (0..cluster.masters.len()).find(|i| *i != holder).unwrap();
    let token = cluster.master_api(other).token().unwrap();
    let mut ws = WsClient::connect(
        &format!(
            "https://localhost:{}",
            cluster.masters[other].api_addr.port()
        ),
        &cluster.path("certs/ca.pem"),
        &token,
    )
    .await
    .expect("a WebSocket to a master that holds nothing");
    ws.send(json!({"id": 1, "cmd": "exec", "sys": "hall", "mod": "Note", "method": "ping"}))
        .await;
    let answer = ws.answer(1, Duration::from_secs(5)).await;
    assert_eq!(answer["type"], "success", "{answer}");
    assert_eq!(
        answer["executed_by"],
        format!("master:{}", cluster.masters[holder].id)
    );
    let hint = ws
        .wait("a redirect hint", Duration::from_secs(5), |m| {
            m["type"] == "redirect" && m["sys"] == "hall"
        })
        .await;
    assert_eq!(hint["server"], holder_url.as_str());
    ws.send(json!({"id": 2, "cmd": "bind", "sys": "hall", "mod": "Display", "key": "connected"}))
        .await;
    assert_eq!(
        ws.answer(2, Duration::from_secs(5)).await["type"],
        "success"
    );
    let notice = ws
        .wait("the hall display's status", Duration::from_secs(10), |m| {
            m["type"] == "notify" && m["sys"] == "hall" && m["key"] == "connected"
        })
        .await;
    assert_eq!(notice["value"], true, "{notice}");
    ws.send(json!({"id": 3, "cmd": "exec", "sys": "room-1", "mod": "Note", "method": "ping"}))
        .await;
    let answer = ws.answer(3, Duration::from_secs(5)).await;
    assert_eq!(answer["executed_by"], "edge:site-1", "{answer}");

    // Every master's admin token works on every master; so does a user's.
    let m1_token = cluster.master_api(0).token();
    for i in 1..cluster.masters.len() {
        let (status, body) = cluster
            .master_api(i)
            .with_token(m1_token.clone())
            .get("/api/v1/users")
            .await;
        assert_eq!(status, 200, "m1's admin token on m{}: {body}", i + 1);
    }
    let (status, user) = cluster
        .master_api(0)
        .post(
            "/api/v1/users",
            json!({"id": "ops", "name": "Ops", "role": "operator"}),
        )
        .await;
    assert_eq!(status, 201, "{user}");
    let token = user["token"].as_str().map(str::to_string);
    let on_m3 = cluster.master_api(2).with_token(token);
    wait_for("the user on m3", Duration::from_secs(10), || async {
        let answer = on_m3.exec_full("hall", "Note", 1, "ping", json!([])).await;
        (answer.status == 200).then_some(())
    })
    .await;
    let (status, _) = on_m3.get("/api/v1/users").await;
    assert_eq!(status, 403, "an operator is no admin on any master");
    let (status, _) = cluster
        .master_api(1)
        .with_token(Some("tth_not_a_token".into()))
        .get("/api/v1/systems")
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn code_pulled_on_one_master_runs_on_every_master_and_edge_from_the_shared_code() {
    let (_projector, cluster, edges) = start_hall(2, 1).await;
    let holder = wait_for("a master to run the hall", Duration::from_secs(10), || {
        runner_of(&cluster, "hall")
    })
    .await;
    let other = 1 - holder;
    let note = cluster.path("repos/extra-drivers/note.rhai");
    std::fs::write(&note, "fn ping() { \"pong 2\" }\n").unwrap();
    let (status, pulled) = cluster
        .master_api(other)
        .post("/api/v1/repositories/extra/pull", json!({}))
        .await;
    assert_eq!(status, 200, "{pulled}");
    assert_eq!(pulled["changed"], true, "{pulled}");
    // The folder moves on unread: a master that read it now would run something else
    // than the commit pulled.
    std::fs::write(&note, "fn ping() { \"pong 3\" }\n").unwrap();

    let says = |api: ApiClient, system: &'static str| async move {
        let (status, body) = api.exec(system, "Note", 1, "ping", json!([])).await;
        (status == 200).then(|| body["result"].as_str().unwrap_or_default().to_string())
    };
    wait_for(
        "the hall's master to run the commit pulled on the other",
        Duration::from_secs(10),
        || async {
            (says(cluster.master_api(holder), "hall").await.as_deref() == Some("pong 2"))
                .then_some(())
        },
    )
    .await;
    for (i, edge) in edges.iter().enumerate() {
        let system: &'static str = if i == 0 { "room-1" } else { "room-2" };
        wait_for("each edge to run it", Duration::from_secs(10), || async {
            (says(edge.clone(), system).await.as_deref() == Some("pong 2")).then_some(())
        })
        .await;
    }
    for i in 0..cluster.masters.len() {
        let (_, record) = cluster
            .master_api(i)
            .get("/api/v1/repositories/extra")
            .await;
        assert_eq!(record["commit"], pulled["commit"], "m{}: {record}", i + 1);
    }
}

/// The master holding an edge's link keeps its link key written: a key withdrawn by
/// someone else (a master whose own, dead link of the edge wrote the key late and then
/// withdrew it) is written again, so no master fails over an edge that is linked.
#[tokio::test]
async fn a_link_key_withdrawn_under_a_live_link_is_written_again_and_nothing_fails_over() {
    use tether_common::store::etcd::{DEFAULT_PREFIX, Etcd};
    let projector = Sim::projector();
    let cluster = start(&projector, 2).await;
    let edge = cluster.edge_admin(0).await;
    wait_for(
        "the edge to run its room",
        Duration::from_secs(20),
        || async { (executor(&edge).await.as_deref() == Some("edge:site-1")).then_some(()) },
    )
    .await;
    let holder_of_link = || async {
        let (_, body) = cluster.master_api(0).get("/api/v1/masters").await;
        body.as_array()?
            .iter()
            .find(|m| {
                m["edges"]
                    .as_array()
                    .is_some_and(|edges| edges.iter().any(|e| e == "site-1"))
            })
            .and_then(|m| m["id"].as_str().map(str::to_string))
    };
    let holder = wait_for(
        "a master to hold the link's key",
        Duration::from_secs(10),
        holder_of_link,
    )
    .await;

    let etcd = Etcd::connect(
        &cluster.etcd.endpoints(),
        DEFAULT_PREFIX,
        Duration::from_secs(2),
    )
    .await
    .expect("etcd answers");
    etcd.client()
        .delete(etcd.key("links/site-1"), None)
        .await
        .expect("the key is deleted");
    let gone_at = Instant::now();
    // Read from etcd itself: a master's view may still show the key a moment after.
    let back = wait_for(
        "the link key written again",
        Duration::from_secs(5),
        || async {
            let answer = etcd
                .client()
                .get(etcd.key("links/site-1"), None)
                .await
                .ok()?;
            let value = answer.kvs().first()?.value_str().ok()?.to_string();
            value.split_once('#').map(|(master, _)| master.to_string())
        },
    )
    .await;
    assert_eq!(back, holder, "by the master that holds the link");
    println!("link key back after {:?}", gone_at.elapsed());

    // Past the failover timeout: the edge still runs its room, and no master took it.
    tokio::time::sleep(Duration::from_millis(TIMEOUT_MS + 1500)).await;
    assert_eq!(executor(&edge).await.as_deref(), Some("edge:site-1"));
    for i in 0..cluster.masters.len() {
        assert!(
            takeovers(&cluster.master_api(i)).await.is_empty(),
            "m{} recorded a takeover of a linked edge",
            i + 1
        );
    }
    assert_eq!(refused(&projector), 0, "never two sessions");
}
