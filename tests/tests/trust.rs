//! Trust boundaries with the real binaries: an edge speaks for its own site only. A rogue
//! edge holding a valid secret (the harness's own link client) tries every request against
//! another site and is refused, with the refusal in the audit log, while the other site's
//! devices see nothing and both sites carry on; an edge's own admin token acts on its own
//! site only; and what an authenticated edge can make the master hold (audit records,
//! status subscriptions, blob streams it never reads) stays bounded.

use std::time::Duration;

use serde_json::{Value, json};
use tether_common::code::content_hash;
use tether_common::identity::Epoch;
use tether_common::link::LinkError;
use tether_common::protocol::{
    AuditRecord, ControlOwner, ErrorCode, ModelBatch, ModuleRef, RepositoryAction, Request,
    Response, StreamItem,
};
use tether_tests::api::ApiClient;
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::rogue::{DeafRogue, RogueEdge, module};
use tether_tests::sim::Sim;
use tether_tests::{CORE, drivers_dir, wait_for};

const SECOND: Duration = Duration::from_secs(1);

/// A logic driver that remembers a note in its status.
const NOTE: &str = r#"
fn ping() { "pong" }
fn remember(text) { log("remembering " + text); status("note", text); text }
"#;

/// A large file in site-2's repository, for blob streams.
const BIG_BYTES: usize = 4 << 20;

/// site-1: room-1 with a projector and a note; site-2: room-2 with a note. The projector
/// driver comes from the `core` repository, which only site-1 uses; the note driver and a
/// large file from `store`, which both use.
fn site(projector: u16) -> String {
    let core = CORE;
    format!(
        r#"
[[repositories]]
id = "core"
path = "{core}"

[[repositories]]
id = "store"
path = "repos/store-drivers"

[[drivers]]
id = "projector"
repository = "core"
file = "projector.rhai"
delimiter = "\r"
default_settings = {{ poll_ms = 600000 }}

[[drivers]]
id = "note"
repository = "store"
file = "note.rhai"
transport = "none"

[[modules]]
id = "proj-1"
driver = "projector"
name = "Display"
host = "127.0.0.1"
port = {projector}
edge = "site-1"

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
id = "room-1"
name = "Room 1"
edge = "site-1"
modules = ["proj-1", "note-1"]

[[systems]]
id = "room-2"
name = "Room 2"
edge = "site-2"
modules = ["note-2"]
"#
    )
}

struct Setup {
    cluster: Cluster,
    projector: Sim,
}

/// Both sites, each failing over to the master 2 s after its edge is gone (warm standby),
/// with site-1's room working through the master.
async fn start() -> Setup {
    let projector = Sim::projector();
    let mut spec = ClusterSpec::edges(2);
    spec.edge_settings = "failover = true\ntimeout_ms = 2000\nstandby = \"warm\"".into();
    spec.site_extra = site(projector.port());
    spec.files = vec![
        ("repos/store-drivers/note.rhai".into(), NOTE.into()),
        ("repos/store-drivers/big.txt".into(), "b".repeat(BIG_BYTES)),
    ];
    let cluster = Cluster::start(spec).await;
    let master = cluster.master_api();
    wait_for("room-1 to run on site-1", 20 * SECOND, || async {
        let (status, body) = master
            .exec("room-1", "Display", 1, "power", json!([true]))
            .await;
        (status == 200 && body["executed_by"] == "edge:site-1").then_some(())
    })
    .await;
    projector.next_where("command", |e| e["command"] == "PWR ON");
    Setup { cluster, projector }
}

/// Kills site-2's edge and waits until the master runs its modules, so that a rogue can
/// speak as site-2 (and site-2's note runs on the master, within the rogue's own slice).
async fn hand_site_2_to_the_master(cluster: &mut Cluster) {
    cluster.edges[1].kill();
    let master = cluster.master_api();
    wait_for("the master to run site-2", 15 * SECOND, || async {
        let edge = master.edge("site-2").await?;
        (edge["owner"] == "master").then_some(())
    })
    .await;
}

