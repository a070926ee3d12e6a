//! The driver runtime: module instances (a Rhai script, a transport, a queue), and their
//! supervision: [`Runtime::reconcile`] starts the modules this side should run, reloads in
//! place those whose script changed, restarts those whose host, port or settings changed,
//! and stops the rest.
//!
//! Stops run side by side, each tracked by its module id: a module started again waits
//! for its own earlier instance to stop (its device may take one session), and a caller
//! waits only for the stops it cares about ([`Runtime::reconcile_waiting_for`]), so one
//! module that is slow to stop holds up nothing but its own unit.

mod calls;
mod context;
mod modbus;
mod module;
mod remote;
mod script;
mod spec;
mod standby;
mod tcp;
mod transport;

use crate::identity::{EdgeId, Epoch, MasterId, UnitId};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::{Map, Value};

pub use context::{
    DebugLine, MAX_LOG_LINE, MAX_STATUS_BYTES, MAX_STATUS_KEY, MAX_STATUS_KEYS, MAX_STATUS_VALUE,
    ModuleHealth, ModuleState, StatusMap,
};
pub use remote::{Executed, Origin, Remote, RemoteCall, StatusEvent, SystemAction};
pub use script::ScriptLimits;
pub use spec::ModuleSpec;

use crate::code::Code;
use crate::control::{Claim, ControlState};
use crate::model::{Model, ModuleRecord};
use crate::protocol::{AuditRecord, CodeAudit, ControlOwner, ModuleRef};
use module::ModuleInstance;

/// Why a call to a module failed. Each maps to an HTTP status in the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    /// No such system, module or method (404).
    #[error("{0}")]
    NotFound(String),
    /// The module runs on the other side, and the call may not go there (503).
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
    /// The caller's epoch is older than the module's edge location's (409).
    #[error("{0}")]
    StaleEpoch(String),
    /// The caller may not reach this unit from where it called (403): an edge's own
    /// callers outside the edge's site.
    #[error("{0}")]
    Forbidden(String),
    /// The module waits for its driver code, which is on its way (503 with
    /// `Retry-After`).
    #[error("{0}")]
    Waiting(String),
}

/// A module that kept its old script because the new version failed to compile or load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadRefused {
    /// Module id.
    pub module: String,
    /// Driver id.
    pub driver: String,
    /// Why.
    pub error: String,
}

impl ReloadRefused {
    /// The audit record of this refusal, on `edge`'s side (`""` for the master's own
    /// modules), under the given owner and epoch.
    pub fn audit(
        &self,
        model: &Model,
        code: &Code,
        (edge, owner, epoch): (UnitId, ControlOwner, Epoch),
        time_ms: u64,
    ) -> AuditRecord {
        let repository = model
            .drivers
            .get(&self.driver)
            .map(|d| d.repository.clone())
            .unwrap_or_default();
        let to = code
            .repo(&repository)
            .map(|r| r.commit.clone())
            .unwrap_or_default();
        AuditRecord {
            time_ms,
            edge,
            from: owner,
            to: owner,
            epoch,
            reason: format!("module {} kept its old code: {}", self.module, self.error),
            code: Some(CodeAudit {
                repository,
                from: None,
                to,
                module: Some((self.driver.clone(), self.module.clone())),
                refused: true,
            }),
        }
    }
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

/// A module's status value changed; its value is read from the module
/// ([`Runtime::status_value`]). The change holds no value, so that the changes a channel
/// keeps for slow subscribers keep no module's data alive after the module is gone.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusChange {
    /// Module id.
    pub module_id: String,
    /// Status key.
    pub key: String,
}

/// Status changes a subscriber may fall behind by before it misses some (and should
/// re-read whole maps). The channel keeps the last this many values (each at most
/// [`context::MAX_STATUS_VALUE`]) until newer ones replace them.
const STATUS_CHANGES: usize = 1024;

/// Who runs modules on one side: an edge (by its location id), or a master (named in a
/// cluster). Shown to clients as `executed_by`: `edge:ID`, `master`, `master:ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Executor {
    /// The edge server of this location.
    Edge(EdgeId),
    /// A master; its id among several.
    Master(Option<MasterId>),
}

