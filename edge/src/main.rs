//! `tether-edge`: one per site; runs the site's modules and keeps a link to the master.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tether_common::logging::{self, LogFormat};
use tether_common::shutdown::StopOn;

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
    /// Log lines as `text` or `json` (one object per line), on stderr.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match tether_edge::run(&cli.config, StopOn::Signals) {
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
