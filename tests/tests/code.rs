//! Driver code changes on a running site (real master, edge and device simulators): a
//! repository pulled on the master (a folder, a git working copy) reaches the edge and
//! its modules reload in place; a broken version is refused; an edge that was away
//! catches up; a folder or git commit can be reset to.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_tests::api::ApiClient;
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::sim::Sim;
use tether_tests::wait_for;
use tether_tests::ws::WsClient;

fn display(version: u32) -> String {
    format!(
        "fn connected() {{ status(\"connected\", true); }}\nfn on_load() {{ log(\"display code v{version} loaded\"); }}\nfn version() {{ {version} }}\n"
    )
}
const OTHER: &str = "fn connected() { status(\"connected\", true); }\nfn ping() { \"pong\" }\n";
const BROKEN: &str = "fn version( { 99 }\n";
/// Compiles (the master accepts it), but cannot load on the edge.
const THROWS_ON_LOAD: &str = "fn on_load() { throw \"no lamp hours\" }\nfn version() { 5 }\n";

fn site(repository: &Path, display_port: u16, other_port: u16) -> String {
    format!(
        r#"
[[repositories]]
id = "code"
path = "{}"

[[drivers]]
id = "display"
repository = "code"
file = "display.rhai"

[[drivers]]
id = "other"
repository = "code"
file = "other.rhai"

[[modules]]
id = "disp"
driver = "display"
name = "Display"
host = "127.0.0.1"
port = {display_port}
edge = "site-1"

[[modules]]
id = "oth"
driver = "other"
name = "Other"
host = "127.0.0.1"
port = {other_port}
edge = "site-1"

[[systems]]
id = "room"
name = "Room"
edge = "site-1"
modules = ["disp", "oth"]
"#,
        repository.display()
    )
}

/// The devices, and the counts of connections each has seen.
struct Devices {
    display: Sim,
    other: Sim,
}

impl Devices {
    fn new() -> Devices {
        Devices {
            display: Sim::projector(),
            other: Sim::projector(),
        }
    }

    fn connects(&self) -> (usize, usize) {
        (
            self.display.events_of("connect").len(),
            self.other.events_of("connect").len(),
        )
    }

    fn disconnects(&self) -> usize {
        self.display.events_of("disconnect").len() + self.other.events_of("disconnect").len()
    }
}

async fn start(repository: &Path, devices: &Devices, proxied: bool) -> Cluster {
    let mut spec = ClusterSpec::edges(1);
    spec.proxied = proxied;
    spec.edge_settings = "failover = false\n".into();
    spec.site_extra = site(repository, devices.display.port(), devices.other.port());
    // The repository is its own root: a folder outside the cluster's.
    spec.repositories_root = repository.display().to_string();
    Cluster::start(spec).await
}

/// A folder repository with version 1 of the display driver, and the other driver.
fn folder_repo() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(repo.path().join("display.rhai"), display(1)).unwrap();
    std::fs::write(repo.path().join("other.rhai"), OTHER).unwrap();
    repo
}

/// Starts a cluster on `repository` and waits until the edge runs version 1, reports the
/// repository's commit, and both devices are connected. Answers the cluster, clients of
/// the master and the edge, and that commit.
async fn start_on_v1(
    repository: &Path,
    devices: &Devices,
    proxied: bool,
) -> (Cluster, ApiClient, ApiClient, String) {
    let cluster = start(repository, devices, proxied).await;
    let (master, edge) = (cluster.master_api(), cluster.edge_admin(0));
    wait_version(&edge, 1, Duration::from_secs(20)).await;
    let commit = repository_commit(&master).await;
    wait_edge_commit(&master, &edge, &commit).await;
    wait_for(
        "both devices connected",
        Duration::from_secs(10),
        || async { (devices.connects() == (1, 1)).then_some(()) },
    )
    .await;
    (cluster, master, edge, commit)
}

async fn version_on(api: &ApiClient) -> Option<i64> {
    let (status, body) = api.exec("room", "Display", 1, "version", json!([])).await;
    (status == 200).then(|| body["result"].as_i64()).flatten()
}

/// Waits until the edge's display module answers `want`; answers how long that took.
async fn wait_version(edge: &ApiClient, want: i64, limit: Duration) -> Duration {
    let started = Instant::now();
    wait_for(
        &format!("the edge to run version {want}"),
        limit,
        || async { (version_on(edge).await == Some(want)).then_some(()) },
    )
    .await;
    started.elapsed()
}

