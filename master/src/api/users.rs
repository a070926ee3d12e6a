//! Users on the API (admins only): `GET`/`POST /api/v1/users`, `GET`/`PUT`/`DELETE
//! /api/v1/users/{id}`, and `POST /api/v1/users/{id}/token` for a new token. The server
//! makes each token and shows it once, in the answer that made it; the model keeps only
//! its SHA-256, which no answer shows. Users replicate to every edge, so a token works on
//! the master and on the edges alike.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tether_common::api::{ApiError, Role, new_token, token_hash};
use tether_common::model::{ModelError, UserRecord, check_id};
use tether_common::protocol::EntityKind;

use super::AppState;

/// The user routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/users", get(list).post(create))
        .route("/api/v1/users/{id}", get(read).put(replace).delete(delete))
        .route("/api/v1/users/{id}/token", post(new_user_token))
}

/// What a client writes: the hash is the server's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: String,
    role: String,
}

fn view(user: &UserRecord) -> Value {
    json!({ "id": user.id, "name": user.name, "role": user.role })
}

fn parse(body: &[u8]) -> Result<UserBody, ApiError> {
    let body: UserBody = serde_json::from_slice(body).map_err(|err| {
        ApiError::unprocessable(format!(
            "the body must be {{\"id\": ID, \"name\": NAME, \"role\": \"admin\"|\"operator\"|\"viewer\"}}: {err}"
        ))
    })?;
    if Role::parse(&body.role).is_none() {
        return Err(ApiError::unprocessable(format!(
            "key `role`: expected admin, operator or viewer, not {:?}",
            body.role
        )));
    }
    Ok(body)
}

fn record_json(user: &UserRecord) -> Result<String, ModelError> {
    serde_json::to_string(user).map_err(|err| ModelError::Invalid(err.to_string()))
}

async fn list(State(state): State<AppState>) -> Json<Vec<Value>> {
    let (model, _) = state.model.snapshot();
    Json(model.users.values().map(view).collect())
}

async fn read(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (model, _) = state.model.snapshot();
    model
        .users
        .get(&id)
        .map(|user| Json(view(user)))
        .ok_or_else(|| ApiError::not_found(format!("no user {id}")))
}

/// 201 with the user and its `token`, shown this once.
async fn create(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let body = parse(&body)?;
    let id = body
        .id
        .ok_or_else(|| ApiError::unprocessable("key `id`: missing"))?;
    check_id("id", &id).map_err(|err| ApiError::unprocessable(err.to_string()))?;
    let token = new_token();
    let user = UserRecord {
        id: id.clone(),
        name: body.name,
        role: body.role,
        token_hash: token_hash(&token),
    };
    state
        .model
        .write(|model| {
            if model.users.contains_key(&id) {
                return Err(ModelError::Conflict(format!(
                    "user {id} exists already; PUT /api/v1/users/{id} changes it"
                )));
            }
            Ok(vec![(
                EntityKind::User,
                id.clone(),
                Some(record_json(&user)?),
            )])
        })
        .await?;
    let mut answer = view(&user);
    answer["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// Changes a user's name and role; the token stays.
async fn replace(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body = parse(&body)?;
    if body.id.as_ref().is_some_and(|given| *given != id) {
        return Err(ApiError::unprocessable(format!(
            "key `id`: the body says {:?} but the path says {id:?}",
            body.id.unwrap_or_default()
        )));
    }
    let user = update(&state, &id, |current| UserRecord {
        name: body.name.clone(),
        role: body.role.clone(),
        ..current.clone()
    })
    .await?;
    Ok(Json(view(&user)))
}

/// Rewrites an existing user in one model write; answers the user as written.
async fn update(
    state: &AppState,
    id: &str,
    change: impl Fn(&UserRecord) -> UserRecord,
) -> Result<UserRecord, ApiError> {
    let mut changed = None;
    state
        .model
        .write(|model| {
            let current = model
                .users
                .get(id)
                .ok_or_else(|| ModelError::NotFound(format!("no user {id}")))?;
            let user = change(current);
            let json = record_json(&user)?;
            changed = Some(user);
            Ok(vec![(EntityKind::User, id.to_string(), Some(json))])
        })
        .await?;
    changed.ok_or_else(|| ApiError::internal("the user was not written"))
}

async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state
        .model
        .write(|model| {
            if !model.users.contains_key(&id) {
                return Err(ModelError::NotFound(format!("no user {id}")));
            }
            Ok(vec![(EntityKind::User, id.clone(), None)])
        })
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A new token for a user (the old one stops working): answered once.
async fn new_user_token(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let token = new_token();
    let user = update(&state, &id, |current| UserRecord {
        token_hash: token_hash(&token),
        ..current.clone()
    })
    .await?;
    let mut answer = view(&user);
    answer["token"] = json!(token);
    Ok(Json(answer))
}
