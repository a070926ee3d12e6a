//! Secrets against the real binaries: after a session that uses every secret (edge links
//! authenticate, users are made and their tokens used, rotated and refused, both servers
//! restart), no secret or token appears in any log, any API answer or the databases, the
//! users' tokens are stored only as hashes, and every file that holds a secret is 0600 in
//! a 0700 data folder.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};
use tether_tests::api::ApiClient;
use tether_tests::cluster::{Cluster, ClusterSpec};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

/// Whether `needle` occurs in `haystack` (raw bytes: logs, answers, database files).
fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test]
async fn no_secret_reaches_a_log_an_answer_or_a_database() {
    let mut cluster = Cluster::start(ClusterSpec::edges(1)).await;
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(10))
        .await;
    cluster.wait_edge_api_up(0).await;
    let master = cluster.master_api();
    let edge = cluster.edge_admin(0);

    // Make a user, use the token on both sides, rotate it, use a wrong one.
    let (status, made) = master
        .post(
            "/api/v1/users",
            json!({"id": "ops", "name": "Ops", "role": "operator"}),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let first = made["token"].as_str().expect("the token, once").to_string();
    let user = master.with_token(Some(first.clone()));
    assert_eq!(user.get("/api/v1/systems").await.0, 200);
    let (status, rotated) = master.post("/api/v1/users/ops/token", json!({})).await;
    assert_eq!(status, 200, "{rotated}");
    let second = rotated["token"].as_str().unwrap().to_string();
    assert_eq!(user.get("/api/v1/systems").await.0, 401, "the old token");
    let edge_user = edge.with_token(Some(second.clone()));
    tether_tests::wait_for(
        "the user's new token on the edge",
        Duration::from_secs(5),
        || async { (edge_user.get("/api/v1/systems").await.0 == 200).then_some(()) },
    )
    .await;
    let wrong = "ttu_0000000000000000000000000000000000000000000000000000000000000000";
    assert_eq!(
        master
            .with_token(Some(wrong.into()))
            .get("/api/v1/edges")
            .await
            .0,
        401
    );

    // Both restart: boot logs too.
    cluster.master.restart();
    cluster.wait_master_up().await;
    cluster.edges[0].restart();
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(10))
        .await;
    cluster.wait_edge_api_up(0).await;

    let secrets = [
        (
            "the edge's shared secret",
            read_trimmed(&cluster.path("certs/site-1.secret")),
        ),
        (
            "the master's admin token",
            read_trimmed(&cluster.path("data/master/admin.token")),
        ),
        (
            "the edge's admin token",
            read_trimmed(&cluster.path("data/site-1/admin.token")),
        ),
        ("the user's first token", first.clone()),
        ("the user's second token", second.clone()),
        ("a refused token", wrong.to_string()),
    ];

    // Every answer a reader can get, on both sides.
    let mut answers = Vec::new();
    let reads: [(&ApiClient, &[&str]); 2] = [
        (
            &master,
            &[
                "/api/v1/edges",
                "/api/v1/edges/site-1",
                "/api/v1/edges/site-1/slice",
                "/api/v1/users",
                "/api/v1/users/ops",
                "/api/v1/systems",
                "/api/v1/audit",
                "/api/v1/repositories",
                "/metrics",
            ],
        ),
        (
            &edge,
            &[
                "/api/v1/edges",
                "/api/v1/replica",
                "/api/v1/audit",
                "/metrics",
            ],
        ),
    ];
    for (api, paths) in reads {
        for path in paths {
            let (status, _, text) = api.get_text(path).await;
            assert_eq!(status, 200, "{path}: {text}");
            answers.push((path.to_string(), text));
        }
    }
    let logs = [
        ("master.log", cluster.master.log_text()),
        ("site-1.log", cluster.edges[0].log_text()),
    ];
    // The databases, as bytes on disk.
    let databases = ["data/master/model.redb", "data/site-1/replica.redb"]
        .map(|path| (path, std::fs::read(cluster.path(path)).unwrap()));

    for (what, secret) in &secrets {
        assert!(secret.len() >= 32, "{what} read: {secret:?}");
        for (name, text) in &logs {
            assert!(!holds(text.as_bytes(), secret), "{what} in {name}");
        }
        for (path, text) in &answers {
            assert!(
                !holds(text.as_bytes(), secret),
                "{what} in the answer to {path}"
            );
        }
        for (path, bytes) in &databases {
            assert!(!holds(bytes, secret), "{what} in {path}");
        }
    }
    // The user's token is kept as its SHA-256, which both databases hold.
    let hash = hex::encode(Sha256::digest(second.as_bytes()));
    for (path, bytes) in &databases {
        assert!(holds(bytes, &hash), "the token's hash in {path}");
    }

    // Files that hold a secret: 0600, in data folders of 0700.
    for file in [
        "certs/site-1.secret",
        "certs/site-1.key",
        "certs/master.key",
        "certs/ca.key",
        "data/master/admin.token",
        "data/site-1/admin.token",
    ] {
        assert_eq!(mode(&cluster.path(file)), 0o600, "{file}");
    }
    for dir in ["data/master", "data/site-1"] {
        assert_eq!(mode(&cluster.path(dir)), 0o700, "{dir}");
    }
}
