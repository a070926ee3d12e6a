//! One running module: its transport, its compiled script, and a task that feeds the
//! script one job at a time per permit (the driver's concurrency), from a bounded queue.
//!
//! A new version of the driver's script is loaded in place (a live reload): the device
//! connection, the status map and the queue stay; the new script is compiled and its
//! `on_load` run, and only if both succeed does it replace the old one (whose schedules
//! then end). A version that fails is refused and the old one keeps running.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
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

/// Why a reload did not happen: `refused` when the module tried it and it failed (not
/// tried again), else the module was going or did not answer in time.
struct ReloadError {
    message: String,
    refused: bool,
}

impl ReloadError {
    fn gone(message: String) -> Self {
        ReloadError {
            message,
            refused: false,
        }
    }
}

/// A request to load another version of the script; answered with the outcome.
type Reload = (Arc<str>, oneshot::Sender<Result<(), String>>);

/// What the module's task publishes for callers.
struct Current {
    /// The script it runs now (set when a reload succeeds, also one whose caller stopped
    /// waiting).
    source: std::sync::Mutex<Arc<str>>,
    /// While a loaded script runs and no reload is under way: what a caller needs to run
    /// a method itself (see [`ModuleInstance::run_now`]).
    ready: std::sync::Mutex<Option<Ready>>,
}

impl Current {
    fn set_ready(&self, ready: Option<Ready>) {
        *self.ready.lock().unwrap_or_else(|p| p.into_inner()) = ready;
    }
}

/// The loaded script and the driver's permits (its concurrency).
#[derive(Clone)]
struct Ready {
    script: Arc<Script>,
    permits: Arc<Semaphore>,
}

