//! The cluster's model in etcd: one model id, one version and one change log for every
//! master, so an edge that moves to another master catches up incrementally.
//!
//! Keys, under the prefix: `model/id`, `model/version` and `model/floor` (JSON numbers),
//! `model/records/KIND/ID` (`{"version": N, "record": {...}}`) and `model/log/LAST`
//! (one write's changes, a JSON array, keyed by its last version, zero-padded so keys sort
//! by version). A commit is one transaction that compares `model/version` with the
//! version the write was planned on, so of two masters writing at once one lands and the
//! other plans again on the newer model and lands after it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, Txn, TxnOp};

use super::Etcd;
use crate::model::{KINDS, Model, kind_name};
use crate::protocol::{EntityKind, Json, ModelChange};
use crate::store::grants::Pending;
use crate::store::{
    CommitError, Fed, LoadedModel, ModelStore, RecordVersions, StoreError, StoreState, Write,
};

/// Records one transaction writes at most: etcd takes 128 operations per transaction
/// (`--max-txn-ops`), and a commit adds the version, the log entry and the log's trim.
const RECORDS_PER_TXN: usize = 100;
/// Bytes of records one transaction writes at most (each record is written twice, as
/// itself and in the log), well under etcd's 1.5 MiB request limit.
const BYTES_PER_TXN: usize = 384 * 1024;

/// A record as etcd holds it.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredRecord {
    version: u64,
    record: serde_json::Value,
}

/// The model under an etcd prefix, shared by every master of the cluster.
pub struct EtcdModel {
    etcd: Etcd,
    model_id: u64,
}

impl std::fmt::Debug for EtcdModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdModel")
            .field("etcd", &self.etcd)
            .field("model_id", &self.model_id)
            .finish()
    }
}

fn kind_from_name(name: &str) -> Option<EntityKind> {
    KINDS.into_iter().find(|&kind| kind_name(kind) == name)
}

fn log_key(version: u64) -> String {
    format!("model/log/{version:020}")
}

fn record_key(kind: EntityKind, id: &str) -> String {
    format!("model/records/{}/{id}", kind_name(kind))
}

