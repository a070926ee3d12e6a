//! Warm standby: for the modules of an edge the master may take over, keep their driver
//! compiled and their last status (synced from the edge), so that a takeover starts from
//! that state instead of an empty map and skips parsing the script.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rhai::AST;
use serde_json::Value;

use super::context::{StatusMap, json_size};

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
    /// The source `ast` was compiled from; none until the compile is done.
    source: Option<Arc<str>>,
    ast: Option<AST>,
    status: StatusMap,
}

/// The most the status of modules not kept warm yet may hold, all modules together (the
/// module ids counted too): the other side may be hostile.
const MAX_EARLY_BYTES: usize = super::MAX_STATUS_BYTES;
/// The most modules whose status is kept before they are kept warm.
const MAX_EARLY_MODULES: usize = 256;

/// Status synced for modules not kept warm yet. The other side streams its status once
/// when the link comes up and then only changes, so a value that arrives before this side
/// knows the module (its model, or the compile, still on the way) is kept here for it
/// rather than lost until it changes again.
#[derive(Default)]
struct Early {
    modules: HashMap<String, StatusMap>,
    bytes: usize,
}

impl Early {
    fn set(&mut self, module_id: &str, key: &str, value: Value) -> Result<(), String> {
        let status = self.modules.get(module_id);
        if status.is_none() && self.modules.len() >= MAX_EARLY_MODULES {
            return Err(format!(
                "{MAX_EARLY_MODULES} modules not kept warm yet hold status, the limit"
            ));
        }
        // Checked before the change, so that a refused value changes nothing.
        let replaced = match status {
            Some(status) => status.get(key).map_or(0, |old| key.len() + json_size(old)),
            None => 0,
        };
        let id = if status.is_none() { module_id.len() } else { 0 };
        let total = self.bytes - replaced + id + key.len() + json_size(&value);
        if total > MAX_EARLY_BYTES {
            return Err(format!(
                "modules not kept warm yet would hold {total} bytes of status, at most {MAX_EARLY_BYTES}"
            ));
        }
        let status = self.modules.entry(module_id.to_string()).or_default();
        let kept = status.set(key, value);
        if status.is_empty() {
            self.modules.remove(module_id);
        }
        kept?;
        self.bytes = total;
        Ok(())
    }

    fn take(&mut self, module_id: &str) -> Option<StatusMap> {
        let status = self.modules.remove(module_id)?;
        self.bytes -= module_id.len() + status.bytes();
        Some(status)
    }

    fn get(&self, module_id: &str) -> Option<&StatusMap> {
        self.modules.get(module_id)
    }
}

/// The warm modules, by id.
#[derive(Default)]
pub(super) struct Standby {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    early: Early,
}

impl Standby {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The modules to keep warm (kept from now on, with any status synced for them
    /// before); answers those whose script must be (re)compiled. Status kept early for a
    /// module the model knows (`known`) but that is not to be kept warm is dropped.
    pub(super) fn retain(
        &self,
        specs: &[ModuleSpec],
        known: impl Fn(&str) -> bool,
    ) -> Vec<ModuleSpec> {
        let mut inner = self.lock();
        let Inner { entries, early } = &mut *inner;
        entries.retain(|id, _| specs.iter().any(|spec| &spec.id == id));
        for spec in specs {
            if !entries.contains_key(&spec.id) {
                let status = early.take(&spec.id).unwrap_or_default();
                let entry = Entry {
                    source: None,
                    ast: None,
                    status,
                };
                entries.insert(spec.id.clone(), entry);
            }
        }
        let unwanted: Vec<String> = early
            .modules
            .keys()
            .filter(|id| known(id))
            .cloned()
            .collect();
        for id in unwanted {
            early.take(&id);
        }
        specs
            .iter()
            .filter(|spec| {
                entries
                    .get(&spec.id)
                    .is_none_or(|entry| entry.source.as_ref() != Some(&spec.source))
            })
            .cloned()
            .collect()
    }

    /// Stores a compiled script, keeping the module's status (a module no longer kept
    /// warm meanwhile stays forgotten).
    pub(super) fn compiled(&self, spec: &ModuleSpec, ast: Option<AST>) {
        if let Some(entry) = self.lock().entries.get_mut(&spec.id) {
            entry.source = Some(spec.source.clone());
            entry.ast = ast;
        }
    }

    /// A status value synced from the other side: kept for a module kept warm, or, until
    /// it is, within the caps of the early status; and within the caps a module's own
    /// status has (the other side may be hostile). Answers whether it was kept.
    pub(super) fn set_status(&self, module_id: &str, key: &str, value: Value) -> bool {
        let mut inner = self.lock();
        let kept = match inner.entries.get_mut(module_id) {
            Some(entry) => entry.status.set(key, value).map(|_| ()),
            None => inner.early.set(module_id, key, value),
        };
        if let Err(why) = &kept {
            tracing::debug!(module = %module_id, "a synced status value is dropped: {why}");
        }
        kept.is_ok()
    }

    /// What `spec` starts from, if it is kept warm (and its source is the one compiled).
    /// A module whose status arrived but that was never kept warm (this side took over
    /// before it learned the module) starts from that status, compiling its script.
    pub(super) fn warm(&self, spec: &ModuleSpec) -> Option<Warm> {
        let inner = self.lock();
        if let Some(entry) = inner.entries.get(&spec.id) {
            return Some(Warm {
                ast: (entry.source.as_ref() == Some(&spec.source))
                    .then(|| entry.ast.clone())
                    .flatten(),
                status: entry.status.clone(),
            });
        }
        let status = inner.early.get(&spec.id)?.clone();
        Some(Warm { ast: None, status })
    }

    /// The ids kept warm and how many status keys each holds.
    pub(super) fn summary(&self) -> Vec<(String, usize)> {
        let mut list: Vec<_> = self
            .lock()
            .entries
            .iter()
            .map(|(id, entry)| (id.clone(), entry.status.len()))
            .collect();
        list.sort();
        list
    }
}
