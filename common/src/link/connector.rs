//! The edge's side of the link: connect, TLS, prove the secret, and keep doing so every
//! reconnect period (plus jitter) for as long as the edge runs.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::handshake::{client_exporter, edge_handshake};
use super::{Incoming, Link, LinkConfig, Secret};
use crate::identity::EdgeId;

/// How an edge reaches its master(s).
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// `host:port` of each master's link listener, in the order to try them.
    pub master_addrs: Vec<String>,
    /// The name on the masters' certificates.
    pub server_name: ServerName<'static>,
    /// TLS client configuration (CA, client certificate).
    pub tls: Arc<rustls::ClientConfig>,
    /// This edge's id.
    pub edge_id: EdgeId,
    /// This edge's secret.
    pub secret: Secret,
    /// Connect plus handshake must finish within this.
    pub handshake_timeout: Duration,
    /// Period between attempts.
    pub reconnect: Duration,
    /// Settings of the link.
    pub link: LinkConfig,
}

/// What happened to the link, for the edge's control logic.
#[derive(Debug)]
pub enum LinkEvent {
    /// A link is up and authenticated.
    Up {
        /// The link.
        link: Link,
        /// What the master sends.
        incoming: mpsc::Receiver<Incoming>,
    },
    /// The link that was up closed.
    Down {
        /// Why.
        reason: String,
    },
    /// An attempt to connect failed.
    AttemptFailed {
        /// Why.
        reason: String,
    },
}

/// One try of one master: TCP, TLS, handshake, within the handshake timeout.
async fn connect_to(
    config: &ConnectorConfig,
    addr: &str,
) -> Result<(Link, mpsc::Receiver<Incoming>), String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|err| format!("cannot connect to {addr}: {err}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(config.tls.clone())
            .connect(config.server_name.clone(), tcp)
            .await
            .map_err(|err| format!("TLS handshake with {addr} failed: {err}"))?;
        let exporter = client_exporter(&tls).map_err(|err| err.to_string())?;
        let done = edge_handshake(tls, &exporter, &config.edge_id, &config.secret)
            .await
            .map_err(|err| format!("{addr}: {err}"))?;
        Ok(Link::start(
            done.stream,
            done.leftover,
            addr.to_string(),
            config.link.clone().answering(),
        ))
    };
    match tokio::time::timeout(config.handshake_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no authenticated link to {addr} within {} ms",
            config.handshake_timeout.as_millis()
        )),
    }
}

/// One attempt: each master in order until one links; fails when every one failed (the
/// master is unreachable), naming why each did.
pub async fn connect_once(
    config: &ConnectorConfig,
) -> Result<(Link, mpsc::Receiver<Incoming>), String> {
    let mut failures = Vec::new();
    for addr in &config.master_addrs {
        match connect_to(config, addr).await {
            Ok(linked) => return Ok(linked),
            Err(why) => {
                if config.master_addrs.len() > 1 {
                    tracing::info!("master {addr} not reached, trying the next: {why}");
                }
                failures.push(why);
            }
        }
    }
    Err(failures.join("; "))
}

/// The wait before the next attempt: the period plus up to a sixth of it, so that many
/// edges cut off together do not all come back in the same instant.
pub fn reconnect_delay(period: Duration, rng: &mut impl Rng) -> Duration {
    let jitter_max = period / crate::control::edge::RECONNECT_JITTER_DIVISOR;
    period + jitter_max.mul_f64(rng.random::<f64>())
}

/// Keeps a link to the master up until `shutdown`, reporting every change on `events`.
/// The first attempt is immediate. After a drop the next comes exactly one period later:
/// the edge's control takes over when that one attempt fails, and DESIGN.md gives it 3 s,
/// not 3 s plus jitter. After a failed attempt it waits [`reconnect_delay`], so that
/// edges retrying a master that is down spread out.
pub async fn maintain_link(
    config: ConnectorConfig,
    events: mpsc::Sender<LinkEvent>,
    shutdown: CancellationToken,
) {
    loop {
        let attempt = tokio::select! {
            attempt = connect_once(&config) => attempt,
            _ = shutdown.cancelled() => return,
        };
        let delay = match &attempt {
            Ok(_) => config.reconnect,
            Err(_) => reconnect_delay(config.reconnect, &mut rand::rng()),
        };
        match attempt {
            Ok((link, incoming)) => {
                tracing::info!(master = %link.peer(), "link to the master is up");
                if events
                    .send(LinkEvent::Up {
                        link: link.clone(),
                        incoming,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::select! {
                    _ = link.closed() => {}
                    _ = shutdown.cancelled() => {
                        link.close("the edge is shutting down");
                        return;
                    }
                }
                let reason = link.close_reason().unwrap_or_default();
                tracing::warn!(master = %link.peer(), "link to the master is down: {reason}");
                if events.send(LinkEvent::Down { reason }).await.is_err() {
                    return;
                }
            }
            Err(reason) => {
                tracing::warn!("link attempt failed: {reason}");
                if events
                    .send(LinkEvent::AttemptFailed { reason })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_delay_stays_within_the_period_and_a_sixth() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let period = Duration::from_secs(3);
        let delays: Vec<_> = (0..1000)
            .map(|_| reconnect_delay(period, &mut rng))
            .collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= period && *d <= Duration::from_millis(3500))
        );
        // Jitter really spreads the attempts.
        let spread =
            delays.iter().max().unwrap().as_millis() - delays.iter().min().unwrap().as_millis();
        assert!(spread > 400, "spread {spread} ms");
    }
}
