//! Driver code the masters share in etcd: `code/manifests/REPO/COMMIT` (the files, JSON)
//! and `code/blobs/HASH/N` (a file's content in chunks under etcd's request limit, by
//! content hash, so a file common to many commits is stored once).

use std::collections::HashMap;
use std::sync::Arc;

use etcd_client::{Txn, TxnOp};

use super::Etcd;
use super::model::prefix_end;
use crate::code::Hash;
use crate::protocol::FileEntry;
use crate::store::grants::Pending;
use crate::store::{CommitCode, SharedCode, StoreError};

/// Bytes of one blob chunk (etcd takes requests up to 1.5 MiB).
const CHUNK: usize = 512 * 1024;

/// The cluster's shared code.
#[derive(Debug, Clone)]
pub struct EtcdCode {
    etcd: Etcd,
}

impl EtcdCode {
    /// The code under `etcd`'s prefix.
    pub fn new(etcd: Etcd) -> Self {
        EtcdCode { etcd }
    }

    fn manifest_key(&self, repository: &str, commit: &str) -> String {
        self.etcd
            .key(&format!("code/manifests/{repository}/{commit}"))
    }

    fn blob_prefix(&self, hash: &Hash) -> String {
        self.etcd.key(&format!("code/blobs/{}/", hex::encode(hash)))
    }

    /// Whether a blob is stored whole (its last chunk is written last).
    async fn has_blob(&self, hash: &Hash, size: usize) -> Result<bool, StoreError> {
        let last = size.saturating_sub(1) / CHUNK;
        let key = format!("{}{last:06}", self.blob_prefix(hash));
        let answer = self
            .etcd
            .get(
                "cannot read shared code",
                key,
                Some(etcd_client::GetOptions::new().with_count_only()),
            )
            .await?;
        Ok(answer.count() > 0)
    }
}

impl SharedCode for EtcdCode {
    fn put(
        self: Arc<Self>,
        repository: String,
        commit: String,
        code: CommitCode,
    ) -> Pending<Result<(), StoreError>> {
        Box::pin(async move {
            for (hash, data) in &code.blobs {
                if self.has_blob(hash, data.len()).await? {
                    continue;
                }
                let prefix = self.blob_prefix(hash);
                // One chunk a request; an empty file is one empty chunk.
                let chunks: Vec<&[u8]> = if data.is_empty() {
                    vec![&[]]
                } else {
                    data.chunks(CHUNK).collect()
                };
                for (n, chunk) in chunks.into_iter().enumerate() {
                    self.etcd
                        .put("cannot share code", format!("{prefix}{n:06}"), chunk, None)
                        .await?;
                }
            }
            // The files always encode: strings, numbers and byte arrays.
            let manifest = serde_json::to_vec(&code.files).unwrap_or_default();
            self.etcd
                .txn(
                    "cannot share code",
                    Txn::new().and_then([TxnOp::put(
                        self.manifest_key(&repository, &commit),
                        manifest,
                        None,
                    )]),
                )
                .await?;
            Ok(())
        })
    }

    fn get(
        self: Arc<Self>,
        repository: String,
        commit: String,
    ) -> Pending<Result<Option<CommitCode>, StoreError>> {
        Box::pin(async move {
            let key = self.manifest_key(&repository, &commit);
            let answer = self
                .etcd
                .get("cannot read shared code", key.clone(), None)
                .await?;
            let Some(kv) = answer.kvs().first() else {
                return Ok(None);
            };
            let files: Vec<FileEntry> =
                serde_json::from_slice(kv.value()).map_err(|err| StoreError::Corrupt {
                    path: key.clone().into(),
                    what: format!("the manifest does not decode: {err}"),
                })?;
            let mut blobs = HashMap::new();
            for file in &files {
                if blobs.contains_key(&file.hash) {
                    continue;
                }
                let prefix = self.blob_prefix(&file.hash);
                let (chunks, _) = self
                    .etcd
                    .read_range(prefix.clone(), prefix_end(&prefix), None)
                    .await?;
                let data: Vec<u8> = chunks.iter().flat_map(|kv| kv.value().to_vec()).collect();
                if crate::code::content_hash(&data) != file.hash {
                    return Err(StoreError::Corrupt {
                        path: prefix.into(),
                        what: format!("{} does not match its hash", file.path),
                    });
                }
                blobs.insert(file.hash, data);
            }
            Ok(Some(CommitCode { files, blobs }))
        })
    }
}
