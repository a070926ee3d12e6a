//! `tether-edge`: one per site; runs the site's modules and keeps a link to the master.
#![forbid(unsafe_code)]

mod api;
mod code;
mod control;
mod proxy;
mod replica;
mod server;
mod sync;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "tether-edge",
    version,
    about = "Tether's edge server, one per site"
)]
struct Cli {
    /// The edge's configuration file (edge.toml).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match server::run(&cli.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!(
                "tether-edge: {}",
                tether_common::report::one_line(err.as_ref())
            );
            ExitCode::from(2)
        }
    }
}
