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
use files::{EDGES, Layout, Ports};

/// `tether-master demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The demo's folder: certificates, configurations, data and logs. Emptied at each
    /// start (only if an earlier demo made it).
    #[arg(long, value_name = "DIR", default_value = "data/demo")]
    dir: PathBuf,
    /// The first of the 8 ports the demo uses on 127.0.0.1 (master API, two edge APIs,
    /// the edge link, four devices); 0 picks free ones.
    #[arg(long, value_name = "PORT", default_value_t = 8443)]
    base_port: u16,
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
}

/// Runs a child of the demo until the demo closes its stdin (or it gets a signal).
pub fn run_child(child: Child) -> anyhow::Result<()> {
    let stop = StopOn::SignalsOrStdinEnd;
    match child {
        Child::Master { config } => crate::server::run(&config, stop),
        Child::Edge { config } => tether_edge::run(&config, stop),
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
    let layout = Layout::prepare(&args.dir)?;
    let ports = Ports::pick(args.base_port)?;
    layout.write(&ports)?;
    let mut processes = plan(&layout, &ports, log_format);
    println!(
        "Starting Tether in {} (logs in {}) ...",
        layout.dir.display(),
        layout.dir.join("logs").display()
    );
    let outcome = async {
        // Edges once the master listens for them: an edge that finds no master waits its
        // reconnect period (3 s) before it tries again.
        for process in processes.iter_mut().filter(|p| !p.name.starts_with("edge")) {
            process.start()?;
        }
        wait_for_listener(ports.link, &mut processes).await?;
        for process in processes.iter_mut().filter(|p| p.name.starts_with("edge")) {
            process.start()?;
        }
        let mut api = Api::new(&layout, ports.master_api, "master")?;
        wait_until_up(&mut api, &mut processes).await?;
        let mut edges = EDGES
            .iter()
            .zip(ports.edge_api)
            .map(|(edge, port)| Api::new(&layout, port, edge))
            .collect::<anyhow::Result<Vec<Api>>>()?;
        wait_until_rooms_run(&mut edges, &mut processes).await?;
        print_banner(&layout, &ports, &api.token, &processes);
        watch(&api, &mut processes).await
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

/// The processes, in starting order: devices, master, edges.
fn plan(layout: &Layout, ports: &Ports, log_format: LogFormat) -> Vec<Process> {
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
    let mut all = vec![
        sim("room-101", "projector", ports.projectors[0]),
        sim("room-102", "projector", ports.projectors[1]),
        sim("store-201", "projector", ports.projectors[2]),
        sim("room-101", "modbus", ports.meter),
        server("master".into(), "master", layout.master_config(), "master"),
    ];
    for edge in EDGES {
        all.push(server(
            format!("edge {edge}"),
            "edge",
            layout.edge_config(edge),
            edge,
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
    fn new(layout: &Layout, port: u16, name: &str) -> anyhow::Result<Api> {
        let tls = tether_common::link::tls::api_client_config(&layout.ca())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Api {
            // Development certificates: the master is `localhost`, an edge the loopback
            // address (no edge's certificate may name the master).
            base: if name == "master" {
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

/// Waits until something accepts connections on `port`, failing if a process exits.
async fn wait_for_listener(port: u16, processes: &mut [Process]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        fail_if_exited(processes)?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the master did not listen on port {port} within 30 s; see its log"
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

/// Waits until the master has booted and both edges are online; fails, with the log's
/// end, if a process exits first.
async fn wait_until_up(api: &mut Api, processes: &mut [Process]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        fail_if_exited(processes)?;
        api.read_token();
        if !api.token.is_empty()
            && let Ok(Value::Array(edges)) = api.get("/api/v1/edges").await
            && edges.len() == EDGES.len()
            && edges.iter().all(|e| e["online"] == true)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the master and its edges were not up within 60 s; see the logs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

fn print_banner(layout: &Layout, ports: &Ports, token: &str, processes: &[Process]) {
    let ca = layout.ca();
    let master_token = layout.data("master").join("admin.token");
    let edge_token = layout.data("site-1").join("admin.token");
    let edge_pid = processes
        .iter()
        .find(|p| p.name == "edge site-1")
        .map(|p| p.pid)
        .unwrap_or(0);
    let pids: Vec<String> = processes
        .iter()
        .map(|p| format!("{} {}", p.name, p.pid))
        .collect();
    println!(
        r#"
Tether is running: a master, edges site-1 (North campus: room-101, room-102) and site-2
(South store: store-201), four simulated devices.

  Dashboard    https://localhost:{api}/dashboard/#token={token}
               (signed by the demo's own CA: accept the browser's warning, or trust {ca})
  Admin token  {token}
  Metrics      https://localhost:{api}/metrics (the same token)

Try, in another terminal:

  # present input 2 in room-101, through the master (site-1's edge runs the room):
  curl -s --cacert {ca} -H "Authorization: Bearer $(cat {master_token})" \
    -d '{{"method":"present","args":[2]}}' \
    https://localhost:{api}/api/v1/systems/room-101/modules/Room/1/exec
  # the same, on the edge itself:
  curl -s --cacert {ca} -H "Authorization: Bearer $(cat {edge_token})" \
    -d '{{"method":"present","args":[3]}}' \
    https://127.0.0.1:{edge}/api/v1/systems/room-101/modules/Room/1/exec
  # with the command-line client:
  cargo run -q -p tether-cli -- --server https://localhost:{api} --ca {ca} \
    --token-file {master_token} edges
  # kill site-1's edge; after its 5 s timeout the master runs its rooms (see the dashboard):
  kill -9 {edge_pid}

Press Enter here to start stopped processes again (the edge takes its rooms back);
Ctrl-C stops everything. Processes: {pids}.
"#,
        api = ports.master_api,
        edge = ports.edge_api[0],
        ca = ca.display(),
        master_token = master_token.display(),
        edge_token = edge_token.display(),
        pids = pids.join(", "),
    );
}

/// Until Ctrl-C: reports processes that exit and changes of control, and starts stopped
/// processes again when Enter is pressed.
async fn watch(api: &Api, processes: &mut [Process]) -> anyhow::Result<()> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    // Records already shown (or there before the demo was up), by their whole text.
    let mut audit_seen: std::collections::HashSet<String> = match api.get("/api/v1/audit").await {
        Ok(Value::Array(records)) => records.iter().map(Value::to_string).collect(),
        _ => Default::default(),
    };
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
                if let Ok(Value::Array(records)) = api.get("/api/v1/audit").await {
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
