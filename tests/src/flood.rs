//! Floods of connections that never authenticate, as an attacker on the network would
//! send them: each worker connects from its own loopback address (a botnet comes from many
//! addresses, so per-address caps alone do not stop it), holds the connection saying
//! nothing, and connects again as soon as the server drops it, until the flood is dropped.
//!
//! Floods run on a thread of their own (one tokio runtime for all floods of a process), as
//! an attacker's machine would: the test's own clients must not wait behind the attacker's
//! work in the test's runtime, only for the server; and on a small machine the attacker
//! takes one core, not all of them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

/// What the flood's connections do once connected.
#[derive(Clone)]
pub enum FloodKind {
    /// Nothing: a TCP connection that sends no byte.
    IdleTcp,
    /// A finished TLS handshake (with this client configuration), then nothing.
    SilentTls(Arc<rustls::ClientConfig>),
}

/// A running flood; dropping it closes every connection.
pub struct Flood {
    stop: CancellationToken,
    /// Connections opened (TCP connected), since the start.
    pub opened: Arc<AtomicU64>,
    /// Connections the server ended (closed or reset), since the start.
    pub dropped: Arc<AtomicU64>,
    /// Connections that finished their TLS handshake.
    pub tls_done: Arc<AtomicU64>,
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The one thread every flood of this process runs on.
fn flood_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("flood")
            .enable_all()
            .build()
            .expect("the floods' runtime")
    })
}

/// The `i`-th flood address: 127.1.0.1 and on (all of 127.0.0.0/8 is loopback on Linux).
fn source(i: usize) -> IpAddr {
    let i = i as u32;
    IpAddr::V4(Ipv4Addr::new(
        127,
        1 + (i / 62_500) as u8,
        ((i / 250) % 250) as u8,
        (i % 250) as u8 + 1,
    ))
}

async fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(target).await
}

impl Flood {
    /// Starts `connections` workers against `target`, on the floods' thread.
    pub fn start(target: SocketAddr, connections: usize, kind: FloodKind) -> Flood {
        let runtime = flood_runtime();
        let flood = Flood {
            stop: CancellationToken::new(),
            opened: Arc::default(),
            dropped: Arc::default(),
            tls_done: Arc::default(),
        };
        for i in 0..connections {
            let (stop, opened, dropped, tls_done) = (
                flood.stop.clone(),
                flood.opened.clone(),
                flood.dropped.clone(),
                flood.tls_done.clone(),
            );
            let kind = kind.clone();
            runtime.spawn(async move {
                let from = source(i);
                while !stop.is_cancelled() {
                    let held = async {
                        let tcp = connect_from(from, target).await?;
                        opened.fetch_add(1, Ordering::Relaxed);
                        match &kind {
                            FloodKind::IdleTcp => hold(tcp).await,
                            FloodKind::SilentTls(config) => {
                                let name = tether_common::link::tls::server_name("localhost")
                                    .map_err(std::io::Error::other)?;
                                let tls = TlsConnector::from(config.clone())
                                    .connect(name, tcp)
                                    .await?;
                                tls_done.fetch_add(1, Ordering::Relaxed);
                                hold(tls).await
                            }
                        }
                    };
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        result = held => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            if result.is_err() {
                                // Refused or out of ports: do not spin.
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
            });
        }
        flood
    }

    /// Connections opened so far.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Connections the server ended so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until `count` connections have been opened (or `limit` passed).
    pub async fn wait_opened(&self, count: u64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.opened() < count && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Reads (and throws away) until the server ends the connection.
async fn hold<S: tokio::io::AsyncRead + Unpin>(mut stream: S) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    loop {
        if stream.read(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}
