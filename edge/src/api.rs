//! The edge's control routes: `GET /api/v1/edges` (this edge: owner, epoch, online, the
//! driver commit it runs) and
//! `GET /api/v1/audit` (the changes of owner it decided alone). A restore is the
//! master's to do.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tether_common::api::ApiError;
use tether_common::code::commit_label;
use tether_common::control::owner_name;

use crate::control::EdgeControl;
use crate::replica::Replica;

#[derive(Clone)]
struct ControlState {
    control: EdgeControl,
    replica: Arc<Replica>,
    edge_id: String,
}

/// The routes, over this edge's control and replica.
pub fn control_routes(control: EdgeControl, replica: Arc<Replica>, edge_id: String) -> Router {
    Router::new()
        .route("/api/v1/edges", get(edges))
        .route("/api/v1/audit", get(audit))
        .with_state(ControlState {
            control,
            replica,
            edge_id,
        })
}

async fn edges(State(state): State<ControlState>) -> Json<Vec<Value>> {
    let view = state.control.view();
    let (model, _) = state.replica.snapshot();
    let mut edge = model
        .edges
        .get(&state.edge_id)
        .and_then(|record| serde_json::to_value(record).ok())
        .unwrap_or_else(|| json!({ "id": state.edge_id }));
    if let Value::Object(map) = &mut edge {
        map.insert("online".into(), view.online.into());
        map.insert("owner".into(), owner_name(view.state.owner).into());
        map.insert("epoch".into(), view.state.epoch.into());
        map.insert("controlling".into(), view.active.into());
        map.insert("master_ready".into(), view.master_ready.into());
        // What it runs, which the master's record shows once the edge has reported it.
        let commit = commit_label(&state.replica.code().commits());
        map.insert("commit".into(), commit.into());
    }
    Json(vec![edge])
}

async fn audit(State(state): State<ControlState>) -> Result<Json<Vec<Value>>, ApiError> {
    state
        .control
        .audit()
        .await
        .map(Json)
        .map_err(|err| ApiError::internal(format!("cannot read the audit log: {err}")))
}
