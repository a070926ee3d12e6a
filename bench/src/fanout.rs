//! Fan-out and storm: a master with N edge locations in its model, and N edges simulated in
//! this process ([`crate::swarm`]). Measures the links' cost in the master's memory, one
//! data-model change reaching every edge, and the time until all N have renegotiated after
//! the master is killed and started again.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tether_common::link::{ConnectorConfig, LinkConfig, Secret, tls};
use tether_common::pki;
use tether_tests::api::ApiClient;
use tether_tests::process::{Server, bin};

use crate::stats::{Series, ms, ratio};
use crate::swarm::{Event, Swarm};

/// The user whose record each measured change rewrites: users are in every edge's slice.
const USER: &str = "fanout";

/// One master, or several in a cluster on a local etcd, seeded with `edges` edge
/// locations, in a temporary folder.
struct Master {
    /// The masters' processes, the first first.
    servers: Vec<Server>,
    /// The first master's API.
    api: ApiClient,
    /// Each master's link address.
    link_addrs: Vec<String>,
    dir: PathBuf,
    /// The cluster's etcd, among several masters.
    #[cfg(feature = "cluster")]
    _etcd: Option<tether_tests::etcd::Etcd>,
    _tmp: tempfile::TempDir,
}

fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

impl Master {
    async fn start(edges: usize, masters: usize) -> anyhow::Result<Master> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_path_buf();
        let certs = dir.join("certs");
        std::fs::create_dir_all(certs.join("secrets"))?;
        let secrets: Vec<PathBuf> = (0..edges)
            .map(|i| certs.join(format!("secrets/swarm-{i}.secret")))
            .collect();
        // No client certificates: the master names each edge's certificate after its id,
        // and ten thousand of them are not what the bench measures; the link authenticates
        // each edge by its own secret.
        let leaves = [pki::Leaf {
            cert: certs.join("master.pem"),
            key: certs.join("master.key"),
            role: pki::Role::Master(pki::master_dev_names()),
        }];
        pki::ensure(&certs.join("ca.pem"), &leaves, &secrets)?;
        let mut site = String::from("# Written by tether-bench: edge locations only.\n");
        // Among several masters the swarm's first connect (tens of seconds for 10,000
        // from one host) stays within the edges' failover timeout: the bench measures the
        // links and the fan-out, not a mass failover and hand-back.
        let timeout = match masters {
            1 => String::new(),
            _ => "timeout_ms = 300000\n".to_string(),
        };
        for (i, secret) in secrets.iter().enumerate() {
            write!(
                site,
                "\n[[edges]]\nid = \"swarm-{i}\"\nsecret_file = {}\nfailover = true\n{timeout}",
                toml_path(secret)
            )?;
        }
        std::fs::write(dir.join("site.toml"), site)?;
        #[cfg(feature = "cluster")]
        let etcd = match masters {
            1 => None,
            _ => Some(tether_tests::etcd::Etcd::start(1).await),
        };
        #[cfg(not(feature = "cluster"))]
        anyhow::ensure!(
            masters == 1,
            "several masters need tether-bench built with --features cluster"
        );
        // Every simulated edge connects from 127.0.0.1, all at once: the caps on pending
        // handshakes (per address, a defence against one flooding host, and in all, which
        // drops the oldest) are raised to the swarm's size, so that the bench measures
        // the master, not the caps.
        let (mut servers, mut link_addrs, mut api) = (Vec::new(), Vec::new(), None);
        for index in 0..masters {
            let name = match masters {
                1 => "master".to_string(),
                _ => format!("m{}", index + 1),
            };
            let (api_port, link_port) = (tether_tests::free_port(), tether_tests::free_port());
            #[cfg(feature = "cluster")]
            let cluster = etcd.as_ref().map_or_else(String::new, |etcd| {
                format!(
                    "\n[cluster]\nmaster_id = \"{name}\"\netcd = [\"{}\"]\n",
                    etcd.endpoints()[0]
                )
            });
            #[cfg(not(feature = "cluster"))]
            let cluster = String::new();
            let data = match masters {
                1 => dir.join("data"),
                _ => dir.join("data").join(&name),
            };
            let config = format!(
                "data_dir = {data}\napi_listen = \"127.0.0.1:{api_port}\"\n\
                 link_listen = \"127.0.0.1:{link_port}\"\nseed = {seed}\n\n[tls]\n\
                 cert = {cert}\nkey = {key}\nca = {ca}\nrequire_client_cert = false\n\n\
                 [limits]\npending_per_address = {edges}\nmax_pending_handshakes = {pending}\n{cluster}",
                pending = edges.min(10_000),
                data = toml_path(&data),
                seed = toml_path(&dir.join("site.toml")),
                cert = toml_path(&certs.join("master.pem")),
                key = toml_path(&certs.join("master.key")),
                ca = toml_path(&certs.join("ca.pem")),
            );
            let file = dir.join(format!("{name}.toml"));
            std::fs::write(&file, config)?;
            let server = Server::start(
                &name,
                &bin("tether-master"),
                &["--config", file.to_str().unwrap_or_default()],
                &dir.join(format!("{name}.log")),
            );
            // One after the other: the first seeds the shared model, the others find it.
            server
                .wait_for_log("master booted", Duration::from_secs(180))
                .await;
            if api.is_none() {
                let token = std::fs::read_to_string(data.join("admin.token"))?;
                api = Some(ApiClient::new(
                    &format!("https://localhost:{api_port}"),
                    &certs.join("ca.pem"),
                    Some(token.trim().to_string()),
                ));
            }
            servers.push(server);
            link_addrs.push(format!("127.0.0.1:{link_port}"));
        }
        Ok(Master {
            servers,
            api: api.ok_or_else(|| anyhow::anyhow!("no master"))?,
            link_addrs,
            dir,
            #[cfg(feature = "cluster")]
            _etcd: etcd,
            _tmp: tmp,
        })
    }

    /// How every simulated edge reaches this master, as an edge's configuration says by
    /// default (heartbeat, reconnect period, handshake deadline).
    fn connectors(&self, edges: usize) -> anyhow::Result<Vec<ConnectorConfig>> {
        let certs = self.dir.join("certs");
        let tls = tls::client_config(&certs.join("ca.pem"), None)?;
        (0..edges)
            .map(|i| {
                let edge_id = format!("swarm-{i}");
                Ok(ConnectorConfig {
                    // As an edge does: the masters in the order of its id's hash.
                    master_addrs: tether_common::control::placement::rendezvous_order(
                        &edge_id,
                        &self.link_addrs,
                    )
                    .into_iter()
                    .cloned()
                    .collect(),
                    server_name: tls::server_name("localhost")?,
                    tls: tls.clone(),
                    edge_id: edge_id.into(),
                    secret: Secret::load(&certs.join(format!("secrets/swarm-{i}.secret")))?,
                    handshake_timeout: Duration::from_millis(5000),
                    reconnect: Duration::from_millis(3000),
                    link: LinkConfig::with_heartbeat(Duration::from_millis(1000), 16 << 20),
                })
            })
            .collect()
    }

    fn pids(&self) -> anyhow::Result<Vec<u32>> {
        self.servers
            .iter()
            .map(|s| {
                s.pid()
                    .ok_or_else(|| anyhow::anyhow!("a master is not running"))
            })
            .collect()
    }
}

