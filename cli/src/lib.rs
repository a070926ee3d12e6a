//! `tether`: the client API from a shell. Edges, systems, exec, status, watch (a status
//! binding), debug (a module's log), restore and audit, against a master or an edge; pull
//! and reset of driver repositories on the master.
//! Readable tables by default; `--json` prints the API's JSON for scripts.
//!
//! A library as well as the `tether` binary, so that `tether-master cli ...` runs the same
//! client from the binary a release build of the master (the demo's) already made.
#![forbid(unsafe_code)]

mod client;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use client::{Client, Failure};

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "A command-line client of Tether's API"
)]
struct Cli {
    /// The server's API address (a master or an edge).
    #[arg(long, env = "TETHER_SERVER", default_value = "https://127.0.0.1:8443")]
    server: String,
    /// The CA certificate (PEM) the server's certificate is checked against.
    #[arg(long, env = "TETHER_CA", value_name = "FILE")]
    ca: PathBuf,
    /// The bearer token.
    #[arg(
        long,
        env = "TETHER_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the bearer token (a server's `admin.token`).
    #[arg(long, env = "TETHER_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The edges: online, owner, epoch, round trip, last seen.
    Edges,
    /// The masters: each one's API, the edges whose links it holds, the units it runs.
    Masters,
    /// The control systems, or one system's modules.
    Systems {
        /// A system id.
        id: Option<String>,
    },
    /// Run a method: `tether exec room-101 Display 1 power true`.
    Exec {
        /// System id.
        system: String,
        /// Module name.
        module: String,
        /// Module index (from 1).
        index: u32,
        /// Method name.
        method: String,
        /// Arguments, each JSON (`true`, `3`, `"text"`) or else taken as a string.
        args: Vec<String>,
    },
    /// A module's status map.
    Status {
        /// System id.
        system: String,
        /// Module name.
        module: String,
        /// Module index (from 1).
        index: u32,
    },
    /// Bind to a module's status and print each change (the current values first).
    Watch {
        /// System id.
        system: String,
        /// Module name.
        module: String,
        /// Module index (from 1).
        index: u32,
        /// One status key (all keys when absent).
        key: Option<String>,
        /// Stop after this many changes.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Print a module's debug log as it is written (recent lines first).
    Debug {
        /// System id.
        system: String,
        /// Module name.
        module: String,
        /// Module index (from 1).
        index: u32,
        /// Stop after this many lines.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Give control of an edge's modules back to the edge.
    Restore {
        /// Edge id.
        edge: String,
    },
    /// Read a driver repository's newest commit and run it (master).
    Pull {
        /// Repository id.
        repository: String,
    },
    /// Run a driver repository at an earlier (or any) commit (master).
    Reset {
        /// Repository id.
        repository: String,
        /// The commit (git: a unique prefix will do).
        commit: String,
    },
    /// Changes of owner and of driver code, oldest first.
    Audit {
        /// Only this edge's.
        #[arg(long)]
        edge: Option<String>,
    },
}

fn arg_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn module_path(system: &str, module: &str, index: u32) -> String {
    format!("/api/v1/systems/{system}/modules/{module}/{index}")
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let token = match (&cli.token, &cli.token_file) {
        (Some(token), _) => token.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|err| Failure::usage(format!("{}: {err}", file.display())))?
            .trim()
            .to_string(),
        (None, None) => {
            return Err(Failure::usage(
                "a token is needed: --token, --token-file, TETHER_TOKEN or TETHER_TOKEN_FILE",
            ));
        }
    };
    let client = Client::new(&cli.server, &cli.ca, token)?;
    let json_out = cli.json;
    let show = |value: &Value, render: fn(&Value) -> String| {
        if json_out {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            );
        } else {
            print!("{}", render(value));
        }
    };
    match cli.command {
        Command::Edges => show(&client.get("/api/v1/edges").await?, table::edges),
        Command::Masters => show(&client.get("/api/v1/masters").await?, table::masters),
        Command::Systems { id: None } => {
            show(&client.get("/api/v1/systems").await?, table::systems)
        }
        Command::Systems { id: Some(id) } => show(
            &client.get(&format!("/api/v1/systems/{id}")).await?,
            table::system,
        ),
        Command::Exec {
            system,
            module,
            index,
            method,
            args,
        } => {
            let args: Vec<Value> = args.iter().map(|a| arg_value(a)).collect();
            let path = format!("{}/exec", module_path(&system, &module, index));
            show(
                &client
                    .post(&path, json!({ "method": method, "args": args }))
                    .await?,
                table::executed,
            );
        }
        Command::Status {
            system,
            module,
            index,
        } => show(
            &client
                .get(&format!("{}/status", module_path(&system, &module, index)))
                .await?,
            table::status,
        ),
        Command::Watch {
            system,
            module,
            index,
            key,
            count,
        } => {
            let mut command =
                json!({"id": 1, "cmd": "bind", "sys": system, "mod": module, "index": index});
            if let Some(key) = key {
                command["key"] = json!(key);
            }
            client
                .stream(command, "notify", count, json_out, |m| {
                    format!("{} = {}", m["key"].as_str().unwrap_or_default(), m["value"])
                })
                .await?;
        }
        Command::Debug {
            system,
            module,
            index,
            count,
        } => {
            let command =
                json!({"id": 1, "cmd": "debug", "sys": system, "mod": module, "index": index});
            client
                .stream(command, "debug", count, json_out, |m| {
                    let time = m["time_ms"]
                        .as_u64()
                        .map(tether_common::api::rfc3339)
                        .unwrap_or_default();
                    format!("{time}  {}", m["line"].as_str().unwrap_or_default())
                })
                .await?;
        }
        Command::Restore { edge } => show(
            &client
                .post(&format!("/api/v1/edges/{edge}/restore"), json!({}))
                .await?,
            table::restored,
        ),
        Command::Pull { repository } => show(
            &client
                .post(
                    &format!("/api/v1/repositories/{repository}/pull"),
                    json!({}),
                )
                .await?,
            table::moved,
        ),
        Command::Reset { repository, commit } => show(
            &client
                .post(
                    &format!("/api/v1/repositories/{repository}/reset"),
                    json!({ "commit": commit }),
                )
                .await?,
            table::moved,
        ),
        Command::Audit { edge } => {
            let path = match edge {
                Some(edge) => format!("/api/v1/audit?edge={edge}"),
                None => "/api/v1/audit".to_string(),
            };
            show(&client.get(&path).await?, table::audit);
        }
    }
    Ok(())
}

/// Runs the client on `args` (the program's name first, as `std::env::args_os` gives):
/// prints what the command answers, or the error; the exit code says which.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}
