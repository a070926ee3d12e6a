//! Admin CRUD on the data model: `GET`, `POST`, `PUT`, `DELETE` on
//! `/api/v1/{edges,systems,modules,drivers,repositories}`. A write answers only after it
//! is durable; the answer carries the new model version in `Tether-Model-Version`.
//!
//! Optimistic concurrency: a record's `ETag` is the model version that last wrote it; a
//! `PUT` or `DELETE` with `If-Match` is refused with 412 when the record has changed since
//! (or is gone), so two operators editing one record cannot overwrite each other
//! unknowingly. Without `If-Match` a write goes ahead as before.

use std::path::Path;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value};
use tether_common::api::{ApiError, system_view};
use tether_common::model::{Model, ModelError, kind_name, kind_singular};
use tether_common::protocol::EntityKind;

use super::AppState;
use crate::model::{IfMatch, WriteError};
use crate::repos::RepositoriesRoot;
use tether_common::code::Code;

/// The kinds clients edit.
const EDITABLE: [EntityKind; 5] = [
    EntityKind::Edge,
    EntityKind::System,
    EntityKind::Module,
    EntityKind::Driver,
    EntityKind::Repository,
];

/// Keys that GET shows but the server computes; a write may carry them back and they are
/// ignored, so GET, edit, PUT works.
fn read_only_keys(kind: EntityKind) -> &'static [&'static str] {
    match kind {
        EntityKind::Edge => &[
            "online",
            "last_seen",
            "connected_since",
            "rtt_ms",
            "owner",
            "epoch",
            "api_url",
        ],
        EntityKind::System => &["members"],
        EntityKind::Driver => &["hash", "commit"],
        _ => &[],
    }
}

/// Every CRUD route.
pub fn routes() -> Router<AppState> {
    let mut router = Router::new();
    for kind in EDITABLE {
        let base = format!("/api/v1/{}", kind_name(kind));
        router = router
            .route(
                &base,
                get(move |state| list(kind, state))
                    .post(move |state, body| create(kind, state, body)),
            )
            .route(
                &format!("{base}/{{id}}"),
                get(move |state, id| read(kind, state, id))
                    .put(move |state, id, headers, body| replace(kind, state, id, headers, body))
                    .delete(move |state, id, headers| delete(kind, state, id, headers)),
            );
    }
    router
}

impl From<WriteError> for ApiError {
    fn from(err: WriteError) -> Self {
        match err {
            WriteError::Model(ModelError::Invalid(message)) => ApiError::unprocessable(message),
            WriteError::Model(ModelError::NotFound(message)) => ApiError::not_found(message),
            WriteError::Model(ModelError::Conflict(message)) => ApiError::conflict(message),
            WriteError::Changed(message) => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                message,
            ),
            WriteError::Unavailable(message) => ApiError::unavailable(message),
            WriteError::Store(err) => {
                tracing::error!("model write failed: {err}");
                // Not "not applied": over etcd, a write without an answer may have
                // landed, and the error then says that it cannot tell.
                ApiError::internal(format!("the write failed: {err}"))
            }
        }
    }
}

fn record_view(state: &AppState, model: &Model, kind: EntityKind, id: &str) -> Option<Value> {
    match kind {
        EntityKind::Edge => state
            .edges
            .view(model.edges.get(id)?, state.control.state(id)),
        EntityKind::System => system_view(model, &state.runtime, id),
        EntityKind::Driver => driver_view(state, model, id),
        _ => serde_json::from_str(&model.get_json(kind, id)?).ok(),
    }
}

/// A driver, with the content hash and commit of the script the master serves for it.
fn driver_view(state: &AppState, model: &Model, id: &str) -> Option<Value> {
    let driver = model.drivers.get(id)?;
    let mut view = serde_json::to_value(driver).ok()?;
    let code = state.runtime.code();
    let repo = code.repo(&driver.repository);
    view["hash"] = repo
        .and_then(|r| r.hash(&driver.file))
        .map(hex::encode)
        .into();
    view["commit"] = repo.map(|r| r.commit.clone()).into();
    Some(view)
}

async fn list(kind: EntityKind, State(state): State<AppState>) -> Json<Vec<Value>> {
    let (model, _) = state.model.snapshot();
    Json(
        model
            .ids(kind)
            .iter()
            .filter_map(|id| record_view(&state, &model, kind, id))
            .collect(),
    )
}

