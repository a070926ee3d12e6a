//! Control on the API: `POST /api/v1/edges/{id}/restore` (a manual restore) and
//! `GET /api/v1/audit` (changes of owner, newest last).

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tether_common::api::ApiError;
use tether_common::control::owner_name;

use super::AppState;
use crate::control::RestoreError;

/// The control routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/edges/{id}/restore", post(restore))
        .route("/api/v1/audit", get(audit))
}

/// Gives control back to a connected edge: the master stops the edge's modules (devices
/// disconnected), then tells the edge, under a new epoch. 409 when the edge already
/// controls them or is not connected.
async fn restore(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state.control.restore(&id).await {
        Ok(control) => Ok(Json(json!({
            "edge": id,
            "owner": owner_name(control.owner),
            "epoch": control.epoch,
        }))),
        Err(RestoreError::NotFound(_)) => Err(ApiError::not_found(format!("no edge {id}"))),
        Err(err @ RestoreError::Refused(_)) => Err(ApiError::conflict(err.to_string())),
        Err(err @ (RestoreError::Stopped | RestoreError::NotStored(_))) => {
            Err(ApiError::unavailable(err.to_string()))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    edge: Option<String>,
}

/// The audit log: `[{time, edge, from, to, epoch, reason}]`, oldest first;
/// `?edge=ID` for one edge. In a cluster every master's, each record naming its `master`
/// (this master's own alone while etcd is out of reach).
async fn audit(
    State(state): State<AppState>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Vec<Value>>, ApiError> {
    if let Some(shared) = &state.shared_audit {
        match shared.clone().read().await {
            Ok(entries) => {
                return Ok(Json(
                    entries
                        .iter()
                        .filter(|e| {
                            query
                                .edge
                                .as_ref()
                                .is_none_or(|edge| e.entry.record.edge.as_str() == edge)
                        })
                        .map(|e| {
                            let mut view = tether_common::api::audit_entry_json(&e.entry);
                            view["master"] = e.master.clone().into();
                            view
                        })
                        .collect(),
                ));
            }
            Err(err) => {
                tracing::warn!(
                    "cannot read the shared audit log: {err}; answering this master's own"
                )
            }
        }
    }
    state
        .control
        .audit(query.edge)
        .await
        .map(Json)
        .map_err(|err| ApiError::internal(format!("cannot read the audit log: {err}")))
}
