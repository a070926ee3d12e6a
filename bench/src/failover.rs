//! Failover: site-2's edge killed with SIGKILL (time from the kill to the master's first
//! successful exec of its module, and that minus `timeout_ms`), then, with the master in control
//! and the edge back, the master killed (time from the kill to the edge's first successful
//! exec of its own module, minus the edge's 3 s rule). Each trial leaves the demo as it
//! found it: the master is started again and the edge keeps control.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_tests::api::ApiClient;
use tether_tests::process::{Server, bin};

use crate::setup::Bench;
use crate::stats::{Series, ms};

/// site-2's failover timeout in the demo's site file.
const TIMEOUT_MS: u64 = 5000;
/// The edge's rule: after the master link drops, wait 3 s and try once more.
const EDGE_RULE_MS: u64 = 3000;
/// The pause between probes while waiting for a new controller.
const PROBE_EVERY: Duration = Duration::from_millis(1);

/// A process of the demo that the bench now starts itself: killing the demo's own child
/// the first time, then its own.
pub(crate) enum Process {
    Demo(u32),
    Own(Server),
}

impl Process {
    /// `program --config config`, started by the bench, logging to `logs`.
    pub(crate) fn own(
        program: &str,
        config: &std::path::Path,
        logs: &std::path::Path,
        trial: usize,
    ) -> Self {
        Process::Own(Server::start(
            program,
            &bin(program),
            &["--config", config.to_str().unwrap_or_default()],
            &logs.join(format!("{program}-{trial}.log")),
        ))
    }

    pub(crate) fn kill(&mut self) {
        match self {
            Process::Demo(pid) => {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            Process::Own(server) => server.kill(),
        }
    }
}

/// Probes `client` with exec of the echo module until it succeeds on `executor`; answers
/// when it did.
async fn first_exec_on(client: &ApiClient, executor: &str, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = client.exec("bench", "Echo", 1, "echo", json!([7])).await;
        if status == 200 && body["executed_by"] == executor {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "no exec on {executor} within {limit:?}"
        );
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// site-2 as the master's API shows it: online, and its owner.
async fn site_2(api: &ApiClient) -> Option<(bool, String)> {
    let (status, body): (u16, Value) = api.get("/api/v1/edges/site-2").await;
    (status == 200).then(|| {
        (
            body["online"] == true,
            body["owner"].as_str().unwrap_or("").to_string(),
        )
    })
}

async fn wait_site_2(api: &ApiClient, online: bool, owner: &str) {
    let what = format!("site-2 online={online} owner={owner}");
    tether_tests::wait_for(&what, Duration::from_secs(60), || async {
        (site_2(api).await == Some((online, owner.to_string()))).then_some(())
    })
    .await;
}

pub async fn run(bench: &Bench, trials: usize) -> anyhow::Result<()> {
    let demo = &bench.demo;
    let mut edge = Process::Demo(demo.pid("edge site-2"));
    let mut master = Process::Demo(demo.pid("master"));
    let logs = demo.dir.join("bench-logs");
    std::fs::create_dir_all(&logs)?;
    let (mut takeovers, mut edge_controls) = (Vec::new(), Vec::new());
    for trial in 0..trials {
        // The edge dies; the master takes over after timeout_ms.
        wait_site_2(&demo.api, true, "edge").await;
        edge.kill();
        let killed = Instant::now();
        let done = first_exec_on(&demo.api, "master", Duration::from_secs(60)).await;
        takeovers.push(done.duration_since(killed));
        // The edge comes back; the master keeps control (it runs the modules).
        edge = Process::own("tether-edge", &demo.dir.join("site-2.toml"), &logs, trial);
        wait_site_2(&demo.api, true, "master").await;
        // The master dies; the edge takes control after its 3 s rule.
        master.kill();
        let killed = Instant::now();
        let done = first_exec_on(&bench.edge, "edge:site-2", Duration::from_secs(60)).await;
        edge_controls.push(done.duration_since(killed));
        master = Process::own("tether-master", &demo.dir.join("master.toml"), &logs, trial);
    }
    wait_site_2(&demo.api, true, "edge").await;
    let takeovers = Series::new(takeovers);
    let edge_controls = Series::new(edge_controls);
    println!("## failover: {trials} trials each, SIGKILL\n");
    println!(
        "| trial | rule ms | p50 ms | p99 ms | max ms | p50 − rule | p99 − rule |\n|---|---|---|---|---|---|---|"
    );
    for (name, rule, series) in [
        (
            "edge killed → master's first successful exec",
            TIMEOUT_MS,
            &takeovers,
        ),
        (
            "master killed → edge's first successful exec",
            EDGE_RULE_MS,
            &edge_controls,
        ),
    ] {
        // Signed: the master counts its timeout from the edge's last heartbeat, up to a
        // heartbeat period before the kill, so a takeover may come before timeout_ms.
        let after_rule = |d: Duration| format!("{:+.1}", d.as_secs_f64() * 1e3 - rule as f64);
        println!(
            "| {name} | {rule} | {} | {} | {} | {} | {} |",
            ms(series.p50()),
            ms(series.p99()),
            ms(series.quantile(1.0)),
            after_rule(series.p50()),
            after_rule(series.p99()),
        );
    }
    println!();
    // Each process the bench started ends with it; the demo's own children were killed.
    drop((edge, master));
    Ok(())
}
