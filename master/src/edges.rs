//! The master's view of its edges: their configuration and secrets, and which link is
//! current for each. A newer authenticated link replaces the old one; only the current
//! link's closing marks an edge offline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tether_common::link::{EdgeSecrets, Link, Secret};
use tether_config::SiteEdge;

struct EdgeEntry {
    config: SiteEdge,
    secret: Option<Secret>,
    /// The current link and a number that tells it from the links it replaced.
    link: Option<(u64, Link)>,
    connected_since_ms: Option<u64>,
    /// Last frame from the last link, kept after it closes.
    last_seen_ms: Option<u64>,
}

/// Every configured edge and its link.
pub struct EdgeRegistry {
    edges: Mutex<HashMap<String, EdgeEntry>>,
    next_generation: std::sync::atomic::AtomicU64,
}

/// One edge as `GET /api/v1/edges` shows it.
#[derive(Debug, Serialize)]
pub struct EdgeView {
    id: String,
    name: String,
    online: bool,
    last_seen: Option<String>,
    connected_since: Option<String>,
    rtt_ms: Option<f64>,
    failover: bool,
    timeout_ms: u64,
}

fn rfc3339(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EdgeRegistry {
    /// A registry of the site file's edges. An edge whose secret cannot be read is logged
    /// and cannot authenticate; the others are unaffected.
    pub fn new(edges: &[SiteEdge]) -> Arc<Self> {
        let entries = edges
            .iter()
            .map(|config| {
                let secret = match Secret::load(&config.secret_file) {
                    Ok(secret) => Some(secret),
                    Err(err) => {
                        tracing::error!(edge = %config.id, "edge cannot authenticate: {err}");
                        None
                    }
                };
                let entry = EdgeEntry {
                    config: config.clone(),
                    secret,
                    link: None,
                    connected_since_ms: None,
                    last_seen_ms: None,
                };
                (config.id.clone(), entry)
            })
            .collect();
        Arc::new(EdgeRegistry {
            edges: Mutex::new(entries),
            next_generation: 1.into(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, EdgeEntry>> {
        self.edges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `link` the edge's current link, closing the one it replaces. Returns the
    /// link's generation, for [`detach`](Self::detach).
    pub fn attach(&self, edge_id: &str, link: Link, addr: std::net::SocketAddr) -> Option<u64> {
        let generation = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut edges = self.lock();
        let entry = edges.get_mut(edge_id)?;
        if let Some((_, old)) = entry.link.replace((generation, link)) {
            tracing::warn!(edge = %edge_id, %addr, "a newer authenticated link replaces the edge's current one");
            old.close(format!("replaced by a newer link from {addr}"));
        }
        entry.connected_since_ms = Some(now_ms());
        tracing::info!(edge = %edge_id, %addr, "edge online");
        Some(generation)
    }

    /// Marks the edge offline if `generation` is still its current link.
    pub fn detach(&self, edge_id: &str, generation: u64, reason: &str) {
        let mut edges = self.lock();
        let Some(entry) = edges.get_mut(edge_id) else {
            return;
        };
        if let Some((current, link)) = &entry.link
            && *current == generation
        {
            entry.last_seen_ms = Some(link.last_seen_unix_ms());
            entry.link = None;
            entry.connected_since_ms = None;
            tracing::warn!(edge = %edge_id, "edge offline: {reason}");
        }
    }

    /// Closes every link (shutdown).
    pub fn close_all(&self, reason: &str) {
        for entry in self.lock().values() {
            if let Some((_, link)) = &entry.link {
                link.close(reason);
            }
        }
    }

    /// All edges, sorted by id.
    pub fn views(&self) -> Vec<EdgeView> {
        let edges = self.lock();
        let mut views: Vec<EdgeView> = edges
            .values()
            .map(|entry| {
                let link = entry.link.as_ref().map(|(_, link)| link);
                let online = link.is_some_and(|link| !link.is_closed());
                let last_seen = link.map(|l| l.last_seen_unix_ms()).or(entry.last_seen_ms);
                EdgeView {
                    id: entry.config.id.clone(),
                    name: entry.config.name.clone(),
                    online,
                    last_seen: last_seen.map(rfc3339),
                    connected_since: entry.connected_since_ms.map(rfc3339),
                    rtt_ms: link
                        .and_then(|l| l.rtt())
                        .map(|rtt| (rtt.as_secs_f64() * 1e6).round() / 1e3),
                    failover: entry.config.failover,
                    timeout_ms: entry.config.timeout_ms,
                }
            })
            .collect();
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }
}

impl EdgeSecrets for EdgeRegistry {
    fn secret(&self, edge_id: &str) -> Option<Secret> {
        self.lock()
            .get(edge_id)
            .and_then(|entry| entry.secret.clone())
    }
}
