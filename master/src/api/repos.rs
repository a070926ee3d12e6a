//! `POST /api/v1/repositories/{id}/pull` and `POST /api/v1/repositories/{id}/reset`
//! (`{"commit": C}`): move a driver repository; the answer says what moved, or why the
//! new commit was refused (the old one keeps running).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use tether_common::api::ApiError;

use super::AppState;
use crate::repos::{Moved, RepoError};

/// The repository routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/repositories/{id}/pull", post(pull))
        .route("/api/v1/repositories/{id}/reset", post(reset))
}

impl From<RepoError> for ApiError {
    fn from(err: RepoError) -> Self {
        match err {
            RepoError::NotFound(message) => ApiError::not_found(message),
            RepoError::Unreadable(message) => ApiError::unprocessable(message),
            RepoError::Refused(message) => ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "refused",
                message,
            ),
            RepoError::Internal(message) => ApiError::internal(message),
        }
    }
}

async fn pull(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Moved>, ApiError> {
    Ok(Json(state.repos.pull(&id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    commit: String,
}

async fn reset(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Moved>, ApiError> {
    let body: ResetBody = serde_json::from_slice(&body).map_err(|err| {
        ApiError::unprocessable(format!("the body must be {{\"commit\": \"...\"}}: {err}"))
    })?;
    Ok(Json(state.repos.reset(&id, &body.commit).await?))
}
