//! The master's control shell: one task that owns every edge location's [`MasterSide`]
//! machine, feeds it link events, reports, acknowledgements and the time, and carries out
//! its actions in order: issue grants (a compare-and-set on the stored grant; what follows
//! a grant the store did not take is not carried out, and the machine tries again), audit,
//! start or stop the edge's modules here (a stop completes, devices disconnected, before
//! anything after it), send decisions. The machines measure time on the monotonic clock.
//!
//! One task, so that the actions of one machine never interleave with another's
//! reconcile of the runtime.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tether_common::api::audit_entry_json;
use tether_common::control::clock::wall_now_ms;
use tether_common::control::{
    AuditRecord, ControlState, EdgeSettings, MasterAction, MasterEvent, MasterSide, Now, Owner,
    RestoreRefused, Window, owner_name,
};
use tether_common::link::LinkError;
use tether_common::model::{EdgeRecord, Model, Standby};
use tether_common::protocol::{ErrorCode, Request, Response};
use tether_common::report::printable;
use tether_common::runtime::{ReloadRefused, Runtime};
use tether_common::store::{AuditSource, Grants, Store};
use tokio::sync::{mpsc, oneshot};

use crate::edges::EdgeRegistry;

/// How long an edge may take to act on a decision (stop or start its modules).
const DECISION_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest the shell sleeps between polls of the machines.
const MAX_POLL: Duration = Duration::from_secs(1);
/// The master's own audit records kept.
pub const AUDIT_KEEP: u64 = 100_000;
/// Audit records kept per edge location of those it can cause (its reports, refusals of
/// its requests), apart from the master's own.
pub const EDGE_AUDIT_KEEP: u64 = 1_000;

/// Unix time in milliseconds, for what people read (never for an interval).
pub fn now_ms() -> u64 {
    wall_now_ms()
}

/// Why a restore did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// No such edge location.
    #[error("no edge {0}")]
    NotFound(String),
    /// The machine refused.
    #[error(transparent)]
    Refused(#[from] RestoreRefused),
    /// The new grant could not be stored, so nothing changed.
    #[error("the restore was not done: {0}")]
    NotStored(String),
    /// The control task has stopped (shutdown).
    #[error("the master is shutting down")]
    Stopped,
}

enum Command {
    Model(Arc<Model>),
    Event(String, MasterEvent),
    Booted,
    Restore(String, oneshot::Sender<Result<ControlState, RestoreError>>),
}

/// A handle on the control task.
#[derive(Clone)]
pub struct Control {
    /// Rare events only (links, reports, acks, model changes, restores): the high-volume
    /// status notices never queue here.
    commands: mpsc::UnboundedSender<Command>,
    states: Arc<RwLock<HashMap<String, ControlState>>>,
    store: Arc<Store>,
    runtime: Runtime,
}

impl Control {
    /// Starts the control task over the grants stored in `grants`, with the audit log in
    /// `store`; the master is booting until [`booted`](Self::booted).
    pub fn start(
        store: Arc<Store>,
        grants: Arc<dyn Grants>,
        runtime: Runtime,
        registry: Arc<EdgeRegistry>,
    ) -> anyhow::Result<Control> {
        let persisted = grants.grants()?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let control = Control {
            commands: commands.clone(),
            states: Arc::new(RwLock::new(HashMap::new())),
            store: store.clone(),
            runtime: runtime.clone(),
        };
        let task = Task {
            machines: HashMap::new(),
            persisted,
            model: Arc::new(Model::default()),
            runtime,
            store,
            grants,
            registry,
            running: HashSet::new(),
            booted: false,
            commands,
            states: control.states.clone(),
        };
        tokio::spawn(task.run(receiver));
        Ok(control)
    }

    fn send(&self, command: Command) {
        // The task ends only with the process.
        let _ = self.commands.send(command);
    }

    /// The model changed: edges added, removed or edited, modules moved.
    pub fn model_changed(&self, model: Arc<Model>) {
        self.send(Command::Model(model));
    }

    /// Something happened on an edge's link.
    pub fn event(&self, edge: &str, event: MasterEvent) {
        self.send(Command::Event(edge.to_string(), event));
    }

    /// The boot wait is over.
    pub fn booted(&self) {
        self.send(Command::Booted);
    }

    /// A status change the edge streamed (runtime-state sync): taken only from the edge
    /// that controls, under the current epoch, and kept only for modules the runtime keeps
    /// warm (standby = "warm"). Handled here, not by the control task, so that a chatty
    /// edge cannot grow its queue.
    pub fn status(&self, edge: &str, module_id: &str, key: &str, value: Value, epoch: u64) {
        let current = self.state(edge);
        if current.is_some_and(|s| s.owner == Owner::Edge && epoch >= s.epoch) {
            self.runtime.standby_status(module_id, key, value);
        }
    }

