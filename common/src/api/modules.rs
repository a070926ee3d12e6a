//! Control systems and module calls, as master and edge both serve them, wherever the
//! module runs: `GET /api/v1/systems[/{id}]`, per module `exec`, `status` and `debug`,
//! and per system `start`, `stop` and `expire`.

use crate::identity::Epoch;
use axum::Json;
use axum::Router;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Principal};
use crate::control::Claim;
use crate::model::Model;
use crate::protocol::ModuleRef;
use crate::runtime::{ExecError, Origin, Runtime, SystemAction};

impl From<ExecError> for ApiError {
    fn from(err: ExecError) -> Self {
        let message = err.to_string();
        match err {
            ExecError::NotFound(_) => ApiError::not_found(message),
            ExecError::NotHere(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_here", message)
            }
            ExecError::Faulted(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "module_faulted", message)
            }
            ExecError::Busy(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message),
            ExecError::Unavailable(_) => ApiError::unavailable(message),
            ExecError::Timeout(_) => ApiError::timeout(message),
            ExecError::BadArgs(_) => ApiError::unprocessable(message),
            ExecError::Script(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "script_error", message)
            }
            ExecError::StaleEpoch(_) => ApiError::new(StatusCode::CONFLICT, "stale_epoch", message),
            ExecError::Forbidden(_) => ApiError::forbidden(message),
            ExecError::Waiting(_) => ApiError::waiting(message, 1),
        }
    }
}

/// A system record with its modules in order (`members`): name, index, driver, where each
/// runs, and its state where it runs here.
pub fn system_view(model: &Model, runtime: &Runtime, id: &str) -> Option<Value> {
    let record = model.systems.get(id)?;
    let mut view = serde_json::to_value(record).ok()?;
    let members = serde_json::to_value(runtime.system_modules(model, id)).ok()?;
    if let Value::Object(map) = &mut view {
        map.insert("members".into(), members);
    }
    Some(view)
}

/// The body of an exec call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    method: String,
    #[serde(default)]
    args: Vec<Value>,
    /// The epoch the client last saw for the module's edge location; an older one than
    /// this side's is refused (409), so a client acting on a stale view of who controls
    /// the room finds out.
    #[serde(default)]
    epoch: Option<Epoch>,
}

type ModulePath = Path<(String, String, String)>;

fn index(text: &str) -> Result<u32, ApiError> {
    text.parse::<u32>().ok().filter(|i| *i >= 1).ok_or_else(|| {
        ApiError::not_found(format!("a module index is a number from 1, not {text:?}"))
    })
}

/// The per-module routes and the read-only system routes, over `runtime`.
pub fn module_routes(runtime: Runtime) -> Router {
    Router::new()
        .route(
            "/api/v1/systems/{id}/modules/{name}/{index}/exec",
            post(exec),
        )
        .route(
            "/api/v1/systems/{id}/modules/{name}/{index}/status",
            get(status),
        )
        .route(
            "/api/v1/systems/{id}/modules/{name}/{index}/debug",
            get(debug),
        )
        .route(
            "/api/v1/systems/{id}/start",
            post(|state, who, id| system_action(state, who, id, SystemAction::Start)),
        )
        .route(
            "/api/v1/systems/{id}/stop",
            post(|state, who, id| system_action(state, who, id, SystemAction::Stop)),
        )
        .route(
            "/api/v1/systems/{id}/expire",
            post(|state, who, id| system_action(state, who, id, SystemAction::ExpireCache)),
        )
        .with_state(runtime)
}

/// `GET /api/v1/systems` and `GET /api/v1/systems/{id}` from the runtime's model (an
/// edge's replica). The master serves these from its full model instead.
pub fn system_routes(runtime: Runtime) -> Router {
    Router::new()
        .route("/api/v1/systems", get(list_systems))
        .route("/api/v1/systems/{id}", get(get_system))
        .with_state(runtime)
}

async fn list_systems(State(runtime): State<Runtime>) -> Json<Vec<Value>> {
    let model = runtime.model();
    Json(
        model
            .systems
            .keys()
            .filter_map(|id| system_view(&model, &runtime, id))
            .collect(),
    )
}

async fn get_system(
    State(runtime): State<Runtime>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    system_view(&runtime.model(), &runtime, &id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no system {id}")))
}

/// The header naming the side that controls a system, when this side serves it by proxy.
pub const PREFERRED_SERVER: &str = "tether-preferred-server";

/// A peer's announced API address, if it is fit to become a client's hint: an
/// `https://host[:port]` origin of at most 255 characters, nothing else (no user, path
/// or query), since clients may follow it with their token.
pub fn checked_api_url(url: &str) -> Result<String, String> {
    let refuse = |why: &str| {
        Err(format!(
            "API address {:?} refused: {why}",
            crate::report::printable(url, 80)
        ))
    };
    if url.len() > 255 {
        return refuse("longer than 255 characters");
    }
    let Ok(uri) = url.parse::<axum::http::Uri>() else {
        return refuse("not a URL");
    };
    if uri.scheme_str() != Some("https") {
        return refuse("not https");
    }
    let Some(authority) = uri.authority() else {
        return refuse("no host");
    };
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return refuse("not a plain host and port");
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return refuse("it has a path or a query");
    }
    Ok(format!("https://{authority}"))
}

