//! The data model in memory: typed records by kind and id, reference checks, and the slice
//! of the model that an edge holds. The store ([`crate::store`]) makes it durable; this
//! part has no I/O so its rules are easy to test.

mod records;
mod slice;
pub mod sync;
mod validate;

use std::collections::BTreeMap;

pub use records::{
    DriverKind, DriverRecord, EdgeRecord, Isolation, ModuleRecord, Record, RepositoryRecord,
    RestoreWindow, Settings, Standby, SystemRecord, Transport, UserRecord,
};
pub use slice::SliceKey;
pub use validate::{ModelError, check_id};

use crate::identity::{EdgeId, UnitId};
use crate::protocol::EntityKind;

/// Every entity kind, in the order a snapshot lists them (what others refer to first).
pub const KINDS: [EntityKind; 6] = [
    EntityKind::Repository,
    EntityKind::Driver,
    EntityKind::Edge,
    EntityKind::Module,
    EntityKind::System,
    EntityKind::User,
];

/// The path segment and table name of a kind (`edges`, `systems` ...).
pub fn kind_name(kind: EntityKind) -> &'static str {
    match kind {
        EntityKind::Edge => "edges",
        EntityKind::Repository => "repositories",
        EntityKind::Driver => "drivers",
        EntityKind::Module => "modules",
        EntityKind::System => "systems",
        EntityKind::User => "users",
    }
}

/// A kind's name for one record (`edge`, `repository` ...), for messages.
pub fn kind_singular(kind: EntityKind) -> &'static str {
    match kind {
        EntityKind::Edge => "edge",
        EntityKind::Repository => "repository",
        EntityKind::Driver => "driver",
        EntityKind::Module => "module",
        EntityKind::System => "system",
        EntityKind::User => "user",
    }
}

/// The whole data model (the master's), or an edge's slice of it (a replica).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Model {
    /// Edge locations.
    pub edges: BTreeMap<String, EdgeRecord>,
    /// Driver repositories.
    pub repositories: BTreeMap<String, RepositoryRecord>,
    /// Drivers.
    pub drivers: BTreeMap<String, DriverRecord>,
    /// Modules.
    pub modules: BTreeMap<String, ModuleRecord>,
    /// Control systems.
    pub systems: BTreeMap<String, SystemRecord>,
    /// Users.
    pub users: BTreeMap<String, UserRecord>,
}

impl Model {
    /// Sets a record from its JSON text; `None` removes it. The text must parse as the
    /// kind's record and carry `id`.
    pub fn set_json(
        &mut self,
        kind: EntityKind,
        id: &str,
        json: Option<&str>,
    ) -> Result<(), ModelError> {
        fn set<R: Record>(
            map: &mut BTreeMap<String, R>,
            id: &str,
            json: Option<&str>,
        ) -> Result<(), ModelError> {
            match json {
                None => {
                    map.remove(id);
                }
                Some(text) => {
                    let record: R = validate::parse(text)?;
                    if record.id() != id {
                        return Err(ModelError::Invalid(format!(
                            "record id {:?} is stored under id {id:?}",
                            record.id()
                        )));
                    }
                    map.insert(id.to_string(), record);
                }
            }
            Ok(())
        }
        match kind {
            EntityKind::Edge => set(&mut self.edges, id, json),
            EntityKind::Repository => set(&mut self.repositories, id, json),
            EntityKind::Driver => set(&mut self.drivers, id, json),
            EntityKind::Module => set(&mut self.modules, id, json),
            EntityKind::System => set(&mut self.systems, id, json),
            EntityKind::User => set(&mut self.users, id, json),
        }
    }

    /// A record's JSON text.
    pub fn get_json(&self, kind: EntityKind, id: &str) -> Option<String> {
        fn get<R: Record>(map: &BTreeMap<String, R>, id: &str) -> Option<String> {
            map.get(id).and_then(|r| serde_json::to_string(r).ok())
        }
        match kind {
            EntityKind::Edge => get(&self.edges, id),
            EntityKind::Repository => get(&self.repositories, id),
            EntityKind::Driver => get(&self.drivers, id),
            EntityKind::Module => get(&self.modules, id),
            EntityKind::System => get(&self.systems, id),
            EntityKind::User => get(&self.users, id),
        }
    }

