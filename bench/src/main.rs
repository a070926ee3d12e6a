//! `tether-bench`: Tether measured as its users would judge it, each scenario against a
//! reference measured in the same run, printing p50, p99 and the ratio as Markdown rows
//! (BENCHMARKS.md holds the results and the exact commands). Run with release binaries:
//! `cargo build --release -p tether-master -p tether-edge -p tether-bench` then
//! `target/release/tether-bench all`.
#![forbid(unsafe_code)]

mod bare;
mod failover;
mod fanout;
mod haproxy;
#[cfg(feature = "cluster")]
mod masters;
mod pair;
mod setup;
mod stats;
mod swarm;

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::json;
use tether_tests::api::ApiClient;

use setup::Bench;
use stats::{Series, ms, ratio};

#[derive(Parser)]
#[command(name = "tether-bench", about = "Tether's benchmarks")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Exec of a logic module's method: on the edge (the reference), through the master,
    /// and through an HAProxy TLS hop in front of the edge (the peer).
    Latency {
        /// Calls per path (interleaved, after 200 warm-up calls each).
        #[arg(long, default_value_t = 5000)]
        requests: usize,
    },
    /// Exec per second through the master at concurrency 1, 16, 64 and 256, against the
    /// edge directly at the same concurrency.
    Throughput {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// SIGKILL of site-2's edge (time to the master's first successful exec, minus
    /// timeout_ms) and of the master (time to the edge's, minus its 3 s rule).
    Failover {
        /// Trials of each.
        #[arg(long, default_value_t = 20)]
        trials: usize,
    },
    /// N edges simulated in this process: the master's memory per link, one model change
    /// reaching every edge, and a storm (the master killed and restarted under them).
    Fanout {
        /// Simulated edges; repeat for several runs.
        #[arg(long = "edges", default_values_t = [1000, 10000])]
        edges: Vec<usize>,
        /// Model changes measured per run.
        #[arg(long, default_value_t = 10)]
        changes: usize,
        /// Masters the edges spread over (more than one: a cluster on a local etcd, with
        /// `--features cluster`; no storm then).
        #[arg(long, default_value_t = 1)]
        masters: usize,
    },
    /// SIGKILL of the master running a system of no edge, in a cluster of three on a
    /// local etcd: time to a survivor's first exec, beside etcd's lease expiry (built with
    /// `--features cluster`).
    #[cfg(feature = "cluster")]
    Masters {
        /// Trials.
        #[arg(long, default_value_t = 20)]
        trials: usize,
    },
    /// Exec through a master of a cluster that does not run the module (one extra hop to
    /// the master that does), against the master that runs it (built with
    /// `--features cluster`).
    #[cfg(feature = "cluster")]
    Hop {
        /// Calls per path (interleaved, after 200 warm-up calls each).
        #[arg(long, default_value_t = 5000)]
        requests: usize,
        /// Seconds per throughput measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Site pairs (the demo's site-1): SIGKILL of the holder node (time to the standby's
    /// first successful exec, minus pair_timeout_ms), and the collector array's reads of
    /// the meter with one and two nodes, and the longest gap across a node's SIGKILL.
    Pair {
        /// Takeover trials.
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Seconds of reads per array size.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Every scenario above, with its defaults.
    All,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tether_common::link::tls::install_crypto_provider();
    println!(
        "# tether-bench on {} CPUs\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    // Interrupted, the scenario's future is dropped, and with it what it started (the
    // demo, HAProxy, etcd): by returning here, not by dying with the signal.
    tokio::select! {
        result = run(cli.scenario) => result,
        signal = interrupted() => anyhow::bail!("interrupted by {signal}; what the scenario started is stopped"),
    }
}

/// Resolves with the signal's name on SIGINT or SIGTERM.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

async fn run(scenario: Scenario) -> anyhow::Result<()> {
    match scenario {
        Scenario::Latency { requests } => latency(&Bench::start().await?, requests).await?,
        Scenario::Throughput { seconds } => throughput(&Bench::start().await?, seconds).await?,
        Scenario::Failover { trials } => failover::run(&Bench::start().await?, trials).await?,
        Scenario::Pair { trials, seconds } => {
            pair::run(&Bench::start().await?, trials, seconds).await?
        }
        #[cfg(feature = "cluster")]
        Scenario::Masters { trials } => masters::run(trials).await?,
        #[cfg(feature = "cluster")]
        Scenario::Hop { requests, seconds } => masters::hop(requests, seconds).await?,
        Scenario::Fanout {
            edges,
            changes,
            masters,
        } => {
            for n in edges {
                fanout::run(n, changes, masters).await?;
            }
        }
        Scenario::All => {
            let bench = Bench::start().await?;
            latency(&bench, 5000).await?;
            throughput(&bench, 5).await?;
            failover::run(&bench, 20).await?;
            pair::run(&bench, 20, 60).await?;
            drop(bench);
            for n in [1000, 10000] {
                fanout::run(n, 10, 1).await?;
            }
        }
    }
    Ok(())
}

/// One exec of the echo module of system `bench`; its round trip, or why it failed.
async fn echo(client: &ApiClient) -> Result<Duration, String> {
    echo_in(client, "bench").await
}

/// One exec of the echo module of `system`; its round trip, or why it failed.
pub(crate) async fn echo_in(client: &ApiClient, system: &str) -> Result<Duration, String> {
    let started = Instant::now();
    let (status, body) = client.exec(system, "Echo", 1, "echo", json!([7])).await;
    if status == 200 && body["result"] == 7 {
        Ok(started.elapsed())
    } else if status == 0 {
        Err("unreachable".into())
    } else {
        Err(format!(
            "{status} {}",
            body["error"].as_str().unwrap_or("?")
        ))
    }
}

/// The references beside Tether's paths: HAProxy in front of the edge (the peer of the
/// master's hop), and the bare HTTPS endpoint (the floor of any exec), each with a client
/// like the edge's.
struct References {
    _haproxy: haproxy::HaProxy,
    via_haproxy: ApiClient,
    _bare: bare::Bare,
    bare: ApiClient,
}

/// The port of site-2's API, where the proxies in front of it forward.
fn edge_port(bench: &Bench) -> anyhow::Result<u16> {
    bench
        .edge
        .base()
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .ok_or_else(|| anyhow::anyhow!("no port in {}", bench.edge.base()))
}

/// Waits until a reference path answers the echo.
async fn answering(client: &ApiClient) {
    tether_tests::wait_for("a reference to answer", Duration::from_secs(20), || {
        let client = client.clone();
        async move { echo(&client).await.ok() }
    })
    .await;
}

async fn references(bench: &Bench) -> anyhow::Result<References> {
    let edge_port = edge_port(bench)?;
    let proxy = haproxy::start(&bench.demo.dir, edge_port)?;
    let via_haproxy = bench.edge.at(&format!("https://localhost:{}", proxy.port));
    let floor = bare::start(&bench.demo.dir.join("certs")).await?;
    let bare = bench.edge.at(&format!("https://localhost:{}", floor.port));
    for client in [&via_haproxy, &bare] {
        answering(client).await;
    }
    Ok(References {
        _haproxy: proxy,
        via_haproxy,
        _bare: floor,
        bare,
    })
}

async fn latency(bench: &Bench, requests: usize) -> anyhow::Result<()> {
    let refs = references(bench).await?;
    let relay = haproxy::start_relay(&bench.demo.dir, edge_port(bench)?)?;
    let via_relay = bench.edge.at(&format!("https://127.0.0.1:{}", relay.port));
    answering(&via_relay).await;
    let paths = [
        ("edge, direct (reference)", &bench.edge),
        ("through the master", &bench.demo.api),
        ("through HAProxy (peer)", &refs.via_haproxy),
        ("bare HTTPS endpoint (floor)", &refs.bare),
        (
            "through HAProxy as a TCP relay (a hop's least cost)",
            &via_relay,
        ),
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(requests); paths.len()];
    for round in 0..requests + 200 {
        // Interleaved, so that whatever else the machine does falls on every path alike.
        for (i, (_, client)) in paths.iter().enumerate() {
            let took = echo(client).await.map_err(|e| anyhow::anyhow!(e))?;
            if round >= 200 {
                samples[i].push(took);
            }
        }
    }
    let series: Vec<Series> = samples.into_iter().map(Series::new).collect();
    let reference = &series[0];
    let floor = &series[3];
    println!("## latency: exec of a logic module's method, {requests} calls per path\n");
    println!(
        "| path | p50 ms | p99 ms | p50 ratio | p99 ratio | p50 / floor |\n|---|---|---|---|---|---|"
    );
    for ((name, _), series) in paths.iter().zip(&series) {
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            ms(series.p50()),
            ms(series.p99()),
            ratio(series.p50(), reference.p50()),
            ratio(series.p99(), reference.p99()),
            ratio(series.p50(), floor.p50()),
        );
    }
    let hop = |s: &Series| s.p50().as_secs_f64() * 1e6 - reference.p50().as_secs_f64() * 1e6;
    println!(
        "\nThe hop's cost at p50 (over the edge's own answer): the master {:+.0} µs, HAProxy {:+.0} µs, a TCP relay {:+.0} µs.\n",
        hop(&series[1]),
        hop(&series[2]),
        hop(&series[4]),
    );
    Ok(())
}

/// Connections a load opens at once while it ramps up: fewer than the API admits
/// unauthenticated from one address (`limits.pending_per_address`, 16), so that a burst of
/// new connections is not counted as failed calls.
const RAMP_AT_ONCE: usize = 8;

/// Runs `concurrency` callers of system `system`'s echo for `seconds`; answers the calls'
/// round trips, and the failures by answer (status and error code). The callers start a
/// few at a time, each calling from then on (so its connection stays busy and the next
/// callers open their own); the window measured opens once every caller has had an answer.
pub(crate) async fn load(
    client: &ApiClient,
    system: &'static str,
    concurrency: usize,
    seconds: u64,
) -> (Vec<Duration>, std::collections::BTreeMap<String, usize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let ramp = Arc::new(tokio::sync::Semaphore::new(RAMP_AT_ONCE));
    let answered = Arc::new(AtomicUsize::new(0));
    let (open, window) = tokio::sync::watch::channel::<Option<Instant>>(None);
    let length = Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let (ramp, answered, window) = (ramp.clone(), answered.clone(), window.clone());
        tasks.push(tokio::spawn(async move {
            {
                let _turn = ramp.acquire().await;
                let _ = echo_in(&client, system).await;
            }
            answered.fetch_add(1, Ordering::SeqCst);
            let mut took = Vec::new();
            let mut failed = std::collections::BTreeMap::<String, usize>::new();
            loop {
                let opened = *window.borrow();
                if opened.is_some_and(|at| at.elapsed() >= length) {
                    break;
                }
                let answer = echo_in(&client, system).await;
                // Counted only when made inside the window.
                if opened.is_none() {
                    continue;
                }
                match answer {
                    Ok(d) => took.push(d),
                    Err(why) => *failed.entry(why).or_default() += 1,
                }
            }
            (took, failed)
        }));
    }
    while answered.load(Ordering::SeqCst) < concurrency {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    open.send_replace(Some(Instant::now()));
    let (mut all, mut failures) = (Vec::new(), std::collections::BTreeMap::new());
    for task in tasks {
        if let Ok((took, failed)) = task.await {
            all.extend(took);
            for (why, n) in failed {
                *failures.entry(why).or_default() += n;
            }
        }
    }
    (all, failures)
}

async fn throughput(bench: &Bench, seconds: u64) -> anyhow::Result<()> {
    let refs = references(bench).await?;
    println!("## throughput: exec per second, {seconds} s per row\n");
    println!(
        "| concurrency | path | exec/s | p50 ms | p99 ms | failed | exec/s ratio |\n|---|---|---|---|---|---|---|"
    );
    for concurrency in [1, 16, 64, 256] {
        let mut reference_rate = 0.0;
        for (name, client) in [
            ("edge, direct (reference)", &bench.edge),
            ("through the master", &bench.demo.api),
            ("through HAProxy (peer)", &refs.via_haproxy),
            ("bare HTTPS endpoint (floor)", &refs.bare),
        ] {
            let (took, failed) = load(client, "bench", concurrency, seconds).await;
            let rate = took.len() as f64 / seconds as f64;
            if reference_rate == 0.0 {
                reference_rate = rate;
            }
            let series = Series::new(took);
            let failed: Vec<String> = failed
                .iter()
                .map(|(why, n)| format!("{n} × {why}"))
                .collect();
            let failed = if failed.is_empty() {
                "0".to_string()
            } else {
                failed.join(", ")
            };
            println!(
                "| {concurrency} | {name} | {rate:.0} | {} | {} | {failed} | {:.2} |",
                ms(series.p50()),
                ms(series.p99()),
                rate / reference_rate.max(f64::MIN_POSITIVE),
            );
        }
    }
    println!();
    Ok(())
}
