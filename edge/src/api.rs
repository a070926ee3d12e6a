//! The edge's control routes: `GET /api/v1/edges` (this edge: owner, epoch, online, the
//! driver commit it runs) and
//! `GET /api/v1/audit` (the changes of owner it decided alone). A restore is the
//! master's to do.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tether_common::api::{ApiError, Overview};
use tether_common::code::commit_label;
use tether_common::control::owner_name;
use tether_common::store::Store;

use crate::control::EdgeControl;
use crate::replica::Replica;

/// This edge's control and replica, as its API shows them.
#[derive(Clone)]
pub struct EdgeOverview {
    pub control: EdgeControl,
    pub replica: Arc<Replica>,
    pub edge_id: tether_common::identity::EdgeId,
}

/// The routes, over this edge's control and replica.
pub fn control_routes(state: EdgeOverview) -> Router {
    Router::new()
        .route("/api/v1/edges", get(edges))
        .route("/api/v1/audit", get(audit))
        .with_state(state)
}

async fn edges(State(state): State<EdgeOverview>) -> Json<Vec<Value>> {
    Json(state.edges())
}

impl Overview for EdgeOverview {
    fn edges(&self) -> Vec<Value> {
        vec![self.edge_view()]
    }

    fn model_version(&self) -> u64 {
        self.replica.snapshot().1.version
    }

    fn store(&self) -> Arc<Store> {
        self.replica.store()
    }
}

impl EdgeOverview {
    /// This edge: its record with its link and control state and the commit it runs.
    fn edge_view(&self) -> Value {
        let state = self;
        let view = state.control.view();
        let (model, _) = state.replica.snapshot();
        let mut edge = model
            .edges
            .get(state.edge_id.as_str())
            .and_then(|record| serde_json::to_value(record).ok())
            .unwrap_or_else(|| json!({ "id": state.edge_id }));
        if let Value::Object(map) = &mut edge {
            map.insert("online".into(), view.online.into());
            map.insert("owner".into(), owner_name(view.state.owner).into());
            map.insert("epoch".into(), view.state.epoch.into());
            map.insert("controlling".into(), view.active.into());
            map.insert("master_ready".into(), view.master_ready.into());
            map.insert("takeover_worst_ms".into(), view.takeover_worst_ms.into());
            if let Some(pair) = &view.pair {
                map.insert(
                    "node".into(),
                    json!({
                        "id": pair.node,
                        "role": if pair.holder.as_ref() == Some(&pair.node) { "holder" } else { "standby" },
                        "holder": pair.holder,
                        // A pair: its one peer; more nodes: every peer linked.
                        "peer_online": pair.peers_online.len() == pair.peers,
                        "peers_online": pair.peers_online,
                        "claimed": pair.claimed,
                    }),
                );
            }
            // What it runs, which the master's record shows once the edge has reported it.
            let commit = commit_label(&state.replica.code().commits());
            map.insert("commit".into(), commit.into());
        }
        edge
    }
}

async fn audit(State(state): State<EdgeOverview>) -> Result<Json<Vec<Value>>, ApiError> {
    state
        .control
        .audit()
        .await
        .map(Json)
        .map_err(|err| ApiError::internal(format!("cannot read the audit log: {err}")))
}
