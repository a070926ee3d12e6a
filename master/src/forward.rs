//! Among several masters a client may call any master for anything: a call for a module
//! whose unit another master holds (it has the edge's link, or runs the unit) is sent on
//! to that master, and the answer names it in `Tether-Preferred-Server` so that the
//! client may go there next time. A forwarded call is never forwarded again: if the
//! masters' views disagree for a moment, the second master answers as it can.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
pub use tether_common::api::FORWARDED_BY;
use tether_common::api::{ApiError, PREFERRED_SERVER, checked_api_url};
use tether_common::control::{MasterId, UnitId};
use tokio::sync::watch;

use crate::control::ClusterInputs;
use crate::model::ModelService;

/// Request headers a forwarded call keeps (the rest are the connection's own).
const KEPT: [&str; 4] = ["authorization", "content-type", "accept", "if-match"];
/// The largest answer taken from another master (a method's result, a status).
const ANSWER_LIMIT: usize = 16 << 20;
/// A call takes at most this long on the other master (a method's own timeout is less).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What forwarding needs: the cluster as this master follows it, the model (to find a
/// module's unit) and a client trusting the cluster's CA.
pub struct Forwarder {
    pub(crate) inputs: watch::Receiver<Arc<ClusterInputs>>,
    model: Arc<ModelService>,
    http: reqwest::Client,
    /// For the WebSockets of clients' sessions sent on ([`crate::ws_relay`]).
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

impl Forwarder {
    /// A forwarder over `inputs`, reaching the other masters' APIs with `tls` (trusting
    /// the certificates of the cluster's CA).
    pub fn new(
        inputs: watch::Receiver<Arc<ClusterInputs>>,
        model: Arc<ModelService>,
        tls: rustls::ClientConfig,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls.clone())
            .connect_timeout(Duration::from_secs(3))
            .timeout(CALL_TIMEOUT)
            .build()?;
        Ok(Forwarder {
            inputs,
            model,
            http,
            tls: Arc::new(tls),
        })
    }

    /// The master (id, API address) that should serve a call to `path`, when not this one.
    fn holder_of(&self, path: &str) -> Option<(MasterId, String)> {
        let (model, _) = self.model.snapshot();
        let unit = unit_of_path(&model, path)?;
        self.holder_of_unit(&unit)
    }

    /// The master (id, API address) that should serve `system`'s module `name` `index`,
    /// when not this one.
    pub(crate) fn holder_of_module(
        &self,
        system: &str,
        name: &str,
        index: u32,
    ) -> Option<(MasterId, String)> {
        let (model, _) = self.model.snapshot();
        let unit = unit_of_module(&model, system, name, index)?;
        self.holder_of_unit(&unit)
    }

    fn holder_of_unit(&self, unit: &UnitId) -> Option<(MasterId, String)> {
        let inputs = self.inputs.borrow();
        let master = inputs.serving_master(unit)?;
        self.api_url_of(&inputs, master)
            .map(|url| (master.clone(), url))
    }

    /// `master`'s announced API address, when it may be given a client's token.
    pub(crate) fn api_url_of(&self, inputs: &ClusterInputs, master: &MasterId) -> Option<String> {
        let announced = inputs.info.get(master)?.get("api_url")?.as_str()?;
        // It gets the client's token: a plain https origin only, and never this host's
        // wildcard address (a master that announced its listen address as is).
        let api_url = checked_api_url(announced)
            .map_err(|why| tracing::warn!(master = %master, "not forwarding to it: {why}"))
            .ok()
            .filter(|url| !url.contains("://0.0.0.0") && !url.contains("://[::]"))?;
        Some(api_url)
    }

    async fn send(
        &self,
        api_url: &str,
        parts: &axum::http::request::Parts,
        body: axum::body::Bytes,
    ) -> Result<Response, reqwest::Error> {
        let me = self.inputs.borrow().me.clone();
        let url = format!(
            "{api_url}{}",
            parts
                .uri
                .path_and_query()
                .map_or(parts.uri.path(), |p| p.as_str())
        );
        let mut request = self
            .http
            .request(parts.method.clone(), url)
            .header(FORWARDED_BY, me.as_str());
        for name in KEPT {
            if let Some(value) = parts.headers.get(name) {
                request = request.header(name, value.clone());
            }
        }
        let mut answer = request.body(body).send().await?;
        let status = answer.status();
        let headers = answer.headers().clone();
        // Another master is a peer like any: its answer is read up to a bound.
        let mut bytes = Vec::new();
        while let Some(chunk) = answer.chunk().await? {
            if bytes.len() + chunk.len() > ANSWER_LIMIT {
                return Ok(ApiError::unavailable(format!(
                    "the master holding the unit answered more than {ANSWER_LIMIT} bytes"
                ))
                .into_response());
            }
            bytes.extend_from_slice(&chunk);
        }
        let mut response = (status, bytes).into_response();
        for (name, value) in &headers {
            if *name == reqwest::header::CONTENT_TYPE
                || name.as_str() == PREFERRED_SERVER
                || *name == reqwest::header::ETAG
            {
                response.headers_mut().insert(name.clone(), value.clone());
            }
        }
        Ok(response)
    }
}

