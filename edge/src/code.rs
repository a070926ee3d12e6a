//! The edge's side of a repository update: fetch the blobs it lacks from the master
//! (each checked against its hash), make the commit the one it runs, and let control
//! reconcile (the modules whose script changed reload in place).

use std::sync::Arc;

use tether_common::code::fetch::fetch_blobs;
use tether_common::code::short;
use tether_common::link::Link;
use tether_common::protocol::{ErrorCode, FileEntry, RemoteError, RepositoryAction};

use crate::replica::Replica;

/// Brings `repository` to `commit`; an error names what failed (the old commit keeps
/// running).
pub async fn update_repository(
    link: &Link,
    replica: &Arc<Replica>,
    repository: String,
    commit: String,
    action: RepositoryAction,
    files: Vec<FileEntry>,
) -> Result<(), RemoteError> {
    let _one = replica.lock_code().await;
    let current = replica.code().repo(&repository).map(|r| r.commit.clone());
    if current.as_deref() == Some(commit.as_str()) {
        return Ok(());
    }
    tracing::info!(
        repository = %repository,
        from = current.as_deref().map(short).unwrap_or("nothing"),
        to = short(&commit),
        ?action,
        "repository update"
    );
    let fetched = fetch_blobs(link, replica.store(), &files)
        .await
        .map_err(|err| {
            tracing::error!(repository = %repository, "repository update failed: {err}");
            RemoteError::new(
                ErrorCode::Unavailable,
                format!("repository {repository} at {}: {err}", short(&commit)),
            )
        })?;
    replica
        .set_commit(&repository, &commit, files)
        .await
        .map_err(|err| {
            tracing::error!(repository = %repository, "repository update not stored: {err}");
            RemoteError::new(ErrorCode::Internal, err)
        })?;
    tracing::info!(
        repository = %repository,
        commit = short(&commit),
        stored = fetched.stored,
        refused = fetched.refused,
        "the edge runs the new commit"
    );
    Ok(())
}