async fn repository_commit(master: &ApiClient) -> String {
    let (status, body) = master.get("/api/v1/repositories/code").await;
    assert_eq!(status, 200, "{body}");
    body["commit"].as_str().expect("a commit").to_string()
}

/// Waits until `/api/v1/edges` on the master shows the edge on `commit`, and the edge's
/// own view agrees.
async fn wait_edge_commit(master: &ApiClient, edge: &ApiClient, commit: &str) {
    wait_for(
        "the edge's commit on the master",
        Duration::from_secs(10),
        || async { (master.edge("site-1").await?["commit"] == commit).then_some(()) },
    )
    .await;
    let (_, edges) = edge.get("/api/v1/edges").await;
    assert_eq!(edges[0]["commit"], commit, "{edges}");
}

async fn pull(master: &ApiClient) -> (u16, Value) {
    master
        .post("/api/v1/repositories/code/pull", json!({}))
        .await
}

fn admin_token(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.path("data/master/admin.token"))
        .expect("the master's admin token")
        .trim()
        .to_string()
}

/// A change pulled on the master runs on the edge within 2 s, in place: neither device
/// sees a new connection. Answers the pull's answer.
async fn pull_and_reload(
    master: &ApiClient,
    edge: &ApiClient,
    devices: &Devices,
    want: i64,
) -> Value {
    let before = devices.connects();
    let started = Instant::now();
    let (status, body) = pull(master).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changed"], true, "{body}");
    assert_eq!(body["drivers"], json!(["display"]), "{body}");
    assert_eq!(body["files"], json!(["display.rhai"]), "{body}");
    wait_version(edge, want, Duration::from_secs(2)).await;
    println!(
        "pull to version {want} answered by the edge's module after {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(devices.connects(), before, "no module reconnected");
    assert_eq!(devices.disconnects(), 0, "no device session dropped");
    body
}

#[tokio::test]
async fn a_folder_change_reloads_in_place_and_a_broken_one_is_refused() {
    let devices = Devices::new();
    let repo = folder_repo();
    let (cluster, master, edge, first) = start_on_v1(repo.path(), &devices, false).await;

    // A client watches the display module's debug log through the master.
    let mut ws = WsClient::connect(master.base(), &cluster.ca(), &admin_token(&cluster))
        .await
        .expect("WebSocket to the master");
    ws.send(json!({"id": 1, "cmd": "debug", "sys": "room", "mod": "Display", "index": 1}))
        .await;
    assert_eq!(
        ws.answer(1, Duration::from_secs(5)).await["type"],
        "success"
    );
    ws.clear();

    std::fs::write(repo.path().join("display.rhai"), display(2)).unwrap();
    let moved = pull_and_reload(&master, &edge, &devices, 2).await;
    assert_eq!(moved["previous"], first.as_str());
    let second = moved["commit"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    for line in [
        "reloading: new driver code",
        "display code v2 loaded",
        "reloaded",
    ] {
        ws.wait(line, Duration::from_secs(5), |m| {
            m["type"] == "debug" && m["line"].as_str().is_some_and(|l| l.contains(line))
        })
        .await;
    }
    assert_eq!(
        edge.exec("room", "Other", 1, "ping", json!([])).await.1["result"],
        "pong"
    );
    wait_edge_commit(&master, &edge, &second).await;

    // A version that does not compile: refused, the old code keeps answering.
    std::fs::write(repo.path().join("display.rhai"), BROKEN).unwrap();
    let (status, body) = pull(&master).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("refused")),
        "{body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("driver display (display.rhai)"),
        "{message}"
    );
    assert!(message.contains("does not compile"), "{message}");
    assert_eq!(repository_commit(&master).await, second);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(version_on(&edge).await, Some(2));
    assert_eq!(version_on(&master).await, Some(2), "through the master too");
    let (_, audit) = master.get("/api/v1/audit").await;
    let refused: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "code" && e["refused"] == true)
        .collect();
    assert_eq!(refused.len(), 1, "{audit}");
    assert_eq!(refused[0]["from"], second.as_str());
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .contains("does not compile")
    );
    let applied = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "code" && e["refused"] == false)
        .count();
    assert_eq!(applied, 1, "the pull to version 2: {audit}");

    // A version that compiles but whose on_load throws: the master takes the commit, the
    // edge refuses to load it, keeps the old code, and reports the refusal.
    std::fs::write(repo.path().join("display.rhai"), THROWS_ON_LOAD).unwrap();
    let (status, body) = pull(&master).await;
    assert_eq!(status, 200, "{body}");
    let refusal = wait_for(
        "the edge's refusal in the master's audit",
        Duration::from_secs(10),
        || async {
            let (_, audit) = master.get("/api/v1/audit?edge=site-1").await;
            audit
                .as_array()?
                .iter()
                .find(|e| e["event"] == "code" && e["module"] == "disp")
                .cloned()
        },
    )
    .await;
    assert_eq!(refusal["refused"], true, "{refusal}");
    assert_eq!(refusal["driver"], "display", "{refusal}");
    assert!(
        refusal["reason"]
            .as_str()
            .unwrap()
            .contains("no lamp hours"),
        "{refusal}"
    );
    assert_eq!(version_on(&edge).await, Some(2));

    // A folder's earlier commit, kept by the master, can be reset to.
    let (status, body) = master
        .post("/api/v1/repositories/code/reset", json!({"commit": first}))
        .await;
    assert_eq!(status, 200, "{body}");
    wait_version(&edge, 1, Duration::from_secs(2)).await;
    wait_edge_commit(&master, &edge, &first).await;
    let (status, body) = master
        .post("/api/v1/repositories/code/reset", json!({"commit": "f00d"}))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(devices.connects(), (1, 1), "no module reconnected");
}

