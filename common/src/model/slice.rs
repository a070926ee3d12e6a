//! An edge's slice of the model: what its replica holds so that it can boot and run with no
//! master. Its edge record, its systems, the modules it runs or its systems list, their
//! drivers (with the scripts) and repositories, and the users.
//!
//! The same function decides membership on both sides: the master to build a snapshot or
//! a batch, the edge to drop what fell out of its slice after a batch.

use std::collections::BTreeSet;

use super::{Model, ModuleRecord};
use crate::protocol::EntityKind;

/// A record's place in the model.
pub type SliceKey = (EntityKind, String);

impl Model {
    /// The keys of `edge_id`'s slice.
    pub fn slice_keys(&self, edge_id: &str) -> BTreeSet<SliceKey> {
        let mut keys = BTreeSet::new();
        if self.edges.contains_key(edge_id) {
            keys.insert((EntityKind::Edge, edge_id.to_string()));
        }
        let mut modules = BTreeSet::new();
        for system in self.systems.values() {
            if system.edge.as_deref() == Some(edge_id) {
                keys.insert((EntityKind::System, system.id.clone()));
                modules.extend(system.modules.iter().cloned());
            }
        }
        for module in self.modules.values() {
            if module.edge.as_deref() == Some(edge_id) {
                modules.insert(module.id.clone());
            }
        }
        for id in modules {
            let Some(module) = self.modules.get(&id) else {
                continue;
            };
            keys.insert((EntityKind::Module, id));
            self.add_driver(&module.driver, &mut keys);
        }
        for id in self.users.keys() {
            keys.insert((EntityKind::User, id.clone()));
        }
        keys
    }

    /// Whether `module` is in edge `edge_id`'s slice: its location runs it, or one of the
    /// edge's systems lists it. The link policy asks this of every call an edge makes.
    pub fn in_slice(&self, edge_id: &str, module: &ModuleRecord) -> bool {
        module.edge.as_deref() == Some(edge_id)
            || self
                .systems_of(&module.id)
                .any(|system| system.edge.as_deref() == Some(edge_id))
    }

    /// The records a changed record pulls into a slice with it: a system's modules, a
    /// module's driver, a driver's repository. A batch carries them, because they may have
    /// joined the slice without changing themselves.
    pub fn referents(&self, kind: EntityKind, id: &str) -> BTreeSet<SliceKey> {
        let mut keys = BTreeSet::new();
        match kind {
            EntityKind::System => {
                if let Some(system) = self.systems.get(id) {
                    for module_id in &system.modules {
                        if let Some(module) = self.modules.get(module_id) {
                            keys.insert((EntityKind::Module, module_id.clone()));
                            self.add_driver(&module.driver, &mut keys);
                        }
                    }
                }
            }
            EntityKind::Module => {
                if let Some(module) = self.modules.get(id) {
                    self.add_driver(&module.driver, &mut keys);
                }
            }
            EntityKind::Driver => self.add_driver(id, &mut keys),
            _ => {}
        }
        keys
    }

    fn add_driver(&self, driver_id: &str, keys: &mut BTreeSet<SliceKey>) {
        if let Some(driver) = self.drivers.get(driver_id) {
            keys.insert((EntityKind::Driver, driver_id.to_string()));
            if self.repositories.contains_key(&driver.repository) {
                keys.insert((EntityKind::Repository, driver.repository.clone()));
            }
        }
    }

    /// A model holding only `edge_id`'s slice of this one.
    pub fn slice(&self, edge_id: &str) -> Model {
        let mut slice = Model::default();
        for (kind, id) in self.slice_keys(edge_id) {
            let json = self.get_json(kind, &id);
            // Records of this model always parse again.
            let _ = slice.set_json(kind, &id, json.as_deref());
        }
        slice
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DriverRecord, EdgeRecord, ModuleRecord, RepositoryRecord, SystemRecord};

