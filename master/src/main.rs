//! `tether-master`: the data model, the client API, the edge link listener.
#![forbid(unsafe_code)]

mod api;
mod control;
mod edge_link;
mod edges;
mod import;
mod model;
mod proxy;
mod repos;
mod seed;
mod server;
mod sync;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tether-master", version, about = "Tether's master server")]
#[command(args_conflicts_with_subcommands = true, arg_required_else_help = true)]
struct Cli {
    /// The master's configuration file (master.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
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
        (None, Some(config)) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            match server::run(&config) {
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
