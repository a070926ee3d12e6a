//! One running module: its transport, its compiled script, and a task that feeds the
//! script one job at a time per permit (the driver's concurrency), from a bounded queue.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::context::{ModuleContext, ModuleShared, ModuleState};
use super::script::{CALLBACKS, CallError, Script, ScriptLimits, with_deadline};
use super::spec::ModuleSpec;
use super::standby::Warm;
use super::transport::TransportEvent;
use super::{ExecError, Inner, modbus, tcp};
use crate::model::Transport;

/// Requests waiting for a module before callers are told it is busy.
const QUEUE: usize = 64;
/// How long a stopping module may take before its task is abandoned.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// What a job runs.
#[derive(Debug)]
pub(super) enum JobKind {
    /// A client's (or another module's) method call.
    Method(String),
    /// A transport callback: `connected`, `disconnected`, `received`.
    Callback(&'static str),
    /// A function `schedule_every` or `schedule_in` named.
    Scheduled(String),
}

/// One unit of work for the script.
#[derive(Debug)]
pub(super) struct Job {
    kind: JobKind,
    args: Vec<Value>,
    deadline: Option<Instant>,
    reply: Option<oneshot::Sender<Result<Value, ExecError>>>,
}

impl Job {
    pub(super) fn callback(kind: JobKind, args: Vec<Value>) -> Job {
        Job {
            kind,
            args,
            deadline: None,
            reply: None,
        }
    }
}

/// A running module.
pub(super) struct ModuleInstance {
    pub(super) spec: ModuleSpec,
    pub(super) shared: Arc<ModuleShared>,
    jobs: mpsc::Sender<Job>,
    cancel: CancellationToken,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl ModuleInstance {
    /// Starts a module: its transport, its script, `on_load`, then its queue.
    /// `warm` is what warm standby kept: the compiled script and the last status.
    pub(super) fn start(
        spec: ModuleSpec,
        warm: Option<Warm>,
        limits: ScriptLimits,
        runtime: Weak<Inner>,
    ) -> Self {
        let (compiled, status) = match warm {
            Some(warm) => (warm.ast, warm.status),
            None => (None, serde_json::Map::new()),
        };
        let shared = Arc::new(ModuleShared::new(status));
        let (jobs_tx, jobs_rx) = mpsc::channel(QUEUE);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            spec.clone(),
            compiled,
            limits,
            shared.clone(),
            jobs_tx.clone(),
            jobs_rx,
            cancel.clone(),
            runtime,
        ));
        ModuleInstance {
            spec,
            shared,
            jobs: jobs_tx,
            cancel,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Calls a method: queued, run within the driver's timeout.
    pub(super) async fn call(&self, method: &str, args: Vec<Value>) -> Result<Value, ExecError> {
        let health = self.shared.health();
        if health.state == ModuleState::Faulted {
            return Err(ExecError::Faulted(format!(
                "module {} is faulted: {}",
                self.spec.id,
                health.error.unwrap_or_default()
            )));
        }
        let timeout = Duration::from_millis(self.spec.timeout_ms);
        let (reply, answer) = oneshot::channel();
        let job = Job {
            kind: JobKind::Method(method.to_string()),
            args,
            deadline: Some(Instant::now() + timeout),
            reply: Some(reply),
        };
        self.jobs.try_send(job).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => ExecError::Busy(format!(
                "module {} has {QUEUE} requests waiting",
                self.spec.id
            )),
            mpsc::error::TrySendError::Closed(_) => {
                ExecError::Unavailable(format!("module {} is stopping", self.spec.id))
            }
        })?;
        // A little grace: the script's own deadline normally answers first.
        match tokio::time::timeout(timeout + Duration::from_millis(200), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ExecError::Unavailable(format!(
                "module {} stopped before answering",
                self.spec.id
            ))),
            Err(_) => Err(ExecError::Timeout(format!(
                "{method} did not answer within {} ms",
                self.spec.timeout_ms
            ))),
        }
    }

    /// Cancelled when the module stops (watches of its status and log end on it).
    pub(super) fn stopping(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops the module and waits until its device connection is closed.
    pub(super) async fn stop(&self) {
        self.cancel.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task
            && tokio::time::timeout(STOP_TIMEOUT, task).await.is_err()
        {
            tracing::warn!(module = %self.spec.id, "module did not stop in time");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    spec: ModuleSpec,
    compiled: Option<rhai::AST>,
    limits: ScriptLimits,
    shared: Arc<ModuleShared>,
    jobs_tx: mpsc::Sender<Job>,
    mut jobs: mpsc::Receiver<Job>,
    cancel: CancellationToken,
    runtime: Weak<Inner>,
) {
    let (events_tx, mut events) = mpsc::channel(256);
    let transport_cancel = cancel.child_token();
    let mut transport_task = None;
    let (mut tcp_handle, mut modbus_handle) = (None, None);
    match (spec.transport, &spec.address) {
        (Transport::Tcp, Some((host, port))) => {
            let framing = match (&spec.delimiter, spec.frame_length) {
                (Some(delimiter), _) => tcp::Framing::Delimiter(delimiter.clone()),
                (None, Some(length)) => tcp::Framing::Fixed(length),
                (None, None) => tcp::Framing::Raw,
            };
            let (handle, task) = tcp::spawn(
                host.clone(),
                *port,
                framing,
                events_tx.clone(),
                transport_cancel.clone(),
            );
            tcp_handle = Some(handle);
            transport_task = Some(task);
        }
        (Transport::Modbus, Some((host, port))) => {
            let (handle, task) = modbus::spawn(
                host.clone(),
                *port,
                events_tx.clone(),
                transport_cancel.clone(),
            );
            modbus_handle = Some(handle);
            transport_task = Some(task);
        }
        (Transport::Tcp | Transport::Modbus, None) => {
            shared.log("the module names no host (and port): no device connection");
        }
        (Transport::None, _) => {}
    }
    drop(events_tx);
    let context = Arc::new(ModuleContext {
        spec: spec.clone(),
        shared: shared.clone(),
        tcp: tcp_handle,
        modbus: modbus_handle,
        jobs: jobs_tx,
        cancel: cancel.clone(),
        runtime,
        handle: tokio::runtime::Handle::current(),
        schedules: Arc::default(),
    });
    let load_deadline = Instant::now() + Duration::from_millis(spec.timeout_ms);
    let loaded = tokio::task::spawn_blocking(move || {
        let script = Script::compile(&context.spec.source, compiled, limits, context.clone())?;
        if script.has_function("on_load") {
            with_deadline(load_deadline, || script.call("on_load", &[]))
                .map_err(|err| err.to_string())?;
        }
        Ok::<_, String>(script)
    })
    .await
    .unwrap_or_else(|panic| Err(format!("the script engine panicked: {panic}")));
    let script = match loaded {
        Ok(script) => Arc::new(script),
        Err(error) => {
            tracing::warn!(module = %spec.id, "module faulted: {error}");
            shared.log(format!("faulted: {error}"));
            shared.set_state(ModuleState::Faulted, Some(error.clone()));
            transport_cancel.cancel();
            serve_faulted(&mut jobs, &cancel, &spec.id, &error).await;
            shared.set_state(ModuleState::Stopped, Some(error));
            return;
        }
    };
    shared.set_state(ModuleState::Running, None);
    shared.log("running");

    let permits = Arc::new(Semaphore::new(spec.concurrency));
    let timeout = Duration::from_millis(spec.timeout_ms);
    loop {
        let job = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(job) = jobs.recv() => job,
            Some(event) = events.recv() => match event {
                TransportEvent::Connected => Job::callback(JobKind::Callback("connected"), Vec::new()),
                TransportEvent::Disconnected(reason) => {
                    shared.log(format!("disconnected: {reason}"));
                    Job::callback(JobKind::Callback("disconnected"), Vec::new())
                }
                TransportEvent::Received(frame) => Job::callback(
                    JobKind::Callback("received"),
                    vec![Value::String(String::from_utf8_lossy(&frame).into_owned())],
                ),
                TransportEvent::Failed(reason) => {
                    shared.log(reason);
                    continue;
                }
            },
        };
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let script = script.clone();
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            run_job(&script, &shared, job, timeout);
        });
    }
    transport_cancel.cancel();
    if let Some(task) = transport_task {
        let _ = task.await;
    }
    shared.set_state(ModuleState::Stopped, None);
    shared.log("stopped");
}