impl std::fmt::Display for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Executor::Edge(id) => write!(f, "edge:{id}"),
            Executor::Master(None) => f.write_str("master"),
            Executor::Master(Some(id)) => write!(f, "master:{id}"),
        }
    }
}

pub(crate) struct Inner {
    executor: Executor,
    /// `executor` as clients read it (rendered once: every answer carries it).
    executed_by: String,
    limits: ScriptLimits,
    status_changes: tokio::sync::broadcast::Sender<StatusChange>,
    standby: standby::Standby,
    /// Each edge location's grant as this side knows it, for fencing calls.
    grants: RwLock<HashMap<String, ControlState>>,
    model: RwLock<Arc<Model>>,
    /// The driver code modules are built from.
    code: RwLock<Arc<Code>>,
    modules: Mutex<HashMap<String, Arc<ModuleInstance>>>,
    /// The modules the last reconcile wanted here (running, or not for want of a driver).
    wanted: RwLock<HashSet<String>>,
    /// What the server asked this side to run, before stopped systems are taken out.
    requested: RwLock<HashSet<String>>,
    /// Where this server reaches a device the model names at another address
    /// (`host:port` to `host:port`; an edge's `[device_routes]`).
    device_routes: RwLock<HashMap<String, (String, u16)>>,
    /// A site pair's node: its turn in its location's collector arrays (none: it polls
    /// alone, every interval).
    array_slot: tokio::sync::watch::Sender<Option<crate::control::array::Slot>>,
    /// Modules that run here to poll only (a collector array's standby node): their
    /// calls go to the holder.
    poll_only: RwLock<HashSet<String>>,
    /// Systems stopped by an operator: their modules do not run until started.
    stopped_systems: Mutex<HashSet<String>>,
    /// Module lookups by system, name and index (a system's cache; see
    /// [`SystemAction::ExpireCache`]).
    lookups: Mutex<HashMap<(String, String, u32), String>>,
    /// Where calls for modules not run here go.
    remote: RwLock<Option<Arc<dyn Remote>>>,
    /// Reconciles decide one at a time; they wait for stops and reloads after it.
    reconciling: Mutex<()>,
    /// Stops under way, by module id.
    stopping: Mutex<HashMap<String, Stopping>>,
    /// This server's metrics (the runtime is what every part of a server holds).
    metrics: Arc<crate::metrics::Metrics>,
}

/// A module's stop under way; done when its device connection is closed (or the stop
/// gave up waiting for it).
pub(crate) type Stopping = futures::future::Shared<futures::future::BoxFuture<'static, ()>>;

/// A reload to carry out: the module, the reload's number, the new script.
type Reload = (Arc<ModuleInstance>, u64, Arc<str>);

/// What one reconcile decided.
struct Decided {
    /// The modules it wants here.
    wanted_here: HashSet<String>,
    reloads: Vec<Reload>,
}

/// The modules one side runs.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The module `at` names: by id when the sender resolved it, else by system, name, index.
fn find<'m>(model: &'m Model, at: &ModuleRef) -> Option<&'m ModuleRecord> {
    match &at.id {
        Some(id) => model.modules.get(id),
        None => model.system_module(&at.system, &at.name, at.index),
    }
}

/// Where a module belongs: `edge:ID` for a module of an edge, else `master`. During a
/// failover the master runs an edge's modules; [`Runtime::system_modules`] says so.
pub fn runs_on(model: &Model, module: &ModuleRecord) -> String {
    match model.module_edge(module) {
        Some(edge) => Executor::Edge(edge),
        None => Executor::Master(None),
    }
    .to_string()
}

