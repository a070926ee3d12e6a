//! The master's data model through its admin API: CRUD and validation of every entity,
//! the version raised by one per write, conditional writes (`If-Match`, 412), durability
//! across SIGKILL, and `import`.

use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::api::ApiClient;
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::process::bin;
use tether_tests::wait_for;

fn base_site() -> String {
    format!(
        "[[repositories]]\nid = \"core\"\npath = \"{}\"\n\n\
         [[drivers]]\nid = \"projector\"\nrepository = \"core\"\nfile = \"projector.rhai\"\ndelimiter = \"\\r\"\n",
        tether_tests::CORE
    )
}

async fn version(api: &ApiClient) -> u64 {
    let (status, body) = api.get("/api/v1/edges/site-1/slice").await;
    assert_eq!(status, 200, "{body}");
    body["version"].as_u64().expect("a version")
}

/// One write through the API: its status, and the model version must rise by exactly
/// one when it succeeds and stay put when it fails.
async fn write(api: &ApiClient, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let before = version(api).await;
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let (status, answer) = api.send(method, path, body).await;
    let after = version(api).await;
    let expected = if (200..300).contains(&status) {
        before + 1
    } else {
        before
    };
    assert_eq!(
        after, expected,
        "version after {path} answered {status}: {answer}"
    );
    (status, answer)
}

async fn cluster() -> Cluster {
    let mut spec = ClusterSpec::edges(1);
    spec.site_extra = base_site();
    let cluster = Cluster::start(spec).await;
    cluster.wait_master_up().await;
    cluster
}

