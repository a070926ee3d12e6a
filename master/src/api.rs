//! The master's client API routes.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router, middleware};
use tether_common::api::{AdminToken, Health, health, require_token};

use crate::edges::{EdgeRegistry, EdgeView};

/// The router: health is open (for load balancers and probes); the rest needs the token.
pub fn router(
    health_state: Arc<Health>,
    token: Arc<AdminToken>,
    edges: Arc<EdgeRegistry>,
) -> Router {
    let protected = Router::new()
        .route("/api/v1/edges", get(list_edges))
        .with_state(edges)
        .layer(middleware::from_fn_with_state(token, require_token));
    Router::new()
        .route("/api/v1/health", get(health))
        .with_state(health_state)
        .merge(protected)
}

async fn list_edges(State(edges): State<Arc<EdgeRegistry>>) -> Json<Vec<EdgeView>> {
    Json(edges.views())
}
