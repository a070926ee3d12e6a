//! `tether-master demo`: Tether in one command. A master, two edges and their simulated
//! devices as child processes, two sites seeded with rooms, development certificates, all
//! in one folder; then the dashboard address, the admin token and commands to try. The
//! demo reports processes that exit and changes of control as they happen, starts stopped
//! processes again on Enter, and stops everything on Ctrl-C (SIGINT) or SIGTERM.

mod children;
mod files;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::Value;
use tether_common::logging::LogFormat;
use tether_common::shutdown::StopOn;
use tokio::io::AsyncBufReadExt;

use children::Process;
use files::{LOCATIONS, Layout, Ports};

/// `tether-master demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The demo's folder: certificates, configurations, data and logs. Emptied at each
    /// start (only if an earlier demo made it).
    #[arg(long, value_name = "DIR", default_value = "data/demo")]
    dir: PathBuf,
    /// The first of the 10 ports the demo uses on 127.0.0.1 (master API, three edge
    /// APIs, the edge link, the pair's peer link, four devices); 0 picks free ones.
    #[arg(long, value_name = "PORT", default_value_t = 8443)]
    base_port: u16,
    /// How many masters: 1 (on its embedded database), or 2 to 5 in a cluster on a local
    /// etcd (Debian's etcd-server; a tether-master built with the cluster feature), with
    /// a lobby of no edge that the masters run, so that killing one shows a failover.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=5))]
    masters: u16,
}

/// The processes the demo starts, as `tether-master demo-child ...` (hidden).
#[derive(Debug, Subcommand)]
pub enum Child {
    /// The master, with its configuration.
    Master {
        #[arg(long)]
        config: PathBuf,
    },
    /// An edge, with its configuration.
    Edge {
        #[arg(long)]
        config: PathBuf,
    },
    /// A simulated device.
    #[command(subcommand)]
    Sim(tether_sim::Device),
    /// etcd (several masters): started, and stopped when the demo goes, even by SIGKILL
    /// (the pipe from the demo closes), which etcd by itself would not notice.
    Etcd {
        /// The etcd program.
        #[arg(long)]
        program: PathBuf,
        /// Its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Runs a child of the demo until the demo closes its stdin (or it gets a signal).
pub fn run_child(child: Child) -> anyhow::Result<()> {
    let stop = StopOn::SignalsOrStdinEnd;
    match child {
        Child::Master { config } => crate::server::run(&config, stop),
        Child::Edge { config } => tether_edge::run(&config, stop),
        Child::Etcd { program, args } => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let mut etcd = tokio::process::Command::new(&program)
                    .args(&args)
                    .kill_on_drop(true)
                    .spawn()
                    .with_context(|| format!("cannot start {}", program.display()))?;
                tokio::select! {
                    status = etcd.wait() => anyhow::bail!("etcd ended: {status:?}"),
                    _ = tether_common::shutdown::wait(stop) => {
                        etcd.start_kill()?;
                        etcd.wait().await?;
                        Ok(())
                    }
                }
            })
        }
        Child::Sim(device) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                tokio::select! {
                    result = tether_sim::run(device) => result,
                    _ = tether_common::shutdown::wait(stop) => Ok(()),
                }
            })
        }
    }
}

