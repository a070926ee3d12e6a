//! Driver code over a real link (TLS on loopback, in process): the edge fetches only the
//! blobs it lacks, refuses a content that does not match its hash, and asks for it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tether_common::code::fetch::{FETCH_ATTEMPTS, Fetched, fetch_blobs};
use tether_common::code::{Hash, content_hash};
use tether_common::link::Incoming;
use tether_common::protocol::{FileEntry, Request, StreamItem};
use tether_common::store::Store;
use tether_tests::inproc::pair;
use tokio::sync::mpsc;

fn entry(path: &str, data: &[u8]) -> FileEntry {
    FileEntry {
        path: path.into(),
        hash: content_hash(data),
        size: data.len() as u64,
    }
}

/// Serves FetchBlobs from `blobs`; the first `corrupt` answers flip a byte of every
/// content. Records the hashes of each request.
fn serve(
    mut incoming: mpsc::Receiver<Incoming>,
    blobs: HashMap<Hash, Vec<u8>>,
    corrupt: usize,
) -> Arc<Mutex<Vec<Vec<Hash>>>> {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    tokio::spawn(async move {
        while let Some(Incoming::Request(request)) = incoming.recv().await {
            let Request::FetchBlobs { hashes } = request.body else {
                continue;
            };
            let round = {
                let mut log = log.lock().unwrap();
                log.push(hashes.clone());
                log.len()
            };
            for hash in hashes {
                let mut data = blobs[&hash].clone();
                if round <= corrupt {
                    data[0] ^= 0xff;
                }
                let item = StreamItem::Blob { hash, data };
                request.responder.item(item).await.unwrap();
            }
            request.responder.end(Ok(())).await;
        }
    });
    asked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_whose_content_does_not_match_its_hash_is_refused_and_fetched_again() {
    let (edge, _edge_incoming, _master, master_incoming, _keep) = pair(1 << 20, false).await;
    let (held, wanted) = (b"fn held() {}".to_vec(), b"fn version() { 2 }".to_vec());
    let files = vec![entry("held.rhai", &held), entry("display.rhai", &wanted)];
    let blobs: HashMap<Hash, Vec<u8>> = [
        (content_hash(&held), held.clone()),
        (content_hash(&wanted), wanted.clone()),
    ]
    .into();
    let asked = serve(master_incoming, blobs, 1);

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("edge.redb")).unwrap());
    store.put_blobs(&[(content_hash(&held), held)]).unwrap();

    let fetched = fetch_blobs(&edge, store.clone(), &files).await.unwrap();
    assert_eq!(
        fetched,
        Fetched {
            stored: 1,
            refused: 1,
            attempts: 2
        }
    );
    // Only the blob it lacked was asked for, twice: the bad copy was not kept.
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked, vec![vec![content_hash(&wanted)]; 2]);
    let stored = store.blobs(&[content_hash(&wanted)]).unwrap();
    assert_eq!(stored[&content_hash(&wanted)], wanted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_keeps_sending_bad_content_gets_nothing_stored() {
    let (edge, _edge_incoming, _master, master_incoming, _keep) = pair(1 << 20, false).await;
    let data = b"fn version() { 3 }".to_vec();
    let files = vec![entry("display.rhai", &data)];
    let asked = serve(
        master_incoming,
        [(content_hash(&data), data.clone())].into(),
        usize::MAX,
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("edge.redb")).unwrap());
    let error = fetch_blobs(&edge, store.clone(), &files).await.unwrap_err();
    assert!(error.contains("did not match its hash"), "{error}");
    assert_eq!(asked.lock().unwrap().len(), FETCH_ATTEMPTS as usize);
    assert_eq!(
        store.missing_blobs(&[content_hash(&data)]).unwrap(),
        vec![content_hash(&data)]
    );
}
