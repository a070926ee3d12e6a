//! A fault-injecting TCP proxy to put between an edge and its master.
//!
//! `cut` models a network partition: nothing moves either way and new connections hang,
//! but no connection is closed, so TCP on both ends sees silence, as with a pulled cable.
//! `heal` lets the held bytes flow again. `delay` adds latency to every chunk each way.
//! `reset` closes every connection at once, as a crashed middlebox would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

struct State {
    cut: watch::Sender<bool>,
    delay_ms: AtomicU64,
    connections: Mutex<Vec<JoinHandle<()>>>,
    accepted: AtomicU64,
}

/// A running proxy from a loopback port to `upstream`. Stops when dropped.
pub struct FaultProxy {
    addr: std::net::SocketAddr,
    state: Arc<State>,
    accept_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:port` (0 for any) and forwards to `upstream`.
    pub async fn start(port: u16, upstream: std::net::SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let state = Arc::new(State {
            cut: watch::channel(false).0,
            delay_ms: AtomicU64::new(0),
            connections: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
        });
        let accept_state = state.clone();
        let accept_task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                accept_state.accepted.fetch_add(1, Ordering::Relaxed);
                let state = accept_state.clone();
                let task = tokio::spawn(async move { forward(client, upstream, state).await });
                let mut connections = accept_state.connections.lock().unwrap();
                connections.retain(|t| !t.is_finished());
                connections.push(task);
            }
        });
        FaultProxy {
            addr,
            state,
            accept_task,
        }
    }

    /// The address to connect to instead of the upstream.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stops all traffic; connections stay open.
    pub fn cut(&self) {
        self.state.cut.send_replace(true);
    }

    /// Lets traffic flow again.
    pub fn heal(&self) {
        self.state.cut.send_replace(false);
    }

    /// Adds `delay` to every chunk, each way.
    pub fn delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Closes every current connection.
    pub fn reset(&self) {
        for task in self.state.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.reset();
    }
}

async fn wait_until_flowing(cut: &mut watch::Receiver<bool>) {
    // A dropped sender means the proxy is gone; the task is aborted then anyway.
    let _ = cut.wait_for(|cut| !*cut).await;
}

async fn forward(client: TcpStream, upstream: std::net::SocketAddr, state: Arc<State>) {
    let mut cut = state.cut.subscribe();
    // During a partition a connection attempt goes nowhere.
    wait_until_flowing(&mut cut).await;
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, state.clone());
    let down = pump(server_read, client_write, state);
    // When either direction ends, the whole connection ends.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Moves bytes one way: a reader task stamps each chunk with its due time, a writer task
/// holds it until then and while the link is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let mut cut = state.cut.subscribe();
    let reader_state = state.clone();
    let reader = async move {
        let mut reader_cut = reader_state.cut.subscribe();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            wait_until_flowing(&mut reader_cut).await;
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let delay = Duration::from_millis(reader_state.delay_ms.load(Ordering::Relaxed));
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            wait_until_flowing(&mut cut).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