/// Runs the demo until Ctrl-C.
pub fn run(args: DemoArgs, log_format: LogFormat) -> ExitCode {
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(demo(args, log_format)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tether-master demo: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn demo(args: DemoArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let masters = usize::from(args.masters);
    let etcd = match masters {
        1 => None,
        _ => Some(cluster_ready()?),
    };
    let layout = Layout::prepare(&args.dir, masters)?;
    let ports = Ports::pick(args.base_port, masters)?;
    layout.write(&ports)?;
    let mut processes = plan(&layout, &ports, log_format, etcd);
    println!(
        "Starting Tether in {} (logs in {}) ...",
        layout.dir.display(),
        layout.dir.join("logs").display()
    );
    let outcome = async {
        // etcd first: a master that cannot reach it does not start.
        if let Some(cluster) = &ports.cluster {
            for process in processes.iter_mut().filter(|p| p.name == "etcd") {
                process.start()?;
            }
            wait_for_listener("etcd", cluster.etcd_client, &mut processes).await?;
        }
        // Edges once the masters listen for them: an edge that finds no master waits its
        // reconnect period (3 s) before it tries again.
        for process in processes
            .iter_mut()
            .filter(|p| !p.name.starts_with("edge") && !p.running())
        {
            process.start()?;
        }
        for master in &ports.masters {
            wait_for_listener("a master", master.link, &mut processes).await?;
        }
        for process in processes.iter_mut().filter(|p| p.name.starts_with("edge")) {
            process.start()?;
        }
        let mut apis = (0..masters)
            .map(|i| Api::new(&layout, ports.masters[i].api, &layout.master_name(i), true))
            .collect::<anyhow::Result<Vec<Api>>>()?;
        wait_until_up(&mut apis, &mut processes).await?;
        // The servers that run rooms at the start: a pair's standby runs none.
        let mut edges = layout
            .edge_servers()
            .iter()
            .zip(ports.edge_api)
            .filter(|(server, _)| server.pair.is_none_or(|(_, listens)| listens))
            .map(|(server, port)| Api::new(&layout, port, server.name, false))
            .collect::<anyhow::Result<Vec<Api>>>()?;
        wait_until_rooms_run(&mut edges, &mut processes).await?;
        match &ports.cluster {
            None => print_banner(&layout, &ports, &apis[0].token, &processes),
            Some(_) => print_cluster_banner(&layout, &ports, &apis[0].token, &processes),
        }
        watch(&apis, &mut processes).await
    }
    .await;
    println!("Stopping ...");
    // Edges first, so the master does not take over rooms that are going away anyway.
    for process in processes.iter_mut().rev() {
        process.stop(Duration::from_secs(10)).await;
    }
    println!("Stopped every process the demo started.");
    outcome
}

/// Several masters need a tether-master built with the cluster feature, and etcd: the
/// etcd program, or an error that names the package.
fn cluster_ready() -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        cfg!(feature = "cluster"),
        "the demo with several masters needs a tether-master built with the cluster feature: \
         cargo run --release -p tether-master --features cluster -- demo --masters 3 \
         (building it needs protoc, Debian's protobuf-compiler)"
    );
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|program| program.is_file())
        .context(
            "the demo with several masters runs a local etcd, and there is no `etcd` program \
             on PATH: install Debian's etcd-server package (sudo apt install etcd-server)",
        )
}

/// etcd's arguments: one member on loopback, its data in the demo's folder.
fn etcd_args(layout: &Layout, cluster: &files::ClusterPorts) -> Vec<String> {
    let client = format!("http://127.0.0.1:{}", cluster.etcd_client);
    let peer = format!("http://127.0.0.1:{}", cluster.etcd_peer);
    [
        "--name",
        "demo",
        "--data-dir",
        &layout.dir.join("data").join("etcd").display().to_string(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &format!("demo={peer}"),
    ]
    .map(str::to_string)
    .to_vec()
}

/// The processes, in starting order: etcd (several masters), devices, masters, edges.
fn plan(
    layout: &Layout,
    ports: &Ports,
    log_format: LogFormat,
    etcd: Option<PathBuf>,
) -> Vec<Process> {
    let format = match log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let sim = |name: &str, kind: &str, port: u16| {
        Process::new(
            format!("{kind} {name}"),
            vec![
                "--log-format".into(),
                format.into(),
                "sim".into(),
                kind.into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
            ],
            layout.log(&format!("{kind}-{name}")),
        )
    };
    let server = |name: String, role: &str, config: PathBuf, log: &str| {
        Process::new(
            name,
            vec![
                "--log-format".into(),
                format.into(),
                role.into(),
                "--config".into(),
                config.display().to_string(),
            ],
            layout.log(log),
        )
    };
    let mut all = Vec::new();
    if let (Some(program), Some(cluster)) = (etcd, &ports.cluster) {
        let mut args = vec![
            "--log-format".into(),
            format.into(),
            "etcd".into(),
            "--program".into(),
            program.display().to_string(),
            "--".into(),
        ];
        args.extend(etcd_args(layout, cluster));
        all.push(Process::new("etcd", args, layout.log("etcd")));
    }
    all.extend([
        sim("room-101", "projector", ports.projectors[0]),
        sim("room-102", "projector", ports.projectors[1]),
        sim("store-201", "projector", ports.projectors[2]),
        sim("room-101", "modbus", ports.meter),
    ]);
    if let Some(cluster) = &ports.cluster {
        all.push(sim("lobby", "projector", cluster.lobby));
    }
    for index in 0..ports.masters.len() {
        let name = layout.master_name(index);
        let shown = match ports.masters.len() {
            1 => name.clone(),
            _ => format!("master {name}"),
        };
        all.push(server(shown, "master", layout.master_config(index), &name));
    }
    for edge in layout.edge_servers() {
        all.push(server(
            format!("edge {}", edge.name),
            "edge",
            layout.edge_config(edge.name),
            edge.name,
        ));
    }
    all
}

/// A server's API, as the demo reads it with the server's admin token.
struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
    token_file: PathBuf,
}

