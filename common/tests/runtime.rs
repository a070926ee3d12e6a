//! The driver runtime in process, against a TCP "device" the test plays: framing,
//! reconnect after the device drops the connection, the per-module queue and concurrency,
//! and a restart when the model changes the module's port.

use std::sync::Arc;
use std::time::Duration;
use tether_common::protocol::ModuleRef;

use serde_json::json;
use tether_common::code::{Code, RepoCode};
use tether_common::model::Model;
use tether_common::protocol::EntityKind;
use tether_common::runtime::{ExecError, Executor, Origin, Runtime, ScriptLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SCRIPT: &str = r#"
fn received(frame) { status("last", frame); status("count", (status("count") ?? 0) + 1); }
fn connected() { status("connections", (status("connections") ?? 0) + 1); }
fn hello() { send("HELLO\n"); true }
fn slow(ms) { let started = timestamp(); while started.elapsed * 1000.0 < ms { } ms }
"#;

fn model(port: u16, framing: &str, concurrency: u32) -> Arc<Model> {
    let mut model = Model::default();
    model
        .set_json(
            EntityKind::Repository,
            "r",
            Some(r#"{"id":"r","path":"/x"}"#),
        )
        .unwrap();
    let driver = json!({
        "id": "d", "repository": "r", "file": "d.rhai",
        "concurrency": concurrency, "timeout_ms": 2000,
    });
    let mut driver = driver.as_object().unwrap().clone();
    let framing: serde_json::Value = serde_json::from_str(framing).unwrap();
    driver.extend(framing.as_object().unwrap().clone());
    model
        .set_json(
            EntityKind::Driver,
            "d",
            Some(&serde_json::Value::Object(driver).to_string()),
        )
        .unwrap();
    let module =
        json!({"id": "m", "driver": "d", "name": "Dev", "host": "127.0.0.1", "port": port});
    model
        .set_json(EntityKind::Module, "m", Some(&module.to_string()))
        .unwrap();
    model
        .set_json(
            EntityKind::System,
            "s",
            Some(r#"{"id":"s","modules":["m"]}"#),
        )
        .unwrap();
    Arc::new(model)
}

/// A master runtime whose repository `r` holds `script` as `d.rhai`.
fn new_runtime(limits: ScriptLimits, script: &str) -> Runtime {
    let runtime = Runtime::new(Executor::Master(None), limits);
    set_script(&runtime, script);
    runtime
}

fn set_script(runtime: &Runtime, script: &str) {
    let commit = hex::encode(tether_common::code::content_hash(script.as_bytes()));
    let repo = RepoCode::from_texts(&commit, &[("d.rhai", script)]);
    runtime.set_code(Arc::new(Code::default().with("r", repo)));
}

async fn status_of(runtime: &Runtime, key: &str, want: serde_json::Value) {
    let shown = want.to_string();
    status_where(runtime, key, &shown, |value| value == &want).await
}

/// Waits (up to 5 s) until the module's status `key` passes `test`; `shown` names what is
/// waited for in the failure.
async fn status_where(
    runtime: &Runtime,
    key: &str,
    shown: &str,
    test: impl Fn(&serde_json::Value) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(status) = runtime
                .status_from(&ModuleRef::new("s", "Dev", 1), &Origin::local())
                .await
                && status.get(key).is_some_and(&test)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("status {key} never became {shown}"));
}

async fn accept(listener: &TcpListener) -> TcpStream {
    tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("the module connects")
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_by_delimiter_and_reconnects_after_the_device_drops_it() {
    let device = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = device.local_addr().unwrap().port();
    let runtime = new_runtime(ScriptLimits::default(), SCRIPT);
    runtime
        .reconcile(model(port, r#"{"delimiter": "\r\n"}"#, 1), |_| true)
        .await;
    let mut session = accept(&device).await;
    session.write_all(b"ONE\r\nTW").await.unwrap();
    status_of(&runtime, "last", json!("ONE")).await;
    session.write_all(b"O\r\n").await.unwrap();
    status_of(&runtime, "last", json!("TWO")).await;

    let (value, by) = runtime.exec("s", "Dev", 1, "hello", vec![]).await.unwrap();
    assert_eq!((value, by.as_str()), (json!(true), "master"));
    let mut buf = [0u8; 6];
    session.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HELLO\n");

    drop(session);
    let _again = accept(&device).await;
    status_of(&runtime, "connections", json!(2)).await;
    runtime.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_length_frames_and_a_port_change_restarts_the_module() {
    let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let runtime = new_runtime(ScriptLimits::default(), SCRIPT);
    let port = first.local_addr().unwrap().port();
    runtime
        .reconcile(model(port, r#"{"frame_length": 3}"#, 1), |_| true)
        .await;
    let mut session = accept(&first).await;
    session.write_all(b"abcdefg").await.unwrap();
    status_of(&runtime, "count", json!(2)).await;
    status_of(&runtime, "last", json!("def")).await;

    // The same model again: nothing restarts.
    runtime
        .reconcile(model(port, r#"{"frame_length": 3}"#, 1), |_| true)
        .await;
    // A new port: the old session is closed before the new one opens.
    let new_port = second.local_addr().unwrap().port();
    runtime
        .reconcile(model(new_port, r#"{"frame_length": 3}"#, 1), |_| true)
        .await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), session.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the old session was closed: {closed:?}"
    );
    let _new = accept(&second).await;
    status_of(&runtime, "connections", json!(1)).await;
    runtime.stop_all().await;
    assert!(matches!(
        runtime.exec("s", "Dev", 1, "hello", vec![]).await,
        Err(ExecError::Unavailable(_))
    ));
}

/// A faulty driver: `on_load` calls its own module, whose queue does not run until
/// `on_load` returns, so loading hangs for the driver's timeout (2 s here).
const STUCK: &str = r#"
fn on_load() { try { system("Dev", 1).exec("ping", []); } catch {} }
fn ping() { 1 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_restarted_twice_while_stuck_has_stopped_only_once_its_first_instance_has() {
    let runtime = new_runtime(ScriptLimits::default(), STUCK);
    let began = std::time::Instant::now();
    // The first instance hangs in `on_load` until about 2.2 s from now.
    runtime.reconcile(model(1, "{}", 1), |_| true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Two restarts (new ports): the second instance waits for the first to stop, and is
    // itself stopped while it waits.
    runtime.reconcile(model(2, "{}", 1), |_| true).await;
    runtime.reconcile(model(3, "{}", 1), |_| true).await;
    // The module goes: it has stopped only when its first instance has.
    runtime.reconcile(model(3, "{}", 1), |_| false).await;
    let stopped = began.elapsed();
    assert!(
        stopped >= Duration::from_millis(1500),
        "answered after {stopped:?}, while the first instance was still loading"
    );
}

/// A runtime whose scripts may busy-wait (many operations), for timing tests.
fn patient() -> Runtime {
    let limits = ScriptLimits {
        max_operations: 10_000_000_000,
        ..ScriptLimits::default()
    };
    new_runtime(limits, SCRIPT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_their_turn_and_a_full_queue_says_busy() {
    let device = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = device.local_addr().unwrap().port();
    let runtime = patient();
    runtime.reconcile(model(port, "{}", 1), |_| true).await;
    // Concurrency 1: three 100 ms calls take at least 300 ms (a lower bound, so a busy
    // machine cannot make it fail).
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let runtime = runtime.clone();
            tokio::spawn(async move { runtime.exec("s", "Dev", 1, "slow", vec![json!(100)]).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().0, json!(100));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    // 70 calls at once against a queue of 64: the overflow is told the module is busy at
    // once; those that wait past the 2 s timeout are told so; none hangs.
    let calls: Vec<_> = (0..70)
        .map(|_| {
            let runtime = runtime.clone();
            tokio::spawn(async move { runtime.exec("s", "Dev", 1, "slow", vec![json!(300)]).await })
        })
        .collect();
    let mut busy = 0;
    let mut timed_out = 0;
    let mut done = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => done += 1,
            Err(ExecError::Busy(_)) => busy += 1,
            Err(ExecError::Timeout(_)) => timed_out += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(busy >= 1, "busy {busy}, timed out {timed_out}, done {done}");
    assert!(
        done >= 1 && timed_out >= 1,
        "busy {busy}, timed out {timed_out}, done {done}"
    );
    runtime.stop_all().await;
}

const V1: &str = r#"
fn connected() { status("connections", (status("connections") ?? 0) + 1); }
fn on_load() { schedule_every(20, "tick"); }
fn tick() { status("ticks", (status("ticks") ?? 0) + 1); }
fn version() { 1 }
"#;
const V2: &str = r#"
fn connected() { status("connections", (status("connections") ?? 0) + 1); }
fn on_load() { status("loaded", 2); }
fn version() { 2 }
"#;
const BROKEN: &str = "fn version( { 3 }";
const THROWS: &str = r#"fn on_load() { throw "no device map" } fn version() { 4 }"#;

async fn version(runtime: &Runtime) -> serde_json::Value {
    runtime
        .exec("s", "Dev", 1, "version", vec![])
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_script_reloads_in_place_and_a_failing_one_is_refused() {
    let device = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = device.local_addr().unwrap().port();
    let runtime = new_runtime(ScriptLimits::default(), V1);
    let model = model(port, "{}", 1);
    assert!(runtime.reconcile(model.clone(), |_| true).await.is_empty());
    let _session = accept(&device).await;
    status_of(&runtime, "connections", json!(1)).await;
    assert_eq!(version(&runtime).await, json!(1));
    // Ticking (every 20 ms, so a stalled poll can miss any one count).
    status_where(&runtime, "ticks", "at least 2", |ticks| {
        ticks.as_u64().is_some_and(|n| n >= 2)
    })
    .await;

    // The new version runs in the same module: same session, same status map, and the
    // old version's schedule has ended.
    set_script(&runtime, V2);
    assert!(runtime.reconcile(model.clone(), |_| true).await.is_empty());
    assert_eq!(version(&runtime).await, json!(2));
    status_of(&runtime, "loaded", json!(2)).await;
    let at = ModuleRef::new("s", "Dev", 1);
    let ticks = runtime.status_from(&at, &Origin::local()).await.unwrap()["ticks"].clone();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let status = runtime.status_from(&at, &Origin::local()).await.unwrap();
    assert_eq!(status["ticks"], ticks, "the old schedule ended");
    assert_eq!(status["connections"], json!(1), "no reconnect");
    let reconnected = tokio::time::timeout(Duration::from_millis(300), device.accept()).await;
    assert!(reconnected.is_err(), "the device saw no new connection");

    // A version that does not compile, and one whose on_load throws: refused, the
    // running version keeps answering.
    for (bad, why) in [(BROKEN, "does not compile"), (THROWS, "no device map")] {
        set_script(&runtime, bad);
        let refused = runtime.reconcile(model.clone(), |_| true).await;
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(
            (refused[0].module.as_str(), refused[0].driver.as_str()),
            ("m", "d")
        );
        assert!(refused[0].error.contains(why), "{}", refused[0].error);
        assert_eq!(version(&runtime).await, json!(2));
        // A refused version is not tried again on the next reconcile.
        assert!(runtime.reconcile(model.clone(), |_| true).await.is_empty());
    }
    let lines: Vec<String> = runtime
        .debug_from(&at, &Origin::local())
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.line)
        .collect();
    for expected in [
        "reloading: new driver code",
        "reloaded: the new code runs",
        "reload refused, the old code keeps running",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(expected)),
            "{expected:?} not in {lines:?}"
        );
    }
    runtime.stop_all().await;
}

#[tokio::test]
async fn a_module_whose_code_has_not_arrived_says_it_waits() {
    // The model names the module and its driver; the driver's repository has no code here
    // yet (an edge still fetching it).
    let runtime = Runtime::new(Executor::Edge("site-1".into()), ScriptLimits::default());
    runtime.reconcile(model(9, "{}", 1), |_| true).await;
    match runtime.exec("s", "Dev", 1, "hello", vec![]).await {
        Err(ExecError::Waiting(message)) => {
            assert!(message.contains("waits for its driver code"), "{message}")
        }
        other => panic!("expected a wait, got {other:?}"),
    }
    // Once the code is there, the module runs.
    set_script(&runtime, "fn hello() { true }");
    runtime.reconcile(model(9, "{}", 1), |_| true).await;
    assert!(runtime.exec("s", "Dev", 1, "hello", vec![]).await.is_ok());
    runtime.stop_all().await;
}

#[tokio::test]
async fn the_fence_refuses_an_older_epoch_and_the_same_epoch_from_another_holder() {
    use tether_common::control::{Claim, ControlState, Epoch, Owner};
    let mut model = (*model(9, "{}", 1)).clone();
    model
        .set_json(EntityKind::Edge, "site-1", Some(r#"{"id":"site-1"}"#))
        .unwrap();
    let module = json!({"id": "m", "driver": "d", "name": "Dev", "host": "127.0.0.1",
        "port": 9, "edge": "site-1"});
    model
        .set_json(EntityKind::Module, "m", Some(&module.to_string()))
        .unwrap();
    let runtime = Runtime::new(Executor::Edge("site-1".into()), ScriptLimits::default());
    runtime.reconcile(Arc::new(model), |_| false).await;
    let held = ControlState {
        owner: Owner::Edge,
        epoch: Epoch(5),
    };
    runtime.set_grant("site-1", held);
    let at = ModuleRef::new("s", "Dev", 1);
    let claim = |epoch, holder| Claim {
        epoch: Some(Epoch(epoch)),
        holder,
    };
    assert_eq!(runtime.fence(&at, Claim::default()).unwrap(), Some(held));
    assert!(runtime.fence(&at, claim(5, Some(Owner::Edge))).is_ok());
    assert!(
        runtime.fence(&at, claim(5, None)).is_ok(),
        "a client's epoch"
    );
    assert!(runtime.fence(&at, claim(6, Some(Owner::Master))).is_ok());
    for (epoch, holder) in [(4, None), (4, Some(Owner::Edge)), (5, Some(Owner::Master))] {
        match runtime.fence(&at, claim(epoch, holder)) {
            Err(ExecError::StaleEpoch(message)) => {
                assert!(message.contains("held by the edge at epoch 5"), "{message}")
            }
            other => panic!("{epoch} {holder:?}: expected a stale epoch, got {other:?}"),
        }
    }
}

#[test]
fn an_executor_reads_as_clients_see_it() {
    assert_eq!(Executor::Edge("site-1".into()).to_string(), "edge:site-1");
    assert_eq!(Executor::Master(None).to_string(), "master");
    assert_eq!(Executor::Master(Some("m2".into())).to_string(), "master:m2");
}

/// The side that runs a module streams its status once when the link comes up, then only
/// changes: a value that arrives before the standby knows the module (its model or its
/// compile still on the way) must still be there when the standby takes over.
#[tokio::test]
async fn a_warm_standby_keeps_status_that_arrives_before_it_knows_the_module() {
    let runtime = new_runtime(ScriptLimits::default(), "fn hello() { true }");
    // Before any model: kept, early.
    assert!(runtime.standby_status("m", "power", json!("on")));
    assert!(runtime.warm_modules().is_empty());
    // Once kept warm, the module holds it.
    let model = model(9, "{}", 1);
    runtime.keep_warm(&model, |_| true).await;
    assert_eq!(runtime.warm_modules(), vec![("m".to_string(), 1)]);
    // And a takeover starts from it.
    runtime.reconcile(model.clone(), |_| true).await;
    status_of(&runtime, "power", json!("on")).await;
    runtime.stop_all().await;

    // A takeover before the standby ever kept the module warm starts from it too.
    let runtime = new_runtime(ScriptLimits::default(), "fn hello() { true }");
    assert!(runtime.standby_status("m", "input", json!("hdmi2")));
    runtime.reconcile(model.clone(), |_| true).await;
    status_of(&runtime, "input", json!("hdmi2")).await;
    runtime.stop_all().await;

    // A module the model knows but this side does not keep warm: its early status goes.
    let runtime = new_runtime(ScriptLimits::default(), "fn hello() { true }");
    assert!(runtime.standby_status("m", "power", json!("on")));
    runtime.keep_warm(&model, |_| false).await;
    runtime.keep_warm(&model, |_| true).await;
    assert_eq!(runtime.warm_modules(), vec![("m".to_string(), 0)]);
}

/// The status kept for modules not known yet is bounded in modules and in bytes: a hostile
/// peer cannot fill memory with made-up module ids.
#[test]
fn status_kept_for_modules_not_known_yet_is_bounded() {
    let runtime = Runtime::new(Executor::Edge("site-1".into()), ScriptLimits::default());
    for i in 0..256 {
        assert!(runtime.standby_status(&format!("made-up-{i}"), "k", json!(1)));
    }
    assert!(!runtime.standby_status("one-more", "k", json!(1)));
    // A module already held takes more keys.
    assert!(runtime.standby_status("made-up-0", "k2", json!(2)));

    let runtime = Runtime::new(Executor::Edge("site-1".into()), ScriptLimits::default());
    let big = json!("x".repeat(16 * 1024 - 2));
    let mut kept = 0;
    for i in 0..200 {
        if runtime.standby_status(&format!("m{i}"), "k", big.clone()) {
            kept += 1;
        }
    }
    // 1 MiB at most, all modules together: 63 values of 16 KiB and their ids.
    assert_eq!(kept, 63);
    // Replacing a value does not count it twice.
    assert!(runtime.standby_status("m0", "k", big.clone()));
}