/// The unit that serves a call to `path`: for a module's call (`/api/v1/systems/S/
/// modules/NAME/INDEX/...`) the module's (its edge's id, or the unit it runs in among the
/// masters); for a system's action (`/api/v1/systems/S/start` ...) the system's.
fn unit_of_path(model: &tether_common::model::Model, path: &str) -> Option<UnitId> {
    let rest = path.strip_prefix("/api/v1/systems/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [system, "modules", name, index, _] => {
            unit_of_module(model, system, name, index.parse().ok()?)
        }
        [system, "start" | "stop" | "expire"] => {
            let record = model.systems.get(*system)?;
            Some(
                record
                    .edge
                    .as_ref()
                    .map_or_else(|| UnitId::system(system), UnitId::from),
            )
        }
        _ => None,
    }
}

/// The unit `system`'s module `name` `index` runs in: its edge's, or its own among the
/// masters.
fn unit_of_module(
    model: &tether_common::model::Model,
    system: &str,
    name: &str,
    index: u32,
) -> Option<UnitId> {
    let module = model.system_module(system, name, index)?;
    model
        .module_edge(module)
        .map(UnitId::from)
        .or_else(|| model.local_unit(module))
}

/// Middleware on the module routes: sends a call on to the master that holds its unit.
/// When that master does not answer, this one serves the call as it can.
pub async fn forward_to_holder(
    State(forwarder): State<Arc<Forwarder>>,
    request: Request,
    next: Next,
) -> Response {
    if request.headers().contains_key(FORWARDED_BY) {
        return next.run(request).await;
    }
    let Some((master, api_url)) = forwarder.holder_of(request.uri().path()) else {
        return next.run(request).await;
    };
    let (parts, body) = request.into_parts();
    // The body was read whole and bounded before (the API's body limit).
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::unprocessable("the request body could not be read").into_response();
    };
    match forwarder.send(&api_url, &parts, bytes.clone()).await {
        Ok(mut response) => {
            // The holder's own hint (an edge that controls the room) is the better one.
            if !response.headers().contains_key(PREFERRED_SERVER)
                && let Ok(value) = HeaderValue::from_str(&api_url)
            {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(PREFERRED_SERVER), value);
            }
            response
        }
        // Not reached at all: nothing ran there, so this master serves it as it can.
        Err(err) if err.is_connect() => {
            tracing::warn!(master = %master, "master {master}, which holds the unit, is not reached: {err}; serving the call here");
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        // Sent, unanswered: it may have run there, so it is not run here too.
        Err(err) => ApiError::unavailable(format!(
            "master {master}, which holds the unit, did not answer the call: {err} (it may have run there)"
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_common::model::Model;
    use tether_common::protocol::EntityKind;

    fn model() -> Model {
        let mut model = Model::default();
        let records = [
            (
                EntityKind::Edge,
                "e1",
                r#"{"id":"e1","name":"E1","secret_file":"s"}"#,
            ),
            (
                EntityKind::Driver,
                "d",
                r#"{"id":"d","repository":"r","file":"d.rhai","transport":"none"}"#,
            ),
            (
                EntityKind::Module,
                "m-edge",
                r#"{"id":"m-edge","driver":"d","name":"Note","edge":"e1"}"#,
            ),
            (
                EntityKind::Module,
                "m-hall",
                r#"{"id":"m-hall","driver":"d","name":"Note"}"#,
            ),
            (
                EntityKind::System,
                "room",
                r#"{"id":"room","name":"Room","edge":"e1","modules":["m-edge"]}"#,
            ),
            (
                EntityKind::System,
                "hall",
                r#"{"id":"hall","name":"Hall","modules":["m-hall"]}"#,
            ),
        ];
        for (kind, id, json) in records {
            model.set_json(kind, id, Some(json)).unwrap();
        }
        model
    }

    #[test]
    fn a_call_belongs_to_its_module_unit_and_an_action_to_its_system() {
        let model = model();
        let unit = |path: &str| unit_of_path(&model, path);
        assert_eq!(
            unit("/api/v1/systems/room/modules/Note/1/exec").as_deref(),
            Some("e1")
        );
        assert_eq!(
            unit("/api/v1/systems/hall/modules/Note/1/status").as_deref(),
            Some("system:hall")
        );
        assert_eq!(
            unit("/api/v1/systems/hall/stop").as_deref(),
            Some("system:hall")
        );
        assert_eq!(unit("/api/v1/systems/room/start").as_deref(), Some("e1"));
        // Not a unit's call: the record itself, an unknown module, another route.
        assert_eq!(unit("/api/v1/systems/room"), None);
        assert_eq!(unit("/api/v1/systems/room/modules/Note/2/exec"), None);
        assert_eq!(unit("/api/v1/edges/e1"), None);
    }
}
