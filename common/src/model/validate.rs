//! The rules a write must keep: records parse, ids have the allowed form, values are in
//! range, references name existing records, and nothing still referred to is deleted.

use serde::de::DeserializeOwned;

use super::{Model, kind_singular};
use crate::protocol::EntityKind;

/// Why a write was refused. The API maps these to 422, 404 and 409.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The record is malformed or refers to something that does not exist.
    #[error("{0}")]
    Invalid(String),
    /// No such record.
    #[error("{0}")]
    NotFound(String),
    /// The write conflicts with what exists (an id taken, a record still referred to).
    #[error("{0}")]
    Conflict(String),
}

/// Parses a record, naming the key at fault: `key `timeout_ms`: invalid type ...`.
pub(super) fn parse<R: DeserializeOwned>(text: &str) -> Result<R, ModelError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path == "." {
            ModelError::Invalid(inner.to_string())
        } else {
            ModelError::Invalid(format!("key `{path}`: {inner}"))
        }
    })
}

/// Checks an id's form: 1 to 64 letters, digits, `-`, `_` or `.`.
pub fn check_id(what: &str, id: &str) -> Result<(), ModelError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ModelError::Invalid(format!(
            "key `{what}`: expected 1 to 64 letters, digits, '-', '_' or '.', not {id:?}"
        )))
    }
}

fn check_range(
    key: &str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<(), ModelError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(ModelError::Invalid(format!(
            "key `{key}`: expected a value in {}..={}, not {value}",
            range.start(),
            range.end()
        )))
    }
}

impl Model {
    fn must_exist(&self, key: &str, kind: EntityKind, id: &str) -> Result<(), ModelError> {
        if self.contains(kind, id) {
            Ok(())
        } else {
            Err(ModelError::Invalid(format!(
                "key `{key}`: no {} with id {id:?}",
                kind_singular(kind)
            )))
        }
    }

    /// Checks the record `kind`/`id` of this model against the rules, as it would be after
    /// a write. Records it refers to must exist in this model.
    pub fn check_record(&self, kind: EntityKind, id: &str) -> Result<(), ModelError> {
        check_id("id", id)?;
        match kind {
            EntityKind::Edge => {
                let Some(edge) = self.edges.get(id) else {
                    return Ok(());
                };
                check_range("timeout_ms", edge.timeout_ms, 100..=86_400_000)?;
                if let Some(window) = &edge.restore_window {
                    check_range("restore_window.length_s", window.length_s, 1..=86_400 * 7)?;
                    if let Err(expected) = window.schedule() {
                        return Err(ModelError::Invalid(format!(
                            "key `restore_window.start`: expected {expected}"
                        )));
                    }
                }
                if let Some(zone) = &edge.time_zone
                    && let Err(expected) = tether_config::parse_time_zone(zone)
                {
                    return Err(ModelError::Invalid(format!(
                        "key `time_zone`: expected {expected}"
                    )));
                }
                for (i, admin) in edge.admins.iter().enumerate() {
                    check_id(&format!("admins[{i}]"), admin)?;
                }
                if let Some((other, _)) = self
                    .edges
                    .iter()
                    .find(|(_, e)| e.nodes.iter().any(|n| n == id))
                {
                    return Err(ModelError::Invalid(format!(
                        "key `id`: expected an id no node has; {id:?} is a node of location {other:?}"
                    )));
                }
                for (i, node) in edge.nodes.iter().enumerate() {
                    let key = format!("nodes[{i}]");
                    check_id(&key, node)?;
                    // A node's id is what its link authenticates as: it names one node of
                    // one location, never another location.
                    let taken = self.edges.iter().any(|(other_id, other)| {
                        other_id != id && (other_id == node || other.nodes.contains(node))
                    });
                    if taken {
                        return Err(ModelError::Invalid(format!(
                            "key `{key}`: expected a node id no other location or node has, not {node:?}"
                        )));
                    }
                }
                tether_config::check_pair(
                    id,
                    &edge.nodes,
                    edge.pair_timeout_ms,
                    edge.isolation,
                    edge.unwitnessed_takeover_ms,
                    edge.device_hold_down_ms,
                )
                .map_err(|(key, expected)| {
                    ModelError::Invalid(format!("key `{key}`: expected {expected}"))
                })?;
            }
            EntityKind::Repository => {
                if let Some(repository) = self.repositories.get(id)
                    && repository.path.is_empty()
                {
                    return Err(ModelError::Invalid(
                        "key `path`: expected a folder, not an empty string".into(),
                    ));
                }
            }
            EntityKind::Driver => {
                let Some(driver) = self.drivers.get(id) else {
                    return Ok(());
                };
                self.must_exist("repository", EntityKind::Repository, &driver.repository)?;
                check_range("concurrency", driver.concurrency.into(), 1..=64)?;
                check_range("timeout_ms", driver.timeout_ms, 10..=3_600_000)?;
                if driver.delimiter.is_some() && driver.frame_length.is_some() {
                    return Err(ModelError::Invalid(
                        "key `frame_length`: expected either a delimiter or a frame_length, not both"
                            .into(),
                    ));
                }
                if driver.delimiter.as_deref() == Some("") {
                    return Err(ModelError::Invalid(
                        "key `delimiter`: expected a non-empty delimiter".into(),
                    ));
                }
                if let Some(length) = driver.frame_length {
                    check_range("frame_length", length.into(), 1..=65_536)?;
                }
            }
            EntityKind::Module => {
                let Some(module) = self.modules.get(id) else {
                    return Ok(());
                };
                self.must_exist("driver", EntityKind::Driver, &module.driver)?;
                if let Some(edge) = &module.edge {
                    self.must_exist("edge", EntityKind::Edge, edge)?;
                }
                if module.name.is_empty() {
                    return Err(ModelError::Invalid(
                        "key `name`: expected a name such as \"Display\"".into(),
                    ));
                }
            }
            EntityKind::System => {
                let Some(system) = self.systems.get(id) else {
                    return Ok(());
                };
                if let Some(edge) = &system.edge {
                    self.must_exist("edge", EntityKind::Edge, edge)?;
                }
                for (i, module) in system.modules.iter().enumerate() {
                    self.must_exist(&format!("modules[{i}]"), EntityKind::Module, module)?;
                }
            }
            EntityKind::User => {
                if let Some(user) = self.users.get(id)
                    && !["admin", "operator", "viewer"].contains(&user.role.as_str())
                {
                    return Err(ModelError::Invalid(format!(
                        "key `role`: expected admin, operator or viewer, not {:?}",
                        user.role
                    )));
                }
            }
        }
        Ok(())
    }

