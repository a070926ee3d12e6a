//! Calls on a module wherever it runs: here, through the module's queue, or on the other
//! side through the [`Remote`]. Clients, the link's proxy and `system(...)` in scripts all
//! come through here, so they all behave alike.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{broadcast, mpsc};

use super::module::ModuleInstance;
use super::remote::{Executed, Origin, Remote, RemoteCall, StatusEvent, SystemAction};
use super::{DebugLine, ExecError, Runtime, lock};
use crate::control::Claim;
use crate::protocol::ModuleRef;

/// What a proxied call waits beyond the driver's own timeout, so that the far side's
/// timeout answer (504) arrives before the link's.
const LINK_GRACE: Duration = Duration::from_secs(2);
/// A method's timeout when its driver is not known here (DESIGN.md's default).
const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the far side may take to answer a status or log read.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Events a watch may queue for a slow reader before it is cut off.
const WATCH_QUEUE: usize = 256;
/// How often a binding looks for its module again after losing it (a change of owner,
/// a link down).
const REBIND_EVERY: Duration = Duration::from_millis(250);

/// A module, found.
enum Located {
    Here(Arc<ModuleInstance>),
    There(RemoteCall),
}

impl Runtime {
    /// Sets where calls for modules not run here go.
    pub fn set_remote(&self, remote: Arc<dyn Remote>) {
        *self.inner.remote.write().unwrap_or_else(|p| p.into_inner()) = Some(remote);
    }

