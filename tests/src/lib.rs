//! Tether's end-to-end test harness: the real binaries on loopback with temporary data
//! folders and free ports, a fault-injecting TCP proxy, and an HTTPS client for the API.
//! Every process a test starts is SIGKILLed when its handle drops, so a failing test
//! leaves nothing behind.

pub mod api;
pub mod cluster;
pub mod inproc;
pub mod process;
pub mod proxy;
pub mod sim;
pub mod ws;

use std::time::{Duration, Instant};

/// The workspace's example drivers (`drivers/`), for site files in tests.
pub fn drivers_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace folder")
        .join("drivers")
}

/// A free loopback port: bound, read and released. Another process could take it in the
/// instant between, which on a test machine does not happen in practice.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("no free loopback port")
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
