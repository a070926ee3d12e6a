//! The master's client API routes.

mod control;
mod dashboard;
mod records;
mod repos;
mod users;

use std::sync::Arc;

use axum::Router;
use serde_json::Value;
use tether_common::api::{
    Access, ApiLimits, Health, Live, Overview, health, live_routes, module_routes, protect,
};
use tether_common::runtime::Runtime;
use tether_common::store::Store;

use crate::edges::EdgeRegistry;
use crate::model::ModelService;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The data model.
    pub model: Arc<ModelService>,
    /// The edges and their links.
    pub edges: Arc<EdgeRegistry>,
    /// The modules the master runs.
    pub runtime: Runtime,
    /// Who controls each edge location.
    pub control: crate::control::Control,
    /// The driver repositories.
    pub repos: Arc<crate::repos::Repositories>,
}

/// The router: health is open (for load balancers and probes); the rest needs the token.
pub fn router(
    health_state: Arc<Health>,
    access: Access,
    state: AppState,
    limits: ApiLimits,
) -> Router {
    let live = Live::new(state.runtime.clone(), Arc::new(state.clone()));
    let protected = records::routes()
        .merge(control::routes())
        .merge(users::routes())
        .merge(repos::routes())
        .route("/api/v1/edges/{id}/slice", axum::routing::get(edge_slice))
        .with_state(state.clone())
        .merge(module_routes(state.runtime.clone()))
        .merge(live_routes(live));
    let protected = protect(protected, access, limits);
    Router::new()
        .route("/api/v1/health", axum::routing::get(health))
        .with_state(health_state)
        .merge(dashboard::routes())
        .merge(protected)
}

/// The master's account for the live routes: every edge of the model with its link and
/// control state, the model version, the audit log in the model's store.
impl Overview for AppState {
    fn edges(&self) -> Vec<Value> {
        let (model, _) = self.model.snapshot();
        model
            .edges
            .values()
            .filter_map(|record| self.edges.view(record, self.control.state(&record.id)))
            .collect()
    }

    fn model_version(&self) -> u64 {
        self.model.snapshot().1
    }

    fn store(&self) -> Arc<Store> {
        self.model.store()
    }
}

/// An edge's slice of the model, in the shape the edge's `GET /api/v1/replica` has, so
/// the two can be compared.
async fn edge_slice(
    axum::extract::State(state): axum::extract::State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::Json<serde_json::Value>, tether_common::api::ApiError> {
    let (model, version) = state.model.snapshot();
    if !model.edges.contains_key(&id) {
        return Err(tether_common::api::ApiError::not_found(format!(
            "no edge {id}"
        )));
    }
    Ok(axum::Json(serde_json::json!({
        "model_id": state.model.model_id().to_string(),
        "version": version,
        "records": model.slice(&id).dump_for_clients(),
    })))
}
