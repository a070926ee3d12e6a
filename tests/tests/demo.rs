//! `tether-master demo` end to end: it starts from a clean folder, answers an exec through
//! the master, serves a dashboard that follows a takeover live in headless Chromium, and
//! `/metrics` that changes as the test acts; SIGINT stops every process it started.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tether_tests::api::ApiClient;
use tether_tests::browser::Browser;
use tether_tests::demo::{Demo, alive, processes_using};
use tether_tests::process::{Server, bin};

fn metrics(text: &str) -> prometheus_parse::Scrape {
    let lines = text.lines().map(|line| Ok(line.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("the metrics parse as Prometheus text")
}

/// A sample's value: `name` with exactly these labels (`None`: no such sample).
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.last().map(|b| b.count).unwrap_or(0.0)
            }
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

async fn scrape(api: &ApiClient) -> prometheus_parse::Scrape {
    let (status, kind, text) = api.get_text("/metrics").await;
    assert_eq!(status, 200, "{text}");
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    for line in text.lines().filter(|l| !l.is_empty()) {
        // Every line is a HELP or TYPE comment or a sample: name{labels} value.
        let ok = line.starts_with("# HELP tether_")
            || line.starts_with("# TYPE tether_")
            || (line.starts_with("tether_")
                && line
                    .rsplit_once(' ')
                    .is_some_and(|(_, v)| v.parse::<f64>().is_ok()));
        assert!(ok, "not Prometheus text: {line:?}");
    }
    metrics(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_starts_clean_answers_through_the_master_and_stops_on_sigint() {
    let mut demo = Demo::start().await;
    let started: Vec<u32> = demo.pids.values().copied().collect();
    assert_eq!(
        started.len(),
        8,
        "four devices, a master, a pair of edge nodes and an edge: {:?}",
        demo.pids
    );
    assert!(started.iter().all(|pid| alive(*pid)));

    // A room of site-1, through the master: its holder node runs it and the projector obeys.
    let (status, answer) = demo
        .api
        .exec("room-101", "Room", 1, "present", json!([2]))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["executed_by"], "edge:site-1a");
    assert_eq!(answer["result"], 2);
    let display = tether_tests::wait_for("the display on input 2", Duration::from_secs(10), || {
        let api = demo.api.clone();
        async move {
            let (_, status) = api
                .get("/api/v1/systems/room-101/modules/Display/1/status")
                .await;
            (status["input"] == 2 && status["power"] == true).then_some(status)
        }
    })
    .await;
    assert_eq!(display["connected"], true);
    // A room of the other site too.
    let (status, answer) = demo
        .api
        .exec("store-201", "Display", 1, "power", json!([true]))
        .await;
    assert_eq!(
        (status, &answer["executed_by"]),
        (200, &json!("edge:site-2"))
    );

    // Ctrl-C: the demo stops everything it started, and exits cleanly.
    let exit = demo
        .process
        .interrupt(Duration::from_secs(30))
        .expect("the demo exits within 30 s of SIGINT");
    assert!(exit.success(), "{exit:?}\n{}", demo.process.log_text());
    let log = demo.process.log_text();
    assert!(
        log.contains("Stopped every process the demo started."),
        "{log}"
    );
    let left: Vec<u32> = started.into_iter().filter(|pid| alive(*pid)).collect();
    assert!(left.is_empty(), "still running: {left:?}");
    assert_eq!(processes_using(&demo.dir), Vec::<String>::new());
    // A clean stop: the servers shut down on their own (stdin closed), not killed.
    let master_log = std::fs::read_to_string(demo.dir.join("logs/master.log")).unwrap();
    assert!(master_log.contains("shutting down"), "{master_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_metrics_follow_a_takeover_live() {
    let demo = Demo::start().await;
    let before = scrape(&demo.api).await;
    for edge in ["site-1", "site-2"] {
        assert_eq!(
            sample(&before, "tether_link_up", &[("edge", edge)]),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &before,
                "tether_edge_owner",
                &[("edge", edge), ("owner", "edge")]
            ),
            Some(1.0)
        );
    }
    let version = sample(&before, "tether_model_version", &[]).unwrap();
    assert!(version > 0.0);
    let execs_before = sample(
        &before,
        "tether_exec_total",
        &[("side", "edge"), ("result", "ok")],
    )
    .unwrap_or(0.0);

    let mut browser = Browser::open(&demo.dashboard).await;
    let owners = r#"Object.fromEntries([...document.querySelectorAll('#edges tbody tr[data-edge]')]
        .map(tr => [tr.dataset.edge, tr.querySelector('.owner').textContent + '/' +
            tr.querySelector('.online').textContent]))"#;
    browser
        .wait_for(
            "both edges online, each its own owner",
            Duration::from_secs(20),
            owners,
            |v| *v == json!({"site-1": "edge/online", "site-2": "edge/online"}),
        )
        .await;
    // A marker that a reload would wipe.
    browser.eval("window.__tether_test_marker = 42").await;
    // The rooms and their modules, with live status from the edges.
    browser
        .wait_for(
            "room-101's projector connected",
            Duration::from_secs(20),
            "document.querySelector('[data-system=\"room-101\"] [data-module=\"Display/1\"] .connected').textContent",
            |v| v == "yes",
        )
        .await;
    // The token is not left in the address bar.
    assert_eq!(browser.eval("location.hash").await, "");

    // Run a method from the page.
    browser
        .eval(
            r#"document.getElementById('exec-system').value = 'room-102';
               document.getElementById('exec-system').onchange();
               document.getElementById('exec-module').value = 'Room/1';
               document.getElementById('exec-method').value = 'present';
               document.getElementById('exec-args').value = '[4]';
               document.querySelector('#exec button').click(); true"#,
        )
        .await;
    let result = browser
        .wait_for(
            "the method's answer",
            Duration::from_secs(10),
            "document.getElementById('exec-result').textContent",
            |v| v.as_str().is_some_and(|t| t.starts_with("result")),
        )
        .await;
    assert!(
        result
            .as_str()
            .unwrap()
            .contains("result 4, executed by edge:site-1a"),
        "{result}"
    );
    browser
        .wait_for(
            "room-102's display on input 4 in the page",
            Duration::from_secs(10),
            "document.querySelector('[data-system=\"room-102\"] [data-module=\"Display/1\"] .status').textContent",
            |v| v.as_str().is_some_and(|t| t.contains("input: 4")),
        )
        .await;

    // Kill site-2's edge: after its 5 s timeout the master owns it, on the page as it is.
    let killed_at = Instant::now();
    let edge = demo.pid("edge site-2");
    std::process::Command::new("kill")
        .args(["-9", &edge.to_string()])
        .status()
        .unwrap();
    browser
        .wait_for(
            "site-2 offline and owned by the master",
            Duration::from_secs(20),
            owners,
            |v| *v == json!({"site-1": "edge/online", "site-2": "master/offline"}),
        )
        .await;
    let shown_after = killed_at.elapsed();
    assert!(
        shown_after >= Duration::from_secs(4),
        "the master took over before the timeout: {shown_after:?}"
    );
    let timeline = browser
        .wait_for(
            "the takeover in the timeline",
            Duration::from_secs(5),
            "[...document.querySelectorAll('#timeline li')].map(li => li.dataset.edge + '>' + li.dataset.to + ' ' + li.textContent)",
            |v| {
                v.as_array().is_some_and(|items| {
                    items.iter().any(|i| i.as_str().unwrap_or("").starts_with("site-2>master"))
                })
            },
        )
        .await;
    assert!(
        timeline.to_string().contains("failover"),
        "the reason is shown: {timeline}"
    );
    assert_eq!(
        browser.eval("window.__tether_test_marker").await,
        42,
        "the page was not reloaded"
    );
    // The masters' table: the demo's one master, now running site-2's modules.
    browser
        .wait_for(
            "the master listed with the units it runs",
            Duration::from_secs(10),
            "[...document.querySelectorAll('#masters tbody tr')].map(tr => tr.dataset.master + ':' + tr.querySelector('.units').textContent)",
            |v| v.as_array().is_some_and(|rows| rows.len() == 1 && rows[0].as_str().is_some_and(|r| r.contains("site-2"))),
        )
        .await;
    // The RTT chart has points for the edge.
    let legend = browser
        .eval("document.getElementById('rtt-legend').textContent")
        .await;
    assert!(legend.to_string().contains("site-2"), "{legend}");
    if let Some(path) = std::env::var_os("TETHER_SCREENSHOT") {
        browser.screenshot(Path::new(&path)).await;
    }
    println!("the dashboard showed the takeover {shown_after:?} after the kill (timeout 5 s)");

    // The master now runs site-2's room; the metrics say so.
    let (status, answer) = demo
        .api
        .exec("store-201", "Room", 1, "present", json!([1]))
        .await;
    assert_eq!(
        (status, &answer["executed_by"]),
        (200, &json!("master")),
        "{answer}"
    );
    let after = scrape(&demo.api).await;
    assert_eq!(
        sample(&after, "tether_link_up", &[("edge", "site-2")]),
        Some(0.0)
    );
    assert_eq!(
        sample(&after, "tether_link_up", &[("edge", "site-1")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            "tether_edge_owner",
            &[("edge", "site-2"), ("owner", "master")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            "tether_takeovers_total",
            &[("edge", "site-2"), ("to", "master")]
        ),
        Some(1.0)
    );
    let epoch_before = sample(&before, "tether_edge_epoch", &[("edge", "site-2")]).unwrap();
    let epoch_after = sample(&after, "tether_edge_epoch", &[("edge", "site-2")]).unwrap();
    assert!(
        epoch_after > epoch_before,
        "{epoch_before} -> {epoch_after}"
    );
    let execs_edge = sample(
        &after,
        "tether_exec_total",
        &[("side", "edge"), ("result", "ok")],
    )
    .unwrap();
    assert!(
        execs_edge > execs_before,
        "the page's exec went through the master"
    );
    assert_eq!(
        sample(
            &after,
            "tether_exec_total",
            &[("side", "master"), ("result", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            "tether_exec_duration_seconds_count",
            &[("side", "master")]
        ),
        Some(1.0)
    );
    // Store 201 (logic, projector) runs on the master, its device connected.
    let running = sample(
        &after,
        "tether_modules_running",
        &[("location", "edge:site-2")],
    );
    assert_eq!(running, Some(2.0));
    let connected = tether_tests::wait_for(
        "site-2's device connected to the master",
        Duration::from_secs(10),
        || {
            let api = demo.api.clone();
            async move {
                let scrape = scrape(&api).await;
                let n = sample(
                    &scrape,
                    "tether_modules_connected",
                    &[("location", "edge:site-2")],
                )?;
                (n == 1.0).then_some(n)
            }
        },
    )
    .await;
    assert_eq!(connected, 1.0);
    let rtt_count = sample(
        &after,
        "tether_link_rtt_seconds_count",
        &[("edge", "site-2")],
    )
    .unwrap();
    assert!(rtt_count >= 1.0);
    // Without the token, no metrics.
    let (status, _, _) = demo.api.with_token(None).get_text("/metrics").await;
    assert_eq!(status, 401);
    // A node's own metrics: its link to the master, its modules and devices (room 101
    // and 102: logic, projectors, the meter).
    let site1a = demo.edge_api("site-1a");
    let edge_metrics = scrape(&site1a).await;
    assert_eq!(
        sample(&edge_metrics, "tether_link_up", &[("edge", "site-1")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &edge_metrics,
            "tether_modules_running",
            &[("location", "edge:site-1")]
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &edge_metrics,
            "tether_modules_connected",
            &[("location", "edge:site-1")]
        ),
        Some(3.0)
    );

    // The edge comes back (by hand here: the demo's Enter key has no terminal in a test);
    // the master keeps its rooms until the dashboard's Restore button hands them back.
    let mut edge = Server::start(
        "edge site-2",
        &bin("tether-edge"),
        &["--config", demo.dir.join("site-2.toml").to_str().unwrap()],
        &demo.dir.join("logs/site-2-again.log"),
    );
    let restore = "document.querySelector('#edges tr[data-edge=\"site-2\"] button')";
    browser
        .wait_for(
            "site-2 online, its Restore button enabled",
            Duration::from_secs(20),
            &format!("{restore}.disabled"),
            |v| *v == false,
        )
        .await;
    browser.eval(&format!("{restore}.click(); true")).await;
    browser
        .wait_for(
            "site-2 its own owner again",
            Duration::from_secs(10),
            owners,
            |v| *v == json!({"site-1": "edge/online", "site-2": "edge/online"}),
        )
        .await;
    browser
        .wait_for(
            "the restore in the timeline",
            Duration::from_secs(5),
            "[...document.querySelectorAll('#timeline li')].map(li => li.dataset.edge + '>' + li.dataset.to)",
            |v| v.as_array().is_some_and(|items| items.iter().any(|i| i == "site-2>edge")),
        )
        .await;
    let restored = scrape(&demo.api).await;
    assert_eq!(
        sample(
            &restored,
            "tether_takeovers_total",
            &[("edge", "site-2"), ("to", "edge")]
        ),
        Some(1.0)
    );
    assert_eq!(
        browser.eval("window.__tether_test_marker").await,
        42,
        "the page was not reloaded"
    );
    edge.kill();

    // Site 1 is a pair: its nodes under it, site-1a holding, site-1b standing by, both
    // reading the meter in turn. Killing the holder moves the rooms to the standby within
    // the pair timeout; the master stays out of it.
    let nodes = r#"[...document.querySelectorAll('#edges tr.node')].map(tr => tr.dataset.node + ':' +
        tr.querySelector('.online').textContent + '/' + tr.querySelector('.role').textContent)"#;
    browser
        .wait_for(
            "site-1's nodes under it",
            Duration::from_secs(10),
            nodes,
            |v| *v == json!(["site-1a:online/holder", "site-1b:online/standby"]),
        )
        .await;
    let killed_at = Instant::now();
    std::process::Command::new("kill")
        .args(["-9", &demo.pid("edge site-1a").to_string()])
        .status()
        .unwrap();
    browser
        .wait_for(
            "site-1b holding the rooms",
            Duration::from_secs(15),
            nodes,
            |v| *v == json!(["site-1a:offline/standby", "site-1b:online/holder"]),
        )
        .await;
    println!(
        "the dashboard showed the pair's takeover {:?} after the kill (pair timeout 5 s)",
        killed_at.elapsed()
    );
    let (status, answer) = demo
        .api
        .exec("room-101", "Room", 1, "present", json!([3]))
        .await;
    assert_eq!(
        (status, &answer["executed_by"]),
        (200, &json!("edge:site-1b")),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_killed_with_sigkill_leaves_no_process_behind() {
    let mut demo = Demo::start().await;
    let started: Vec<u32> = demo.pids.values().copied().collect();
    assert_eq!(started.len(), 8);
    // No chance to clean up: the children see their stdin close and stop by themselves.
    demo.process.kill();
    tether_tests::wait_for(
        "every child of the killed demo to stop",
        Duration::from_secs(15),
        || {
            let left: Vec<u32> = started.iter().copied().filter(|pid| alive(*pid)).collect();
            async move { left.is_empty().then_some(()) }
        },
    )
    .await;
    assert_eq!(processes_using(&demo.dir), Vec::<String>::new());
}

/// `demo --masters 3`: three masters on a local etcd; killing the one that runs the lobby
/// (a system of no edge) moves the lobby to another, the rooms stay on their edges, and
/// SIGINT stops every process, etcd included.
#[cfg(feature = "cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_with_three_masters_moves_the_lobby_when_its_master_is_killed() {
    let mut demo = Demo::start_with(&["--masters", "3"]).await;
    assert_eq!(
        demo.pids.len(),
        12,
        "etcd, five devices, three masters, a pair of edge nodes and an edge: {:?}",
        demo.pids
    );
    let (status, masters) = demo.api.get("/api/v1/masters").await;
    assert_eq!(status, 200, "{masters}");
    assert_eq!(masters.as_array().map(Vec::len), Some(3), "{masters}");

    // The lobby, through the first master: whichever master runs it answers.
    let (status, answer) = demo
        .api
        .exec("lobby", "Room", 1, "present", json!([2]))
        .await;
    assert_eq!(status, 200, "{answer}");
    let runner = answer["executed_by"]
        .as_str()
        .and_then(|by| by.strip_prefix("master:"))
        .expect("a master runs the lobby")
        .to_string();

    // SIGKILL it: a survivor runs the lobby once the lease (3 s) is gone.
    let pid = demo.pid(&format!("master {runner}"));
    // SAFETY: kill(2) on a process the demo started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let survivor = ["m1", "m2", "m3"]
        .into_iter()
        .find(|m| *m != runner)
        .unwrap();
    let api = demo.master_api(survivor);
    let moved_to = tether_tests::wait_for(
        "a survivor to run the lobby",
        Duration::from_secs(20),
        || async {
            let (status, answer) = api.exec("lobby", "Room", 1, "present", json!([3])).await;
            let by = answer["executed_by"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (status == 200 && by != format!("master:{runner}")).then_some(by)
        },
    )
    .await;
    assert!(moved_to.starts_with("master:m"), "{moved_to}");
    // The rooms never left their edges.
    let (status, answer) = demo
        .edge_api("site-1a")
        .exec("room-101", "Room", 1, "present", json!([4]))
        .await;
    assert_eq!(
        (status, &answer["executed_by"]),
        (200, &json!("edge:site-1a"))
    );

    let exit = demo
        .process
        .interrupt(Duration::from_secs(30))
        .expect("the demo exits within 30 s of SIGINT");
    assert!(exit.success(), "{exit:?}\n{}", demo.process.log_text());
    assert_eq!(processes_using(&demo.dir), Vec::<String>::new());
}