/// A running module.
pub(super) struct ModuleInstance {
    /// What it was started from (its script may since have been reloaded).
    pub(super) spec: ModuleSpec,
    pub(super) shared: Arc<ModuleShared>,
    /// The script it runs now, and whether a call may run at once.
    current: Arc<Current>,
    /// The last script it refused to load, not tried again.
    refused: std::sync::Mutex<Option<Arc<str>>>,
    /// The newest reload asked for (its number and script): an older one still waiting
    /// is skipped, so that reloads asked for in a row end with the last.
    reloading: std::sync::Mutex<Option<(u64, Arc<str>)>>,
    reload_numbers: std::sync::atomic::AtomicU64,
    /// One reload at a time.
    reload_turn: tokio::sync::Mutex<()>,
    jobs: mpsc::Sender<Job>,
    reloads: mpsc::Sender<Reload>,
    cancel: CancellationToken,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl ModuleInstance {
    /// Starts a module: its transport, its script, `on_load`, then its queue.
    /// `warm` is what warm standby kept: the compiled script and the last status.
    /// `after` is the stop of this module's earlier instance, if one is under way: the
    /// new one connects to the device only once that has completed.
    pub(super) fn start(
        spec: ModuleSpec,
        warm: Option<Warm>,
        limits: ScriptLimits,
        runtime: Weak<Inner>,
        after: Option<super::Stopping>,
    ) -> Self {
        let (compiled, status) = match warm {
            Some(warm) => (warm.ast, warm.status),
            None => (None, super::context::StatusMap::new()),
        };
        let has_device = spec.transport != tether_config::Transport::None;
        let shared = Arc::new(ModuleShared::new(status, has_device));
        let (jobs_tx, jobs_rx) = mpsc::channel(QUEUE);
        let (reloads_tx, reloads_rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let current = Arc::new(Current {
            source: std::sync::Mutex::new(spec.source.clone()),
            ready: std::sync::Mutex::new(None),
        });
        let task = tokio::spawn(run_after(
            after,
            current.clone(),
            spec.clone(),
            compiled,
            limits,
            shared.clone(),
            (jobs_tx.clone(), jobs_rx),
            reloads_rx,
            cancel.clone(),
            runtime,
        ));
        ModuleInstance {
            current,
            refused: std::sync::Mutex::default(),
            reloading: std::sync::Mutex::default(),
            reload_numbers: 0.into(),
            reload_turn: tokio::sync::Mutex::new(()),
            spec,
            shared,
            jobs: jobs_tx,
            reloads: reloads_tx,
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
        if let Err(job) = self.run_now(job) {
            self.queue(job)?;
        }
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

    /// Runs `job` on a blocking thread from here when it would be next anyway: nothing
    /// queued, a loaded script, no reload under way and a permit free. This spares the
    /// hand-off through the module's task (a wake-up of another thread on each call).
    /// Otherwise gives the job back, for the queue.
    fn run_now(&self, job: Job) -> Result<(), Job> {
        if self.cancel.is_cancelled() || self.jobs.capacity() < self.jobs.max_capacity() {
            return Err(job);
        }
        let ready = self
            .current
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(Ready { script, permits }) = ready else {
            return Err(job);
        };
        let Ok(permit) = permits.try_acquire_owned() else {
            return Err(job);
        };
        let timeout = Duration::from_millis(self.spec.timeout_ms);
        start_job(script, self.shared.clone(), job, timeout, permit);
        Ok(())
    }

    /// Queues `job` for the module's task.
    fn queue(&self, job: Job) -> Result<(), ExecError> {
        self.jobs.try_send(job).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => ExecError::Busy(format!(
                "module {} has {QUEUE} requests waiting",
                self.spec.id
            )),
            mpsc::error::TrySendError::Closed(_) => {
                ExecError::Unavailable(format!("module {} is stopping", self.spec.id))
            }
        })
    }

    /// The script it runs now.
    pub(super) fn source(&self) -> Arc<str> {
        self.current
            .source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads reload `number` ([`begin_reload`](Self::begin_reload)) of its script in place;
    /// the error says why it was refused (the old version keeps running then). A reload
    /// asked for after this one makes this one a no-op.
    pub(super) async fn reload(&self, number: u64, source: Arc<str>) -> Result<(), String> {
        let _turn = self.reload_turn.lock().await;
        if !self.is_latest_reload(number) {
            return Ok(());
        }
        let outcome = self.load_now(source.clone()).await;
        if let Err(error) = &outcome
            && error.refused
        {
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(source);
        }
        let mut reloading = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        if reloading.as_ref().is_some_and(|(n, _)| *n == number) {
            *reloading = None;
        }
        outcome.map_err(|error| error.message)
    }

    fn is_latest_reload(&self, number: u64) -> bool {
        self.reloading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(n, _)| *n == number)
    }

    async fn load_now(&self, source: Arc<str>) -> Result<(), ReloadError> {
        let (reply, answer) = oneshot::channel();
        if self.reloads.send((source, reply)).await.is_err() {
            return Err(ReloadError::gone(format!(
                "module {} is stopping",
                self.spec.id
            )));
        }
        // Compiling and `on_load` run within the driver's timeout; a little more for the
        // jobs already running.
        let wait = Duration::from_millis(self.spec.timeout_ms) + STOP_TIMEOUT;
        match tokio::time::timeout(wait, answer).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(message))) => Err(ReloadError {
                message,
                refused: true,
            }),
            Ok(Err(_)) => Err(ReloadError::gone(format!(
                "module {} stopped while reloading",
                self.spec.id
            ))),
            // Not refused: the module may yet load it (and then says so in `source`).
            Err(_) => Err(ReloadError::gone(format!(
                "module {} did not reload in time",
                self.spec.id
            ))),
        }
    }

    /// Whether `source` should be loaded, and if so its reload's number: it is not the
    /// script running, nor the newest being loaded, nor one this module refused already (a
    /// refused version is reported once, not on every change).
    pub(super) fn begin_reload(&self, source: &Arc<str>) -> Option<u64> {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let mut reloading = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let wanted = *self.source() != **source
            && refused.as_deref() != Some(&**source)
            && reloading.as_ref().map(|(_, s)| &**s) != Some(&**source);
        if !wanted {
            return None;
        }
        let number = self
            .reload_numbers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *reloading = Some((number, source.clone()));
        Some(number)
    }

    /// Cancelled when the module stops (watches of its status and log end on it).
    pub(super) fn stopping(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops the module and waits until its device connection is closed; a module that
    /// has not stopped by [`STOP_TIMEOUT`] has its task aborted (its transport, cancelled
    /// with it, closes the device connection on its own).
    pub(super) async fn stop(&self) {
        self.cancel.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut task) = task
            && tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err()
        {
            tracing::warn!(module = %self.spec.id, "module did not stop in time; abandoned");
            task.abort();
        }
    }
}

