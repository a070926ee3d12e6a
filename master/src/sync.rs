//! Keeping each connected edge's replica current: answer its `SyncRequest` (changes since
//! its version, or a snapshot), then push every later change as it commits.

use std::sync::Arc;
use std::time::Duration;

use tether_common::link::{Incoming, Link};
use tether_common::model::sync::ReplicaPosition;
use tether_common::protocol::{ErrorCode, RemoteError, Request, Response};
use tokio::sync::{mpsc, watch};

use crate::model::ModelService;

/// How long an edge may take to apply a pushed batch.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves what an edge sends on one link and pushes model changes to it, until the link
/// closes.
pub async fn serve_edge(
    edge_id: String,
    link: Link,
    incoming: mpsc::Receiver<Incoming>,
    model: Arc<ModelService>,
) {
    // Where the edge's replica stands, once it has synced on this link.
    let (position_tx, position_rx) = watch::channel(None::<ReplicaPosition>);
    let push = tokio::spawn(push_changes(
        edge_id.clone(),
        link.clone(),
        model.clone(),
        position_rx,
    ));
    answer_requests(&edge_id, incoming, &model, &position_tx).await;
    push.abort();
}

async fn answer_requests(
    edge_id: &str,
    mut incoming: mpsc::Receiver<Incoming>,
    model: &ModelService,
    position: &watch::Sender<Option<ReplicaPosition>>,
) {
    while let Some(item) = incoming.recv().await {
        let request = match item {
            Incoming::Request(request) => request,
            Incoming::Notice(notice) => {
                tracing::debug!(edge = %edge_id, ?notice, "notice not handled yet");
                continue;
            }
        };
        match request.body {
            Request::SyncRequest {
                model_id,
                since_version,
            } => {
                let at = ReplicaPosition {
                    model_id,
                    version: since_version,
                };
                match model.batch_for(edge_id, at).await {
                    Ok(batch) => {
                        tracing::info!(
                            edge = %edge_id,
                            from = since_version,
                            to = batch.to_version,
                            snapshot = batch.snapshot,
                            records = batch.changes.len(),
                            "edge sync: sending {}",
                            if batch.snapshot { "a snapshot" } else { "changes" }
                        );
                        let after = ReplicaPosition {
                            model_id: batch.model_id,
                            version: batch.to_version,
                        };
                        request
                            .responder
                            .respond(Ok(Response::ModelChanges(batch)))
                            .await;
                        position.send_replace(Some(after));
                    }
                    Err(err) => {
                        tracing::error!(edge = %edge_id, "edge sync failed: {err}");
                        let error = RemoteError::new(
                            ErrorCode::Internal,
                            format!("the master cannot read its model: {err}"),
                        );
                        request.responder.respond(Err(error)).await;
                    }
                }
            }
            _ => {
                let error = RemoteError::new(
                    ErrorCode::Unsupported,
                    "this master does not handle that request yet",
                );
                request.responder.respond(Err(error)).await;
            }
        }
    }
}

/// Pushes each new model version to the edge, from where its replica stands.
async fn push_changes(
    edge_id: String,
    link: Link,
    model: Arc<ModelService>,
    mut synced: watch::Receiver<Option<ReplicaPosition>>,
) {
    let mut version = model.watch_version();
    let mut known: Option<ReplicaPosition> = None;
    loop {
        // A SyncRequest answered on this link tells where the replica is; take it unless
        // a push already brought the replica further.
        if let Some(at) = *synced.borrow_and_update()
            && known.is_none_or(|k| k.model_id != at.model_id || k.version < at.version)
        {
            known = Some(at);
        }
        let current = *version.borrow_and_update();
        if let Some(at) = known
            && at.version < current
        {
            match push_once(&edge_id, &link, &model, at).await {
                Ok(after) => {
                    known = Some(after);
                    continue;
                }
                Err(()) if link.is_closed() => return,
                // The next change retries; the edge also resyncs on its next link.
                Err(()) => {}
            }
        }
        tokio::select! {
            changed = version.changed() => if changed.is_err() { return },
            changed = synced.changed() => if changed.is_err() { return },
            _ = link.closed() => return,
        }
    }
}

/// Sends one batch; answers where the replica stands after it.
async fn push_once(
    edge_id: &str,
    link: &Link,
    model: &ModelService,
    at: ReplicaPosition,
) -> Result<ReplicaPosition, ()> {
    let batch = model.batch_for(edge_id, at).await.map_err(|err| {
        tracing::error!(edge = %edge_id, "edge sync: {err}");
    })?;
    let after = ReplicaPosition {
        model_id: batch.model_id,
        version: batch.to_version,
    };
    let records = batch.changes.len();
    match link
        .request(Request::ModelChanges(batch), PUSH_TIMEOUT)
        .await
    {
        Ok(_) => {
            tracing::debug!(edge = %edge_id, to = after.version, records, "edge sync: pushed changes");
            Ok(after)
        }
        Err(err) => {
            if !link.is_closed() {
                tracing::warn!(edge = %edge_id, "edge sync: push failed: {err}");
            }
            Err(())
        }
    }
}
