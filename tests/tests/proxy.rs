//! The client API wherever a module runs, with the real binaries: calls proxied both
//! ways over the edge link (and across a takeover), `system(...)` calls across the link,
//! status bindings and debug streams on a real WebSocket, redirect hints, each role
//! against each kind of call, and the errors of an unreachable owner (503 at once) and a
//! hung device (504 at its timeout).

use std::net::TcpListener;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_tests::api::ApiClient;
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::sim::Sim;
use tether_tests::ws::WsClient;
use tether_tests::{CORE, wait_for};

/// The edge's failover timeout in these tests.
const TIMEOUT_MS: u64 = 2000;
/// The hung meter's driver timeout.
const METER_TIMEOUT_MS: u64 = 1000;
const SECOND: Duration = Duration::from_secs(1);

/// A logic driver that remembers a note in its status and logs what it does.
const NOTE: &str = r#"
fn ping() { "pong" }
fn remember(text) { log("remembering " + text); status("note", text); text }
"#;

/// Devices: `projector` in the edge's room, `lobby` in the master's hall, and a meter
/// that accepts connections and never answers (`hung`). The hall (a system of no edge)
/// lists the lobby display (run by the master), the room's display (run by the edge)
/// and a room-logic module the master runs, whose `system("Display", 2)` crosses the link.
fn site(projector: u16, lobby: u16, hung: u16) -> String {
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
id = "room"
repository = "core"
file = "room.rhai"
transport = "none"

[[drivers]]
id = "meter"
repository = "core"
file = "meter.rhai"
transport = "modbus"
timeout_ms = {METER_TIMEOUT_MS}
default_settings = {{ poll_ms = 600000 }}

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

[[modules]]
id = "hung"
driver = "meter"
name = "Meter"
host = "127.0.0.1"
port = {hung}
edge = "site-1"

[[modules]]
id = "lobby-proj"
driver = "projector"
name = "Display"
host = "127.0.0.1"
port = {lobby}

[[modules]]
id = "hall-logic"
driver = "room"
name = "Logic"
settings = {{ displays = 2 }}

[[systems]]
id = "room"
name = "Room"
edge = "site-1"
modules = ["proj", "note", "hung"]

[[systems]]
id = "hall"
name = "Hall"
modules = ["lobby-proj", "proj", "hall-logic"]
"#
    )
}

/// A device that accepts connections and never answers.
struct HungDevice {
    port: u16,
}

impl HungDevice {
    fn start() -> HungDevice {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the hung device");
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
            }
        });
        HungDevice { port }
    }
}

struct Setup {
    cluster: Cluster,
    projector: Sim,
    lobby: Sim,
    _hung: HungDevice,
}

async fn start(failover: bool) -> Setup {
    let projector = Sim::projector();
    let lobby = Sim::projector();
    let hung = HungDevice::start();
    let mut spec = ClusterSpec::edges(1);
    spec.edge_settings =
        format!("failover = {failover}\ntimeout_ms = {TIMEOUT_MS}\nstandby = \"warm\"");
    spec.site_extra = site(projector.port(), lobby.port(), hung.port);
    spec.files = vec![("repos/extra-drivers/note.rhai".into(), NOTE.into())];
    let cluster = Cluster::start(spec).await;
    cluster.wait_edge_api_up(0).await;
    let master = cluster.master_api();
    // The edge runs its room, and the master knows where the edge's API is.
    wait_for(
        "the room to answer through the master",
        10 * SECOND,
        || async {
            let answer = master.exec_full("room", "Note", 1, "ping", json!([])).await;
            (answer.status == 200 && answer.preferred_server.is_some()).then_some(())
        },
    )
    .await;
    Setup {
        cluster,
        projector,
        lobby,
        _hung: hung,
    }
}

fn admin_token(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.path("data/master/admin.token"))
        .expect("the master's admin token")
        .trim()
        .to_string()
}

fn command_from(sim: &Sim, command: &str) -> Value {
    sim.next_where("command", |event| event["command"] == command)
}

