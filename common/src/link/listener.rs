//! The master's edge-link listener: TLS, then the challenge-response, under a deadline and
//! a cap on handshakes in progress, then a [`Link`] handed to the application. A cap on all
//! connections (handshaking or linked) bounds what the listener holds whatever peers do:
//! at either cap it stops accepting, and later peers wait in the kernel's accept queue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::handshake::{master_handshake, server_exporter};
use super::{Incoming, Link, LinkConfig, Secret};

/// Where the listener learns which edges exist and their secrets.
pub trait EdgeSecrets: Send + Sync + 'static {
    /// The secret of edge `edge_id`, if it is one of ours.
    fn secret(&self, edge_id: &str) -> Option<Secret>;
}

/// Listener tunables.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// A connection that has not authenticated by then is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; further connections wait to be accepted.
    pub max_pending_handshakes: usize,
    /// Connections at once, handshaking or linked; further connections wait to be
    /// accepted until a link ends.
    pub max_links: usize,
    /// Gauges of the connections held, by stage (`handshake`, `link`), for `/metrics`.
    pub gauges: Option<ConnectionGauges>,
    /// Settings of the links that result.
    pub link: LinkConfig,
}

/// The gauges a listener keeps of its connections.
#[derive(Debug, Clone)]
pub struct ConnectionGauges {
    /// Connections in their handshake.
    pub handshake: IntGauge,
    /// Authenticated links.
    pub link: IntGauge,
}

/// One connection counted in a gauge while this lives.
struct Counted(Option<IntGauge>);

impl Counted {
    fn new(gauge: Option<&IntGauge>) -> Self {
        if let Some(gauge) = gauge {
            gauge.inc();
        }
        Counted(gauge.cloned())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(gauge) = &self.0 {
            gauge.dec();
        }
    }
}

/// An edge that proved its identity.
#[derive(Debug)]
pub struct AuthenticatedEdge {
    /// Its id.
    pub edge_id: String,
    /// Its address.
    pub addr: SocketAddr,
    /// The link.
    pub link: Link,
    /// What the edge sends.
    pub incoming: mpsc::Receiver<Incoming>,
}

/// Accepts edge links until `shutdown`, sending each authenticated one to `accepted`.
/// Every refusal is logged with the peer's address and the reason.
pub async fn run_listener(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    secrets: Arc<dyn EdgeSecrets>,
    config: ListenerConfig,
    accepted: mpsc::Sender<AuthenticatedEdge>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let pending = Arc::new(Semaphore::new(config.max_pending_handshakes));
    let connections = Arc::new(Semaphore::new(config.max_links));
    loop {
        // At a cap, stop accepting: later edges wait in the kernel's accept queue (and
        // their own handshake deadline) instead of being dropped and coming back a
        // reconnect period later, which would turn a storm of thousands into many rounds.
        let slot = tokio::select! {
            slot = connections.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let permit = tokio::select! {
            permit = pending.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let (tcp, addr) = tokio::select! {
            result = listener.accept() => match result {
                Ok(conn) => conn,
                Err(err) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!("edge link accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let acceptor = acceptor.clone();
        let secrets = secrets.clone();
        let config = config.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let gauges = config.gauges.as_ref();
            let handshaking = Counted::new(gauges.map(|g| &g.handshake));
            let outcome = tokio::time::timeout(
                config.handshake_timeout,
                authenticate(tcp, &acceptor, secrets.as_ref()),
            )
            .await;
            drop((permit, handshaking));
            match outcome {
                Ok(Ok((edge_id, stream, leftover))) => {
                    tracing::info!(edge = %edge_id, %addr, "edge link authenticated");
                    let (link, incoming) =
                        Link::start(stream, leftover, edge_id.clone(), config.link.clone());
                    // The connection's slot is held until the link ends.
                    let linked = Counted::new(gauges.map(|g| &g.link));
                    let watched = link.clone();
                    tokio::spawn(async move {
                        watched.closed().await;
                        drop((slot, linked));
                    });
                    let edge = AuthenticatedEdge {
                        edge_id,
                        addr,
                        link,
                        incoming,
                    };
                    if let Err(refused) = accepted.send(edge).await {
                        refused.0.link.close("the master is shutting down");
                    }
                }
                Ok(Err(reason)) => tracing::warn!(%addr, "edge link refused: {reason}"),
                Err(_) => tracing::warn!(
                    %addr,
                    "edge link refused: handshake not finished within {} ms",
                    config.handshake_timeout.as_millis()
                ),
            }
        });
    }
}

type Authenticated = (
    String,
    tokio_rustls::server::TlsStream<TcpStream>,
    bytes::BytesMut,
);

async fn authenticate(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    secrets: &dyn EdgeSecrets,
) -> Result<Authenticated, String> {
    let _ = tcp.set_nodelay(true);
    let tls = acceptor
        .accept(tcp)
        .await
        .map_err(|err| format!("TLS handshake failed: {err}"))?;
    let exporter = server_exporter(&tls).map_err(|err| err.to_string())?;
    let (edge_id, done) = master_handshake(tls, &exporter, |id| secrets.secret(id))
        .await
        .map_err(|err| err.to_string())?;
    Ok((edge_id, done.stream, done.leftover))
}
