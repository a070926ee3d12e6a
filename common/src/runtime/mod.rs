//! The driver runtime: module instances (a Rhai script, a transport, a queue), and their
//! supervision: [`Runtime::reconcile`] starts the modules this side should run, restarts
//! those whose host, port, settings or script changed, and stops the rest.

mod context;
mod modbus;
mod module;
mod script;
mod spec;
mod tcp;
mod transport;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use serde_json::{Map, Value};

pub use context::{DebugLine, ModuleHealth, ModuleState};
pub use script::ScriptLimits;
pub use spec::ModuleSpec;

use crate::model::{Model, ModuleRecord};
use module::ModuleInstance;

/// Why a call to a module failed. Each maps to an HTTP status in the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    /// No such system, module or method (404).
    #[error("{0}")]
    NotFound(String),
    /// The module runs on the other side (503 until proxying reaches it).
    #[error("{0}")]
    NotHere(String),
    /// The module's script failed to compile or load (503).
    #[error("{0}")]
    Faulted(String),
    /// The module's queue is full (503).
    #[error("{0}")]
    Busy(String),
    /// The module is stopping or gone (503).
    #[error("{0}")]
    Unavailable(String),
    /// It took longer than the driver's timeout (504).
    #[error("{0}")]
    Timeout(String),
    /// The arguments do not fit the method (422).
    #[error("{0}")]
    BadArgs(String),
    /// The script threw or broke a limit (500).
    #[error("{0}")]
    Script(String),
}

/// One module as the API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModuleView {
    /// Module id.
    pub id: String,
    /// Name in the system.
    pub name: String,
    /// 1-based index among the system's modules of that name.
    pub index: u32,
    /// Driver id.
    pub driver: String,
    /// `edge:ID` or `master`: the side that runs it.
    pub runs_on: String,
    /// Its state, when it runs on this side.
    #[serde(flatten)]
    pub health: Option<ModuleHealth>,
}

pub(crate) struct Inner {
    executed_by: String,
    limits: ScriptLimits,
    model: RwLock<Arc<Model>>,
    modules: Mutex<HashMap<String, Arc<ModuleInstance>>>,
    reconciling: tokio::sync::Mutex<()>,
}

/// The modules one side runs.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Who runs a module: `edge:ID` for a module of an edge, else `master`.
pub fn runs_on(model: &Model, module: &ModuleRecord) -> String {
    match model.module_edge(module) {
        Some(edge) => format!("edge:{edge}"),
        None => "master".to_string(),
    }
}