    /// A manual restore; answers the new state once the decision is sent.
    pub async fn restore(&self, edge: &str) -> Result<ControlState, RestoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Restore(edge.to_string(), reply));
        answer.await.unwrap_or(Err(RestoreError::Stopped))
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<tether_common::metrics::Metrics> {
        self.runtime.metrics()
    }

    /// An edge location's owner and epoch.
    pub fn state(&self, edge: &str) -> Option<ControlState> {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(edge)
            .copied()
    }

    /// Records audit events edge `edge` reports about itself: its own takeovers while the
    /// master was out of reach, its refused reloads. They are kept with the edge's
    /// records, marked as reported by it.
    pub async fn record_edge_audits(
        &self,
        edge: &str,
        events: Vec<AuditRecord>,
    ) -> anyhow::Result<()> {
        let store = self.store.clone();
        let edge = edge.to_string();
        tokio::task::spawn_blocking(move || {
            // What an edge says is written escaped: it can neither forge log lines nor
            // colour a terminal.
            for event in &events {
                let reason = printable(&event.reason, 1024);
                match &event.code {
                    Some(code) => tracing::warn!(
                        edge = %event.edge,
                        repository = %printable(&code.repository, 128),
                        refused = code.refused,
                        "the edge reports a change of driver code: {reason}"
                    ),
                    None => tracing::warn!(
                        edge = %event.edge,
                        from = owner_name(event.from),
                        to = owner_name(event.to),
                        epoch = event.epoch,
                        "the edge reports a change of owner: {reason}"
                    ),
                }
            }
            store.append_edge_audits(&edge, &events, AuditSource::Edge, EDGE_AUDIT_KEEP)?;
            Ok(())
        })
        .await?
    }

    /// Records that a request over edge `edge`'s link was refused, and why, with the
    /// edge's records.
    pub async fn record_refusal(&self, edge: &str, reason: String) {
        let state = self.state(edge).unwrap_or_default();
        let record = AuditRecord {
            time_ms: now_ms(),
            edge: edge.to_string(),
            from: state.owner,
            to: state.owner,
            epoch: state.epoch,
            reason,
            code: None,
        };
        let store = self.store.clone();
        let edge = edge.to_string();
        let stored = tokio::task::spawn_blocking(move || {
            store.append_edge_audits(&edge, &[record], AuditSource::Refusal, EDGE_AUDIT_KEEP)
        })
        .await;
        if !matches!(stored, Ok(Ok(_))) {
            tracing::error!("cannot store an audit record: {stored:?}");
        }
    }

    /// The audit log, oldest first, optionally of one edge.
    pub async fn audit(&self, edge: Option<String>) -> anyhow::Result<Vec<Value>> {
        let store = self.store.clone();
        let records = tokio::task::spawn_blocking(move || store.audit_after(0)).await??;
        Ok(records
            .iter()
            .filter(|entry| edge.as_ref().is_none_or(|e| &entry.record.edge == e))
            .map(audit_entry_json)
            .collect())
    }
}

fn settings(record: &EdgeRecord) -> EdgeSettings {
    EdgeSettings {
        failover: record.failover,
        timeout_ms: record.timeout_ms,
        window: record.restore_window.as_ref().and_then(|w| {
            Window::new(w)
                .map_err(|err| tracing::error!(edge = %record.id, "restore window ignored: {err}"))
                .ok()
        }),
    }
}

/// A grant the store did not take, and why.
struct NotIssued(String);

struct Task {
    machines: HashMap<String, MasterSide>,
    /// States read at start, for edges whose machine is not made yet.
    persisted: std::collections::BTreeMap<String, ControlState>,
    model: Arc<Model>,
    runtime: Runtime,
    store: Arc<Store>,
    grants: Arc<dyn Grants>,
    registry: Arc<EdgeRegistry>,
    /// Edge locations whose modules the master runs now.
    running: HashSet<String>,
    booted: bool,
    commands: mpsc::UnboundedSender<Command>,
    states: Arc<RwLock<HashMap<String, ControlState>>>,
}