/// Creates a user through the master; answers its token.
async fn create_user(master: &ApiClient, id: &str, role: &str) -> String {
    let (status, body) = master
        .post("/api/v1/users", json!({"id": id, "name": id, "role": role}))
        .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().expect("a token").to_string()
}

/// The error code and message of a refused request.
fn refusal(what: &str, answer: Result<Response, LinkError>) -> (ErrorCode, String) {
    match answer {
        Err(LinkError::Remote(err)) => (err.code, err.message),
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

fn assert_forbidden(what: &str, answer: Result<Response, LinkError>, names: &[&str]) {
    let (code, message) = refusal(what, answer);
    assert_eq!(code, ErrorCode::Forbidden, "{what}: {message}");
    for name in names {
        assert!(
            message.contains(name),
            "{what}: {message:?} should name {name}"
        );
    }
}

fn commands(sim: &Sim) -> Vec<Value> {
    sim.events()
        .into_iter()
        .filter(|e| e["event"] != "command" || e["command"] != "PWR?")
        .collect()
}

/// The master's resident memory in bytes.
fn rss(cluster: &Cluster) -> u64 {
    let pid = cluster.master.pid().expect("the master runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

fn module_by_id(system: &str, name: &str, id: &str) -> ModuleRef {
    ModuleRef {
        id: Some(id.to_string()),
        ..ModuleRef::new(system, name, 1)
    }
}

#[tokio::test]
async fn a_rogue_edge_reaches_nothing_of_another_site() {
    let mut setup = start().await;
    let master = setup.cluster.master_api();
    let viewer = create_user(&master, "vera", "viewer").await;
    let operator = create_user(&master, "otto", "operator").await;
    // The rogue takes site-2's place before its failover timeout: site-2 stays its own,
    // as a real edge's would.
    setup.cluster.edges[1].kill();
    let rogue = RogueEdge::connect(&setup.cluster, "site-2").await;
    wait_for("site-2 to be the rogue's", 5 * SECOND, || async {
        let edge = master.edge("site-2").await?;
        (edge["online"] == true && edge["owner"] == "edge").then_some(())
    })
    .await;
    let seen_before = commands(&setup.projector).len();

    // Every request about site-1's units, and every request only a master sends.
    let display = module("room-1", "Display", 1);
    let exec = |at: ModuleRef| Request::Execute {
        module: at,
        method: "power".into(),
        args: tether_common::protocol::Json::from_value(&json!([false])),
        epoch: None,
        holder: None,
    };
    let attempts: Vec<(&str, Request, &str)> = vec![
        ("exec", exec(display.clone()), "room-1 Display 1"),
        (
            "exec by id through its own system",
            exec(module_by_id("room-2", "Note", "proj-1")),
            "module proj-1",
        ),
        (
            "status",
            Request::StatusRequest {
                module: display.clone(),
            },
            "room-1 Display 1",
        ),
        (
            "debug read",
            Request::DebugRead {
                module: display.clone(),
            },
            "room-1 Display 1",
        ),
        (
            "debug unsubscribe",
            Request::DebugUnsubscribe {
                module: display.clone(),
            },
            "room-1 Display 1",
        ),
        (
            "stop",
            Request::StopSystem {
                system: "room-1".into(),
            },
            "stop system room-1",
        ),
        (
            "start",
            Request::StartSystem {
                system: "room-1".into(),
            },
            "start system room-1",
        ),
        (
            "expire",
            Request::ExpireSystemCache {
                system: "room-1".into(),
            },
            "expire system room-1",
        ),
        (
            "control decision",
            Request::ControlDecision {
                owner: ControlOwner::Master,
                epoch: Epoch(999),
                reason: "rogue".into(),
            },
            "control decision",
        ),
        ("master ready", Request::MasterReady, "master-ready"),
        (
            "model changes",
            Request::ModelChanges(ModelBatch {
                model_id: 1,
                from_version: 0,
                to_version: 1,
                snapshot: true,
                changes: Vec::new(),
            }),
            "data-model changes",
        ),
        (
            "repository update",
            Request::RepositoryUpdate {
                repository: "core".into(),
                commit: "x".into(),
                action: RepositoryAction::Reset,
                files: Vec::new(),
            },
            "repository update",
        ),
        (
            "live reload",
            Request::LiveReload {
                driver: "projector".into(),
            },
            "live reload",
        ),
    ];
    let refused = attempts.len();
    for (what, body, target) in attempts {
        assert_forbidden(what, rogue.request(body).await, &["edge site-2", target]);
    }
    // Streams: refused at their start.
    for body in [
        Request::StatusSubscribe {
            module: display.clone(),
        },
        Request::DebugSubscribe {
            module: display.clone(),
        },
    ] {
        let (_stream, first) = rogue.stream(body).await;
        match first {
            Some(Err(LinkError::Remote(err))) => {
                assert_eq!(err.code, ErrorCode::Forbidden, "{err}");
                assert!(err.message.contains("room-1 Display 1"), "{err}");
            }
            other => panic!("a subscription to site-1's display: {other:?}"),
        }
    }
    // Another site's code, and a blob of no manifest.
    let projector_code = std::fs::read(drivers_dir().join("projector.rhai")).unwrap();
    for hashes in [vec![content_hash(&projector_code)], vec![[7u8; 32]]] {
        let (_stream, first) = rogue.stream(Request::FetchBlobs { hashes }).await;
        match first {
            Some(Err(LinkError::Remote(err))) => {
                assert_eq!(err.code, ErrorCode::Forbidden, "{err}");
                assert!(
                    err.message.contains("outside the code of its own site"),
                    "{err}"
                );
            }
            other => panic!("a foreign blob: {other:?}"),
        }
    }
    // Audit records about another location.
    let forged = AuditRecord {
        time_ms: 1,
        edge: "site-1".into(),
        from: ControlOwner::Edge,
        to: ControlOwner::Master,
        epoch: Epoch(1),
        reason: "forged".into(),
        code: None,
    };
    assert_forbidden(
        "audit about site-1",
        rogue
            .request(Request::AuditEvents {
                events: vec![forged],
            })
            .await,
        &["own location only"],
    );

    // Forwarded for a user: the master authorizes the user, not the edge.
    assert_forbidden(
        "exec for a viewer",
        rogue.request_as(exec(display.clone()), &viewer).await,
        &["user vera", "refused"],
    );
    assert_forbidden(
        "exec with a made-up token",
        rogue.request_as(exec(display.clone()), "ttu_made_up").await,
        &["not valid"],
    );
    match rogue
        .request_as(
            Request::StatusRequest {
                module: display.clone(),
            },
            &viewer,
        )
        .await
    {
        Ok(Response::Status { entries }) => {
            assert!(entries.iter().any(|(key, _)| key == "power"), "{entries:?}")
        }
        other => panic!("a viewer may read a status through any edge: {other:?}"),
    }

    // The other site's devices saw nothing of it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = commands(&setup.projector);
    assert_eq!(
        seen.len(),
        seen_before,
        "the projector saw: {:?}",
        &seen[seen_before..]
    );

    // The audit log records the refusals, as the master's account of site-2.
    let (_, audit) = master.get("/api/v1/audit").await;
    let refusals: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["event"] == "refused" && r["edge"] == "site-2")
        .collect();
    assert!(refusals.len() >= refused, "{refusals:?}");
    assert!(
        refusals.iter().any(|r| r["reason"]
            .as_str()
            .unwrap()
            .contains("exec power on room-1 Display 1")),
        "{refusals:?}"
    );
    let (_, _, metrics) = master.get_text("/metrics").await;
    let counted = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("tether_link_refused_total{edge=\"site-2\",what=\"request\"} ")
        })
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(counted >= refused as u64, "{metrics}");

    // What it announces or reports is checked and escaped: an API address that is not a
    // plain https origin does not become a client's hint; a reason cannot forge a log
    // line.
    let (code, message) = refusal(
        "a hint with a user and a path",
        rogue
            .request(Request::Hello {
                api_url: "https://user@evil.example/steal".into(),
            })
            .await,
    );
    assert_eq!(code, ErrorCode::BadRequest, "{message}");
    let forged_line = AuditRecord {
        time_ms: 1,
        edge: "site-2".into(),
        from: ControlOwner::Edge,
        to: ControlOwner::Edge,
        epoch: Epoch(0),
        reason: "took control\n2026-01-01T00:00:00Z  INFO FORGED LINE\u{1b}[31m".into(),
        code: None,
    };
    rogue
        .request(Request::AuditEvents {
            events: vec![forged_line],
        })
        .await
        .expect("its own audit event is taken");
    let log = setup.cluster.master.log_text();
    assert!(
        log.contains("took control\\n2026-01-01"),
        "escaped in the log"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")) && !log.contains('\u{1b}'),
        "no forged line, no escape sequence"
    );

    // Its own site still works: the rogue's link is up and serves what is its own.
    match rogue
        .request(Request::SyncRequest {
            model_id: 0,
            since_version: 0,
        })
        .await
    {
        Ok(Response::ModelChanges(batch)) => {
            let ids: Vec<&str> = batch.changes.iter().map(|c| c.id.as_str()).collect();
            assert!(
                ids.contains(&"room-2") && !ids.contains(&"room-1"),
                "{ids:?}"
            );
        }
        other => panic!("the rogue's own sync: {other:?}"),
    }
    let (_stream, first) = rogue
        .stream(Request::FetchBlobs {
            hashes: vec![content_hash(NOTE.as_bytes())],
        })
        .await;
    assert!(
        matches!(first, Some(Ok(StreamItem::Blob { .. }))),
        "its own code: {first:?}"
    );
    // And so does the other site.
    let (status, body) = master
        .exec("room-1", "Display", 1, "power", json!([true]))
        .await;
    assert_eq!((status, &body["executed_by"]), (200, &json!("edge:site-1")));
    // An operator's call that the rogue forwards is the operator's to make.
    match rogue.request_as(exec(display.clone()), &operator).await {
        Ok(Response::Value { executed_by, .. }) => assert_eq!(executed_by, "edge:site-1"),
        other => panic!("an operator's call forwarded by site-2: {other:?}"),
    }

    // A status notice for site-1's module is not taken: when site-1 fails over, the
    // master starts the projector from site-1's own status, not the rogue's.
    rogue
        .notify_status("proj-1", "forged", json!(true), 1_000_000)
        .await;
    rogue
        .notify_status("note-1", "note", json!("forged"), 1_000_000)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    setup.cluster.edges[0].kill();
    wait_for("the master to run site-1", 15 * SECOND, || async {
        let status = master.status("room-1", "Note", 1).await;
        (!status.is_null()).then_some(status)
    })
    .await;
    let display = master.status("room-1", "Display", 1).await;
    assert!(display.get("forged").is_none(), "{display}");
    let note = master.status("room-1", "Note", 1).await;
    assert_ne!(note["note"], "forged", "{note}");
}

#[tokio::test]
async fn an_edges_admin_token_acts_on_its_own_site_only() {
    let setup = start().await;
    let master = setup.cluster.master_api();
    let site_1_admin = setup.cluster.edge_admin(0);
    wait_for("room-2 to run on site-2", 20 * SECOND, || async {
        let (status, body) = master.exec("room-2", "Note", 1, "ping", json!([])).await;
        (status == 200 && body["executed_by"] == "edge:site-2").then_some(())
    })
    .await;
    // And site-1's own room (its driver code fetched), before its token is tried.
    wait_for("room-1 to run on site-1", 20 * SECOND, || async {
        let (status, body) = site_1_admin
            .exec("room-1", "Note", 1, "ping", json!([]))
            .await;
        (status == 200 && body["executed_by"] == "edge:site-1").then_some(())
    })
    .await;

    // site-1's own admin token: another site's module is out of its reach.
    let calls = [
        (
            "exec",
            reqwest::Method::POST,
            "/api/v1/systems/room-2/modules/Note/1/exec",
            Some(json!({"method": "ping"})),
        ),
        (
            "status",
            reqwest::Method::GET,
            "/api/v1/systems/room-2/modules/Note/1/status",
            None,
        ),
        (
            "debug",
            reqwest::Method::GET,
            "/api/v1/systems/room-2/modules/Note/1/debug",
            None,
        ),
        (
            "stop",
            reqwest::Method::POST,
            "/api/v1/systems/room-2/stop",
            Some(json!({})),
        ),
        (
            "start",
            reqwest::Method::POST,
            "/api/v1/systems/room-2/start",
            Some(json!({})),
        ),
    ];
    for (what, method, path, body) in calls.clone() {
        let (status, answer) = site_1_admin.send(method, path, body).await;
        assert_eq!(
            status, 403,
            "{what} of room-2 with site-1's admin token: {answer}"
        );
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains("not one of this edge's"),
            "{answer}"
        );
    }
    // Its own site is its to run.
    let (status, body) = site_1_admin
        .exec("room-1", "Note", 1, "ping", json!([]))
        .await;
    assert_eq!(
        (status, &body["executed_by"]),
        (200, &json!("edge:site-1")),
        "{body}"
    );
    // room-2 kept running all along.
    let (status, body) = master.exec("room-2", "Note", 1, "ping", json!([])).await;
    assert_eq!(
        (status, &body["executed_by"]),
        (200, &json!("edge:site-2")),
        "{body}"
    );

    // A user of the master, through site-1's edge: the edge forwards the user's token and
    // the master decides by the user's role.
    let operator = create_user(&master, "otto", "operator").await;
    let viewer = create_user(&master, "vera", "viewer").await;
    let through_site_1 = |token: &str| site_1_admin.with_token(Some(token.to_string()));
    wait_for("the users on site-1", 10 * SECOND, || async {
        (through_site_1(&viewer).get("/api/v1/edges").await.0 == 200).then_some(())
    })
    .await;
    let (status, body) = through_site_1(&operator)
        .exec("room-2", "Note", 1, "remember", json!(["from site-1"]))
        .await;
    assert_eq!(
        (status, &body["executed_by"]),
        (200, &json!("edge:site-2")),
        "{body}"
    );
    let (status, body) = through_site_1(&viewer)
        .get("/api/v1/systems/room-2/modules/Note/1/status")
        .await;
    assert_eq!(
        (status, &body["note"]),
        (200, &json!("from site-1")),
        "{body}"
    );
    let (status, body) = through_site_1(&viewer)
        .exec("room-2", "Note", 1, "ping", json!([]))
        .await;
    assert_eq!(status, 403, "a viewer may not exec anywhere: {body}");
    let (status, body) = through_site_1(&operator)
        .post("/api/v1/systems/room-2/stop", json!({}))
        .await;
    assert_eq!(status, 403, "an operator may not stop a system: {body}");
}

