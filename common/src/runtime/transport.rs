//! What transports tell a module, and the backoff they share.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// An event of a module's device connection.
#[derive(Debug)]
pub(super) enum TransportEvent {
    /// Connected: the script's `connected` runs.
    Connected,
    /// The connection ended: the script's `disconnected` runs.
    Disconnected(String),
    /// A connection attempt failed (logged to the module's debug ring).
    Failed(String),
    /// A frame from the device: the script's `received` runs.
    Received(Vec<u8>),
}

/// Reconnect delays: 250 ms doubling up to 10 s, reset by a success.
#[derive(Debug)]
pub(super) struct Backoff {
    next: Duration,
}

const FIRST: Duration = Duration::from_millis(250);
const MAX: Duration = Duration::from_secs(10);

impl Backoff {
    /// Starts at the first delay.
    pub(super) fn new() -> Self {
        Backoff { next: FIRST }
    }

    /// Back to the first delay.
    pub(super) fn reset(&mut self) {
        self.next = FIRST;
    }

    /// Sleeps the current delay and doubles it; `Err` when cancelled meanwhile.
    pub(super) async fn wait(&mut self, cancel: &CancellationToken) -> Result<(), ()> {
        let delay = self.next;
        self.next = (self.next * 2).min(MAX);
        tokio::select! {
            _ = cancel.cancelled() => Err(()),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}