#[tokio::test]
async fn calls_cross_the_link_both_ways_and_follow_a_takeover() {
    let mut setup = start(true).await;
    let master = setup.cluster.master_api();
    let edge = setup.cluster.edge_admin(0);

    // Through the master, the edge's display runs on the edge; the hint names the edge.
    let answer = master
        .exec_full("room", "Display", 1, "power", json!([true]))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["executed_by"], "edge:site-1");
    assert!(edge.is_at(answer.preferred_server.as_deref()), "{answer:?}");
    let edge_peer = command_from(&setup.projector, "PWR ON")["peer"].clone();

    // Through the edge, a module of the master's hall runs on the master, for a user of
    // the master (the edge forwards the user's token; the master authorizes the user).
    // The edge's own admin token acts on the edge's own site only.
    let answer = edge
        .exec_full("hall", "Display", 1, "power", json!([true]))
        .await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(
        answer.body["message"]
            .as_str()
            .unwrap()
            .contains("not one of this edge's"),
        "{answer:?}"
    );
    let operator = edge.with_token(Some(create_user(&master, "olga", "operator").await));
    wait_for("the user on the edge", 10 * SECOND, || async {
        (operator.get("/api/v1/edges").await.0 == 200).then_some(())
    })
    .await;
    let answer = operator
        .exec_full("hall", "Display", 1, "power", json!([true]))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["executed_by"], "master");
    assert!(
        master.is_at(answer.preferred_server.as_deref()),
        "{answer:?}"
    );
    command_from(&setup.lobby, "PWR ON");

    // The hall's logic runs on the master; its system("Display", 2) reaches the edge.
    let (status, body) = master
        .exec("hall", "Logic", 1, "power_off", json!([]))
        .await;
    assert_eq!(
        (status, &body["executed_by"]),
        (200, &json!("master")),
        "{body}"
    );
    command_from(&setup.lobby, "PWR OFF");
    let off = command_from(&setup.projector, "PWR OFF");
    assert_eq!(off["peer"], edge_peer, "the edge's session ran it");

    // A binding held on the master sees the edge module's changes...
    let mut ws = WsClient::connect(
        master.base(),
        &setup.cluster.ca(),
        &admin_token(&setup.cluster),
    )
    .await
    .expect("WebSocket to the master");
    ws.send(json!({"id": 1, "cmd": "bind", "sys": "room", "mod": "Display", "index": 1, "key": "power"}))
        .await;
    assert_eq!(ws.answer(1, 5 * SECOND).await["type"], "success");
    let redirect = ws
        .wait("a redirect hint", 5 * SECOND, |m| m["type"] == "redirect")
        .await;
    assert!(edge.is_at(redirect["server"].as_str()), "{redirect}");
    ws.wait("power off", 5 * SECOND, |m| {
        m["type"] == "notify" && m["value"] == false
    })
    .await;
    let (status, _) = edge
        .exec("room", "Display", 1, "power", json!([true]))
        .await;
    assert_eq!(status, 200);
    ws.wait("power on, from the edge", 5 * SECOND, |m| {
        m["type"] == "notify" && m["value"] == true
    })
    .await;
    ws.clear();

    // ...and keeps working across a takeover: the edge dies, the master runs the display.
    setup.cluster.edges[0].kill();
    let killed = Instant::now();
    wait_for(
        "the master to run the room",
        Duration::from_millis(TIMEOUT_MS) + 2 * SECOND,
        || async {
            let (status, body) = master
                .exec("room", "Display", 1, "power", json!([false]))
                .await;
            (status == 200 && body["executed_by"] == "master").then_some(())
        },
    )
    .await;
    eprintln!(
        "the master executed {} ms after the kill",
        killed.elapsed().as_millis()
    );
    ws.wait("power off, from the master's module", 5 * SECOND, |m| {
        m["type"] == "notify" && m["value"] == false
    })
    .await;
    let (status, _) = master
        .exec("room", "Display", 1, "power", json!([true]))
        .await;
    assert_eq!(status, 200);
    ws.wait("power on, from the master's module", 5 * SECOND, |m| {
        m["type"] == "notify" && m["value"] == true
    })
    .await;
}

