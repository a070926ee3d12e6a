use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::extract::State;
use serde::Serialize;

/// What `GET /api/v1/health` reports.
#[derive(Debug)]
pub struct Health {
    /// `master` or `edge`.
    pub role: &'static str,
    /// The server's id (the master's id, or the edge id).
    pub id: String,
    /// Whether the server has finished booting.
    pub booted: AtomicBool,
}

#[derive(Serialize)]
struct HealthBody<'a> {
    role: &'a str,
    id: &'a str,
    version: &'a str,
    booted: bool,
}

/// `GET /api/v1/health`: role, id, version, booted.
pub async fn health(State(health): State<Arc<Health>>) -> Json<serde_json::Value> {
    let body = HealthBody {
        role: health.role,
        id: &health.id,
        version: crate::VERSION,
        booted: health.booted.load(Ordering::Relaxed),
    };
    Json(serde_json::to_value(body).unwrap_or_default())
}
