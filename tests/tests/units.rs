//! Each unit's control runs on its own queue: a unit whose modules are slow to stop
//! holds up its own handover only, and another edge fails over on time meanwhile (real
//! processes, the master's control shell, a driver whose `on_load` hangs).

use std::time::{Duration, Instant};

use serde_json::json;
use tether_tests::api::ApiClient;
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::wait_for;

/// Both edges' failover timeout.
const TIMEOUT_MS: u64 = 1000;
/// How long a module may take to stop before the runtime gives up on it
/// (`STOP_TIMEOUT` in the runtime's module.rs).
const STOP_DEADLINE: Duration = Duration::from_secs(3);
/// Modules of site-1 that hang: stopped one after another, they would hold a shared
/// control task for this many stop deadlines.
const STUCK: usize = 3;

/// A faulty driver: `on_load` calls a method of a module of its own system, whose queue
/// does not run until `on_load` returns, so loading hangs for the driver's whole timeout,
/// and a stop meanwhile waits for its deadline.
const STUCK_DRIVER: &str = r#"
fn on_load() {
    try { system("Stuck", 1).exec("ping", []); } catch {}
}
fn ping() { "pong" }
"#;

const NOTE: &str = r#"
fn ping() { "pong" }
"#;

fn site() -> String {
    let mut site = String::from(
        r#"
[[repositories]]
id = "extra"
path = "repos/extra-drivers"

[[drivers]]
id = "note"
repository = "extra"
file = "note.rhai"
transport = "none"

[[drivers]]
id = "stuck"
repository = "extra"
file = "stuck.rhai"
transport = "none"
timeout_ms = 30000

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

[[systems]]
id = "room-2"
name = "Room 2"
edge = "site-2"
modules = ["note-2"]
"#,
    );
    let mut room = vec!["\"note-1\"".to_string()];
    for i in 1..=STUCK {
        site.push_str(&format!(
            "\n[[modules]]\nid = \"stuck-{i}\"\ndriver = \"stuck\"\nname = \"Stuck\"\nedge = \"site-1\"\n"
        ));
        room.push(format!("\"stuck-{i}\""));
    }
    site.push_str(&format!(
        "\n[[systems]]\nid = \"room-1\"\nname = \"Room 1\"\nedge = \"site-1\"\nmodules = [{}]\n",
        room.join(", ")
    ));
    site
}

/// Waits until `api` runs `system`'s Note as `who`.
async fn wait_executor(api: &ApiClient, system: &str, who: &str, limit: Duration) {
    let what = format!("{system}'s Note executed by {who}");
    wait_for(&what, limit, || async {
        let (status, body) = api.exec(system, "Note", 1, "ping", json!([])).await;
        (status == 200 && body["executed_by"] == who).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_unit_slow_to_stop_does_not_delay_another_edges_failover() {
    let mut spec = ClusterSpec::edges(2);
    spec.edge_settings = format!("failover = true\ntimeout_ms = {TIMEOUT_MS}\nstandby = \"cold\"");
    spec.site_extra = site();
    spec.files = vec![
        ("repos/extra-drivers/note.rhai".into(), NOTE.into()),
        ("repos/extra-drivers/stuck.rhai".into(), STUCK_DRIVER.into()),
    ];
    let mut cluster = Cluster::start(spec).await;
    let master = cluster.master_api();
    cluster.wait_edge_api_up(0).await;
    cluster.wait_edge_api_up(1).await;
    let limit = Duration::from_secs(10);
    wait_executor(&cluster.edge_admin(0), "room-1", "edge:site-1", limit).await;
    wait_executor(&cluster.edge_admin(1), "room-2", "edge:site-2", limit).await;

    // The master takes site-1 over; its stuck modules start loading (and hang there).
    cluster.edges[0].kill();
    wait_executor(&master, "room-1", "master", limit).await;
    // site-1 comes back; the master keeps it (it runs its modules) until a restore.
    cluster.edges[0].restart();
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(10))
        .await;

    // The restore stops the stuck modules: each waits out its stop deadline.
    let restoring = {
        let master = cluster.master_api();
        tokio::spawn(async move {
            let began = Instant::now();
            let answer = master.post("/api/v1/edges/site-1/restore", json!({})).await;
            (answer, began.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Meanwhile site-2 dies: its failover must not wait for site-1's stops.
    let killed = Instant::now();
    cluster.edges[1].kill();
    wait_executor(&master, "room-2", "master", Duration::from_secs(15)).await;
    let failover = killed.elapsed();

    let ((status, body), restore_took) = restoring.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["owner"], "edge", "{body}");
    eprintln!(
        "site-2 failed over {} ms after its kill (timeout {TIMEOUT_MS} ms) while site-1's restore took {} ms",
        failover.as_millis(),
        restore_took.as_millis()
    );
    // The premise: site-1's stops really hung for their deadline (side by side).
    assert!(
        restore_took >= STOP_DEADLINE - Duration::from_millis(300),
        "the stuck modules stopped at once ({restore_took:?}): the test shows nothing"
    );
    // site-2's timeout counts from when it was last heard (up to a heartbeat before the
    // kill), so it fails over within the timeout and some slack; waiting behind site-1's
    // stops would take until they end, past this.
    let on_time = Duration::from_millis(TIMEOUT_MS + 1000);
    assert!(
        failover < on_time,
        "site-2 failed over after {failover:?}, not within {on_time:?}: it waited for site-1"
    );
    assert!(
        STOP_DEADLINE - Duration::from_millis(200) > on_time,
        "the deadline must outlast the allowance, or the test cannot tell"
    );
    wait_executor(&cluster.edge_admin(0), "room-1", "edge:site-1", limit).await;
}
