//! Keeping an edge's replica equal to its slice of the master's model.
//!
//! The master answers a replica at version `since` with the records touched since then,
//! each as it is now (upserted when in the edge's slice, deleted when not), plus what those
//! records pull into the slice. When the log no longer reaches back, the replica came from
//! another model, or it claims a version the master never had, it gets a snapshot instead.
//! The edge applies a batch and then drops whatever fell out of its slice, so both sides
//! agree on membership by the same rule ([`Model::slice_keys`]).

use std::collections::BTreeSet;

use super::{Model, SliceKey};
use crate::protocol::{ModelBatch, ModelChange};
use crate::store::Write;

/// Where the replica stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaPosition {
    /// The master model the replica came from (0 for none).
    pub model_id: u64,
    /// Its version.
    pub version: u64,
}

/// The batch that brings `edge_id`'s replica at `at` to the master's `model` at `version`.
/// `log` is the change log since `at.version`, or `None` when it does not reach back.
pub fn batch_for_edge(
    model: &Model,
    model_id: u64,
    version: u64,
    edge_id: &str,
    at: ReplicaPosition,
    log: Option<&[ModelChange]>,
) -> ModelBatch {
    let slice = model.slice_keys(edge_id);
    let record = |(kind, id): &SliceKey, in_slice: bool| ModelChange {
        version,
        kind: *kind,
        id: id.clone(),
        record: if in_slice {
            model.get_json(*kind, id).map(crate::protocol::Json)
        } else {
            None
        },
    };
    let incremental = at.model_id == model_id && at.version <= version;
    match log.filter(|_| incremental) {
        Some(log) => {
            let touched: BTreeSet<SliceKey> = log.iter().map(|c| (c.kind, c.id.clone())).collect();
            let mut keys = BTreeSet::new();
            for key in &touched {
                if slice.contains(key) {
                    keys.extend(model.referents(key.0, &key.1));
                }
            }
            keys.extend(touched);
            ModelBatch {
                model_id,
                from_version: at.version,
                to_version: version,
                snapshot: false,
                changes: keys
                    .iter()
                    .map(|key| record(key, slice.contains(key)))
                    .collect(),
            }
        }
        None => ModelBatch {
            model_id,
            from_version: 0,
            to_version: version,
            snapshot: true,
            changes: slice.iter().map(|key| record(key, true)).collect(),
        },
    }
}

/// What applying a batch to a replica comes to.
#[derive(Debug)]
pub struct Applied {
    /// The replica after the batch.
    pub model: Model,
    /// The writes to store in one transaction (after clearing everything, for a snapshot).
    pub writes: Vec<Write>,
}

/// Why a batch cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    /// The batch starts after the replica's version: changes in between would be missing.
    #[error("the batch starts at version {from} but the replica is at {have}")]
    Gap {
        /// Where the batch starts.
        from: u64,
        /// Where the replica is.
        have: u64,
    },
    /// A record in the batch does not parse.
    #[error("record {kind:?} {id}: {message}")]
    BadRecord {
        /// Kind.
        kind: crate::protocol::EntityKind,
        /// Id.
        id: String,
        /// What is wrong.
        message: String,
    },
}