/// The heartbeat round trips the (first) master measured on its links: the master pings,
/// an edge answers (among several masters, those of the edges linked to the first).
async fn master_rtts(api: &ApiClient) -> anyhow::Result<Vec<Duration>> {
    let (status, edges) = api.get("/api/v1/edges").await;
    anyhow::ensure!(
        status == 200,
        "GET /api/v1/edges answered {status}: {edges}"
    );
    Ok(edges
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|edge| edge["rtt_ms"].as_f64())
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .collect())
}

/// CPU time of the masters and of this process (the simulated edges) from a start, as
/// shares of one core.
struct CpuShare {
    pids: Vec<u32>,
    masters: Duration,
    swarm: Duration,
    from: Instant,
}

impl CpuShare {
    fn start(pids: &[u32]) -> anyhow::Result<Self> {
        Ok(CpuShare {
            pids: pids.to_vec(),
            masters: cpu_time_all(pids)?,
            swarm: cpu_time(std::process::id())?,
            from: Instant::now(),
        })
    }

    /// The masters' share and the swarm's.
    fn shares(&self) -> anyhow::Result<(f64, f64)> {
        let elapsed = self.from.elapsed().as_secs_f64().max(1e-3);
        let masters = cpu_time_all(&self.pids)?.saturating_sub(self.masters);
        let swarm = cpu_time(std::process::id())?.saturating_sub(self.swarm);
        Ok((
            masters.as_secs_f64() / elapsed,
            swarm.as_secs_f64() / elapsed,
        ))
    }
}

