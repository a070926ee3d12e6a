//! `tether-master`: the data model, the client API, the edge link listener.
#![forbid(unsafe_code)]

mod api;
mod cluster;
mod control;
mod demo;
mod edge_link;
mod edges;
mod forward;
mod import;
mod link_guard;
mod model;
mod proxy;
mod repos;
mod seed;
mod server;
mod sync;
mod ws_relay;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether_common::logging::{self, LogFormat};
use tether_common::shutdown::StopOn;

#[derive(Parser)]
#[command(name = "tether-master", version, about = "Tether's master server")]
#[command(args_conflicts_with_subcommands = true, arg_required_else_help = true)]
struct Cli {
    /// The master's configuration file (master.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log lines as `text` or `json` (one object per line), on stderr.
    #[arg(long, value_name = "FORMAT", default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Write a development PKI: a CA, a master certificate, and per edge a client
    /// certificate and a secret. Existing files are kept.
    Certs {
        /// Folder to write into.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Edge ids, comma-separated.
        #[arg(long, value_name = "ID,ID", value_delimiter = ',')]
        edges: Vec<String>,
    },
    /// Load a site file into the data model of a stopped master: every record in the file
    /// is created or replaced (nothing is deleted), each change logged for the edges.
    Import {
        /// The site file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The master's configuration file (for its data_dir).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Tether in one command: a master, two edges and simulated devices as child
    /// processes, two sites seeded with rooms; prints the dashboard address, the admin
    /// token and commands to try. Ctrl-C stops everything it started.
    Demo(demo::DemoArgs),
    /// The command-line client, `tether`, from this binary: `tether-master cli --server
    /// URL --ca FILE --token-file FILE edges` (`tether-master cli --help` lists its
    /// commands).
    #[command(disable_help_flag = true)]
    Cli {
        /// The client's arguments.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<std::ffi::OsString>,
    },
    /// A process of the demo (started by `demo`; it ends when the demo's pipe closes).
    #[command(hide = true, subcommand)]
    DemoChild(demo::Child),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match (cli.command, cli.config) {
        (Some(Command::Certs { dir, edges }), _) => certs(&dir, &edges),
        (Some(Command::Import { file, config }), _) => match import::run(&config, &file) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!(
                    "tether-master: {}",
                    tether_common::report::one_line(err.as_ref())
                );
                ExitCode::from(2)
            }
        },
        (Some(Command::Demo(args)), _) => demo::run(args, cli.log_format),
        (Some(Command::Cli { args }), _) => {
            tether_cli::main_from(std::iter::once("tether-master cli".into()).chain(args))
        }
        (Some(Command::DemoChild(child)), _) => {
            logging::init(cli.log_format);
            match demo::run_child(child) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!(
                        "tether-master demo-child: {}",
                        tether_common::report::one_line(err.as_ref())
                    );
                    ExitCode::from(2)
                }
            }
        }
        (None, Some(config)) => {
            logging::init(cli.log_format);
            match server::run(&config, StopOn::Signals) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!(
                        "tether-master: {}",
                        tether_common::report::one_line(err.as_ref())
                    );
                    ExitCode::from(2)
                }
            }
        }
        (None, None) => {
            eprintln!("tether-master: --config FILE is required");
            ExitCode::from(2)
        }
    }
}

fn certs(dir: &std::path::Path, edges: &[String]) -> ExitCode {
    for edge in edges {
        let valid = !edge.is_empty()
            && edge
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid {
            eprintln!(
                "tether-master: --edges: {edge:?} is not an edge id (letters, digits, '-', '_', '.')"
            );
            return ExitCode::from(2);
        }
    }
    match tether_common::pki::write_dir(dir, edges) {
        Ok(created) => {
            for path in &created {
                println!("created {}", path.display());
            }
            if created.is_empty() {
                println!("all files exist already in {}", dir.display());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("tether-master: {err}");
            ExitCode::from(2)
        }
    }
}
