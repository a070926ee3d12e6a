//! What a driver script can make a server hold: its status map and its debug log stay
//! within the per-module caps (each overrun is a script error naming the cap), and all of
//! it is released when the module is deleted. A counting global allocator measures the
//! bytes live in this process, so "released" is measured, not assumed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tether_common::code::{Code, RepoCode};
use tether_common::model::Model;
use tether_common::protocol::{EntityKind, ModuleRef};
use tether_common::runtime::{ExecError, Executor, Origin, Runtime, ScriptLimits};

struct Live;

/// Bytes allocated and not yet freed, by every thread.
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Live {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Live = Live;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// A script that grows whatever it is asked to.
const GREEDY: &str = r#"
fn text(n) { let s = ""; s.pad(n, 'x'); s }
fn fill(prefix, count, size) { for i in 0..count { status(prefix + i, text(size)); } count }
fn one(key, size) { status(key, text(size)); }
fn shout(size) { log(text(size)); }
fn chatter(count) { for i in 0..count { log(text(3000)); } }
"#;

fn model(with_module: bool) -> Arc<Model> {
    let mut model = Model::default();
    let records = [
        (EntityKind::Repository, "r", r#"{"id":"r","path":"/x"}"#),
        (
            EntityKind::Driver,
            "d",
            r#"{"id":"d","repository":"r","file":"d.rhai","transport":"none"}"#,
        ),
        (
            EntityKind::Module,
            "m",
            r#"{"id":"m","driver":"d","name":"Greedy"}"#,
        ),
        (EntityKind::System, "s", r#"{"id":"s","modules":["m"]}"#),
    ];
    for (kind, id, json) in records {
        if kind == EntityKind::Module && !with_module {
            continue;
        }
        model.set_json(kind, id, Some(json)).unwrap();
    }
    Arc::new(model)
}

async fn call(runtime: &Runtime, method: &str, args: serde_json::Value) -> Result<(), String> {
    let args = args.as_array().cloned().unwrap_or_default();
    match runtime.exec("s", "Greedy", 1, method, args).await {
        Ok(_) => Ok(()),
        Err(ExecError::Script(message)) => Err(message),
        Err(other) => panic!("{method}: not a script error: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_script_meets_its_caps_and_its_memory_goes_with_it() {
    let runtime = Runtime::new(Executor::Master(None), ScriptLimits::default());
    let repo = RepoCode::from_texts("c1", &[("d.rhai", GREEDY)]);
    runtime.set_code(Arc::new(Code::default().with("r", repo)));
    runtime.reconcile(model(true), |_| true).await;
    // The module runs; its baseline.
    tokio::time::timeout(Duration::from_secs(5), async {
        while runtime
            .exec("s", "Greedy", 1, "text", vec![json!(1)])
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the module runs");
    // A subscriber to status changes, as an edge's stream to the master is: the channel
    // keeps recent changes for it.
    let _streaming = runtime.subscribe_status();
    let baseline = live();

    // Each cap, as the script meets it.
    let err = call(&runtime, "fill", json!(["big", 200, 8000]))
        .await
        .unwrap_err();
    assert!(err.contains("at most 1048576"), "{err}");
    let err = call(&runtime, "fill", json!(["small", 300, 10]))
        .await
        .unwrap_err();
    assert!(err.contains("256 status keys, its limit"), "{err}");
    let err = call(&runtime, "one", json!(["big1", 20_000]))
        .await
        .unwrap_err();
    assert!(err.contains("at most 16384"), "{err}");
    let err = call(&runtime, "one", json!(["k".repeat(300), 1]))
        .await
        .unwrap_err();
    assert!(err.contains("at most 256"), "{err}");
    let err = call(&runtime, "shout", json!([5000])).await.unwrap_err();
    assert!(err.contains("at most 4096"), "{err}");
    // Lines within the cap: the ring keeps its byte budget, not every line.
    call(&runtime, "chatter", json!([400])).await.unwrap();
    let at = ModuleRef::new("s", "Greedy", 1);
    let lines = runtime.debug_from(&at, &Origin::local()).await.unwrap();
    let held: usize = lines.iter().map(|l| l.line.len()).sum();
    assert!(held <= 256 * 1024, "{held} bytes of debug lines held");

    // The module holds what the caps allow (about a MiB of status, a quarter of debug).
    let grown = live() - baseline;
    eprintln!("the greedy module holds {} KiB", grown / 1024);
    assert!(grown < 3 << 20, "the module holds {grown} bytes");
    assert!(grown > 1 << 20, "the status map was filled: {grown} bytes");

    // Deleted: its memory is released (the status channel keeps no values).
    runtime.reconcile(model(false), |_| true).await;
    assert!(runtime.running().is_empty());
    // Its tasks end soon after, not at once: wait (up to 5 s) for what they held to go.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut left = live() - baseline;
    while left >= 256 * 1024 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = live() - baseline;
    }
    eprintln!("after the module is deleted: {} KiB left", left / 1024);
    assert!(
        left < 256 * 1024,
        "{left} bytes still held after the module went"
    );
}
