//! Tether's end-to-end test harness: the real binaries on loopback with temporary data
//! folders and free ports, a fault-injecting TCP proxy, and an HTTPS client for the API.
//! Every process a test starts is SIGKILLed when its handle drops, so a failing test
//! leaves nothing behind.

pub mod api;
pub mod browser;
pub mod campaign;
pub mod cluster;
pub mod demo;
pub mod etcd;
pub mod flood;
pub mod inproc;
pub mod masters;
pub mod masters_campaign;
pub mod pair;
pub mod process;
pub mod proxy;
pub mod receiver;
pub mod rogue;
pub mod sim;
pub mod skew;
pub mod ws;

use std::time::{Duration, Instant};

/// A cluster's copy of the workspace's example drivers, as a site file names it (the
/// repository `path`, relative to the cluster's folder, inside its repositories root).
pub const CORE: &str = "repos/core";

/// The workspace's example drivers (`drivers/`), to read (site files name [`CORE`]).
pub fn drivers_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace folder")
        .join("drivers")
}

/// A free loopback port for a server a test starts, from below the kernel's ephemeral
/// range (32768 and up on Linux), so that no outgoing connection of a running test (an
/// edge's link, a client) can take it between this check and the server's bind; each
/// call in a process gets another port, from a random start so that test processes
/// rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        rand::random_range(0..SPAN),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN)
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `limit` saying what
/// it waited for.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if start.elapsed() > limit {
            panic!(
                "timed out after {} ms waiting for {what}",
                limit.as_millis()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