/// Resident memory of the processes together, in bytes.
fn rss_all(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|pid| rss(*pid)).sum()
}

/// CPU time the processes have used together.
fn cpu_time_all(pids: &[u32]) -> anyhow::Result<Duration> {
    pids.iter().map(|pid| cpu_time(*pid)).sum()
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))
}

/// CPU time a process has used (user + system). `/proc` counts in USER_HZ, which Linux
/// fixes at 100 for user space.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name.
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => Ok(Duration::from_millis((user + system) * 10)),
        _ => anyhow::bail!("cannot read the CPU time of pid {pid}"),
    }
}

/// Waits until every edge has reported `wanted`, answering when each did (time since
/// `from`). Events of other kinds update `versions`.
async fn collect(
    swarm: &mut Swarm,
    versions: &mut [u64],
    from: Instant,
    limit: Duration,
    wanted: impl Fn(&Event) -> bool,
) -> anyhow::Result<Vec<Duration>> {
    let mut done: HashMap<usize, Duration> = HashMap::new();
    let deadline = tokio::time::Instant::now() + limit;
    while done.len() < versions.len() {
        let event = tokio::time::timeout_at(deadline, swarm.events.recv())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "only {} of {} edges within {} s",
                    done.len(),
                    versions.len(),
                    limit.as_secs()
                )
            })?
            .ok_or_else(|| anyhow::anyhow!("the swarm stopped"))?;
        let (edge, at) = match event {
            Event::Synced { edge, at, .. } | Event::Renegotiated { edge, at } => (edge, at),
            Event::Down => continue,
        };
        if wanted(&event) && !done.contains_key(&edge) {
            done.insert(edge, at.saturating_duration_since(from));
        }
        if let Event::Synced { edge, version, .. } = event {
            versions[edge] = versions[edge].max(version);
        }
    }
    Ok(done.into_values().collect())
}

/// Drops the events that are already queued.
/// Answers how many links went down among the events dropped.
fn drain(swarm: &mut Swarm, versions: &mut [u64]) -> usize {
    let mut downs = 0;
    while let Ok(event) = swarm.events.try_recv() {
        match event {
            Event::Synced { edge, version, .. } => versions[edge] = versions[edge].max(version),
            Event::Down => downs += 1,
            Event::Renegotiated { .. } => {}
        }
    }
    downs
}

fn row(name: &str, series: &Series, reference: &Series) -> String {
    format!(
        "| {name} | {} | {} | {} | {} | {} |",
        ms(series.p50()),
        ms(series.p99()),
        ms(series.quantile(1.0)),
        ratio(series.p50(), reference.p50()),
        ratio(series.p99(), reference.p99()),
    )
}

/// The storm after the master's SIGKILL and restart.
struct Storm {
    /// From the kill to the new process.
    restarted_after: Duration,
    /// From the restart to each edge's renegotiation.
    renegotiated: Series,
    /// The master's and the swarm's CPU until the last edge renegotiated.
    cpu: (f64, f64),
    /// The edges' attempts that failed meanwhile: timed out, not connected, refused.
    failed: [usize; 3],
}