impl Api {
    /// The API of the server whose data folder is `layout.data(name)`, on `port`.
    fn new(layout: &Layout, port: u16, name: &str, master: bool) -> anyhow::Result<Api> {
        let tls = tether_common::link::tls::api_client_config(&layout.ca())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Api {
            // Development certificates: the master is `localhost`, an edge the loopback
            // address (no edge's certificate may name the master).
            base: if master {
                format!("https://localhost:{port}")
            } else {
                format!("https://127.0.0.1:{port}")
            },
            token: String::new(),
            http,
            token_file: layout.data(name).join("admin.token"),
        })
    }

    /// Reads the server's admin token once it has written it.
    fn read_token(&mut self) {
        if self.token.is_empty()
            && let Ok(token) = std::fs::read_to_string(&self.token_file)
        {
            self.token = token.trim().to_string();
        }
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let answer = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?;
        Ok(answer.json().await?)
    }
}

/// Waits until something accepts connections on `port` (`what` listens there), failing
/// if a process exits.
async fn wait_for_listener(what: &str, port: u16, processes: &mut [Process]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        fail_if_exited(processes)?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what} did not listen on port {port} within 30 s; see its log"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// An error, with the end of its log, if a process has exited.
fn fail_if_exited(processes: &mut [Process]) -> anyhow::Result<()> {
    for process in processes.iter_mut() {
        if let Some(how) = process.exited() {
            anyhow::bail!(
                "{} {how} while starting; the end of its log:\n{}",
                process.name,
                process.log_tail(15)
            );
        }
    }
    Ok(())
}

