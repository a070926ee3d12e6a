//! Warm standby: for the modules of an edge the master may take over, keep their driver
//! compiled and their last status (synced from the edge), so that a takeover starts from
//! that state instead of an empty map and skips parsing the script.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rhai::AST;
use serde_json::Value;

use super::context::StatusMap;

use super::spec::ModuleSpec;

/// What a module starts from under warm standby.
pub(super) struct Warm {
    /// Its script, compiled from the source it starts with (none if that failed: the
    /// start compiles again and reports the error).
    pub(super) ast: Option<AST>,
    /// The last status synced from the other side.
    pub(super) status: StatusMap,
}

struct Entry {
    source: Arc<str>,
    ast: Option<AST>,
    status: StatusMap,
}

/// The warm modules, by id.
#[derive(Default)]
pub(super) struct Standby {
    entries: Mutex<HashMap<String, Entry>>,
}

impl Standby {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The modules to keep warm; answers those whose script must be (re)compiled.
    pub(super) fn retain(&self, specs: &[ModuleSpec]) -> Vec<ModuleSpec> {
        let mut entries = self.lock();
        entries.retain(|id, _| specs.iter().any(|spec| &spec.id == id));
        specs
            .iter()
            .filter(|spec| {
                entries
                    .get(&spec.id)
                    .is_none_or(|entry| entry.source != spec.source)
            })
            .cloned()
            .collect()
    }

    /// Stores a compiled script, keeping the module's status.
    pub(super) fn compiled(&self, spec: &ModuleSpec, ast: Option<AST>) {
        let mut entries = self.lock();
        let entry = entries.entry(spec.id.clone()).or_insert_with(|| Entry {
            source: Arc::from(""),
            ast: None,
            status: StatusMap::new(),
        });
        entry.source = spec.source.clone();
        entry.ast = ast;
    }

    /// A status value synced from the other side; ignored for a module not kept warm,
    /// and beyond the caps a module's own status has (the other side may be hostile).
    pub(super) fn set_status(&self, module_id: &str, key: &str, value: Value) -> bool {
        match self.lock().get_mut(module_id) {
            Some(entry) => match entry.status.set(key, value) {
                Ok(_) => true,
                Err(why) => {
                    tracing::debug!(module = %module_id, "a synced status value is dropped: {why}");
                    false
                }
            },
            None => false,
        }
    }

    /// What `spec` starts from, if it is kept warm (and its source is the one compiled).
    pub(super) fn warm(&self, spec: &ModuleSpec) -> Option<Warm> {
        let entries = self.lock();
        let entry = entries.get(&spec.id)?;
        Some(Warm {
            ast: (entry.source == spec.source)
                .then(|| entry.ast.clone())
                .flatten(),
            status: entry.status.clone(),
        })
    }

    /// The ids kept warm and how many status keys each holds.
    pub(super) fn summary(&self) -> Vec<(String, usize)> {
        let mut list: Vec<_> = self
            .lock()
            .iter()
            .map(|(id, entry)| (id.clone(), entry.status.len()))
            .collect();
        list.sort();
        list
    }
}