/// What one fan-out and storm run measured.
struct Figures {
    edges: usize,
    masters: usize,
    changes: usize,
    idle_rss: u64,
    linked_rss: u64,
    /// Share of one core the simulated edges (this process) used meanwhile.
    swarm_idle_cpu: f64,
    /// Links that went down while idle (none should).
    idle_downs: usize,
    /// Shares of one core the master(s) and the simulated edges used while the changes
    /// went out: the swarm shares the machine's cores with the master.
    fanout_cpu: (f64, f64),
    /// Share of one core the master used with every link up and nothing else to do.
    idle_cpu: f64,
    rtt: Series,
    connect: Series,
    /// Per edge and change: from the write to the edge's replica holding it.
    reach: Series,
    /// Per change: until the last edge held it.
    all_reached: Series,
    /// From the master's kill to its new process, and the edges' renegotiation after
    /// (one master only).
    storm: Option<Storm>,
    /// The masters' and the swarm's CPU while every edge connected the first time.
    connect_cpu: (f64, f64),
    /// The edges' attempts that failed in the first connect: timed out, not connected,
    /// refused.
    connect_failed: [usize; 3],
}

/// The fan-out and storm scenarios for `edges` simulated edges over `masters` masters;
/// `changes` model changes are measured one after the other. The storm (the master killed
/// under its edges) is measured with one master.
pub async fn run(edges: usize, changes: usize, masters: usize) -> anyhow::Result<()> {
    print(&measure(edges, changes, masters).await?);
    Ok(())
}

/// `perf record` of the masters over one window of the scenario, when the variable `var`
/// names the file to write (`TETHER_BENCH_PERF_IDLE`, `TETHER_BENCH_PERF_FANOUT`): so that
/// a profile of one phase holds nothing of the others.
struct PhaseProfile(Option<tokio::process::Child>);

impl PhaseProfile {
    fn start(var: &str, masters: &[u32]) -> anyhow::Result<PhaseProfile> {
        let Some(file) = std::env::var_os(var) else {
            return Ok(PhaseProfile(None));
        };
        let pids: Vec<String> = masters.iter().map(u32::to_string).collect();
        // `TETHER_BENCH_PERF_ARGS` replaces the sampling options (say, `-F 499
        // --call-graph dwarf` for callers in a build without frame pointers).
        let options = std::env::var("TETHER_BENCH_PERF_ARGS").unwrap_or("-F 999 -g".into());
        let perf = tokio::process::Command::new("perf")
            .arg("record")
            .args(options.split_whitespace())
            .args(["-p", &pids.join(","), "-o"])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| anyhow::anyhow!("cannot run perf ({var}): {err}"))?;
        Ok(PhaseProfile(Some(perf)))
    }

    /// Ends the recording as Ctrl-C would, so that perf writes its file.
    async fn finish(self) -> anyhow::Result<()> {
        let Some(mut perf) = self.0 else {
            return Ok(());
        };
        if let Some(pid) = perf.id() {
            tokio::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .await?;
        }
        let status = perf.wait().await?;
        anyhow::ensure!(status.success(), "perf record failed: {status}");
        Ok(())
    }
}