/// Waits until every master has booted and every edge location is online, a site pair
/// with all its nodes and its holder known (each linked to one of them); fails, with the
/// log's end, if a process exits first.
async fn wait_until_up(apis: &mut [Api], processes: &mut [Process]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        fail_if_exited(processes)?;
        let mut online = std::collections::BTreeSet::new();
        let mut answered = 0;
        for api in apis.iter_mut() {
            api.read_token();
            if api.token.is_empty() {
                continue;
            }
            if let Ok(Value::Array(edges)) = api.get("/api/v1/edges").await {
                answered += 1;
                online.extend(
                    edges
                        .iter()
                        .filter(|e| e["online"] == true && pair_ready(e))
                        .filter_map(|e| e["id"].as_str().map(str::to_string)),
                );
            }
        }
        if answered == apis.len() && online.len() == LOCATIONS.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the master and its edges were not up within 60 s; see the logs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a site pair is ready for calls through the master: every node linked and the
/// witness's holder known (a location of one node lists no nodes). The location shows
/// online once either node is linked, and the master sends a call to the holder's link,
/// so the banner's first call could otherwise find neither.
fn pair_ready(edge: &Value) -> bool {
    edge["nodes"].as_array().is_none_or(|nodes| {
        nodes.iter().all(|node| node["online"] == true)
            && nodes.iter().any(|node| node["role"] == "holder")
    })
}

/// Waits until every module of every room runs on its edge (an edge that is linked may
/// still be fetching its driver code): the banner's commands then work at once.
async fn wait_until_rooms_run(edges: &mut [Api], processes: &mut [Process]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        fail_if_exited(processes)?;
        let mut all = true;
        for edge in edges.iter_mut() {
            edge.read_token();
            all &= !edge.token.is_empty()
                && matches!(edge.get("/api/v1/systems").await, Ok(Value::Array(systems))
                if systems.iter().all(|system| {
                    system["members"].as_array().is_some_and(|members| {
                        members.iter().all(|m| m["state"] == "running")
                    })
                }));
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the rooms' modules were not all running within 60 s; see the logs");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// This program's path, for commands the banner suggests: they run at once, from what the
/// demo's build already made.
fn this_program() -> String {
    std::env::current_exe()
        .map(|path| path.display().to_string())
        .unwrap_or_else(|_| "tether-master".into())
}

fn print_banner(layout: &Layout, ports: &Ports, token: &str, processes: &[Process]) {
    let ca = layout.ca();
    let api = ports.master_api();
    let master_token = layout.data("master").join("admin.token");
    let edge_token = layout.data("site-1a").join("admin.token");
    let pid = |name: &str| {
        processes
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.pid)
            .unwrap_or(0)
    };
    let pids: Vec<String> = processes
        .iter()
        .map(|p| format!("{} {}", p.name, p.pid))
        .collect();
    println!(
        r#"
Tether is running: a master; site-1 (North campus: room-101, room-102), a site pair of two
edge nodes, site-1a holding its rooms and site-1b standing by, with the master as witness;
site-2 (South store: store-201), one edge; four simulated devices.

  Dashboard    https://localhost:{api}/dashboard/#token={token}
               (signed by the demo's own CA: accept the browser's warning, or trust {ca})
  Admin token  {token}
  Metrics      https://localhost:{api}/metrics (the same token)

Try, in another terminal:

  # present input 2 in room-101, through the master (site-1a runs the room):
  curl -s --cacert {ca} -H "Authorization: Bearer $(cat {master_token})" \
    -d '{{"method":"present","args":[2]}}' \
    https://localhost:{api}/api/v1/systems/room-101/modules/Room/1/exec
  # the same, on the node itself:
  curl -s --cacert {ca} -H "Authorization: Bearer $(cat {edge_token})" \
    -d '{{"method":"present","args":[3]}}' \
    https://127.0.0.1:{edge}/api/v1/systems/room-101/modules/Room/1/exec
  # with the command-line client (`tether`, in this binary; `cli --help` lists more):
  {exe} cli --server https://localhost:{api} --ca {ca} \
    --token-file {master_token} edges
  # kill site-1's holder: within its 5 s pair timeout site-1b runs the rooms (dashboard):
  kill -9 {holder_pid}
  # kill site-2's edge: after its 5 s timeout the master runs store-201:
  kill -9 {site2_pid}
  # room-101's meter is a collector array: the two nodes read it in turn, one a second
  # (each read is a line of {meter_log} with the reader's address).

Press Enter here to start stopped processes again (a node stands by, an edge takes its
rooms back); Ctrl-C stops everything. Processes: {pids}.
"#,
        edge = ports.edge_api[0],
        exe = this_program(),
        ca = ca.display(),
        master_token = master_token.display(),
        edge_token = edge_token.display(),
        holder_pid = pid("edge site-1a"),
        site2_pid = pid("edge site-2"),
        meter_log = layout.log("modbus-room-101").display(),
        pids = pids.join(", "),
    );
}

fn print_cluster_banner(layout: &Layout, ports: &Ports, token: &str, processes: &[Process]) {
    let ca = layout.ca();
    let token_file = layout.data(&layout.master_name(0)).join("admin.token");
    let names: Vec<String> = (0..ports.masters.len())
        .map(|i| layout.master_name(i))
        .collect();
    let dashboards: Vec<String> = ports
        .masters
        .iter()
        .zip(&names)
        .map(|(m, name)| {
            format!(
                "https://localhost:{}/dashboard/#token={token} ({name})",
                m.api
            )
        })
        .collect();
    let pids: Vec<String> = processes
        .iter()
        .map(|p| format!("{} {}", p.name, p.pid))
        .collect();
    println!(
        r#"
Tether is running: {count} masters ({names}) on a local etcd; site-1 (North campus:
room-101, room-102), a site pair of nodes site-1a and site-1b, witnessed by one master;
site-2 (South store: store-201), one edge; a lobby of no edge that one master runs; five
simulated devices.

  Dashboard    {dashboards}
               (signed by the demo's own CA: accept the browser's warning, or trust {ca})
  Admin token  {token} (every master's admin token works on every master)

Try, in another terminal:

  # which master holds which edge and runs which unit:
  {exe} cli --server https://localhost:{api} --ca {ca} \
    --token-file {token_file} masters
  # present input 2 in the lobby, through any master (the one that runs it answers):
  curl -s --cacert {ca} -H "Authorization: Bearer $(cat {token_file})" \
    -d '{{"method":"present","args":[2]}}' \
    https://localhost:{api}/api/v1/systems/lobby/modules/Room/1/exec
  # kill the master that runs the lobby (its pid below): within its 3 s lease another
  # master runs the lobby, and the dead master's edges link to the others; the rooms
  # keep running on their edges all along (a pair's nodes move to its new witness).

Press Enter here to start stopped processes again; Ctrl-C stops everything.
Processes: {pids}.
"#,
        count = names.len(),
        names = names.join(", "),
        dashboards = dashboards.join("\n               "),
        api = ports.master_api(),
        exe = this_program(),
        ca = ca.display(),
        token_file = token_file.display(),
        pids = pids.join(", "),
    );
}

/// The audit log, from the first master that answers.
async fn read_audit(apis: &[Api]) -> Option<Vec<Value>> {
    for api in apis {
        if let Ok(Value::Array(records)) = api.get("/api/v1/audit").await {
            return Some(records);
        }
    }
    None
}

/// Until Ctrl-C: reports processes that exit and changes of control, and starts stopped
/// processes again when Enter is pressed.
async fn watch(apis: &[Api], processes: &mut [Process]) -> anyhow::Result<()> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    // Records already shown (or there before the demo was up), by their whole text.
    let mut audit_seen: std::collections::HashSet<String> = read_audit(apis)
        .await
        .unwrap_or_default()
        .iter()
        .map(Value::to_string)
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let stop = tether_common::shutdown::wait_for_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(_)) => {
                    for process in processes.iter_mut().filter(|p| !p.running()) {
                        process.start()?;
                        println!("started {} again (pid {})", process.name, process.pid);
                    }
                }
                // No terminal (a script or a test): nothing to restart from.
                _ => stdin_open = false,
            },
            _ = tick.tick() => {
                for process in processes.iter_mut() {
                    if let Some(how) = process.exited() {
                        println!("{} (pid {}) {how}", process.name, process.pid);
                    }
                }
                if let Some(records) = read_audit(apis).await {
                    for record in records {
                        if audit_seen.insert(record.to_string()) {
                            println!("{}", describe_audit(&record));
                        }
                    }
                }
            }
        }
    }
}

/// One audit record as a line for people.
fn describe_audit(record: &Value) -> String {
    let text = |key: &str| record[key].as_str().unwrap_or("?").to_string();
    if record["event"] == "code" {
        return format!(
            "{} driver code of {}: {}",
            text("time"),
            text("repository"),
            text("reason")
        );
    }
    format!(
        "{} control of {}: {} -> {} (epoch {}): {}",
        text("time"),
        text("edge"),
        text("from"),
        text("to"),
        record["epoch"],
        text("reason")
    )
}