/// The key after every key that starts with `prefix` (etcd's range end for a prefix).
pub(super) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdModel {
    /// The cluster's model, given its id by the first master that opens it.
    pub async fn open(etcd: Etcd) -> Result<Self, StoreError> {
        let key = etcd.key("model/id");
        let fresh: u64 = rand::random::<u64>().max(1);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), fresh.to_string(), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let answer = etcd.txn("cannot read the model id", txn).await?;
        let model_id = if answer.succeeded() {
            fresh
        } else {
            let stored = answer.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                _ => None,
            });
            stored
                .and_then(|kv| number(&kv))
                .ok_or_else(|| etcd.corrupt("model/id is not a number"))?
        };
        Ok(EtcdModel { etcd, model_id })
    }

    /// The version and the log floor as of revision `at`.
    async fn state_at(&self, at: i64) -> Result<StoreState, StoreError> {
        Ok(StoreState {
            model_id: self.model_id,
            version: self.number_at("model/version", at).await?,
            log_floor: self.number_at("model/floor", at).await?,
        })
    }

    /// A counter as of revision `at` (0 when absent).
    async fn number_at(&self, rest: &str, at: i64) -> Result<u64, StoreError> {
        let answer = self
            .etcd
            .get(
                "cannot read the model",
                self.etcd.key(rest),
                Some(GetOptions::new().with_revision(at)),
            )
            .await?;
        Ok(answer.kvs().first().and_then(number).unwrap_or(0))
    }

    /// Commits one transaction's worth of writes at `base`.
    async fn commit_chunk(
        &self,
        base: u64,
        writes: &[Write],
        log_limit: u64,
    ) -> Result<Vec<ModelChange>, CommitError> {
        let version_key = self.etcd.key("model/version");
        let unchanged = match base {
            0 => Compare::version(version_key.clone(), CompareOp::Equal, 0),
            _ => Compare::value(version_key.clone(), CompareOp::Equal, base.to_string()),
        };
        let mut changes = Vec::with_capacity(writes.len());
        let mut then = Vec::with_capacity(writes.len() + 4);
        let mut version = base;
        for (kind, id, json) in writes {
            version += 1;
            let key = self.etcd.key(&record_key(*kind, id));
            match json {
                Some(json) => {
                    let record = serde_json::from_str(json).map_err(|err| StoreError::Corrupt {
                        path: key.clone().into(),
                        what: format!("the record is not JSON: {err}"),
                    })?;
                    // A record always encodes: a number and a JSON value.
                    let stored =
                        serde_json::to_vec(&StoredRecord { version, record }).unwrap_or_default();
                    then.push(TxnOp::put(key, stored, None));
                }
                None => then.push(TxnOp::delete(key, None)),
            }
            changes.push(ModelChange {
                version,
                kind: *kind,
                id: id.clone(),
                record: json.clone().map(Json),
            });
        }
        // Changes always encode: strings and integers.
        let entry = serde_json::to_vec(&changes).unwrap_or_default();
        then.push(TxnOp::put(
            self.etcd.key(&log_key(version)),
            entry.clone(),
            None,
        ));
        then.push(TxnOp::put(version_key, version.to_string(), None));
        let floor = version.saturating_sub(log_limit.max(1));
        if floor > 0 {
            // Entries keyed at or below the floor hold no change the log must keep.
            then.push(TxnOp::put(
                self.etcd.key("model/floor"),
                floor.to_string(),
                None,
            ));
            then.push(TxnOp::delete(
                self.etcd.key(&log_key(0)),
                Some(DeleteOptions::new().with_range(self.etcd.key(&log_key(floor + 1)))),
            ));
        }
        let txn = Txn::new().when([unchanged]).and_then(then);
        let answer = match self.etcd.txn(COMMIT, txn.clone()).await {
            Ok(answer) => answer,
            // No answer: the write may have landed (the leader died with it in hand, or
            // the answer timed out during an election). Find out, rather than tell the
            // writer it failed.
            Err(err) => {
                return self
                    .commit_unanswered(base, version, &entry, txn, changes, err)
                    .await;
            }
        };
        if answer.succeeded() {
            Ok(changes)
        } else {
            Err(CommitError::Behind { base })
        }
    }

    /// A commit at `base` up to `version` (`txn`, logging `entry`) got no answer (`err`):
    /// answers as it landed, commits once more when it did not and nothing else did
    /// (still guarded by `base`, so it cannot land twice), or says that it cannot tell.
    async fn commit_unanswered(
        &self,
        base: u64,
        version: u64,
        entry: &[u8],
        txn: Txn,
        changes: Vec<ModelChange>,
        err: StoreError,
    ) -> Result<Vec<ModelChange>, CommitError> {
        match self.landed(version, entry).await {
            Some(Landed::Yes) => {
                tracing::warn!(version, "a model write got no answer but landed: {err}");
                Ok(changes)
            }
            Some(Landed::No { now }) if now == base => {
                tracing::warn!(
                    version,
                    "a model write got no answer and did not land; once more: {err}"
                );
                if self.etcd.txn(COMMIT, txn).await?.succeeded() {
                    Ok(changes)
                } else {
                    Err(CommitError::Behind { base })
                }
            }
            Some(Landed::No { .. }) => Err(CommitError::Behind { base }),
            None => {
                let what = match err {
                    StoreError::Etcd { what, .. } => what,
                    other => other.to_string(),
                };
                Err(CommitError::Store(StoreError::Etcd {
                    endpoints: self.etcd.endpoints.to_string(),
                    what: format!(
                        "a model write got no answer, and etcd could not tell within {} s whether it landed (read the record to see): {what}",
                        RESOLVE_FOR.as_secs()
                    ),
                }))
            }
        }
    }

    /// After a commit up to `version` got no answer: whether it landed, by its log entry
    /// (`entry`, which names every change it made), asked again for up to `RESOLVE_FOR`
    /// while etcd cannot answer (an election under way); none when it still cannot.
    async fn landed(&self, version: u64, entry: &[u8]) -> Option<Landed> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            if let Ok(answer) = self.landed_now(version, entry).await {
                return answer;
            }
            if started.elapsed() + pause > RESOLVE_FOR {
                return None;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    async fn landed_now(&self, version: u64, entry: &[u8]) -> Result<Option<Landed>, StoreError> {
        let key = self.etcd.key(&log_key(version));
        let stored = self.etcd.get("cannot read the model", key, None).await?;
        let now = self.version_now().await?;
        Ok(match stored.kvs().first() {
            Some(kv) if kv.value() == entry => Some(Landed::Yes),
            // Another commit took that version.
            Some(_) => Some(Landed::No { now }),
            // No entry at that version: the model has not reached it, so the commit did
            // not land; or the log was trimmed past it since (many commits later), and
            // whose commit it was cannot be told.
            None => (now < version).then_some(Landed::No { now }),
        })
    }

    /// The model version stored now.
    async fn version_now(&self) -> Result<u64, StoreError> {
        self.number_at("model/version", 0).await
    }
}

