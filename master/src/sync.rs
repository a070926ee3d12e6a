//! Keeping each connected edge's replica current: answer its `SyncRequest` (changes since
//! its version, or a snapshot), then push every later change as it commits.
//!
//! The position a `SyncRequest` reports is set before its answer goes out; the push task
//! then sends only what is newer, so a change committed meanwhile is sent once.

use std::sync::Arc;
use std::time::Duration;

use tether_common::control::EdgeId;
use tether_common::link::Link;
use tether_common::model::sync::ReplicaPosition;
use tether_common::protocol::{ErrorCode, RemoteError, Request, Response};
use tokio::sync::watch;

use crate::model::ModelService;

/// How long an edge may take to apply a pushed batch.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers an edge's `SyncRequest`: the changes since its version, or a snapshot. The
/// replica's position after it goes to `position`, for [`push_changes`].
pub async fn answer_sync(
    edge_id: &str,
    model: &ModelService,
    at: ReplicaPosition,
    position: &watch::Sender<Option<ReplicaPosition>>,
) -> Result<Response, RemoteError> {
    match model.batch_for(edge_id, at).await {
        Ok(batch) => {
            tracing::info!(
                edge = %edge_id,
                from = at.version,
                to = batch.to_version,
                snapshot = batch.snapshot,
                records = batch.changes.len(),
                "edge sync: sending {}",
                if batch.snapshot { "a snapshot" } else { "changes" }
            );
            position.send_replace(Some(ReplicaPosition {
                model_id: batch.model_id,
                version: batch.to_version,
            }));
            Ok(Response::ModelChanges(batch))
        }
        Err(err) => {
            tracing::error!(edge = %edge_id, "edge sync failed: {err}");
            Err(RemoteError::new(
                ErrorCode::Internal,
                format!("the master cannot read its model: {err}"),
            ))
        }
    }
}

/// Pushes each new model version to the edge, from where its replica stands.
pub async fn push_changes(
    edge_id: EdgeId,
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
