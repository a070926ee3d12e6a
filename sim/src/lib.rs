//! `tether-sim`: device simulators for the demo, the tests and driver writers.
//!
//! Each prints one JSON line per event on stdout (`listening`, `connect`, `disconnect`,
//! `refused`, `command`), with the peer address and a timestamp, so a test can see who
//! controlled a device and when two controllers overlapped. A library too, so that
//! `tether-master demo` can start devices from its own binary.
#![forbid(unsafe_code)]

mod events;
mod modbus;
mod projector;

use std::net::SocketAddr;

use clap::Subcommand;

/// A simulated device and where it listens.
#[derive(Debug, Clone, Subcommand)]
pub enum Device {
    /// A projector with a line protocol (commands and replies end in `\r`):
    /// `PWR ON`, `PWR OFF`, `PWR?`, `INPUT n`, `INPUT?`; anything else gets `ERR`.
    Projector {
        /// Address to listen on (`127.0.0.1:0` picks a port; see the `listening` event).
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// Sessions allowed at once; a further connection is refused (closed at once).
        #[arg(long, value_name = "N", default_value_t = 1)]
        max_sessions: usize,
    },
    /// A Modbus TCP energy meter: holding registers and coils 0..=9 (read/write); input
    /// registers 0 voltage (0.1 V), 1 current (0.01 A), 2-3 energy (Wh, high word first,
    /// growing every second).
    Modbus {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
    },
}

/// Runs the device until the task is dropped or its listener fails.
pub async fn run(device: Device) -> anyhow::Result<()> {
    match device {
        Device::Projector {
            listen,
            max_sessions,
        } => projector::run(listen, max_sessions.max(1)).await,
        Device::Modbus { listen } => modbus::run(listen).await,
    }
}
