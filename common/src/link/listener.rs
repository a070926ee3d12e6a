//! The master's edge-link listener: TLS, then the challenge-response, under deadlines
//! (first bytes, whole handshake), then a [`Link`] handed to the application.
//!
//! The accept loop never pauses for peers that have not authenticated: they wait in a
//! bounded pending table ([`Admission`]) where, when it is full, the oldest is dropped
//! for the newest, so a flood of idle or silent connections can neither stop the loop nor
//! keep a reconnecting edge out. Authenticated links are capped separately (`max_links`);
//! an edge that authenticates over that cap is turned away and comes back later.

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
use crate::admission::{Activity, Admission, AdmissionLimits, Watched};
use crate::identity::EdgeId;

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
    /// A connection that has sent nothing by then is dropped.
    pub first_byte_timeout: Duration,
    /// Handshakes in progress at once, in all and per address; when full, the oldest is
    /// dropped for a new one.
    pub pending: AdmissionLimits,
    /// Authenticated links at once; an edge that authenticates over it is turned away.
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
    /// Its id, as its secret and its certificate proved it.
    pub edge_id: EdgeId,
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
    let mut pace = crate::admission::AcceptPace::default();
    let admission = Admission::new(config.pending);
    let links = Arc::new(Semaphore::new(config.max_links));
    loop {
        pace.accepted().await;
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
        let mut pending = match admission.admit_tcp(&tcp, addr.ip()) {
            Ok(admitted) => admitted,
            Err(err) => {
                tracing::debug!(%addr, "connection dropped at once: {err}");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let secrets = secrets.clone();
        let config = config.clone();
        let accepted = accepted.clone();
        let links = links.clone();
        tokio::spawn(async move {
            let gauges = config.gauges.as_ref();
            let handshaking = Counted::new(gauges.map(|g| &g.handshake));
            let outcome = tokio::select! {
                outcome = tokio::time::timeout(
                    config.handshake_timeout,
                    authenticate(tcp, &acceptor, secrets.as_ref(), config.first_byte_timeout, pending.activity()),
                ) => outcome,
                _ = pending.dropped() => Ok(Err(
                    "dropped while handshaking: the table of pending connections was full (the oldest go first)".to_string(),
                )),
            };
            drop(handshaking);
            let (edge_id, stream, leftover) = match outcome {
                Ok(Ok(done)) => done,
                // The reason may quote what the peer sent: escaped.
                Ok(Err(reason)) => {
                    let reason = crate::report::printable(&reason, 512);
                    return tracing::warn!(%addr, "edge link refused: {reason}");
                }
                Err(_) => {
                    return tracing::warn!(
                        %addr,
                        "edge link refused: handshake not finished within {} ms",
                        config.handshake_timeout.as_millis()
                    );
                }
            };
            if !pending.settle() {
                return tracing::warn!(%addr, edge = %edge_id, "edge link refused: dropped from the full pending table as it finished");
            }
            let Ok(slot) = links.try_acquire_owned() else {
                return tracing::warn!(
                    %addr,
                    edge = %edge_id,
                    "edge link refused: the master holds its maximum of {} links ([limits] max_links)",
                    config.max_links
                );
            };
            tracing::info!(edge = %edge_id, %addr, "edge link authenticated");
            let (link, incoming) =
                Link::start(stream, leftover, edge_id.clone(), config.link.clone());
            // The link's slot is held until the link ends.
            let linked = Counted::new(gauges.map(|g| &g.link));
            let watched = link.clone();
            tokio::spawn(async move {
                watched.closed().await;
                drop((slot, linked));
            });
            let edge = AuthenticatedEdge {
                edge_id: EdgeId::new(edge_id),
                addr,
                link,
                incoming,
            };
            if let Err(refused) = accepted.send(edge).await {
                refused.0.link.close("the master is shutting down");
            }
        });
    }
}

type Authenticated = (
    String,
    tokio_rustls::server::TlsStream<Watched<TcpStream>>,
    bytes::BytesMut,
);

async fn authenticate(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    secrets: &dyn EdgeSecrets,
    first_byte_timeout: Duration,
    activity: Activity,
) -> Result<Authenticated, String> {
    let _ = tcp.set_nodelay(true);
    crate::admission::first_bytes(&tcp, first_byte_timeout).await?;
    activity.touch();
    let tls = acceptor
        .accept(Watched::new(tcp, activity))
        .await
        .map_err(|err| format!("TLS handshake failed: {err}"))?;
    let exporter = server_exporter(&tls).map_err(|err| err.to_string())?;
    let (edge_id, done) = master_handshake(tls, &exporter, |id| secrets.secret(id))
        .await
        .map_err(|err| err.to_string())?;
    // A client certificate, when the master asks for one, must be this edge's own.
    if let Some(certificate) = done
        .stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
    {
        super::tls::names_edge(certificate, &edge_id)?;
    }
    Ok((edge_id, done.stream, done.leftover))
}