#[tokio::test]
async fn the_websocket_api_binds_execs_debugs_and_redirects() {
    let setup = start(true).await;
    let master = setup.cluster.master_api();
    let edge = setup.cluster.edge_admin(0);
    let edge_token = std::fs::read_to_string(setup.cluster.path("data/site-1/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let mut on_edge = WsClient::connect(edge.base(), &setup.cluster.ca(), &edge_token)
        .await
        .expect("WebSocket to the edge");

    // Exec: the answer carries the result and who ran it.
    on_edge
        .send(
            json!({"id": 1, "cmd": "exec", "sys": "room", "mod": "Note", "index": 1,
            "method": "remember", "args": ["first"]}),
        )
        .await;
    let answer = on_edge.answer(1, 5 * SECOND).await;
    assert_eq!(answer["type"], "success", "{answer}");
    assert_eq!(answer["result"], "first");
    assert_eq!(answer["executed_by"], "edge:site-1");

    // Status and the debug ring over HTTP, through the master, of the edge's module.
    assert_eq!(master.status("room", "Note", 1).await["note"], "first");
    let (status, lines) = master
        .get("/api/v1/systems/room/modules/Note/1/debug")
        .await;
    assert_eq!(status, 200, "{lines}");
    assert!(lines.to_string().contains("remembering first"), "{lines}");

    // Bind: the current value at once, then each change; unbind: no more.
    on_edge
        .send(json!({"id": 2, "cmd": "bind", "sys": "room", "mod": "Note", "index": 1, "key": "note"}))
        .await;
    assert_eq!(on_edge.answer(2, 5 * SECOND).await["type"], "success");
    on_edge
        .wait("the current note", 5 * SECOND, |m| {
            m["type"] == "notify" && m["value"] == "first"
        })
        .await;
    edge.exec("room", "Note", 1, "remember", json!(["second"]))
        .await;
    on_edge
        .wait("the changed note", 5 * SECOND, |m| {
            m["type"] == "notify" && m["value"] == "second" && m["key"] == "note"
        })
        .await;
    on_edge
        .send(json!({"id": 3, "cmd": "unbind", "sys": "room", "mod": "Note", "index": 1, "key": "note"}))
        .await;
    assert_eq!(on_edge.answer(3, 5 * SECOND).await["type"], "success");
    edge.exec("room", "Note", 1, "remember", json!(["third"]))
        .await;
    // A marker exec: its answer comes after any notify the third note could cause.
    on_edge
        .send(
            json!({"id": 4, "cmd": "exec", "sys": "room", "mod": "Note", "index": 1,
            "method": "ping"}),
        )
        .await;
    on_edge.answer(4, 5 * SECOND).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !on_edge
            .received
            .iter()
            .any(|m| m["type"] == "notify" && m["value"] == "third"),
        "no notify after unbind: {:?}",
        on_edge.received
    );

    // Debug through the master, of a module the edge runs: its log crosses the link.
    let mut on_master = WsClient::connect(
        master.base(),
        &setup.cluster.ca(),
        &admin_token(&setup.cluster),
    )
    .await
    .expect("WebSocket to the master");
    on_master
        .send(json!({"id": 1, "cmd": "debug", "sys": "room", "mod": "Note", "index": 1}))
        .await;
    assert_eq!(on_master.answer(1, 5 * SECOND).await["type"], "success");
    // Recent lines come first...
    on_master
        .wait("the log's recent lines", 5 * SECOND, |m| {
            m["type"] == "debug" && m["line"] == "remembering third"
        })
        .await;
    // ...then new ones, as they are logged on the edge.
    edge.exec("room", "Note", 1, "remember", json!(["fourth"]))
        .await;
    on_master
        .wait("a new log line", 5 * SECOND, |m| {
            m["type"] == "debug" && m["line"] == "remembering fourth"
        })
        .await;
    // The master serves a system the edge controls: a redirect hint names the edge.
    let redirect = on_master
        .wait("a redirect hint", 5 * SECOND, |m| m["type"] == "redirect")
        .await;
    assert_eq!(redirect["sys"], "room");
    assert!(edge.is_at(redirect["server"].as_str()), "{redirect}");
    // Exec on the master's socket runs on the edge.
    on_master
        .send(
            json!({"id": 2, "cmd": "exec", "sys": "room", "mod": "Note", "index": 1,
            "method": "ping"}),
        )
        .await;
    let answer = on_master.answer(2, 5 * SECOND).await;
    assert_eq!(
        (&answer["result"], &answer["executed_by"]),
        (&json!("pong"), &json!("edge:site-1"))
    );

    // Bad commands are answered with an error naming the cause; the socket carries on.
    on_master
        .send(json!({"id": 3, "cmd": "dance", "sys": "room", "mod": "Note"}))
        .await;
    let answer = on_master.answer(3, 5 * SECOND).await;
    assert_eq!(answer["type"], "error");
    assert!(
        answer["message"].as_str().unwrap().contains("dance"),
        "{answer}"
    );
    on_master
        .send(json!({"id": 4, "cmd": "bind", "sys": "nowhere", "mod": "Note", "index": 1}))
        .await;
    assert_eq!(on_master.answer(4, 5 * SECOND).await["code"], "not_found");
    on_master
        .send(
            json!({"id": 5, "cmd": "exec", "sys": "room", "mod": "Note", "index": 1,
            "method": "ping"}),
        )
        .await;
    assert_eq!(on_master.answer(5, 5 * SECOND).await["type"], "success");
}

/// One row of the authorization matrix: what, method, path, body, and the status expected
/// for no token, a bad one, a viewer, an operator, an admin and an edge's admin.
type Call = (
    &'static str,
    reqwest::Method,
    &'static str,
    Option<Value>,
    [u16; 6],
);

/// Creates a user through the master; answers its token.
async fn create_user(master: &ApiClient, id: &str, role: &str) -> String {
    let (status, body) = master
        .post("/api/v1/users", json!({"id": id, "name": id, "role": role}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(body.get("token_hash").is_none(), "{body}");
    body["token"].as_str().expect("a token").to_string()
}

#[tokio::test]
async fn each_role_gets_what_it_may_on_master_and_edge() {
    let setup = start(true).await;
    let master = setup.cluster.master_api();
    let edge = setup.cluster.edge_admin(0);
    let viewer = create_user(&master, "vera", "viewer").await;
    let operator = create_user(&master, "otto", "operator").await;
    let admin = create_user(&master, "ada", "admin").await;
    let site_op = create_user(&master, "sam", "viewer").await;
    // Sam is one of site-1's admins.
    let (_, mut record) = master.get("/api/v1/edges/site-1").await;
    record["admins"] = json!(["sam"]);
    let (status, body) = master.put("/api/v1/edges/site-1", record).await;
    assert_eq!(status, 200, "{body}");
    // Users and the admins list replicate to the edge.
    let on_edge = |token: &str| edge.with_token(Some(token.to_string()));
    wait_for("the users on the edge", 10 * SECOND, || async {
        (on_edge(&site_op).get("/api/v1/edges").await.0 == 200).then_some(())
    })
    .await;

    let tokens = [
        ("none", None),
        ("bad", Some("ttu_not_a_token".to_string())),
        ("viewer", Some(viewer.clone())),
        ("operator", Some(operator.clone())),
        ("admin", Some(admin.clone())),
        ("edge admin", Some(site_op.clone())),
    ];
    let exec = "/api/v1/systems/room/modules/Note/1/exec";
    let ping = json!({"method": "ping"});
    let calls: Vec<Call> = vec![
        (
            "list edges",
            reqwest::Method::GET,
            "/api/v1/edges",
            None,
            [401, 401, 200, 200, 200, 200],
        ),
        (
            "read status",
            reqwest::Method::GET,
            "/api/v1/systems/room/modules/Note/1/status",
            None,
            [401, 401, 200, 200, 200, 200],
        ),
        (
            "read audit",
            reqwest::Method::GET,
            "/api/v1/audit",
            None,
            [401, 401, 200, 200, 200, 200],
        ),
        (
            "exec",
            reqwest::Method::POST,
            exec,
            Some(ping.clone()),
            [401, 401, 403, 200, 200, 403],
        ),
        (
            "list users",
            reqwest::Method::GET,
            "/api/v1/users",
            None,
            [401, 401, 403, 403, 200, 403],
        ),
        (
            "write the model",
            reqwest::Method::POST,
            "/api/v1/repositories",
            Some(json!({"id": "x", "path": "."})),
            [401, 401, 403, 403, 201, 403],
        ),
        // Allowed, then refused for its own reason: the edge controls already.
        (
            "restore",
            reqwest::Method::POST,
            "/api/v1/edges/site-1/restore",
            Some(json!({})),
            [401, 401, 403, 403, 409, 409],
        ),
        (
            "expire a system",
            reqwest::Method::POST,
            "/api/v1/systems/room/expire",
            Some(json!({})),
            [401, 401, 403, 403, 200, 200],
        ),
    ];
    for (what, method, path, body, expected) in &calls {
        for ((who, token), want) in tokens.iter().zip(expected) {
            let client = master.with_token(token.clone());
            let (status, answer) = client.send(method.clone(), path, body.clone()).await;
            assert_eq!(status, *want, "{what} as {who} on the master: {answer}");
            if *want == 403 || *want == 401 {
                assert!(answer["message"].as_str().is_some(), "{answer}");
            }
        }
    }
    let (_, users) = master.get("/api/v1/users").await;
    assert!(
        !users.to_string().contains("token"),
        "no hash is shown: {users}"
    );

    // The same tokens on the edge (users replicated from the master).
    for (who, token, want) in [
        ("viewer", &viewer, 403),
        ("operator", &operator, 200),
        ("edge admin", &site_op, 403),
    ] {
        let (status, body) = on_edge(token).post(exec, ping.clone()).await;
        assert_eq!(status, want, "exec as {who} on the edge: {body}");
    }
    let (status, _) = on_edge(&viewer)
        .get("/api/v1/systems/room/modules/Note/1/status")
        .await;
    assert_eq!(status, 200);

    // An edge admin stops and starts a system from the master; the edge carries it out.
    let sam = master.with_token(Some(site_op.clone()));
    let (status, body) = sam.post("/api/v1/systems/room/stop", json!({})).await;
    assert_eq!(
        (status, &body["done_by"]),
        (200, &json!("edge:site-1")),
        "{body}"
    );
    let (status, body) = edge.exec("room", "Note", 1, "ping", json!([])).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("stopped"),
        "{body}"
    );
    let (status, _) = on_edge(&operator)
        .post("/api/v1/systems/room/start", json!({}))
        .await;
    assert_eq!(status, 403, "an operator may not start a system");
    let (status, body) = sam.post("/api/v1/systems/room/start", json!({})).await;
    assert_eq!(status, 200, "{body}");
    wait_for("the room to run again", 5 * SECOND, || async {
        (edge.exec("room", "Note", 1, "ping", json!([])).await.0 == 200).then_some(())
    })
    .await;

    // A role changed by PUT takes effect at once; a new token retires the old one.
    let (status, body) = master
        .put(
            "/api/v1/users/otto",
            json!({"name": "Otto", "role": "viewer"}),
        )
        .await;
    assert_eq!((status, &body["role"]), (200, &json!("viewer")), "{body}");
    let otto = master.with_token(Some(operator.clone()));
    assert_eq!(otto.post(exec, ping.clone()).await.0, 403);
    let (status, body) = master.post("/api/v1/users/otto/token", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let fresh = body["token"].as_str().unwrap().to_string();
    assert_eq!(
        otto.get("/api/v1/edges").await.0,
        401,
        "the old token is retired"
    );
    let otto = master.with_token(Some(fresh));
    assert_eq!(otto.get("/api/v1/edges").await.0, 200);

    // On the WebSocket, a viewer binds but may not exec.
    let mut ws = WsClient::connect(master.base(), &setup.cluster.ca(), &viewer)
        .await
        .expect("WebSocket as a viewer");
    ws.send(json!({"id": 1, "cmd": "bind", "sys": "room", "mod": "Note", "index": 1}))
        .await;
    assert_eq!(ws.answer(1, 5 * SECOND).await["type"], "success");
    ws.send(
        json!({"id": 2, "cmd": "exec", "sys": "room", "mod": "Note", "index": 1, "method": "ping"}),
    )
    .await;
    assert_eq!(ws.answer(2, 5 * SECOND).await["code"], "forbidden");
    assert!(
        WsClient::connect(master.base(), &setup.cluster.ca(), "ttu_bad")
            .await
            .is_err(),
        "a WebSocket with a bad token is refused"
    );

    // Tokens are stored hashed, and the hashes leave the master only over an edge's link:
    // neither the slice nor the replica shows them, to any role.
    let (_, slice) = master
        .with_token(Some(viewer.clone()))
        .get("/api/v1/edges/site-1/slice")
        .await;
    let (_, replica) = on_edge(&viewer).get("/api/v1/replica").await;
    for text in [slice.to_string(), replica.to_string()] {
        assert!(text.contains("\"otto\""), "the users are listed: {text}");
        assert!(!text.contains("token_hash"), "{text}");
        for token in [&viewer, &operator, &admin, &site_op] {
            assert!(!text.contains(token.as_str()));
            assert!(!text.contains(&tether_common::api::token_hash(token)));
        }
    }
}

/// Execs `(system, name, method, args)` (index 1) on `api`: 503 `unavailable` within
/// 1.5 s, its message naming `names`; prints the time. "At once" against the 30 s exec
/// timeout a wait would run into; 1.5 s leaves room for a stalled CI machine.
async fn assert_prompt_503(
    api: &ApiClient,
    (system, name, method, args): (&str, &str, &str, Value),
    names: &str,
    who: &str,
) {
    let asked = Instant::now();
    let (status, body) = api.exec(system, name, 1, method, args).await;
    let took = asked.elapsed();
    assert_eq!(
        (status, &body["error"]),
        (503, &json!("unavailable")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains(names), "{body}");
    eprintln!("503 from {who} after {} ms", took.as_millis());
    assert!(took < Duration::from_millis(1500), "503 took {took:?}");
}

#[tokio::test]
async fn an_unreachable_owner_is_503_at_once_and_a_hung_device_504_at_its_timeout() {
    let mut setup = start(false).await;
    let master = setup.cluster.master_api();
    let edge = setup.cluster.edge_admin(0);

    // A device that never answers: 504 at the driver's timeout, through the master.
    let asked = Instant::now();
    let (status, body) = master
        .exec("room", "Meter", 1, "register", json!([0]))
        .await;
    let took = asked.elapsed();
    assert_eq!((status, &body["error"]), (504, &json!("timeout")), "{body}");
    eprintln!("hung device: 504 after {} ms", took.as_millis());
    assert!(
        took >= Duration::from_millis(METER_TIMEOUT_MS - 100) && took < 4 * SECOND,
        "{took:?}"
    );

    // The edge gone (failover off): the master answers 503 at once, and says why.
    setup.cluster.edges[0].kill();
    setup
        .cluster
        .wait_edge_online("site-1", false, 5 * SECOND)
        .await;
    assert_prompt_503(
        &master,
        ("room", "Note", "ping", json!([])),
        "site-1",
        "the master (edge unreachable)",
    )
    .await;
    let (status, _) = master
        .get("/api/v1/systems/room/modules/Note/1/status")
        .await;
    assert_eq!(status, 503);

    // The master gone: the edge answers 503 at once for the master's hall.
    setup.cluster.edges[0].restart();
    setup.cluster.wait_edge_api_up(0).await;
    wait_for("the edge to run its room", 10 * SECOND, || async {
        (edge.exec("room", "Note", 1, "ping", json!([])).await.0 == 200).then_some(())
    })
    .await;
    let operator = edge.with_token(Some(create_user(&master, "olga", "operator").await));
    wait_for("the user on the edge", 10 * SECOND, || async {
        (operator.get("/api/v1/edges").await.0 == 200).then_some(())
    })
    .await;
    setup.cluster.master.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_prompt_503(
        &operator,
        ("hall", "Display", "power", json!([true])),
        "master",
        "the edge (master unreachable)",
    )
    .await;
    // Its own room carries on.
    let (status, body) = edge.exec("room", "Note", 1, "ping", json!([])).await;
    assert_eq!((status, &body["executed_by"]), (200, &json!("edge:site-1")));
}