    fn model() -> Model {
        let mut model = Model::default();
        for (kind, id, json) in [
            (
                EntityKind::Repository,
                "core",
                r#"{"id":"core","path":"/d"}"#,
            ),
            (
                EntityKind::Driver,
                "proj",
                r#"{"id":"proj","repository":"core","file":"p.rhai"}"#,
            ),
            (
                EntityKind::Driver,
                "meter",
                r#"{"id":"meter","repository":"core","file":"m.rhai"}"#,
            ),
            (EntityKind::Edge, "e1", r#"{"id":"e1"}"#),
            (EntityKind::Edge, "e2", r#"{"id":"e2"}"#),
            (
                EntityKind::Module,
                "p1",
                r#"{"id":"p1","driver":"proj","name":"Display","edge":"e1"}"#,
            ),
            (
                EntityKind::Module,
                "m2",
                r#"{"id":"m2","driver":"meter","name":"Meter","edge":"e2"}"#,
            ),
            (
                EntityKind::System,
                "r1",
                r#"{"id":"r1","edge":"e1","modules":["p1"]}"#,
            ),
        ] {
            model.set_json(kind, id, Some(json)).unwrap();
        }
        model
    }

    #[test]
    fn a_slice_holds_the_edge_its_systems_modules_drivers_and_repositories() {
        let keys = model().slice_keys("e1");
        let expected: BTreeSet<SliceKey> = [
            (EntityKind::Edge, "e1"),
            (EntityKind::System, "r1"),
            (EntityKind::Module, "p1"),
            (EntityKind::Driver, "proj"),
            (EntityKind::Repository, "core"),
        ]
        .into_iter()
        .map(|(k, id)| (k, id.to_string()))
        .collect();
        assert_eq!(keys, expected);
    }

    #[test]
    fn a_module_listed_by_the_edges_system_joins_the_slice_with_its_driver() {
        let mut model = model();
        let mut room = model.systems["r1"].clone();
        room.modules.push("m2".into());
        model
            .set_json(
                EntityKind::System,
                "r1",
                Some(&serde_json::to_string(&room).unwrap()),
            )
            .unwrap();
        let keys = model.slice_keys("e1");
        assert!(keys.contains(&(EntityKind::Module, "m2".into())));
        assert!(keys.contains(&(EntityKind::Driver, "meter".into())));
        assert!(
            model
                .referents(EntityKind::System, "r1")
                .contains(&(EntityKind::Driver, "meter".into()))
        );
    }

    #[test]
    fn records_round_trip_through_json_with_defaults() {
        let model = model();
        let edge: &EdgeRecord = &model.edges["e1"];
        assert!(edge.failover);
        assert_eq!(edge.timeout_ms, 20_000);
        let driver: &DriverRecord = &model.drivers["proj"];
        assert_eq!(driver.concurrency, 1);
        let module: &ModuleRecord = &model.modules["p1"];
        assert_eq!(module.edge.as_deref(), Some("e1"));
        let system: &SystemRecord = &model.systems["r1"];
        assert_eq!(
            model.system_module(&system.id, "Display", 1).unwrap().id,
            "p1"
        );
        assert!(model.system_module(&system.id, "Display", 2).is_none());
        assert!(model.system_module(&system.id, "Display", 0).is_none());
        let _: &RepositoryRecord = &model.repositories["core"];
        let slice = model.slice("e2");
        assert_eq!(slice.modules.keys().collect::<Vec<_>>(), ["m2"]);
        assert!(slice.systems.is_empty());
    }

    #[test]
    fn a_module_of_no_edge_runs_in_its_first_system_or_alone() {
        let mut model = model();
        for (kind, id, json) in [
            (
                EntityKind::Module,
                "h1",
                r#"{"id":"h1","driver":"proj","name":"Display"}"#,
            ),
            (
                EntityKind::Module,
                "h2",
                r#"{"id":"h2","driver":"proj","name":"Display"}"#,
            ),
            (
                EntityKind::System,
                "zhall",
                r#"{"id":"zhall","modules":["h1"]}"#,
            ),
            (
                EntityKind::System,
                "hall",
                r#"{"id":"hall","modules":["h1"]}"#,
            ),
        ] {
            model.set_json(kind, id, Some(json)).unwrap();
        }
        let unit = |id: &str| model.local_unit(&model.modules[id]);
        assert_eq!(
            unit("h1").as_deref(),
            Some("system:hall"),
            "the first by id"
        );
        assert_eq!(unit("h2").as_deref(), Some("module:h2"), "in no system");
        assert_eq!(unit("p1"), None, "a module of an edge");
        assert_eq!(
            model.local_units().into_iter().collect::<Vec<_>>(),
            ["module:h2", "system:hall"]
        );
    }
}
