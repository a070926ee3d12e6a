//! `tether-sim`: device simulators for the demo, the tests and driver writers.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tether_sim::Device;

#[derive(Parser)]
#[command(name = "tether-sim", version, about = "Tether's device simulators")]
struct Cli {
    #[command(subcommand)]
    device: Device,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tether-sim: cannot start the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(tether_sim::run(cli.device)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tether-sim: {err:#}");
            ExitCode::from(2)
        }
    }
}