impl Runtime {
    /// A runtime that answers `executed_by` (`master` or `edge:ID`) for what it runs.
    pub fn new(executed_by: impl Into<String>, limits: ScriptLimits) -> Self {
        Runtime {
            inner: Arc::new(Inner {
                executed_by: executed_by.into(),
                limits,
                model: RwLock::new(Arc::new(Model::default())),
                modules: Mutex::new(HashMap::new()),
                reconciling: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        Runtime { inner }
    }

    /// `master` or `edge:ID`.
    pub fn executed_by(&self) -> &str {
        &self.inner.executed_by
    }

    /// The model the runtime last reconciled to.
    pub fn model(&self) -> Arc<Model> {
        self.inner
            .model
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Brings the running modules in line with `model`: those `wanted` runs, started or
    /// restarted where their spec changed; the others stopped. A stop completes (the
    /// device connection closed) before the replacement starts, because many devices
    /// take a single session.
    pub async fn reconcile(&self, model: Arc<Model>, wanted: impl Fn(&ModuleRecord) -> bool) {
        let _one_at_a_time = self.inner.reconciling.lock().await;
        *self.inner.model.write().unwrap_or_else(|p| p.into_inner()) = model.clone();
        let desired: HashMap<String, ModuleSpec> = model
            .modules
            .values()
            .filter(|module| wanted(module))
            .filter_map(|module| {
                let spec = ModuleSpec::new(&model, module);
                if spec.is_none() {
                    tracing::warn!(module = %module.id, driver = %module.driver, "module's driver is missing; not started");
                }
                spec
            })
            .map(|spec| (spec.id.clone(), spec))
            .collect();
        let stale: Vec<Arc<ModuleInstance>> = {
            let mut modules = lock(&self.inner.modules);
            let ids: Vec<String> = modules
                .iter()
                .filter(|(id, running)| desired.get(*id) != Some(&running.spec))
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| modules.remove(id)).collect()
        };
        for module in stale {
            tracing::info!(module = %module.spec.id, "stopping module");
            module.stop().await;
        }
        let mut modules = lock(&self.inner.modules);
        for (id, spec) in desired {
            if let std::collections::hash_map::Entry::Vacant(slot) = modules.entry(id) {
                tracing::info!(module = %spec.id, driver = %spec.driver_id, "starting module");
                let instance =
                    ModuleInstance::start(spec, self.inner.limits, Arc::downgrade(&self.inner));
                slot.insert(Arc::new(instance));
            }
        }
    }

    /// Stops every module.
    pub async fn stop_all(&self) {
        let all: Vec<_> = lock(&self.inner.modules).drain().map(|(_, m)| m).collect();
        for module in all {
            module.stop().await;
        }
    }

    fn resolve(
        &self,
        system: &str,
        name: &str,
        index: u32,
    ) -> Result<Arc<ModuleInstance>, ExecError> {
        let model = self.model();
        if !model.systems.contains_key(system) {
            return Err(ExecError::NotFound(format!("no system {system}")));
        }
        let module = model.system_module(system, name, index).ok_or_else(|| {
            ExecError::NotFound(format!("system {system} has no module {name} {index}"))
        })?;
        let running = lock(&self.inner.modules).get(&module.id).cloned();
        running.ok_or_else(|| {
            let owner = runs_on(&model, module);
            if owner == self.inner.executed_by {
                ExecError::Unavailable(format!(
                    "module {} is not running (its driver is missing)",
                    module.id
                ))
            } else {
                ExecError::NotHere(format!("module {} runs on {owner}, not here", module.id))
            }
        })
    }

    /// Runs a method of a module of `system`; answers the result and who ran it.
    pub async fn exec(
        &self,
        system: &str,
        name: &str,
        index: u32,
        method: &str,
        args: Vec<Value>,
    ) -> Result<(Value, String), ExecError> {
        let module = self.resolve(system, name, index)?;
        let value = module.call(method, args).await?;
        Ok((value, self.inner.executed_by.clone()))
    }

    /// A module's status map.
    pub fn status(
        &self,
        system: &str,
        name: &str,
        index: u32,
    ) -> Result<Map<String, Value>, ExecError> {
        Ok(self.resolve(system, name, index)?.shared.status())
    }

    /// A module's debug ring.
    pub fn debug(&self, system: &str, name: &str, index: u32) -> Result<Vec<DebugLine>, ExecError> {
        Ok(self.resolve(system, name, index)?.shared.debug_lines())
    }

    /// A system's modules in order, with name, index, where they run and (here) their state.
    pub fn system_modules(&self, model: &Model, system: &str) -> Vec<ModuleView> {
        let Some(record) = model.systems.get(system) else {
            return Vec::new();
        };
        let modules = lock(&self.inner.modules);
        let mut seen: HashMap<&str, u32> = HashMap::new();
        record
            .modules
            .iter()
            .filter_map(|id| model.modules.get(id))
            .map(|module| {
                let index = seen.entry(module.name.as_str()).or_insert(0);
                *index += 1;
                ModuleView {
                    id: module.id.clone(),
                    name: module.name.clone(),
                    index: *index,
                    driver: module.driver.clone(),
                    runs_on: runs_on(model, module),
                    health: modules.get(&module.id).map(|m| m.shared.health()),
                }
            })
            .collect()
    }

    /// The ids of the modules running here.
    pub fn running(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.inner.modules).keys().cloned().collect();
        ids.sort();
        ids
    }
}