fn git(repo: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn commit_display(repo: &Path, version: u32) -> String {
    std::fs::write(repo.join("display.rhai"), display(version)).unwrap();
    git(repo, &["add", "."]);
    git(
        repo,
        &["commit", "--quiet", "-m", &format!("display v{version}")],
    );
    git(repo, &["rev-parse", "HEAD"])
}

#[tokio::test]
async fn a_git_commit_reloads_in_place_and_an_old_one_can_be_reset_to() {
    let devices = Devices::new();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "--quiet"]);
    git(repo.path(), &["config", "user.email", "test@example.com"]);
    git(repo.path(), &["config", "user.name", "test"]);
    std::fs::write(repo.path().join("other.rhai"), OTHER).unwrap();
    let first = commit_display(repo.path(), 1);
    let (_cluster, master, edge, commit) = start_on_v1(repo.path(), &devices, false).await;
    assert_eq!(commit, first, "the git commit");

    // An uncommitted edit is not code: a pull takes the commit.
    let second = commit_display(repo.path(), 2);
    std::fs::write(repo.path().join("display.rhai"), display(7)).unwrap();
    let moved = pull_and_reload(&master, &edge, &devices, 2).await;
    assert_eq!(moved["commit"], second.as_str());
    wait_edge_commit(&master, &edge, &second).await;

    let (status, body) = master
        .post(
            "/api/v1/repositories/code/reset",
            json!({"commit": &first[..12]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["commit"], first.as_str());
    wait_version(&edge, 1, Duration::from_secs(2)).await;
    wait_edge_commit(&master, &edge, &first).await;
    assert_eq!(devices.connects(), (1, 1), "no module reconnected");
}

#[tokio::test]
async fn an_edge_away_during_two_updates_catches_up_on_reconnect() {
    let devices = Devices::new();
    let repo = folder_repo();
    let (cluster, master, edge, _) = start_on_v1(repo.path(), &devices, true).await;

    cluster.proxies[0].cut();
    wait_for("the edge offline", Duration::from_secs(15), || async {
        (master.edge_online("site-1").await == Some(false)).then_some(())
    })
    .await;
    for version in [2, 3] {
        std::fs::write(repo.path().join("display.rhai"), display(version)).unwrap();
        let (status, body) = pull(&master).await;
        assert_eq!(status, 200, "{body}");
    }
    let latest = repository_commit(&master).await;
    // Away, the edge keeps running what it has.
    assert_eq!(version_on(&edge).await, Some(1));

    cluster.proxies[0].heal();
    let took = wait_version(&edge, 3, Duration::from_secs(20)).await;
    println!(
        "the edge ran the latest code {} ms after the link healed",
        took.as_millis()
    );
    wait_edge_commit(&master, &edge, &latest).await;
    assert_eq!(devices.disconnects(), 0, "no device session dropped");
}