impl Runtime {
    /// A runtime of `executor`, which answers `executed_by` for what it runs.
    pub fn new(executor: Executor, limits: ScriptLimits) -> Self {
        Runtime {
            inner: Arc::new(Inner {
                executed_by: executor.to_string(),
                executor,
                limits,
                status_changes: tokio::sync::broadcast::channel(STATUS_CHANGES).0,
                standby: standby::Standby::default(),
                grants: RwLock::default(),
                model: RwLock::new(Arc::new(Model::default())),
                code: RwLock::default(),
                modules: Mutex::new(HashMap::new()),
                wanted: RwLock::default(),
                requested: RwLock::default(),
                device_routes: RwLock::default(),
                array_slot: tokio::sync::watch::channel(None).0,
                poll_only: RwLock::default(),
                stopped_systems: Mutex::default(),
                lookups: Mutex::default(),
                remote: RwLock::new(None),
                reconciling: Mutex::new(()),
                stopping: Mutex::default(),
                metrics: Arc::default(),
            }),
        }
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        Runtime { inner }
    }

    /// This node's turn in its location's collector arrays (none: it polls alone); the
    /// schedules of `shared_polling` drivers follow it from their next poll.
    pub fn set_array_slot(&self, slot: Option<crate::control::array::Slot>) {
        self.inner.array_slot.send_if_modified(|current| {
            let changed = *current != slot;
            *current = slot;
            changed
        });
    }

    /// The modules that run here to poll only (a collector array's standby): calls for
    /// them are not served here but sent on, to the holder.
    pub fn set_poll_only(&self, modules: HashSet<String>) {
        *self
            .inner
            .poll_only
            .write()
            .unwrap_or_else(|p| p.into_inner()) = modules;
    }

    fn polls_only(&self, module: &str) -> bool {
        self.inner
            .poll_only
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(module)
    }

    /// A status value the other node of a collector array read: set on the module here,
    /// as its own script would, when it runs here for calls (the holder). Answers whether
    /// it was set.
    pub fn peer_status(&self, module_id: &str, key: &str, value: Value) -> bool {
        if self.polls_only(module_id) {
            return false;
        }
        let Some(module) = lock(&self.inner.modules).get(module_id).cloned() else {
            return false;
        };
        if !module.spec.shared_polling {
            return false;
        }
        match module.shared.set_status(key, value) {
            Ok(true) => {
                let _ = self.inner.status_changes.send(StatusChange {
                    module_id: module_id.to_string(),
                    key: key.to_string(),
                });
                true
            }
            Ok(false) => true,
            Err(err) => {
                tracing::debug!(module = %module_id, "a status value from the peer is refused: {err}");
                false
            }
        }
    }

    /// Where this server reaches the devices the model names at other addresses: from
    /// `host:port` (as the module's record says) to `host:port`.
    pub fn set_device_routes(&self, routes: HashMap<String, (String, u16)>) {
        *self
            .inner
            .device_routes
            .write()
            .unwrap_or_else(|p| p.into_inner()) = routes;
    }

    /// The address this server reaches `module`'s device at, if it has one: its record's,
    /// or the route configured for it.
    pub fn device_address(&self, model: &Model, module: &ModuleRecord) -> Option<(String, u16)> {
        let port = module
            .port
            .or_else(|| model.drivers.get(&module.driver)?.default_port)?;
        let host = module.host.clone()?;
        Some(self.route((host, port)))
    }

    fn route(&self, (host, port): (String, u16)) -> (String, u16) {
        let routes = self
            .inner
            .device_routes
            .read()
            .unwrap_or_else(|p| p.into_inner());
        routes
            .get(&format!("{host}:{port}"))
            .cloned()
            .unwrap_or((host, port))
    }

    /// `spec` with its device reached where this server's routes say.
    fn routed(&self, mut spec: ModuleSpec) -> ModuleSpec {
        spec.address = spec.address.map(|address| self.route(address));
        spec
    }

    /// `master`, `master:ID` or `edge:ID`.
    pub fn executed_by(&self) -> &str {
        &self.inner.executed_by
    }

    /// Who runs modules here.
    pub fn executor(&self) -> &Executor {
        &self.inner.executor
    }