/// Runs one job on this (blocking) thread and answers it.
fn run_job(script: &Script, shared: &ModuleShared, job: Job, timeout: Duration) {
    let deadline = job.deadline.unwrap_or_else(|| Instant::now() + timeout);
    let result = match &job.kind {
        JobKind::Method(name) => call_method(script, name, &job.args, deadline),
        JobKind::Callback(name) => call_optional(script, name, &job.args, deadline),
        JobKind::Scheduled(name) => {
            if script.has_function(name) {
                call_optional(script, name, &job.args, deadline)
            } else {
                Err(ExecError::NotFound(format!(
                    "scheduled function {name} does not exist"
                )))
            }
        }
    };
    if let Err(err) = &result
        && !matches!(err, ExecError::NotFound(_) | ExecError::BadArgs(_))
    {
        shared.record_error(err.to_string());
    }
    match job.reply {
        Some(reply) => {
            let _ = reply.send(result);
        }
        None => {
            if let Err(err) = result
                && matches!(err, ExecError::NotFound(_))
            {
                shared.record_error(err.to_string());
            }
        }
    }
}

fn call_method(
    script: &Script,
    name: &str,
    args: &[Value],
    deadline: Instant,
) -> Result<Value, ExecError> {
    let arities = script.method_arity(name);
    if arities.is_empty() || CALLBACKS.contains(&name) {
        return Err(ExecError::NotFound(format!(
            "the driver has no method {name}"
        )));
    }
    if !arities.contains(&args.len()) {
        return Err(ExecError::BadArgs(format!(
            "{name} takes {} argument(s), not {}",
            arities
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" or "),
            args.len()
        )));
    }
    if Instant::now() >= deadline {
        return Err(ExecError::Timeout(format!(
            "{name} waited in the queue past its deadline"
        )));
    }
    with_deadline(deadline, || script.call(name, args)).map_err(ExecError::from)
}

fn call_optional(
    script: &Script,
    name: &str,
    args: &[Value],
    deadline: Instant,
) -> Result<Value, ExecError> {
    if !script.has_function(name) {
        return Ok(Value::Null);
    }
    with_deadline(deadline, || script.call(name, args)).map_err(ExecError::from)
}

impl From<CallError> for ExecError {
    fn from(err: CallError) -> Self {
        match err {
            CallError::TimedOut(message) => ExecError::Timeout(message),
            CallError::Failed(message) => ExecError::Script(message),
        }
    }
}

/// A faulted module answers every request with its fault until it is stopped.
async fn serve_faulted(
    jobs: &mut mpsc::Receiver<Job>,
    cancel: &CancellationToken,
    id: &str,
    error: &str,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            job = jobs.recv() => match job {
                Some(job) => {
                    if let Some(reply) = job.reply {
                        let _ = reply.send(Err(ExecError::Faulted(format!("module {id} is faulted: {error}"))));
                    }
                }
                None => return,
            },
        }
    }
}
