//! The life of one edge link on the master: what the edge sends (sync requests, its
//! control report, audit events, status changes, calls on modules) goes to the part that
//! handles it, and model changes and driver code are pushed to it until the link closes.

use std::sync::Arc;

use tether_common::api::checked_api_url;
use tether_common::code::fetch::serve_blobs;
use tether_common::control::{ControlState, EdgeId, EdgeReport, MasterEvent, NodeId};
use tether_common::link::{Incoming, Link};
use tether_common::model::sync::ReplicaPosition;
use tether_common::protocol::{ErrorCode, Notice, RemoteError, Request, Response};
use tether_common::proxy::serve_call;
use tether_common::report::printable;
use tether_common::runtime::MAX_STATUS_VALUE;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::control::{Control, NodeLinkEvent};
use crate::link_guard::{AuditRefused, LinkGuard, REASON_MAX, cut, fetchable, runs_module};
use crate::repos::push_code;
use crate::server::LinkContext;
use crate::sync::{answer_sync, push_changes};

/// Blob fetches one edge link may have in progress at once: an edge fetches one
/// repository's files at a time, and each fetch holds a blob in memory while it waits for
/// the link.
const BLOB_FETCHES_PER_LINK: usize = 2;

/// Serves one link (the registry's `generation` of the edge's links) until it closes. Every request is first checked against the link
/// policy ([`LinkGuard::admit`]): an edge speaks for its own site only. A site pair's node
/// (`node`) speaks for its location, `edge_id`.
pub async fn serve_edge(
    edge_id: EdgeId,
    node: Option<NodeId>,
    generation: u64,
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
        guard,
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
    let metrics = runtime.metrics().clone();
    let blob_fetches = Arc::new(Semaphore::new(BLOB_FETCHES_PER_LINK));
    while let Some(item) = incoming.recv().await {
        let request = match item {
            Incoming::Request(mut request) => {
                let (current, _) = model.snapshot();
                if let Err(refusal) = guard.admit(&current, &edge_id, &mut request) {
                    refuse(&guard, &control, &edge_id, "request", &refusal).await;
                    let error = RemoteError::new(ErrorCode::Forbidden, refusal);
                    request.responder.respond(Err(error)).await;
                    continue;
                }
                // A pair's node is named: a call it sends on goes to the holder node,
                // unless that is itself.
                match serve_call(&runtime, request, node.as_deref().unwrap_or(&edge_id)) {
                    None => continue,
                    Some(request) => *request,
                }
            }
            Incoming::Notice(
                Notice::StatusChanged {
                    module_id,
                    key,
                    value,
                    epoch,
                },
                _,
            ) => {
                let (current, _) = model.snapshot();
                if value.0.len() > MAX_STATUS_VALUE || !runs_module(&current, &edge_id, &module_id)
                {
                    metrics.refused(&edge_id, "notice");
                    tracing::debug!(edge = %edge_id, module = %printable(&module_id, 64), "a status change for a module the edge does not run is ignored");
                    continue;
                }
                match serde_json::from_str(&value.0) {
                    Ok(value) => control.status(&edge_id, &module_id, &key, value, epoch),
                    Err(err) => {
                        tracing::warn!(edge = %edge_id, module = %printable(&module_id, 64), "a status change that is not JSON is ignored: {err}")
                    }
                }
                continue;
            }
            Incoming::Notice(
                Notice::PeerNote(_) | Notice::PeerGrant { .. } | Notice::PeerPolling { .. },
                _,
            ) => {
                metrics.refused(&edge_id, "notice");
                tracing::debug!(edge = %edge_id, "a note meant for a pair's peer, sent to the master, is ignored");
                continue;
            }
        };
        let answer = match request.body {
            Request::FetchBlobs { hashes } => {
                let (current, _) = model.snapshot();
                let Ok(slot) = blob_fetches.clone().try_acquire_owned() else {
                    let busy = format!(
                        "too many blob fetches in progress on this link (at most {BLOB_FETCHES_PER_LINK})"
                    );
                    metrics.refused(&edge_id, "cap");
                    request
                        .responder
                        .end(Err(RemoteError::new(ErrorCode::Busy, busy)))
                        .await;
                    continue;
                };
                match fetchable(&current, &runtime.code(), &edge_id, hashes) {
                    Ok(hashes) => {
                        let store = model.store();
                        tokio::spawn(async move {
                            serve_blobs(store, hashes, request.responder).await;
                            drop(slot);
                        });
                    }
                    Err(why) => {
                        refuse(&guard, &control, &edge_id, "blob", &why).await;
                        let error = RemoteError::new(ErrorCode::Forbidden, why);
                        request.responder.end(Err(error)).await;
                    }
                }
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
            Request::ControlReport { .. } if node.is_some() => Err(RemoteError::new(
                ErrorCode::BadRequest,
                "a site pair's node reports with NodeReport",
            )),
            Request::ControlReport {
                owner,
                epoch,
                controlling,
            } => {
                let report = EdgeReport {
                    state: ControlState { owner, epoch },
                    controlling,
                };
                tracing::info!(edge = %edge_id, ?owner, %epoch, controlling, "edge reports its control state");
                control
                    .event(&edge_id, generation, MasterEvent::Report(report))
                    .await;
                Ok(Response::Ack)
            }
            Request::AuditEvents { events } => match guard.edge_audits(&edge_id, events) {
                Ok(events) => control
                    .record_edge_audits(&edge_id, events)
                    .await
                    .map(|()| Response::Ack)
                    .map_err(|err| {
                        RemoteError::new(ErrorCode::Internal, format!("not stored: {err}"))
                    }),
                Err(refused) => {
                    metrics.refused(&edge_id, "audit");
                    Err(match refused {
                        AuditRefused::Rate(why) => RemoteError::new(ErrorCode::Busy, why),
                        AuditRefused::Foreign(why) | AuditRefused::TooMany(why) => {
                            RemoteError::new(ErrorCode::Forbidden, why)
                        }
                    })
                }
            },
            Request::NodeReport(report) => match &node {
                Some(node) => {
                    let event = NodeLinkEvent::Report(report);
                    control.node_event(&edge_id, node, generation, event).await;
                    Ok(Response::Ack)
                }
                None => Err(RemoteError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "edge {edge_id} is not a node of a site pair: it reports with ControlReport"
                    ),
                )),
            },
            Request::ArraySlot { slot } => match &node {
                Some(node) => {
                    registry.set_array_slot(node, slot);
                    Ok(Response::Ack)
                }
                None => Err(RemoteError::new(
                    ErrorCode::BadRequest,
                    format!("edge {edge_id} is not a node of a site pair: it has no array slot"),
                )),
            },
            Request::Hello { api_url } => match checked_api_url(&api_url) {
                Ok(api_url) => {
                    registry.set_api_url(node.as_deref().unwrap_or(&edge_id), api_url);
                    Ok(Response::Ack)
                }
                Err(why) => {
                    tracing::warn!(edge = %edge_id, "{why}");
                    Err(RemoteError::new(ErrorCode::BadRequest, why))
                }
            },
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

/// A request refused by the link policy: counted (as `what`), logged, and (within a
/// rate) recorded in the audit log with the edge's records.
async fn refuse(guard: &LinkGuard, control: &Control, edge_id: &str, what: &str, refusal: &str) {
    control.metrics().refused(edge_id, what);
    // The refusal quotes what the edge asked for: escaped in the log.
    let logged = printable(refusal, 512);
    if guard.audit_refusal(edge_id) {
        tracing::warn!(edge = %edge_id, "refused: {logged}");
        let mut reason = format!("refused: {refusal}");
        cut(&mut reason, REASON_MAX);
        control.record_refusal(edge_id, reason).await;
    } else {
        tracing::debug!(edge = %edge_id, "refused (not audited: over the rate): {logged}");
    }
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
