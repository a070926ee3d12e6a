//! The cluster's shared model on a real etcd (real processes): writes on two masters at
//! once all land with distinct versions, a master killed in the middle loses none of the
//! acknowledged ones, every master and the edge's replica end with all of them, and two
//! conditional writes of one record from one version on two masters: exactly one lands.
#![cfg(feature = "cluster")]

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::api::ApiClient;
use tether_tests::masters::{Masters, MastersSpec};
use tether_tests::wait_for;

/// Writes per writer.
const WRITES: usize = 200;

async fn start() -> Masters {
    Masters::start(MastersSpec {
        masters: 3,
        edges: vec!["site-1".into()],
        lease_ms: 3000,
        edge_settings: String::new(),
        site_extra: String::new(),
        files: Vec::new(),
        etcd_members: 1,
        clock_offsets_s: Vec::new(),
    })
    .await
}

/// An acknowledged write: the record's id, name and the version that wrote it.
struct Acked {
    id: String,
    name: String,
    version: String,
}

/// Creates `WRITES` systems `PREFIX-N` of site-1, through `apis[0]`, moving to the next
/// master when one stops answering; `halfway` runs once half are written.
async fn writer(
    prefix: &str,
    apis: Vec<ApiClient>,
    halfway: impl AsyncFnOnce(),
) -> (Vec<Acked>, usize) {
    let mut acked = Vec::new();
    let mut unanswered = 0;
    let mut at = 0;
    let mut halfway = Some(halfway);
    for i in 0..WRITES {
        if i == WRITES / 2
            && let Some(halfway) = halfway.take()
        {
            halfway().await;
        }
        let (id, name) = (format!("{prefix}-{i}"), format!("System {prefix} {i}"));
        let body = json!({"id": id, "name": name, "edge": "site-1", "modules": []});
        loop {
            let answer = apis[at]
                .send_if(
                    reqwest::Method::POST,
                    "/api/v1/systems",
                    Some(body.clone()),
                    None,
                )
                .await;
            match answer.status {
                201 => {
                    acked.push(Acked {
                        id: id.clone(),
                        name: name.clone(),
                        version: answer.etag.expect("a written record's ETag"),
                    });
                    break;
                }
                // Landed before the master died, unacknowledged: it may stay.
                409 => break,
                0 | 503 => {
                    // The master is gone (or going): the next one takes the write.
                    unanswered += 1;
                    at = (at + 1) % apis.len();
                }
                other => panic!("write {id}: {other} {:?}", answer.body),
            }
        }
    }
    (acked, unanswered)
}