async fn measure(edges: usize, changes: usize, masters: usize) -> anyhow::Result<Figures> {
    let mut master = Master::start(edges, masters).await?;
    let pids = master.pids()?;
    // The masters with N edge locations in their model and no link.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_all(&pids)?;

    let connectors = master.connectors(edges)?;
    let started = Instant::now();
    let connecting = CpuShare::start(&pids)?;
    let mut swarm = Swarm::start(connectors);
    let mut versions = vec![0u64; edges];
    let connect = Series::new(
        collect(
            &mut swarm,
            &mut versions,
            started,
            Duration::from_secs(300),
            |event| matches!(event, Event::Renegotiated { .. }),
        )
        .await?,
    );
    let connect_cpu = connecting.shares()?;
    let connect_failed = swarm.failed.snapshot();
    // Steady state: every link up, heartbeats each second.
    tokio::time::sleep(Duration::from_secs(5)).await;
    drain(&mut swarm, &mut versions);
    let linked_rss = rss_all(&pids)?;
    let idle = CpuShare::start(&pids)?;
    let profile = PhaseProfile::start("TETHER_BENCH_PERF_IDLE", &pids)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    profile.finish().await?;
    let (idle_cpu, swarm_idle_cpu) = idle.shares()?;
    let idle_downs = drain(&mut swarm, &mut versions);
    let rtt = Series::new(master_rtts(&master.api).await?);

    // Fan-out: the user record is rewritten; each edge's replica must take the change.
    let mut reach = Vec::new();
    let mut all_reached = Vec::new();
    let fanning = CpuShare::start(&pids)?;
    let profile = PhaseProfile::start("TETHER_BENCH_PERF_FANOUT", &pids)?;
    for change in 0..changes {
        drain(&mut swarm, &mut versions);
        let before = versions.clone();
        let from = Instant::now();
        let body = json!({"id": USER, "name": format!("change {change}"), "role": "viewer"});
        let (status, answer) = if change == 0 {
            master.api.post("/api/v1/users", body).await
        } else {
            master.api.put(&format!("/api/v1/users/{USER}"), body).await
        };
        anyhow::ensure!(
            (200..300).contains(&status),
            "user write: {status} {answer}"
        );
        let took = collect(
            &mut swarm,
            &mut versions,
            from,
            Duration::from_secs(120),
            |event| matches!(event, Event::Synced { edge, version, .. } if *version > before[*edge]),
        )
        .await?;
        all_reached.push(took.iter().copied().max().unwrap_or_default());
        reach.extend(took);
    }
    let fanout_cpu = fanning.shares()?;
    profile.finish().await?;
    let reach = Series::new(reach);
    let all_reached = Series::new(all_reached);

    // Storm: the master killed, started again at once; every edge must renegotiate.
    let storm = match master.servers.as_mut_slice() {
        [server] => {
            drain(&mut swarm, &mut versions);
            let failed_before = swarm.failed.snapshot();
            server.kill();
            let killed = Instant::now();
            server.restart();
            let restarted = Instant::now();
            let pid = server
                .pid()
                .ok_or_else(|| anyhow::anyhow!("the master is not running"))?;
            let cpu = CpuShare::start(&[pid])?;
            let storm = collect(
                &mut swarm,
                &mut versions,
                restarted,
                Duration::from_secs(300),
                |event| matches!(event, Event::Renegotiated { .. }),
            )
            .await?;
            let failed_after = swarm.failed.snapshot();
            Some(Storm {
                restarted_after: restarted.duration_since(killed),
                renegotiated: Series::new(storm),
                cpu: cpu.shares()?,
                failed: std::array::from_fn(|i| failed_after[i] - failed_before[i]),
            })
        }
        _ => None,
    };
    Ok(Figures {
        edges,
        masters,
        changes,
        idle_rss,
        linked_rss,
        idle_cpu,
        swarm_idle_cpu,
        idle_downs,
        fanout_cpu,
        rtt,
        connect,
        reach,
        all_reached,
        storm,
        connect_cpu,
        connect_failed,
    })
}

