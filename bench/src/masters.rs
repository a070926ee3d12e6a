//! Master failover in a cluster (`--features cluster`): three masters on a local etcd, a
//! hall of no edge whose echo module runs on one of them. The master running it is killed
//! with SIGKILL; measured from the kill: when a survivor no longer lists it (etcd expired
//! its lease: the reference, the floor any lease-based design shares), and the first exec
//! a survivor runs itself. Their difference is Tether's own part. The killed master is
//! started again and waited for (it takes nothing back), and the next trial kills the
//! master that now runs the hall.

use std::time::{Duration, Instant};

use serde_json::json;
use tether_tests::api::ApiClient;
use tether_tests::masters::{Masters, MastersSpec};

use crate::stats::{Series, ms};

/// The masters' lease: DESIGN.md's default.
const LEASE_MS: u64 = 5000;
/// The pause between probes.
const PROBE_EVERY: Duration = Duration::from_millis(5);

const SITE: &str = r#"
[[repositories]]
id = "extra"
path = "repos/extra-drivers"

[[drivers]]
id = "echo"
repository = "extra"
file = "echo.rhai"
transport = "none"

[[modules]]
id = "hall-echo"
driver = "echo"
name = "Echo"

[[systems]]
id = "hall"
name = "Hall"
modules = ["hall-echo"]
"#;

/// The index of the master whose exec of the hall's echo names itself.
async fn runner(cluster: &Masters, apis: &[ApiClient]) -> Option<usize> {
    for (i, api) in apis.iter().enumerate() {
        let (status, body) = api.exec("hall", "Echo", 1, "echo", json!([7])).await;
        if status == 200 && body["executed_by"] == format!("master:{}", cluster.masters[i].id) {
            return Some(i);
        }
    }
    None
}

/// Whether `api`'s master lists master `id` as present.
async fn lists(api: &ApiClient, id: &str) -> bool {
    let (status, body) = api.get("/api/v1/masters").await;
    status == 200
        && body
            .as_array()
            .is_some_and(|masters| masters.iter().any(|m| m["id"] == id))
}

/// Three masters on a local etcd with the hall.
async fn start() -> Masters {
    Masters::start(MastersSpec {
        masters: 3,
        edges: Vec::new(),
        lease_ms: LEASE_MS,
        edge_settings: String::new(),
        site_extra: SITE.into(),
        files: vec![(
            "repos/extra-drivers/echo.rhai".into(),
            "fn echo(x) { x }\n".into(),
        )],
        etcd_members: 1,
        clock_offsets_s: Vec::new(),
    })
    .await
}

pub async fn run(trials: usize) -> anyhow::Result<()> {
    let mut cluster = start().await;
    let apis: Vec<ApiClient> = (0..cluster.masters.len())
        .map(|i| cluster.master_api(i))
        .collect();
    let (mut gone, mut runs) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        let holder =
            tether_tests::wait_for("a master to run the hall", Duration::from_secs(30), || {
                runner(&cluster, &apis)
            })
            .await;
        let id = cluster.masters[holder].id.clone();
        let survivor = (holder + 1) % apis.len();
        cluster.masters[holder].server.kill();
        let killed = Instant::now();
        let (mut lease_gone, mut first_run) = (None, None);
        while lease_gone.is_none() || first_run.is_none() {
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(60),
                "no survivor ran the hall within 60 s"
            );
            if lease_gone.is_none() && !lists(&apis[survivor], &id).await {
                lease_gone = Some(killed.elapsed());
            }
            if first_run.is_none() && runner(&cluster, &apis).await.is_some_and(|r| r != holder) {
                first_run = Some(killed.elapsed());
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        gone.extend(lease_gone);
        runs.extend(first_run);
        cluster.masters[holder].server.restart();
        cluster.wait_master_up(holder).await;
        tether_tests::wait_for("the master to rejoin", Duration::from_secs(30), || async {
            lists(&apis[survivor], &id).await.then_some(())
        })
        .await;
    }
    let overheads: Vec<Duration> = runs
        .iter()
        .zip(&gone)
        .map(|(run, gone)| run.saturating_sub(*gone))
        .collect();
    let (gone, runs, overheads) = (Series::new(gone), Series::new(runs), Series::new(overheads));
    println!(
        "## master failover: {trials} trials, SIGKILL of the master running a system of no edge, lease_ms {LEASE_MS}\n"
    );
    println!("| measured from the kill | p50 ms | p99 ms | max ms |\n|---|---|---|---|");
    for (name, series) in [
        (
            "a survivor no longer lists it (etcd expired its lease; reference)",
            &gone,
        ),
        ("a survivor's first successful exec", &runs),
        ("the difference (Tether's own part)", &overheads),
    ] {
        println!(
            "| {name} | {} | {} | {} |",
            ms(series.p50()),
            ms(series.p99()),
            ms(series.quantile(1.0))
        );
    }
    println!(
        "\nGoal (p99 within lease_ms + 1 s = {} ms): {}\n",
        LEASE_MS + 1000,
        if runs.p99() <= Duration::from_millis(LEASE_MS + 1000) {
            "met"
        } else {
            "not met"
        }
    );
    Ok(())
}

/// The extra hop: the hall's echo called through the master that runs it (the
/// reference) and through another master, which sends the call on to it; latency
/// interleaved call by call, then throughput at concurrency 1 and 16.
pub async fn hop(requests: usize, seconds: u64) -> anyhow::Result<()> {
    let cluster = start().await;
    let apis: Vec<ApiClient> = (0..cluster.masters.len())
        .map(|i| cluster.master_api(i))
        .collect();
    let holder =
        tether_tests::wait_for("a master to run the hall", Duration::from_secs(30), || {
            runner(&cluster, &apis)
        })
        .await;
    let other = (holder + 1) % apis.len();
    let paths = [
        ("the master running the unit (reference)", &apis[holder]),
        ("another master (one extra hop)", &apis[other]),
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(requests); paths.len()];
    for round in 0..requests + 200 {
        for (i, (_, client)) in paths.iter().enumerate() {
            let took = crate::echo_in(client, "hall")
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            if round >= 200 {
                samples[i].push(took);
            }
        }
    }
    let series: Vec<Series> = samples.into_iter().map(Series::new).collect();
    println!(
        "## the extra hop: exec of a master's module through another master of three, {requests} calls per path\n"
    );
    println!("| path | p50 ms | p99 ms | p50 ratio | p99 ratio |\n|---|---|---|---|---|");
    for ((name, _), s) in paths.iter().zip(&series) {
        println!(
            "| {name} | {} | {} | {} | {} |",
            ms(s.p50()),
            ms(s.p99()),
            crate::stats::ratio(s.p50(), series[0].p50()),
            crate::stats::ratio(s.p99(), series[0].p99()),
        );
    }
    println!(
        "\n| concurrency | path | exec/s | p50 ms | p99 ms | failed | exec/s ratio |\n|---|---|---|---|---|---|---|"
    );
    for concurrency in [1, 16] {
        let mut reference = 0.0;
        for (name, client) in paths {
            let (took, failed) = crate::load(client, "hall", concurrency, seconds).await;
            let rate = took.len() as f64 / seconds as f64;
            if reference == 0.0 {
                reference = rate;
            }
            let failed: usize = failed.values().sum();
            let s = Series::new(took);
            println!(
                "| {concurrency} | {name} | {rate:.0} | {} | {} | {failed} | {:.2} |",
                ms(s.p50()),
                ms(s.p99()),
                rate / reference.max(f64::MIN_POSITIVE)
            );
        }
    }
    println!();
    Ok(())
}