/// `answer` (or its error: a client told 503 may do better at the other side), with the
/// `Tether-Preferred-Server` hint when the other side controls `system`: the client was
/// served, and may go there next time.
fn hinted(runtime: &Runtime, system: &str, answer: Result<Value, ApiError>) -> Response {
    let mut response = match answer {
        Ok(answer) => Json(answer).into_response(),
        Err(err) => err.into_response(),
    };
    if let Some(server) = runtime.preferred_server(system)
        && let Ok(value) = HeaderValue::from_str(&server)
    {
        response.headers_mut().insert(PREFERRED_SERVER, value);
    }
    response
}

/// The origin of a client's call: its principal's token goes with calls this side
/// forwards for other sites (an edge's users).
fn origin(principal: &Principal) -> Origin {
    Origin::client(principal.on_behalf.clone())
}

async fn exec(
    State(runtime): State<Runtime>,
    Extension(principal): Extension<Principal>,
    Path((system, name, index_text)): ModulePath,
    body: axum::body::Bytes,
) -> Response {
    let answer = async {
        let index = index(&index_text)?;
        let body: ExecBody = serde_json::from_slice(&body).map_err(|err| {
            ApiError::unprocessable(format!(
                "the body must be {{\"method\": NAME, \"args\": [...]}}: {err}"
            ))
        })?;
        let module = ModuleRef::new(system.clone(), name.clone(), index);
        let grant = runtime.fence(&module, Claim::epoch(body.epoch))?;
        let origin = origin(&principal);
        let done = client_exec(
            &runtime,
            &module,
            &body.method,
            body.args,
            body.epoch,
            &origin,
        )
        .await?;
        let mut answer = json!({ "result": done.value, "executed_by": done.executed_by });
        if let Some(grant) = grant {
            answer["epoch"] = json!(grant.epoch);
        }
        Ok::<_, ApiError>(answer)
    };
    hinted(&runtime, &system, answer.await)
}

/// A client's method call, wherever the module runs, counted and timed in the metrics.
pub(super) async fn client_exec(
    runtime: &Runtime,
    module: &ModuleRef,
    method: &str,
    args: Vec<Value>,
    epoch: Option<Epoch>,
    origin: &Origin,
) -> Result<crate::runtime::Executed, ExecError> {
    let started = std::time::Instant::now();
    let done = runtime
        .exec_from(module, method, args, Claim::epoch(epoch), origin)
        .await;
    let by = done.as_ref().ok().map(|done| done.executed_by.as_str());
    runtime
        .metrics()
        .observe_exec(by, done.is_ok(), started.elapsed());
    done
}

/// Starts, stops or expires a system where it runs: `{"system", "action", "done_by"}`.
async fn system_action(
    State(runtime): State<Runtime>,
    Extension(principal): Extension<Principal>,
    Path(system): Path<String>,
    action: SystemAction,
) -> Response {
    let name = match action {
        SystemAction::Start => "start",
        SystemAction::Stop => "stop",
        SystemAction::ExpireCache => "expire",
    };
    let answer = runtime
        .system_action(&system, action, &origin(&principal))
        .await
        .map(|side| json!({ "system": system, "action": name, "done_by": side }))
        .map_err(ApiError::from);
    hinted(&runtime, &system, answer)
}

async fn status(
    State(runtime): State<Runtime>,
    Extension(principal): Extension<Principal>,
    Path((system, name, index_text)): ModulePath,
) -> Response {
    let answer = async {
        let status = runtime
            .status_from(
                &ModuleRef::new(system.clone(), name, index(&index_text)?),
                &origin(&principal),
            )
            .await?;
        Ok::<_, ApiError>(Value::Object(status))
    };
    hinted(&runtime, &system, answer.await)
}

async fn debug(
    State(runtime): State<Runtime>,
    Extension(principal): Extension<Principal>,
    Path((system, name, index_text)): ModulePath,
) -> Response {
    let answer = async {
        let lines = runtime
            .debug_from(
                &ModuleRef::new(system.clone(), name, index(&index_text)?),
                &origin(&principal),
            )
            .await?;
        Ok::<_, ApiError>(serde_json::to_value(lines).unwrap_or_default())
    };
    hinted(&runtime, &system, answer.await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_waiting_for_its_code_is_503_with_retry_after() {
        let response = ApiError::from(ExecError::Waiting(
            "module m waits for its driver code".into(),
        ))
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
    }

    #[test]
    fn only_a_plain_https_origin_becomes_a_hint() {
        assert_eq!(
            checked_api_url("https://edge-1.example:8444").as_deref(),
            Ok("https://edge-1.example:8444")
        );
        assert_eq!(
            checked_api_url("https://127.0.0.1:8444/").as_deref(),
            Ok("https://127.0.0.1:8444")
        );
        for bad in [
            "http://edge:8444",
            "https://user@evil.example",
            "https://edge:8444/steal?x=1",
            "javascript:alert(1)",
            "https://edge\r\nSet-Cookie: x",
            "",
        ] {
            assert!(checked_api_url(bad).is_err(), "{bad:?}");
        }
        assert!(checked_api_url(&format!("https://{}", "a".repeat(300))).is_err());
    }
}