/// What a commit's error names.
const COMMIT: &str = "cannot commit a model write";

/// Whether a commit that got no answer landed.
enum Landed {
    Yes,
    /// No; the model's version `now`.
    No {
        now: u64,
    },
}

/// How long a commit without an answer is looked for before its error is given to the
/// writer: longer than an election of etcd's (about a second with its defaults).
const RESOLVE_FOR: Duration = Duration::from_secs(5);

/// A key's value as a number (the model's counters).
fn number(kv: &KeyValue) -> Option<u64> {
    std::str::from_utf8(kv.value()).ok()?.trim().parse().ok()
}

impl Etcd {
    fn corrupt(&self, what: &str) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.to_string(),
            what: what.to_string(),
        }
    }
}

/// Splits writes into runs one transaction takes.
fn chunks(writes: &[Write]) -> Vec<&[Write]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (at, (_, id, json)) in writes.iter().enumerate() {
        let size = id.len() + json.as_ref().map_or(0, String::len);
        if at > start && (at - start >= RECORDS_PER_TXN || bytes + size > BYTES_PER_TXN) {
            chunks.push(&writes[start..at]);
            start = at;
            bytes = 0;
        }
        bytes += size;
    }
    if start < writes.len() {
        chunks.push(&writes[start..]);
    }
    chunks
}

impl ModelStore for EtcdModel {
    fn model_id(&self) -> u64 {
        self.model_id
    }

    fn load(self: Arc<Self>) -> Pending<Result<LoadedModel, StoreError>> {
        Box::pin(async move {
            let prefix = self.etcd.key("model/records/");
            let (kvs, revision) = self
                .etcd
                .read_range(prefix.clone(), prefix_end(&prefix), None)
                .await?;
            let state = self.state_at(revision).await?;
            let mut model = Model::default();
            let mut record_versions = RecordVersions::new();
            for kv in kvs {
                let key = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                let corrupt = |what: String| StoreError::Corrupt {
                    path: format!("{prefix}{key}").into(),
                    what,
                };
                let (kind, id) = key
                    .split_once('/')
                    .and_then(|(kind, id)| Some((kind_from_name(kind)?, id)))
                    .ok_or_else(|| corrupt("not a record key".into()))?;
                let stored: StoredRecord = serde_json::from_slice(kv.value())
                    .map_err(|err| corrupt(format!("does not decode: {err}")))?;
                model
                    .set_json(kind, id, Some(&stored.record.to_string()))
                    .map_err(|err| corrupt(err.to_string()))?;
                record_versions.insert((kind, id.to_string()), stored.version);
            }
            Ok(LoadedModel {
                model,
                state,
                record_versions,
            })
        })
    }

    fn commit(
        self: Arc<Self>,
        base: u64,
        writes: Vec<Write>,
        log_limit: u64,
    ) -> Pending<Result<Vec<ModelChange>, CommitError>> {
        Box::pin(async move {
            let mut committed: Vec<ModelChange> = Vec::with_capacity(writes.len());
            let mut at = base;
            for chunk in chunks(&writes) {
                loop {
                    match self.commit_chunk(at, chunk, log_limit).await {
                        Ok(changes) => {
                            at = changes.last().map_or(at, |c| c.version);
                            committed.extend(changes);
                            break;
                        }
                        // A write too large for one transaction lands in runs; once the
                        // first has landed, the rest follow whatever others write between.
                        Err(CommitError::Behind { .. }) if !committed.is_empty() => {
                            at = self.version_now().await?;
                        }
                        Err(err) if committed.is_empty() => return Err(err),
                        Err(err) => {
                            return Err(CommitError::Store(StoreError::Etcd {
                                endpoints: self.etcd.endpoints.to_string(),
                                what: format!(
                                    "a write of {} records was committed only in part ({} records, up to version {at}): {err}",
                                    writes.len(),
                                    committed.len()
                                ),
                            }));
                        }
                    }
                }
            }
            Ok(committed)
        })
    }

