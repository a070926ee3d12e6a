//! The floor of any exec: a bare HTTPS JSON endpoint in the bench itself, axum on rustls
//! (Tether's TLS settings, the demo's master certificate, hyper's HTTP/1.1 and HTTP/2
//! server, keep-alive), answering the exec call's path with its argument, and nothing
//! else: no admission limits, deadlines or authentication. What an exec costs above it is
//! Tether's own work: those, resolving the module, its queue, the script, the link.

use std::path::Path;

use axum::Json;
use axum::Router;
use axum::routing::post;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
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
    let stop = CancellationToken::new();
    tokio::spawn(serve(
        listener,
        TlsAcceptor::from(tls),
        router,
        stop.clone(),
    ));
    Ok(Bare { port, stop })
}

/// Accepts until `stop`, each connection on a task of its own.
async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = TowerToHyperService::new(router);
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// The exec call's answer: its first argument, as an echo module's method returns it.
async fn exec(Json(call): Json<Value>) -> Json<Value> {
    Json(json!({ "result": call["args"][0], "executed_by": "bare" }))
}