    fn remote(&self) -> Option<Arc<dyn Remote>> {
        self.inner
            .remote
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn locate(
        &self,
        at: &ModuleRef,
        origin: &Origin,
        read_only: bool,
    ) -> Result<Located, ExecError> {
        match self.resolve(at) {
            Ok(module) => Ok(Located::Here(module)),
            // A system this side does not hold (an edge's replica holds its own systems
            // only): the master holds them all. A call from the master is not sent back.
            // Only a client the master knows may go there: the master authorizes it
            // again, and this side's own callers (its admin token) stay on its own site.
            Err(ExecError::NotFound(message)) => {
                let wider = self.remote().filter(|remote| remote.holds_every_system());
                match wider {
                    Some(_)
                        if origin.via.is_none()
                            && !self.model().systems.contains_key(&at.system) =>
                    {
                        if origin.on_behalf.is_none() {
                            return Err(not_this_sides(&at.system));
                        }
                        Ok(Located::There(RemoteCall {
                            module: at.clone(),
                            edge: None,
                            origin: origin.clone(),
                            claim: Claim::default(),
                            // The driver is not known here; the design's default.
                            timeout: DEFAULT_EXEC_TIMEOUT + LINK_GRACE,
                        }))
                    }
                    _ => Err(ExecError::NotFound(message)),
                }
            }
            Err(ExecError::NotHere(message)) => {
                if self.remote().is_none() {
                    return Err(ExecError::NotHere(message));
                }
                let model = self.model();
                let module = super::find(&model, at).ok_or_else(|| {
                    ExecError::NotFound(format!("no module {} {}", at.name, at.index))
                })?;
                let timeout = if read_only {
                    READ_TIMEOUT
                } else {
                    let driver_timeout = model
                        .drivers
                        .get(&module.driver)
                        .map(|driver| Duration::from_millis(driver.timeout_ms))
                        .unwrap_or(DEFAULT_EXEC_TIMEOUT);
                    driver_timeout + LINK_GRACE
                };
                Ok(Located::There(RemoteCall {
                    module: ModuleRef {
                        id: Some(module.id.clone()),
                        ..at.clone()
                    },
                    edge: model.module_edge(module),
                    origin: origin.clone(),
                    claim: Claim::default(),
                    timeout,
                }))
            }
            Err(other) => Err(other),
        }
    }

    fn remote_or_not_here(&self) -> Result<Arc<dyn Remote>, ExecError> {
        self.remote()
            .ok_or_else(|| ExecError::NotHere("no other side is reachable".into()))
    }

    /// Runs a method of a module of `system`, here or where it runs. `claim` is the
    /// caller's view of the module's edge location's grant (fenced here and where it
    /// runs; a caller that claims nothing is fenced there by this side's view);
    /// `origin` where the call comes from.
    pub async fn exec_from(
        &self,
        module: &ModuleRef,
        method: &str,
        args: Vec<Value>,
        claim: Claim,
        origin: &Origin,
    ) -> Result<Executed, ExecError> {
        let view = self.fence(module, claim)?;
        match self.locate(module, origin, false)? {
            Located::Here(module) => Ok(Executed {
                value: module.call(method, args).await?,
                executed_by: self.inner.executed_by.clone(),
            }),
            Located::There(mut call) => {
                call.claim = match (claim.epoch, view) {
                    // The caller claims nothing beyond this side's view: send the view,
                    // holder and all.
                    (None, Some(view)) => Claim::grant(view),
                    (Some(epoch), Some(view)) if epoch == view.epoch => Claim::grant(view),
                    _ => claim,
                };
                let remote = self.remote_or_not_here()?;
                remote.exec(call, method.to_string(), args).await
            }
        }
    }

    /// Runs a method of a module of `system` wherever it runs; answers the result and
    /// who ran it.
    pub async fn exec(
        &self,
        system: &str,
        name: &str,
        index: u32,
        method: &str,
        args: Vec<Value>,
    ) -> Result<(Value, String), ExecError> {
        let module = ModuleRef::new(system, name, index);
        let done = self
            .exec_from(&module, method, args, Claim::default(), &Origin::local())
            .await?;
        Ok((done.value, done.executed_by))
    }

    /// A module's status map, wherever it runs.
    pub async fn status_from(
        &self,
        at: &ModuleRef,
        origin: &Origin,
    ) -> Result<Map<String, Value>, ExecError> {
        match self.locate(at, origin, true)? {
            Located::Here(module) => Ok(module.shared.status()),
            Located::There(call) => self.remote_or_not_here()?.status(call).await,
        }
    }

    /// A module's recent debug lines, wherever it runs.
    pub async fn debug_from(
        &self,
        at: &ModuleRef,
        origin: &Origin,
    ) -> Result<Vec<DebugLine>, ExecError> {
        match self.locate(at, origin, true)? {
            Located::Here(module) => Ok(module.shared.debug_lines()),
            Located::There(call) => self.remote_or_not_here()?.debug_lines(call).await,
        }
    }

    /// A module's status map and then its changes, for as long as it runs where it runs
    /// now: the receiver ends when it stops there (or the link to it goes).
    pub async fn watch_status(
        &self,
        at: &ModuleRef,
        origin: &Origin,
    ) -> Result<mpsc::Receiver<StatusEvent>, ExecError> {
        let module = match self.locate(at, origin, true)? {
            Located::Here(module) => module,
            Located::There(call) => return self.remote_or_not_here()?.watch_status(call).await,
        };
        // Subscribe before reading the map, so no change falls between the two.
        let mut changes = self.subscribe_status();
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let stopping = module.stopping();
        tokio::spawn(async move {
            if tx
                .send(StatusEvent::Map(module.shared.status()))
                .await
                .is_err()
            {
                return;
            }
            loop {
                let event = tokio::select! {
                    _ = stopping.cancelled() => return,
                    _ = tx.closed() => return,
                    change = changes.recv() => match change {
                        Ok(change) if change.module_id == module.spec.id => {
                            match module.shared.status_value(&change.key) {
                                Some(value) => StatusEvent::Value(change.key, value),
                                None => continue,
                            }
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            StatusEvent::Map(module.shared.status())
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                if tx.try_send(event).is_err() {
                    tracing::debug!(module = %module.spec.id, "a status watcher fell behind; cut off");
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// A module's recent debug lines and then every new one, for as long as it runs where
    /// it runs now.
    pub async fn watch_debug(
        &self,
        at: &ModuleRef,
        origin: &Origin,
    ) -> Result<mpsc::Receiver<DebugLine>, ExecError> {
        let module = match self.locate(at, origin, true)? {
            Located::Here(module) => module,
            Located::There(call) => return self.remote_or_not_here()?.watch_debug(call).await,
        };
        let (ring, mut live) = module.shared.follow_debug();
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let stopping = module.stopping();
        tokio::spawn(async move {
            for line in ring {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            loop {
                let line = tokio::select! {
                    _ = stopping.cancelled() => return,
                    _ = tx.closed() => return,
                    line = live.recv() => match line {
                        Ok(line) => line,
                        Err(broadcast::error::RecvError::Lagged(missed)) => DebugLine {
                            time_ms: 0,
                            line: format!("({missed} lines missed: the reader fell behind)"),
                        },
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                if tx.try_send(line).is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// A client's binding to a module's status: the map, then every change, and the map
    /// again whenever the module moves (a change of owner) or comes back (a link up), until
    /// the receiver is dropped. Only an unknown module is an error.
    pub async fn bind_status(
        &self,
        at: &ModuleRef,
        origin: &Origin,
    ) -> Result<mpsc::Receiver<StatusEvent>, ExecError> {
        let first = self.watch_status(at, origin).await;
        let runtime = self.clone();
        let (at, origin) = (at.clone(), origin.clone());
        follow(first, move || {
            let (runtime, at, origin) = (runtime.clone(), at.clone(), origin.clone());
            async move { runtime.watch_status(&at, &origin).await }
        })
    }

    /// A client's watch of a module's debug log that follows the module wherever it runs.
    pub async fn bind_debug(
        &self,
        at: &ModuleRef,
        origin: &Origin,
    ) -> Result<mpsc::Receiver<DebugLine>, ExecError> {
        let first = self.watch_debug(at, origin).await;
        let runtime = self.clone();
        let (at, origin) = (at.clone(), origin.clone());
        follow(first, move || {
            let (runtime, at, origin) = (runtime.clone(), at.clone(), origin.clone());
            async move { runtime.watch_debug(&at, &origin).await }
        })
    }

    /// The other side's API address when it controls `system` (for the
    /// `Tether-Preferred-Server` hint).
    pub fn preferred_server(&self, system: &str) -> Option<String> {
        self.remote()?.preferred_server(system)
    }

    /// Starts, stops or expires a system on the side that runs it (here when this side
    /// runs any of its modules, or none runs anywhere); answers who did it.
    pub async fn system_action(
        &self,
        system: &str,
        action: SystemAction,
        origin: &Origin,
    ) -> Result<String, ExecError> {
        let model = self.model();
        let Some(record) = model.systems.get(system) else {
            // As for calls: a system an edge does not hold is the master's, for a client
            // the master knows.
            let wider = self.remote().filter(|remote| remote.holds_every_system());
            return match wider {
                Some(remote) if origin.via.is_none() => {
                    if origin.on_behalf.is_none() {
                        return Err(not_this_sides(system));
                    }
                    remote
                        .system_action(system.to_string(), None, origin.clone(), action)
                        .await
                }
                _ => Err(ExecError::NotFound(format!("no system {system}"))),
            };
        };
        let runs_here = {
            let requested = self
                .inner
                .requested
                .read()
                .unwrap_or_else(|p| p.into_inner());
            record.modules.is_empty() || record.modules.iter().any(|id| requested.contains(id))
        };
        let remote = self.remote();
        match remote {
            Some(remote) if !runs_here => {
                let edge = record.edge.clone().or_else(|| {
                    record
                        .modules
                        .iter()
                        .filter_map(|id| model.modules.get(id))
                        .find_map(|module| model.module_edge(module))
                });
                remote
                    .system_action(system.to_string(), edge, origin.clone(), action)
                    .await
            }
            _ => {
                self.apply_system_action(system, action).await;
                Ok(self.inner.executed_by.clone())
            }
        }
    }

    /// The ids of modules that are wanted here but whose every system is stopped.
    pub(super) fn stopped_here(&self, module_id: &str) -> Option<String> {
        let model = self.model();
        let stopped = lock(&self.inner.stopped_systems);
        let mut systems = model.systems_of(module_id).peekable();
        systems.peek()?;
        let mut first = None;
        for system in systems {
            if !stopped.contains(&system.id) {
                return None;
            }
            first.get_or_insert_with(|| system.id.clone());
        }
        first
    }
}

/// The refusal of a call for a system an edge does not hold, from one of the edge's own
/// callers: they act on the edge's own site only.
fn not_this_sides(system: &str) -> ExecError {
    ExecError::Forbidden(format!(
        "system {system} is not one of this edge's: another site is reached through an edge \
         only with the token of a user of the master (this edge's own admin token acts on \
         its own systems only)"
    ))
}

/// Keeps a watch going across moves: forwards `first`'s events, and when its source ends
/// asks `again` for a new one every [`REBIND_EVERY`] until the receiver is dropped. A
/// first attempt that finds no such module, or may not reach it, is the caller's error;
/// any other failure (owner unreachable for now) is retried.
fn follow<T, F, Fut>(
    first: Result<mpsc::Receiver<T>, ExecError>,
    again: F,
) -> Result<mpsc::Receiver<T>, ExecError>
where
    T: Send + 'static,
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<mpsc::Receiver<T>, ExecError>> + Send,
{
    let mut source = match first {
        Err(refused @ (ExecError::NotFound(_) | ExecError::Forbidden(_))) => return Err(refused),
        Err(other) => {
            tracing::debug!("binding waits for its module: {other}");
            None
        }
        Ok(source) => Some(source),
    };
    let (tx, rx) = mpsc::channel(WATCH_QUEUE);
    tokio::spawn(async move {
        loop {
            if let Some(mut current) = source.take() {
                loop {
                    tokio::select! {
                        _ = tx.closed() => return,
                        item = current.recv() => match item {
                            Some(item) => {
                                if tx.send(item).await.is_err() {
                                    return;
                                }
                            }
                            None => break,
                        },
                    }
                }
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(REBIND_EVERY) => {}
            }
            let next = tokio::select! {
                _ = tx.closed() => return,
                next = again() => next,
            };
            match next {
                Ok(next) => source = Some(next),
                Err(err) => tracing::trace!("binding still waits for its module: {err}"),
            }
        }
    });
    Ok(rx)
}