    fn changes_since(
        self: Arc<Self>,
        since: u64,
    ) -> Pending<Result<Option<Vec<ModelChange>>, StoreError>> {
        Box::pin(async move {
            let (kvs, revision) = self
                .etcd
                .read_range(
                    self.etcd.key(&log_key(since + 1)),
                    prefix_end(&self.etcd.key("model/log/")),
                    None,
                )
                .await?;
            let state = self.state_at(revision).await?;
            if since < state.log_floor || since > state.version {
                return Ok(None);
            }
            let mut changes = Vec::new();
            for kv in kvs {
                let entry: Vec<ModelChange> =
                    serde_json::from_slice(kv.value()).map_err(|err| StoreError::Corrupt {
                        path: String::from_utf8_lossy(kv.key()).into_owned().into(),
                        what: format!("the log entry does not decode: {err}"),
                    })?;
                changes.extend(entry.into_iter().filter(|c| c.version > since));
            }
            // Unbroken from `since` up to the version read, or not at all: masters with
            // different log limits may have moved the floor back over entries already
            // trimmed, and a gap would leave a copy of the model silently wrong.
            let unbroken = changes
                .iter()
                .zip(since + 1..)
                .all(|(change, expected)| change.version == expected)
                && changes.last().map_or(since, |c| c.version) >= state.version;
            Ok(unbroken.then_some(changes))
        })
    }

    fn follow(self: Arc<Self>) -> Option<tokio::sync::mpsc::Receiver<Fed>> {
        let (feed, fed) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                if let Err(err) = self.follow_once(&feed).await {
                    tracing::warn!("following the model in etcd: {err}; again shortly");
                }
                if feed.is_closed() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        });
        Some(fed)
    }
}

impl EtcdModel {
    /// Watches the log: each new entry is fed; a (re)started watch first says to resync.
    async fn follow_once(&self, feed: &tokio::sync::mpsc::Sender<Fed>) -> Result<(), StoreError> {
        let prefix = self.etcd.key("model/log/");
        let options = etcd_client::WatchOptions::new().with_prefix();
        let mut stream = self
            .etcd
            .call("cannot watch the model", |client| {
                let (prefix, options) = (prefix.clone(), options.clone());
                async move {
                    client
                        .watch_client()
                        .max_decoding_message_size(super::READ_LIMIT)
                        .watch(prefix, Some(options))
                        .await
                }
            })
            .await?;
        // Whatever landed before the watch began, the follower reads from the log.
        if feed.send(Fed::Resync).await.is_err() {
            return Ok(());
        }
        loop {
            let answer = stream
                .message()
                .await
                .map_err(|err| self.etcd.error("the model's watch failed", err))?;
            let Some(answer) = answer else {
                return Err(StoreError::Stopped("the model's watch ended".into()));
            };
            if answer.canceled() {
                return Err(StoreError::Stopped(
                    "etcd cancelled the model's watch".into(),
                ));
            }
            let mut changes = Vec::new();
            for event in answer.events() {
                if event.event_type() != etcd_client::EventType::Put {
                    continue;
                }
                let Some(kv) = event.kv() else { continue };
                match serde_json::from_slice::<Vec<ModelChange>>(kv.value()) {
                    Ok(entry) => changes.extend(entry),
                    Err(err) => {
                        tracing::error!(
                            key = %String::from_utf8_lossy(kv.key()),
                            "a model log entry does not decode: {err}"
                        );
                        // The follower finds the gap and reads the log.
                    }
                }
            }
            if !changes.is_empty() && feed.send(Fed::Changes(changes)).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end("a/"), b"a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn log_keys_sort_by_version() {
        assert!(log_key(9) < log_key(10));
        assert!(log_key(99_999) < log_key(100_000));
    }

    #[test]
    fn large_writes_are_split_by_count_and_by_bytes() {
        let write =
            |size: usize| -> Write { (EntityKind::Edge, "e".into(), Some("x".repeat(size))) };
        let many: Vec<Write> = (0..250).map(|_| write(10)).collect();
        assert_eq!(
            chunks(&many).iter().map(|c| c.len()).collect::<Vec<_>>(),
            [100, 100, 50]
        );
        let big: Vec<Write> = (0..5).map(|_| write(200 * 1024)).collect();
        assert_eq!(
            chunks(&big).iter().map(|c| c.len()).collect::<Vec<_>>(),
            [1, 1, 1, 1, 1]
        );
        assert!(chunks(&[]).is_empty());
    }
}