#[tokio::test]
async fn every_entity_has_crud_with_validation() {
    let cluster = cluster().await;
    let api = cluster.master_api();
    let folder = cluster.path(tether_tests::CORE).display().to_string();

    // (collection, a valid record, a change to it, an invalid record and the key named)
    let cases = [
        (
            "repositories",
            json!({"id": "extra", "path": folder}),
            json!({"name": "Extra drivers", "path": folder}),
            json!({"id": "bad", "path": 7}),
            "path",
        ),
        (
            "drivers",
            json!({"id": "meter", "repository": "core", "file": "meter.rhai", "transport": "modbus"}),
            json!({"repository": "core", "file": "meter.rhai", "transport": "modbus", "concurrency": 2}),
            json!({"id": "bad", "repository": "nope", "file": "x.rhai"}),
            "repository",
        ),
        (
            "edges",
            json!({"id": "site-9", "name": "Ninth", "secret_file": "certs/site-9.secret"}),
            json!({"name": "Ninth site", "timeout_ms": 5000, "secret_file": "certs/site-9.secret"}),
            json!({"id": "bad", "timeout_ms": 1}),
            "timeout_ms",
        ),
        (
            "modules",
            json!({"id": "proj-9", "driver": "projector", "name": "Display", "host": "127.0.0.1", "port": 9}),
            json!({"driver": "projector", "name": "Display", "host": "127.0.0.2", "port": 9}),
            json!({"id": "bad", "driver": "projector", "name": "Display", "edge": "nowhere"}),
            "edge",
        ),
        (
            "systems",
            json!({"id": "room-9", "name": "Room 9", "modules": ["proj-9"]}),
            json!({"name": "Room nine", "modules": ["proj-9"]}),
            json!({"id": "bad", "name": "Bad", "modules": ["nothing"]}),
            "modules[0]",
        ),
    ];
    for (collection, record, change, invalid, key) in &cases {
        let id = record["id"].as_str().unwrap();
        let base = format!("/api/v1/{collection}");
        let item = format!("{base}/{id}");

        let (status, body) = write(&api, "POST", &base, Some(record.clone())).await;
        assert_eq!(status, 201, "create {collection}: {body}");
        assert_eq!(body["id"], *id);
        let (status, body) = api.get(&item).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["id"], *id);
        let (status, list) = api.get(&base).await;
        assert_eq!(status, 200);
        assert!(
            list.as_array().unwrap().iter().any(|r| r["id"] == *id),
            "{list}"
        );

        let (status, body) = write(&api, "POST", &base, Some(record.clone())).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (409, Some("conflict")),
            "{body}"
        );

        let (status, body) = write(&api, "PUT", &item, Some(change.clone())).await;
        assert_eq!(status, 200, "update {collection}: {body}");
        for (field, value) in change.as_object().unwrap() {
            if field != "secret_file" {
                assert_eq!(
                    body[field], *value,
                    "{collection}.{field} after PUT: {body}"
                );
            }
        }

        let (status, body) = write(
            &api,
            "PUT",
            &format!("{base}/missing"),
            Some(change.clone()),
        )
        .await;
        assert_eq!(status, 404, "{body}");

        let (status, body) = write(&api, "POST", &base, Some(invalid.clone())).await;
        assert_eq!(status, 422, "{collection} invalid: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{key}`")),
            "{collection}: {message}"
        );
        let (status, _) = api.get(&format!("{base}/bad")).await;
        assert_eq!(status, 404, "a refused record is not stored");
    }

    // Not JSON, not an object, an unknown field, a bad id: 422 naming the cause.
    let (status, body) = api
        .send(
            reqwest::Method::POST,
            "/api/v1/systems",
            Some(json!([1, 2])),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = write(
        &api,
        "POST",
        "/api/v1/systems",
        Some(json!({"id": "s", "colour": "red"})),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        body["message"].as_str().unwrap().contains("colour"),
        "{body}"
    );
    let (status, body) = write(&api, "POST", "/api/v1/systems", Some(json!({"id": "a b"}))).await;
    assert_eq!(status, 422, "{body}");

    // Deleting something still referred to is a conflict naming who refers to it.
    let (status, body) = write(&api, "DELETE", "/api/v1/modules/proj-9", None).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("system room-9"),
        "{body}"
    );
    // In reverse order of reference, every delete works, then each is gone.
    for (collection, record, ..) in cases.iter().rev() {
        let item = format!("/api/v1/{collection}/{}", record["id"].as_str().unwrap());
        let (status, body) = write(&api, "DELETE", &item, None).await;
        assert_eq!(status, 204, "delete {item}: {body}");
        assert_eq!(api.get(&item).await.0, 404);
        assert_eq!(write(&api, "DELETE", &item, None).await.0, 404);
    }

    // A driver shows the hash of its script at its repository's commit.
    let (_, driver) = api.get("/api/v1/drivers/projector").await;
    let (_, repository) = api.get("/api/v1/repositories/core").await;
    assert_eq!(driver["hash"].as_str().unwrap().len(), 64, "{driver}");
    assert_eq!(
        driver["commit"], repository["commit"],
        "{driver} {repository}"
    );
    assert_eq!(repository["commit"].as_str().unwrap().len(), 64);
    let (status, body) = write(
        &api,
        "POST",
        "/api/v1/drivers",
        Some(json!({"id": "ghost", "repository": "core", "file": "no-such.rhai"})),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        body["message"].as_str().unwrap().contains("no-such.rhai"),
        "{body}"
    );

    // Without the token: 401.
    let anonymous = api.with_token(None);
    assert_eq!(anonymous.get("/api/v1/modules").await.0, 401);
}