fn print(f: &Figures) {
    let edges = f.edges;
    let (title, whose) = match f.masters {
        1 => ("fan-out and storm".to_string(), "Master".to_string()),
        n => (
            format!("fan-out over {n} masters on etcd"),
            format!("The {n} masters' memory together"),
        ),
    };
    println!("## {title}: {edges} simulated edges\n");
    println!(
        "{whose}: {:.1} MiB with {edges} edge locations and no link, {:.1} MiB with \
         every link up: **{:.1} KiB per link**. CPU with every link up and idle \
         (heartbeats only): {:.0} % of one core (the simulated edges, in the bench's \
         process on the same cores: {:.0} %; links that went down meanwhile: {}). While \
         the changes went out: the master {:.0} % and the simulated edges {:.0} % of one \
         core.\n",
        f.idle_rss as f64 / 1048576.0,
        f.linked_rss as f64 / 1048576.0,
        f.linked_rss.saturating_sub(f.idle_rss) as f64 / 1024.0 / edges as f64,
        f.idle_cpu * 100.0,
        f.swarm_idle_cpu * 100.0,
        f.idle_downs,
        f.fanout_cpu.0 * 100.0,
        f.fanout_cpu.1 * 100.0,
    );
    println!(
        "| measure | p50 ms | p99 ms | max ms | p50 ratio | p99 ratio |\n|---|---|---|---|---|---|"
    );
    println!(
        "{}",
        row("heartbeat round trip (reference)", &f.rtt, &f.rtt)
    );
    let name = format!("one model change reaching an edge ({} changes)", f.changes);
    println!("{}", row(&name, &f.reach, &f.rtt));
    println!(
        "{}",
        row(
            "one model change reaching all edges",
            &f.all_reached,
            &f.rtt
        )
    );
    let name = "first connect: start to renegotiated (reference)";
    println!("{}", row(name, &f.connect, &f.connect));
    let Some(storm) = &f.storm else {
        println!(
            "\nWhile every edge connected the first time: the masters {:.0} % and the \
             simulated edges {:.0} % of one core; attempts that failed: {}.\n",
            f.connect_cpu.0 * 100.0,
            f.connect_cpu.1 * 100.0,
            failures(f.connect_failed),
        );
        return;
    };
    println!(
        "{}",
        row(
            "storm: master restart to renegotiated",
            &storm.renegotiated,
            &f.connect
        )
    );
    println!(
        "\nStorm: the master was started again {} ms after its SIGKILL; the last edge \
         renegotiated {} ms after the kill. CPU while every edge connected the first \
         time: the master {:.0} % and the simulated edges {:.0} % of one core; in the \
         storm: {:.0} % and {:.0} %. Attempts that failed in the first connect: {}; in \
         the storm: {}.\n",
        storm.restarted_after.as_millis(),
        (storm.restarted_after + storm.renegotiated.quantile(1.0)).as_millis(),
        f.connect_cpu.0 * 100.0,
        f.connect_cpu.1 * 100.0,
        storm.cpu.0 * 100.0,
        storm.cpu.1 * 100.0,
        failures(f.connect_failed),
        failures(storm.failed),
    );
}

/// Failed attempts as printed: the total, and by why.
fn failures([timed_out, not_connected, refused]: [usize; 3]) -> String {
    format!(
        "{} ({timed_out} timed out, {not_connected} not connected, {refused} refused or cut)",
        timed_out + not_connected + refused
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scenario end to end at a size CI can afford: a real master, real links; every
    /// edge renegotiates, takes every change, and comes back after the master's SIGKILL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_swarm_takes_every_change_and_survives_a_master_restart() {
        tether_common::link::tls::install_crypto_provider();
        let f = measure(20, 3, 1).await.unwrap();
        assert_eq!(f.connect.count(), 20);
        assert_eq!(f.reach.count(), 20 * 3);
        assert_eq!(f.all_reached.count(), 3);
        let Storm {
            restarted_after,
            renegotiated: storm,
            ..
        } = f.storm.expect("a storm with one master");
        assert_eq!(storm.count(), 20);
        assert_eq!(f.rtt.count(), 20, "every link measured its round trip");
        assert!(f.linked_rss > 0 && f.idle_rss > 0);
        assert_eq!(f.idle_downs, 0, "no link went down while idle");
        // The edges come back no sooner than their reconnect period after the kill.
        assert!(restarted_after + storm.quantile(0.0) >= Duration::from_millis(2900));
    }

    /// Over three masters on etcd: every edge links to one of them and takes every change
    /// written on the first, whichever master it is linked to.
    #[cfg(feature = "cluster")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_swarm_over_three_masters_takes_every_change() {
        tether_common::link::tls::install_crypto_provider();
        let f = measure(30, 2, 3).await.unwrap();
        assert_eq!(f.connect.count(), 30);
        assert_eq!(f.reach.count(), 30 * 2);
        assert!(f.storm.is_none());
    }
}