    /// The model the runtime last reconciled to.
    pub fn model(&self) -> Arc<Model> {
        self.inner
            .model
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The driver code the next [`reconcile`](Self::reconcile) builds modules from.
    pub fn set_code(&self, code: Arc<Code>) {
        *self.inner.code.write().unwrap_or_else(|p| p.into_inner()) = code;
    }

    /// Whether a script compiles in this runtime's sandbox; the error names the line.
    /// Blocks for as long as the parse takes.
    pub fn check_script(&self, source: &str) -> Result<(), String> {
        script::compile_only(source, self.inner.limits).map(|_| ())
    }

    /// The driver code modules are built from.
    pub fn code(&self) -> Arc<Code> {
        self.inner
            .code
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Brings the running modules in line with `model` and the code: those `wanted` runs,
    /// started, reloaded in place where only their script changed, or restarted where
    /// anything else did; the others stopped. Answers once no module it does not want
    /// here is still stopping (whoever began the stop: devices disconnected), because
    /// many devices take a single session, with the reloads that were refused (those
    /// modules keep their old code).
    pub async fn reconcile(
        &self,
        model: Arc<Model>,
        wanted: impl Fn(&ModuleRecord) -> bool,
    ) -> Vec<ReloadRefused> {
        let decided = self.decide(move || model, wanted);
        let refused = self.reload(decided.reloads).await;
        let kept = decided.wanted_here;
        self.wait_stopped(|id| !kept.contains(id)).await;
        refused
    }

    /// A unit's reconcile: the model read when its turn comes (so that a reconcile of an
    /// older model never undoes a newer one), answering once the stops of the modules
    /// `awaited` picks (by id) have completed, whoever began them, and without waiting
    /// for others' stops nor for reloads: those go on in a task, whose answer is the
    /// reloads refused.
    pub async fn reconcile_waiting_for(
        &self,
        model: impl FnOnce() -> Arc<Model>,
        wanted: impl Fn(&ModuleRecord) -> bool,
        awaited: impl Fn(&str) -> bool,
    ) -> tokio::task::JoinHandle<Vec<ReloadRefused>> {
        let decided = self.decide(model, wanted);
        let runtime = self.clone();
        let reloads = tokio::spawn(async move { runtime.reload(decided.reloads).await });
        self.wait_stopped(awaited).await;
        reloads
    }

    /// Waits until no module `which` picks is still stopping.
    pub async fn wait_stopped(&self, which: impl Fn(&str) -> bool) {
        let pending: Vec<Stopping> = lock(&self.inner.stopping)
            .iter()
            .filter(|(id, _)| which(id))
            .map(|(_, stop)| stop.clone())
            .collect();
        futures::future::join_all(pending).await;
    }

    /// The decisions of a reconcile, made at once and one reconcile at a time (the model
    /// and what is wanted are read under the same turn): stale modules taken out and
    /// their stops begun, new ones started (each after its own earlier instance has
    /// stopped), and the reloads to carry out.
    fn decide(
        &self,
        model: impl FnOnce() -> Arc<Model>,
        wanted: impl Fn(&ModuleRecord) -> bool,
    ) -> Decided {
        let _one_at_a_time = lock(&self.inner.reconciling);
        let model = model();
        *self.inner.model.write().unwrap_or_else(|p| p.into_inner()) = model.clone();
        lock(&self.inner.lookups).clear();
        let requested: HashSet<String> = model
            .modules
            .values()
            .filter(|module| wanted(module))
            .map(|module| module.id.clone())
            .collect();
        let wanted_here: HashSet<String> = requested
            .iter()
            .filter(|id| self.stopped_here(id).is_none())
            .cloned()
            .collect();
        *self
            .inner
            .requested
            .write()
            .unwrap_or_else(|p| p.into_inner()) = requested;
        let code = self.code();
        let desired: HashMap<String, ModuleSpec> = model
            .modules
            .values()
            .filter(|module| wanted_here.contains(&module.id))
            .filter_map(|module| match ModuleSpec::new(&model, &code, module) {
                Ok(spec) => Some(self.routed(spec)),
                Err(why) => {
                    tracing::warn!(module = %module.id, "module not started: {why}");
                    None
                }
            })
            .map(|spec| (spec.id.clone(), spec))
            .collect();
        let mut modules = lock(&self.inner.modules);
        let mut stale = Vec::new();
        let mut reloads = Vec::new();
        for (id, running) in modules.iter() {
            match desired.get(id) {
                Some(want)
                    if running.spec.same_but_source(want)
                        && running.shared.health().state != ModuleState::Faulted =>
                {
                    if let Some(number) = running.begin_reload(&want.source) {
                        reloads.push((running.clone(), number, want.source.clone()));
                    }
                }
                _ => stale.push(id.clone()),
            }
        }
        for id in stale {
            if let Some(module) = modules.remove(&id) {
                self.begin_stop(module);
            }
        }
        *self.inner.wanted.write().unwrap_or_else(|p| p.into_inner()) = wanted_here.clone();
        for (id, spec) in desired {
            if let std::collections::hash_map::Entry::Vacant(slot) = modules.entry(id) {
                tracing::info!(module = %spec.id, driver = %spec.driver_id, "starting module");
                let warm = self.inner.standby.warm(&spec);
                let after = lock(&self.inner.stopping).get(&spec.id).cloned();
                let instance = ModuleInstance::start(
                    spec,
                    warm,
                    self.inner.limits,
                    Arc::downgrade(&self.inner),
                    after,
                );
                slot.insert(Arc::new(instance));
            }
        }
        Decided {
            wanted_here,
            reloads,
        }
    }

    /// Begins a module's stop, tracked by its id until it completes. A stop of the same
    /// module still under way (an instance stopped while its replacement waited for it)
    /// is part of this one: the module has stopped only when both have.
    fn begin_stop(&self, module: Arc<ModuleInstance>) {
        use futures::FutureExt;
        tracing::info!(module = %module.spec.id, "stopping module");
        let id = module.spec.id.clone();
        let mut stopping = lock(&self.inner.stopping);
        let earlier = stopping.get(&id).cloned();
        let stop: Stopping = async move {
            module.stop().await;
            if let Some(earlier) = earlier {
                earlier.await;
            }
        }
        .boxed()
        .shared();
        stopping.insert(id.clone(), stop.clone());
        drop(stopping);
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            stop.clone().await;
            if let Some(inner) = inner.upgrade() {
                let mut stopping = lock(&inner.stopping);
                // A later stop of the same module (started and stopped again) stays.
                if stopping.get(&id).is_some_and(|s| s.ptr_eq(&stop)) {
                    stopping.remove(&id);
                }
            }
        });
    }