    /// Whether a record exists.
    pub fn contains(&self, kind: EntityKind, id: &str) -> bool {
        match kind {
            EntityKind::Edge => self.edges.contains_key(id),
            EntityKind::Repository => self.repositories.contains_key(id),
            EntityKind::Driver => self.drivers.contains_key(id),
            EntityKind::Module => self.modules.contains_key(id),
            EntityKind::System => self.systems.contains_key(id),
            EntityKind::User => self.users.contains_key(id),
        }
    }

    /// The ids of one kind, sorted.
    pub fn ids(&self, kind: EntityKind) -> Vec<String> {
        fn keys<R>(map: &BTreeMap<String, R>) -> Vec<String> {
            map.keys().cloned().collect()
        }
        match kind {
            EntityKind::Edge => keys(&self.edges),
            EntityKind::Repository => keys(&self.repositories),
            EntityKind::Driver => keys(&self.drivers),
            EntityKind::Module => keys(&self.modules),
            EntityKind::System => keys(&self.systems),
            EntityKind::User => keys(&self.users),
        }
    }

    /// Every record as (kind, id, JSON), in [`KINDS`] order.
    pub fn entries(&self) -> Vec<(EntityKind, String, String)> {
        KINDS
            .iter()
            .flat_map(|&kind| {
                self.ids(kind)
                    .into_iter()
                    .filter_map(move |id| self.get_json(kind, &id).map(|json| (kind, id, json)))
            })
            .collect()
    }

    /// Every record as JSON, grouped by kind name and keyed by id:
    /// `{"edges": {"site-1": {...}}, "systems": {...}, ...}`.
    pub fn dump(&self) -> serde_json::Value {
        let mut kinds = serde_json::Map::new();
        for kind in KINDS {
            let records: serde_json::Map<String, serde_json::Value> = self
                .ids(kind)
                .into_iter()
                .filter_map(|id| {
                    let json = self.get_json(kind, &id)?;
                    Some((id, serde_json::from_str(&json).ok()?))
                })
                .collect();
            kinds.insert(kind_name(kind).to_string(), records.into());
        }
        kinds.into()
    }

    /// [`dump`](Self::dump) as clients may see it: users without their token hashes,
    /// which leave the master only over an edge link (an edge checks tokens itself).
    pub fn dump_for_clients(&self) -> serde_json::Value {
        let mut dump = self.dump();
        if let Some(users) = dump
            .get_mut(kind_name(EntityKind::User))
            .and_then(serde_json::Value::as_object_mut)
        {
            for user in users.values_mut() {
                if let Some(user) = user.as_object_mut() {
                    user.remove("token_hash");
                }
            }
        }
        dump
    }

    /// The module a client means by system, name and 1-based index: the `index`-th module
    /// named `name` in the system's order.
    pub fn system_module(&self, system: &str, name: &str, index: u32) -> Option<&ModuleRecord> {
        let system = self.systems.get(system)?;
        system
            .modules
            .iter()
            .filter_map(|id| self.modules.get(id))
            .filter(|module| module.name == name)
            .nth(index.checked_sub(1)? as usize)
    }

    /// The systems that list a module, by id.
    pub fn systems_of(&self, module_id: &str) -> impl Iterator<Item = &SystemRecord> {
        self.systems
            .values()
            .filter(move |system| system.modules.iter().any(|m| m == module_id))
    }

    /// The edge that runs a module: its own `edge`, else that of the first system listing it.
    pub fn module_edge(&self, module: &ModuleRecord) -> Option<EdgeId> {
        module.edge.clone().or_else(|| {
            self.systems_of(&module.id)
                .find_map(|system| system.edge.clone())
        })
    }

    /// For a module of no edge, the unit it runs in among several masters: its system
    /// (`system:ID`, the first by id when several list it), or itself (`module:ID`) when no
    /// system does. `None` for a module of an edge.
    pub fn local_unit(&self, module: &ModuleRecord) -> Option<UnitId> {
        if self.module_edge(module).is_some() {
            return None;
        }
        Some(
            self.systems_of(&module.id)
                .map(|system| system.id.as_str())
                .min()
                .map_or_else(|| UnitId::module(&module.id), UnitId::system),
        )
    }

    /// The units of modules of no edge ([`local_unit`](Self::local_unit)).
    pub fn local_units(&self) -> std::collections::BTreeSet<UnitId> {
        self.modules
            .values()
            .filter_map(|module| self.local_unit(module))
            .collect()
    }
}
