//! The floor of any exec: a bare HTTPS JSON endpoint in the bench itself, axum on rustls,
//! served the way Tether serves its API (the same TLS settings and HTTP server, the
//! demo's master certificate), answering the exec call's path with its argument. What an
//! exec costs above it is Tether's own work: authentication, resolving the module, its
//! queue, the script, the link.

use std::path::Path;

use axum::Json;
use axum::Router;
use axum::routing::post;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A running endpoint, stopped on drop.
pub struct Bare {
    /// Its port on 127.0.0.1 (the certificate names `localhost`).
    pub port: u16,
    stop: CancellationToken,
}

impl Drop for Bare {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts the endpoint with the certificate and key in `certs` (`master.pem`,
/// `master.key`), which the demo's clients trust.
pub async fn start(certs: &Path) -> anyhow::Result<Bare> {
    let tls = tether_common::link::tls::server_config(
        &certs.join("master.pem"),
        &certs.join("master.key"),
        None,
    )?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let router = Router::new().route(
        "/api/v1/systems/{system}/modules/{name}/{index}/exec",
        post(exec),
    );
    let limits = tether_common::api::ApiLimits::from_config(&tether_config::Limits::default());
    let stop = CancellationToken::new();
    tokio::spawn(tether_common::api::serve_https(
        listener,
        tls,
        router,
        limits,
        stop.clone(),
    ));
    Ok(Bare { port, stop })
}

/// The exec call's answer: its first argument, as an echo module's method returns it.
async fn exec(Json(call): Json<Value>) -> Json<Value> {
    Json(json!({ "result": call["args"][0], "executed_by": "bare" }))
}