#[tokio::test]
async fn what_an_edge_can_make_the_master_hold_is_bounded() {
    // The master's growth allowed over the attacks below, each of which held hundreds of
    // megabytes before their bounds.
    const BOUND: u64 = 64 << 20;
    let mut setup = start().await;
    let master = setup.cluster.master_api();
    hand_site_2_to_the_master(&mut setup.cluster).await;
    let baseline = rss(&setup.cluster);
    eprintln!("master RSS before the attacks: {} MiB", baseline >> 20);

    // Audit: 100,000 records in one report are refused; batches within the cap are taken
    // up to the edge's burst, then refused as busy; the master's own records stay.
    let rogue = RogueEdge::connect(&setup.cluster, "site-2").await;
    let record = |i: u64| AuditRecord {
        time_ms: i,
        edge: "site-2".into(),
        from: ControlOwner::Edge,
        to: ControlOwner::Edge,
        epoch: Epoch(i),
        reason: "x".repeat(2000),
        code: None,
    };
    let (code, message) = refusal(
        "100,000 audit records",
        rogue
            .request(Request::AuditEvents {
                events: (0..100_000)
                    .map(|i| AuditRecord {
                        reason: String::new(),
                        ..record(i)
                    })
                    .collect(),
            })
            .await,
    );
    assert_eq!(code, ErrorCode::Forbidden, "{message}");
    assert!(message.contains("at most 256"), "{message}");
    let mut taken = 0;
    let mut busy = None;
    for batch in 0..20u64 {
        let events = (batch * 256..batch * 256 + 256).map(record).collect();
        match rogue.request(Request::AuditEvents { events }).await {
            Ok(_) => taken += 256,
            Err(err) => {
                busy = Some(refusal("a batch over the rate", Err(err)));
                break;
            }
        }
    }
    let (code, message) = busy.expect("the rate limit refuses at last");
    assert_eq!(code, ErrorCode::Busy, "{message}");
    assert!(
        (768..=1024).contains(&taken),
        "{taken} records taken before the limit"
    );
    let (_, audit) = master.get("/api/v1/audit").await;
    let audit = audit.as_array().unwrap();
    assert!(
        audit.iter().any(|r| r["event"] == "owner"
            && r["edge"] == "site-2"
            && r["to"] == "master"
            && r.get("reported_by").is_none()),
        "the master's own record of its takeover is kept"
    );
    let reported: Vec<&Value> = audit
        .iter()
        .filter(|r| r["reported_by"] == "edge")
        .collect();
    assert!(reported.len() <= 1000, "{} kept", reported.len());
    assert!(
        reported
            .iter()
            .all(|r| r["reason"].as_str().unwrap().len() <= 1024),
        "reasons are cut"
    );

    // 100,000 status subscriptions of a module of its own slice (site-2's note, run by
    // the master): one stays open per module and link, so a change goes out once.
    let note = module("room-2", "Note", 1);
    let mut streams = Vec::new();
    for _ in 0..100_000 {
        let stream = rogue
            .link
            .request_stream(
                Request::StatusSubscribe {
                    module: note.clone(),
                },
                Duration::from_secs(60),
            )
            .await
            .expect("a subscription goes out");
        streams.push(stream);
    }
    tokio::time::sleep(2 * SECOND).await;
    let (status, body) = master
        .exec("room-2", "Note", 1, "remember", json!(["fan-out"]))
        .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(SECOND).await;
    let mut delivered = 0;
    for stream in &mut streams {
        while let Ok(Some(item)) = tokio::time::timeout(Duration::ZERO, stream.next()).await {
            if let Ok(StreamItem::StatusValue { key, .. }) = item
                && key == "note"
            {
                delivered += 1;
            }
        }
    }
    eprintln!("one status change reached {delivered} of 100,000 subscriptions");
    assert!(delivered <= 1, "a change went out {delivered} times");
    drop(streams);
    let grown = rss(&setup.cluster).saturating_sub(baseline);
    eprintln!("after audit and subscriptions: +{} MiB", grown >> 20);
    assert!(grown < BOUND, "the master grew by {} MiB", grown >> 20);
    drop(rogue);

    // Blob streams it never reads: 300 fetches of a 4 MiB file (1.2 GB of answers) hold
    // at most the link's byte budget and the blobs of its two fetches in progress.
    let mut deaf = DeafRogue::connect(&setup.cluster, "site-2").await;
    let big = content_hash("b".repeat(BIG_BYTES).as_bytes());
    for _ in 0..300 {
        deaf.send(Request::FetchBlobs { hashes: vec![big] }).await;
    }
    tokio::time::sleep(3 * SECOND).await;
    let grown = rss(&setup.cluster).saturating_sub(baseline);
    eprintln!("with 300 unread 4 MiB blob streams: +{} MiB", grown >> 20);
    assert!(grown < BOUND, "the master grew by {} MiB", grown >> 20);
    // The master still serves: site-1 runs, the API answers.
    let (status, body) = master
        .exec("room-1", "Display", 1, "power", json!([false]))
        .await;
    assert_eq!(
        (status, &body["executed_by"]),
        (200, &json!("edge:site-1")),
        "{body}"
    );
    // A peer that reads nothing, though it keeps sending heartbeats, loses its link once
    // the master's writes to it stall for three heartbeats.
    setup
        .cluster
        .master
        .wait_for_log("the peer read nothing for", 10 * SECOND)
        .await;
    drop(deaf);
}