    /// Who still refers to `kind`/`id`, as `kind id` strings; a delete must wait for them.
    pub fn referrers(&self, kind: EntityKind, id: &str) -> Vec<String> {
        let mut found = Vec::new();
        match kind {
            EntityKind::Repository => found.extend(
                self.drivers
                    .values()
                    .filter(|d| d.repository == id)
                    .map(|d| format!("driver {}", d.id)),
            ),
            EntityKind::Driver => found.extend(
                self.modules
                    .values()
                    .filter(|m| m.driver == id)
                    .map(|m| format!("module {}", m.id)),
            ),
            EntityKind::Edge => {
                found.extend(
                    self.modules
                        .values()
                        .filter(|m| m.edge.as_deref() == Some(id))
                        .map(|m| format!("module {}", m.id)),
                );
                found.extend(
                    self.systems
                        .values()
                        .filter(|s| s.edge.as_deref() == Some(id))
                        .map(|s| format!("system {}", s.id)),
                );
            }
            EntityKind::Module => {
                found.extend(self.systems_of(id).map(|s| format!("system {}", s.id)))
            }
            EntityKind::System | EntityKind::User => {}
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_field_is_named() {
        let mut model = Model::default();
        let err = model
            .set_json(
                EntityKind::Edge,
                "e1",
                Some(r#"{"id":"e1","timeout_ms":"soon"}"#),
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("key `timeout_ms`: invalid type"),
            "{err}"
        );
        let err = model
            .set_json(EntityKind::Edge, "e1", Some(r#"{"id":"e1","colour":1}"#))
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn references_and_ranges_are_checked() {
        let mut model = Model::default();
        model
            .set_json(
                EntityKind::Module,
                "m",
                Some(r#"{"id":"m","driver":"nope","name":"Display"}"#),
            )
            .unwrap();
        assert_eq!(
            model.check_record(EntityKind::Module, "m"),
            Err(ModelError::Invalid(
                "key `driver`: no driver with id \"nope\"".into()
            ))
        );
        model
            .set_json(EntityKind::Edge, "e", Some(r#"{"id":"e","timeout_ms":5}"#))
            .unwrap();
        let err = model.check_record(EntityKind::Edge, "e").unwrap_err();
        assert!(err.to_string().contains("timeout_ms"), "{err}");
        assert!(check_id("id", "a b").is_err());
    }

    #[test]
    fn referrers_block_a_delete() {
        let mut model = Model::default();
        model
            .set_json(EntityKind::Edge, "e", Some(r#"{"id":"e"}"#))
            .unwrap();
        model
            .set_json(EntityKind::System, "s", Some(r#"{"id":"s","edge":"e"}"#))
            .unwrap();
        assert_eq!(model.referrers(EntityKind::Edge, "e"), vec!["system s"]);
        assert!(model.referrers(EntityKind::System, "s").is_empty());
    }
}
