//! What both servers show live: the edges and control changes a WebSocket client may
//! `watch`, and `GET /metrics`. Each server says what it knows through [`Overview`].

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::audit_entry_json;
use crate::metrics::{self, Metrics};
use crate::runtime::Runtime;
use crate::store::Store;

/// A server's own account of its edges, model and audit log.
pub trait Overview: Send + Sync {
    /// The edges as `GET /api/v1/edges` lists them.
    fn edges(&self) -> Vec<Value>;
    /// The data-model version this side holds.
    fn model_version(&self) -> u64;
    /// The store holding this side's audit log.
    fn store(&self) -> Arc<Store>;
}

/// The state of the live routes.
#[derive(Clone)]
pub struct Live {
    pub(super) runtime: Runtime,
    pub(super) overview: Arc<dyn Overview>,
    /// Where WebSocket commands for modules another server serves go (a master of a
    /// cluster); none: every command is served here.
    pub(super) relay: Option<Arc<dyn super::WsRelay>>,
}

impl Live {
    /// Over `runtime` (its modules and metrics) and the server's `overview`. Starts
    /// counting the changes of owner the audit log records.
    pub fn new(runtime: Runtime, overview: Arc<dyn Overview>) -> Self {
        let mut appended = overview.store().subscribe_audit();
        let counted = runtime.metrics().clone();
        tokio::spawn(async move {
            loop {
                match appended.recv().await {
                    // A refused request is no change of owner.
                    Ok(entry) if entry.source == crate::store::AuditSource::Refusal => {}
                    Ok(entry) => counted.observe_audit(&entry.record),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!("{missed} audit records were not counted in the metrics")
                    }
                    Err(_) => return,
                }
            }
        });
        Live {
            runtime,
            overview,
            relay: None,
        }
    }

    /// Sends WebSocket commands for modules another server serves there, through `relay`.
    pub fn with_relay(mut self, relay: Arc<dyn super::WsRelay>) -> Self {
        self.relay = Some(relay);
        self
    }

    fn metrics(&self) -> &Arc<Metrics> {
        self.runtime.metrics()
    }
}

/// `GET /api/v1/ws` and `GET /metrics`.
pub fn live_routes(live: Live) -> Router {
    Router::new()
        .route("/api/v1/ws", get(super::ws::ws))
        .route("/metrics", get(scrape))
        .with_state(live)
}

async fn scrape(State(live): State<Live>) -> impl IntoResponse {
    let state = metrics::State {
        edges: live.overview.edges(),
        model_version: live.overview.model_version(),
        modules: live.runtime.module_connections(),
    };
    (
        [(CONTENT_TYPE, metrics::CONTENT_TYPE)],
        live.metrics().render(&state),
    )
}

/// How often a watcher of the edges is sent their view when it changed (the round trip
/// and last-seen times change with every heartbeat).
const EDGES_EVERY: Duration = Duration::from_secs(1);
/// Audit records a new watcher is sent first.
const AUDIT_FIRST: usize = 100;

/// Sends `{"type": "edges", "edges": [...], "model_version"}` now and whenever it
/// changes, checked every second, until the queue closes or fills.
pub(super) async fn watch_edges(live: Live, out: mpsc::Sender<Value>) {
    let mut last = Value::Null;
    let mut tick = tokio::time::interval(EDGES_EVERY);
    loop {
        tick.tick().await;
        let view = json!({
            "type": "edges",
            "edges": live.overview.edges(),
            "model_version": live.overview.model_version(),
        });
        if view != last {
            if out.try_send(view.clone()).is_err() {
                return;
            }
            last = view;
        }
    }
}

/// Sends `{"type": "audit", "records": [...]}`: the newest records first, then each new
/// one as it is stored. Each record carries its `seq`.
pub(super) async fn watch_audit(live: Live, out: mpsc::Sender<Value>) {
    let store = live.overview.store();
    let mut appended = store.subscribe_audit();
    let mut sent = 0;
    let read = |after: u64| {
        let store = store.clone();
        async move {
            tokio::task::spawn_blocking(move || store.audit_after(after))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        }
    };
    let mut batch = read(0).await;
    batch.drain(..batch.len().saturating_sub(AUDIT_FIRST));
    let mut first = true;
    loop {
        let records: Vec<Value> = batch
            .iter()
            .filter(|entry| entry.seq > sent)
            .map(|entry| {
                let mut view = audit_entry_json(entry);
                view["seq"] = json!(entry.seq);
                view
            })
            .collect();
        sent = batch.last().map_or(sent, |entry| sent.max(entry.seq));
        // The first message is sent even when empty: the watcher knows it is current.
        if (first || !records.is_empty())
            && out
                .try_send(json!({"type": "audit", "records": records}))
                .is_err()
        {
            return;
        }
        first = false;
        batch = match appended.recv().await {
            Ok(record) => vec![record],
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => read(sent).await,
            Err(_) => return,
        };
    }
}
