//! Driver modules against the device simulators, through the edge's API: the projector,
//! the Modbus meter, room logic through `system(...)`, a host change, and faulty scripts
//! that fault alone.

use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::api::ApiClient;
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::sim::Sim;
use tether_tests::{CORE, wait_for};

const SYNTAX_ERROR: &str = "fn ok() { true }\nfn broken( { 1 }\n";
const THROWS: &str = "fn ok() { true }\nfn boom() { throw \"boom: the device said no\"; }\n";
const ENDLESS: &str = "fn ok() { true }\nfn spin() { let n = 0; loop { n += 1; } }\n";

fn site(projector: u16, meter: u16) -> String {
    let core = CORE;
    format!(
        r#"
[[repositories]]
id = "core"
path = "{core}"

[[repositories]]
id = "bad"
path = "repos/bad-drivers"

[[drivers]]
id = "projector"
repository = "core"
file = "projector.rhai"
delimiter = "\r"
default_settings = {{ poll_ms = 500 }}

[[drivers]]
id = "meter"
repository = "core"
file = "meter.rhai"
transport = "modbus"
default_settings = {{ poll_ms = 100 }}

[[drivers]]
id = "room"
repository = "core"
file = "room.rhai"
kind = "logic"
transport = "none"

[[drivers]]
id = "syntax"
repository = "bad"
file = "syntax.rhai"
transport = "none"

[[drivers]]
id = "throws"
repository = "bad"
file = "throws.rhai"
transport = "none"

[[drivers]]
id = "endless"
repository = "bad"
file = "endless.rhai"
transport = "none"
timeout_ms = 3000

[[modules]]
id = "logic"
driver = "room"
name = "Room"
edge = "site-1"

[[modules]]
id = "proj"
driver = "projector"
name = "Display"
host = "127.0.0.1"
port = {projector}
edge = "site-1"

[[modules]]
id = "meter"
driver = "meter"
name = "Meter"
host = "127.0.0.1"
port = {meter}
edge = "site-1"

[[modules]]
id = "syntax"
driver = "syntax"
name = "Bad"
edge = "site-1"

[[modules]]
id = "throws"
driver = "throws"
name = "Bad"
edge = "site-1"

[[modules]]
id = "endless"
driver = "endless"
name = "Bad"
edge = "site-1"

[[systems]]
id = "room"
name = "Room"
edge = "site-1"
modules = ["logic", "proj", "meter", "syntax", "throws", "endless"]
"#
    )
}

async fn start(projector: &Sim, meter: &Sim) -> Cluster {
    let mut spec = ClusterSpec::edges(1);
    spec.site_extra = site(projector.port(), meter.port());
    spec.files = vec![
        ("repos/bad-drivers/syntax.rhai".into(), SYNTAX_ERROR.into()),
        ("repos/bad-drivers/throws.rhai".into(), THROWS.into()),
        ("repos/bad-drivers/endless.rhai".into(), ENDLESS.into()),
    ];
    let cluster = Cluster::start(spec).await;
    cluster.wait_edge_api_up(0).await;
    cluster
}

/// Waits for a status value of a module on `api`.
async fn wait_status(api: &ApiClient, name: &str, index: u32, key: &str, want: Value) {
    let what = format!("{name} {index} status {key} = {want}");
    let mut last = Value::Null;
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let status = api.status("room", name, index).await;
            if status[key] == want {
                return;
            }
            last = status;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    result.unwrap_or_else(|_| panic!("timed out waiting for {what}; status: {last}"));
}

/// The projector's next command that is not a poll.
fn next_command(sim: &Sim) -> Value {
    sim.next_where("command", |event| {
        !event["command"].as_str().unwrap_or_default().ends_with('?')
    })
}