impl Task {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            let now = Now::system();
            let next = self
                .machines
                .values()
                .filter_map(|m| m.next_poll(now))
                .min()
                .map(|at| Duration::from_millis(at.since(now.mono)))
                .unwrap_or(MAX_POLL)
                .min(MAX_POLL);
            let command = tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => Some(command),
                    None => return,
                },
                _ = tokio::time::sleep(next) => None,
            };
            match command {
                Some(command) => self.command(command).await,
                None => self.poll_all().await,
            }
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Model(model) => self.follow_model(model).await,
            Command::Event(edge, event) => {
                let Some(machine) = self.machines.get_mut(&edge) else {
                    return;
                };
                let actions = machine.handle(Now::system(), event);
                let _ = self.carry_out(&edge, actions).await;
            }
            Command::Booted => {
                self.booted = true;
                let edges: Vec<String> = self.machines.keys().cloned().collect();
                for edge in edges {
                    let actions = self
                        .machines
                        .get_mut(&edge)
                        .map(|m| m.handle(Now::system(), MasterEvent::Booted))
                        .unwrap_or_default();
                    let _ = self.carry_out(&edge, actions).await;
                }
            }
            Command::Restore(edge, reply) => {
                let result = match self.machines.get_mut(&edge) {
                    None => Err(RestoreError::NotFound(edge.clone())),
                    Some(machine) => machine.restore(Now::system()).map_err(RestoreError::from),
                };
                match result {
                    Ok(actions) => {
                        let answer = match self.carry_out(&edge, actions).await {
                            Ok(()) => self
                                .machines
                                .get(&edge)
                                .map(|m| m.state())
                                .ok_or(RestoreError::NotFound(edge)),
                            Err(NotIssued(why)) => Err(RestoreError::NotStored(why)),
                        };
                        let _ = reply.send(answer);
                    }
                    Err(err) => {
                        let _ = reply.send(Err(err));
                    }
                }
            }
        }
    }

    async fn poll_all(&mut self) {
        let now = Now::system();
        let edges: Vec<String> = self.machines.keys().cloned().collect();
        for edge in edges {
            let actions = self
                .machines
                .get_mut(&edge)
                .map(|m| m.poll(now))
                .unwrap_or_default();
            if !actions.is_empty() {
                let _ = self.carry_out(&edge, actions).await;
            }
        }
    }

    async fn follow_model(&mut self, model: Arc<Model>) {
        self.model = model.clone();
        let now = Now::system();
        self.machines.retain(|id, _| model.edges.contains_key(id));
        self.running.retain(|id| model.edges.contains_key(id));
        for (id, record) in &model.edges {
            match self.machines.get_mut(id) {
                Some(machine) => machine.set_settings(settings(record)),
                None => {
                    let persisted = self.persisted.get(id).copied().unwrap_or_default();
                    let mut machine = MasterSide::new(id, settings(record), persisted, now);
                    let mut actions = Vec::new();
                    if self.booted {
                        // An edge added after boot: the master has nothing of it to load.
                        actions = machine.handle(now, MasterEvent::Booted);
                    }
                    self.runtime.set_grant(id, persisted);
                    self.publish(id, persisted);
                    self.machines.insert(id.clone(), machine);
                    let _ = self.carry_out(id, actions).await;
                }
            }
        }
        self.states
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| model.edges.contains_key(id));
        self.reconcile().await;
    }

    /// Runs the modules of no edge and of the edges the master controls; keeps the
    /// others of warm-standby edges compiled.
    async fn reconcile(&self) {
        let model = self.model.clone();
        let running = self.running.clone();
        let wanted = model.clone();
        let refused = self
            .runtime
            .reconcile(model.clone(), move |module| {
                match wanted.module_edge(module) {
                    None => true,
                    Some(edge) => running.contains(&edge),
                }
            })
            .await;
        self.audit_refused_reloads(&model, refused).await;
        let running = &self.running;
        self.runtime
            .keep_warm(&model, |module| {
                model.module_edge(module).is_some_and(|edge| {
                    !running.contains(&edge)
                        && model
                            .edges
                            .get(&edge)
                            .is_some_and(|e| e.standby == Standby::Warm)
                })
            })
            .await;
    }

    /// Reloads the master refused (a new script whose `on_load` failed) go to the audit
    /// log, under the module's edge location.
    async fn audit_refused_reloads(&self, model: &Model, refused: Vec<ReloadRefused>) {
        if refused.is_empty() {
            return;
        }
        let code = self.runtime.code();
        let records: Vec<AuditRecord> = refused
            .iter()
            .map(|r| {
                let edge = model
                    .modules
                    .get(&r.module)
                    .and_then(|m| model.module_edge(m))
                    .unwrap_or_default();
                let epoch = self.persisted_epoch(&edge);
                r.audit(model, &code, (&edge, Owner::Master, epoch), now_ms())
            })
            .collect();
        self.store.record_audits(records, AUDIT_KEEP).await;
    }

    fn persisted_epoch(&self, edge: &str) -> u64 {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(edge)
            .map(|s| s.epoch)
            .unwrap_or(0)
    }

    fn publish(&self, edge: &str, state: ControlState) {
        self.states
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(edge.to_string(), state);
    }

    /// Carries out a machine's actions in order. A grant the store did not take stops
    /// the batch there: the machine is told, and tries again later.
    async fn carry_out(&mut self, edge: &str, actions: Vec<MasterAction>) -> Result<(), NotIssued> {
        for action in actions {
            match action {
                MasterAction::Issue { expected, grant } => {
                    let grants = self.grants.clone();
                    let id = edge.to_string();
                    let issued =
                        tokio::task::spawn_blocking(move || grants.issue(&id, expected, grant))
                            .await;
                    let stored = match issued {
                        Ok(Ok(())) => {
                            self.runtime.set_grant(edge, grant);
                            self.publish(edge, grant);
                            // A machine made again later (the edge removed and added back)
                            // starts from what is stored, not from what was at start.
                            self.persisted.insert(edge.to_string(), grant);
                            continue;
                        }
                        Ok(Err(err)) => {
                            tracing::error!(
                                edge,
                                ?grant,
                                "grant not issued, so not acted on (tried again in {} ms): {err}",
                                tether_common::control::master::ISSUE_RETRY_MS
                            );
                            (err.stored(), err.to_string())
                        }
                        Err(err) => {
                            tracing::error!(
                                edge,
                                ?grant,
                                "grant not issued, so not acted on: {err}"
                            );
                            (None, err.to_string())
                        }
                    };
                    self.runtime.metrics().grant_store_failed(edge);
                    if let Some(machine) = self.machines.get_mut(edge) {
                        machine.issue_failed(Now::system(), stored.0);
                        let state = machine.state();
                        self.runtime.set_grant(edge, state);
                        self.publish(edge, state);
                    }
                    return Err(NotIssued(stored.1));
                }
                MasterAction::Audit(record) => {
                    tracing::warn!(
                        edge,
                        from = owner_name(record.from),
                        to = owner_name(record.to),
                        epoch = record.epoch,
                        "change of owner: {}",
                        record.reason
                    );
                    self.store.record_audits(vec![record], AUDIT_KEEP).await;
                }
                MasterAction::StartModules { epoch } => {
                    tracing::info!(edge, epoch, "the master starts the edge's modules");
                    self.running.insert(edge.to_string());
                    self.reconcile().await;
                }
                MasterAction::StopModules => {
                    tracing::info!(edge, "the master stops the edge's modules");
                    self.running.remove(edge);
                    self.reconcile().await;
                }
                MasterAction::SendDecision {
                    owner,
                    epoch,
                    reason,
                } => self.send_decision(edge, owner, epoch, reason),
                MasterAction::SendReady => {
                    if let Some(link) = self.registry.link(edge) {
                        tokio::spawn(async move {
                            let _ = link.request(Request::MasterReady, DECISION_TIMEOUT).await;
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends a decision without waiting: the acknowledgement comes back as an event. An
    /// edge that refuses it (a stale epoch) or does not answer loses its link, and the
    /// next link negotiates afresh.
    fn send_decision(&self, edge: &str, owner: Owner, epoch: u64, reason: String) {
        let Some(link) = self.registry.link(edge) else {
            return;
        };
        let commands = self.commands.clone();
        let edge = edge.to_string();
        tokio::spawn(async move {
            let request = Request::ControlDecision {
                owner,
                epoch,
                reason,
            };
            match link.request(request, DECISION_TIMEOUT).await {
                Ok(Response::ControlAck { epoch }) => {
                    let _ = commands.send(Command::Event(edge, MasterEvent::Acked { epoch }));
                }
                Ok(other) => {
                    tracing::error!(edge, "the edge answered a decision with {other:?}");
                    link.close("unexpected answer to a control decision");
                }
                Err(LinkError::Remote(err)) if err.code == ErrorCode::StaleEpoch => {
                    tracing::warn!(edge, "the edge refused a decision: {}", err.message);
                    link.close(format!("control decision refused: {}", err.message));
                }
                Err(err) => {
                    if !link.is_closed() {
                        tracing::warn!(edge, "control decision failed: {err}");
                        link.close(format!("control decision failed: {err}"));
                    }
                }
            }
        });
    }
}