/// The systems `api` has.
async fn systems(api: &ApiClient) -> Vec<Value> {
    let (status, body) = api.get("/api/v1/systems").await;
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn writes_on_two_masters_at_once_all_land_with_distinct_versions_through_a_master_killed() {
    let mut cluster = start().await;
    let (m1, m2, m3) = (
        cluster.master_api(0),
        cluster.master_api(1),
        cluster.master_api(2),
    );
    let killed = std::sync::Mutex::new(None);
    let m2_pid = cluster.masters[1].server.pid();
    let ((first, _), (second, unanswered)) = tokio::join!(
        writer("a", vec![m1.clone()], async || {}),
        writer("b", vec![m2.clone(), m3.clone()], async || {
            // m2 dies in the middle of its writer's run (SIGKILL).
            let pid = m2_pid.expect("m2 runs");
            // SAFETY: kill(2) on a child process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            *killed.lock().unwrap() = Some(());
        }),
    );
    assert!(killed.lock().unwrap().is_some());
    eprintln!(
        "acknowledged {} + {} writes; {unanswered} went unanswered around the kill",
        first.len(),
        second.len()
    );
    assert_eq!(first.len(), WRITES, "m1's writer never lost its master");
    assert!(second.len() >= WRITES - 1, "the writer moved on to m3");

    // Versions: one per write, never two writes at one.
    let acked: Vec<&Acked> = first.iter().chain(&second).collect();
    let versions: BTreeSet<&str> = acked.iter().map(|a| a.version.as_str()).collect();
    assert_eq!(versions.len(), acked.len(), "two writes shared a version");

    // Every acknowledged write is on every master, m2 restarted included, and on the
    // edge's replica.
    cluster.masters[1].server.kill();
    cluster.masters[1].server.restart();
    cluster.wait_master_up(1).await;
    for (i, api) in [&m1, &m2, &m3].into_iter().enumerate() {
        let held = wait_for(
            "every acknowledged write on the master",
            Duration::from_secs(20),
            || async {
                let systems = systems(api).await;
                let names: std::collections::BTreeMap<String, String> = systems
                    .iter()
                    .map(|s| {
                        (
                            s["id"].as_str().unwrap_or_default().to_string(),
                            s["name"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect();
                acked
                    .iter()
                    .all(|a| names.get(&a.id) == Some(&a.name))
                    .then_some(names)
            },
        )
        .await;
        eprintln!("master m{} holds {} systems", i + 1, held.len());
        for a in &acked {
            let read = api
                .send_if(
                    reqwest::Method::GET,
                    &format!("/api/v1/systems/{}", a.id),
                    None,
                    None,
                )
                .await;
            assert_eq!(
                read.etag.as_deref(),
                Some(a.version.as_str()),
                "m{}: {} at the version that wrote it",
                i + 1,
                a.id
            );
        }
    }
    let edge = cluster.edge_admin(0).await;
    wait_for(
        "every acknowledged write on the edge's replica",
        Duration::from_secs(20),
        || async {
            let (_, replica) = edge.get("/api/v1/replica").await;
            let systems = &replica["records"]["systems"];
            acked
                .iter()
                .all(|a| systems[&a.id]["name"] == a.name.as_str())
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn of_two_conditional_writes_from_one_version_on_two_masters_exactly_one_lands() {
    let cluster = start().await;
    let (m1, m3) = (cluster.master_api(0), cluster.master_api(2));
    let path = "/api/v1/systems/shared";
    let (status, body) = m1
        .post(
            "/api/v1/systems",
            json!({"id": "shared", "name": "Shared", "edge": "site-1", "modules": []}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // m3 reads it (once it has it), with the same version m1 answers.
    let read = wait_for("m3 to have the record", Duration::from_secs(10), || async {
        let read = m3.send_if(reqwest::Method::GET, path, None, None).await;
        (read.status == 200).then_some(read)
    })
    .await;
    let etag = read.etag.clone().expect("ETag");
    assert_eq!(
        m1.send_if(reqwest::Method::GET, path, None, None)
            .await
            .etag,
        Some(etag.clone()),
        "one version for the record on every master"
    );
    for round in 0..5 {
        let etag = m1
            .send_if(reqwest::Method::GET, path, None, None)
            .await
            .etag
            .expect("ETag");
        // (Names new each round: a write that changes nothing lands without a version.)
        let body = |name: &str| json!({"name": name, "edge": "site-1", "modules": []});
        let (one, two) = tokio::join!(
            m1.send_if(
                reqwest::Method::PUT,
                path,
                Some(body(&format!("From m1, {round}"))),
                Some(&etag)
            ),
            m3.send_if(
                reqwest::Method::PUT,
                path,
                Some(body(&format!("From m3, {round}"))),
                Some(&etag)
            ),
        );
        let mut statuses = [one.status, two.status];
        statuses.sort();
        assert_eq!(
            statuses,
            [200, 412],
            "round {round}: {:?} {:?}",
            one.body,
            two.body
        );
        let (landed, refused) = if one.status == 200 {
            (one, two)
        } else {
            (two, one)
        };
        let now_at = landed.etag.clone().expect("the new ETag");
        let message = refused.body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(now_at.trim_matches('"')),
            "the refusal names the newer version {now_at}: {message}"
        );
    }
}
