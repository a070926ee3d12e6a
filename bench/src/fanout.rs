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

/// A master seeded with `edges` edge locations, in a temporary folder.
struct Master {
    server: Server,
    api: ApiClient,
    link_addr: String,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

impl Master {
    async fn start(edges: usize) -> anyhow::Result<Master> {
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
        for (i, secret) in secrets.iter().enumerate() {
            write!(
                site,
                "\n[[edges]]\nid = \"swarm-{i}\"\nsecret_file = {}\nfailover = true\n",
                toml_path(secret)
            )?;
        }
        std::fs::write(dir.join("site.toml"), site)?;
        let (api_port, link_port) = (tether_tests::free_port(), tether_tests::free_port());
        let config = format!(
            "data_dir = {data}\napi_listen = \"127.0.0.1:{api_port}\"\n\
             link_listen = \"127.0.0.1:{link_port}\"\nseed = {seed}\n\n[tls]\n\
             cert = {cert}\nkey = {key}\nca = {ca}\nrequire_client_cert = false\n",
            data = toml_path(&dir.join("data")),
            seed = toml_path(&dir.join("site.toml")),
            cert = toml_path(&certs.join("master.pem")),
            key = toml_path(&certs.join("master.key")),
            ca = toml_path(&certs.join("ca.pem")),
        );
        std::fs::write(dir.join("master.toml"), config)?;
        let server = Server::start(
            "master",
            &bin("tether-master"),
            &[
                "--config",
                dir.join("master.toml").to_str().unwrap_or_default(),
            ],
            &dir.join("master.log"),
        );
        server
            .wait_for_log("master booted", Duration::from_secs(120))
            .await;
        let token = std::fs::read_to_string(dir.join("data/admin.token"))?;
        let api = ApiClient::new(
            &format!("https://localhost:{api_port}"),
            &certs.join("ca.pem"),
            Some(token.trim().to_string()),
        );
        Ok(Master {
            server,
            api,
            link_addr: format!("127.0.0.1:{link_port}"),
            dir,
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
                Ok(ConnectorConfig {
                    master_addrs: vec![self.link_addr.clone()],
                    server_name: tls::server_name("localhost")?,
                    tls: tls.clone(),
                    edge_id: format!("swarm-{i}"),
                    secret: Secret::load(&certs.join(format!("secrets/swarm-{i}.secret")))?,
                    handshake_timeout: Duration::from_millis(5000),
                    reconnect: Duration::from_millis(3000),
                    link: LinkConfig::with_heartbeat(Duration::from_millis(1000), 16 << 20),
                })
            })
            .collect()
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.server
            .pid()
            .ok_or_else(|| anyhow::anyhow!("the master is not running"))
    }
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
fn drain(swarm: &mut Swarm, versions: &mut [u64]) {
    while let Ok(event) = swarm.events.try_recv() {
        if let Event::Synced { edge, version, .. } = event {
            versions[edge] = versions[edge].max(version);
        }
    }
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

/// What one fan-out and storm run measured.
struct Figures {
    edges: usize,
    changes: usize,
    idle_rss: u64,
    linked_rss: u64,
    /// Share of one core the master used with every link up and nothing else to do.
    idle_cpu: f64,
    rtt: Series,
    connect: Series,
    /// Per edge and change: from the write to the edge's replica holding it.
    reach: Series,
    /// Per change: until the last edge held it.
    all_reached: Series,
    /// From the master's kill to its new process.
    restarted_after: Duration,
    storm: Series,
}

/// The fan-out and storm scenarios for `edges` simulated edges; `changes` model changes
/// are measured one after the other.
pub async fn run(edges: usize, changes: usize) -> anyhow::Result<()> {
    print(&measure(edges, changes).await?);
    Ok(())
}

async fn measure(edges: usize, changes: usize) -> anyhow::Result<Figures> {
    let mut master = Master::start(edges).await?;
    let pid = master.pid()?;
    // The master with N edge locations in its model and no link.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss(pid)?;

    let connectors = master.connectors(edges)?;
    let started = Instant::now();
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
    // Steady state: every link up, heartbeats each second.
    tokio::time::sleep(Duration::from_secs(5)).await;
    drain(&mut swarm, &mut versions);
    let linked_rss = rss(pid)?;
    let cpu_before = cpu_time(pid)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_cpu = cpu_time(pid)?.saturating_sub(cpu_before).as_secs_f64() / 5.0;
    let rtt = Series::new(swarm.rtts());

    // Fan-out: the user record is rewritten; each edge's replica must take the change.
    let mut reach = Vec::new();
    let mut all_reached = Vec::new();
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
    let reach = Series::new(reach);
    let all_reached = Series::new(all_reached);

    // Storm: the master killed, started again at once; every edge must renegotiate.
    drain(&mut swarm, &mut versions);
    master.server.kill();
    let killed = Instant::now();
    master.server.restart();
    let restarted = Instant::now();
    let storm = collect(
        &mut swarm,
        &mut versions,
        restarted,
        Duration::from_secs(300),
        |event| matches!(event, Event::Renegotiated { .. }),
    )
    .await?;
    Ok(Figures {
        edges,
        changes,
        idle_rss,
        linked_rss,
        idle_cpu,
        rtt,
        connect,
        reach,
        all_reached,
        restarted_after: restarted.duration_since(killed),
        storm: Series::new(storm),
    })
}

fn print(f: &Figures) {
    let edges = f.edges;
    println!("## fan-out and storm: {edges} simulated edges\n");
    println!(
        "Master memory: {:.1} MiB with {edges} edge locations and no link, {:.1} MiB with \
         every link up: **{:.1} KiB per link**. Master CPU with every link up and idle \
         (heartbeats only): {:.0} % of one core.\n",
        f.idle_rss as f64 / 1048576.0,
        f.linked_rss as f64 / 1048576.0,
        f.linked_rss.saturating_sub(f.idle_rss) as f64 / 1024.0 / edges as f64,
        f.idle_cpu * 100.0,
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
    println!(
        "{}",
        row(
            "storm: master restart to renegotiated",
            &f.storm,
            &f.connect
        )
    );
    println!(
        "\nStorm: the master was started again {} ms after its SIGKILL; the last edge \
         renegotiated {} ms after the kill.\n",
        f.restarted_after.as_millis(),
        (f.restarted_after + f.storm.quantile(1.0)).as_millis()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scenario end to end at a size CI can afford: a real master, real links; every
    /// edge renegotiates, takes every change, and comes back after the master's SIGKILL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_swarm_takes_every_change_and_survives_a_master_restart() {
        tether_common::link::tls::install_crypto_provider();
        let f = measure(20, 3).await.unwrap();
        assert_eq!(f.connect.count(), 20);
        assert_eq!(f.reach.count(), 20 * 3);
        assert_eq!(f.all_reached.count(), 3);
        assert_eq!(f.storm.count(), 20);
        assert_eq!(f.rtt.count(), 20, "every link measured its round trip");
        assert!(f.linked_rss > 0 && f.idle_rss > 0);
        // The edges come back no sooner than their reconnect period after the kill.
        assert!(f.restarted_after + f.storm.quantile(0.0) >= Duration::from_millis(2900));
    }
}