/// A PUT or DELETE needs the record to exist.
fn must_exist(model: &Model, kind: EntityKind, id: &str) -> Result<(), ModelError> {
    if model.contains(kind, id) {
        Ok(())
    } else {
        Err(ModelError::NotFound(format!(
            "no {} {id}",
            kind_singular(kind)
        )))
    }
}

fn not_found(kind: EntityKind, id: &str) -> ApiError {
    ApiError::not_found(format!("no {} {id}", kind_singular(kind)))
}

async fn read(
    kind: EntityKind,
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let (model, _) = state.model.snapshot();
    let view = record_view(&state, &model, kind, &id).ok_or_else(|| not_found(kind, &id))?;
    let mut response = Json(view).into_response();
    set_etag(&mut response, state.model.record_version(kind, &id));
    Ok(response)
}

fn set_etag(response: &mut Response, version: u64) {
    if let Ok(value) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert("etag", value);
    }
}

/// The condition of an `If-Match` header on a write of `kind` `id`: `"7"` (or `7`, or
/// `W/"7"`) for the version read, `*` for any version of an existing record.
fn if_match(headers: &HeaderMap, kind: EntityKind, id: &str) -> Result<Option<IfMatch>, ApiError> {
    let Some(value) = headers.get("if-match") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    let version = if text == "*" {
        None
    } else {
        let bare = text.trim_start_matches("W/").trim_matches('"');
        Some(bare.parse::<u64>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("If-Match: expected a record's ETag such as \"7\" (or *), not {text:?}"),
            )
        })?)
    };
    Ok(Some(IfMatch {
        kind,
        id: id.to_string(),
        version,
    }))
}

/// The record a write body describes, as JSON text, with its id.
fn prepare(
    kind: EntityKind,
    body: &[u8],
    path_id: Option<&str>,
    model: &Model,
    (root, code, commit): (&RepositoriesRoot, &Code, Option<&str>),
) -> Result<(String, String), ModelError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|err| ModelError::Invalid(format!("the body is not JSON: {err}")))?;
    let Value::Object(mut record) = value else {
        return Err(ModelError::Invalid(format!(
            "the body must be a JSON object describing one {}",
            kind_singular(kind)
        )));
    };
    for key in read_only_keys(kind) {
        record.remove(*key);
    }
    let id = match (record.get("id"), path_id) {
        (Some(Value::String(id)), Some(path_id)) if id != path_id => {
            return Err(ModelError::Invalid(format!(
                "key `id`: the body says {id:?} but the path says {path_id:?}"
            )));
        }
        (Some(Value::String(id)), _) => id.clone(),
        (None, Some(path_id)) => path_id.to_string(),
        (Some(_), _) => return Err(ModelError::Invalid("key `id`: expected a string".into())),
        (None, None) => return Err(ModelError::Invalid("key `id`: missing".into())),
    };
    tether_common::model::check_id("id", &id)?;
    record.insert("id".into(), Value::String(id.clone()));
    match commit {
        Some(commit) => {
            record.insert("commit".into(), Value::String(commit.to_string()));
        }
        None => keep_server_keys(kind, &id, &mut record, model),
    }
    match kind {
        EntityKind::Driver => check_driver_file(&record, model, code)?,
        EntityKind::Repository => check_repository_path(&record, root)?,
        _ => {}
    }
    Ok((id, Value::Object(record).to_string()))
}

/// A driver's file must be in its repository's code: a relative path inside it that the
/// current commit holds.
fn check_driver_file(
    record: &Map<String, Value>,
    model: &Model,
    code: &Code,
) -> Result<(), ModelError> {
    let text = |key: &str| record.get(key).and_then(Value::as_str).unwrap_or_default();
    let (repository, file) = (text("repository"), text("file"));
    if !model.repositories.contains_key(repository) {
        return Err(ModelError::Invalid(format!(
            "key `repository`: no repository with id {repository:?}"
        )));
    }
    if Path::new(file).is_absolute() || file.split(['/', '\\']).any(|part| part == "..") {
        return Err(ModelError::Invalid(format!(
            "key `file`: {file:?} must be a path inside its repository"
        )));
    }
    let repo = code.repo(repository).ok_or_else(|| {
        ModelError::Invalid(format!(
            "key `repository`: repository {repository} has no code yet (POST /api/v1/repositories/{repository}/pull)"
        ))
    })?;
    repo.text(file)
        .map(|_| ())
        .map_err(|err| ModelError::Invalid(format!("key `file`: {err}")))
}

