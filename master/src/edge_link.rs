//! The life of one edge link on the master: what the edge sends (sync requests, its
//! control report, audit events, status changes, calls on modules) goes to the part that
//! handles it, and model changes and driver code are pushed to it until the link closes.

use tether_common::control::{ControlState, EdgeReport, MasterEvent};
use tether_common::link::{Incoming, Link};
use tether_common::model::sync::ReplicaPosition;
use tether_common::protocol::{ErrorCode, Notice, RemoteError, Request, Response};
use tokio::sync::{mpsc, watch};

use crate::repos::push_code;
use crate::server::LinkContext;
use crate::sync::{answer_sync, push_changes};
use tether_common::code::fetch::serve_blobs;
use tether_common::proxy::serve_call;

/// Serves one link until it closes.
pub async fn serve_edge(
    edge_id: String,
    link: Link,
    mut incoming: mpsc::Receiver<Incoming>,
    context: LinkContext,
) {
    let LinkContext {
        registry,
        model,
        control,
        runtime,
        api_url,
        repos,
    } = context;
    announce(&link, api_url);
    let code = tokio::spawn(push_code(edge_id.clone(), link.clone(), repos.clone()));
    // Where the edge's replica stands, once it has synced on this link.
    let (position_tx, position_rx) = watch::channel(None::<ReplicaPosition>);
    let push = tokio::spawn(push_changes(
        edge_id.clone(),
        link.clone(),
        model.clone(),
        position_rx,
    ));
    while let Some(item) = incoming.recv().await {
        let request = match item {
            Incoming::Request(request) => match serve_call(&runtime, request, &edge_id) {
                None => continue,
                Some(request) => *request,
            },
            Incoming::Notice(Notice::StatusChanged {
                module_id,
                key,
                value,
                epoch,
            }) => {
                match serde_json::from_str(&value.0) {
                    Ok(value) => control.status(&edge_id, &module_id, &key, value, epoch),
                    Err(err) => {
                        tracing::warn!(edge = %edge_id, module = %module_id, "a status change that is not JSON is ignored: {err}")
                    }
                }
                continue;
            }
        };
        let answer = match request.body {
            Request::FetchBlobs { hashes } => {
                tokio::spawn(serve_blobs(model.store(), hashes, request.responder));
                continue;
            }
            Request::SyncRequest {
                model_id,
                since_version,
            } => {
                let at = ReplicaPosition {
                    model_id,
                    version: since_version,
                };
                answer_sync(&edge_id, &model, at, &position_tx).await
            }
            Request::ControlReport {
                owner,
                epoch,
                controlling,
            } => {
                let report = EdgeReport {
                    state: ControlState { owner, epoch },
                    controlling,
                };
                tracing::info!(edge = %edge_id, ?owner, epoch, controlling, "edge reports its control state");
                control.event(&edge_id, MasterEvent::Report(report));
                Ok(Response::Ack)
            }
            Request::AuditEvents { events } => {
                let foreign = events.iter().any(|e| e.edge != edge_id);
                if foreign {
                    Err(RemoteError::new(
                        ErrorCode::Forbidden,
                        "an edge may report audit events of its own location only",
                    ))
                } else {
                    control
                        .record_edge_audits(events)
                        .await
                        .map(|()| Response::Ack)
                        .map_err(|err| {
                            RemoteError::new(ErrorCode::Internal, format!("not stored: {err}"))
                        })
                }
            }
            Request::Hello { api_url } => {
                registry.set_api_url(&edge_id, api_url);
                Ok(Response::Ack)
            }
            _ => Err(RemoteError::new(
                ErrorCode::Unsupported,
                "this master does not handle that request yet",
            )),
        };
        request.responder.respond(answer).await;
    }
    push.abort();
    code.abort();
}

/// Tells the edge where the master's API is, for its `Tether-Preferred-Server` hints.
pub fn announce(link: &Link, api_url: String) {
    let link = link.clone();
    tokio::spawn(async move {
        let hello = Request::Hello { api_url };
        if let Err(err) = link
            .request(hello, std::time::Duration::from_secs(10))
            .await
        {
            tracing::debug!(peer = %link.peer(), "the API address was not announced: {err}");
        }
    });
}