    /// Loads new scripts into running modules, all at once.
    async fn reload(&self, reloads: Vec<Reload>) -> Vec<ReloadRefused> {
        let outcomes = futures::future::join_all(reloads.into_iter().map(|(module, number, source)| async move {
            tracing::info!(module = %module.spec.id, driver = %module.spec.driver_id, "reloading module with new driver code");
            let outcome = module.reload(number, source).await;
            (module, outcome)
        }))
        .await;
        outcomes
            .into_iter()
            .filter_map(|(module, outcome)| {
                let error = outcome.err()?;
                tracing::warn!(module = %module.spec.id, "reload refused, the old code keeps running: {error}");
                Some(ReloadRefused {
                    module: module.spec.id.clone(),
                    driver: module.spec.driver_id.clone(),
                    error,
                })
            })
            .collect()
    }

    /// Records an edge location's current grant (the control shell calls this on every
    /// grant it stores).
    pub fn set_grant(&self, edge: &str, grant: ControlState) {
        self.inner
            .grants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(edge.to_string(), grant);
    }

    /// This side's view of an edge location's grant.
    pub fn grant(&self, edge: &str) -> Option<ControlState> {
        self.inner
            .grants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(edge)
            .copied()
    }

    /// Fences a call: answers this side's grant of the module's edge location, refusing a
    /// caller whose claim it does not admit (an older epoch, or the same epoch with
    /// another holder). `None` for a module of no edge.
    pub fn fence(&self, at: &ModuleRef, claim: Claim) -> Result<Option<ControlState>, ExecError> {
        let model = self.model();
        let Some(edge) = find(&model, at).and_then(|module| model.module_edge(module)) else {
            return Ok(None);
        };
        let current = self.grant(&edge);
        match current {
            Some(current) if !current.admits(claim) => {
                let claimed = match claim.holder {
                    Some(holder) => format!(
                        "{} at epoch {}",
                        crate::control::owner_name(holder),
                        claim.epoch.unwrap_or_default()
                    ),
                    None => format!("epoch {}", claim.epoch.unwrap_or_default()),
                };
                Err(ExecError::StaleEpoch(format!(
                    "stale {claimed}: edge {edge} is held by the {} at epoch {} (its owner changed)",
                    crate::control::owner_name(current.owner),
                    current.epoch
                )))
            }
            _ => Ok(current),
        }
    }