#[tokio::test]
async fn a_write_answered_2xx_survives_sigkill() {
    let mut cluster = cluster().await;
    for round in 0..3 {
        let api = cluster.master_api();
        let id = format!("proj-{round}");
        let (status, body) = api
            .post(
                "/api/v1/modules",
                json!({"id": id, "driver": "projector", "name": "Display", "host": "127.0.0.1", "port": 9}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        // No pause: the answer itself is the promise.
        cluster.master.kill();
        cluster.master.restart();
        cluster.wait_master_up().await;
        let api = cluster.master_api();
        for earlier in 0..=round {
            let (status, body) = api.get(&format!("/api/v1/modules/proj-{earlier}")).await;
            assert_eq!(status, 200, "proj-{earlier} lost after SIGKILL: {body}");
        }
    }
}

#[tokio::test]
async fn import_loads_a_site_file_into_a_stopped_master() {
    let mut cluster = cluster().await;
    let import = cluster.path("more.toml");
    std::fs::write(
        &import,
        format!(
            "{}\n[[modules]]\nid = \"imported\"\ndriver = \"projector\"\nname = \"Display\"\nhost = \"127.0.0.1\"\nport = 9\n",
            base_site()
        ),
    )
    .unwrap();
    let config = cluster.path("master.toml");
    let run_import = || {
        std::process::Command::new(bin("tether-master"))
            .arg("import")
            .arg(&import)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    // While the master runs, its database is in use: a clear refusal, nothing changed.
    let refused = run_import();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Stop it first"), "{stderr}");

    cluster.master.kill();
    let done = run_import();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(stdout.contains("1 records changed"), "{stdout}");

    // A broken file is refused with its cause, and changes nothing.
    std::fs::write(
        &import,
        "[[modules]]\nid = \"x\"\ndriver = \"nope\"\nname = \"X\"\n",
    )
    .unwrap();
    let broken = run_import();
    assert_eq!(broken.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(stderr.contains("modules[0].driver"), "{stderr}");

    cluster.master.restart();
    cluster.wait_master_up().await;
    let api = cluster.master_api();
    wait_for("the imported module", Duration::from_secs(5), || async {
        (api.get("/api/v1/modules/imported").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(api.get("/api/v1/modules/x").await.0, 404);
}

/// Repositories are folders inside the master's `repositories_root` (`repos` in the test
/// cluster), which holds none of its secrets: a path out of it, by `..`, by an absolute
/// path, or through a link, is refused with 422 naming why; a link inside a repository
/// is never read; a repository over `[limits] repository_bytes` is refused naming it.
#[tokio::test]
async fn repositories_stay_inside_their_root() {
    let mut spec = ClusterSpec::edges(1);
    spec.site_extra = base_site();
    spec.master_extra = "[limits]\nrepository_bytes = 65536\n".into();
    spec.files = vec![
        ("repos/small/a.rhai".into(), "fn a() { 1 }".into()),
        ("repos/large/a.rhai".into(), "fn a() { 1 }".into()),
        ("repos/large/big.txt".into(), "x".repeat(100_000)),
        ("repos/linked/a.rhai".into(), "fn a() { 1 }".into()),
    ];
    let cluster = Cluster::start(spec).await;
    cluster.wait_master_up().await;
    let api = cluster.master_api();
    let certs = cluster.path("certs");
    std::os::unix::fs::symlink(&certs, cluster.path("repos/escape")).unwrap();
    std::os::unix::fs::symlink(certs.join("ca.key"), cluster.path("repos/linked/ca.key")).unwrap();

    for (path, why) in [
        (certs.display().to_string(), "outside repositories_root"),
        ("../certs".to_string(), "`..`"),
        ("small/../../certs".to_string(), "`..`"),
        ("escape".to_string(), "outside repositories_root"),
        ("/etc".to_string(), "outside repositories_root"),
    ] {
        let (status, body) = write(
            &api,
            "POST",
            "/api/v1/repositories",
            Some(json!({"id": "evil", "path": path})),
        )
        .await;
        assert_eq!(status, 422, "{path}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(why),
            "{path}: {body}"
        );
    }
    let (status, body) = write(
        &api,
        "POST",
        "/api/v1/repositories",
        Some(json!({"id": "large", "path": "large"})),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("[limits] repository_bytes"),
        "{body}"
    );
    // Inside the root, by a relative or an absolute path; a link in it is not read.
    let (status, body) = write(
        &api,
        "POST",
        "/api/v1/repositories",
        Some(json!({"id": "small", "path": "small"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let linked = cluster.path("repos/linked").display().to_string();
    let (status, body) = write(
        &api,
        "POST",
        "/api/v1/repositories",
        Some(json!({"id": "linked", "path": linked})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The repository's code holds a.rhai, not the CA key behind the link: a driver can
    // name the one and not the other.
    let (status, body) = write(
        &api,
        "POST",
        "/api/v1/drivers",
        Some(json!({"id": "a", "repository": "linked", "file": "a.rhai"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = write(
        &api,
        "POST",
        "/api/v1/drivers",
        Some(json!({"id": "stolen", "repository": "linked", "file": "ca.key"})),
    )
    .await;
    assert_eq!(status, 422, "the key was never read: {body}");
}

#[tokio::test]
async fn a_conditional_write_of_a_record_changed_since_is_refused_with_412() {
    let mut cluster = cluster().await;
    let api = cluster.master_api();
    let path = "/api/v1/edges/site-1";
    let read = api.send_if(reqwest::Method::GET, path, None, None).await;
    assert_eq!(read.status, 200, "{:?}", read.body);
    let etag = read.etag.clone().expect("a record's ETag");
    let mut record = read.body.clone();

    // Two operators edit the record from the same read: exactly one lands, the other is
    // told the version it is now at.
    record["name"] = json!("First");
    let mut second = record.clone();
    second["name"] = json!("Second");
    let (one, two) = tokio::join!(
        api.send_if(reqwest::Method::PUT, path, Some(record), Some(&etag)),
        api.send_if(reqwest::Method::PUT, path, Some(second), Some(&etag)),
    );
    let mut answers = [one, two];
    answers.sort_by_key(|a| a.status);
    let [landed, refused] = answers;
    assert_eq!(landed.status, 200, "{:?}", landed.body);
    assert_eq!(refused.status, 412, "{:?}", refused.body);
    assert_eq!(refused.body["error"], "precondition_failed");
    let new_etag = landed.etag.clone().expect("the new ETag");
    assert_ne!(new_etag, etag);
    let now_at = new_etag.trim_matches('"');
    let message = refused.body["message"].as_str().unwrap();
    assert!(
        message.contains("edge site-1") && message.contains(&format!("version {now_at}")),
        "the refusal names the record and its newer version: {message}"
    );
    let kept = api.get(path).await.1["name"].clone();
    assert_eq!(
        kept, landed.body["name"],
        "the landed write is what is stored"
    );

    // A write without If-Match goes ahead as before; one with the new ETag too.
    let (status, _) = api
        .put(
            path,
            json!({"name": "Unconditional", "secret_file": "certs/site-1.secret"}),
        )
        .await;
    assert_eq!(status, 200);
    let stale = api
        .send_if(reqwest::Method::DELETE, path, None, Some(&new_etag))
        .await;
    assert_eq!(stale.status, 412, "{:?}", stale.body);
    let bad = api
        .send_if(reqwest::Method::PUT, path, Some(json!({})), Some("soon"))
        .await;
    assert_eq!(bad.status, 400, "{:?}", bad.body);
    assert!(bad.body["message"].as_str().unwrap().contains("If-Match"));

    // Versions survive a restart: the ETag read before is the one after.
    let before = api
        .send_if(reqwest::Method::GET, path, None, None)
        .await
        .etag
        .expect("ETag");
    cluster.master.kill();
    cluster.master.restart();
    cluster.wait_master_up().await;
    let after = api.send_if(reqwest::Method::GET, path, None, None).await;
    assert_eq!(after.etag.as_deref(), Some(before.as_str()));
    let resumed = api
        .send_if(
            reqwest::Method::PUT,
            path,
            Some(json!({"name": "After restart", "secret_file": "certs/site-1.secret"})),
            Some(&before),
        )
        .await;
    assert_eq!(resumed.status, 200, "{:?}", resumed.body);
    // A record that is gone fails the condition (412), as HTTP says.
    let gone = api
        .send_if(
            reqwest::Method::PUT,
            "/api/v1/drivers/nope",
            Some(json!({})),
            Some("*"),
        )
        .await;
    assert_eq!(gone.status, 412, "{:?}", gone.body);
}