/// A repository's folder must be a folder inside the repositories root.
fn check_repository_path(
    record: &Map<String, Value>,
    root: &RepositoriesRoot,
) -> Result<(), ModelError> {
    let path = record
        .get("path")
        .and_then(Value::as_str)
        .unwrap_or_default();
    root.folder(path)
        .map(|_| ())
        .map_err(|err| ModelError::Invalid(format!("key `path`: {err}")))
}

/// Stored keys the server sets (a repository's and an edge's commit): a write keeps the
/// current value.
fn keep_server_keys(kind: EntityKind, id: &str, record: &mut Map<String, Value>, model: &Model) {
    if !matches!(kind, EntityKind::Repository | EntityKind::Edge) {
        return;
    }
    let current: Option<Map<String, Value>> = model
        .get_json(kind, id)
        .and_then(|json| serde_json::from_str(&json).ok());
    match current.and_then(|mut c| c.remove("commit")) {
        Some(commit) => record.insert("commit".into(), commit),
        None => record.remove("commit"),
    };
}

/// A repository being created, or moved to another folder, is read before its record is
/// written, so that the one write names its commit. `None`: nothing to read (the body is
/// not such a record; `prepare` says what is wrong with it).
async fn read_repository_first(
    state: &AppState,
    kind: EntityKind,
    body: &[u8],
    path_id: Option<&str>,
) -> Result<Option<String>, ApiError> {
    if kind != EntityKind::Repository {
        return Ok(None);
    }
    let Ok(Value::Object(record)) = serde_json::from_slice::<Value>(body) else {
        return Ok(None);
    };
    let id = record.get("id").and_then(Value::as_str).or(path_id);
    let path = record.get("path").and_then(Value::as_str);
    let (Some(id), Some(path)) = (id, path) else {
        return Ok(None);
    };
    if check_repository_path(&record, state.repos.root()).is_err() {
        return Ok(None);
    }
    let (model, _) = state.model.snapshot();
    match (model.repositories.get(id), path_id) {
        // A PUT keeping the folder; a PUT of a missing record (404 follows); a POST of an
        // existing id (409 follows).
        (Some(current), Some(_)) if current.path == path => return Ok(None),
        (None, Some(_)) | (Some(_), None) => return Ok(None),
        _ => {}
    }
    Ok(Some(state.repos.adopt(id, path).await?))
}

fn written(state: &AppState, kind: EntityKind, id: &str, status: StatusCode) -> Response {
    let (model, version) = state.model.snapshot();
    let body = record_view(state, &model, kind, id).unwrap_or(Value::Null);
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert("tether-model-version", HeaderValue::from(version));
    set_etag(&mut response, state.model.record_version(kind, id));
    response
}

async fn create(
    kind: EntityKind,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let root = state.repos.root().clone();
    let commit = read_repository_first(&state, kind, &body, None).await?;
    let code = state.runtime.code();
    let mut created = String::new();
    state
        .model
        .write(|model| {
            let read = (&root, code.as_ref(), commit.as_deref());
            let (id, json) = prepare(kind, &body, None, model, read)?;
            if model.contains(kind, &id) {
                return Err(ModelError::Conflict(format!(
                    "{} {id} exists already; PUT /api/v1/{}/{id} replaces it",
                    kind_singular(kind),
                    kind_name(kind)
                )));
            }
            created = id.clone();
            Ok(vec![(kind, id, Some(json))])
        })
        .await?;
    Ok(written(&state, kind, &created, StatusCode::CREATED))
}

async fn replace(
    kind: EntityKind,
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let condition = if_match(&headers, kind, &id)?;
    let root = state.repos.root().clone();
    let commit = read_repository_first(&state, kind, &body, Some(&id)).await?;
    let code = state.runtime.code();
    state
        .model
        .write_if(condition, |model| {
            must_exist(model, kind, &id)?;
            let read = (&root, code.as_ref(), commit.as_deref());
            let (id, json) = prepare(kind, &body, Some(&id), model, read)?;
            Ok(vec![(kind, id, Some(json))])
        })
        .await?;
    Ok(written(&state, kind, &id, StatusCode::OK))
}

async fn delete(
    kind: EntityKind,
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let condition = if_match(&headers, kind, &id)?;
    state
        .model
        .write_if(condition, |model| {
            must_exist(model, kind, &id)?;
            Ok(vec![(kind, id.clone(), None)])
        })
        .await?;
    let (_, version) = state.model.snapshot();
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert("tether-model-version", HeaderValue::from(version));
    Ok(response)
}