    /// Every status change of the modules running here, from now on.
    pub fn subscribe_status(&self) -> tokio::sync::broadcast::Receiver<StatusChange> {
        self.inner.status_changes.subscribe()
    }

    /// One status value of a module running here, as it is now.
    pub fn status_value(&self, module_id: &str, key: &str) -> Option<Value> {
        let module = lock(&self.inner.modules).get(module_id).cloned()?;
        module.shared.status_value(key)
    }

    /// The status maps of the modules running here, by module id.
    pub fn statuses(&self) -> Vec<(String, Map<String, Value>)> {
        let mut all: Vec<_> = lock(&self.inner.modules)
            .iter()
            .map(|(id, module)| (id.clone(), module.shared.status()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Warm standby: keeps the modules `wanted` picks compiled (those not running here),
    /// with the status [`standby_status`](Self::standby_status) feeds them, so that
    /// starting them later begins from that state. Others are forgotten.
    pub async fn keep_warm(&self, model: &Model, wanted: impl Fn(&ModuleRecord) -> bool) {
        let code = self.code();
        let specs: Vec<ModuleSpec> = model
            .modules
            .values()
            .filter(|module| wanted(module))
            .filter_map(|module| ModuleSpec::new(model, &code, module).ok())
            .map(|spec| self.routed(spec))
            .collect();
        let to_compile = self
            .inner
            .standby
            .retain(&specs, |id| model.modules.contains_key(id));
        if to_compile.is_empty() {
            return;
        }
        let limits = self.inner.limits;
        let compiled = tokio::task::spawn_blocking(move || {
            to_compile
                .into_iter()
                .map(|spec| {
                    let ast = script::compile_only(&spec.source, limits).ok();
                    (spec, ast)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (spec, ast) in compiled {
            self.inner.standby.compiled(&spec, ast);
        }
    }

    /// A status value synced from the side that runs the module: kept for a module kept
    /// warm, and (bounded) for one this side does not know yet, until
    /// [`keep_warm`](Self::keep_warm) learns whether to keep it warm. Answers whether it
    /// was kept.
    pub fn standby_status(&self, module_id: &str, key: &str, value: Value) -> bool {
        self.inner.standby.set_status(module_id, key, value)
    }

    /// The modules kept warm, with the number of status keys each holds.
    pub fn warm_modules(&self) -> Vec<(String, usize)> {
        self.inner.standby.summary()
    }

    /// Stops every module, side by side, and waits for every stop under way.
    pub async fn stop_all(&self) {
        let all: Vec<_> = lock(&self.inner.modules).drain().map(|(_, m)| m).collect();
        for module in all {
            self.begin_stop(module);
        }
        self.wait_stopped(|_| true).await;
    }

    /// The module a client means, if it runs here.
    fn resolve(&self, at: &ModuleRef) -> Result<Arc<ModuleInstance>, ExecError> {
        let model = self.model();
        let (system, name, index) = (at.system.as_str(), at.name.as_str(), at.index);
        let key = (system.to_string(), name.to_string(), index);
        let cached = match &at.id {
            Some(id) => Some(id.clone()),
            None => lock(&self.inner.lookups).get(&key).cloned(),
        };
        let module = match cached.and_then(|id| model.modules.get(&id)) {
            Some(module) => module,
            None if at.id.is_some() => {
                return Err(ExecError::NotFound(format!(
                    "no module {}",
                    at.id.as_deref().unwrap_or_default()
                )));
            }
            None => {
                if !model.systems.contains_key(system) {
                    return Err(ExecError::NotFound(format!("no system {system}")));
                }
                let module = model.system_module(system, name, index).ok_or_else(|| {
                    ExecError::NotFound(format!("system {system} has no module {name} {index}"))
                })?;
                lock(&self.inner.lookups).insert(key, module.id.clone());
                module
            }
        };
        if self.polls_only(&module.id) {
            return Err(ExecError::NotHere(format!(
                "module {} only polls here (a collector array's standby): the holder serves its calls",
                module.id
            )));
        }
        let running = lock(&self.inner.modules).get(&module.id).cloned();
        running.ok_or_else(|| {
            let requested = self
                .inner
                .requested
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&module.id);
            if let Some(stopped) = self.stopped_here(&module.id).filter(|_| requested) {
                ExecError::Unavailable(format!(
                    "module {} is not running: system {stopped} is stopped",
                    module.id
                ))
            } else if requested {
                self.not_started(&model, module)
            } else {
                let home = runs_on(&model, module);
                let other = if home == self.inner.executed_by {
                    "the master".to_string()
                } else {
                    home
                };
                ExecError::NotHere(format!(
                    "module {} does not run here: {other} controls it",
                    module.id
                ))
            }
        })
    }

    /// Why a module wanted here does not run: its driver code has not arrived yet (the
    /// edge is fetching it: worth waiting for), or its driver is not in the model.
    fn not_started(&self, model: &Model, module: &ModuleRecord) -> ExecError {
        let Some(driver) = model.drivers.get(&module.driver) else {
            return ExecError::Unavailable(format!(
                "module {} is not running: its driver {} is missing",
                module.id, module.driver
            ));
        };
        match self.code().source(&driver.repository, &driver.file) {
            Err(why) => ExecError::Waiting(format!(
                "module {} is not running yet: it waits for its driver code ({why})",
                module.id
            )),
            Ok(_) => ExecError::Unavailable(format!(
                "module {} is not running: its driver {} did not start it (see its debug log)",
                module.id, driver.id
            )),
        }
    }

    /// Stops or starts a system's modules here, or drops its cached lookups.
    async fn apply_system_action(&self, system: &str, action: SystemAction) {
        match action {
            SystemAction::ExpireCache => {
                lock(&self.inner.lookups).retain(|(cached, _, _), _| cached != system);
                tracing::info!(system, "system cache expired");
                return;
            }
            SystemAction::Stop => {
                lock(&self.inner.stopped_systems).insert(system.to_string());
                tracing::info!(system, "system stopped");
            }
            SystemAction::Start => {
                lock(&self.inner.stopped_systems).remove(system);
                tracing::info!(system, "system started");
            }
        }
        let requested = self
            .inner
            .requested
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // A reload this happens to carry out is logged there; the side that changed the
        // code reports refusals from its own reconcile.
        let _ = self
            .reconcile(self.model(), |module| requested.contains(&module.id))
            .await;
    }

    /// The systems stopped on this side.
    pub fn stopped_systems(&self) -> Vec<String> {
        let mut all: Vec<String> = lock(&self.inner.stopped_systems).iter().cloned().collect();
        all.sort();
        all
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
                    runs_on: match modules.get(&module.id) {
                        Some(_) => self.inner.executed_by.clone(),
                        None if matches!(self.inner.executor, Executor::Edge(_)) => {
                            Executor::Master(None).to_string()
                        }
                        None => runs_on(model, module),
                    },
                    health: modules.get(&module.id).map(|m| m.shared.health()),
                }
            })
            .collect()
    }

    /// This server's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.inner.metrics
    }

    /// Whether module `module_id`'s device connection is up, if it runs here with one.
    pub fn device_connected(&self, module_id: &str) -> Option<bool> {
        lock(&self.inner.modules)
            .get(module_id)?
            .shared
            .health()
            .connected
    }

    /// Per module running here: the location it belongs to (`edge:ID` or `master`) and,
    /// for one with a device, whether its connection is up.
    pub fn module_connections(&self) -> Vec<(String, Option<bool>)> {
        let model = self.model();
        lock(&self.inner.modules)
            .iter()
            .map(|(id, module)| {
                let location = model
                    .modules
                    .get(id)
                    .map(|record| runs_on(&model, record))
                    .unwrap_or_else(|| "master".to_string());
                (location, module.shared.health().connected)
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
