//! Keeping each connected edge on the master's commits: on every link, and whenever a
//! repository moves or the edge's slice changes, each repository of the edge's slice
//! whose commit the edge has not acknowledged on this link is sent to it
//! ([`Request::RepositoryUpdate`]: the manifest; the edge fetches the blobs it lacks).
//! An edge that already runs that commit acknowledges at once, so a new link costs one
//! round trip per repository. What the edge acknowledged goes into its edge record.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tether_common::code::{Code, commit_label, short};
use tether_common::control::EdgeId;
use tether_common::link::Link;
use tether_common::protocol::{EntityKind, RepositoryAction, Request, Response};

use super::Repositories;

/// How long an edge may take to fetch a commit's blobs and reload.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(120);
/// The wait before an update that failed is sent again.
const RETRY: Duration = Duration::from_secs(3);

/// Runs until the link closes.
pub async fn push_code(edge_id: EdgeId, link: Link, repos: Arc<Repositories>) {
    let mut generation = repos.watch();
    let mut version = repos.model().watch_version();
    // What the edge acknowledged on this link, by repository.
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let mut recorded: Option<Option<String>> = None;
    // The code and the model version the edge's repositories were last found in, and
    // whether sending them failed then (so that the retry sends them again).
    let mut looked: Option<(Arc<Code>, u64)> = None;
    let mut failed = false;
    loop {
        generation.borrow_and_update();
        version.borrow_and_update();
        let code = repos.runtime().code();
        let (model, model_at) = repos.model().snapshot();
        // A change that no repository's place in a slice depends on (a user, a schedule,
        // an edge's settings) leaves the edge's repositories as they were: thousands of
        // edges need not each work out their slice again for it. The code is compared
        // itself, not its generation: code installed whose generation did not move (its
        // record's write failed) is still sent on the next change.
        let unchanged = looked.as_ref().is_some_and(|(code_was, model_was)| {
            Arc::ptr_eq(code_was, &code)
                && !repos
                    .model()
                    .changed_any_of(*model_was, model_at, &SLICE_CODE_KINDS)
        });
        // Looked at up to here either way: the next check starts from this version.
        looked = Some((code.clone(), model_at));
        if failed || !unchanged {
            let Some(sent) = send_wanted(&edge_id, &link, &repos, &model, &code, &mut acked).await
            else {
                return;
            };
            failed = !sent;
        }
        let label = commit_label(&acked);
        if recorded.as_ref() != Some(&label) && (!failed || !acked.is_empty()) {
            repos.record_edge_commit(&edge_id, label.clone()).await;
            recorded = Some(label);
        }
        let retry = async {
            if failed {
                tokio::time::sleep(RETRY).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = link.closed() => return,
            changed = generation.changed() => if changed.is_err() { return },
            changed = version.changed() => if changed.is_err() { return },
            _ = retry => {}
        }
    }
}

/// The kinds of record whose changes can move a repository into or out of a slice: a
/// system's edge and modules, a module's edge and driver, a driver's repository, the
/// repository itself ([`Model::slice_keys`](tether_common::model::Model::slice_keys)).
const SLICE_CODE_KINDS: [EntityKind; 4] = [
    EntityKind::System,
    EntityKind::Module,
    EntityKind::Driver,
    EntityKind::Repository,
];

/// Sends the edge every repository of its slice in `model` at a commit it has not
/// acknowledged on this link, and forgets those that left the slice. Answers whether
/// every one was taken, or `None` when the link closed.
async fn send_wanted(
    edge_id: &EdgeId,
    link: &Link,
    repos: &Repositories,
    model: &tether_common::model::Model,
    code: &Code,
    acked: &mut BTreeMap<String, String>,
) -> Option<bool> {
    let wanted: BTreeMap<String, String> = model
        .slice_keys(edge_id)
        .into_iter()
        .filter(|(kind, _)| *kind == EntityKind::Repository)
        .filter_map(|(_, id)| code.repo(&id).map(|r| (id, r.commit.clone())))
        .collect();
    acked.retain(|id, _| wanted.contains_key(id));
    let mut failed = false;
    for (id, commit) in &wanted {
        if acked.get(id) == Some(commit) {
            continue;
        }
        let Some(repo) = code.repo(id) else { continue };
        let action = if acked.contains_key(id) {
            repos.last_action(id)
        } else {
            RepositoryAction::CatchUp
        };
        let request = Request::RepositoryUpdate {
            repository: id.clone(),
            commit: commit.clone(),
            action,
            files: repo.files.clone(),
        };
        match link.request(request, UPDATE_TIMEOUT).await {
            Ok(Response::Ack) => {
                tracing::info!(edge = %edge_id, repository = %id, commit = short(commit), "the edge runs the commit");
                acked.insert(id.clone(), commit.clone());
            }
            Ok(other) => {
                tracing::error!(edge = %edge_id, "the edge answered a repository update with {other:?}");
                failed = true;
            }
            Err(err) => {
                if link.is_closed() {
                    return None;
                }
                tracing::warn!(edge = %edge_id, repository = %id, "repository update failed: {err}");
                failed = true;
            }
        }
    }
    Some(!failed)
}
