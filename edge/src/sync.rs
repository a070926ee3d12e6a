//! The edge's side of one link: ask for the model changes since the replica's version
//! when the link comes up (and again after a gap), apply what the master pushes later (model changes, repository updates), and pass the
//! master's control decisions to control.

use std::sync::Arc;
use std::time::Duration;

use tether_common::link::{Incoming, Link};
use tether_common::protocol::{ErrorCode, RemoteError, Request, Response};
use tokio::sync::mpsc;

use crate::code::update_repository;
use crate::control::DecisionRefused;
use crate::proxy::FROM_MASTER;
use crate::replica::{ApplyError, Replica};
use crate::server::MasterContext;
use tether_common::control::EdgeEvent;
use tether_common::proxy::serve_call;

/// How long the master may take to answer a sync request.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves one link until it closes.
pub async fn serve_master(link: Link, incoming: mpsc::Receiver<Incoming>, context: MasterContext) {
    let (resync_tx, resync_rx) = mpsc::channel(1);
    let sync = tokio::spawn(sync_loop(link.clone(), context.replica.clone(), resync_rx));
    announce(&link, context.api_url.clone());
    answer_requests(&link, incoming, &context, &resync_tx).await;
    sync.abort();
}

/// Tells the master where this edge's API is, for its `Tether-Preferred-Server` hints.
fn announce(link: &Link, api_url: String) {
    let link = link.clone();
    tokio::spawn(async move {
        let hello = Request::Hello { api_url };
        if let Err(err) = link.request(hello, Duration::from_secs(10)).await {
            tracing::debug!("the API address was not announced: {err}");
        }
    });
}

/// Asks for changes now and whenever a pushed batch does not follow on.
async fn sync_loop(link: Link, replica: Arc<Replica>, mut resync: mpsc::Receiver<()>) {
    loop {
        let (_, at) = replica.snapshot();
        let request = Request::SyncRequest {
            model_id: at.model_id,
            since_version: at.version,
        };
        match link.request(request, SYNC_TIMEOUT).await {
            Ok(Response::ModelChanges(batch)) => match replica.apply(&batch).await {
                Ok(applied) => tracing::info!(
                    from = at.version,
                    to = batch.to_version,
                    snapshot = batch.snapshot,
                    records = batch.changes.len(),
                    applied,
                    "replica synced"
                ),
                Err(err) => {
                    tracing::error!("replica sync: the master's answer was not applied: {err}")
                }
            },
            Ok(other) => tracing::error!("replica sync: unexpected answer {other:?}"),
            Err(err) => {
                if link.is_closed() {
                    return;
                }
                tracing::warn!("replica sync failed: {err}");
            }
        }
        tokio::select! {
            again = resync.recv() => if again.is_none() { return },
            _ = link.closed() => return,
        }
    }
}

async fn answer_requests(
    link: &Link,
    mut incoming: mpsc::Receiver<Incoming>,
    context: &MasterContext,
    resync: &mpsc::Sender<()>,
) {
    let (replica, control) = (&context.replica, &context.control);
    while let Some(item) = incoming.recv().await {
        let request = match item {
            Incoming::Request(request) => {
                match serve_call(&context.runtime, request, FROM_MASTER) {
                    None => continue,
                    Some(request) => *request,
                }
            }
            Incoming::Notice(notice, _) => {
                tracing::debug!(?notice, "notice not handled");
                continue;
            }
        };
        let answer = match request.body {
            Request::RepositoryUpdate {
                repository,
                commit,
                action,
                files,
            } => {
                // Fetching takes round trips on this link: not in this loop.
                let (link, replica) = (link.clone(), replica.clone());
                tokio::spawn(async move {
                    let done =
                        update_repository(&link, &replica, repository, commit, action, files).await;
                    request
                        .responder
                        .respond(done.map(|()| Response::Ack))
                        .await;
                });
                continue;
            }
            Request::ModelChanges(batch) => match replica.apply(&batch).await {
                Ok(_) => {
                    tracing::debug!(
                        to = batch.to_version,
                        records = batch.changes.len(),
                        "replica: applied pushed changes"
                    );
                    Ok(Response::Ack)
                }
                Err(ApplyError::Batch(err)) => {
                    tracing::warn!(
                        "replica: pushed changes do not follow on ({err}); asking again"
                    );
                    let _ = resync.try_send(());
                    Err(RemoteError::new(ErrorCode::BadRequest, err.to_string()))
                }
                Err(ApplyError::Store(err)) => {
                    tracing::error!("replica: cannot store pushed changes: {err}");
                    Err(RemoteError::new(ErrorCode::Internal, err.to_string()))
                }
            },
            Request::ControlDecision {
                owner,
                epoch,
                reason,
            } => match control.decide(owner, epoch, reason).await {
                Ok(epoch) => Ok(Response::ControlAck { epoch }),
                Err(DecisionRefused::Stale(stale)) => {
                    Err(RemoteError::new(ErrorCode::StaleEpoch, stale.to_string()))
                }
                Err(other) => Err(RemoteError::new(ErrorCode::Internal, other.to_string())),
            },
            Request::PairGrant { grant, proofs } => control
                .granted(grant, proofs)
                .await
                .map(|()| Response::Ack)
                .map_err(|why| RemoteError::new(ErrorCode::Internal, why)),
            Request::MasterReady => {
                control.link_event(EdgeEvent::MasterReady, None);
                Ok(Response::Ack)
            }
            Request::Hello { api_url } => match tether_common::api::checked_api_url(&api_url) {
                Ok(api_url) => {
                    context.links.set_master_api(api_url);
                    Ok(Response::Ack)
                }
                Err(why) => Err(RemoteError::new(ErrorCode::BadRequest, why)),
            },
            _ => Err(RemoteError::new(
                ErrorCode::Unsupported,
                "this edge does not handle that request yet",
            )),
        };
        request.responder.respond(answer).await;
    }
}
