//! Moving blobs over the link: the edge asks for the hashes it lacks
//! ([`Request::FetchBlobs`]); the master streams each content ([`serve_blobs`]); the edge
//! checks every content against its hash before it stores it, and asks again for what is
//! still missing ([`fetch_blobs`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::{Hash, content_hash};
use crate::link::{Link, Responder};
use crate::protocol::{ErrorCode, FileEntry, RemoteError, Request, StreamItem};
use crate::store::Store;

/// How many times an edge asks for blobs before it gives the update up.
pub const FETCH_ATTEMPTS: u32 = 3;
/// How long the master may take to start a blob stream.
const STREAM_START: Duration = Duration::from_secs(30);
/// How long a blob stream may stall before the edge gives this request up.
const STREAM_IDLE: Duration = Duration::from_secs(30);
/// Blobs held in memory before they are stored.
const BATCH_BYTES: usize = 4 << 20;

/// What a fetch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Blobs stored.
    pub stored: usize,
    /// Blobs refused because their content did not match their hash.
    pub refused: usize,
    /// Requests made.
    pub attempts: u32,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(|err| err.to_string()),
        Err(err) => Err(format!("the store task failed: {err}")),
    }
}

/// Fetches the blobs of `files` that `store` lacks, over `link`. Every content is checked
/// against its hash; one that does not match is refused (logged, not stored) and asked
/// for again, up to [`FETCH_ATTEMPTS`] requests in all.
pub async fn fetch_blobs(
    link: &Link,
    store: Arc<Store>,
    files: &[FileEntry],
) -> Result<Fetched, String> {
    let wanted: Vec<Hash> = files.iter().map(|f| f.hash).collect();
    let mut fetched = Fetched::default();
    loop {
        let s = store.clone();
        let w = wanted.clone();
        let missing = blocking(move || s.missing_blobs(&w)).await?;
        if missing.is_empty() {
            return Ok(fetched);
        }
        if fetched.attempts == FETCH_ATTEMPTS {
            return Err(format!(
                "{} file(s) still missing after {FETCH_ATTEMPTS} requests ({} refused: content did not match its hash)",
                missing.len(),
                fetched.refused
            ));
        }
        fetched.attempts += 1;
        let pending: BTreeSet<Hash> = missing.iter().copied().collect();
        let request = Request::FetchBlobs { hashes: missing };
        let mut stream = link
            .request_stream(request, STREAM_START)
            .await
            .map_err(|err| format!("cannot ask the master for files: {err}"))?;
        let mut batch: Vec<(Hash, Vec<u8>)> = Vec::new();
        let mut batch_bytes = 0;
        let mut failure = None;
        loop {
            let item = match tokio::time::timeout(STREAM_IDLE, stream.next()).await {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(_) => {
                    failure = Some(format!("the file stream stalled for {STREAM_IDLE:?}"));
                    break;
                }
            };
            let (hash, data) = match item {
                Ok(StreamItem::Blob { hash, data }) => (hash, data),
                Ok(other) => {
                    tracing::warn!("blob fetch: unexpected item {other:?} ignored");
                    continue;
                }
                Err(err) => {
                    failure = Some(format!("the file stream broke: {err}"));
                    break;
                }
            };
            if !pending.contains(&hash) {
                tracing::warn!(hash = %hex::encode(hash), "blob fetch: a file not asked for is ignored");
                continue;
            }
            if content_hash(&data) != hash {
                fetched.refused += 1;
                tracing::warn!(
                    hash = %hex::encode(hash),
                    "blob fetch: refused a file whose content does not match its hash; it is asked for again"
                );
                continue;
            }
            batch_bytes += data.len();
            batch.push((hash, data));
            if batch_bytes >= BATCH_BYTES {
                fetched.stored += store_batch(&store, std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
        }
        fetched.stored += store_batch(&store, batch).await?;
        if let Some(failure) = failure {
            if link.is_closed() {
                return Err(failure);
            }
            tracing::warn!("blob fetch: {failure}; asking again");
        }
    }
}

async fn store_batch(store: &Arc<Store>, batch: Vec<(Hash, Vec<u8>)>) -> Result<usize, String> {
    if batch.is_empty() {
        return Ok(0);
    }
    let count = batch.len();
    let store = store.clone();
    blocking(move || store.put_blobs(&batch)).await?;
    Ok(count)
}

/// Answers a [`Request::FetchBlobs`]: each blob held, as a stream. A hash this store does
/// not hold is skipped (the asker sees it still missing). One blob is read at a time and
/// sent before the next is read, so a fetch holds at most one blob in memory however
/// slowly the asker reads (the link's queue is bounded in bytes).
pub async fn serve_blobs(store: Arc<Store>, hashes: Vec<Hash>, responder: Responder) {
    for hash in hashes {
        if responder.is_cancelled() {
            return;
        }
        let s = store.clone();
        let found = match blocking(move || s.blobs(&[hash])).await {
            Ok(mut found) => found.remove(&hash),
            Err(err) => {
                responder
                    .end(Err(RemoteError::new(ErrorCode::Internal, err)))
                    .await;
                return;
            }
        };
        if let Some(data) = found {
            let item = StreamItem::Blob { hash, data };
            if responder.item(item).await.is_err() {
                return;
            }
        }
    }
    responder.end(Ok(())).await;
}