/// Applies a batch to `replica` (at `at`) for `edge_id`. An incremental batch that starts
/// at or before the replica's version applies cleanly, since it carries every touched
/// record as of its end; one that starts later is a gap, and the edge asks again.
/// `Ok(None)`: nothing to do (the replica is already at or past the batch's end).
pub fn apply_batch(
    replica: &Model,
    edge_id: &str,
    at: ReplicaPosition,
    batch: &ModelBatch,
) -> Result<Option<Applied>, BatchError> {
    if !batch.snapshot {
        if batch.model_id == at.model_id && batch.to_version <= at.version {
            return Ok(None);
        }
        if batch.model_id != at.model_id || batch.from_version > at.version {
            return Err(BatchError::Gap {
                from: batch.from_version,
                have: at.version,
            });
        }
    }
    let mut model = if batch.snapshot {
        Model::default()
    } else {
        replica.clone()
    };
    let mut writes = Vec::with_capacity(batch.changes.len());
    for change in &batch.changes {
        let json = change.record.as_ref().map(|j| j.0.as_str());
        model
            .set_json(change.kind, &change.id, json)
            .map_err(|err| BatchError::BadRecord {
                kind: change.kind,
                id: change.id.clone(),
                message: err.to_string(),
            })?;
        writes.push((change.kind, change.id.clone(), json.map(str::to_string)));
    }
    let keep = model.slice_keys(edge_id);
    for (kind, id, _) in model.entries() {
        if !keep.contains(&(kind, id.clone())) {
            let _ = model.set_json(kind, &id, None);
            writes.push((kind, id, None));
        }
    }
    Ok(Some(Applied { model, writes }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::EntityKind;

    fn set(model: &mut Model, kind: EntityKind, id: &str, json: &str) -> ModelChange {
        model.set_json(kind, id, Some(json)).unwrap();
        ModelChange {
            version: 0,
            kind,
            id: id.into(),
            record: Some(crate::protocol::Json(json.into())),
        }
    }

    fn base() -> Model {
        let mut m = Model::default();
        set(
            &mut m,
            EntityKind::Repository,
            "core",
            r#"{"id":"core","path":"/d"}"#,
        );
        set(
            &mut m,
            EntityKind::Driver,
            "d",
            r#"{"id":"d","repository":"core","file":"d.rhai"}"#,
        );
        set(&mut m, EntityKind::Edge, "e1", r#"{"id":"e1"}"#);
        set(&mut m, EntityKind::Edge, "e2", r#"{"id":"e2"}"#);
        set(
            &mut m,
            EntityKind::Module,
            "a",
            r#"{"id":"a","driver":"d","name":"A"}"#,
        );
        set(
            &mut m,
            EntityKind::Module,
            "b",
            r#"{"id":"b","driver":"d","name":"B","edge":"e2"}"#,
        );
        set(
            &mut m,
            EntityKind::System,
            "s",
            r#"{"id":"s","edge":"e1","modules":["a"]}"#,
        );
        m
    }

    fn sync(
        master: &Model,
        replica: &Model,
        at: ReplicaPosition,
        log: Option<&[ModelChange]>,
    ) -> Model {
        let batch = batch_for_edge(master, 1, 10, "e1", at, log);
        match apply_batch(replica, "e1", at, &batch).unwrap() {
            Some(applied) => applied.model,
            None => replica.clone(),
        }
    }

    #[test]
    fn a_snapshot_gives_the_slice() {
        let master = base();
        let replica = sync(
            &master,
            &Model::default(),
            ReplicaPosition {
                model_id: 0,
                version: 0,
            },
            None,
        );
        assert_eq!(replica, master.slice("e1"));
    }

    #[test]
    fn an_incremental_batch_adds_what_joined_and_drops_what_left() {
        let mut master = base();
        let replica = master.slice("e1");
        // The room swaps module a for b (which lives on e2): b and its driver join, a leaves.
        let log = vec![set(
            &mut master,
            EntityKind::System,
            "s",
            r#"{"id":"s","edge":"e1","modules":["b"]}"#,
        )];
        let at = ReplicaPosition {
            model_id: 1,
            version: 9,
        };
        let batch = batch_for_edge(&master, 1, 10, "e1", at, Some(&log));
        assert!(!batch.snapshot);
        let replica = apply_batch(&replica, "e1", at, &batch)
            .unwrap()
            .unwrap()
            .model;
        assert_eq!(replica, master.slice("e1"));
        assert!(replica.modules.contains_key("b") && !replica.modules.contains_key("a"));
    }

    #[test]
    fn another_model_or_a_short_log_gets_a_snapshot_and_a_gap_is_refused() {
        let master = base();
        let at = ReplicaPosition {
            model_id: 2,
            version: 3,
        };
        assert!(batch_for_edge(&master, 1, 10, "e1", at, Some(&[])).snapshot);
        let at = ReplicaPosition {
            model_id: 1,
            version: 11,
        };
        assert!(batch_for_edge(&master, 1, 10, "e1", at, Some(&[])).snapshot);
        let at = ReplicaPosition {
            model_id: 1,
            version: 3,
        };
        assert!(batch_for_edge(&master, 1, 10, "e1", at, None).snapshot);

        let mut batch = batch_for_edge(&master, 1, 10, "e1", at, Some(&[]));
        batch.from_version = 5;
        assert_eq!(
            apply_batch(&Model::default(), "e1", at, &batch).unwrap_err(),
            BatchError::Gap { from: 5, have: 3 }
        );
    }
}