/// Runs the module once its earlier instance has stopped (or at once, with none); a stop
/// meanwhile ends it before it touches the device.
#[allow(clippy::too_many_arguments)]
async fn run_after(
    after: Option<super::Stopping>,
    current: Arc<Current>,
    spec: ModuleSpec,
    compiled: Option<rhai::AST>,
    limits: ScriptLimits,
    shared: Arc<ModuleShared>,
    jobs: (mpsc::Sender<Job>, mpsc::Receiver<Job>),
    reloads: mpsc::Receiver<Reload>,
    cancel: CancellationToken,
    runtime: Weak<Inner>,
) {
    if let Some(after) = after {
        tokio::select! {
            _ = after => {}
            _ = cancel.cancelled() => {
                shared.set_state(ModuleState::Stopped, None);
                return;
            }
        }
    }
    run(
        current, spec, compiled, limits, shared, jobs, reloads, cancel, runtime,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn run(
    current: Arc<Current>,
    spec: ModuleSpec,
    compiled: Option<rhai::AST>,
    limits: ScriptLimits,
    shared: Arc<ModuleShared>,
    (jobs_tx, mut jobs): (mpsc::Sender<Job>, mpsc::Receiver<Job>),
    mut reloads: mpsc::Receiver<Reload>,
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
    let schedules = Arc::default();
    // Each version of the script gets a context of its own, whose token ends the
    // schedules that version made.
    let context_for = |source: Arc<str>, version: CancellationToken| {
        Arc::new(ModuleContext {
            spec: ModuleSpec {
                source,
                ..spec.clone()
            },
            shared: shared.clone(),
            tcp: tcp_handle.clone(),
            modbus: modbus_handle.clone(),
            jobs: jobs_tx.clone(),
            cancel: version,
            runtime: runtime.clone(),
            handle: tokio::runtime::Handle::current(),
            schedules: Arc::clone(&schedules),
        })
    };
    let mut version = cancel.child_token();
    let context = context_for(spec.source.clone(), version.clone());
    let loaded = load(context, compiled, limits).await;
    let mut script = match loaded {
        Ok(script) => Arc::new(script),
        Err(error) => {
            tracing::warn!(module = %spec.id, "module faulted: {error}");
            shared.log(format!("faulted: {error}"));
            shared.set_state(ModuleState::Faulted, Some(error.clone()));
            transport_cancel.cancel();
            // A faulted module is restarted, not reloaded, when its code changes.
            drop(reloads);
            serve_faulted(&mut jobs, &cancel, &spec.id, &error).await;
            shared.set_state(ModuleState::Stopped, Some(error));
            return;
        }
    };
    shared.set_state(ModuleState::Running, None);
    shared.log("running");

    let permits = Arc::new(Semaphore::new(spec.concurrency));
    let timeout = Duration::from_millis(spec.timeout_ms);
    let ready = |script: &Arc<Script>| {
        Some(Ready {
            script: script.clone(),
            permits: permits.clone(),
        })
    };
    current.set_ready(ready(&script));
    loop {
        let job = tokio::select! {
            _ = cancel.cancelled() => break,
            Some((source, reply)) = reloads.recv() => {
                let next = cancel.child_token();
                let hash = hex::encode(crate::code::content_hash(source.as_bytes()));
                shared.log(format!("reloading: new driver code {}", &hash[..12]));
                // Calls made meanwhile queue, and run once the reload is over.
                current.set_ready(None);
                let outcome = match load(context_for(source.clone(), next.clone()), None, limits).await {
                    Ok(new) => {
                        *current.source.lock().unwrap_or_else(|p| p.into_inner()) = source;
                        version.cancel();
                        version = next;
                        script = Arc::new(new);
                        shared.log("reloaded: the new code runs");
                        Ok(())
                    }
                    Err(error) => {
                        next.cancel();
                        shared.log(format!("reload refused, the old code keeps running: {error}"));
                        shared.record_error(format!("reload refused: {error}"));
                        Err(error)
                    }
                };
                current.set_ready(ready(&script));
                let _ = reply.send(outcome);
                continue;
            }
            Some(job) = jobs.recv() => job,
            Some(event) = events.recv() => match event {
                TransportEvent::Connected => {
                    shared.set_connected(true);
                    Job::callback(JobKind::Callback("connected"), Vec::new())
                }
                TransportEvent::Disconnected(reason) => {
                    shared.set_connected(false);
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
        start_job(script.clone(), shared.clone(), job, timeout, permit);
    }
    current.set_ready(None);
    transport_cancel.cancel();
    if let Some(task) = transport_task {
        let _ = task.await;
    }
    shared.set_state(ModuleState::Stopped, None);
    shared.log("stopped");
}

/// Compiles a version of the script for `context` (or takes the one compiled ahead) and
/// runs its `on_load`, within the driver's timeout.
async fn load(
    context: Arc<ModuleContext>,
    compiled: Option<rhai::AST>,
    limits: ScriptLimits,
) -> Result<Script, String> {
    let load_deadline = Instant::now() + Duration::from_millis(context.spec.timeout_ms);
    tokio::task::spawn_blocking(move || {
        let script = Script::compile(&context.spec.source, compiled, limits, context.clone())?;
        if script.has_function("on_load") {
            with_deadline(load_deadline, || script.call("on_load", &[]))
                .map_err(|err| err.to_string())?;
        }
        Ok::<_, String>(script)
    })
    .await
    .unwrap_or_else(|panic| Err(format!("the script engine panicked: {panic}")))
}

/// Runs `job` on a blocking thread, holding `permit` (its share of the driver's
/// concurrency) until it is done.
fn start_job(
    script: Arc<Script>,
    shared: Arc<ModuleShared>,
    job: Job,
    timeout: Duration,
    permit: OwnedSemaphorePermit,
) {
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        run_job(&script, &shared, job, timeout);
    });
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
