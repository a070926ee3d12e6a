//! Many edges in one process, each on its own link made by the real link code (TCP, TLS,
//! the secret handshake, heartbeats, reconnects with jitter), each keeping a replica
//! position and a control state as an edge does, without modules or a database: what
//! the master sees is N edges. Every replica update and every finished renegotiation is
//! reported with its time, for the fan-out and storm scenarios.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_common::link::{ConnectorConfig, Incoming, Link, LinkEvent, maintain_link};
use tether_common::protocol::{
    ControlOwner, ErrorCode, ModelBatch, RemoteError, Request, Response,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long the master may take to answer a sync request or a control report.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// What a simulated edge reports.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    /// Its replica reached `version`.
    Synced {
        edge: usize,
        version: u64,
        at: Instant,
    },
    /// On a new link, the master decided who controls it and answered its sync request.
    Renegotiated { edge: usize, at: Instant },
    /// A link went down.
    Down,
}

/// What one simulated edge remembers across links, as an edge's database would.
#[derive(Debug, Default)]
struct EdgeState {
    model_id: u64,
    version: u64,
    owner: Option<ControlOwner>,
    epoch: tether_common::control::Epoch,
}

/// Attempts to link that failed, since the swarm started, by why: what tells a storm
/// slowed by the master's work from one slowed by retries.
#[derive(Debug, Default)]
pub struct FailedAttempts {
    /// No authenticated link within the handshake timeout.
    pub timed_out: AtomicUsize,
    /// The TCP connect failed (refused: the master not listening yet; reset).
    pub not_connected: AtomicUsize,
    /// The TLS handshake or the secret handshake failed or was cut.
    pub refused: AtomicUsize,
}

impl FailedAttempts {
    fn count(&self, reason: &str) {
        let counter = if reason.contains("no authenticated link") {
            &self.timed_out
        } else if reason.contains("cannot connect") {
            &self.not_connected
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now: timed out, not connected, refused.
    pub fn snapshot(&self) -> [usize; 3] {
        [&self.timed_out, &self.not_connected, &self.refused].map(|c| c.load(Ordering::Relaxed))
    }
}

/// The running swarm; dropping it closes every link.
pub struct Swarm {
    pub events: mpsc::UnboundedReceiver<Event>,
    /// Failed attempts of all its edges.
    pub failed: Arc<FailedAttempts>,
    shutdown: CancellationToken,
}

impl Drop for Swarm {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Swarm {
    /// Starts one simulated edge per connector, all at once.
    pub fn start(connectors: Vec<ConnectorConfig>) -> Swarm {
        let (events_tx, events) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let failed = Arc::new(FailedAttempts::default());
        for (edge, connector) in connectors.into_iter().enumerate() {
            let (link_tx, link_rx) = mpsc::channel(4);
            tokio::spawn(maintain_link(connector, link_tx, shutdown.clone()));
            tokio::spawn(follow(edge, link_rx, events_tx.clone(), failed.clone()));
        }
        Swarm {
            events,
            failed,
            shutdown,
        }
    }
}

/// Serves each link of one edge as it comes up.
async fn follow(
    edge: usize,
    mut links: mpsc::Receiver<LinkEvent>,
    events: mpsc::UnboundedSender<Event>,
    failed: Arc<FailedAttempts>,
) {
    let state = Arc::new(Mutex::new(EdgeState::default()));
    while let Some(event) = links.recv().await {
        match event {
            LinkEvent::Up { link, incoming } => {
                let peer = Peer {
                    edge,
                    link,
                    state: state.clone(),
                    events: events.clone(),
                };
                tokio::spawn(peer.serve(incoming));
            }
            LinkEvent::Down { .. } => {
                let _ = events.send(Event::Down);
            }
            LinkEvent::AttemptFailed { reason } => failed.count(&reason),
        }
    }
}

/// One simulated edge on one link.
#[derive(Clone)]
struct Peer {
    edge: usize,
    link: Link,
    state: Arc<Mutex<EdgeState>>,
    events: mpsc::UnboundedSender<Event>,
}

impl Peer {
    fn state(&self) -> std::sync::MutexGuard<'_, EdgeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reports control and asks for changes, as an edge does when its link comes up, and
    /// answers the master until the link closes.
    async fn serve(self, mut incoming: mpsc::Receiver<Incoming>) {
        let (decided_tx, decided) = tokio::sync::oneshot::channel();
        let mut decided_tx = Some(decided_tx);
        tokio::spawn(self.clone().open(decided));
        while let Some(item) = incoming.recv().await {
            let Incoming::Request(request) = item else {
                continue;
            };
            let answer = match request.body {
                Request::ControlDecision { owner, epoch, .. } => {
                    let mut state = self.state();
                    if epoch < state.epoch {
                        Err(RemoteError::new(
                            ErrorCode::StaleEpoch,
                            format!("epoch {epoch} is older than {}", state.epoch),
                        ))
                    } else {
                        (state.owner, state.epoch) = (Some(owner), epoch);
                        if let Some(tx) = decided_tx.take() {
                            let _ = tx.send(());
                        }
                        Ok(Response::ControlAck { epoch })
                    }
                }
                Request::ModelChanges(batch) => match self.apply(&batch) {
                    true => Ok(Response::Ack),
                    false => Err(RemoteError::new(
                        ErrorCode::BadRequest,
                        "the batch does not follow on",
                    )),
                },
                Request::MasterReady | Request::Hello { .. } | Request::RepositoryUpdate { .. } => {
                    Ok(Response::Ack)
                }
                _ => Err(RemoteError::new(
                    ErrorCode::Unsupported,
                    "a simulated edge runs no modules",
                )),
            };
            request.responder.respond(answer).await;
        }
    }

    /// The opening of a link: the control report and the sync request; reports the
    /// renegotiation once the master has answered both.
    async fn open(self, decided: tokio::sync::oneshot::Receiver<()>) {
        let (owner, epoch, model_id, since_version) = {
            let state = self.state();
            (
                state.owner.unwrap_or(ControlOwner::Edge),
                state.epoch,
                state.model_id,
                state.version,
            )
        };
        let report = Request::ControlReport {
            owner,
            epoch,
            // A simulated edge runs its (absent) modules whenever it owns them.
            controlling: owner == ControlOwner::Edge,
        };
        let sync = Request::SyncRequest {
            model_id,
            since_version,
        };
        let (reported, synced) = tokio::join!(
            self.link.request(report, REQUEST_TIMEOUT),
            self.link.request(sync, REQUEST_TIMEOUT)
        );
        let synced = match synced {
            Ok(Response::ModelChanges(batch)) => self.apply(&batch),
            _ => false,
        };
        if reported.is_ok() && synced && decided.await.is_ok() {
            let _ = self.events.send(Event::Renegotiated {
                edge: self.edge,
                at: Instant::now(),
            });
        }
    }

    /// Moves the replica position as an edge applies a batch: a snapshot anywhere,
    /// changes only from where the replica stands.
    fn apply(&self, batch: &ModelBatch) -> bool {
        let mut state = self.state();
        let follows = batch.snapshot
            || (batch.model_id == state.model_id && batch.from_version <= state.version);
        if follows {
            state.model_id = batch.model_id;
            state.version = state.version.max(batch.to_version);
            let _ = self.events.send(Event::Synced {
                edge: self.edge,
                version: state.version,
                at: Instant::now(),
            });
        }
        follows
    }
}