#[tokio::test]
async fn projector_power_room_logic_and_a_host_change() {
    let projector = Sim::projector();
    let meter = Sim::modbus();
    let cluster = start(&projector, &meter).await;
    let edge = cluster.edge_admin(0);
    wait_status(&edge, "Display", 1, "connected", json!(true)).await;

    let (status, body) = edge
        .exec("room", "Display", 1, "power", json!([true]))
        .await;
    assert_eq!(status, 200, "{body}");
    // The epoch of the edge location's owner comes with it, for clients that fence.
    assert_eq!(
        body,
        json!({"result": true, "executed_by": "edge:site-1", "epoch": 0})
    );
    let command = next_command(&projector);
    assert_eq!(
        (command["command"].as_str(), command["power"].as_bool()),
        (Some("PWR ON"), Some(true))
    );
    wait_status(&edge, "Display", 1, "power", json!(true)).await;

    let (status, _) = edge
        .exec("room", "Display", 1, "power", json!([false]))
        .await;
    assert_eq!(status, 200);
    assert_eq!(next_command(&projector)["power"], false);
    wait_status(&edge, "Display", 1, "power", json!(false)).await;

    // Bad arguments: 422, and the device hears nothing.
    let (status, body) = edge.exec("room", "Display", 1, "power", json!([])).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = edge.exec("room", "Display", 1, "nope", json!([])).await;
    assert_eq!(status, 404, "{body}");

    // Room logic switches the display through system("Display", 1).
    let (status, body) = edge.exec("room", "Room", 1, "power_on", json!([])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(next_command(&projector)["command"], "PWR ON");
    wait_status(&edge, "Display", 1, "power", json!(true)).await;
    wait_status(&edge, "Room", 1, "power", json!(true)).await;

    // The module's host changes in the model: it leaves the old device for the new one.
    let second = Sim::projector();
    let master = cluster.master_api();
    let (status, body) = master
        .put(
            "/api/v1/modules/proj",
            json!({"driver": "projector", "name": "Display", "host": "127.0.0.1", "port": second.port(), "edge": "site-1"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    projector.next("disconnect");
    second.next("connect");
    wait_status(&edge, "Display", 1, "connected", json!(true)).await;
    let (status, _) = edge.exec("room", "Display", 1, "input", json!([4])).await;
    assert_eq!(status, 200);
    assert_eq!(next_command(&second)["command"], "INPUT 4");
    wait_status(&edge, "Display", 1, "input", json!(4)).await;
    assert_eq!(
        projector.open_sessions(),
        0,
        "the old device still has a session"
    );
}

#[tokio::test]
async fn the_meter_status_follows_its_registers() {
    let projector = Sim::projector();
    let meter = Sim::modbus();
    let cluster = start(&projector, &meter).await;
    let edge = cluster.edge_admin(0);
    wait_status(&edge, "Meter", 1, "voltage", json!(230.0)).await;
    wait_status(&edge, "Meter", 1, "current", json!(5.12)).await;
    let first = edge.status("room", "Meter", 1).await["energy_wh"]
        .as_u64()
        .unwrap();

    // Someone else writes a register on the device: the status follows.
    let mut client = tokio_modbus::client::tcp::connect(meter.addr.parse().unwrap())
        .await
        .unwrap();
    use tokio_modbus::client::Writer;
    client
        .write_single_register(2, 4321)
        .await
        .unwrap()
        .unwrap();
    wait_status(
        &edge,
        "Meter",
        1,
        "holding",
        json!([0, 0, 4321, 0, 0, 0, 0, 0, 0, 0]),
    )
    .await;

    // And a method writes one through the driver.
    let (status, body) = edge
        .exec("room", "Meter", 1, "set_register", json!([5, 77]))
        .await;
    assert_eq!(status, 200, "{body}");
    let written = meter.next_where("command", |event| event["address"] == 5);
    assert_eq!(
        (written["address"].as_u64(), written["value"].as_u64()),
        (Some(5), Some(77)),
        "{written}"
    );
    wait_status(
        &edge,
        "Meter",
        1,
        "holding",
        json!([0, 0, 4321, 0, 0, 77, 0, 0, 0, 0]),
    )
    .await;

    // The energy counter grows about 1 Wh a second.
    wait_for(
        "the energy counter to grow",
        Duration::from_secs(5),
        || async {
            let now = edge.status("room", "Meter", 1).await["energy_wh"].as_u64()?;
            (now > first).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn faulty_drivers_fault_alone_and_say_why() {
    let projector = Sim::projector();
    let meter = Sim::modbus();
    let cluster = start(&projector, &meter).await;
    let edge = cluster.edge_admin(0);
    wait_status(&edge, "Display", 1, "connected", json!(true)).await;

    // The syntax error: faulted, the compile error visible in the system and on exec.
    let member = |system: &Value, id: &str| -> Value {
        system["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .unwrap()
    };
    // The edge may (re)start its modules when the code repository arrives after the
    // projector connected: the module is "starting" until its compile fails.
    let system = wait_for(
        "the syntax module to fault",
        Duration::from_secs(10),
        || async {
            let (_, system) = edge.get("/api/v1/systems/room").await;
            let state = member(&system, "syntax")["state"].clone();
            (state != "starting").then_some(system)
        },
    )
    .await;
    let syntax = member(&system, "syntax");
    assert_eq!(syntax["state"], "faulted", "{system}");
    assert!(
        syntax["error"]
            .as_str()
            .unwrap()
            .contains("does not compile"),
        "{syntax}"
    );
    let (status, body) = edge.exec("room", "Bad", 1, "ok", json!([])).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("module_faulted")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("line 2"),
        "{body}"
    );

    // The throwing method: its error, and the module carries on.
    let (status, body) = edge.exec("room", "Bad", 2, "boom", json!([])).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("script_error")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("the device said no"),
        "{body}"
    );
    assert_eq!(edge.exec("room", "Bad", 2, "ok", json!([])).await.0, 200);

    // The endless loop: stopped by its limits, reported; the module carries on.
    let (status, body) = edge.exec("room", "Bad", 3, "spin", json!([])).await;
    assert!(status == 500 || status == 504, "{status} {body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("spin ran past its"),
        "{body}"
    );
    assert_eq!(edge.exec("room", "Bad", 3, "ok", json!([])).await.0, 200);
    let (_, system) = edge.get("/api/v1/systems/room").await;
    let endless = member(&system, "endless");
    assert_eq!(endless["state"], "running");
    assert!(
        endless["last_error"].as_str().unwrap().contains("spin"),
        "{endless}"
    );

    // Everyone else kept answering.
    let (status, body) = edge
        .exec("room", "Display", 1, "power", json!([true]))
        .await;
    assert_eq!(status, 200, "{body}");
    wait_status(&edge, "Display", 1, "power", json!(true)).await;
    wait_status(&edge, "Meter", 1, "voltage", json!(230.0)).await;
    // The debug ring tells the story.
    let (status, lines) = edge.get("/api/v1/systems/room/modules/Bad/2/debug").await;
    assert_eq!(status, 200);
    assert!(lines.to_string().contains("boom"), "{lines}");
}

#[tokio::test]
async fn the_master_runs_the_modules_of_no_edge_and_names_the_runner() {
    let projector = Sim::projector();
    let meter = Sim::modbus();
    let lobby = Sim::projector();
    let mut spec = ClusterSpec::edges(1);
    spec.site_extra = format!(
        "{}\n[[modules]]\nid = \"lobby-proj\"\ndriver = \"projector\"\nname = \"Display\"\nhost = \"127.0.0.1\"\nport = {}\n\n\
         [[systems]]\nid = \"lobby\"\nname = \"Lobby\"\nmodules = [\"lobby-proj\"]\n",
        site(projector.port(), meter.port()),
        lobby.port()
    );
    spec.files = vec![
        ("repos/bad-drivers/syntax.rhai".into(), SYNTAX_ERROR.into()),
        ("repos/bad-drivers/throws.rhai".into(), THROWS.into()),
        ("repos/bad-drivers/endless.rhai".into(), ENDLESS.into()),
    ];
    let cluster = Cluster::start(spec).await;
    let master = cluster.master_api();
    lobby.next("connect");
    let (status, body) = wait_for(
        "the lobby display to answer",
        Duration::from_secs(10),
        || async {
            let answer = master
                .exec("lobby", "Display", 1, "power", json!([true]))
                .await;
            (answer.0 == 200).then_some(answer)
        },
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["executed_by"], "master");
    assert_eq!(next_command(&lobby)["command"], "PWR ON");

    // A room of an edge is run there: the master serves it by proxy, and hints where.
    let edge = cluster.edge_api(0);
    let answer = wait_for(
        "the edge's display to answer",
        Duration::from_secs(10),
        || async {
            let answer = master
                .exec_full("room", "Display", 1, "power", json!([true]))
                .await;
            (answer.status == 200).then_some(answer)
        },
    )
    .await;
    assert_eq!(answer.body["executed_by"], "edge:site-1", "{answer:?}");
    assert!(edge.is_at(answer.preferred_server.as_deref()), "{answer:?}");
    let (_, system) = master.get("/api/v1/systems/lobby").await;
    assert_eq!(system["members"][0]["runs_on"], "master", "{system}");
    assert_eq!(system["members"][0]["state"], "running", "{system}");
    assert_eq!(lobby.open_sessions(), 1);
}
